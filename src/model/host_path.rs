//! The host path: the forward pass for f32 on the CPU. The activations stay
//! plain rows from the embedding to the head, every step between the matrix
//! products is a loop of `row_ops` or `host_attention`, and the keys and
//! values of every sequence sit in pages of one pool (`host_pages`).

use std::sync::{Arc, Mutex};

use candle_core::{DType, Result};
use candle_nn::RmsNorm;

use super::host_attention::{self, Heads, KvPrecision, StepSeqs};
use super::host_pages::{HostKvPool, PoolState};
use super::kv_cache::SeqChunk;
use super::layer::{Activation, Block};
use super::linear::Linear;
use super::quant::QuantizedRows;
use super::row_ops;
use super::transformer::{RopeTable, Rows, Transformer};

/// What a step writes between its inputs and its logits, kept from one step
/// to the next: once the buffers are as large as a step needs, a step
/// allocates nothing when the embedding and every matrix are ours (GGUF's
/// Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K), apart from the KV pool's growth. Each
/// buffer is named for what it holds; they keep the size of the largest step
/// (a prefill chunk) for the model's life.
#[derive(Default)]
struct HostBuffers {
    ids: Vec<u32>,
    positions: Vec<usize>,
    /// Where each sequence's rows start among the step's rows, and their end.
    row_starts: Vec<usize>,
    /// The residual stream (tokens × hidden).
    x: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// q and k after their per-head norms (swapped with `q` and `k`).
    q_normed: Vec<f32>,
    k_normed: Vec<f32>,
    attended: Vec<f32>,
    /// A layer's output before it joins the residual stream, and after its
    /// own norm where the block has one.
    out: Vec<f32>,
    out_normed: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// The rows the head reads (the last of each chunk, or all), before and after the final norm.
    last: Vec<f32>,
    last_normed: Vec<f32>,
    /// The quantized input of the matrix products.
    acts: QuantizedRows,
    /// Per rope base, the step's rotary rows.
    ropes: Vec<HostRope>,
}

/// One RMS norm's weight and ε, for `row_ops::rms_norm_into`.
struct HostNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl HostNorm {
    fn new(norm: &RmsNorm) -> Result<HostNorm> {
        // candle's `RmsNorm` hands its ε to the kernel as f32 too.
        Ok(HostNorm { weight: norm.weight().flatten_all()?.to_dtype(DType::F32)?.to_vec1()?, eps: norm.eps() as f32 })
    }

    fn apply(&self, x: &[f32], out: &mut Vec<f32>) {
        row_ops::rms_norm_into(x, &self.weight, self.eps, out)
    }
}

/// A rope base's frequencies, and the step's rotary rows (`half` values a
/// token) computed from them: a row per token of the step rather than a
/// table of the whole context (64 MB for Gemma 3's two bases). Each angle is
/// the one product `position · frequency` and its cosine and sine, as the
/// tensor path's tables hold them, so the rows have those tables' bits.
struct HostRope {
    inv_freq: Vec<f32>,
    attn_factor: f32,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl HostRope {
    fn fill(&mut self, positions: impl Iterator<Item = usize>) {
        self.cos.clear();
        self.sin.clear();
        for p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                if self.attn_factor == 1.0 {
                    self.cos.push(angle.cos());
                    self.sin.push(angle.sin());
                } else {
                    self.cos.push(angle.cos() * self.attn_factor);
                    self.sin.push(angle.sin() * self.attn_factor);
                }
            }
        }
    }
}

/// One block's norms as plain rows.
struct BlockNorms {
    attn: HostNorm,
    ffn: HostNorm,
    /// The per-head norms of queries and keys, where the family has them.
    q_and_k: Option<(HostNorm, HostNorm)>,
    /// The norms of attention's and the MLP's outputs, where the family has them.
    post_attn: Option<HostNorm>,
    post_ffn: Option<HostNorm>,
}

pub(super) struct HostPath {
    norms: Vec<BlockNorms>,
    final_norm: HostNorm,
    /// Every sequence's keys and values.
    pool: Arc<HostKvPool>,
    buffers: Mutex<HostBuffers>,
}

impl HostPath {
    pub fn new(blocks: &[Block], final_norm: &RmsNorm, ropes: &[RopeTable], kv_heads: usize, head_dim: usize) -> Result<HostPath> {
        let norms = blocks
            .iter()
            .map(|b| {
                let q_and_k = match (&b.attn.q_norm, &b.attn.k_norm) {
                    (Some(q), Some(k)) => Some((HostNorm::new(q)?, HostNorm::new(k)?)),
                    _ => None,
                };
                let post = |n: &Option<RmsNorm>| n.as_ref().map(HostNorm::new).transpose();
                Ok(BlockNorms {
                    attn: HostNorm::new(&b.attn_norm)?,
                    ffn: HostNorm::new(&b.ffn_norm)?,
                    q_and_k,
                    post_attn: post(&b.post_attn_norm)?,
                    post_ffn: post(&b.post_ffn_norm)?,
                })
            })
            .collect::<Result<_>>()?;
        let ropes = ropes.iter().map(|r| HostRope { inv_freq: r.inv_freq.clone(), attn_factor: r.attn_factor, cos: Vec::new(), sin: Vec::new() }).collect();
        let buffers = Mutex::new(HostBuffers { ropes, ..Default::default() });
        let pool = HostKvPool::new(blocks.len(), kv_heads, head_dim, KvPrecision::F32, true);
        Ok(HostPath { norms, final_norm: HostNorm::new(final_norm)?, pool, buffers })
    }

    pub fn pool(&self) -> &Arc<HostKvPool> {
        &self.pool
    }

    pub fn kv_precision(&self) -> KvPrecision {
        self.pool.precision()
    }

    /// A new, empty pool keeping keys and values in `precision`, with or
    /// without prefix caching (caches made before must not be used after).
    pub fn reset_pool(&mut self, precision: KvPrecision, prefix_cache: bool) {
        let (layers, kv_heads, head_dim) = self.pool.shape();
        self.pool = HostKvPool::new(layers, kv_heads, head_dim, precision, prefix_cache);
    }

    /// One step of `model` over `chunks`; the logits of `rows` go to `logits`.
    pub fn forward(&self, model: &Transformer, chunks: &mut [SeqChunk<'_>], rows: Rows<'_>, logits: &mut Vec<f32>) -> Result<()> {
        let mut guard = self.buffers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let b = &mut *guard;
        b.ids.clear();
        b.positions.clear();
        b.row_starts.clear();
        b.row_starts.push(0);
        for c in chunks.iter() {
            b.ids.extend_from_slice(c.tokens);
            b.positions.push(c.cache.len());
            b.row_starts.push(b.ids.len());
        }
        let n = b.ids.len();
        let mut pool = self.pool.lock();
        for c in chunks.iter_mut() {
            let end = c.cache.len() + c.tokens.len();
            c.cache.host_pages_mut().expect("checked: a host cache").reserve(&mut pool, end);
        }
        // Every token's position, for each rope base's rows.
        for rope in &mut b.ropes {
            let (positions, row_starts) = (&b.positions, &b.row_starts);
            rope.fill(positions.iter().zip(row_starts.windows(2)).flat_map(|(&start, rows)| start..start + rows[1] - rows[0]));
        }
        model.embedding.rows_into(&b.ids, &mut b.x)?;
        if model.config.arch.scales_embeddings() {
            row_ops::scale(&mut b.x, (model.config.hidden as f32).sqrt());
        }
        for (layer, (block, norms)) in model.blocks.iter().zip(&self.norms).enumerate() {
            norms.attn.apply(&b.x, &mut b.normed);
            self.attention(model, layer, block, norms, chunks, &mut pool, b)?;
            Self::join_residual(&norms.post_attn, b);
            norms.ffn.apply(&b.x, &mut b.normed);
            let mlp = &block.mlp;
            Linear::forward_many_rows_into([&mlp.gate, &mlp.up], &b.normed, n, &mut b.acts, [&mut b.gate, &mut b.up])?;
            match block.spec.activation {
                Activation::Silu => row_ops::silu_times(&mut b.gate, &b.up),
                Activation::GeluTanh => row_ops::gelu_tanh_times(&mut b.gate, &b.up),
            }
            mlp.down.forward_rows_into(&b.gate, n, &mut b.acts, &mut b.out)?;
            Self::join_residual(&norms.post_ffn, b);
        }
        for c in chunks.iter_mut() {
            c.cache.host_pages_mut().expect("checked: a host cache").filled(&mut pool, c.tokens);
            c.cache.advance(c.tokens.len());
        }
        drop(pool);
        let head_rows = match rows {
            Rows::All => {
                self.final_norm.apply(&b.x, &mut b.last_normed);
                n
            }
            Rows::Last | Rows::Tails(_) => {
                let width = b.x.len() / n;
                b.last.clear();
                let mut kept = 0;
                for (i, span) in b.row_starts.windows(2).enumerate() {
                    let tail = rows.tail(i, span[1] - span[0]);
                    b.last.extend_from_slice(&b.x[(span[1] - tail) * width..span[1] * width]);
                    kept += tail;
                }
                self.final_norm.apply(&b.last, &mut b.last_normed);
                kept
            }
        };
        model.lm_head.forward_rows_into(&b.last_normed, head_rows, &mut b.acts, logits)
    }

    /// `b.out` into the residual stream, through its own norm where the block has one.
    fn join_residual(norm: &Option<HostNorm>, b: &mut HostBuffers) {
        match norm {
            Some(norm) => {
                norm.apply(&b.out, &mut b.out_normed);
                row_ops::add_assign(&mut b.x, &b.out_normed);
            }
            None => row_ops::add_assign(&mut b.x, &b.out),
        }
    }

    /// One layer's attention on rows (`b.normed` is tokens × hidden, the
    /// result goes to `b.out`): rotation, the keys' and values' writes to the
    /// sequences' pages and attention as loops over the activations' and the
    /// pages' own memory (`host_attention`).
    #[allow(clippy::too_many_arguments)]
    fn attention(&self, model: &Transformer, layer: usize, block: &Block, norms: &BlockNorms, chunks: &mut [SeqChunk<'_>], pool: &mut PoolState, b: &mut HostBuffers) -> Result<()> {
        let cfg = &model.config;
        let attn = &block.attn;
        let heads = Heads { q_heads: cfg.n_head, kv_heads: cfg.n_kv_head, head_dim: cfg.head_dim };
        let tokens = b.ids.len();
        Linear::forward_many_rows_into([&attn.q, &attn.k, &attn.v], &b.normed, tokens, &mut b.acts, [&mut b.q, &mut b.k, &mut b.v])?;
        let (q_width, kv_width) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
        if b.q.len() != tokens * q_width || b.k.len() != tokens * kv_width || b.v.len() != tokens * kv_width {
            candle_core::bail!(
                "layer {layer}: q/k/v widths {}/{}/{} do not fit {} heads and {} KV heads of {}",
                b.q.len() / tokens,
                b.k.len() / tokens,
                b.v.len() / tokens,
                cfg.n_head,
                cfg.n_kv_head,
                cfg.head_dim
            );
        }
        if let Some((q_norm, k_norm)) = &norms.q_and_k {
            // Rows of head_dim: each head normed on its own.
            q_norm.apply(&b.q, &mut b.q_normed);
            k_norm.apply(&b.k, &mut b.k_normed);
            std::mem::swap(&mut b.q, &mut b.q_normed);
            std::mem::swap(&mut b.k, &mut b.k_normed);
        }
        let (q, k, v) = (&mut b.q, &mut b.k, &b.v);
        let rope = &b.ropes[block.spec.rope];
        let half = cfg.rotary_dim / 2;
        let rotary = host_attention::Rotary { head_dim: cfg.head_dim, rotary_dim: cfg.rotary_dim, halves: cfg.rope_halves };
        for (chunk, rows) in chunks.iter_mut().zip(b.row_starts.windows(2)) {
            let (row, len) = (rows[0], rows[1] - rows[0]);
            for i in row..row + len {
                let at = i * half;
                let (cos, sin) = (&rope.cos[at..at + half], &rope.sin[at..at + half]);
                rotary.rotate(&mut q[i * q_width..(i + 1) * q_width], cos, sin);
                rotary.rotate(&mut k[i * kv_width..(i + 1) * kv_width], cos, sin);
            }
            let pages = chunk.cache.host_pages().expect("checked: a host cache");
            let store = &mut pool.layers[layer];
            for (i, position) in (row..row + len).zip(chunk.cache.len()..) {
                let (page, slot) = pages.place(position);
                let at = i * kv_width..(i + 1) * kv_width;
                store.write(page, slot, &k[at.clone()], &v[at]);
            }
        }
        let chunks = &*chunks;
        let seqs = StepSeqs {
            row_starts: &b.row_starts,
            positions: &b.positions,
            window: block.spec.window,
            pages: |s: usize| chunks[s].cache.host_pages().expect("checked: a host cache").pages(),
        };
        host_attention::attend_into(&b.q, seqs, &pool.layers[layer], heads, &mut b.attended);
        attn.o.forward_rows_into(&b.attended, tokens, &mut b.acts, &mut b.out)
    }
}

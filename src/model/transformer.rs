//! Our own forward pass for the llama and qwen2 families, batched across sequences.
//!
//! All tokens of all sequences in a step go through the linear layers as ONE
//! matrix product; attention then runs per sequence against that sequence's own
//! KV cache. Every row is computed the same way whatever else is in the batch, so
//! a sequence's logits have the same bits alone or batched.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Embedding, Module, RmsNorm};

use super::config::TransformerConfig;
use super::host_attention::{self, Heads, KvPrecision, StepSeqs};
use super::kv_cache::{SeqChunk, SeqKvCache};
use super::kv_pages::KvPool;
use super::linear::Linear;
use super::paged_attention::{attend_causal, PagedStep};
use super::quant::{QuantMatrix, QuantizedRows};
use super::row_ops;

/// Token ids to vectors: a dense table, or the rows of a quantized matrix,
/// dequantized on lookup, which a tied output head shares (one copy of the
/// largest matrix instead of a quantized and an f32 one).
pub enum TokenEmbedding {
    Dense(Embedding),
    Quantized(Arc<QuantMatrix>),
}

impl TokenEmbedding {
    fn dtype(&self) -> DType {
        match self {
            TokenEmbedding::Dense(e) => e.embeddings().dtype(),
            TokenEmbedding::Quantized(_) => DType::F32,
        }
    }

    /// The rows of `ids` as plain f32 (ids.len() × hidden).
    fn rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut values = Vec::new();
        self.rows_into(ids, &mut values)?;
        Ok(values)
    }

    /// `rows` into `out` (its buffer reused).
    fn rows_into(&self, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        match self {
            TokenEmbedding::Dense(_) => out.extend(self.forward(ids, &Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?),
            TokenEmbedding::Quantized(m) => {
                for &id in ids {
                    if id as usize >= m.rows() {
                        candle_core::bail!("token id {id} is outside the vocabulary of {}", m.rows());
                    }
                    m.dequantize_row_into(id as usize, out);
                }
            }
        }
        Ok(())
    }

    fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            TokenEmbedding::Dense(e) => e.forward(&Tensor::new(ids, device)?),
            TokenEmbedding::Quantized(m) => Tensor::from_vec(self.rows(ids)?, (ids.len(), m.cols()), device),
        }
    }
}

pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
}

pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub ffn_norm: RmsNorm,
    pub mlp: Mlp,
}

pub struct Transformer {
    pub config: TransformerConfig,
    pub embedding: TokenEmbedding,
    pub blocks: Vec<Block>,
    pub final_norm: RmsNorm,
    pub lm_head: Linear,
    /// RoPE tables, (context_length, head_dim / 2).
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// What activations and the KV cache are held in: the embedding table's dtype.
    dtype: DType,
    /// What the CPU path's KV buffers keep.
    kv_precision: KvPrecision,
    /// The norms' weights as plain f32, when the pass runs on the host (f32
    /// on the CPU): that path keeps activations as rows, not tensors.
    host_norms: Option<HostNorms>,
    /// The host path's buffers, kept from step to step.
    host_buffers: std::sync::Mutex<HostBuffers>,
    /// Every sequence's keys and values on the tensor path (`kv_pages`);
    /// `None` on the host path, or with per-sequence caches.
    kv_pool: Option<Arc<KvPool>>,
}

/// Set, this keeps the tensor path's older layout, one cache tensor per
/// sequence and attention per sequence, to measure against the pool.
pub const PER_SEQUENCE_KV_VAR: &str = "TERSE_PER_SEQUENCE_KV";

/// Whether the tensor path pools its KV cache unless told otherwise.
fn pooled_by_default() -> bool {
    std::env::var_os(PER_SEQUENCE_KV_VAR).is_none()
}

/// What a step on the host writes between its inputs and its logits, kept
/// from one step to the next: once the buffers are as large as a step needs,
/// a step allocates nothing when the embedding and every matrix are ours
/// (GGUF's Q4_1, Q5_0, Q8_0, Q4_K, Q6_K), apart from a KV cache's doubling.
/// Each buffer is named for what it holds; they keep the size of the largest
/// step (a prefill chunk) for the model's life.
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
    attended: Vec<f32>,
    /// A layer's output before it joins the residual stream.
    out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// The last row of each sequence, before and after the final norm.
    last: Vec<f32>,
    last_normed: Vec<f32>,
    /// The quantized input of the matrix products.
    acts: QuantizedRows,
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

struct HostNorms {
    /// (before attention, before the MLP) per block.
    blocks: Vec<(HostNorm, HostNorm)>,
    last: HostNorm,
}

/// A step's logits (one row per chunk): in the host path's own buffer, or a
/// tensor on the model's device.
pub enum StepLogits<'a> {
    Host(&'a mut [f32]),
    Device(Tensor),
}


impl Transformer {
    pub fn new(
        config: TransformerConfig,
        embedding: TokenEmbedding,
        blocks: Vec<Block>,
        final_norm: RmsNorm,
        lm_head: Linear,
        device: Device,
    ) -> Result<Self> {
        let dtype = embedding.dtype();
        let (cos, sin) = rope_tables(&config, &device)?;
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        // f32 on the CPU runs on rows (`forward_on_host`); everything else on tensors.
        let host_norms = if device.is_cpu() && dtype == DType::F32 {
            let blocks = blocks.iter().map(|b| Ok((HostNorm::new(&b.attn_norm)?, HostNorm::new(&b.ffn_norm)?))).collect::<Result<_>>()?;
            Some(HostNorms { blocks, last: HostNorm::new(&final_norm)? })
        } else {
            None
        };
        let mut model = Transformer { config, embedding, blocks, final_norm, lm_head, cos, sin, device, dtype, kv_precision: KvPrecision::F32, host_norms, host_buffers: Default::default(), kv_pool: None };
        model.set_pooled_kv(pooled_by_default())?;
        Ok(model)
    }

    /// Keep the tensor path's KV cache in one pool of pages for all sequences
    /// (`true`, the default) or in a tensor per sequence. The host path keeps
    /// its own buffers either way. Caches made before the change must not be
    /// used after it.
    pub fn set_pooled_kv(&mut self, pooled: bool) -> Result<()> {
        self.kv_pool = if pooled && !self.runs_on_host() {
            let cfg = &self.config;
            Some(KvPool::new(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, self.dtype, &self.device)?)
        } else {
            None
        };
        Ok(())
    }

    /// Run every step on tensors, as on a GPU, even where the host path
    /// would run (f32 on the CPU): to check the GPU's computation on a CPU.
    /// The KV cache becomes the pool (or per-sequence tensors, with
    /// `TERSE_PER_SEQUENCE_KV`); caches made before must not be used after.
    pub fn use_tensor_path(&mut self) -> Result<()> {
        self.host_norms = None;
        self.set_pooled_kv(pooled_by_default())
    }

    /// Bound the pooled cache's growth by the engine's KV budget (for
    /// `max_batch` sequences); nothing to bound on the host path.
    pub fn set_kv_capacity(&self, budget_bytes: u64, max_batch: usize) {
        if let Some(pool) = &self.kv_pool {
            pool.set_capacity(budget_bytes, max_batch);
        }
    }

    /// Whether the KV cache is the shared pool.
    pub fn pooled_kv(&self) -> bool {
        self.kv_pool.is_some()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// KV-cache bytes per token, in the dtype the cache is kept in.
    pub fn kv_bytes_per_token(&self) -> u64 {
        let kept = if self.runs_on_host() && self.kv_precision == KvPrecision::F16 { DType::F16 } else { self.dtype };
        self.config.kv_bytes_per_token(kept)
    }

    /// Keep the KV cache in f16 (`KvPrecision::F16`): half the memory and
    /// half the bytes attention reads, at f16's rounding of keys and values.
    /// Only the CPU's f32 path has its own cache buffers; elsewhere the cache
    /// stays in the model's dtype.
    pub fn set_kv_precision(&mut self, precision: KvPrecision) {
        self.kv_precision = precision;
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> SeqKvCache {
        match &self.kv_pool {
            Some(pool) => SeqKvCache::in_pool(pool.clone()),
            None => SeqKvCache::with_precision(self.config.n_layer, self.kv_precision),
        }
    }

    /// Whether the pass runs on rows and attention on `host_attention` (f32
    /// on the CPU), where `forward_into` writes the logits straight into the
    /// caller's buffer.
    pub fn runs_on_host(&self) -> bool {
        self.host_norms.is_some()
    }

    /// Run one step: the logits of the last token of each chunk, in the host
    /// path's buffer `host` (reused from step to step) or as a tensor on the
    /// model's device.
    pub fn step<'a>(&self, chunks: &mut [SeqChunk<'_>], host: &'a mut Vec<f32>) -> Result<StepLogits<'a>> {
        if self.runs_on_host() {
            self.forward_into(chunks, host)?;
            Ok(StepLogits::Host(host.as_mut_slice()))
        } else {
            Ok(StepLogits::Device(self.forward(chunks)?))
        }
    }

    /// Run one step, the logits of the last token of each chunk written into
    /// `logits` (chunks.len() × vocab, f32). On the host nothing is allocated
    /// once the buffers (the model's and `logits`) are as large as the step,
    /// as `HostBuffers` says.
    pub fn forward_into(&self, chunks: &mut [SeqChunk<'_>], logits: &mut Vec<f32>) -> Result<()> {
        self.check_chunks(chunks)?;
        match &self.host_norms {
            Some(norms) => {
                let mut buffers = self.host_buffers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                self.forward_on_host(norms, chunks, &mut buffers, logits)
            }
            None => {
                *logits = self.forward(chunks)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(())
            }
        }
    }

    fn check_chunks(&self, chunks: &[SeqChunk<'_>]) -> Result<()> {
        if chunks.is_empty() || chunks.iter().any(|c| c.tokens.is_empty()) {
            candle_core::bail!("every sequence in a step needs at least one token");
        }
        if chunks.iter().any(|c| c.cache.pages().is_some() != self.kv_pool.is_some()) {
            candle_core::bail!("a sequence's KV cache was made for another cache layout: make caches with `Transformer::new_cache`");
        }
        Ok(())
    }

    /// Run one step. Returns the f32 logits (chunks.len(), vocab) of the last token of each chunk.
    pub fn forward(&self, chunks: &mut [SeqChunk<'_>]) -> Result<Tensor> {
        self.check_chunks(chunks)?;
        if self.runs_on_host() {
            let mut logits = Vec::new();
            self.forward_into(chunks, &mut logits)?;
            let vocab = logits.len() / chunks.len();
            return Tensor::from_vec(logits, (chunks.len(), vocab), &self.device);
        }
        let ids: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        let starts: Vec<usize> = chunks.iter().map(|c| c.cache.len()).collect();
        let paged = match &self.kv_pool {
            Some(pool) => Some(PagedStep::new(pool, chunks, &self.config, &self.cos, &self.sin, self.dtype, &self.device)?),
            None => None,
        };
        let mut x = self.embedding.forward(&ids, &self.device)?; // (tokens, hidden)
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = block.attn_norm.forward(&x)?;
            let h = match &paged {
                Some(step) => self.pooled_attention(layer, &block.attn, &h, step)?,
                None => self.attention(layer, &block.attn, &h, chunks, &starts)?,
            };
            x = (x + h)?;
            let h = block.ffn_norm.forward(&x)?;
            let [gate, up] = Linear::forward_many(&[&block.mlp.gate, &block.mlp.up], &h)?.try_into().expect("two layers, two outputs");
            let h = block.mlp.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
            x = (x + h)?;
        }
        if paged.is_some() {
            for c in chunks.iter_mut() {
                c.cache.advance(c.tokens.len());
            }
        }
        // Only the last row of each chunk is needed for sampling.
        let mut last = Vec::with_capacity(chunks.len());
        let mut offset = 0u32;
        for c in chunks.iter() {
            offset += c.tokens.len() as u32;
            last.push(offset - 1);
        }
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let x = x.index_select(&last, 0)?;
        let x = self.final_norm.forward(&x)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

    /// `forward` for f32 on the CPU: the activations stay plain rows from the
    /// embedding to the head, and every step between the matrix products is
    /// a loop of `row_ops` or `host_attention`.
    fn forward_on_host(&self, norms: &HostNorms, chunks: &mut [SeqChunk<'_>], b: &mut HostBuffers, logits: &mut Vec<f32>) -> Result<()> {
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
        self.embedding.rows_into(&b.ids, &mut b.x)?;
        for (layer, (block, (attn_norm, ffn_norm))) in self.blocks.iter().zip(&norms.blocks).enumerate() {
            attn_norm.apply(&b.x, &mut b.normed);
            self.attention_on_host(layer, &block.attn, chunks, b)?;
            row_ops::add_assign(&mut b.x, &b.out);
            ffn_norm.apply(&b.x, &mut b.normed);
            let mlp = &block.mlp;
            Linear::forward_many_rows_into([&mlp.gate, &mlp.up], &b.normed, n, &mut b.acts, [&mut b.gate, &mut b.up])?;
            row_ops::silu_times(&mut b.gate, &b.up);
            mlp.down.forward_rows_into(&b.gate, n, &mut b.acts, &mut b.out)?;
            row_ops::add_assign(&mut b.x, &b.out);
        }
        // Only the last row of each chunk is needed for sampling.
        let width = b.x.len() / n;
        b.last.clear();
        for &end in &b.row_starts[1..] {
            b.last.extend_from_slice(&b.x[(end - 1) * width..end * width]);
        }
        norms.last.apply(&b.last, &mut b.last_normed);
        self.lm_head.forward_rows_into(&b.last_normed, chunks.len(), &mut b.acts, logits)
    }

    /// `attention` over the pooled KV cache, as `step` plans it.
    fn pooled_attention(&self, layer: usize, attn: &Attention, h: &Tensor, step: &PagedStep) -> Result<Tensor> {
        let [q, k, v] = Linear::forward_many(&[&attn.q, &attn.k, &attn.v], h)?.try_into().expect("three layers, three outputs");
        attn.o.forward(&step.attend(layer, &self.config, &q, &k, &v)?)
    }

    fn attention(
        &self,
        layer: usize,
        attn: &Attention,
        h: &Tensor,
        chunks: &mut [SeqChunk<'_>],
        starts: &[usize],
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_head, cfg.n_kv_head);
        let [q, k, v] = Linear::forward_many(&[&attn.q, &attn.k, &attn.v], h)?.try_into().expect("three layers, three outputs");
        let mut outputs = Vec::with_capacity(chunks.len());
        let mut row = 0;
        for (chunk, &start) in chunks.iter_mut().zip(starts) {
            let len = chunk.tokens.len();
            // (len, heads * hd) -> (heads, len, hd)
            let split = |t: &Tensor, heads: usize| -> Result<Tensor> {
                t.narrow(0, row, len)?.reshape((len, heads, hd))?.transpose(0, 1)?.contiguous()
            };
            let q_s = self.rope(&split(&q, nh)?, start)?;
            let k_s = self.rope(&split(&k, nkv)?, start)?;
            let v_s = split(&v, nkv)?;
            let (keys, values) = chunk.cache.append(layer, &k_s, &v_s)?;
            outputs.push(attend_causal(&q_s, &keys, &values, start, nkv, Some(1.0 / (hd as f64).sqrt()))?);
            row += len;
        }
        let y = Tensor::cat(&outputs, 0)?; // (tokens, heads * hd)
        attn.o.forward(&y)
    }

    /// `attention` for f32 on the CPU, on rows (`b.normed` is tokens ×
    /// hidden, the result goes to `b.out`): rotation, cache append and
    /// attention as loops over the activations' and the cache's own memory
    /// (`host_attention`).
    fn attention_on_host(&self, layer: usize, attn: &Attention, chunks: &mut [SeqChunk<'_>], b: &mut HostBuffers) -> Result<()> {
        let cfg = &self.config;
        let heads = Heads { q_heads: cfg.n_head, kv_heads: cfg.n_kv_head, head_dim: cfg.head_dim };
        let tokens = b.ids.len();
        Linear::forward_many_rows_into([&attn.q, &attn.k, &attn.v], &b.normed, tokens, &mut b.acts, [&mut b.q, &mut b.k, &mut b.v])?;
        let (q, k, v) = (&mut b.q, &mut b.k, &b.v);
        let (q_width, kv_width) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
        if q.len() != tokens * q_width || k.len() != tokens * kv_width || v.len() != tokens * kv_width {
            candle_core::bail!("layer {layer}: q/k/v widths {}/{}/{} do not fit {} heads and {} KV heads of {}", q.len() / tokens, k.len() / tokens, v.len() / tokens, cfg.n_head, cfg.n_kv_head, cfg.head_dim);
        }
        {
            let (cos, cos_layout) = self.cos.storage_and_layout();
            let (sin, sin_layout) = self.sin.storage_and_layout();
            let (cos, sin) = match (&*cos, &*sin) {
                (candle_core::Storage::Cpu(cos), candle_core::Storage::Cpu(sin)) => {
                    (&cos.as_slice::<f32>()?[cos_layout.start_offset()..], &sin.as_slice::<f32>()?[sin_layout.start_offset()..])
                }
                _ => candle_core::bail!("the rotary tables are not on the CPU"),
            };
            let half = cfg.head_dim / 2;
            for ((chunk, &start), rows) in chunks.iter_mut().zip(&b.positions).zip(b.row_starts.windows(2)) {
                let (row, len) = (rows[0], rows[1] - rows[0]);
                if start + len > cfg.context_length {
                    candle_core::bail!("positions up to {} are past the context of {}", start + len, cfg.context_length);
                }
                for i in row..row + len {
                    let at = (start + i - row) * half;
                    let (cos, sin) = (&cos[at..at + half], &sin[at..at + half]);
                    host_attention::rotate(&mut q[i * q_width..(i + 1) * q_width], cfg.head_dim, cfg.rope_halves, cos, sin);
                    host_attention::rotate(&mut k[i * kv_width..(i + 1) * kv_width], cfg.head_dim, cfg.rope_halves, cos, sin);
                }
                let new = row * kv_width..(row + len) * kv_width;
                chunk.cache.append_host(layer, &k[new.clone()], &v[new], cfg.n_kv_head, cfg.head_dim);
            }
        }
        let chunks = &*chunks;
        let seqs = StepSeqs { row_starts: &b.row_starts, positions: &b.positions, cache: |s: usize| chunks[s].cache.host_layer(layer) };
        host_attention::attend_into(&b.q, seqs, heads, &mut b.attended);
        attn.o.forward_rows_into(&b.attended, tokens, &mut b.acts, &mut b.out)
    }

    fn rope(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let len = x.dim(1)?;
        let cos = self.cos.narrow(0, start, len)?;
        let sin = self.sin.narrow(0, start, len)?;
        let x = x.unsqueeze(0)?;
        let y = if self.config.rope_halves {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
        };
        y.squeeze(0)
    }
}

fn rope_tables(cfg: &TransformerConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv_freq: Vec<f32> = (0..cfg.head_dim)
        .step_by(2)
        .map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / cfg.head_dim as f32))
        .collect();
    let inv_freq = Tensor::new(inv_freq.as_slice(), device)?;
    let positions = Tensor::arange(0, cfg.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.context_length, 1))?;
    let angles = positions.matmul(&inv_freq.reshape((1, ()))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

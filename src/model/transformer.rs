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
use super::host_attention::{self, Heads, KvPrecision, SeqQueries};
use super::kv_cache::SeqKvCache;
use super::linear::Linear;
use super::quant::QuantMatrix;
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
        match self {
            TokenEmbedding::Dense(_) => self.forward(ids, &Device::Cpu)?.flatten_all()?.to_vec1::<f32>(),
            TokenEmbedding::Quantized(m) => {
                let mut values = Vec::with_capacity(ids.len() * m.cols());
                for &id in ids {
                    if id as usize >= m.rows() {
                        candle_core::bail!("token id {id} is outside the vocabulary of {}", m.rows());
                    }
                    values.extend(m.dequantize_row(id as usize));
                }
                Ok(values)
            }
        }
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
}

/// One RMS norm's weight and ε, for `row_ops::rms_norm`.
struct HostNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl HostNorm {
    fn new(norm: &RmsNorm) -> Result<HostNorm> {
        // candle's `RmsNorm` hands its ε to the kernel as f32 too.
        Ok(HostNorm { weight: norm.weight().flatten_all()?.to_dtype(DType::F32)?.to_vec1()?, eps: norm.eps() as f32 })
    }

    fn apply(&self, x: &[f32]) -> Vec<f32> {
        row_ops::rms_norm(x, &self.weight, self.eps)
    }
}

struct HostNorms {
    /// (before attention, before the MLP) per block.
    blocks: Vec<(HostNorm, HostNorm)>,
    last: HostNorm,
}

/// The new tokens of one sequence in a step and its cache; the tokens sit at
/// positions `cache.len()..cache.len() + tokens.len()`.
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqKvCache,
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
        Ok(Transformer { config, embedding, blocks, final_norm, lm_head, cos, sin, device, dtype, kv_precision: KvPrecision::F32, host_norms })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// KV-cache bytes per token, in the dtype the cache is kept in.
    pub fn kv_bytes_per_token(&self) -> u64 {
        let kept = if self.on_host() && self.kv_precision == KvPrecision::F16 { DType::F16 } else { self.dtype };
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
        SeqKvCache::with_precision(self.config.n_layer, self.kv_precision)
    }

    /// Whether the pass runs on rows and attention on `host_attention` (f32
    /// on the CPU).
    fn on_host(&self) -> bool {
        self.host_norms.is_some()
    }

    /// Run one step. Returns the f32 logits (chunks.len(), vocab) of the last token of each chunk.
    pub fn forward(&self, chunks: &mut [SeqChunk<'_>]) -> Result<Tensor> {
        let ids: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        if ids.is_empty() || chunks.iter().any(|c| c.tokens.is_empty()) {
            candle_core::bail!("every sequence in a step needs at least one token");
        }
        let starts: Vec<usize> = chunks.iter().map(|c| c.cache.len()).collect();
        if let Some(norms) = &self.host_norms {
            return self.forward_on_host(norms, &ids, chunks, &starts);
        }
        let mut x = self.embedding.forward(&ids, &self.device)?; // (tokens, hidden)
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = block.attn_norm.forward(&x)?;
            let h = self.attention(layer, &block.attn, &h, chunks, &starts)?;
            x = (x + h)?;
            let h = block.ffn_norm.forward(&x)?;
            let [gate, up] = Linear::forward_many(&[&block.mlp.gate, &block.mlp.up], &h)?.try_into().expect("two layers, two outputs");
            let h = block.mlp.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
            x = (x + h)?;
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
    fn forward_on_host(&self, norms: &HostNorms, ids: &[u32], chunks: &mut [SeqChunk<'_>], starts: &[usize]) -> Result<Tensor> {
        let n = ids.len();
        let mut x = self.embedding.rows(ids)?;
        for (layer, (block, (attn_norm, ffn_norm))) in self.blocks.iter().zip(&norms.blocks).enumerate() {
            let h = self.attention_on_host(layer, &block.attn, &attn_norm.apply(&x), chunks, starts)?;
            row_ops::add_assign(&mut x, &h);
            let h = ffn_norm.apply(&x);
            let [mut gate, up] = Linear::forward_many_rows(&[&block.mlp.gate, &block.mlp.up], &h, n)?.try_into().expect("two layers, two outputs");
            row_ops::silu_times(&mut gate, &up);
            row_ops::add_assign(&mut x, &block.mlp.down.forward_rows(&gate, n)?);
        }
        // Only the last row of each chunk is needed for sampling.
        let width = x.len() / n;
        let mut last = Vec::with_capacity(chunks.len() * width);
        let mut end = 0;
        for c in chunks.iter() {
            end += c.tokens.len();
            last.extend_from_slice(&x[(end - 1) * width..end * width]);
        }
        let logits = self.lm_head.forward_rows(&norms.last.apply(&last), chunks.len())?;
        let vocab = logits.len() / chunks.len();
        Tensor::from_vec(logits, (chunks.len(), vocab), &self.device)
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
            outputs.push(self.attend(&q_s, &keys, &values, start)?);
            row += len;
        }
        let y = Tensor::cat(&outputs, 0)?; // (tokens, heads * hd)
        attn.o.forward(&y)
    }

    /// `attention` for f32 on the CPU, on rows (`h` is tokens × hidden):
    /// rotation, cache append and attention as loops over the activations'
    /// and the cache's own memory (`host_attention`).
    fn attention_on_host(
        &self,
        layer: usize,
        attn: &Attention,
        h: &[f32],
        chunks: &mut [SeqChunk<'_>],
        starts: &[usize],
    ) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let heads = Heads { q_heads: cfg.n_head, kv_heads: cfg.n_kv_head, head_dim: cfg.head_dim };
        let tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let [mut q, mut k, v] = Linear::forward_many_rows(&[&attn.q, &attn.k, &attn.v], h, tokens)?.try_into().expect("three layers, three outputs");
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
            let mut row = 0;
            for (chunk, &start) in chunks.iter_mut().zip(starts) {
                let len = chunk.tokens.len();
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
                row += len;
            }
        }
        let mut row = 0;
        let seqs: Vec<SeqQueries<'_>> = chunks
            .iter()
            .zip(starts)
            .map(|(chunk, &start)| {
                let rows = row..row + chunk.tokens.len();
                row = rows.end;
                SeqQueries { rows, start, cache: chunk.cache.host_layer(layer) }
            })
            .collect();
        let y = host_attention::attend(&q, &seqs, heads);
        attn.o.forward_rows(&y, row)
    }

    /// Scaled dot-product attention of one sequence's new queries (heads, len, hd)
    /// over its cached keys and values (kv_heads, total, hd), causal.
    fn attend(&self, q: &Tensor, keys: &Tensor, values: &Tensor, start: usize) -> Result<Tensor> {
        let cfg = &self.config;
        let (nh, len, hd) = q.dims3()?;
        let nkv = cfg.n_kv_head;
        let group = nh / nkv;
        let total = start + len;
        // Grouped-query attention without copying keys: the `group` query heads that
        // share one KV head are stacked along the row axis.
        let q = q.reshape((nkv, group * len, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&keys.t()?)? * scale)?; // (nkv, group*len, total)
        let scores = if len > 1 {
            let mask = causal_mask(len, start, &self.device)?.to_dtype(self.dtype)?; // (len, total)
            scores.reshape((nkv, group, len, total))?.broadcast_add(&mask)?.reshape((nkv, group * len, total))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&values.contiguous()?)?; // (nkv, group*len, hd)
        out.reshape((nh, len, hd))?.transpose(0, 1)?.reshape((len, nh * hd))
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

/// 0 where query `i` (at position start + i) may see key `j`, -inf after it.
fn causal_mask(len: usize, start: usize, device: &Device) -> Result<Tensor> {
    let total = start + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..total).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (len, total), device)
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

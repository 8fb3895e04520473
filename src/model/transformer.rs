//! Our own forward pass for the llama, qwen2, qwen3 and gemma3 families, batched across sequences.
//!
//! All tokens of all sequences in a step go through the linear layers as ONE
//! matrix product; attention then reads each sequence's own keys and values.
//! What differs between layers and families is data (`layer::LayerSpec`),
//! read by one block function per backend. The backend is chosen once, when
//! the model is built:
//! - the host path (`host_path.rs`): f32 on the CPU, activations as plain
//!   rows from the embedding to the head, attention on each sequence's own
//!   buffers (`host_attention`); every row is computed the same way whatever
//!   else is in the batch, so a sequence's logits have the same bits alone or
//!   batched;
//! - the tensor path (`tensor_path.rs`): candle tensors on any device (every
//!   model on a GPU), every sequence's keys and values in one pool of pages.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Embedding, Module, RmsNorm};

use super::config::TransformerConfig;
use super::decode_graph::GraphBuckets;
use super::host_attention::KvPrecision;
use super::page_book::PrefixCacheStats;
use super::host_path::HostPath;
use super::kv_cache::{SeqChunk, SeqKvCache};
use super::layer::Block;
use super::linear::Linear;
use super::quant::QuantMatrix;
use super::tensor_path::TensorPath;

/// Token ids to vectors: a dense table, or the rows of a quantized matrix,
/// dequantized on lookup, which a tied output head shares (one copy of the
/// largest matrix instead of a quantized and an f32 one).
pub enum TokenEmbedding {
    Dense(Embedding),
    Quantized(Arc<QuantMatrix>),
    /// F16 / BF16 rows, widened as they are looked up.
    Float(Arc<super::float_matrix::FloatMatrix>),
}

impl TokenEmbedding {
    fn dtype(&self) -> DType {
        match self {
            TokenEmbedding::Dense(e) => e.embeddings().dtype(),
            TokenEmbedding::Quantized(_) | TokenEmbedding::Float(_) => DType::F32,
        }
    }

    /// The rows of `ids` as plain f32 (ids.len() × hidden), into `out` (its buffer reused).
    pub(super) fn rows_into(&self, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
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
            TokenEmbedding::Float(m) => {
                for &id in ids {
                    if id as usize >= m.rows() {
                        candle_core::bail!("token id {id} is outside the vocabulary of {}", m.rows());
                    }
                    out.extend(m.row_f32(id as usize));
                }
            }
        }
        Ok(())
    }

    pub(super) fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            TokenEmbedding::Dense(e) => e.forward(&Tensor::new(ids, device)?),
            TokenEmbedding::Quantized(m) => {
                let mut rows = Vec::new();
                self.rows_into(ids, &mut rows)?;
                Tensor::from_vec(rows, (ids.len(), m.cols()), device)
            }
            TokenEmbedding::Float(m) => {
                let mut rows = Vec::new();
                self.rows_into(ids, &mut rows)?;
                Tensor::from_vec(rows, (ids.len(), m.cols()), device)
            }
        }
    }
}

/// Rotary angles of one rope base: its frequencies, and as tables
/// (context_length, rotary_dim / 2) f32.
pub(super) struct RopeTable {
    pub inv_freq: Vec<f32>,
    /// What every cosine and sine is multiplied by (`rope_attn_factor`).
    pub attn_factor: f32,
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTable {
    /// The table of base `theta`, each frequency divided by its factor where given.
    fn new(cfg: &TransformerConfig, theta: f32, factors: Option<&[f32]>, device: &Device) -> Result<RopeTable> {
        let dim = cfg.rotary_dim;
        let mut inv_freq: Vec<f32> = (0..dim).step_by(2).map(|i| 1f32 / theta.powf(i as f32 / dim as f32)).collect();
        if let Some(factors) = factors {
            if factors.len() != inv_freq.len() {
                candle_core::bail!("the rope scaling holds {} factors but the heads rotate {} frequencies", factors.len(), inv_freq.len());
            }
            for (f, by) in inv_freq.iter_mut().zip(factors) {
                *f /= by;
            }
        }
        let freqs = Tensor::new(inv_freq.as_slice(), device)?;
        let positions = Tensor::arange(0, cfg.context_length as u32, device)?.to_dtype(DType::F32)?.reshape((cfg.context_length, 1))?;
        let angles = positions.matmul(&freqs.reshape((1, ()))?)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let (cos, sin) = match cfg.rope_attn_factor {
            1.0 => (cos, sin),
            factor => ((cos * factor as f64)?, (sin * factor as f64)?),
        };
        Ok(RopeTable { inv_freq, attn_factor: cfg.rope_attn_factor, cos, sin })
    }
}

/// The rotary tables the layers' specs name; the first is the global one,
/// which Llama 3's scaling applies to. Each backend keeps them in its own form.
fn rope_tables(config: &TransformerConfig, device: &Device) -> Result<Vec<RopeTable>> {
    let factors = config.rope_freq_factors.as_deref();
    let bases = config.rope_bases().into_iter().enumerate();
    bases.map(|(i, theta)| RopeTable::new(config, theta, factors.filter(|_| i == 0), device)).collect()
}

/// Which backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// The host path for f32 on the CPU, the tensor path otherwise.
    #[default]
    Auto,
    /// The tensor path, even where the host path would run: to check the
    /// GPU's computation on a CPU.
    Tensor,
}

enum Backend {
    Host(Box<HostPath>),
    Tensor(TensorPath),
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows<'a> {
    /// The last position of each chunk (what sampling needs).
    Last,
    /// Every position of every chunk, in order.
    All,
    /// The last `tails[i]` positions (at least one) of chunk i, chunk after
    /// chunk: a drafted sequence's rows to verify beside the others' last.
    Tails(&'a [usize]),
}

impl Rows<'_> {
    /// How many of chunk `i`'s last positions are kept, of its `len`.
    pub fn tail(&self, i: usize, len: usize) -> usize {
        match self {
            Rows::Last => 1,
            Rows::All => len,
            Rows::Tails(tails) => tails[i].clamp(1, len),
        }
    }
}

/// A step's logits (one row per chunk): in the host path's own buffer, or a
/// tensor on the model's device.
pub enum StepLogits<'a> {
    Host(&'a mut [f32]),
    Device(Tensor),
}

pub struct Transformer {
    pub config: TransformerConfig,
    pub embedding: TokenEmbedding,
    pub blocks: Vec<Block>,
    pub final_norm: RmsNorm,
    pub lm_head: Linear,
    device: Device,
    /// What activations and the KV cache are held in: the embedding table's dtype.
    dtype: DType,
    backend: Backend,
}

impl Transformer {
    /// The model on the backend `BackendKind::Auto` picks.
    pub fn new(config: TransformerConfig, embedding: TokenEmbedding, blocks: Vec<Block>, final_norm: RmsNorm, lm_head: Linear, device: Device) -> Result<Self> {
        Self::with_backend(config, embedding, blocks, final_norm, lm_head, device, BackendKind::Auto)
    }

    pub fn with_backend(
        config: TransformerConfig,
        embedding: TokenEmbedding,
        blocks: Vec<Block>,
        final_norm: RmsNorm,
        lm_head: Linear,
        device: Device,
        kind: BackendKind,
    ) -> Result<Self> {
        let dtype = embedding.dtype();
        let ropes = rope_tables(&config, &device)?;
        let on_host = kind == BackendKind::Auto && device.is_cpu() && dtype == DType::F32;
        let backend = if on_host {
            Backend::Host(Box::new(HostPath::new(&blocks, &final_norm, &ropes, config.n_kv_head, config.head_dim)?))
        } else {
            Backend::Tensor(TensorPath::new(&config, &ropes, dtype, &device, true)?)
        };
        Ok(Transformer { config, embedding, blocks, final_norm, lm_head, device, dtype, backend })
    }

    /// The same model on the tensor path (caches made before must not be used after).
    pub fn into_tensor_path(mut self) -> Result<Self> {
        let ropes = rope_tables(&self.config, &self.device)?;
        let prefix_cache = self.prefix_cache();
        self.backend = Backend::Tensor(TensorPath::new(&self.config, &ropes, self.dtype, &self.device, prefix_cache)?);
        Ok(self)
    }

    /// Run decode steps within `buckets` at the buckets' fixed shapes (the
    /// shapes a CUDA graph is captured at: `decode_graph`), or (`None`) each
    /// at its own. The tensor path only.
    pub fn set_static_decode_shapes(&mut self, buckets: Option<GraphBuckets>) -> Result<()> {
        match &mut self.backend {
            Backend::Tensor(path) => path.set_static_decode(buckets),
            Backend::Host(_) => candle_core::bail!("fixed decode shapes are for the tensor path (a GPU, or f16 / bf16 weights on the CPU)"),
        }
    }

    /// Bound the pool's growth by the engine's KV budget (for `max_batch`
    /// sequences): past it, cached prefixes are evicted to make room.
    pub fn set_kv_capacity(&self, budget_bytes: u64, max_batch: usize) {
        match &self.backend {
            Backend::Tensor(path) => path.pool.set_capacity(budget_bytes, max_batch),
            Backend::Host(path) => path.pool().set_capacity(budget_bytes, max_batch),
        }
    }

    /// Whether full pages of prompts are kept and shared between sequences
    /// (on by default). A change makes a new, empty pool: call before making
    /// caches, and before `set_kv_capacity`.
    pub fn set_prefix_cache(&mut self, on: bool) -> Result<()> {
        if on == self.prefix_cache() {
            return Ok(());
        }
        match &mut self.backend {
            Backend::Host(path) => {
                let precision = path.kv_precision();
                path.reset_pool(precision, on);
            }
            Backend::Tensor(path) => path.reset_pool(&self.config, self.dtype, &self.device, on)?,
        }
        Ok(())
    }

    pub fn prefix_cache(&self) -> bool {
        match &self.backend {
            Backend::Host(path) => path.pool().prefix_cache(),
            Backend::Tensor(path) => path.pool.prefix_cache(),
        }
    }

    /// The prefix cache's state, when it is on.
    pub fn prefix_cache_stats(&self) -> Option<PrefixCacheStats> {
        match &self.backend {
            Backend::Host(path) if path.pool().prefix_cache() => Some(path.pool().stats()),
            Backend::Tensor(path) if path.pool.prefix_cache() => Some(path.pool.stats()),
            _ => None,
        }
    }

    /// Bytes the KV page pool has allocated, in use or not.
    pub fn kv_pool_bytes(&self) -> u64 {
        match &self.backend {
            Backend::Host(path) => path.pool().stats().pool_bytes,
            Backend::Tensor(path) => path.pool.stats().pool_bytes,
        }
    }

    /// Whether the KV cache is the tensor path's pool.
    pub fn pooled_kv(&self) -> bool {
        matches!(self.backend, Backend::Tensor(_))
    }

    /// Whether the pass runs on rows and attention on `host_attention` (f32
    /// on the CPU), where the logits are written straight into the caller's buffer.
    pub fn runs_on_host(&self) -> bool {
        matches!(self.backend, Backend::Host(_))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// KV-cache bytes per token, in the dtype the cache is kept in.
    pub fn kv_bytes_per_token(&self) -> u64 {
        let kept = match &self.backend {
            Backend::Host(path) if path.kv_precision() == KvPrecision::F16 => DType::F16,
            _ => self.dtype,
        };
        self.config.kv_bytes_per_token(kept)
    }

    /// Keep the KV cache in f16 (`KvPrecision::F16`): half the memory and
    /// half the bytes attention reads, at f16's rounding of keys and values.
    /// Only the host path has its own cache buffers; the pool stays in the
    /// model's dtype. Applies to caches made after.
    pub fn set_kv_precision(&mut self, precision: KvPrecision) {
        if let Backend::Host(path) = &mut self.backend {
            let prefix_cache = path.pool().prefix_cache();
            path.reset_pool(precision, prefix_cache);
        }
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> SeqKvCache {
        match &self.backend {
            Backend::Host(path) => SeqKvCache::on_host(path.pool().clone()),
            Backend::Tensor(path) => SeqKvCache::in_pool(path.pool.clone()),
        }
    }

    /// A cache for a sequence about to prefill `prompt`: where the prefix
    /// cache holds pages of the prompt's start, the cache holds them too and
    /// its `len` is past them, so only the rest is computed.
    pub fn new_cache_for(&self, prompt: &[u32]) -> SeqKvCache {
        match &self.backend {
            Backend::Host(path) => SeqKvCache::on_host_for(path.pool().clone(), prompt),
            Backend::Tensor(path) => SeqKvCache::in_pool_for(path.pool.clone(), prompt),
        }
    }

    fn check_chunks(&self, chunks: &[SeqChunk<'_>]) -> Result<()> {
        if chunks.is_empty() || chunks.iter().any(|c| c.tokens.is_empty()) {
            candle_core::bail!("every sequence in a step needs at least one token");
        }
        let foreign = |c: &SeqChunk<'_>| match (&self.backend, &*c.cache) {
            (Backend::Host(path), SeqKvCache::Host { pages, .. }) => !Arc::ptr_eq(pages.pool(), path.pool()),
            (Backend::Tensor(path), SeqKvCache::Paged { pages, .. }) => !Arc::ptr_eq(pages.pool(), &path.pool),
            _ => true,
        };
        if chunks.iter().any(foreign) {
            candle_core::bail!("a sequence's KV cache was made for another backend: make caches with `Transformer::new_cache`");
        }
        if let Some(c) = chunks.iter().find(|c| c.cache.len() + c.tokens.len() > self.config.context_length) {
            candle_core::bail!("positions up to {} are past the context of {}", c.cache.len() + c.tokens.len(), self.config.context_length);
        }
        Ok(())
    }

    /// Run one step: the logits of the last token of each chunk, in the host
    /// path's buffer `host` (reused from step to step) or as a tensor on the
    /// model's device.
    pub fn step<'a>(&self, chunks: &mut [SeqChunk<'_>], host: &'a mut Vec<f32>) -> Result<StepLogits<'a>> {
        self.step_rows(chunks, Rows::Last, host)
    }

    /// `step`, with the logits of the positions `rows` names.
    pub fn step_rows<'a>(&self, chunks: &mut [SeqChunk<'_>], rows: Rows<'_>, host: &'a mut Vec<f32>) -> Result<StepLogits<'a>> {
        self.check_chunks(chunks)?;
        match &self.backend {
            Backend::Host(path) => {
                path.forward(self, chunks, rows, host)?;
                Ok(StepLogits::Host(host.as_mut_slice()))
            }
            Backend::Tensor(path) => Ok(StepLogits::Device(path.forward(self, chunks, rows)?)),
        }
    }

    /// Run one step, the logits of the last token of each chunk written into
    /// `logits` (chunks.len() × vocab, f32). On the host nothing is allocated
    /// once the buffers (the model's and `logits`) are as large as the step.
    pub fn forward_into(&self, chunks: &mut [SeqChunk<'_>], logits: &mut Vec<f32>) -> Result<()> {
        match self.step(chunks, logits)? {
            StepLogits::Host(_) => Ok(()),
            StepLogits::Device(t) => {
                *logits = t.flatten_all()?.to_vec1::<f32>()?;
                Ok(())
            }
        }
    }

    /// Run one step. Returns the f32 logits (chunks.len(), vocab) of the last token of each chunk.
    pub fn forward(&self, chunks: &mut [SeqChunk<'_>]) -> Result<Tensor> {
        self.forward_rows(chunks, Rows::Last)
    }

    /// Run one step; the f32 logits of the positions `rows` names: (chunks,
    /// vocab) for the last of each chunk, (tokens, vocab) for all.
    pub fn forward_rows(&self, chunks: &mut [SeqChunk<'_>], rows: Rows<'_>) -> Result<Tensor> {
        self.check_chunks(chunks)?;
        match &self.backend {
            Backend::Host(path) => {
                let mut logits = Vec::new();
                path.forward(self, chunks, rows, &mut logits)?;
                let n: usize = chunks.iter().enumerate().map(|(i, c)| rows.tail(i, c.tokens.len())).sum();
                let vocab = logits.len() / n;
                Tensor::from_vec(logits, (n, vocab), &self.device)
            }
            Backend::Tensor(path) => path.forward(self, chunks, rows),
        }
    }
}

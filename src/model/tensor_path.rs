//! The tensor path: the forward pass on candle tensors, on any device and in
//! any dtype (every model on a GPU). Every sequence's keys and values live in
//! one pool of pages (`kv_pages`), and a step's attention is planned once per
//! kind of layer, its window and rope table (`paged_attention::PagedStep`).

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::Module;

use super::config::TransformerConfig;
use super::decode_graph::GraphBuckets;
use super::kv_cache::SeqChunk;
use super::kv_pages::{KvPool, SeqPages};
use super::layer::{Activation, Block};
use super::linear::Linear;
use super::paged_attention::PagedStep;
use super::transformer::{RopeTable, Rows, Transformer};

pub(super) struct TensorPath {
    pub pool: Arc<KvPool>,
    /// The rotary tables in the activations' dtype.
    ropes: Vec<(Tensor, Tensor)>,
    /// Decode steps at fixed shapes (`decode_graph`): the buckets, and the
    /// page whose first row padding rows write and read.
    static_decode: Option<(GraphBuckets, SeqPages)>,
}

impl TensorPath {
    pub fn new(cfg: &TransformerConfig, ropes: &[RopeTable], dtype: DType, device: &Device, prefix_cache: bool) -> Result<TensorPath> {
        let ropes = ropes.iter().map(|r| Ok((r.cos.to_dtype(dtype)?, r.sin.to_dtype(dtype)?))).collect::<Result<_>>()?;
        let pool = KvPool::new(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, dtype, device, prefix_cache)?;
        Ok(TensorPath { pool, ropes, static_decode: None })
    }

    /// Pad decode steps to `buckets`' shapes, or (`None`) run each at its own.
    pub fn set_static_decode(&mut self, buckets: Option<GraphBuckets>) -> Result<()> {
        self.static_decode = match buckets {
            Some(buckets) => {
                let mut scratch = SeqPages::new(self.pool.clone());
                scratch.reserve(1)?;
                Some((buckets, scratch))
            }
            None => None,
        };
        Ok(())
    }

    /// A fresh pool, with or without prefix caching (an empty one: call
    /// before any sequence exists).
    pub fn reset_pool(&mut self, cfg: &TransformerConfig, dtype: DType, device: &Device, prefix_cache: bool) -> Result<()> {
        let buckets = self.static_decode.take().map(|(buckets, _)| buckets);
        self.pool = KvPool::new(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, dtype, device, prefix_cache)?;
        self.set_static_decode(buckets)
    }

    /// One step of `model` over `chunks`: the f32 logits of `rows`.
    pub fn forward(&self, model: &Transformer, chunks: &mut [SeqChunk<'_>], rows: Rows<'_>) -> Result<Tensor> {
        let (device, cfg) = (model.device(), &model.config);
        let mut ids: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        // A decode step within the buckets runs at the bucket's shape.
        let padded = match &self.static_decode {
            Some((buckets, scratch)) if chunks.iter().all(|c| c.tokens.len() == 1) => buckets.batch_for(chunks.len()).map(|batch| (buckets, batch, scratch)),
            _ => None,
        };
        // One plan per kind of layer (its window and rope table), shared by
        // the layers of that kind.
        let mut plans: Vec<((Option<usize>, usize), PagedStep)> = Vec::new();
        for block in &model.blocks {
            let kind = (block.spec.window, block.spec.rope);
            if !plans.iter().any(|(k, _)| *k == kind) {
                let (cos, sin) = &self.ropes[kind.1];
                let plan = match padded {
                    Some((buckets, batch, scratch)) => PagedStep::padded(&self.pool, chunks, cfg, cos, sin, kind.0, (buckets, batch), scratch, cos.dtype(), device)?,
                    None => PagedStep::new(&self.pool, chunks, cfg, cos, sin, kind.0, cos.dtype(), device)?,
                };
                plans.push((kind, plan));
            }
        }
        if let Some((_, batch, _)) = padded {
            ids.resize(batch, 0);
        }
        let mut x = model.embedding.forward(&ids, device)?; // (tokens, hidden)
        if cfg.arch.scales_embeddings() {
            x = (x * (cfg.hidden as f64).sqrt())?;
        }
        for (layer, block) in model.blocks.iter().enumerate() {
            let kind = (block.spec.window, block.spec.rope);
            let step = &plans.iter().find(|(k, _)| *k == kind).expect("a plan for every kind of layer").1;
            x = self.block(layer, block, cfg, &x, step)?;
        }
        for c in chunks.iter_mut() {
            if let Some(pages) = c.cache.pages_mut() {
                pages.filled(c.tokens);
            }
            c.cache.advance(c.tokens.len());
        }
        let x = match rows {
            // The chunks' rows come first; the padding's are dropped.
            _ if padded.is_some() => x.narrow(0, 0, chunks.len())?,
            Rows::All => x,
            // Only the last row of each chunk (or its tail) is needed for sampling.
            Rows::Last | Rows::Tails(_) => {
                let mut kept = Vec::with_capacity(chunks.len());
                let mut offset = 0u32;
                for (i, c) in chunks.iter().enumerate() {
                    offset += c.tokens.len() as u32;
                    let tail = rows.tail(i, c.tokens.len()) as u32;
                    kept.extend(offset - tail..offset);
                }
                x.index_select(&Tensor::new(kept.as_slice(), device)?, 0)?
            }
        };
        let x = model.final_norm.forward(&x)?;
        model.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

        /// One layer: attention and the MLP, each after its norm and added back.
    fn block(&self, layer: usize, block: &Block, cfg: &TransformerConfig, x: &Tensor, step: &PagedStep) -> Result<Tensor> {
        let h = block.attn_norm.forward(x)?;
        let attn = &block.attn;
        let [q, k, v] = Linear::forward_many(&[&attn.q, &attn.k, &attn.v], &h)?.try_into().expect("three layers, three outputs");
        // Each head normed on its own (rows of head_dim), where the family does.
        let per_head = |x: Tensor, norm: &Option<candle_nn::RmsNorm>| -> Result<Tensor> {
            match norm {
                Some(norm) => {
                    let (tokens, width) = x.dims2()?;
                    norm.forward(&x.reshape((tokens * width / cfg.head_dim, cfg.head_dim))?)?.reshape((tokens, width))
                }
                None => Ok(x),
            }
        };
        let (q, k) = (per_head(q, &attn.q_norm)?, per_head(k, &attn.k_norm)?);
        let h = attn.o.forward(&step.attend(layer, cfg, &q, &k, &v)?)?;
        let x = (x + after(h, &block.post_attn_norm)?)?;
        let h = block.ffn_norm.forward(&x)?;
        let mlp = &block.mlp;
        let [gate, up] = Linear::forward_many(&[&mlp.gate, &mlp.up], &h)?.try_into().expect("two layers, two outputs");
        let gate = match block.spec.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            // candle's `gelu` is the tanh approximation.
            Activation::GeluTanh => gate.gelu()?,
        };
        let h = mlp.down.forward(&(gate * up)?)?;
        x + after(h, &block.post_ffn_norm)?
    }
}

/// An output through its own norm, where the block has one.
fn after(h: Tensor, norm: &Option<candle_nn::RmsNorm>) -> Result<Tensor> {
    match norm {
        Some(norm) => norm.forward(&h),
        None => Ok(h),
    }
}

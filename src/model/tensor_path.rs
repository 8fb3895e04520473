//! The tensor path: the forward pass on candle tensors, on any device and in
//! any dtype (every model on a GPU). Every sequence's keys and values live in
//! one pool of pages (`kv_pages`), and a step's attention is planned once for
//! all layers (`paged_attention::PagedStep`).

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::Module;

use super::config::TransformerConfig;
use super::kv_cache::SeqChunk;
use super::kv_pages::KvPool;
use super::layer::{Activation, Block};
use super::linear::Linear;
use super::paged_attention::PagedStep;
use super::transformer::{RopeTable, Rows, Transformer};

pub(super) struct TensorPath {
    pub pool: Arc<KvPool>,
    /// The rotary tables in the activations' dtype.
    ropes: Vec<(Tensor, Tensor)>,
}

impl TensorPath {
    pub fn new(cfg: &TransformerConfig, ropes: &[RopeTable], dtype: DType, device: &Device) -> Result<TensorPath> {
        let ropes = ropes.iter().map(|r| Ok((r.cos.to_dtype(dtype)?, r.sin.to_dtype(dtype)?))).collect::<Result<_>>()?;
        let pool = KvPool::new(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, dtype, device)?;
        Ok(TensorPath { pool, ropes })
    }

    /// One step of `model` over `chunks`: the f32 logits of `rows`.
    pub fn forward(&self, model: &Transformer, chunks: &mut [SeqChunk<'_>], rows: Rows) -> Result<Tensor> {
        let (device, cfg) = (model.device(), &model.config);
        let ids: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        // One table for now: every layer's spec names rope 0.
        let (cos, sin) = &self.ropes[0];
        let step = PagedStep::new(&self.pool, chunks, cfg, cos, sin, cos.dtype(), device)?;
        let mut x = model.embedding.forward(&ids, device)?; // (tokens, hidden)
        for (layer, block) in model.blocks.iter().enumerate() {
            x = self.block(layer, block, cfg, &x, &step)?;
        }
        for c in chunks.iter_mut() {
            c.cache.advance(c.tokens.len());
        }
        let x = match rows {
            Rows::All => x,
            // Only the last row of each chunk is needed for sampling.
            Rows::Last => {
                let mut last = Vec::with_capacity(chunks.len());
                let mut offset = 0u32;
                for c in chunks.iter() {
                    offset += c.tokens.len() as u32;
                    last.push(offset - 1);
                }
                x.index_select(&Tensor::new(last.as_slice(), device)?, 0)?
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
        let h = attn.o.forward(&step.attend(layer, cfg, &q, &k, &v)?)?;
        let x = (x + h)?;
        let h = block.ffn_norm.forward(&x)?;
        let mlp = &block.mlp;
        let [gate, up] = Linear::forward_many(&[&mlp.gate, &mlp.up], &h)?.try_into().expect("two layers, two outputs");
        let gate = match block.spec.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
        };
        let h = mlp.down.forward(&(gate * up)?)?;
        x + h
    }
}

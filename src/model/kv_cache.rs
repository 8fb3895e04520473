//! One sequence's keys and values, per layer, growing in place.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::host_attention::{HostKv, KvPrecision};
use super::kv_pages::{KvPool, SeqPages};

/// Keys and values of one sequence: per layer a (kv_heads, capacity, head_dim)
/// buffer of which the first `len` positions are filled. Capacity doubles when
/// full, so appending costs amortised O(1) copies per token. The buffers are
/// tensors (any device, any dtype) or, for f32 on the CPU, plain vectors (f32
/// or f16) that `host_attention` reads in place, or pages of a pool that all
/// sequences share (`kv_pages`); a sequence uses one kind throughout.
pub struct SeqKvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    host: Vec<HostKv>,
    pages: Option<SeqPages>,
    len: usize,
    capacity: usize,
}

const INITIAL_CAPACITY: usize = 64;

impl SeqKvCache {
    pub fn new(n_layer: usize) -> Self {
        Self::with_precision(n_layer, KvPrecision::F32)
    }

    /// A cache whose CPU buffers keep keys and values in `precision`.
    pub fn with_precision(n_layer: usize, precision: KvPrecision) -> Self {
        SeqKvCache { layers: (0..n_layer).map(|_| None).collect(), host: (0..n_layer).map(|_| HostKv::new(precision)).collect(), pages: None, len: 0, capacity: 0 }
    }

    /// A cache whose positions live in pages of `pool`.
    pub fn in_pool(pool: Arc<KvPool>) -> Self {
        SeqKvCache { layers: Vec::new(), host: Vec::new(), pages: Some(SeqPages::new(pool)), len: 0, capacity: 0 }
    }

    /// The sequence's pages, when its cache is in a pool.
    pub fn pages(&self) -> Option<&SeqPages> {
        self.pages.as_ref()
    }

    pub fn pages_mut(&mut self) -> Option<&mut SeqPages> {
        self.pages.as_mut()
    }

    /// A pooled cache's `len` after a step wrote `new` positions in every layer.
    pub fn advance(&mut self, new: usize) {
        self.len += new;
    }

    /// Positions already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the buffers.
    pub fn allocated_bytes(&self) -> u64 {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| ((k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()) as u64)
            .sum::<u64>()
            + self.host.iter().map(HostKv::bytes).sum::<u64>()
            + self.pages.as_ref().map_or(0, |p| p.page_count() as u64 * p.pool().page_bytes())
    }

    /// The host path's `append`: store `keys` and `values` (new × kv_heads·head_dim
    /// f32, rotated) at positions len.. of `layer`. Call for every layer in
    /// order; the last layer's call advances `len`.
    pub fn append_host(&mut self, layer: usize, keys: &[f32], values: &[f32], kv_heads: usize, head_dim: usize) {
        let needed = self.len + keys.len() / (kv_heads * head_dim);
        while needed > self.capacity {
            self.capacity = (self.capacity * 2).max(INITIAL_CAPACITY);
        }
        self.host[layer].write(self.len, keys, values, kv_heads, head_dim, self.capacity);
        if layer + 1 == self.host.len() {
            self.len = needed;
        }
    }

    /// `layer`'s host buffers, for `host_attention::attend_into`.
    pub fn host_layer(&self, layer: usize) -> &HostKv {
        &self.host[layer]
    }

    /// Append `k`, `v` (kv_heads, new, head_dim) at positions len.. in `layer` and
    /// return views of everything cached in that layer, new positions included.
    /// Call for every layer in order; the last layer's call advances `len`.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (heads, new, dim) = k.dims3()?;
        let needed = self.len + new;
        if needed > self.capacity {
            let mut cap = self.capacity.max(INITIAL_CAPACITY);
            while cap < needed {
                cap *= 2;
            }
            for entry in self.layers.iter_mut().flatten() {
                let grow = |t: &Tensor| -> Result<Tensor> {
                    let extra = Tensor::zeros((heads, cap - t.dim(1)?, dim), t.dtype(), t.device())?;
                    Tensor::cat(&[t, &extra], 1)
                };
                *entry = (grow(&entry.0)?, grow(&entry.1)?);
            }
            self.capacity = cap;
        }
        let entry = match &mut self.layers[layer] {
            Some(e) => e,
            slot @ None => {
                let zeros = || Tensor::zeros((heads, self.capacity, dim), k.dtype(), k.device());
                slot.insert((zeros()?, zeros()?))
            }
        };
        entry.0.slice_set(&k.contiguous()?, 1, self.len)?;
        entry.1.slice_set(&v.contiguous()?, 1, self.len)?;
        let views = (entry.0.narrow(1, 0, needed)?, entry.1.narrow(1, 0, needed)?);
        if layer + 1 == self.layers.len() {
            self.len = needed;
        }
        Ok(views)
    }
}

/// The new tokens of one sequence in a step and its cache; the tokens sit at
/// positions `cache.len()..cache.len() + tokens.len()`.
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqKvCache,
}

//! One sequence's keys and values, in the representation of the backend that
//! made the cache (`Transformer::new_cache`): its own growing buffers on the
//! host path, or pages of the pool all sequences share on the tensor path.

use std::sync::Arc;

use super::host_attention::{HostKv, KvPrecision};
use super::kv_pages::{KvPool, SeqPages};

/// Positions a host cache first has room for; it doubles when full.
const INITIAL_CAPACITY: usize = 64;

/// Keys and values of one sequence.
pub enum SeqKvCache {
    /// The host path's: per layer a buffer of `capacity` positions per KV head
    /// (f32 or f16), which `host_attention` reads in place. Capacity doubles
    /// when full, so appending costs amortised O(1) copies per token.
    Host { layers: Vec<HostKv>, len: usize, capacity: usize },
    /// The tensor path's: the sequence's pages of the shared pool (`kv_pages`).
    Paged { pages: SeqPages, len: usize },
}

impl SeqKvCache {
    /// A host cache of `n_layer` layers keeping keys and values in `precision`.
    pub fn on_host(n_layer: usize, precision: KvPrecision) -> Self {
        SeqKvCache::Host { layers: (0..n_layer).map(|_| HostKv::new(precision)).collect(), len: 0, capacity: 0 }
    }

    /// A cache whose positions live in pages of `pool`.
    pub fn in_pool(pool: Arc<KvPool>) -> Self {
        SeqKvCache::Paged { pages: SeqPages::new(pool), len: 0 }
    }

    /// Positions already cached (the position of the next token).
    pub fn len(&self) -> usize {
        match self {
            SeqKvCache::Host { len, .. } | SeqKvCache::Paged { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the buffers.
    pub fn allocated_bytes(&self) -> u64 {
        match self {
            SeqKvCache::Host { layers, .. } => layers.iter().map(HostKv::bytes).sum(),
            SeqKvCache::Paged { pages, .. } => pages.page_count() as u64 * pages.pool().page_bytes(),
        }
    }

    /// The sequence's pages, when its cache is in a pool.
    pub fn pages_mut(&mut self) -> Option<&mut SeqPages> {
        match self {
            SeqKvCache::Paged { pages, .. } => Some(pages),
            SeqKvCache::Host { .. } => None,
        }
    }

    pub fn is_paged(&self) -> bool {
        matches!(self, SeqKvCache::Paged { .. })
    }

    /// A pooled cache's `len` after a step wrote `new` positions in every layer.
    pub fn advance(&mut self, new: usize) {
        if let SeqKvCache::Paged { len, .. } = self {
            *len += new;
        }
    }

    /// The host path's append: store `keys` and `values` (new × kv_heads·head_dim
    /// f32, rotated) at positions len.. of `layer`. Call for every layer in
    /// order; the last layer's call advances `len`.
    pub fn append_host(&mut self, layer: usize, keys: &[f32], values: &[f32], kv_heads: usize, head_dim: usize) {
        let SeqKvCache::Host { layers, len, capacity } = self else {
            panic!("append_host on a pooled cache");
        };
        let needed = *len + keys.len() / (kv_heads * head_dim);
        while needed > *capacity {
            *capacity = (*capacity * 2).max(INITIAL_CAPACITY);
        }
        layers[layer].write(*len, keys, values, kv_heads, head_dim, *capacity);
        if layer + 1 == layers.len() {
            *len = needed;
        }
    }

    /// `layer`'s host buffers, for `host_attention::attend_into`.
    pub fn host_layer(&self, layer: usize) -> &HostKv {
        match self {
            SeqKvCache::Host { layers, .. } => &layers[layer],
            SeqKvCache::Paged { .. } => panic!("host_layer on a pooled cache"),
        }
    }
}

/// The new tokens of one sequence in a step and its cache; the tokens sit at
/// positions `cache.len()..cache.len() + tokens.len()`.
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqKvCache,
}

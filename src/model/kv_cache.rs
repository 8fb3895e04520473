//! One sequence's keys and values, in the representation of the backend that
//! made the cache (`Transformer::new_cache`): pages of the pool all
//! sequences share, the host's (`host_pages`) or the tensor path's (`kv_pages`).

use std::sync::Arc;

use super::host_pages::{HostKvPool, HostSeqPages};
use super::kv_pages::{KvPool, SeqPages};

/// Keys and values of one sequence.
pub enum SeqKvCache {
    /// The host path's: the sequence's pages of the host pool, the first of
    /// which may be a cached prefix shared with other sequences.
    Host { pages: HostSeqPages, len: usize },
    /// The tensor path's: the sequence's pages of the shared pool (`kv_pages`).
    Paged { pages: SeqPages, len: usize },
}

impl SeqKvCache {
    /// An empty cache in the host pool.
    pub fn on_host(pool: Arc<HostKvPool>) -> Self {
        SeqKvCache::Host { pages: HostSeqPages::new(pool), len: 0 }
    }

    /// A host cache for a sequence about to prefill `prompt`, already holding
    /// the pool's cached pages of its longest prefix (`len` says how many
    /// positions they cover).
    pub fn on_host_for(pool: Arc<HostKvPool>, prompt: &[u32]) -> Self {
        let (pages, len) = HostSeqPages::with_prefix(pool, prompt);
        SeqKvCache::Host { pages, len }
    }

    /// A cache whose positions live in pages of `pool`.
    pub fn in_pool(pool: Arc<KvPool>) -> Self {
        SeqKvCache::Paged { pages: SeqPages::new(pool), len: 0 }
    }

    /// A cache in `pool` for a sequence about to prefill `prompt`, already
    /// holding the pool's cached pages of its longest prefix.
    pub fn in_pool_for(pool: Arc<KvPool>, prompt: &[u32]) -> Self {
        let (pages, len) = SeqPages::with_prefix(pool, prompt);
        SeqKvCache::Paged { pages, len }
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

    /// Bytes of the pages the sequence holds (shared ones counted in full).
    pub fn allocated_bytes(&self) -> u64 {
        match self {
            SeqKvCache::Host { pages, .. } => pages.pages().len() as u64 * pages.pool().page_bytes(),
            SeqKvCache::Paged { pages, .. } => pages.page_count() as u64 * pages.pool().page_bytes(),
        }
    }

    /// The sequence's pages, when its cache is in the tensor path's pool.
    pub fn pages_mut(&mut self) -> Option<&mut SeqPages> {
        match self {
            SeqKvCache::Paged { pages, .. } => Some(pages),
            SeqKvCache::Host { .. } => None,
        }
    }

    /// The sequence's pages of the host pool.
    pub fn host_pages(&self) -> Option<&HostSeqPages> {
        match self {
            SeqKvCache::Host { pages, .. } => Some(pages),
            SeqKvCache::Paged { .. } => None,
        }
    }

    pub fn host_pages_mut(&mut self) -> Option<&mut HostSeqPages> {
        match self {
            SeqKvCache::Host { pages, .. } => Some(pages),
            SeqKvCache::Paged { .. } => None,
        }
    }

    /// Forget every position from `kept.len()` on (`kept` are the tokens
    /// of the positions that stay): a rolled-back probe. The next step
    /// writes from there, never into a page the prefix cache or another
    /// sequence holds.
    pub fn truncate(&mut self, kept: &[u32]) -> candle_core::Result<()> {
        assert!(kept.len() <= self.len(), "a cache is cut back, never grown, by truncate");
        match self {
            SeqKvCache::Host { pages, len } => {
                pages.truncate(kept);
                *len = kept.len();
            }
            SeqKvCache::Paged { pages, len } => {
                *len = kept.len();
                pages.truncate(kept)?;
            }
        }
        Ok(())
    }

    /// `len` after a step wrote `new` positions in every layer.
    pub fn advance(&mut self, new: usize) {
        match self {
            SeqKvCache::Host { len, .. } | SeqKvCache::Paged { len, .. } => *len += new,
        }
    }
}

/// The new tokens of one sequence in a step and its cache; the tokens sit at
/// positions `cache.len()..cache.len() + tokens.len()`.
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqKvCache,
}

//! The host path's KV cache: one pool of pages per layer for every sequence
//! (`host_attention::PageStore`, the bytes; `page_book::PageBook`, who holds
//! what), so a sequence grows a page at a time instead of doubling and
//! copying, and full pages of a prompt's prefix are shared between the
//! sequences that start with it (prefix caching).
//!
//! The pool is used by one step at a time (the engine thread's): a step
//! locks it once, takes the pages its new positions need, writes and reads
//! them layer by layer, and registers the pages it filled.

use std::sync::{Arc, Mutex, MutexGuard};

use super::host_attention::{KvPrecision, PageStore};
use super::page_book::{PageBook, PrefixCacheStats, SeqPrefix, PAGE_POSITIONS};

pub struct HostKvPool {
    n_layer: usize,
    kv_heads: usize,
    head_dim: usize,
    precision: KvPrecision,
    /// Whether full pages are registered and matched (`--prefix-cache`).
    prefix_cache: bool,
    state: Mutex<PoolState>,
}

pub struct PoolState {
    pub book: PageBook,
    /// Per layer.
    pub layers: Vec<PageStore>,
}

impl HostKvPool {
    pub fn new(n_layer: usize, kv_heads: usize, head_dim: usize, precision: KvPrecision, prefix_cache: bool) -> Arc<HostKvPool> {
        // Empty until the first sequence's first step: the pool grows as it is used.
        let layers: Vec<PageStore> = (0..n_layer).map(|_| PageStore::new(precision, kv_heads, head_dim)).collect();
        let state = PoolState { book: PageBook::new(0), layers };
        Arc::new(HostKvPool { n_layer, kv_heads, head_dim, precision, prefix_cache, state: Mutex::new(state) })
    }

    /// (layers, KV heads, head size).
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.n_layer, self.kv_heads, self.head_dim)
    }

    pub fn precision(&self) -> KvPrecision {
        self.precision
    }

    pub fn prefix_cache(&self) -> bool {
        self.prefix_cache
    }

    pub fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bytes one page takes over all layers, keys and values.
    pub fn page_bytes(&self) -> u64 {
        self.n_layer as u64 * PageStore::page_bytes(self.precision, self.kv_heads, self.head_dim)
    }

    /// Keep the pool within `budget_bytes` of keys and values, plus one page
    /// per sequence of a `max_batch`.
    pub fn set_capacity(&self, budget_bytes: u64, max_batch: usize) {
        let page = self.page_bytes().max(1);
        self.lock().book.set_capacity((budget_bytes / page) as usize + max_batch);
    }

    /// What the prefix cache holds and has done so far.
    pub fn stats(&self) -> PrefixCacheStats {
        let page_bytes = self.page_bytes();
        self.lock().book.stats(page_bytes)
    }
}

impl PoolState {
    /// `count` pages for one sequence, growing the layers first where the
    /// book says (`PageBook::grow_target`).
    fn take(&mut self, count: usize) -> Vec<u32> {
        let wanted = self.book.grow_target(count);
        if wanted > self.book.pages() {
            for layer in &mut self.layers {
                layer.grow(wanted);
            }
            self.book.add_pages(wanted);
            tracing::debug!(pages = wanted, "host KV pool grown");
        }
        self.book.take(count)
    }
}

/// One sequence's pages of a pool, in position order, and what prefix
/// caching needs to register the ones it fills.
pub struct HostSeqPages {
    pool: Arc<HostKvPool>,
    pages: Vec<u32>,
    prefix: SeqPrefix,
}

impl HostSeqPages {
    pub fn new(pool: Arc<HostKvPool>) -> HostSeqPages {
        HostSeqPages { pool, pages: Vec::new(), prefix: SeqPrefix::default() }
    }

    /// A sequence about to prefill `prompt`: it holds the registered pages of
    /// the longest prefix the pool has of it, and a copy of the rows that
    /// agree from the page after (`SeqPrefix::hold_longest`); returns how
    /// many positions they cover.
    pub fn with_prefix(pool: Arc<HostKvPool>, prompt: &[u32]) -> (HostSeqPages, usize) {
        if !pool.prefix_cache {
            return (HostSeqPages::new(pool), 0);
        }
        let mut state = pool.lock();
        let (prefix, hit) = SeqPrefix::hold_longest(&mut state.book, prompt);
        let covered = hit.positions();
        let mut pages = hit.held;
        if let Some((from, rows)) = hit.copy {
            let to = state.take(1)[0];
            for layer in &mut state.layers {
                layer.copy_rows(from, to, rows);
            }
            state.book.release(&[from]);
            pages.push(to);
        }
        drop(state);
        (HostSeqPages { pool, pages, prefix }, covered)
    }

    pub fn pool(&self) -> &Arc<HostKvPool> {
        &self.pool
    }

    pub fn pages(&self) -> &[u32] {
        &self.pages
    }

    /// Own enough pages for `positions` positions.
    pub fn reserve(&mut self, state: &mut PoolState, positions: usize) {
        let needed = positions.div_ceil(PAGE_POSITIONS);
        if needed > self.pages.len() {
            let more = state.take(needed - self.pages.len());
            self.pages.extend(more);
        }
    }

    /// Where `position` is: (page, slot). Reserved before.
    pub fn place(&self, position: usize) -> (u32, usize) {
        (self.pages[position / PAGE_POSITIONS], position % PAGE_POSITIONS)
    }

    /// The step wrote `tokens` at the next positions in every layer: register
    /// each page they filled under its prefix.
    pub fn filled(&mut self, state: &mut PoolState, tokens: &[u32]) {
        if self.pool.prefix_cache {
            self.prefix.filled(&mut state.book, &self.pages, tokens);
        }
    }

    /// Keep only the first `kept.len()` positions (their tokens): later
    /// pages go back to the pool, and a page the next positions would write
    /// that the cache registered or another sequence holds is replaced by a
    /// copy of its kept rows (`SeqPrefix::truncate`).
    pub fn truncate(&mut self, kept: &[u32]) {
        let pool = self.pool.clone();
        let mut state = pool.lock();
        let Some(at) = self.prefix.truncate(&mut state.book, &mut self.pages, kept, pool.prefix_cache) else { return };
        let (from, to) = (self.pages[at], state.take(1)[0]);
        for layer in &mut state.layers {
            layer.copy_rows(from, to, kept.len() % PAGE_POSITIONS);
        }
        state.book.release(&[from]);
        self.pages[at] = to;
    }
}

impl Drop for HostSeqPages {
    fn drop(&mut self) {
        self.prefix.release(&mut self.pool.lock().book, &self.pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (pages registered under a prefix, idle cached pages, evictions so far).
    fn cache_counts(pool: &HostKvPool) -> (usize, usize, u64) {
        let state = pool.lock();
        (state.book.cached_count(), state.book.idle_count(), state.book.evictions)
    }

    #[test]
    fn a_prompt_matches_the_full_pages_another_sequence_filled() {
        let pool = HostKvPool::new(1, 1, 8, KvPrecision::F32, true);
        let prompt: Vec<u32> = (0..200).collect();
        let mut first = HostSeqPages::new(pool.clone());
        {
            let mut state = pool.lock();
            first.reserve(&mut state, prompt.len());
            first.filled(&mut state, &prompt);
        }
        // Three full pages (192 positions) were registered; the fourth is partial.
        assert_eq!(cache_counts(&pool).0, 3);
        let (second, covered) = HostSeqPages::with_prefix(pool.clone(), &prompt);
        assert_eq!((covered, second.pages()), (192, &first.pages()[..3]));
        // The last token is always left to compute: a 129-token prompt matches two pages, 128 one.
        assert_eq!(HostSeqPages::with_prefix(pool.clone(), &prompt[..129]).1, 128);
        // ... and of the page after the whole ones, the rows that agree are copied.
        assert_eq!(HostSeqPages::with_prefix(pool.clone(), &prompt[..128]).1, 127);
        // Another prompt shares nothing.
        let other: Vec<u32> = (1000..1200).collect();
        assert_eq!(HostSeqPages::with_prefix(pool.clone(), &other).1, 0);
        // Without the cache, nothing is registered or matched.
        let plain = HostKvPool::new(1, 1, 8, KvPrecision::F32, false);
        let mut seq = HostSeqPages::new(plain.clone());
        {
            let mut state = plain.lock();
            seq.reserve(&mut state, 200);
            seq.filled(&mut state, &prompt);
        }
        assert_eq!(cache_counts(&plain).0, 0);
        assert_eq!(HostSeqPages::with_prefix(plain, &prompt).1, 0);
    }

    #[test]
    fn a_cut_back_sequence_never_writes_a_registered_or_shared_page_again() {
        let pool = HostKvPool::new(1, 1, 8, KvPrecision::F32, true);
        let written: Vec<u32> = (0..150).collect();
        let mut seq = HostSeqPages::new(pool.clone());
        {
            let mut state = pool.lock();
            seq.reserve(&mut state, written.len());
            seq.filled(&mut state, &written);
        }
        let before = seq.pages().to_vec();
        assert_eq!(cache_counts(&pool).0, 2, "two full pages registered");
        // Cut inside the second page, which the cache registered: it is copied, the third let go.
        seq.truncate(&written[..100]);
        assert_eq!(seq.pages().len(), 2);
        assert_eq!(seq.pages()[0], before[0], "the first page is kept as it is");
        assert_ne!(seq.pages()[1], before[1], "copy on write");
        let state = pool.lock();
        assert_eq!((state.book.holders(before[1]), state.book.cached_count()), (0, 2), "the registered page stays cached, idle");
        drop(state);
        // Filling the page again registers it under the new tokens; the old one still matches its own.
        let other: Vec<u32> = (1000..1028).collect();
        {
            let mut state = pool.lock();
            seq.reserve(&mut state, 128);
            seq.filled(&mut state, &other);
        }
        assert_eq!(cache_counts(&pool).0, 3);
        let prompt_a: Vec<u32> = written[..129].to_vec();
        assert_eq!(HostSeqPages::with_prefix(pool.clone(), &prompt_a).1, 128);
        let prompt_b: Vec<u32> = [&written[..100], &other[..], &[7]].concat();
        assert_eq!(HostSeqPages::with_prefix(pool.clone(), &prompt_b).1, 128);
        // A cut inside a page the sequence alone holds, unregistered, keeps it; at a page's edge nothing is copied.
        let mut own = HostSeqPages::new(pool.clone());
        {
            let mut state = pool.lock();
            own.reserve(&mut state, 40);
            own.filled(&mut state, &(5000..5040).collect::<Vec<u32>>());
        }
        let page = own.pages()[0];
        own.truncate(&(5000..5010).collect::<Vec<u32>>());
        assert_eq!(own.pages(), &[page]);
        own.truncate(&[]);
        assert!(own.pages().is_empty());
        // A sequence cut back into a prefix page it shares copies it too.
        let (mut shared, covered) = HostSeqPages::with_prefix(pool.clone(), &prompt_a);
        assert_eq!(covered, 128);
        let shared_page = shared.pages()[1];
        shared.truncate(&prompt_a[..70]);
        assert_ne!(shared.pages()[1], shared_page);
        assert_eq!(shared.pages()[0], before[0]);
    }

    #[test]
    fn a_dropped_sequence_keeps_what_it_wrote_cached_and_frees_the_rest() {
        let pool = HostKvPool::new(1, 1, 8, KvPrecision::F32, true);
        let prompt: Vec<u32> = (0..100).collect();
        let mut first = HostSeqPages::new(pool.clone());
        {
            let mut state = pool.lock();
            // Room for 130 positions, 100 written.
            first.reserve(&mut state, 130);
            first.filled(&mut state, &prompt);
        }
        let free_before = pool.lock().book.free_count();
        drop(first);
        // The full page and the partly written one stay, idle; the unwritten third is free again.
        assert_eq!(cache_counts(&pool), (2, 2, 0));
        assert_eq!(pool.lock().book.free_count(), free_before + 1);
        // Its 100 tokens and more: 99 positions are reused (the last token is computed).
        let longer: Vec<u32> = (0..150).collect();
        assert_eq!(HostSeqPages::with_prefix(pool.clone(), &longer).1, 100);
        assert_eq!(HostSeqPages::with_prefix(pool.clone(), &prompt).1, 99);
    }
}

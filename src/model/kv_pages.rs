//! Keys and values of every sequence in one pool of pages per layer, for the
//! tensor path (every model on a GPU; on the CPU only when a test asks for
//! it with `Transformer::into_tensor_path`).
//!
//! With one cache tensor per sequence, attention has to run per sequence: a
//! GPU then pays some fifteen kernel launches per sequence per layer, and a
//! step of 64 sequences is launch-bound. With every sequence's positions in
//! one pool, a step writes its new keys with one scatter per layer (and a
//! copy per run of pages for a prompt's chunk) and a decode step gathers the whole batch's keys with one `index_select`, so its
//! attention is a fixed handful of kernels whatever the batch.
//!
//! The pool is one per model and is used by one step at a time (the engine
//! thread's): a step's tensors are valid until the next step grows the pool.
//!
//! A pool row is one position of one sequence (kv_heads × head_dim values per
//! layer); a sequence owns whole pages of `PAGE_POSITIONS` rows, so a chunk of
//! consecutive positions is a few runs of consecutive rows. The pool
//! grows by doubling when its pages run out, up to the KV budget in pages
//! (`set_capacity`) plus one page per sequence for rounding: how many
//! positions may be in use at once is the scheduler's KV budget.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};

use super::page_book::{PageBook, PrefixCacheStats, SeqPrefix, PAGE_POSITIONS};

/// Pages to start with.
const INITIAL_PAGES: usize = 16;

/// Every layer's keys and values of every sequence, as (rows, kv_heads ×
/// head_dim) tensors, and who holds which page (`PageBook`, with the prefix
/// cache's registry).
pub struct KvPool {
    n_layer: usize,
    /// kv_heads × head_dim: one row.
    width: usize,
    dtype: DType,
    device: Device,
    /// Whether full pages are registered and matched (`--prefix-cache`).
    prefix_cache: bool,
    state: Mutex<PoolState>,
}

struct PoolState {
    /// Per layer (keys, values).
    layers: Vec<(Tensor, Tensor)>,
    book: PageBook,
}

impl KvPool {
    pub fn new(n_layer: usize, kv_heads: usize, head_dim: usize, dtype: DType, device: &Device, prefix_cache: bool) -> Result<Arc<KvPool>> {
        let rows = INITIAL_PAGES * PAGE_POSITIONS;
        let width = kv_heads * head_dim;
        let zeros = || Tensor::zeros((rows, width), dtype, device);
        let layers = (0..n_layer).map(|_| Ok((zeros()?, zeros()?))).collect::<Result<_>>()?;
        let state = PoolState { layers, book: PageBook::new(INITIAL_PAGES) };
        Ok(Arc::new(KvPool { n_layer, width, dtype, device: device.clone(), prefix_cache, state: Mutex::new(state) }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn prefix_cache(&self) -> bool {
        self.prefix_cache
    }

    /// Keep the pool within `budget_bytes` of keys and values, plus one
    /// page per sequence of a `max_batch`: what the scheduler may reserve,
    /// rounded up to pages. Past it, idle cached prefixes are evicted.
    pub fn set_capacity(&self, budget_bytes: u64, max_batch: usize) {
        self.state().book.set_capacity((budget_bytes / self.page_bytes()) as usize + max_batch);
    }

    /// What the prefix cache holds and has done so far.
    pub fn stats(&self) -> PrefixCacheStats {
        self.state().book.stats(self.page_bytes())
    }

    /// `count` pages for one sequence, growing the pool first where the book says.
    fn take_pages(&self, count: usize) -> Result<Vec<u32>> {
        let mut state = self.state();
        let wanted = state.book.grow_target(count);
        if wanted > state.book.pages() {
            self.grow(&mut state, wanted)?;
        }
        // Ascending, so that a chunk's pages are often one run of rows: one
        // copy to write, and a view instead of a gather to read.
        Ok(state.book.take(count))
    }

    /// Copy every layer into tensors of `pages` pages; the new pages are free.
    /// A grow that fails part-way (out of memory) leaves the pool as it was
    /// in pages: the layers already grown stay larger, and are skipped next time.
    fn grow(&self, state: &mut PoolState, pages: usize) -> Result<()> {
        let rows = pages * PAGE_POSITIONS;
        let grow = |old: &mut Tensor| -> Result<()> {
            if old.dim(0)? < rows {
                let new = Tensor::zeros((rows, self.width), self.dtype, &self.device)?;
                new.slice_set(old, 0, 0)?;
                *old = new;
            }
            Ok(())
        };
        for (keys, values) in state.layers.iter_mut() {
            grow(keys)?;
            grow(values)?;
        }
        state.book.add_pages(pages);
        tracing::debug!(pages, "KV pool grown");
        Ok(())
    }

    /// `layer`'s (keys, values) tensors as they are now (cheap clones of the
    /// storage handles; valid until the pool next grows, at the start of a
    /// later step).
    pub fn layer(&self, layer: usize) -> (Tensor, Tensor) {
        self.state().layers[layer].clone()
    }

    /// Write rows of `keys` and `values` ((n, width), contiguous) of `layer` at
    /// the pool rows in `rows` ((n, width) u32, each row's index repeated, as
    /// `scatter_set` wants).
    pub fn scatter(&self, layer: usize, rows: &Tensor, keys: &Tensor, values: &Tensor) -> Result<()> {
        let (pool_keys, pool_values) = self.layer(layer);
        pool_keys.scatter_set(rows, keys, 0)?;
        pool_values.scatter_set(rows, values, 0)
    }

    /// Write `keys` and `values` ((n, width), contiguous) of `layer` at pool
    /// rows `first..first + n`: one copy each, where a scatter would loop.
    pub fn write_run(&self, layer: usize, first: usize, keys: &Tensor, values: &Tensor) -> Result<()> {
        let (pool_keys, pool_values) = self.layer(layer);
        pool_keys.slice_set(keys, 0, first)?;
        pool_values.slice_set(values, 0, first)
    }

    /// Copy the first `rows` positions of page `from` into page `to`, in every layer.
    fn copy_rows(&self, from: u32, to: u32, rows: usize) -> Result<()> {
        let (from, to) = (from as usize * PAGE_POSITIONS, to as usize * PAGE_POSITIONS);
        for (keys, values) in self.state().layers.iter() {
            for t in [keys, values] {
                t.slice_set(&t.narrow(0, from, rows)?.copy()?, 0, to)?;
            }
        }
        Ok(())
    }

    /// Bytes one page takes over all layers, keys and values.
    pub fn page_bytes(&self) -> u64 {
        (self.n_layer * 2 * PAGE_POSITIONS * self.width * self.dtype.size_in_bytes()) as u64
    }
}

/// The pages one sequence holds in a pool, in position order (the first may
/// be a cached prefix shared with others, read-only); they go back to the
/// pool when the sequence's cache is dropped.
pub struct SeqPages {
    pool: Arc<KvPool>,
    pages: Vec<u32>,
    prefix: SeqPrefix,
}

impl SeqPages {
    pub fn new(pool: Arc<KvPool>) -> SeqPages {
        SeqPages { pool, pages: Vec::new(), prefix: SeqPrefix::default() }
    }

    /// A sequence about to prefill `prompt`, holding the pool's cached pages
    /// of its longest prefix and a copy of the rows that agree from the page
    /// after; returns how many positions they cover.
    pub fn with_prefix(pool: Arc<KvPool>, prompt: &[u32]) -> (SeqPages, usize) {
        if !pool.prefix_cache {
            return (SeqPages::new(pool), 0);
        }
        let (prefix, hit) = SeqPrefix::hold_longest(&mut pool.state().book, prompt);
        let mut covered = hit.positions();
        let mut seq = SeqPages { pool: pool.clone(), pages: hit.held, prefix };
        if let Some((from, rows)) = hit.copy {
            // `from` is held until copied, so that taking a page cannot evict it.
            let copied = pool.take_pages(1).and_then(|to| {
                seq.pages.push(to[0]);
                pool.copy_rows(from, to[0], rows)
            });
            pool.state().book.release(&[from]);
            if let Err(e) = copied {
                // Out of device memory, say: those rows are computed instead.
                tracing::warn!(error = %e, "copying a cached page failed; its rows are prefilled");
                seq.prefix.forget_copy();
                covered -= rows;
            }
        }
        (seq, covered)
    }

    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// Own enough pages for `positions` positions.
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        let needed = positions.div_ceil(PAGE_POSITIONS);
        if needed > self.pages.len() {
            let more = self.pool.take_pages(needed - self.pages.len())?;
            self.pages.extend(more);
        }
        Ok(())
    }

    /// The step wrote `tokens` at the next positions in every layer: register
    /// each page they filled under its prefix.
    pub fn filled(&mut self, tokens: &[u32]) {
        if self.pool.prefix_cache {
            self.prefix.filled(&mut self.pool.state().book, &self.pages, tokens);
        }
    }

    /// Keep only the first `kept.len()` positions (their tokens), as
    /// `HostSeqPages::truncate` does: a registered or shared page the next
    /// positions would write is replaced by a copy of its kept rows.
    pub fn truncate(&mut self, kept: &[u32]) -> Result<()> {
        let pool = self.pool.clone();
        let at = self.prefix.truncate(&mut pool.state().book, &mut self.pages, kept, pool.prefix_cache);
        let Some(at) = at else { return Ok(()) };
        let from = self.pages[at];
        let to = pool.take_pages(1)?[0];
        let copied = pool.copy_rows(from, to, kept.len() % PAGE_POSITIONS);
        // On failure the page is still swapped, so that the shared one is never written.
        self.pages[at] = to;
        pool.state().book.release(&[from]);
        copied
    }

    /// The pool row that holds `position` (reserved before).
    pub fn row(&self, position: usize) -> u32 {
        self.pages[position / PAGE_POSITIONS] * PAGE_POSITIONS as u32 + (position % PAGE_POSITIONS) as u32
    }

    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    pub fn pages(&self) -> &[u32] {
        &self.pages
    }
}

impl Drop for SeqPages {
    fn drop(&mut self) {
        self.prefix.release(&mut self.pool.state().book, &self.pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row's values: its pool row number, `width` times.
    fn rows_of(first: usize, count: usize, width: usize) -> Tensor {
        let values: Vec<f32> = (first..first + count).flat_map(|r| std::iter::repeat_n(r as f32, width)).collect();
        Tensor::from_vec(values, (count, width), &Device::Cpu).unwrap()
    }

    #[test]
    fn pages_come_in_ascending_runs_survive_growth_and_go_back_on_drop() {
        let (layers, width) = (2, 4);
        let pool = KvPool::new(layers, 1, width, DType::F32, &Device::Cpu, true).unwrap();
        let mut first = SeqPages::new(pool.clone());
        first.reserve(3 * PAGE_POSITIONS).unwrap();
        let start = first.row(0) as usize;
        assert!((0..3 * PAGE_POSITIONS).all(|p| first.row(p) as usize == start + p), "one run of rows");
        for layer in 0..layers {
            let written = rows_of(start, 3 * PAGE_POSITIONS, width);
            pool.write_run(layer, start, &written, &(&written * -1.0).unwrap()).unwrap();
        }
        // More pages than the pool holds: it grows, and the rows written stay.
        let mut second = SeqPages::new(pool.clone());
        second.reserve(40 * PAGE_POSITIONS).unwrap();
        assert!(pool.state().book.pages() >= 43);
        for layer in 0..layers {
            let (keys, values) = pool.layer(layer);
            let want = rows_of(start, 3 * PAGE_POSITIONS, width).to_vec2::<f32>().unwrap();
            assert_eq!(keys.narrow(0, start, 3 * PAGE_POSITIONS).unwrap().to_vec2::<f32>().unwrap(), want);
            let negated: Vec<Vec<f32>> = want.iter().map(|r| r.iter().map(|v| -v).collect()).collect();
            assert_eq!(values.narrow(0, start, 3 * PAGE_POSITIONS).unwrap().to_vec2::<f32>().unwrap(), negated);
        }
        let free_before = pool.state().book.free_count();
        drop(second);
        assert_eq!(pool.state().book.free_count(), free_before + 40, "a dropped sequence's pages are free again");
    }

    #[test]
    fn a_cut_into_a_registered_page_copies_its_kept_rows_to_a_page_of_its_own() {
        let width = 4;
        let pool = KvPool::new(1, 1, width, DType::F32, &Device::Cpu, true).unwrap();
        let tokens: Vec<u32> = (0..100).collect();
        let mut seq = SeqPages::new(pool.clone());
        seq.reserve(tokens.len()).unwrap();
        let start = seq.row(0) as usize;
        let written = rows_of(start, 2 * PAGE_POSITIONS, width);
        pool.write_run(0, start, &written, &written).unwrap();
        seq.filled(&tokens);
        let registered = seq.pages()[0];
        // Inside the unregistered second page: kept as it is.
        let second = seq.pages()[1];
        seq.truncate(&tokens[..70]).unwrap();
        assert_eq!(seq.pages(), &[registered, second]);
        // Inside the registered first page: the second goes back, the first is copied.
        seq.truncate(&tokens[..30]).unwrap();
        assert_eq!(seq.page_count(), 1);
        assert_ne!(seq.pages()[0], registered);
        let (keys, _) = pool.layer(0);
        let copy = keys.narrow(0, seq.row(0) as usize, 30).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(copy, rows_of(start, 30, width).to_vec2::<f32>().unwrap(), "the kept rows, copied");
        let book = &pool.state().book;
        assert_eq!((book.holders(registered), book.cached_count()), (0, 1), "the registered page stays cached");
    }

    #[test]
    fn growth_stops_doubling_at_the_capacity() {
        let pool = KvPool::new(1, 1, 4, DType::F32, &Device::Cpu, true).unwrap();
        pool.set_capacity(20 * pool.page_bytes(), 2);
        let mut seq = SeqPages::new(pool.clone());
        seq.reserve(17 * PAGE_POSITIONS).unwrap();
        assert_eq!(pool.state().book.pages(), 22, "doubling 16 would pass 20 budgeted pages + 2");
        // A step that needs more than the capacity still gets its pages.
        seq.reserve(30 * PAGE_POSITIONS).unwrap();
        assert_eq!(pool.state().book.pages(), 30);
    }
}

//! Running our kernels' rows on the threads candle's own kernels use.

/// Split `out` (rows of `width` values, the last row may be shorter) into
/// runs of `align` rows (the last run may be shorter) and run
/// `work(first_row, rows)` on each, on candle's own persistent pool. The
/// pool is the one candle's kernels use: a second pool (rayon's) would make
/// both spin against each other on a small machine. Runs
/// are handed out from a shared cursor rather than split up front, so a thread
/// the (shared, virtual) machine stalls does not leave the others waiting.
pub fn on_candles_threads(out: &mut [f32], width: usize, align: usize, work: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len().div_ceil(width.max(1));
    let align = align.max(1);
    let len = out.len();
    let base = SharedRows(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(rows.div_ceil(align), |runs| {
        let first_row = runs.start * align;
        let (from, to) = (first_row * width, (runs.end * align * width).min(len));
        // SAFETY: the pool hands each range of runs to exactly one thread, so
        // the slices are disjoint, and `out` outlives `execute_chunked`, which
        // returns only when every thread is done.
        let part = unsafe { std::slice::from_raw_parts_mut(base.at(from), to - from) };
        work(first_row, part);
    });
}

/// `out`'s base pointer, shared by the threads that write its disjoint runs.
struct SharedRows(*mut f32);

// SAFETY: only used as above, for disjoint slices.
unsafe impl Sync for SharedRows {}

impl SharedRows {
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Rows `0..rows` of a product computed on candle's pool in runs of `align`
/// rows: `work(first_row, part)` fills `part`, that run's rows × `n` values, in
/// a buffer of the thread's own (kept between calls, so no allocation per run).
pub fn runs_on_candles_threads(rows: usize, n: usize, align: usize, work: impl Fn(usize, &mut [f32]) + Sync) {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let align = align.max(1);
    candle_core::utils::barrier_pool().execute_chunked(rows.div_ceil(align), |runs| {
        let (first_row, end_row) = (runs.start * align, (runs.end * align).min(rows));
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.resize((end_row - first_row) * n, 0.0);
            work(first_row, &mut scratch);
        });
    });
}

/// An (n × rows) output that the pool's threads fill a few rows each: a
/// product computed weight row by weight row lands straight in the layout its
/// callers read, instead of being transposed afterwards on one thread.
pub struct Columns {
    base: *mut f32,
    rows: usize,
    n: usize,
}

// SAFETY: threads write through `base` only in `put_rows`, whose callers
// promise disjoint rows.
unsafe impl Sync for Columns {}

impl Columns {
    pub fn new(out: &mut [f32], rows: usize, n: usize) -> Columns {
        assert_eq!(out.len(), rows * n, "an (n × rows) output");
        Columns { base: out.as_mut_ptr(), rows, n }
    }

    /// Write `values` (k rows × n) as rows `first_row..first_row + k`.
    ///
    /// # Safety
    /// No other thread writes these rows meanwhile, and the slice given to
    /// `new` is alive and not otherwise accessed until every thread is done.
    pub unsafe fn put_rows(&self, first_row: usize, values: &[f32]) {
        let k = values.len() / self.n;
        assert!(first_row + k <= self.rows, "rows past the output");
        for (r, row) in values.chunks_exact(self.n).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                // SAFETY: in bounds (checked above); disjoint by the caller's promise.
                unsafe { *self.base.add(i * self.rows + first_row + r) = v };
            }
        }
    }
}

/// An output the pool's threads fill in disjoint parts, each straight into
/// its final place.
pub struct SharedOut {
    base: *mut f32,
    len: usize,
}

// SAFETY: threads write through `base` only in `put`, whose callers promise
// disjoint parts.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Over `out`'s spare capacity, left unwritten (no zeroing pass over an
    /// output the threads fill whole): the caller sets its length once every
    /// element is written.
    pub fn spare(out: &mut Vec<f32>) -> SharedOut {
        let spare = out.spare_capacity_mut();
        SharedOut { base: spare.as_mut_ptr().cast(), len: spare.len() }
    }

    /// Write `values` at `at..at + values.len()`.
    ///
    /// # Safety
    /// No other thread writes these elements meanwhile, and the vector given
    /// to `spare` is alive and not otherwise accessed until every thread is
    /// done.
    pub unsafe fn put(&self, at: usize, values: &[f32]) {
        assert!(at + values.len() <= self.len, "values past the output");
        // SAFETY: in bounds (checked above); disjoint by the caller's promise.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.base.add(at), values.len()) };
    }
}

//! Running our kernels' rows on the threads candle's own kernels use.

/// Split `out` (rows of `width` values) into runs of `align` rows (the last
/// may be shorter) and run `work(first_row, rows)` on each, on candle's own
/// persistent pool. The pool is the one candle's kernels use: a second pool
/// (rayon's) would make both spin against each other on a small machine. Runs
/// are handed out from a shared cursor rather than split up front, so a thread
/// the (shared, virtual) machine stalls does not leave the others waiting.
pub fn on_candles_threads(out: &mut [f32], width: usize, align: usize, work: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / width.max(1);
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

/// (rows × n) to (n × rows).
pub fn transpose(rows_by_n: &[f32], rows: usize, n: usize) -> Vec<f32> {
    if n == 1 {
        return rows_by_n.to_vec();
    }
    let mut out = vec![0f32; n * rows];
    for (r, row) in rows_by_n.chunks_exact(n).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * rows + r] = v;
        }
    }
    out
}

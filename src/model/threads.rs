//! Running our kernels' rows on the threads candle's own kernels use.

/// Split `out` (rows of `width` values) into one contiguous run of rows per
/// thread of candle's own persistent pool, and run `work(first_row, rows)` on
/// each. The pool is the one candle's quantized matmuls use: a second pool
/// (rayon's) would make both spin against each other on a small machine.
pub fn on_candles_threads(out: &mut [f32], width: usize, work: impl Fn(usize, &mut [f32]) + Sync) {
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    let rows = out.len() / width;
    let per_thread = rows.div_ceil(threads).max(1);
    let parts: Vec<std::sync::Mutex<(usize, &mut [f32])>> =
        out.chunks_mut(per_thread * width).enumerate().map(|(t, part)| std::sync::Mutex::new((t * per_thread, part))).collect();
    pool.execute(|thread| {
        if let Some(part) = parts.get(thread) {
            let mut part = part.lock().expect("each part has one thread");
            let (first_row, ref mut rows) = *part;
            work(first_row, rows);
        }
    });
}

/// (rows × n) to (n × rows).
pub fn transpose(rows_by_n: Vec<f32>, rows: usize, n: usize) -> Vec<f32> {
    if n == 1 {
        return rows_by_n;
    }
    let mut out = vec![0f32; n * rows];
    for (r, row) in rows_by_n.chunks_exact(n).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * rows + r] = v;
        }
    }
    out
}

//! 2:4 semi-structured sparse matrices: in every group of four consecutive
//! input weights of a row at most two are non-zero. Stored compressed as the
//! two kept values per group (f32) and their two positions (2 bits each, so one
//! byte per group holds both), i.e. 9 bytes per group instead of 16, and
//! multiplied without ever touching the zeros.


/// A (rows × cols) matrix in 2:4 form; `cols` is a multiple of 4.
#[derive(Debug, Clone, PartialEq)]
pub struct Sparse24 {
    rows: usize,
    cols: usize,
    /// Two values per group, row-major: `rows * cols / 2`.
    values: Vec<f32>,
    /// One byte per group: the first kept position in bits 0–1, the second in bits 2–3.
    positions: Vec<u8>,
}

/// Why a matrix is not 2:4 sparse.
#[derive(Debug, Clone, PartialEq)]
pub enum NotSparse {
    /// The input width is not a multiple of four.
    Width(usize),
    /// A group holds more than two non-zeros.
    Group { row: usize, group: usize, non_zeros: usize },
}

impl std::fmt::Display for NotSparse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotSparse::Width(cols) => write!(f, "input width {cols} is not a multiple of 4"),
            NotSparse::Group { row, group, non_zeros } => {
                write!(f, "row {row}, columns {}..{}: {non_zeros} non-zeros in a group of four", group * 4, group * 4 + 4)
            }
        }
    }
}

impl Sparse24 {
    /// Compress a row-major (rows × cols) matrix, or say why it does not follow the pattern.
    pub fn compress(dense: &[f32], rows: usize, cols: usize) -> Result<Self, NotSparse> {
        assert_eq!(dense.len(), rows * cols, "matrix data and shape disagree");
        if cols % 4 != 0 {
            return Err(NotSparse::Width(cols));
        }
        let groups = rows * cols / 4;
        let mut values = Vec::with_capacity(groups * 2);
        let mut positions = Vec::with_capacity(groups);
        for (g, group) in dense.chunks_exact(4).enumerate() {
            let kept: Vec<usize> = (0..4).filter(|&i| group[i] != 0.0).collect();
            if kept.len() > 2 {
                let per_row = cols / 4;
                return Err(NotSparse::Group { row: g / per_row, group: g % per_row, non_zeros: kept.len() });
            }
            // Pad with zero-valued slots at distinct positions so every group has two.
            let mut slots = kept.clone();
            for i in 0..4 {
                if slots.len() == 2 {
                    break;
                }
                if !slots.contains(&i) {
                    slots.push(i);
                }
            }
            slots.sort_unstable();
            values.push(group[slots[0]]);
            values.push(group[slots[1]]);
            positions.push(slots[0] as u8 | (slots[1] as u8) << 2);
        }
        Ok(Sparse24 { rows, cols, values, positions })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes the compressed form takes.
    pub fn storage_bytes(&self) -> usize {
        self.values.len() * std::mem::size_of::<f32>() + self.positions.len()
    }

    /// The dense row-major matrix again.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (g, &pos) in self.positions.iter().enumerate() {
            out[g * 4 + (pos & 3) as usize] += self.values[2 * g];
            out[g * 4 + (pos >> 2) as usize] += self.values[2 * g + 1];
        }
        out
    }

    /// `xs` (n × cols, row-major) times this matrix transposed: (n × rows).
    /// Output rows are split over threads; each output element is one
    /// sequential sum, so results do not depend on n or on the thread count.
    pub fn matmul_t(&self, xs: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(xs.len(), n * self.cols, "input and matrix widths disagree");
        let groups_per_row = self.cols / 4;
        let row = |r: usize| {
            (
                &self.values[r * groups_per_row * 2..(r + 1) * groups_per_row * 2],
                &self.positions[r * groups_per_row..(r + 1) * groups_per_row],
            )
        };
        let kernel = Kernel::detect();
        // Each thread takes a run of weight rows and dots each with all n
        // inputs, so a row's compressed data is read once, from cache.
        let mut out = vec![0f32; n * self.rows];
        let columns = super::threads::Columns::new(&mut out, self.rows, n);
        super::threads::runs_on_candles_threads(self.rows, n, 4, |first_row, part| {
            for (r, dots) in part.chunks_exact_mut(n).enumerate() {
                let (vals, pos) = row(first_row + r);
                kernel.row_dots(vals, pos, xs, self.cols, dots);
            }
            // SAFETY: the pool gives each run of rows to one thread, and `out`
            // is untouched until every thread is done.
            unsafe { columns.put_rows(first_row, part) };
        });
        drop(columns);
        out
    }
}

/// The instruction set the kernel runs with, chosen at run time so that one
/// binary is fast where AVX2 exists and still correct where it does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        // F16C (half-precision loads, for the quantized kernels) comes with every AVX2 CPU.
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
            return Kernel::Avx2;
        }
        Kernel::Scalar
    }

    /// One compressed row dotted with each of the n input rows of `xs` (n × cols).
    /// Each dot takes the same steps whatever n is, so batching keeps the bits.
    pub fn row_dots(self, vals: &[f32], pos: &[u8], xs: &[f32], cols: usize, out: &mut [f32]) {
        assert!(vals.len() == pos.len() * 2 && pos.len() * 4 == cols && xs.len() == out.len() * cols);
        match self {
            Kernel::Scalar => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = row_dot(vals, pos, &xs[i * cols..(i + 1) * cols]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: detect() saw AVX2 and FMA on this CPU; the slice lengths are checked above.
            Kernel::Avx2 => unsafe { avx2::row_dots(vals, pos, xs, cols, out) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Four groups (eight kept weights) per step, without gathers: the four
    /// position bytes are broadcast and shifted so that lane j holds the 2-bit
    /// position of kept weight j, plus 4 for the odd group of each pair; the 16
    /// inputs of the four groups are two vectors, and one cross-lane permute of
    /// each (`vpermps`) brings their kept inputs to the lower and upper half,
    /// which a blend joins in the stored values' order. Inputs are taken
    /// `INPUTS` at a time, sharing the index and value loads.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dots(vals: &[f32], pos: &[u8], xs: &[f32], cols: usize, out: &mut [f32]) {
        const INPUTS: usize = 4;
        let groups = pos.len();
        let full = groups / 4 * 4;
        let shifts = _mm256_setr_epi32(0, 2, 8, 10, 16, 18, 24, 26);
        let odd_group = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
        let three = _mm256_set1_epi32(3);
        let n = out.len();
        let mut first = 0;
        while first < n {
            let count = (n - first).min(INPUTS);
            let mut acc = [_mm256_setzero_ps(); INPUTS];
            let mut g = 0;
            while g < full {
                let bytes = _mm256_set1_epi32(i32::from_le_bytes([pos[g], pos[g + 1], pos[g + 2], pos[g + 3]]));
                let idx = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(bytes, shifts), three), odd_group);
                let v = _mm256_loadu_ps(vals.as_ptr().add(2 * g));
                for k in 0..count {
                    let x = xs.as_ptr().add((first + k) * cols + 4 * g);
                    let low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), idx);
                    let high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x.add(8)), idx);
                    acc[k] = _mm256_fmadd_ps(v, _mm256_blend_ps::<0xF0>(low, high), acc[k]);
                }
                g += 4;
            }
            for k in 0..count {
                let x = &xs[(first + k) * cols..(first + k + 1) * cols];
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[k]);
                let mut sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
                for t in full..groups {
                    let p = pos[t];
                    sum += vals[2 * t] * x[4 * t + (p & 3) as usize] + vals[2 * t + 1] * x[4 * t + (p >> 2) as usize];
                }
                out[first + k] = sum;
            }
            first += count;
        }
    }
}

/// One compressed row dotted with one input row.
#[inline]
fn row_dot(vals: &[f32], pos: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 4];
    for (g, (&p, v)) in pos.iter().zip(vals.chunks_exact(2)).enumerate() {
        let base = g * 4;
        // Four independent accumulators keep the FMA pipeline busy.
        let lane = g & 3;
        acc[lane] += v[0] * x[base + (p & 3) as usize] + v[1] * x[base + (p >> 2) as usize];
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// Keep the two largest |w| of every group of four along each row (ties go to
/// the earlier position): one-shot magnitude pruning to the 2:4 pattern.
pub fn prune_2_4(dense: &mut [f32], cols: usize) -> Result<(), NotSparse> {
    if cols % 4 != 0 {
        return Err(NotSparse::Width(cols));
    }
    for group in dense.chunks_exact_mut(4) {
        let mut order = [0usize, 1, 2, 3];
        order.sort_by(|&a, &b| group[b].abs().total_cmp(&group[a].abs()).then(a.cmp(&b)));
        group[order[2]] = 0.0;
        group[order[3]] = 0.0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_sparse(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<f32> {
        let mut m: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        prune_2_4(&mut m, cols).unwrap();
        // Some groups sparser still, as learned masks leave them.
        for g in m.chunks_exact_mut(4).step_by(7) {
            g.iter_mut().for_each(|w| *w = 0.0);
        }
        m
    }

    fn dense_matmul_t(xs: &[f32], w: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * rows];
        for i in 0..n {
            for r in 0..rows {
                out[i * rows + r] = (0..cols).map(|c| xs[i * cols + c] as f64 * w[r * cols + c] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn pruning_keeps_the_two_largest_of_each_group() {
        let mut m = vec![0.1, -0.9, 0.5, 0.2, 1.0, 1.0, 1.0, 1.0];
        prune_2_4(&mut m, 8).unwrap();
        assert_eq!(m, vec![0.0, -0.9, 0.5, 0.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(prune_2_4(&mut [0.0; 6], 6), Err(NotSparse::Width(6)));
    }

    #[test]
    fn compress_round_trips_and_refuses_dense_groups() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (rows, cols) in [(1, 4), (3, 8), (17, 36), (64, 128)] {
            let m = random_sparse(&mut rng, rows, cols);
            let s = Sparse24::compress(&m, rows, cols).unwrap();
            assert_eq!(s.to_dense(), m);
            assert_eq!(s.storage_bytes(), rows * cols / 4 * 9);
        }
        let err = Sparse24::compress(&[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], 2, 4).unwrap_err();
        assert_eq!(err, NotSparse::Group { row: 0, group: 0, non_zeros: 3 });
        assert!(Sparse24::compress(&[0.0; 6], 1, 6).is_err());
    }

    #[test]
    fn sparse_matmul_matches_dense_on_random_odd_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for (n, rows, cols) in [(1, 1, 4), (1, 33, 68), (3, 17, 36), (7, 100, 256), (16, 5, 12)] {
            let w = random_sparse(&mut rng, rows, cols);
            let xs: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let s = Sparse24::compress(&w, rows, cols).unwrap();
            let got = s.matmul_t(&xs, n);
            let want = dense_matmul_t(&xs, &w, n, rows, cols);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w} (n={n}, {rows}x{cols})");
            }
        }
    }

    #[test]
    fn the_vector_kernel_agrees_with_the_scalar_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        // Widths with and without a remainder after the vector steps (4 groups each).
        for (n, cols) in [(1, 4), (1, 16), (2, 20), (5, 44), (9, 256), (3, 8960)] {
            let w = random_sparse(&mut rng, 1, cols);
            let s = Sparse24::compress(&w, 1, cols).unwrap();
            let xs: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut scalar = vec![0f32; n];
            Kernel::Scalar.row_dots(&s.values, &s.positions, &xs, cols, &mut scalar);
            let mut best = vec![0f32; n];
            Kernel::detect().row_dots(&s.values, &s.positions, &xs, cols, &mut best);
            for (a, b) in scalar.iter().zip(&best) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b} (n={n}, cols={cols})");
            }
        }
    }

    #[test]
    fn each_row_gets_the_same_bits_alone_or_in_a_batch() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (rows, cols) = (40, 64);
        let s = Sparse24::compress(&random_sparse(&mut rng, rows, cols), rows, cols).unwrap();
        let xs: Vec<f32> = (0..5 * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let batch = s.matmul_t(&xs, 5);
        for i in 0..5 {
            let alone = s.matmul_t(&xs[i * cols..(i + 1) * cols], 1);
            assert_eq!(alone, batch[i * rows..(i + 1) * rows].to_vec());
        }
    }
}

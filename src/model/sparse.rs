//! 2:4 semi-structured sparse matrices: in every group of four consecutive
//! input weights of a row at most two are non-zero. Stored compressed as the
//! two kept values per group and their two positions (2 bits each, so one byte
//! per group holds both), and multiplied without ever touching the zeros. The
//! values stay in the checkpoint's own precision when that loses nothing: a
//! group takes 9 bytes in f32 and 5 in bf16 or f16, against 16 for the dense
//! f32 the CPU computes in. Decode reads every weight once per token, so the
//! bytes are the speed.

use half::{bf16, f16};

use super::kernel::{Kernel, Value};


/// A (rows × cols) matrix in 2:4 form; `cols` is a multiple of 4.
#[derive(Debug, Clone, PartialEq)]
pub struct Sparse24 {
    rows: usize,
    cols: usize,
    /// Two values per group, row-major: `rows * cols / 2`.
    values: Values,
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
        if !cols.is_multiple_of(4) {
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
        Ok(Sparse24 { rows, cols, values: Values::F32(values), positions })
    }

    /// The same matrix with its values stored in `precision`, if every value
    /// converts exactly (as all do when the checkpoint was in that type);
    /// otherwise `self` unchanged, in the `Err`.
    pub fn narrowed(self, precision: Precision) -> Result<Self, Self> {
        let Values::F32(values) = &self.values else { return Err(self) };
        let narrowed = match precision {
            Precision::F32 => return Ok(self),
            Precision::Bf16 => {
                let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
                v.iter().zip(values).all(|(n, &x)| n.to_f32() == x).then_some(Values::Bf16(v))
            }
            Precision::F16 => {
                let v: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
                v.iter().zip(values).all(|(n, &x)| n.to_f32() == x).then_some(Values::F16(v))
            }
        };
        match narrowed {
            Some(values) => Ok(Sparse24 { values, ..self }),
            None => Err(self),
        }
    }

    /// The precision the values are stored in.
    pub fn precision(&self) -> Precision {
        match self.values {
            Values::F32(_) => Precision::F32,
            Values::Bf16(_) => Precision::Bf16,
            Values::F16(_) => Precision::F16,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes the compressed form takes.
    pub fn storage_bytes(&self) -> usize {
        let value_bytes = match &self.values {
            Values::F32(v) => std::mem::size_of_val(v.as_slice()),
            Values::Bf16(v) => std::mem::size_of_val(v.as_slice()),
            Values::F16(v) => std::mem::size_of_val(v.as_slice()),
        };
        value_bytes + self.positions.len()
    }

    /// The dense row-major matrix again.
    pub fn to_dense(&self) -> Vec<f32> {
        let values: Vec<f32> = match &self.values {
            Values::F32(v) => v.clone(),
            Values::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Values::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        };
        let mut out = vec![0f32; self.rows * self.cols];
        for (g, &pos) in self.positions.iter().enumerate() {
            out[g * 4 + (pos & 3) as usize] += values[2 * g];
            out[g * 4 + (pos >> 2) as usize] += values[2 * g + 1];
        }
        out
    }

    /// `xs` (n × cols, row-major) times this matrix transposed: (n × rows).
    /// Output rows are split over threads; each output element is one
    /// sequential sum, so results do not depend on n or on the thread count.
    pub fn matmul_t(&self, xs: &[f32], n: usize) -> Vec<f32> {
        match &self.values {
            Values::F32(v) => self.matmul_t_with(v, xs, n),
            Values::Bf16(v) => self.matmul_t_with(v, xs, n),
            Values::F16(v) => self.matmul_t_with(v, xs, n),
        }
    }

    fn matmul_t_with<V: Value>(&self, values: &[V], xs: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(xs.len(), n * self.cols, "input and matrix widths disagree");
        let groups_per_row = self.cols / 4;
        let row = |r: usize| {
            (
                &values[r * groups_per_row * 2..(r + 1) * groups_per_row * 2],
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

/// The precision of a sparse matrix's stored values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone, PartialEq)]
enum Values {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Kernel {
    /// One compressed row dotted with each of the n input rows of `xs` (n × cols).
    /// Each dot takes the same steps whatever n is, so batching keeps the bits.
    pub fn row_dots<V: Value>(self, vals: &[V], pos: &[u8], xs: &[f32], cols: usize, out: &mut [f32]) {
        assert!(vals.len() == pos.len() * 2 && pos.len() * 4 == cols && xs.len() == out.len() * cols);
        match self {
            Kernel::Scalar => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = row_dot(vals, pos, &xs[i * cols..(i + 1) * cols]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: detect() saw AVX2 and FMA on this CPU; the slice lengths are checked above.
            Kernel::Avx2 { .. } => unsafe { avx2::row_dots(vals, pos, xs, cols, out) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Value;

    /// Four groups (eight kept weights) per vector step, without gathers: the
    /// four position bytes (read as one u32) are broadcast and shifted so that
    /// lane j holds the 2-bit position of kept weight j, plus 4 for the odd
    /// group of each pair; the 16 inputs of the four groups are two vectors,
    /// and one cross-lane permute of each (`vpermps`) brings their kept inputs
    /// to the lower and upper half, which a blend joins in the stored values'
    /// order. Eight groups per loop turn, into two accumulators per input (so
    /// one input's multiply-adds do not wait on each other); inputs four at a
    /// time share the index and value loads. Each input's dot takes the same
    /// steps however many inputs share the call, so batching keeps the bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_dots<V: Value>(vals: &[V], pos: &[u8], xs: &[f32], cols: usize, out: &mut [f32]) {
        let n = out.len();
        assert!(vals.len() == 2 * pos.len() && xs.len() >= n * cols && cols == 4 * pos.len());
        let mut first = 0;
        while first + 4 <= n {
            let sums = dots::<V, 4>(vals, pos, std::array::from_fn(|k| &xs[(first + k) * cols..(first + k + 1) * cols]));
            out[first..first + 4].copy_from_slice(&sums);
            first += 4;
        }
        for i in first..n {
            out[i] = dots::<V, 1>(vals, pos, [&xs[i * cols..(i + 1) * cols]])[0];
        }
    }

    /// The lane indices that gather the kept inputs of the four groups whose
    /// position bytes are `bytes` (little-endian), as described above.
    #[inline(always)]
    unsafe fn kept_lanes(bytes: u32) -> __m256i {
        let shifts = _mm256_setr_epi32(0, 2, 8, 10, 16, 18, 24, 26);
        let odd_group = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
        let positions = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(bytes as i32), shifts), _mm256_set1_epi32(3));
        _mm256_or_si256(positions, odd_group)
    }

    /// The eight kept inputs of the four groups whose 16 inputs start at `x`.
    #[inline(always)]
    unsafe fn kept_inputs(x: *const f32, lanes: __m256i) -> __m256 {
        let low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), lanes);
        let high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x.add(8)), lanes);
        _mm256_blend_ps::<0xF0>(low, high)
    }

    /// One compressed row dotted with X input rows (each `4 · pos.len()` long).
    #[inline(always)]
    unsafe fn dots<V: Value, const X: usize>(vals: &[V], pos: &[u8], xs: [&[f32]; X]) -> [f32; X] {
        let groups = pos.len();
        assert!(xs.iter().all(|x| x.len() == 4 * groups) && vals.len() == 2 * groups);
        let (v, p) = (vals.as_ptr(), pos.as_ptr());
        let x = xs.map(|x| x.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; X];
        let mut g = 0;
        while g + 8 <= groups {
            let bytes = (p.add(g) as *const u64).read_unaligned();
            let lanes = [kept_lanes(bytes as u32), kept_lanes((bytes >> 32) as u32)];
            for half in 0..2 {
                let w = V::load8(v.add(2 * (g + 4 * half)));
                for k in 0..X {
                    let kept = kept_inputs(x[k].add(4 * (g + 4 * half)), lanes[half]);
                    acc[k][half] = _mm256_fmadd_ps(w, kept, acc[k][half]);
                }
            }
            g += 8;
        }
        if g + 4 <= groups {
            let lanes = kept_lanes((p.add(g) as *const u32).read_unaligned());
            let w = V::load8(v.add(2 * g));
            for k in 0..X {
                acc[k][0] = _mm256_fmadd_ps(w, kept_inputs(x[k].add(4 * g), lanes), acc[k][0]);
            }
            g += 4;
        }
        std::array::from_fn(|k| {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[k][0], acc[k][1]));
            let mut sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
            for t in g..groups {
                let b = pos[t];
                sum += vals[2 * t].to_f32() * xs[k][4 * t + (b & 3) as usize] + vals[2 * t + 1].to_f32() * xs[k][4 * t + (b >> 2) as usize];
            }
            sum
        })
    }
}

/// One compressed row dotted with one input row.
#[inline]
fn row_dot<V: Value>(vals: &[V], pos: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 4];
    for (g, (&p, v)) in pos.iter().zip(vals.chunks_exact(2)).enumerate() {
        let base = g * 4;
        // Four independent accumulators keep the FMA pipeline busy.
        let lane = g & 3;
        acc[lane] += v[0].to_f32() * x[base + (p & 3) as usize] + v[1].to_f32() * x[base + (p >> 2) as usize];
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// Keep the two largest |w| of every group of four along each row (ties go to
/// the earlier position): one-shot magnitude pruning to the 2:4 pattern.
pub fn prune_2_4(dense: &mut [f32], cols: usize) -> Result<(), NotSparse> {
    if !cols.is_multiple_of(4) {
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
            let Values::F32(values) = &s.values else { panic!("compress stores f32") };
            let mut scalar = vec![0f32; n];
            Kernel::Scalar.row_dots(values, &s.positions, &xs, cols, &mut scalar);
            let mut best = vec![0f32; n];
            Kernel::detect().row_dots(values, &s.positions, &xs, cols, &mut best);
            for (a, b) in scalar.iter().zip(&best) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b} (n={n}, cols={cols})");
            }
        }
    }

    /// Values that bf16 (or f16) holds exactly are stored in it, in 5 bytes a
    /// group, and give the f32-stored matrix's bits on every kernel; a value
    /// it cannot hold keeps the matrix in f32.
    #[test]
    fn half_precision_storage_is_exact_or_refused() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (rows, cols) = (37, 68);
        for precision in [Precision::Bf16, Precision::F16] {
            let exact = |x: f32| match precision {
                Precision::Bf16 => bf16::from_f32(x).to_f32(),
                _ => f16::from_f32(x).to_f32(),
            };
            let w: Vec<f32> = random_sparse(&mut rng, rows, cols).into_iter().map(exact).collect();
            let wide = Sparse24::compress(&w, rows, cols).unwrap();
            let narrow = wide.clone().narrowed(precision).expect("exact values narrow");
            assert_eq!(narrow.precision(), precision);
            assert_eq!(narrow.storage_bytes(), rows * cols / 4 * 5);
            assert_eq!(narrow.to_dense(), w);
            for n in [1, 3, 8] {
                let xs: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                assert_eq!(narrow.matmul_t(&xs, n), wide.matmul_t(&xs, n), "{precision:?}, n = {n}");
                for kernel in [Kernel::Scalar, Kernel::detect()] {
                    let (Values::F32(f), values) = (&wide.values, &narrow.values) else { unreachable!() };
                    let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
                    kernel.row_dots(&f[..cols / 2], &wide.positions[..cols / 4], &xs, cols, &mut a);
                    match values {
                        Values::Bf16(v) => kernel.row_dots(&v[..cols / 2], &narrow.positions[..cols / 4], &xs, cols, &mut b),
                        Values::F16(v) => kernel.row_dots(&v[..cols / 2], &narrow.positions[..cols / 4], &xs, cols, &mut b),
                        Values::F32(_) => unreachable!(),
                    }
                    assert_eq!(a, b, "{precision:?} {kernel:?}, n = {n}");
                }
            }
        }
        let mut w = random_sparse(&mut rng, 2, 8);
        let kept = w.iter().position(|&x| x != 0.0).unwrap();
        w[kept] = 1.0 + f32::EPSILON;
        let s = Sparse24::compress(&w, 2, 8).unwrap();
        let refused = s.narrowed(Precision::Bf16).unwrap_err();
        assert_eq!(refused.precision(), Precision::F32);
        assert_eq!(refused.to_dense(), w);
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

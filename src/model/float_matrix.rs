//! Dense f16, bf16 and f32 matrices (GGUF's F16, BF16 and F32 tensors)
//! multiplied in their own precision: each weight is widened to f32 as it is
//! read and multiplied with the f32 activations. candle widens a 16-bit
//! matrix to f32 once at load, which doubles its bytes, and decode reads
//! every weight once per token, so the bytes are the speed. An f32 matrix
//! runs here too, for the bits: candle's f32 product blocks its sums by the
//! batch's size, so a sequence's logits would change with its neighbours.
//!
//! Every output element is one dot product in a fixed order (four 8-lane
//! accumulators over the width, then their sum, then the tail), whatever the
//! number of input rows or threads: batching keeps the bits.

use std::io::Read;

use anyhow::{bail, Result};
use half::{bf16, f16};

use super::kernel::{Kernel, Value};

/// The stored precision.
#[derive(Debug, Clone, PartialEq)]
enum Values {
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    F32(Vec<f32>),
}

/// A (rows × cols) row-major matrix of f16, bf16 or f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatMatrix {
    rows: usize,
    cols: usize,
    values: Values,
}

/// GGUF's precision of a float matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatFormat {
    F16,
    Bf16,
    F32,
}

impl FloatFormat {
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        match dtype {
            candle_core::quantized::GgmlDType::F16 => Some(FloatFormat::F16),
            candle_core::quantized::GgmlDType::BF16 => Some(FloatFormat::Bf16),
            candle_core::quantized::GgmlDType::F32 => Some(FloatFormat::F32),
            _ => None,
        }
    }

    /// Bytes of one value.
    pub fn width(self) -> usize {
        match self {
            FloatFormat::F16 | FloatFormat::Bf16 => 2,
            FloatFormat::F32 => 4,
        }
    }
}

impl FloatMatrix {
    /// From little-endian values, as a GGUF file stores them.
    pub fn from_bytes(format: FloatFormat, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        if bytes.len() != rows * cols * format.width() {
            bail!("{} bytes for a {rows} × {cols} matrix of {}-bit values", bytes.len(), 8 * format.width());
        }
        let bits = || bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let values = match format {
            FloatFormat::F16 => Values::F16(bits().map(f16::from_bits).collect()),
            FloatFormat::Bf16 => Values::Bf16(bits().map(bf16::from_bits).collect()),
            FloatFormat::F32 => Values::F32(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        };
        Ok(FloatMatrix { rows, cols, values })
    }

    /// Read from a file positioned at the tensor's data.
    pub fn read(format: FloatFormat, rows: usize, cols: usize, reader: &mut impl Read) -> Result<Self> {
        let mut bytes = vec![0u8; rows * cols * format.width()];
        reader.read_exact(&mut bytes).map_err(|e| anyhow::anyhow!("the file ends inside the tensor's data ({e})"))?;
        Self::from_bytes(format, rows, cols, &bytes)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` widened to f32 (an embedding lookup).
    pub fn row_f32(&self, r: usize) -> Vec<f32> {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.values {
            Values::F16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
            Values::Bf16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
            Values::F32(v) => v[range].to_vec(),
        }
    }

    /// `xs` (n × cols) times the matrix's transpose: n × rows.
    pub fn matmul_t(&self, xs: &[f32], n: usize) -> Vec<f32> {
        match &self.values {
            Values::F16(v) => self.matmul_t_with(v, xs, n),
            Values::Bf16(v) => self.matmul_t_with(v, xs, n),
            Values::F32(v) => self.matmul_t_with(v, xs, n),
        }
    }

    fn matmul_t_with<V: Value>(&self, values: &[V], xs: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(xs.len(), n * self.cols, "input and matrix widths disagree");
        let kernel = Kernel::detect();
        let cols = self.cols;
        // Each thread takes a run of weight rows and dots each with all n
        // inputs, so a row is read from memory once.
        let mut out = vec![0f32; n * self.rows];
        let columns = super::threads::Columns::new(&mut out, self.rows, n);
        super::threads::runs_on_candles_threads(self.rows, n, 8, |first_row, part| {
            for (r, dots) in part.chunks_exact_mut(n).enumerate() {
                let row = &values[(first_row + r) * cols..(first_row + r + 1) * cols];
                // Two inputs at a time share each widened weight vector.
                let mut inputs = xs.chunks_exact(cols);
                for pair in dots.chunks_mut(2) {
                    match pair {
                        [a, b] => [*a, *b] = kernel.dense_dot2(row, inputs.next().expect("n inputs"), inputs.next().expect("n inputs")),
                        [a] => *a = kernel.dense_dot(row, inputs.next().expect("n inputs")),
                        _ => unreachable!("chunks of one or two"),
                    }
                }
            }
            // SAFETY: the pool gives each run of rows to one thread, and `out`
            // is untouched until every thread is done.
            unsafe { columns.put_rows(first_row, part) };
        });
        out
    }
}

impl Kernel {
    /// Σ w[k]·x[k], in the order of the module's documentation.
    pub fn dense_dot<V: Value>(self, w: &[V], x: &[f32]) -> f32 {
        debug_assert_eq!(w.len(), x.len());
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the kernel was detected on this CPU (AVX2, FMA, F16C).
            Kernel::Avx2 { .. } => unsafe { dense_dot_avx2(w, x) },
            Kernel::Scalar => dense_dot_scalar(w, x),
        }
    }
}

impl Kernel {
    /// [`Kernel::dense_dot`] of `w` with two inputs at once, each with the
    /// very steps (and so the bits) it would take alone.
    pub fn dense_dot2<V: Value>(self, w: &[V], x0: &[f32], x1: &[f32]) -> [f32; 2] {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the kernel was detected on this CPU (AVX2, FMA, F16C).
            Kernel::Avx2 { .. } => unsafe { dense_dot2_avx2(w, x0, x1) },
            Kernel::Scalar => [dense_dot_scalar(w, x0), dense_dot_scalar(w, x1)],
        }
    }
}

fn dense_dot_scalar<V: Value>(w: &[V], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = w.len() / 8 * 8;
    for (wc, xc) in w[..chunks].chunks_exact(8).zip(x[..chunks].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = wc[l].to_f32().mul_add(xc[l], acc[l]);
        }
    }
    let mut sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (wv, xv) in w[chunks..].iter().zip(&x[chunks..]) {
        sum = wv.to_f32().mul_add(*xv, sum);
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dense_dot_avx2<V: Value>(w: &[V], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let len = w.len();
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut k = 0;
    while k + 32 <= len {
        for (j, a) in acc.iter_mut().enumerate() {
            let at = k + 8 * j;
            *a = _mm256_fmadd_ps(V::load8(wp.add(at)), _mm256_loadu_ps(xp.add(at)), *a);
        }
        k += 32;
    }
    while k + 8 <= len {
        acc[0] = _mm256_fmadd_ps(V::load8(wp.add(k)), _mm256_loadu_ps(xp.add(k)), acc[0]);
        k += 8;
    }
    finish_avx2(acc, w, x, k)
}

/// The end of [`dense_dot_avx2`]: the four accumulators summed, then the tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn finish_avx2<V: Value>(acc: [std::arch::x86_64::__m256; 4], w: &[V], x: &[f32], mut k: usize) -> f32 {
    use std::arch::x86_64::*;
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
    let mut sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    while k < w.len() {
        sum = w[k].to_f32().mul_add(x[k], sum);
        k += 1;
    }
    sum
}

/// Two inputs against one weight row: each widened weight vector feeds both.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dense_dot2_avx2<V: Value>(w: &[V], x0: &[f32], x1: &[f32]) -> [f32; 2] {
    use std::arch::x86_64::*;
    let len = w.len();
    let (wp, p0, p1) = (w.as_ptr(), x0.as_ptr(), x1.as_ptr());
    let (mut a0, mut a1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
    let mut k = 0;
    while k + 32 <= len {
        for j in 0..4 {
            let at = k + 8 * j;
            let wv = V::load8(wp.add(at));
            a0[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p0.add(at)), a0[j]);
            a1[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p1.add(at)), a1[j]);
        }
        k += 32;
    }
    while k + 8 <= len {
        let wv = V::load8(wp.add(k));
        a0[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p0.add(k)), a0[0]);
        a1[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p1.add(k)), a1[0]);
        k += 8;
    }
    [finish_avx2(a0, w, x0, k), finish_avx2(a1, w, x1, k)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A random matrix's bytes in `format`.
    fn random(format: FloatFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..rows * cols)
            .flat_map(|_| {
                let v: f32 = rng.random_range(-1.0..1.0);
                match format {
                    FloatFormat::F16 => f16::from_f32(v).to_bits().to_le_bytes().to_vec(),
                    FloatFormat::Bf16 => bf16::from_f32(v).to_bits().to_le_bytes().to_vec(),
                    FloatFormat::F32 => v.to_le_bytes().to_vec(),
                }
            })
            .collect()
    }

    /// Widen, then multiply in f64: the reference.
    fn reference(m: &FloatMatrix, xs: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * m.rows];
        for i in 0..n {
            for r in 0..m.rows {
                let row = m.row_f32(r);
                out[i * m.rows + r] = row.iter().zip(&xs[i * m.cols..(i + 1) * m.cols]).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn matches_widen_then_multiply_on_odd_shapes_and_keeps_batch_bits() {
        for (rows, cols) in [(1, 1), (7, 13), (17, 40), (33, 257), (64, 896)] {
            for format in [FloatFormat::F16, FloatFormat::Bf16, FloatFormat::F32] {
                let bytes = random(format, rows, cols, rows as u64 * 31 + cols as u64);
                let m = FloatMatrix::from_bytes(format, rows, cols, &bytes).unwrap();
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
                let xs: Vec<f32> = (0..16 * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let all = m.matmul_t(&xs, 16);
                let want = reference(&m, &xs, 16);
                for (got, want) in all.iter().zip(&want) {
                    assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()) * (cols as f32).sqrt(), "{rows}×{cols} {format:?}: {got} vs {want}");
                }
                // 1, 3, 4 and 8 inputs (pairs and a lone one) give the same bits as 16.
                for n in [1, 3, 4, 8] {
                    let part = m.matmul_t(&xs[..n * cols], n);
                    assert_eq!(part.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), all[..n * rows].iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                }
                let scalar: Vec<f32> = (0..rows).map(|r| Kernel::Scalar.dense_dot(&m.row_f32(r), &xs[..cols])).collect();
                for (s, a) in scalar.iter().zip(&all[..rows]) {
                    assert!((s - a).abs() <= 1e-4 * (1.0 + a.abs()) * (cols as f32).sqrt(), "scalar {s} vs vector {a}");
                }
            }
        }
    }

    #[test]
    fn a_short_tensor_is_an_error() {
        assert!(FloatMatrix::from_bytes(FloatFormat::F16, 2, 3, &[0u8; 11]).is_err());
        assert!(FloatMatrix::read(FloatFormat::Bf16, 2, 3, &mut &[0u8; 4][..]).is_err());
        assert!(FloatMatrix::from_bytes(FloatFormat::F32, 2, 3, &[0u8; 12]).is_err(), "f32 takes four bytes a value");
    }
}

//! Our own CPU kernels for GGUF's Q4_1 (SmolLM2's projections), Q5_0 (most of
//! Qwen2.5-0.5B's) and Q8_0 (SmolLM2's head, the rest of Qwen2.5-0.5B). candle
//! multiplies the first two with scalar code; all three run here on candle's
//! own thread pool, four input rows per unpacked weight block.
//!
//! A weight row is a run of 32-value blocks, kept as the file's bytes:
//! - Q4_1 (20 bytes): scale d and minimum m (f16), 16 bytes of 4-bit q;
//!   value = d·q + m. Value j is the low nibble of byte j, value 16 + j its high one.
//! - Q5_0 (22 bytes): scale d (f16), 32 fifth bits (u32), 16 bytes of nibbles;
//!   value = d·(q − 16), q = nibble | fifth bit << 4.
//! - Q8_0 (34 bytes): scale d (f16), 32 signed bytes; value = d·q.
//!
//! Activations are quantized to 8 bits per block of 32 exactly as candle's
//! Q8_1 / Q8_0 rows are (scale amax/127 kept as f16), and each block's integer
//! dot product is exact, so the float arithmetic per block can be candle's own,
//! in its order: our logits are candle's bit for bit, only faster (the AVX2
//! path computes the integer sums 32 lanes at a time). For Q8_0 candle's order
//! is its AVX2 kernel's (eight lane sums, fused multiply-add, a fixed
//! horizontal sum); our scalar fallback follows the same lanes.
//!
//! Every output element is one row's blocks summed in order, whatever the
//! number of input rows or threads, so batching keeps the bits.

use half::f16;

use super::sparse::Kernel;

const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    Q4_1,
    Q5_0,
    Q8_0,
}

impl BlockFormat {
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q5_0 => Some(BlockFormat::Q5_0),
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q5_0 => 22,
            BlockFormat::Q8_0 => 34,
        }
    }
}

/// Rows of activations, 8 bits per value, per block of 32: the scale (an f16
/// value), the sum of the quantized values, and Q8_1's `s` = f16(sum)·d in f16.
pub struct QuantizedRows {
    blocks_per_row: usize,
    d: Vec<f32>,
    sum: Vec<i32>,
    s: Vec<f32>,
    qs: Vec<i8>,
}

impl QuantizedRows {
    /// `xs` is (n × cols), cols a multiple of 32.
    pub fn new(xs: &[f32], cols: usize) -> Self {
        assert!(cols % QK == 0 && xs.len() % cols == 0);
        let blocks = xs.len() / QK;
        let mut rows = QuantizedRows {
            blocks_per_row: cols / QK,
            d: Vec::with_capacity(blocks),
            sum: Vec::with_capacity(blocks),
            s: Vec::with_capacity(blocks),
            qs: vec![0; xs.len()],
        };
        for (block, q) in xs.chunks_exact(QK).zip(rows.qs.chunks_exact_mut(QK)) {
            let amax = block.iter().fold(0f32, |m, &x| m.max(x.abs()));
            let d = amax / 127.0;
            let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &x) in q.iter_mut().zip(block) {
                *q = (x * inverse).round() as i8;
                sum += *q as i32;
            }
            let d16 = f16::from_f32(d);
            rows.d.push(d16.to_f32());
            rows.sum.push(sum);
            rows.s.push((f16::from_f32(sum as f32) * d16).to_f32());
        }
        rows
    }

    /// Row `i`'s blocks.
    fn row(&self, i: usize) -> Activations<'_> {
        let nb = self.blocks_per_row;
        let blocks = i * nb..(i + 1) * nb;
        Activations { d: &self.d[blocks.clone()], sum: &self.sum[blocks.clone()], s: &self.s[blocks], qs: &self.qs[i * nb * QK..(i + 1) * nb * QK] }
    }
}

/// A (rows × cols) matrix of Q4_1 or Q5_0 blocks.
pub struct QuantMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    kernel: Kernel,
}

impl QuantMatrix {
    /// `data` is the rows' blocks, row after row, as a GGUF file holds them.
    pub fn new(format: BlockFormat, rows: usize, cols: usize, data: Vec<u8>) -> candle_core::Result<Self> {
        if cols % QK != 0 {
            candle_core::bail!("{format:?} rows need a multiple of {QK} columns, not {cols}");
        }
        if data.len() != rows * cols / QK * format.block_bytes() {
            candle_core::bail!("{format:?} ({rows} × {cols}) needs {} bytes, got {}", rows * cols / QK * format.block_bytes(), data.len());
        }
        Ok(QuantMatrix { format, rows, cols, data, kernel: Kernel::detect() })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn storage_bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.format.block_bytes()
    }

    /// `xs` (n × cols) times this matrix transposed: (n × rows). Blocks of
    /// weight rows go to threads; each block's weights are read once for all n
    /// input rows (from cache), and each output is one in-order sum.
    pub fn matmul_t(&self, xs: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(xs.len(), n * self.cols, "input and matrix widths disagree");
        let acts = QuantizedRows::new(xs, self.cols);
        let row_bytes = self.row_bytes();
        // Transposed (rows × n) while computing, so each thread owns a contiguous part.
        let mut out_t = vec![0f32; self.rows * n];
        let xs: Vec<Activations<'_>> = (0..n).map(|i| acts.row(i)).collect();
        on_candles_threads(&mut out_t, n, |first_row, out| {
            let weights = &self.data[first_row * row_bytes..first_row * row_bytes + out.len() / n * row_bytes];
            if n >= 4 {
                // Four input rows share each unpacked weight block.
                for (w, out) in weights.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
                    let mut four = out.chunks_exact_mut(4);
                    for (k, o) in (&mut four).enumerate() {
                        let x = &xs[4 * k..4 * k + 4];
                        o.copy_from_slice(&self.tile([w], [&x[0], &x[1], &x[2], &x[3]])[0]);
                    }
                    let done = n - four.into_remainder().len();
                    for (i, o) in out[done..].iter_mut().enumerate() {
                        *o = self.tile([w], [&xs[done + i]])[0][0];
                    }
                }
                return;
            }
            // Decode: four weight rows share each loaded activation block.
            let mut four = weights.chunks_exact(4 * row_bytes);
            let mut r = 0;
            for w in &mut four {
                let w: [&[u8]; 4] = std::array::from_fn(|k| &w[k * row_bytes..(k + 1) * row_bytes]);
                for (i, x) in xs.iter().enumerate() {
                    for (k, v) in self.tile(w, [x]).iter().enumerate() {
                        out[(r + k) * n + i] = v[0];
                    }
                }
                r += 4;
            }
            for w in four.remainder().chunks_exact(row_bytes) {
                for (i, x) in xs.iter().enumerate() {
                    out[r * n + i] = self.tile([w], [x])[0][0];
                }
                r += 1;
            }
        });
        if n == 1 {
            return out_t;
        }
        let mut out = vec![0f32; n * self.rows];
        for (r, row) in out_t.chunks_exact(n).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                out[i * self.rows + r] = v;
            }
        }
        out
    }

    /// W weight rows dotted with X activation rows. Every result takes the
    /// steps of a lone dot product, so tiling never changes a bit.
    fn tile<const W: usize, const X: usize>(&self, ws: [&[u8]; W], xs: [&Activations<'_>; X]) -> [[f32; X]; W] {
        match (self.kernel, self.format) {
            (Kernel::Scalar, format) => ws.map(|w| {
                xs.map(|x| match format {
                    BlockFormat::Q4_1 => scalar::dot_q4_1(w, x),
                    BlockFormat::Q5_0 => scalar::dot_q5_0(w, x),
                    BlockFormat::Q8_0 => scalar::dot_q8_0(w, x),
                })
            }),
            // SAFETY: `Kernel::detect` saw AVX2 and FMA on this CPU; `new` checked the rows' bytes.
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, BlockFormat::Q4_1) => unsafe { avx2::tile_q4_1(ws, xs) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, BlockFormat::Q5_0) => unsafe { avx2::tile_q5_0(ws, xs) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, BlockFormat::Q8_0) => unsafe { avx2::tile_q8_0(ws, xs) },
        }
    }
}

/// Split `out` (rows of `width` values) into one contiguous run of rows per
/// thread of candle's own persistent pool, and run `work(first_row, rows)` on
/// each. The pool is the one candle's quantized matmuls use: a second pool
/// (rayon's) would make both spin against each other on a small machine.
fn on_candles_threads(out: &mut [f32], width: usize, work: impl Fn(usize, &mut [f32]) + Sync) {
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

/// One activation row's blocks.
struct Activations<'a> {
    d: &'a [f32],
    sum: &'a [i32],
    s: &'a [f32],
    qs: &'a [i8],
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The float part of a block, shared by both kernels so that they agree bit for bit.
#[inline(always)]
fn q4_1_block(sumi: i32, w: &[u8], x: &Activations<'_>, b: usize) -> f32 {
    sumi as f32 * f16_at(w, 0) * x.d[b] + f16_at(w, 2) * x.s[b]
}

#[inline(always)]
fn q5_0_block(sumi: i32, w: &[u8], x: &Activations<'_>, b: usize) -> f32 {
    sumi as f32 * f16_at(w, 0) * x.d[b]
}

mod scalar {
    use super::*;

    pub fn dot_q4_1(row: &[u8], x: &Activations<'_>) -> f32 {
        let mut sumf = 0f32;
        for (b, w) in row.chunks_exact(20).enumerate() {
            let xq = &x.qs[b * QK..(b + 1) * QK];
            let mut sumi = 0i32;
            for j in 0..QK / 2 {
                sumi += (w[4 + j] & 0x0F) as i32 * xq[j] as i32 + (w[4 + j] >> 4) as i32 * xq[j + QK / 2] as i32;
            }
            sumf += q4_1_block(sumi, w, x, b);
        }
        sumf
    }

    pub fn dot_q5_0(row: &[u8], x: &Activations<'_>) -> f32 {
        let mut sumf = 0f32;
        for (b, w) in row.chunks_exact(22).enumerate() {
            let xq = &x.qs[b * QK..(b + 1) * QK];
            let high = u32::from_le_bytes([w[2], w[3], w[4], w[5]]);
            let mut sumi = 0i32;
            for j in 0..QK / 2 {
                let lo = (w[6 + j] & 0x0F) as i32 | (((high >> j) & 1) << 4) as i32;
                let hi = (w[6 + j] >> 4) as i32 | (((high >> (j + 16)) & 1) << 4) as i32;
                sumi += (lo - 16) * xq[j] as i32 + (hi - 16) * xq[j + QK / 2] as i32;
            }
            sumf += q5_0_block(sumi, w, x, b);
        }
        sumf
    }

    /// The AVX2 kernel's arithmetic, lane by lane: lane k sums values 4k..4k+4
    /// of each block, scaled and added with one rounding (fused multiply-add).
    pub fn dot_q8_0(row: &[u8], x: &Activations<'_>) -> f32 {
        let mut acc = [0f32; 8];
        for (b, w) in row.chunks_exact(34).enumerate() {
            let d = f16_at(w, 0) * x.d[b];
            let xq = &x.qs[b * QK..(b + 1) * QK];
            for (k, acc) in acc.iter_mut().enumerate() {
                let lane: i32 = (4 * k..4 * k + 4).map(|j| w[2 + j] as i8 as i32 * xq[j] as i32).sum();
                *acc = d.mul_add(lane as f32, *acc);
            }
        }
        // The AVX2 kernel's horizontal sum: high half onto low, then pairs.
        let t: [f32; 4] = std::array::from_fn(|j| acc[j + 4] + acc[j]);
        (t[0] + t[2]) + (t[1] + t[3])
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// Sum of the eight i32 lanes.
    #[inline(always)]
    unsafe fn sum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// The 32 nibbles of 16 bytes in value order: low nibbles (values 0..16)
    /// in the low lane, high nibbles (values 16..32) in the high lane.
    #[inline(always)]
    unsafe fn nibbles(bytes: &[u8]) -> __m256i {
        let q = _mm_loadu_si128(bytes.as_ptr() as *const __m128i);
        let low = _mm_set1_epi8(0x0F);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low))
    }

    /// Σ w·x over 32 values, w unsigned (< 64), x signed: exact in i32.
    #[inline(always)]
    unsafe fn dot_u8_i8(w: __m256i, x: &[i8]) -> i32 {
        let x = _mm256_loadu_si256(x.as_ptr() as *const __m256i);
        let pairs = _mm256_maddubs_epi16(w, x); // |pair| ≤ 2·63·127: no saturation
        sum_i32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// Eight float lanes summed as candle's AVX2 kernels sum them.
    #[inline(always)]
    unsafe fn sum_f32(x: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// A Q5_0 block's 5-bit values, unsigned (0..32).
    #[inline(always)]
    unsafe fn q5_values(w: &[u8]) -> __m256i {
        // Byte j of the fifth-bit word goes to values 8j..8j+8; each value then
        // tests its own bit.
        let spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let high = _mm256_set1_epi32(i32::from_le_bytes([w[2], w[3], w[4], w[5]]));
        let is_set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(high, spread), bit), bit);
        _mm256_or_si256(nibbles(&w[6..22]), _mm256_and_si256(is_set, _mm256_set1_epi8(0x10)))
    }

    /// W weight rows × X activation rows of Q4_1: each weight block is unpacked
    /// once for the X rows, each activation block loaded once for the W rows,
    /// and every result takes the steps of a lone dot product.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_q4_1<const W: usize, const X: usize>(ws: [&[u8]; W], xs: [&Activations<'_>; X]) -> [[f32; X]; W] {
        let mut sumf = [[0f32; X]; W];
        for b in 0..ws[0].len() / 20 {
            for (sumf, row) in sumf.iter_mut().zip(ws) {
                let w = &row[b * 20..(b + 1) * 20];
                let q = nibbles(&w[4..20]);
                for (sumf, x) in sumf.iter_mut().zip(xs) {
                    *sumf += q4_1_block(dot_u8_i8(q, &x.qs[b * QK..(b + 1) * QK]), w, x, b);
                }
            }
        }
        sumf
    }

    /// As `tile_q4_1`, for Q5_0: Σ (q − 16)·x = Σ q·x − 16·Σ x, q unsigned for maddubs.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_q5_0<const W: usize, const X: usize>(ws: [&[u8]; W], xs: [&Activations<'_>; X]) -> [[f32; X]; W] {
        let mut sumf = [[0f32; X]; W];
        for b in 0..ws[0].len() / 22 {
            for (sumf, row) in sumf.iter_mut().zip(ws) {
                let w = &row[b * 22..(b + 1) * 22];
                let q = q5_values(w);
                for (sumf, x) in sumf.iter_mut().zip(xs) {
                    let sumi = dot_u8_i8(q, &x.qs[b * QK..(b + 1) * QK]) - 16 * x.sum[b];
                    *sumf += q5_0_block(sumi, w, x, b);
                }
            }
        }
        sumf
    }

    /// As `tile_q4_1`, for Q8_0 in candle's AVX2 order: per block, eight lane
    /// sums of w·x (signed × signed through the sign trick), scaled by d_w·d_x
    /// into eight accumulators with fused multiply-adds.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_q8_0<const W: usize, const X: usize>(ws: [&[u8]; W], xs: [&Activations<'_>; X]) -> [[f32; X]; W] {
        let mut acc = [[_mm256_setzero_ps(); X]; W];
        let ones = _mm256_set1_epi16(1);
        for b in 0..ws[0].len() / 34 {
            for (acc, row) in acc.iter_mut().zip(ws) {
                let w = &row[b * 34..(b + 1) * 34];
                let q = _mm256_loadu_si256(w[2..].as_ptr() as *const __m256i);
                let magnitude = _mm256_sign_epi8(q, q);
                let dw = f16_at(w, 0);
                for (acc, x) in acc.iter_mut().zip(xs) {
                    let xq = _mm256_loadu_si256(x.qs[b * QK..].as_ptr() as *const __m256i);
                    let lanes = _mm256_madd_epi16(ones, _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xq, q)));
                    *acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d[b]), _mm256_cvtepi32_ps(lanes), *acc);
                }
            }
        }
        acc.map(|row| row.map(|a| sum_f32(a)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Module, Tensor};
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// candle's own quantized matmul (its Q8_1 / Q8_0 activations and scalar
    /// block dot) against ours, on the same blocks.
    /// (candle's kernels want an even number of blocks per row; ours do not.)
    fn check(dtype: GgmlDType, rows: usize, cols: usize, n: usize, seed: u64) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let w = Tensor::from_vec(random(&mut rng, rows * cols), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let format = BlockFormat::from_ggml(dtype).unwrap();
        let ours = QuantMatrix::new(format, rows, cols, q.data().unwrap().into_owned()).unwrap();
        let xs = random(&mut rng, n * cols);
        let x = Tensor::from_vec(xs.clone(), (n, cols), &Device::Cpu).unwrap();
        let want = candle_core::quantized::QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        let got = ours.matmul_t(&xs, n);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{dtype:?} {rows}x{cols} n={n}: element {i}: ours {a}, candle {b}");
        }
        // The scalar kernel gives the same bits as whichever one was detected.
        let scalar = QuantMatrix { kernel: Kernel::Scalar, ..ours };
        assert_eq!(scalar.matmul_t(&xs, n), got);
    }

    #[test]
    fn q4_1_is_candles_result_bit_for_bit() {
        for (i, &(rows, cols, n)) in [(1, 64, 1), (7, 128, 1), (33, 192, 3), (64, 576, 1), (17, 1536, 5), (40, 320, 9)].iter().enumerate() {
            check(GgmlDType::Q4_1, rows, cols, n, i as u64);
        }
    }

    #[test]
    fn q8_0_is_candles_result_bit_for_bit() {
        for (i, &(rows, cols, n)) in [(1, 64, 1), (7, 128, 1), (33, 192, 3), (64, 576, 1), (17, 896, 5), (40, 320, 9)].iter().enumerate() {
            check(GgmlDType::Q8_0, rows, cols, n, 200 + i as u64);
        }
    }

    #[test]
    fn q5_0_is_candles_result_bit_for_bit() {
        for (i, &(rows, cols, n)) in [(1, 64, 1), (7, 128, 1), (33, 192, 3), (64, 896, 1), (17, 4864, 2), (40, 320, 9)].iter().enumerate() {
            check(GgmlDType::Q5_0, rows, cols, n, 100 + i as u64);
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_batched() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (rows, cols) = (48, 256);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            let w = Tensor::from_vec(random(&mut rng, rows * cols), (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let m = QuantMatrix::new(BlockFormat::from_ggml(dtype).unwrap(), rows, cols, q.data().unwrap().into_owned()).unwrap();
            let xs = random(&mut rng, 5 * cols);
            let batched = m.matmul_t(&xs, 5);
            for i in 0..5 {
                assert_eq!(m.matmul_t(&xs[i * cols..(i + 1) * cols], 1), batched[i * rows..(i + 1) * rows]);
            }
        }
    }

    #[test]
    fn close_to_the_dequantized_product() {
        // Independent of candle's kernels: dequantize, multiply in f64, and
        // allow what 8-bit activations can move: half a step (amax/127) per
        // value, times |w|. Odd block counts (cols = 96) included.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for (cols, dtype) in [(96, GgmlDType::Q4_1), (512, GgmlDType::Q4_1), (96, GgmlDType::Q5_0), (512, GgmlDType::Q5_0), (96, GgmlDType::Q8_0)] {
            let rows = 20;
            let w = Tensor::from_vec(random(&mut rng, rows * cols), (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let dense: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let m = QuantMatrix::new(BlockFormat::from_ggml(dtype).unwrap(), rows, cols, q.data().unwrap().into_owned()).unwrap();
            let xs = random(&mut rng, cols);
            let got = m.matmul_t(&xs, 1);
            for r in 0..rows {
                let w = &dense[r * cols..(r + 1) * cols];
                let exact: f64 = w.iter().zip(&xs).map(|(&w, &x)| w as f64 * x as f64).sum();
                let bound: f64 = w
                    .chunks(QK)
                    .zip(xs.chunks(QK))
                    .map(|(w, x)| {
                        let step = x.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 127.0;
                        w.iter().map(|v| v.abs() as f64).sum::<f64>() * step * 0.5
                    })
                    .sum::<f64>()
                    * 1.01
                    + 1e-3 * exact.abs();
                assert!((got[r] as f64 - exact).abs() <= bound, "{dtype:?} {cols} row {r}: {} vs {exact} (bound {bound})", got[r]);
            }
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert!(QuantMatrix::new(BlockFormat::Q4_1, 2, 48, vec![0; 40]).is_err());
        assert!(QuantMatrix::new(BlockFormat::Q5_0, 2, 64, vec![0; 87]).is_err());
    }
}

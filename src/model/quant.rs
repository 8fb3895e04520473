//! Our own CPU kernels for GGUF's Q4_1 (SmolLM2's projections), Q5_0 (most of
//! Qwen2.5-0.5B's) and Q8_0 (SmolLM2's head, the rest of Qwen2.5-0.5B), and
//! (in `super_blocks`) Q4_K and Q6_K. candle multiplies the first two with
//! scalar code; all run here on candle's own thread pool.
//!
//! A GGUF block holds 32 values:
//! - Q4_1 (20 bytes): scale d and minimum m (f16), 16 bytes of 4-bit q;
//!   value = d·q + m. Value j is the low nibble of byte j, value 16 + j its high one.
//! - Q5_0 (22 bytes): scale d (f16), 32 fifth bits (u32), 16 bytes of nibbles;
//!   value = d·(q − 16), q = nibble | fifth bit << 4.
//! - Q8_0 (34 bytes): scale d (f16), 32 signed bytes; value = d·q.
//! At load the blocks are repacked, once and in as many bytes: the quantized
//! values of a row together, its scales (and minimums, fifth bits) in arrays
//! beside them, so eight blocks' scales load as one vector.
//!
//! Activations are quantized to 8 bits per block of 32 exactly as candle's
//! Q8_1 / Q8_0 rows are (scale amax/127 kept as f16), and each block's integer
//! dot product is exact. What differs between paths is only the float sum:
//! - the scalar fallback does candle's own per-block expression in candle's
//!   order, so it gives candle's bits;
//! - the AVX2 Q4_1 / Q5_0 kernels scale each block's eight lanes of integer
//!   products into eight float lanes with one fused multiply-add, as
//!   llama.cpp's do, and sum the lanes once at the end. Keeping candle's
//!   block-by-block float additions cost 25-30% at decode (measured in one
//!   process, alternating both: `benches/quant_kernel.rs` shapes); the results
//!   differ from candle's in the last bits only (tests bound it);
//! - Q8_0 on AVX2 takes candle's AVX2 steps per block (eight lanes, fused
//!   multiply-add), and the scalar fallback follows the same lanes and
//!   candle's horizontal sum; the AVX2 kernels sum their lanes in another
//!   order (`avx2::lane_sums_pair`), so they differ in the last bits.
//!
//! Every output element takes the same steps in the same order whatever the
//! number of input rows, the tiling or the threads, so batching keeps the bits.

use half::f16;

use super::kernel::Kernel;
use super::threads::Columns;

mod super_blocks;

use super_blocks::{SuperRows, QK_K};

const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q6K,
}

impl BlockFormat {
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q5_0 => Some(BlockFormat::Q5_0),
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            GgmlDType::Q4K => Some(BlockFormat::Q4K),
            GgmlDType::Q6K => Some(BlockFormat::Q6K),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q5_0 => 22,
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4K => 144,
            BlockFormat::Q6K => 210,
        }
    }

    /// Bytes of quantized values per block.
    fn value_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 | BlockFormat::Q5_0 => 16,
            BlockFormat::Q8_0 => 32,
            // Super-blocks stay whole (see `super_blocks`).
            BlockFormat::Q4K => super_blocks::Q4_K_BYTES,
            BlockFormat::Q6K => super_blocks::Q6_K_BYTES,
        }
    }

    /// Values per block.
    fn block_values(self) -> usize {
        if self.has_super_blocks() { QK_K } else { QK }
    }

    /// Q4_K and Q6_K: 256-value blocks, whose inputs are quantized per 256 values.
    fn has_super_blocks(self) -> bool {
        matches!(self, BlockFormat::Q4K | BlockFormat::Q6K)
    }
}

/// Rows of activations, 8 bits per value, per block of 32: the scale (an f16
/// value), the sum of the quantized values, and Q8_1's `s` = f16(sum)·d in f16;
/// and, for the super-block formats, per block of 256 (`SuperRows`). Each form
/// is made only when some matrix reads it.
pub struct QuantizedRows {
    cols: usize,
    d: Vec<f32>,
    sum: Vec<i32>,
    s: Vec<f32>,
    qs: Vec<i8>,
    k: SuperRows,
}

impl QuantizedRows {
    /// `xs` is (n × cols), cols a multiple of 32 (of 256 for `super_blocks`).
    pub fn new(xs: &[f32], cols: usize, blocks: bool, super_blocks: bool) -> Self {
        assert!(cols % QK == 0 && xs.len() % cols == 0);
        let k = if super_blocks { SuperRows::new(xs) } else { SuperRows::default() };
        let mut rows = QuantizedRows { cols, d: Vec::new(), sum: Vec::new(), s: Vec::new(), qs: Vec::new(), k };
        if !blocks {
            return rows;
        }
        let count = xs.len() / QK;
        rows.d.reserve(count);
        rows.sum.reserve(count);
        rows.s.reserve(count);
        rows.qs = vec![0; xs.len()];
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

    /// Row `i`'s blocks (empty slices for a form not made).
    fn row(&self, i: usize) -> Activations<'_> {
        let part = |v: usize| i * self.cols / v..(i + 1) * self.cols / v;
        let (nb, nk) = (part(QK), part(QK_K));
        let (cols, k16, k32) = (part(1), part(16), part(QK));
        Activations {
            d: self.d.get(nb.clone()).unwrap_or(&[]),
            sum: self.sum.get(nb.clone()).unwrap_or(&[]),
            s: self.s.get(nb).unwrap_or(&[]),
            qs: self.qs.get(cols.clone()).unwrap_or(&[]),
            k_d: self.k.d.get(nk).unwrap_or(&[]),
            k_sums16: self.k.sums16.get(k16).unwrap_or(&[]),
            k_sums32: self.k.sums32.get(k32).unwrap_or(&[]),
            k_qs: self.k.qs.get(cols).unwrap_or(&[]),
        }
    }
}

/// One activation row's blocks, in either form.
struct Activations<'a> {
    d: &'a [f32],
    sum: &'a [i32],
    s: &'a [f32],
    qs: &'a [i8],
    /// Per 256 values: the scale, the sums of 16 and of 32 values, the values.
    k_d: &'a [f32],
    k_sums16: &'a [i16],
    k_sums32: &'a [i16],
    k_qs: &'a [i8],
}

/// A (rows × cols) matrix of Q4_1, Q5_0, Q8_0, Q4_K or Q6_K blocks, repacked.
pub struct QuantMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    /// Quantized values, block after block, row after row.
    values: Vec<u8>,
    /// Per block: the scale d.
    scales: Vec<f16>,
    /// Q4_1: per block, the minimum m; Q4_K: dmin (empty for the other formats).
    minimums: Vec<f16>,
    /// Q5_0: per block, the fifth bits (empty for the other formats).
    fifth_bits: Vec<u32>,
    kernel: Kernel,
}

/// One weight row's repacked blocks.
#[derive(Clone, Copy)]
struct WeightRow<'a> {
    values: &'a [u8],
    scales: &'a [f16],
    minimums: &'a [f16],
    fifth_bits: &'a [u32],
}

impl QuantMatrix {
    /// `blocks` are the rows' blocks, row after row, as a GGUF file holds them.
    pub fn new(format: BlockFormat, rows: usize, cols: usize, blocks: &[u8]) -> candle_core::Result<Self> {
        let per_block = format.block_values();
        if cols % per_block != 0 {
            candle_core::bail!("{format:?} rows need a multiple of {per_block} columns, not {cols}");
        }
        let count = rows * cols / per_block;
        if blocks.len() != count * format.block_bytes() {
            candle_core::bail!("{format:?} ({rows} × {cols}) needs {} bytes, got {}", count * format.block_bytes(), blocks.len());
        }
        let mut m = QuantMatrix {
            format,
            rows,
            cols,
            values: Vec::with_capacity(count * format.value_bytes()),
            // One per block of the 32-value formats; super-blocks keep theirs inside.
            scales: Vec::with_capacity(if format.has_super_blocks() { 0 } else { count }),
            minimums: Vec::new(),
            fifth_bits: Vec::new(),
            kernel: Kernel::detect(),
        };
        let half_at = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]);
        for block in blocks.chunks_exact(format.block_bytes()) {
            match format {
                BlockFormat::Q4_1 => {
                    m.scales.push(half_at(block, 0));
                    m.minimums.push(half_at(block, 2));
                    m.values.extend_from_slice(&block[4..20]);
                }
                BlockFormat::Q5_0 => {
                    m.scales.push(half_at(block, 0));
                    m.fifth_bits.push(u32::from_le_bytes([block[2], block[3], block[4], block[5]]));
                    m.values.extend_from_slice(&block[6..22]);
                }
                BlockFormat::Q8_0 => {
                    m.scales.push(half_at(block, 0));
                    m.values.extend_from_slice(&block[2..34]);
                }
                BlockFormat::Q4K => super_blocks::repack_q4_k(block, &mut m.values),
                BlockFormat::Q6K => m.values.extend_from_slice(block),
            }
        }
        Ok(m)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` as f32 values (an embedding lookup), as candle dequantizes it.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let w = self.weight_row(r);
        let mut out = Vec::with_capacity(self.cols);
        if self.format.has_super_blocks() {
            match self.format {
                BlockFormat::Q4K => super_blocks::dequantize_q4_k(w, &mut out),
                _ => super_blocks::dequantize_q6_k(w, &mut out),
            }
            return out;
        }
        let vb = self.format.value_bytes();
        for (b, q) in w.values.chunks_exact(vb).enumerate() {
            let d = w.scales[b].to_f32();
            match self.format {
                BlockFormat::Q4_1 => {
                    let m = w.minimums[b].to_f32();
                    out.extend(q.iter().map(|&v| (v & 0x0F) as f32 * d + m));
                    out.extend(q.iter().map(|&v| (v >> 4) as f32 * d + m));
                }
                BlockFormat::Q5_0 => {
                    let high = w.fifth_bits[b];
                    let value = |nibble: u8, bit: usize| ((nibble as u32 | ((high >> bit) & 1) << 4) as i32 - 16) as f32 * d;
                    out.extend(q.iter().enumerate().map(|(j, &v)| value(v & 0x0F, j)));
                    out.extend(q.iter().enumerate().map(|(j, &v)| value(v >> 4, j + 16)));
                }
                BlockFormat::Q8_0 => out.extend(q.iter().map(|&v| v as i8 as f32 * d)),
                BlockFormat::Q4K | BlockFormat::Q6K => unreachable!("dequantized above"),
            }
        }
        out
    }

    fn weight_row(&self, r: usize) -> WeightRow<'_> {
        let nb = self.cols / self.format.block_values();
        let blocks = r * nb..(r + 1) * nb;
        let vb = self.format.value_bytes();
        WeightRow {
            values: &self.values[r * nb * vb..(r + 1) * nb * vb],
            // Empty for the formats without them.
            scales: self.scales.get(blocks.clone()).unwrap_or(&[]),
            minimums: self.minimums.get(blocks.clone()).unwrap_or(&[]),
            fifth_bits: self.fifth_bits.get(blocks).unwrap_or(&[]),
        }
    }

    /// `xs` (n × cols) times this matrix transposed: (n × rows).
    pub fn matmul_t(&self, xs: &[f32], n: usize) -> Vec<f32> {
        Self::matmul_t_many(&[self], xs, n).pop().expect("one matrix, one product")
    }

    /// `xs` (n × cols) times each matrix transposed, for matrices that read the
    /// same input (q, k and v; gate and up): the input is quantized once, and
    /// all the matrices' rows go to the threads in one hand-out. Runs of weight
    /// rows (multiples of four) go to threads; each output is
    /// one in-order sum.
    pub fn matmul_t_many(matrices: &[&QuantMatrix], xs: &[f32], n: usize) -> Vec<Vec<f32>> {
        let cols = matrices[0].cols;
        assert!(matrices.iter().all(|m| m.cols == cols), "matrices of one input share its width");
        assert_eq!(xs.len(), n * cols, "input and matrix widths disagree");
        let (blocks, super_blocks) = (matrices.iter().any(|m| !m.format.has_super_blocks()), matrices.iter().any(|m| m.format.has_super_blocks()));
        let acts = QuantizedRows::new(xs, cols, blocks, super_blocks);
        let xs: Vec<Activations<'_>> = (0..n).map(|i| acts.row(i)).collect();
        // Where each matrix's rows start among all rows, rounded up to a whole
        // run of four so that no run spans two matrices.
        let mut starts = Vec::with_capacity(matrices.len() + 1);
        let mut total = 0;
        for m in matrices {
            starts.push(total);
            total += m.rows.next_multiple_of(4);
        }
        starts.push(total);
        let mut outs: Vec<Vec<f32>> = matrices.iter().map(|m| vec![0f32; n * m.rows]).collect();
        let columns: Vec<Columns> = outs.iter_mut().zip(matrices).map(|(o, m)| Columns::new(o, m.rows, n)).collect();
        // Each thread computes a run of rows (rows × n) and writes it straight
        // into each product's (n × rows) layout.
        super::threads::runs_on_candles_threads(total, n, 4, |first_row, part| {
            let end_row = first_row + part.len() / n;
            for (k, m) in matrices.iter().enumerate() {
                let (from, to) = (first_row.max(starts[k]), end_row.min(starts[k] + m.rows));
                if from < to {
                    let part = &mut part[(from - first_row) * n..(to - first_row) * n];
                    m.rows_times(from - starts[k]..to - starts[k], &xs, part);
                    // SAFETY: the pool gives each run of rows to one thread, and
                    // `outs` is untouched until every thread is done.
                    unsafe { columns[k].put_rows(from - starts[k], part) };
                }
            }
        });
        drop(columns);
        outs
    }

    /// Weight rows `rows` dotted with every input: `out` is (rows × n). One
    /// weight row after another, so the weights are one stream of memory
    /// (four rows read side by side, a tile that shared activation loads,
    /// stalled on memory: 5-25% slower at decode on matrices that do not fit
    /// the caches, 2.3x on Qwen2.5-1.5B's short Q4_K rows); four input rows
    /// share each unpacked weight block.
    fn rows_times(&self, rows: std::ops::Range<usize>, xs: &[Activations<'_>], out: &mut [f32]) {
        let n = xs.len();
        for (r, out) in rows.zip(out.chunks_exact_mut(n)) {
            let w = self.weight_row(r);
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
    }

    /// W weight rows dotted with X activation rows. Every result takes the
    /// steps of a lone dot product, so tiling never changes a bit. (`rows_times`
    /// now passes one weight row; the kernels keep W for a future interleaved
    /// layout, where several rows are one stream.)
    fn tile<const W: usize, const X: usize>(&self, ws: [WeightRow<'_>; W], xs: [&Activations<'_>; X]) -> [[f32; X]; W] {
        match (self.kernel, self.format) {
            (Kernel::Scalar, format) => ws.map(|w| {
                xs.map(|x| match format {
                    BlockFormat::Q4_1 => scalar::dot_q4_1(w, x),
                    BlockFormat::Q5_0 => scalar::dot_q5_0(w, x),
                    BlockFormat::Q8_0 => scalar::dot_q8_0(w, x),
                    BlockFormat::Q4K => super_blocks::scalar::dot_q4_k(w, x),
                    BlockFormat::Q6K => super_blocks::scalar::dot_q6_k(w, x),
                })
            }),
            // SAFETY: `Kernel::detect` saw AVX2, FMA and F16C on this CPU; `new` sized the rows.
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, BlockFormat::Q4_1) => unsafe { avx2::tile_q4_1(ws, xs) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, BlockFormat::Q5_0) => unsafe { avx2::tile_q5_0(ws, xs) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, BlockFormat::Q8_0) => unsafe { avx2::tile_q8_0(ws, xs) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, BlockFormat::Q4K) => unsafe { super_blocks::avx2::tile_q4_k(ws, xs) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, BlockFormat::Q6K) => unsafe { super_blocks::avx2::tile_q6_k(ws, xs) },
        }
    }
}

/// candle's float expression for one Q4_1 block (its order, its roundings).
#[inline(always)]
fn q4_1_block(sumi: i32, d: f16, m: f16, x: &Activations<'_>, b: usize) -> f32 {
    sumi as f32 * d.to_f32() * x.d[b] + m.to_f32() * x.s[b]
}

/// candle's float expression for one Q5_0 block.
#[inline(always)]
fn q5_0_block(sumi: i32, d: f16, x: &Activations<'_>, b: usize) -> f32 {
    sumi as f32 * d.to_f32() * x.d[b]
}

mod scalar {
    use super::*;

    pub fn dot_q4_1(w: WeightRow<'_>, x: &Activations<'_>) -> f32 {
        let mut sumf = 0f32;
        for (b, q) in w.values.chunks_exact(16).enumerate() {
            let xq = &x.qs[b * QK..(b + 1) * QK];
            let mut sumi = 0i32;
            for j in 0..QK / 2 {
                sumi += (q[j] & 0x0F) as i32 * xq[j] as i32 + (q[j] >> 4) as i32 * xq[j + QK / 2] as i32;
            }
            sumf += q4_1_block(sumi, w.scales[b], w.minimums[b], x, b);
        }
        sumf
    }

    pub fn dot_q5_0(w: WeightRow<'_>, x: &Activations<'_>) -> f32 {
        let mut sumf = 0f32;
        for (b, q) in w.values.chunks_exact(16).enumerate() {
            let xq = &x.qs[b * QK..(b + 1) * QK];
            let high = w.fifth_bits[b];
            let mut sumi = 0i32;
            for j in 0..QK / 2 {
                let lo = (q[j] & 0x0F) as i32 | (((high >> j) & 1) << 4) as i32;
                let hi = (q[j] >> 4) as i32 | (((high >> (j + 16)) & 1) << 4) as i32;
                sumi += (lo - 16) * xq[j] as i32 + (hi - 16) * xq[j + QK / 2] as i32;
            }
            sumf += q5_0_block(sumi, w.scales[b], x, b);
        }
        sumf
    }

    /// The AVX2 kernel's arithmetic, lane by lane: lane k sums values 4k..4k+4
    /// of each block, scaled and added with one rounding (fused multiply-add).
    pub fn dot_q8_0(w: WeightRow<'_>, x: &Activations<'_>) -> f32 {
        let mut acc = [0f32; 8];
        for (b, q) in w.values.chunks_exact(QK).enumerate() {
            let d = w.scales[b].to_f32() * x.d[b];
            let xq = &x.qs[b * QK..(b + 1) * QK];
            for (k, acc) in acc.iter_mut().enumerate() {
                let lane: i32 = (4 * k..4 * k + 4).map(|j| q[j] as i8 as i32 * xq[j] as i32).sum();
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
    use crate::model::kernel::avx2::sum_eight;

    /// The 32 nibbles of 16 bytes in value order: low nibbles (values 0..16)
    /// in the low lane, high nibbles (values 16..32) in the high lane.
    #[inline(always)]
    unsafe fn nibbles(bytes: &[u8]) -> __m256i {
        let q = _mm_loadu_si128(bytes.as_ptr() as *const __m128i);
        let low = _mm_set1_epi8(0x0F);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low))
    }

    /// A Q5_0 block's 5-bit values, unsigned (0..32).
    #[inline(always)]
    unsafe fn q5_values(nibble_bytes: &[u8], fifth_bits: u32) -> __m256i {
        // Byte j of the fifth-bit word goes to values 8j..8j+8; each value then
        // tests its own bit.
        let spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let high = _mm256_set1_epi32(fifth_bits as i32);
        let is_set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(high, spread), bit), bit);
        _mm256_or_si256(nibbles(nibble_bytes), _mm256_and_si256(is_set, _mm256_set1_epi8(0x10)))
    }

    /// Σ w·x over a block, w unsigned (< 64), x signed, as eight i32 lanes.
    #[inline(always)]
    unsafe fn products(w: __m256i, x: &[i8]) -> __m256i {
        let x = _mm256_loadu_si256(x.as_ptr() as *const __m256i);
        // |pair| ≤ 2·63·127: no saturation.
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    /// `products` on the 32 values at `x` (in bounds: callers check lengths once per tile).
    #[inline(always)]
    unsafe fn products_at(w: __m256i, x: *const i8) -> __m256i {
        let x = _mm256_loadu_si256(x as *const __m256i);
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    /// Every row of a tile holds `nb` blocks, so the inner loops may index
    /// without checks (which also keeps them small enough to unroll, and the
    /// accumulators in registers).
    #[inline(always)]
    fn check_lengths<const W: usize, const X: usize>(ws: &[WeightRow<'_>; W], xs: &[&Activations<'_>; X], nb: usize, value_bytes: usize) {
        assert!(ws.iter().all(|w| w.values.len() >= nb * value_bytes && w.scales.len() >= nb));
        assert!(xs.iter().all(|x| x.qs.len() >= nb * QK && x.d.len() >= nb && x.s.len() >= nb && x.sum.len() >= nb));
    }

    /// Eight f16 values as f32.
    #[inline(always)]
    unsafe fn halves(v: &[f16]) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr() as *const __m128i))
    }

    /// One block's integer products (eight i32 lanes) scaled by `scale` into `acc`.
    #[inline(always)]
    unsafe fn scaled_block(acc: __m256, w: __m256i, x: &[i8], scale: f32) -> __m256 {
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(products(w, x)), _mm256_set1_ps(scale), acc)
    }

    /// W weight rows × X activation rows of Q4_1. Per block, Σ x·(d·q + m) =
    /// d·d_x·Σ q·x_q + m·s: the first term's eight lanes of integer products are
    /// scaled into eight float lanes (one fused multiply-add per block, no
    /// horizontal sums until the end), the second is a vector over eight blocks.
    /// Blocks are the outer loop and the W × X accumulators the inner ones, so
    /// their multiply-add chains overlap; each (row, input) pair still takes
    /// the same steps in the same order whatever W and X are.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_q4_1<const W: usize, const X: usize>(ws: [WeightRow<'_>; W], xs: [&Activations<'_>; X]) -> [[f32; X]; W] {
        let mut acc = [[_mm256_setzero_ps(); X]; W];
        let mut acc_m = [[_mm256_setzero_ps(); X]; W];
        let nb = ws[0].scales.len();
        check_lengths(&ws, &xs, nb, 16);
        assert!(ws.iter().all(|w| w.minimums.len() >= nb), "a Q4_1 row has a minimum per block");
        let x_values = xs.map(|x| x.qs.as_ptr());
        let whole = nb / 8 * 8;
        for g in (0..whole).step_by(8) {
            let scales = group_scales(&ws, &xs, g);
            for k in 0..8 {
                for (r, w) in ws.iter().enumerate() {
                    let q = nibbles(&w.values[(g + k) * 16..]);
                    for i in 0..X {
                        let products = _mm256_cvtepi32_ps(products_at(q, x_values[i].add((g + k) * QK)));
                        acc[r][i] = _mm256_fmadd_ps(products, _mm256_set1_ps(scales[r][i][k]), acc[r][i]);
                    }
                }
            }
            for (r, w) in ws.iter().enumerate() {
                let m = halves(&w.minimums[g..]);
                for (i, x) in xs.iter().enumerate() {
                    acc_m[r][i] = _mm256_fmadd_ps(m, _mm256_loadu_ps(x.s[g..].as_ptr()), acc_m[r][i]);
                }
            }
        }
        let mut tail_m = [[0f32; X]; W];
        for b in whole..nb {
            for (r, w) in ws.iter().enumerate() {
                let q = nibbles(&w.values[b * 16..]);
                let (d, m) = (w.scales[b].to_f32(), w.minimums[b].to_f32());
                for (i, x) in xs.iter().enumerate() {
                    acc[r][i] = scaled_block(acc[r][i], q, &x.qs[b * QK..], d * x.d[b]);
                    tail_m[r][i] += m * x.s[b];
                }
            }
        }
        std::array::from_fn(|r| {
            let (sums, sums_m) = lane_sums_pair(acc[r], acc_m[r]);
            std::array::from_fn(|i| sums[i] + (sums_m[i] + tail_m[r][i]))
        })
    }

    /// d·d_x for eight blocks from `g` on, per weight row and input.
    #[inline(always)]
    unsafe fn group_scales<const W: usize, const X: usize>(ws: &[WeightRow<'_>; W], xs: &[&Activations<'_>; X], g: usize) -> [[[f32; 8]; X]; W] {
        let mut scales = [[[0f32; 8]; X]; W];
        for (scales, w) in scales.iter_mut().zip(ws) {
            let d = halves(&w.scales[g..]);
            for (scales, x) in scales.iter_mut().zip(xs) {
                _mm256_storeu_ps(scales.as_mut_ptr(), _mm256_mul_ps(d, _mm256_loadu_ps(x.d[g..].as_ptr())));
            }
        }
        scales
    }

    /// As `tile_q4_1`, for Q5_0: Σ x·d·(q − 16) = d·d_x·Σ q·x_q − 16·d·d_x·Σ x_q,
    /// q unsigned for maddubs.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_q5_0<const W: usize, const X: usize>(ws: [WeightRow<'_>; W], xs: [&Activations<'_>; X]) -> [[f32; X]; W] {
        let mut acc = [[_mm256_setzero_ps(); X]; W];
        let mut acc_16 = [[_mm256_setzero_ps(); X]; W];
        let nb = ws[0].scales.len();
        check_lengths(&ws, &xs, nb, 16);
        let x_values = xs.map(|x| x.qs.as_ptr());
        let whole = nb / 8 * 8;
        for g in (0..whole).step_by(8) {
            let scales = group_scales(&ws, &xs, g);
            for k in 0..8 {
                for (r, w) in ws.iter().enumerate() {
                    let q = q5_values(&w.values[(g + k) * 16..], w.fifth_bits[g + k]);
                    for i in 0..X {
                        let products = _mm256_cvtepi32_ps(products_at(q, x_values[i].add((g + k) * QK)));
                        acc[r][i] = _mm256_fmadd_ps(products, _mm256_set1_ps(scales[r][i][k]), acc[r][i]);
                    }
                }
            }
            for (r, scales) in scales.iter().enumerate() {
                for (i, x) in xs.iter().enumerate() {
                    let x_sums = _mm256_cvtepi32_ps(_mm256_loadu_si256(x.sum[g..].as_ptr() as *const __m256i));
                    acc_16[r][i] = _mm256_fmadd_ps(_mm256_loadu_ps(scales[i].as_ptr()), x_sums, acc_16[r][i]);
                }
            }
        }
        let mut tail_16 = [[0f32; X]; W];
        for b in whole..nb {
            for (r, w) in ws.iter().enumerate() {
                let q = q5_values(&w.values[b * 16..], w.fifth_bits[b]);
                let d = w.scales[b].to_f32();
                for (i, x) in xs.iter().enumerate() {
                    acc[r][i] = scaled_block(acc[r][i], q, &x.qs[b * QK..], d * x.d[b]);
                    tail_16[r][i] += d * x.d[b] * x.sum[b] as f32;
                }
            }
        }
        std::array::from_fn(|r| {
            let (sums, sums_16) = lane_sums_pair(acc[r], acc_16[r]);
            std::array::from_fn(|i| sums[i] - 16.0 * (sums_16[i] + tail_16[r][i]))
        })
    }

    /// The lane sums of the vectors of `a` and of `b`. Each vector's eight
    /// lanes are always summed in one order, ((0+1)+(2+3))+((4+5)+(6+7)),
    /// whichever vectors share the call, so a row's result does not depend on
    /// the tile. Up to eight vectors are summed together in three rounds of
    /// pairwise adds: summing each alone cost 4% of a batched decode step on
    /// SmolLM2, whose rows are only 18 blocks long.
    #[inline(always)]
    unsafe fn lane_sums_pair<const X: usize>(a: [__m256; X], b: [__m256; X]) -> ([f32; X], [f32; X]) {
        if X < 4 {
            return (a.map(|v| sum_one(v)), b.map(|v| sum_one(v)));
        }
        let (mut sums_a, mut sums_b) = ([0f32; X], [0f32; X]);
        let mut lanes = [0f32; 8];
        for c in (0..X).step_by(4) {
            let k = (X - c).min(4);
            let v: [__m256; 8] = std::array::from_fn(|i| match i {
                i if i < k => a[c + i],
                i if (4..4 + k).contains(&i) => b[c + i - 4],
                _ => _mm256_setzero_ps(),
            });
            _mm256_storeu_ps(lanes.as_mut_ptr(), sum_eight(v));
            sums_a[c..c + k].copy_from_slice(&lanes[..k]);
            sums_b[c..c + k].copy_from_slice(&lanes[4..4 + k]);
        }
        (sums_a, sums_b)
    }

    /// One vector's lane sum, in the order `lane_sums_pair` states.
    #[inline(always)]
    unsafe fn sum_one(v: __m256) -> f32 {
        let h = _mm256_hadd_ps(v, v);
        let h = _mm256_hadd_ps(h, h);
        _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)))
    }

    /// Q8_0 in candle's AVX2 steps: per block, eight lane sums of w·x (signed ×
    /// signed through the sign trick), scaled by d_w·d_x into eight accumulators
    /// with fused multiply-adds; the lanes summed as `lane_sums_pair` does.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_q8_0<const W: usize, const X: usize>(ws: [WeightRow<'_>; W], xs: [&Activations<'_>; X]) -> [[f32; X]; W] {
        let mut acc = [[_mm256_setzero_ps(); X]; W];
        let nb = ws[0].scales.len();
        check_lengths(&ws, &xs, nb, QK);
        let x_values = xs.map(|x| x.qs.as_ptr());
        // Blocks eight at a time, their d_w·d_x as one vector product (the
        // same rounding as one by one); then the remaining blocks.
        let whole = nb / 8 * 8;
        for g in (0..whole).step_by(8) {
            let scales = group_scales(&ws, &xs, g);
            for k in 0..8 {
                for (r, w) in ws.iter().enumerate() {
                    let b = g + k;
                    let q = _mm256_loadu_si256(w.values.as_ptr().add(b * QK) as *const __m256i);
                    let q = (q, _mm256_sign_epi8(q, q));
                    for i in 0..X {
                        acc[r][i] = q8_0_block(acc[r][i], q, x_values[i].add(b * QK), scales[r][i][k]);
                    }
                }
            }
        }
        for b in whole..nb {
            for (r, w) in ws.iter().enumerate() {
                let q = _mm256_loadu_si256(w.values.as_ptr().add(b * QK) as *const __m256i);
                let q = (q, _mm256_sign_epi8(q, q));
                let dw = w.scales[b].to_f32();
                for (i, x) in xs.iter().enumerate() {
                    acc[r][i] = q8_0_block(acc[r][i], q, x_values[i].add(b * QK), dw * x.d[b]);
                }
            }
        }
        acc.map(|row| lane_sums_pair(row, row).0)
    }

    /// One Q8_0 block (its values and their magnitudes) into `acc`: eight lane
    /// sums of w·x (signed × signed through the sign trick), scaled with one
    /// fused multiply-add.
    #[inline(always)]
    unsafe fn q8_0_block(acc: __m256, (q, magnitude): (__m256i, __m256i), x: *const i8, scale: f32) -> __m256 {
        let xq = _mm256_loadu_si256(x as *const __m256i);
        let lanes = _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xq, q)));
        _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(lanes), acc)
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

    /// A random (rows × cols) matrix quantized by candle, and the same blocks as ours.
    fn random_quantized(rng: &mut rand_chacha::ChaCha8Rng, dtype: GgmlDType, rows: usize, cols: usize) -> (QTensor, QuantMatrix) {
        let w = Tensor::from_vec(random(rng, rows * cols), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let ours = QuantMatrix::new(BlockFormat::from_ggml(dtype).unwrap(), rows, cols, &q.data().unwrap()).unwrap();
        (q, ours)
    }

    /// candle's own quantized matmul (its Q8_1 / Q8_0 activations and scalar
    /// block dot) against ours, on the same blocks: the same bits from our
    /// scalar kernel, the last bits only from the detected one.
    /// (candle's kernels want an even number of blocks per row; ours do not.)
    fn check(dtype: GgmlDType, rows: usize, cols: usize, n: usize, seed: u64) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (q, ours) = random_quantized(&mut rng, dtype, rows, cols);
        let xs = random(&mut rng, n * cols);
        let x = Tensor::from_vec(xs.clone(), (n, cols), &Device::Cpu).unwrap();
        let want = candle_core::quantized::QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        // Float reassociation only: a few units in the last place of the sum
        // of |terms| (the dequantized weights times the inputs).
        let dense: Vec<f32> = ours_dense(&ours);
        let got = ours.matmul_t(&xs, n);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let (row, out) = (i / rows, i % rows);
            let magnitude: f32 = dense[out * cols..(out + 1) * cols].iter().zip(&xs[row * cols..(row + 1) * cols]).map(|(w, x)| (w * x).abs()).sum();
            assert!((a - b).abs() <= 1e-6 * magnitude.max(1.0), "{dtype:?} {rows}x{cols} n={n}: element {i}: ours {a}, candle {b}");
        }
        // The scalar kernel of the 32-value formats is candle's own
        // arithmetic: the same bits. The super-block formats' scalar kernel
        // takes the AVX2 kernel's steps: its bits.
        let format = ours.format;
        let scalar = QuantMatrix { kernel: Kernel::Scalar, ..ours };
        let same_as = if format.has_super_blocks() { &got } else { &want };
        let got = scalar.matmul_t(&xs, n);
        for (i, (a, b)) in got.iter().zip(same_as).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{dtype:?} {rows}x{cols} n={n} (scalar): element {i}: scalar {a}, other {b}");
        }
    }

    fn ours_dense(m: &QuantMatrix) -> Vec<f32> {
        (0..m.rows()).flat_map(|r| m.dequantize_row(r)).collect()
    }

    #[test]
    fn q4_1_is_candles_result() {
        for (i, &(rows, cols, n)) in [(1, 64, 1), (7, 128, 1), (33, 192, 3), (64, 576, 1), (17, 1536, 5), (40, 320, 9)].iter().enumerate() {
            check(GgmlDType::Q4_1, rows, cols, n, i as u64);
        }
    }

    #[test]
    fn q8_0_is_candles_result() {
        for (i, &(rows, cols, n)) in [(1, 64, 1), (7, 128, 1), (33, 192, 3), (64, 576, 1), (17, 896, 5), (40, 320, 9)].iter().enumerate() {
            check(GgmlDType::Q8_0, rows, cols, n, 200 + i as u64);
        }
    }

    #[test]
    fn q5_0_is_candles_result() {
        for (i, &(rows, cols, n)) in [(1, 64, 1), (7, 128, 1), (33, 192, 3), (64, 896, 1), (17, 4864, 2), (40, 320, 9)].iter().enumerate() {
            check(GgmlDType::Q5_0, rows, cols, n, 100 + i as u64);
        }
    }

    #[test]
    fn q4_k_and_q6_k_are_candles_result() {
        // Odd super-block counts (3, 19) included.
        let shapes = [(1, 256, 1), (7, 512, 1), (33, 768, 3), (64, 1536, 1), (17, 4864, 2), (40, 256, 9)];
        for (seed, dtype) in [(300, GgmlDType::Q4K), (400, GgmlDType::Q6K)] {
            for (i, &(rows, cols, n)) in shapes.iter().enumerate() {
                check(dtype, rows, cols, n, seed + i as u64);
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_batched() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (rows, cols) = (48, 256);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let (_, m) = random_quantized(&mut rng, dtype, rows, cols);
            let xs = random(&mut rng, 5 * cols);
            let batched = m.matmul_t(&xs, 5);
            for i in 0..5 {
                assert_eq!(m.matmul_t(&xs[i * cols..(i + 1) * cols], 1), batched[i * rows..(i + 1) * rows]);
            }
        }
    }

    #[test]
    fn matrices_sharing_an_input_give_each_ones_own_result() {
        // q, k, v style: different formats and row counts (not multiples of
        // four, so runs of rows meet matrix boundaries), one quantized input.
        // Both input forms at once (32- and 256-value blocks): cols = 512.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let cols = 512;
        let matrices: Vec<QuantMatrix> = [(GgmlDType::Q4_1, 30), (GgmlDType::Q8_0, 17), (GgmlDType::Q4K, 13), (GgmlDType::Q5_0, 9), (GgmlDType::Q6K, 6)]
            .into_iter()
            .map(|(dtype, rows)| random_quantized(&mut rng, dtype, rows, cols).1)
            .collect();
        for n in [1, 2, 6] {
            let xs = random(&mut rng, n * cols);
            let together = QuantMatrix::matmul_t_many(&matrices.iter().collect::<Vec<_>>(), &xs, n);
            for (m, got) in matrices.iter().zip(together) {
                assert_eq!(got, m.matmul_t(&xs, n), "{:?}, n = {n}", m.format);
            }
        }
    }

    #[test]
    fn close_to_the_dequantized_product() {
        // Independent of candle's kernels: dequantize, multiply in f64, and
        // allow what 8-bit activations can move: half a step (amax/127) per
        // value, times |w|. Odd block counts (cols = 96) included.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for (cols, dtype) in [(96, GgmlDType::Q4_1), (512, GgmlDType::Q4_1), (96, GgmlDType::Q5_0), (512, GgmlDType::Q5_0), (96, GgmlDType::Q8_0), (768, GgmlDType::Q4K), (768, GgmlDType::Q6K)] {
            // Inputs are quantized per block of the weights' format.
            let per_block = BlockFormat::from_ggml(dtype).unwrap().block_values();
            let rows = 21;
            let (q, m) = random_quantized(&mut rng, dtype, rows, cols);
            let dense: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let xs = random(&mut rng, cols);
            let got = m.matmul_t(&xs, 1);
            for r in 0..rows {
                let w = &dense[r * cols..(r + 1) * cols];
                let exact: f64 = w.iter().zip(&xs).map(|(&w, &x)| w as f64 * x as f64).sum();
                let bound: f64 = w
                    .chunks(per_block)
                    .zip(xs.chunks(per_block))
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
    fn rows_dequantize_as_candle_dequantizes_them() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let (rows, cols) = (5, 512);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let (q, m) = random_quantized(&mut rng, dtype, rows, cols);
            let want: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<f32> = (0..rows).flat_map(|r| m.dequantize_row(r)).collect();
            assert_eq!(got, want, "{dtype:?}");
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert!(QuantMatrix::new(BlockFormat::Q4_1, 2, 48, &[0; 40]).is_err());
        assert!(QuantMatrix::new(BlockFormat::Q5_0, 2, 64, &[0; 87]).is_err());
        assert!(QuantMatrix::new(BlockFormat::Q4K, 1, 128, &[0; 72]).is_err());
        assert!(QuantMatrix::new(BlockFormat::Q6K, 1, 256, &[0; 209]).is_err());
    }
}

//! Our own CPU kernels for GGUF's Q4_1 (SmolLM2's projections), Q5_0 (most of
//! Qwen2.5-0.5B's) and Q8_0 (SmolLM2's head, the rest of Qwen2.5-0.5B), Q4_K
//! and Q6_K (Qwen2.5-1.5B's; Q6_K is also half of 0.5B's down projections).
//! candle multiplies the first two with scalar code; all run here on candle's
//! own thread pool.
//!
//! A GGUF block holds 32 values:
//! - Q4_1 (20 bytes): scale d and minimum m (f16), 16 bytes of 4-bit q;
//!   value = d·q + m. Value j is the low nibble of byte j, value 16 + j its high one.
//! - Q5_0 (22 bytes): scale d (f16), 32 fifth bits (u32), 16 bytes of nibbles;
//!   value = d·(q − 16), q = nibble | fifth bit << 4.
//! - Q5_1 (24 bytes): scale d and minimum m (f16), 32 fifth bits (u32), 16
//!   bytes of nibbles; value = d·q + m, q = nibble | fifth bit << 4.
//! - Q8_0 (34 bytes): scale d (f16), 32 signed bytes; value = d·q.
//!
//! At load the blocks are repacked once, sixteen rows side by side, in as many
//! bytes (a few more for Q4_K): `panels` for the 32-value formats,
//! `q4_k_panels` and `q6_k_panels` for the 256-value super-blocks, whose
//! inputs `super_blocks` quantizes.
//!
//! Activations are quantized to 8 bits per block of 32 exactly as candle's
//! Q8_1 / Q8_0 rows are (scale amax/127 kept as f16), and each block's integer
//! dot product is exact. The 32-value formats then take candle's own float
//! expression block after block, so every kernel gives candle's scalar bits.
//!
//! Every output element takes the same steps in the same order whatever the
//! number of input rows, the tiling or the threads, so batching keeps the bits.

use half::f16;

use super::kernel::Kernel;

mod lines;
mod panels;
mod q4_k_panels;
mod q6_k_panels;
mod super_blocks;

use panels::Panels;
use q4_k_panels::Q4KPanels;
use q6_k_panels::Q6KPanels;
use super_blocks::{SuperRows, QK_K};

const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// Q4_0 is only read: each block becomes a Q4_1 block with the same
    /// values and scale and a minimum of −8·scale (exact in f16), which
    /// dequantizes to the same numbers and runs on Q4_1's kernels (11% more
    /// bytes than the file's).
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl BlockFormat {
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q5_0 => Some(BlockFormat::Q5_0),
            GgmlDType::Q5_1 => Some(BlockFormat::Q5_1),
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            GgmlDType::Q4K => Some(BlockFormat::Q4K),
            GgmlDType::Q5K => Some(BlockFormat::Q5K),
            GgmlDType::Q6K => Some(BlockFormat::Q6K),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q5_0 => 22,
            BlockFormat::Q5_1 => 24,
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4K => 144,
            BlockFormat::Q5K => 176,
            BlockFormat::Q6K => 210,
        }
    }

    /// Values per block.
    fn block_values(self) -> usize {
        if self.has_super_blocks() { QK_K } else { QK }
    }

    /// Q4_1 and Q5_1: a minimum per block beside the scale.
    fn has_minimum(self) -> bool {
        matches!(self, BlockFormat::Q4_1 | BlockFormat::Q5_1)
    }

    /// Q5_0 and Q5_1: a fifth bit per value beside the nibbles.
    fn has_fifth_bits(self) -> bool {
        matches!(self, BlockFormat::Q5_0 | BlockFormat::Q5_1)
    }

    /// Q4_K, Q5_K and Q6_K: 256-value blocks, whose inputs are quantized per 256 values.
    fn has_super_blocks(self) -> bool {
        matches!(self, BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K)
    }
}

/// Q4_0 blocks (f16 scale d, 16 bytes of nibbles: (q − 8)·d) as Q4_1 blocks
/// (d, the minimum −8·d, the same nibbles: q·d − 8·d), into `out`.
fn q4_0_as_q4_1(blocks: &[u8], out: &mut Vec<u8>) {
    out.clear();
    for block in blocks.chunks_exact(18) {
        let d = half::f16::from_le_bytes([block[0], block[1]]);
        // Times −8 is exact in f16 short of overflow, which Q4_0's scales never reach.
        let minimum = half::f16::from_f32(-8.0 * d.to_f32());
        out.extend_from_slice(&block[..2]);
        out.extend_from_slice(&minimum.to_le_bytes());
        out.extend_from_slice(&block[2..18]);
    }
}

/// Below this many values, activations are quantized on the calling thread.
const SHARED_QUANTIZING_FROM: usize = 32 * 1024;

/// Rows of activations, 8 bits per value, per block of 32: the scale (an f16
/// value), the sum of the quantized values, and Q8_1's `s` = f16(sum)·d in f16;
/// and, for the super-block formats, per block of 256 (`SuperRows`). Each form
/// is made only when some matrix reads it. The buffers are kept from one
/// `quantize` to the next, so a step no larger than an earlier one allocates
/// nothing.
#[derive(Default)]
pub struct QuantizedRows {
    cols: usize,
    d: Vec<f32>,
    sum: Vec<i32>,
    s: Vec<f32>,
    qs: Vec<i8>,
    k: SuperRows,
}

/// One run of values' share of every buffer of a `QuantizedRows` (empty
/// slices for a form not made).
struct Part<'a> {
    d: &'a mut [f32],
    sum: &'a mut [i32],
    s: &'a mut [f32],
    qs: &'a mut [i8],
    k: super_blocks::SuperPart<'a>,
}

impl QuantizedRows {
    /// `xs` is (n × cols), cols a multiple of 32 (of 256 for `super_blocks`).
    /// A prefill's many rows are quantized on the pool, runs of rows at a
    /// time, each straight into its place: every block is quantized on its
    /// own, so the bytes are the same however the rows are split.
    pub fn quantize(&mut self, xs: &[f32], cols: usize, blocks: bool, super_blocks: bool) {
        self.quantize_sharing(xs, cols, blocks, super_blocks, true);
    }

    fn quantize_sharing(&mut self, xs: &[f32], cols: usize, blocks: bool, super_blocks: bool, share: bool) {
        assert!(cols.is_multiple_of(QK) && xs.len().is_multiple_of(cols));
        assert!(!super_blocks || cols.is_multiple_of(QK_K), "super-block inputs are rows of whole super-blocks");
        let n = xs.len() / cols;
        self.cols = cols;
        let values = if blocks { xs.len() } else { 0 };
        self.d.resize(values / QK, 0.0);
        self.sum.resize(values / QK, 0);
        self.s.resize(values / QK, 0.0);
        self.qs.resize(values, 0);
        self.k.resize(if super_blocks { xs.len() } else { 0 });
        let kernel = Kernel::detect();
        if !share || xs.len() < SHARED_QUANTIZING_FROM || n < 2 {
            let base = BufferBase::of(self);
            // SAFETY: the whole of each buffer, on this thread alone.
            return quantize_part(xs, kernel, unsafe { base.part(0..xs.len(), blocks, super_blocks) });
        }
        let rows_per_run = n.div_ceil(n.min(16));
        let base = BufferBase::of(self);
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(rows_per_run), |runs| {
            for r in runs {
                let values = (r * rows_per_run).min(n) * cols..((r + 1) * rows_per_run).min(n) * cols;
                // SAFETY: runs are disjoint ranges of whole rows, each given
                // to one thread; the buffers outlive `execute_chunked`.
                let part = unsafe { base.part(values.clone(), blocks, super_blocks) };
                quantize_part(&xs[values], kernel, part);
            }
        });
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

/// The base pointers of a `QuantizedRows`' buffers, for the pool's threads
/// to write disjoint runs of values.
struct BufferBase {
    d: *mut f32,
    sum: *mut i32,
    s: *mut f32,
    qs: *mut i8,
    k_d: *mut f32,
    k_sums16: *mut i16,
    k_sums32: *mut i16,
    k_qs: *mut i8,
}

// SAFETY: only used through `part`, whose callers promise disjoint runs.
unsafe impl Sync for BufferBase {}

impl BufferBase {
    fn of(rows: &mut QuantizedRows) -> BufferBase {
        BufferBase {
            d: rows.d.as_mut_ptr(),
            sum: rows.sum.as_mut_ptr(),
            s: rows.s.as_mut_ptr(),
            qs: rows.qs.as_mut_ptr(),
            k_d: rows.k.d.as_mut_ptr(),
            k_sums16: rows.k.sums16.as_mut_ptr(),
            k_sums32: rows.k.sums32.as_mut_ptr(),
            k_qs: rows.k.qs.as_mut_ptr(),
        }
    }

    /// The parts of the buffers for values `values` (whole blocks, and whole
    /// super-blocks when they are made).
    ///
    /// # Safety
    /// The buffers were sized by `quantize_sharing` for these forms, are alive
    /// and otherwise untouched while the part is used, and no other part
    /// overlaps this one.
    unsafe fn part(&self, values: std::ops::Range<usize>, blocks: bool, super_blocks: bool) -> Part<'_> {
        unsafe fn slice<'a, T>(base: *mut T, range: std::ops::Range<usize>, made: bool) -> &'a mut [T] {
            if made { unsafe { std::slice::from_raw_parts_mut(base.add(range.start), range.len()) } } else { &mut [] }
        }
        let per = |v: usize| values.start / v..values.end / v;
        unsafe {
            Part {
                d: slice(self.d, per(QK), blocks),
                sum: slice(self.sum, per(QK), blocks),
                s: slice(self.s, per(QK), blocks),
                qs: slice(self.qs, per(1), blocks),
                k: super_blocks::SuperPart {
                    d: slice(self.k_d, per(QK_K), super_blocks),
                    sums16: slice(self.k_sums16, per(16), super_blocks),
                    sums32: slice(self.k_sums32, per(QK), super_blocks),
                    qs: slice(self.k_qs, per(1), super_blocks),
                },
            }
        }
    }
}

/// One run of values quantized into its part of the buffers.
fn quantize_part(xs: &[f32], kernel: Kernel, part: Part<'_>) {
    for (i, (block, q)) in xs.chunks_exact(QK).zip(part.qs.chunks_exact_mut(QK)).enumerate() {
        let (d, sum) = quantize_block(kernel, block, q);
        let d16 = f16::from_f32(d);
        part.d[i] = d16.to_f32();
        part.sum[i] = sum;
        part.s[i] = (f16::from_f32(sum as f32) * d16).to_f32();
    }
    if !part.k.qs.is_empty() {
        super_blocks::quantize(xs, kernel, part.k);
    }
}

/// One block of 32 activations to 8 bits as candle does it: d = amax / 127,
/// each value x·(1/d) rounded half away from zero. Returns d and the sum of
/// the quantized values. The AVX2 path gives the same bytes (tested): one
/// vector multiply per eight values has the scalar product's rounding, and
/// the rounding is done exactly (truncate, then step away from zero where the
/// dropped fraction is at least a half).
fn quantize_block(kernel: Kernel, block: &[f32], q: &mut [i8]) -> (f32, i32) {
    assert!(block.len() == QK && q.len() == QK);
    let scale = |amax: f32| {
        let d = amax / 127.0;
        (d, if d != 0.0 { 1.0 / d } else { 0.0 })
    };
    match kernel {
        // SAFETY: `Kernel::detect` saw AVX2; both slices hold 32 values (asserted).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 { .. } => unsafe {
            let (d, inverse) = scale(amax_avx2(block));
            (d, quantize_avx2(block, inverse, q))
        },
        _ => {
            let (d, inverse) = scale(block.iter().fold(0f32, |m, &x| m.max(x.abs())));
            let mut sum = 0i32;
            for (q, &x) in q.iter_mut().zip(block) {
                *q = (x * inverse).round() as i8;
                sum += *q as i32;
            }
            (d, sum)
        }
    }
}

/// The largest |x| of a block: maxima are exact, so any order gives the
/// scalar fold's value.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn amax_avx2(block: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    let abs = |k: usize| _mm256_andnot_ps(sign, _mm256_loadu_ps(block.as_ptr().add(8 * k)));
    let m = _mm256_max_ps(_mm256_max_ps(abs(0), abs(1)), _mm256_max_ps(abs(2), abs(3)));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 0b01)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_avx2(block: &[f32], inverse: f32, q: &mut [i8]) -> i32 {
    use std::arch::x86_64::*;
    let (scale, half, one) = (_mm256_set1_ps(inverse), _mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    let sign = _mm256_set1_ps(-0.0);
    let ints: [__m256i; 4] = std::array::from_fn(|k| {
        let t = _mm256_mul_ps(_mm256_loadu_ps(block.as_ptr().add(8 * k)), scale);
        let whole = _mm256_round_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        // |t − whole| is exact; at a half or more, one more step away from zero.
        let away = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(t, whole)), half, _CMP_GE_OQ);
        let step = _mm256_and_ps(away, _mm256_or_ps(one, _mm256_and_ps(t, sign)));
        _mm256_cvtps_epi32(_mm256_add_ps(whole, step))
    });
    let sum = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
    // Packing interleaves the 128-bit halves: put the 32 bytes back in order.
    let bytes = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
    let s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
}

/// One activation row's blocks, in either form.
#[derive(Default, Clone, Copy)]
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

/// A (rows × cols) matrix of Q4_1, Q5_0, Q8_0, Q4_K, Q5_K or Q6_K blocks, repacked.
pub struct QuantMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    layout: Layout,
    kernel: Kernel,
}

enum Layout {
    /// The 32-value formats, sixteen rows side by side.
    Panels(Panels),
    /// Q4_K and Q5_K, sixteen rows side by side.
    Q4K(Q4KPanels),
    /// Q6_K, sixteen rows side by side.
    Q6K(Q6KPanels),
}

/// Output rows go to the threads in groups of sixteen (a panel's rows).
const GROUP: usize = panels::ROWS;

/// Input rows whose blocks a thread looks up at once (on its stack).
const INPUT_BLOCK: usize = 16;

impl QuantMatrix {
    /// `blocks` are the rows' blocks, row after row, as a GGUF file holds them.
    pub fn new(format: BlockFormat, rows: usize, cols: usize, blocks: &[u8]) -> candle_core::Result<Self> {
        let expected = Self::gguf_bytes(format, rows, cols)?;
        if blocks.len() != expected {
            candle_core::bail!("{format:?} ({rows} × {cols}) needs {expected} bytes, got {}", blocks.len());
        }
        Self::read(format, rows, cols, &mut &blocks[..])
    }

    /// The format the kernels run (Q4_0 matrices run as Q4_1).
    pub fn format(&self) -> BlockFormat {
        self.format
    }

    /// The bytes a (rows × cols) matrix of `format` takes in a GGUF file.
    pub fn gguf_bytes(format: BlockFormat, rows: usize, cols: usize) -> candle_core::Result<usize> {
        let per_block = format.block_values();
        if !cols.is_multiple_of(per_block) {
            candle_core::bail!("{format:?} rows need a multiple of {per_block} columns, not {cols}");
        }
        Ok(rows * cols / per_block * format.block_bytes())
    }

    /// The matrix read from `reader` (its GGUF bytes, row after row), repacked
    /// row by row as it comes: only one row of the file's bytes is ever held
    /// beside the result, so loading peaks at the weights' own size.
    pub fn read(format: BlockFormat, rows: usize, cols: usize, reader: &mut impl std::io::Read) -> candle_core::Result<Self> {
        let row_bytes = Self::gguf_bytes(format, 1, cols)?;
        let mut row = vec![0u8; row_bytes];
        let mut as_q4_1 = Vec::new();
        let mut put_rows = |put: &mut dyn FnMut(usize, &[u8])| -> candle_core::Result<()> {
            for r in 0..rows {
                reader.read_exact(&mut row)?;
                if format == BlockFormat::Q4_0 {
                    q4_0_as_q4_1(&row, &mut as_q4_1);
                    put(r, &as_q4_1);
                } else {
                    put(r, &row);
                }
            }
            Ok(())
        };
        // The format the kernels run.
        let format = if format == BlockFormat::Q4_0 { BlockFormat::Q4_1 } else { format };
        let layout = match format {
            BlockFormat::Q6K => {
                let mut panels = Q6KPanels::zeros(rows, cols / QK_K);
                put_rows(&mut |r, row| panels.put_row(r, row))?;
                Layout::Q6K(panels)
            }
            BlockFormat::Q4K | BlockFormat::Q5K => {
                let mut panels = Q4KPanels::zeros(rows, cols / QK_K, format == BlockFormat::Q5K);
                put_rows(&mut |r, row| panels.put_row(r, row))?;
                Layout::Q4K(panels)
            }
            _ => {
                let mut panels = Panels::zeros(format, rows, cols / QK);
                put_rows(&mut |r, row| panels.put_row(r, row))?;
                Layout::Panels(panels)
            }
        };
        Ok(QuantMatrix { format, rows, cols, layout, kernel: Kernel::detect() })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` as f32 values (an embedding lookup), as candle dequantizes it.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.cols);
        self.dequantize_row_into(r, &mut out);
        out
    }

    /// `dequantize_row`, appended to `out`.
    pub fn dequantize_row_into(&self, r: usize, out: &mut Vec<f32>) {
        match &self.layout {
            Layout::Panels(p) => p.dequantize_row(r, out),
            Layout::Q4K(p) => p.dequantize_row(r, out),
            Layout::Q6K(p) => p.dequantize_row(r, out),
        }
    }

    /// `xs` (n × cols) times this matrix transposed: (n × rows).
    pub fn matmul_t(&self, xs: &[f32], n: usize) -> Vec<f32> {
        let mut out = Vec::new();
        Self::matmul_t_into([self], xs, n, &mut QuantizedRows::default(), [&mut out]);
        out
    }

    /// `matmul_t_into` for any number of matrices (three at a time), into
    /// new vectors.
    pub fn matmul_t_many(matrices: &[&QuantMatrix], xs: &[f32], n: usize) -> Vec<Vec<f32>> {
        let mut acts = QuantizedRows::default();
        let mut outs = vec![Vec::new(); matrices.len()];
        match (matrices, &mut outs[..]) {
            ([a], [x]) => Self::matmul_t_into([*a], xs, n, &mut acts, [x]),
            ([a, b], [x, y]) => Self::matmul_t_into([*a, *b], xs, n, &mut acts, [x, y]),
            ([a, b, c], [x, y, z]) => Self::matmul_t_into([*a, *b, *c], xs, n, &mut acts, [x, y, z]),
            _ => return matrices.chunks(3).flat_map(|three| Self::matmul_t_many(three, xs, n)).collect(),
        }
        outs
    }

    /// `xs` (n × cols) times each matrix transposed, into `outs` (n × rows
    /// each), for matrices that read the same input (q, k and v; gate and
    /// up): the input is quantized once, into `acts`, and all the matrices'
    /// groups of sixteen rows go to the threads in one hand-out. Each thread
    /// writes its results straight into the outputs. `acts` and `outs` keep
    /// their buffers, so a step no larger than an earlier one allocates nothing.
    pub fn matmul_t_into<const M: usize>(matrices: [&QuantMatrix; M], xs: &[f32], n: usize, acts: &mut QuantizedRows, mut outs: [&mut Vec<f32>; M]) {
        assert!(M > 0, "at least one matrix");
        let cols = matrices[0].cols;
        assert!(matrices.iter().all(|m| m.cols == cols), "matrices of one input share its width");
        assert_eq!(xs.len(), n * cols, "input and matrix widths disagree");
        let (blocks, super_blocks) = (matrices.iter().any(|m| !m.format.has_super_blocks()), matrices.iter().any(|m| m.format.has_super_blocks()));
        acts.quantize(xs, cols, blocks, super_blocks);
        let acts = &*acts;
        // Where each matrix's groups start among all groups.
        let mut starts = [0usize; M];
        let mut total = 0;
        for (start, m) in starts.iter_mut().zip(&matrices) {
            *start = total;
            total += m.rows.div_ceil(GROUP);
        }
        for (out, m) in outs.iter_mut().zip(&matrices) {
            out.clear();
            out.reserve(n * m.rows);
        }
        let shared: [super::threads::SharedOut; M] = outs.each_mut().map(|out| super::threads::SharedOut::spare(out));
        candle_core::utils::barrier_pool().execute_chunked(total, |groups| {
            // The input rows' blocks are looked up once per block of rows for
            // this run of groups, not once per group: on a decode step the
            // lookups cost as much as a group's arithmetic.
            for first in (0..n).step_by(INPUT_BLOCK) {
                let count = INPUT_BLOCK.min(n - first);
                let rows: [Activations<'_>; INPUT_BLOCK] = std::array::from_fn(|k| if k < count { acts.row(first + k) } else { Activations::default() });
                for (k, m) in matrices.iter().enumerate() {
                    let end = starts.get(k + 1).copied().unwrap_or(total);
                    let (from, to) = (groups.start.max(starts[k]), groups.end.min(end));
                    for g in from.saturating_sub(starts[k])..to.saturating_sub(starts[k]) {
                        m.group_times(g, first, &rows[..count], &shared[k]);
                    }
                }
            }
        });
        drop(shared);
        for (out, m) in outs.iter_mut().zip(&matrices) {
            // SAFETY: every group wrote its rows for every input, so all
            // n × rows values are written (a panic on a thread would have
            // been passed on above, before this).
            unsafe { out.set_len(n * m.rows) };
        }
    }

    /// Rows 16g..16g+16 (those that exist) dotted with each of `xs` (input rows
    /// `first..`), written into `out` (n × rows). Inputs go eight at a time,
    /// then the rest (one to seven) in one tile of their own, so each block of
    /// weights is unpacked once per tile. (Tiles of eight measured +16% for
    /// eight SmolLM2 sequences over tiles of four: half the unpacking. A rest
    /// in one tile, not fours and ones, is what a verifying step of a few
    /// drafted tokens and a batch of a few streams need.) Each input keeps
    /// its own sums in the same order in every tile, so its bits do not
    /// depend on the tile it lands in.
    fn group_times(&self, g: usize, first: usize, xs: &[Activations<'_>], out: &super::threads::SharedOut) {
        let rows = GROUP.min(self.rows - g * GROUP);
        let put = |i: usize, results: &[f32; GROUP]| {
            // SAFETY: the pool gives each group to one thread; `out` is untouched
            // until every thread is done.
            unsafe { out.put((first + i) * self.rows + g * GROUP, &results[..rows]) };
        };
        let mut i = 0;
        let rest = self.tiles::<8>(g, xs, &mut i, &put);
        let left = match rest.len() {
            0 => rest,
            1 => self.tiles::<1>(g, rest, &mut i, &put),
            2 => self.tiles::<2>(g, rest, &mut i, &put),
            3 => self.tiles::<3>(g, rest, &mut i, &put),
            4 => self.tiles::<4>(g, rest, &mut i, &put),
            5 => self.tiles::<5>(g, rest, &mut i, &put),
            6 => self.tiles::<6>(g, rest, &mut i, &put),
            _ => self.tiles::<7>(g, rest, &mut i, &put),
        };
        debug_assert!(left.is_empty(), "a rest of at most seven goes in one tile");
    }

    /// `xs` X at a time, input `*i` first, through `put`; the inputs left over.
    fn tiles<'a, 'x, const X: usize>(&self, g: usize, xs: &'a [Activations<'x>], i: &mut usize, put: &impl Fn(usize, &[f32; GROUP])) -> &'a [Activations<'x>] {
        let mut tiles = xs.chunks_exact(X);
        for tile in &mut tiles {
            for (k, results) in self.group_tile(g, std::array::from_fn::<_, X, _>(|k| &tile[k])).iter().enumerate() {
                put(*i + k, results);
            }
            *i += X;
        }
        tiles.remainder()
    }

    /// One group's rows times X inputs: `[input][row]`.
    #[inline(always)]
    fn group_tile<const X: usize>(&self, g: usize, xs: [&Activations<'_>; X]) -> [[f32; GROUP]; X] {
        match &self.layout {
            Layout::Panels(p) => p.group_times(g, xs, self.kernel),
            Layout::Q4K(p) => p.group_times(g, xs, self.kernel),
            Layout::Q6K(p) => p.group_times(g, xs, self.kernel),
        }
    }
}

/// What the kernels' checks of GFNI against the shifts share.
#[cfg(all(test, target_arch = "x86_64"))]
mod gfni_check {
    use rand::Rng;

    /// Whether this CPU runs the VNNI kernels with GFNI (saying so when not).
    pub fn available() -> bool {
        let yes = super::Kernel::detect() == (super::Kernel::Avx2 { vnni: true }) && crate::model::kernel::has_gfni();
        if !yes {
            eprintln!("this CPU has no AVX-512 VNNI with GFNI: nothing to compare");
        }
        yes
    }

    /// `put(row, blocks)` for each of `rows` rows of `nb` random blocks of
    /// `block_bytes`, each with small finite f16 values at byte offsets
    /// `scales_at` (its scales and minimums).
    pub fn random_rows(rng: &mut rand_chacha::ChaCha8Rng, rows: usize, nb: usize, block_bytes: usize, scales_at: &[usize], mut put: impl FnMut(usize, &[u8])) {
        for r in 0..rows {
            let mut blocks = vec![0u8; nb * block_bytes];
            rng.fill(&mut blocks[..]);
            for block in blocks.chunks_exact_mut(block_bytes) {
                for &at in scales_at {
                    block[at..at + 2].copy_from_slice(&half::f16::from_f32(rng.random_range(0.001..0.01)).to_le_bytes());
                }
            }
            put(r, &blocks);
        }
    }

    /// Four rows of `cols` random inputs, quantized per 32 values
    /// (`blocks`) or per 256.
    pub fn random_inputs(rng: &mut rand_chacha::ChaCha8Rng, cols: usize, blocks: bool) -> super::QuantizedRows {
        let xs: Vec<f32> = (0..4 * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut quantized = super::QuantizedRows::default();
        quantized.quantize(&xs, cols, blocks, !blocks);
        quantized
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

    /// candle's own quantized matmul (its Q8_1 / Q8_0 activations and block
    /// dot) against ours, on the same blocks. Q4_1 and Q5_0, which candle
    /// multiplies with scalar code, give candle's bits on every kernel; Q8_0
    /// (candle's AVX2 lanes) and the super-block formats differ from candle in
    /// the last bits only, and the scalar kernel gives the detected one's bits.
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
        let candles_bits = matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let (row, out) = (i / rows, i % rows);
            let magnitude: f32 = dense[out * cols..(out + 1) * cols].iter().zip(&xs[row * cols..(row + 1) * cols]).map(|(w, x)| (w * x).abs()).sum();
            assert!((a - b).abs() <= 1e-6 * magnitude.max(1.0), "{dtype:?} {rows}x{cols} n={n}: element {i}: ours {a}, candle {b}");
            if candles_bits {
                assert_eq!(a.to_bits(), b.to_bits(), "{dtype:?} {rows}x{cols} n={n}: element {i}: ours {a}, candle {b}");
            }
        }
        let scalar = QuantMatrix { kernel: Kernel::Scalar, ..ours };
        let got_scalar = scalar.matmul_t(&xs, n);
        for (i, (a, b)) in got_scalar.iter().zip(&got).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{dtype:?} {rows}x{cols} n={n} (scalar): element {i}: scalar {a}, detected {b}");
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
    fn q5_1_is_candles_result() {
        for (i, &(rows, cols, n)) in [(1, 64, 1), (7, 128, 1), (33, 192, 3), (64, 896, 1), (17, 1536, 2), (40, 320, 9)].iter().enumerate() {
            check(GgmlDType::Q5_1, rows, cols, n, 700 + i as u64);
        }
    }

    #[test]
    fn q5_0_is_candles_result() {
        for (i, &(rows, cols, n)) in [(1, 64, 1), (7, 128, 1), (33, 192, 3), (64, 896, 1), (17, 4864, 2), (40, 320, 9)].iter().enumerate() {
            check(GgmlDType::Q5_0, rows, cols, n, 100 + i as u64);
        }
    }

    #[test]
    fn q4_k_q5_k_and_q6_k_are_candles_result() {
        // Odd super-block counts (3, 19) included.
        let shapes = [(1, 256, 1), (7, 512, 1), (33, 768, 3), (64, 1536, 1), (17, 4864, 2), (40, 256, 9)];
        for (seed, dtype) in [(300, GgmlDType::Q4K), (400, GgmlDType::Q6K), (600, GgmlDType::Q5K)] {
            for (i, &(rows, cols, n)) in shapes.iter().enumerate() {
                check(dtype, rows, cols, n, seed + i as u64);
            }
        }
    }

    /// Q4_0 runs on Q4_1's kernels with a minimum of −8·d, whose product with
    /// the inputs' f16 sum `s` rounds where candle's integer Σ(q − 8)·x does
    /// not: within 1e-3 of the sum of |terms|, for 1 to 16 inputs (tiles of
    /// sixteen, eight, four and one) and odd block counts.
    #[test]
    fn q4_0_is_candles_result_within_the_sums_rounding() {
        for (seed, &(rows, cols, n)) in [(1, 64, 1), (7, 96, 4), (33, 192, 8), (17, 576, 13), (40, 1536, 16)].iter().enumerate() {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(500 + seed as u64);
            let (q, ours) = random_quantized(&mut rng, GgmlDType::Q4_0, rows, cols);
            assert_eq!(ours.format(), BlockFormat::Q4_1);
            let xs = random(&mut rng, n * cols);
            let x = Tensor::from_vec(xs.clone(), (n, cols), &Device::Cpu).unwrap();
            let want: Vec<f32> = candle_core::quantized::QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let dense = ours_dense(&ours);
            for (i, (a, b)) in ours.matmul_t(&xs, n).iter().zip(&want).enumerate() {
                let (row, out) = (i / rows, i % rows);
                let magnitude: f32 = dense[out * cols..(out + 1) * cols].iter().zip(&xs[row * cols..(row + 1) * cols]).map(|(w, x)| (w * x).abs()).sum();
                assert!((a - b).abs() <= 1e-3 * magnitude.max(1.0), "{rows}x{cols} n={n}: element {i}: ours {a}, candle {b}");
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_batched() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (rows, cols) = (48, 256);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let (_, m) = random_quantized(&mut rng, dtype, rows, cols);
            // Two to fifteen inputs: every rest after a tile of eight, with
            // and without one before it.
            let xs = random(&mut rng, 15 * cols);
            let alone: Vec<Vec<f32>> = (0..15).map(|i| m.matmul_t(&xs[i * cols..(i + 1) * cols], 1)).collect();
            for n in 2..=15 {
                let batched = m.matmul_t(&xs[..n * cols], n);
                for (i, row) in alone.iter().take(n).enumerate() {
                    assert_eq!(row[..], batched[i * rows..(i + 1) * rows], "{dtype:?}: input {i} of {n}");
                }
            }
        }
    }

    /// Where the CPU has AVX-512 VNNI, the VNNI kernels (every format) give
    /// the AVX2 kernels' bits, in every tile size.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_kernels_give_the_avx2_bits() {
        if Kernel::detect() != (Kernel::Avx2 { vnni: true }) {
            eprintln!("this CPU has no AVX-512 VNNI: only the AVX2 kernels run here");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        for (dtype, rows, cols) in [(GgmlDType::Q4_0, 23, 288), (GgmlDType::Q4_1, 40, 320), (GgmlDType::Q5_0, 17, 896), (GgmlDType::Q5_1, 19, 320), (GgmlDType::Q8_0, 33, 576), (GgmlDType::Q4K, 21, 768), (GgmlDType::Q5K, 11, 1024), (GgmlDType::Q6K, 19, 512)] {
            let (_, m) = random_quantized(&mut rng, dtype, rows, cols);
            let xs = random(&mut rng, 15 * cols);
            let with_vnni: Vec<Vec<f32>> = (1..=15).map(|n| m.matmul_t(&xs[..n * cols], n)).collect();
            let avx2 = QuantMatrix { kernel: Kernel::Avx2 { vnni: false }, ..m };
            for (n, want) in (1..=15).zip(&with_vnni) {
                assert_eq!(&avx2.matmul_t(&xs[..n * cols], n), want, "{dtype:?}, {n} inputs");
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
        let matrices: Vec<QuantMatrix> = [(GgmlDType::Q4_1, 30), (GgmlDType::Q8_0, 17), (GgmlDType::Q4K, 13), (GgmlDType::Q5_0, 9), (GgmlDType::Q6K, 6), (GgmlDType::Q5K, 18), (GgmlDType::Q5_1, 7)]
            .into_iter()
            .map(|(dtype, rows)| random_quantized(&mut rng, dtype, rows, cols).1)
            .collect();
        for n in [1, 2, 6, 13] {
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
        for (cols, dtype) in [(96, GgmlDType::Q4_0), (512, GgmlDType::Q4_0), (96, GgmlDType::Q4_1), (512, GgmlDType::Q4_1), (96, GgmlDType::Q5_0), (512, GgmlDType::Q5_0), (96, GgmlDType::Q5_1), (512, GgmlDType::Q5_1), (96, GgmlDType::Q8_0), (768, GgmlDType::Q4K), (768, GgmlDType::Q5K), (768, GgmlDType::Q6K)] {
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
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let (q, m) = random_quantized(&mut rng, dtype, rows, cols);
            let want: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<f32> = (0..rows).flat_map(|r| m.dequantize_row(r)).collect();
            assert_eq!(got, want, "{dtype:?}");
        }
    }

    #[test]
    fn activations_quantize_to_the_same_bytes_on_every_kernel() {
        // Random blocks, and ones built to land on halves (x · (1/d) = k + 0.5)
        // and on whole numbers.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let mut blocks: Vec<Vec<f32>> = (0..200).map(|_| random(&mut rng, QK).into_iter().map(|x| x * 3.0).collect()).collect();
        blocks.push((0..QK).map(|j| j as f32 - 15.5).collect());
        blocks.push((0..QK).map(|j| (j as f32 - 16.0) * 4.0).collect());
        blocks.push(vec![0.0; QK]);
        blocks.push((0..QK).map(|j| if j == 3 { -127.0 } else { 0.5 * j as f32 }).collect());
        for block in &blocks {
            let (mut want, mut got) = ([0i8; QK], [0i8; QK]);
            let a = quantize_block(Kernel::Scalar, block, &mut want);
            let b = quantize_block(Kernel::detect(), block, &mut got);
            assert_eq!((a, want), (b, got), "block {block:?}");
        }
    }

    #[test]
    fn super_blocks_quantize_to_the_same_bytes_on_every_kernel() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(14);
        let mut xs: Vec<f32> = random(&mut rng, 40 * QK_K).into_iter().map(|x| x * 5.0).collect();
        // Blocks whose largest magnitude comes twice with both signs, ties at
        // halves of the step, and an all-zero block.
        xs.extend((0..QK_K).map(|j| if j == 7 { 2.0 } else if j == 9 { -2.0 } else { (j as f32 - 128.0) / 64.0 }));
        xs.extend((0..QK_K).map(|j| if j == 0 { -127.0 } else { j as f32 % 64.0 - 31.5 }));
        xs.extend(vec![0.0; QK_K]);
        let (scalar, detected) = (SuperRows::with_kernel(&xs, Kernel::Scalar), SuperRows::with_kernel(&xs, Kernel::detect()));
        assert_eq!((&scalar.d, &scalar.sums16, &scalar.sums32, &scalar.qs), (&detected.d, &detected.sums16, &detected.sums32, &detected.qs));
    }

    #[test]
    fn many_rows_quantize_on_the_pool_to_the_bytes_of_one_thread() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        let (n, cols) = (47, 768);
        let xs = random(&mut rng, n * cols);
        assert!(xs.len() >= SHARED_QUANTIZING_FROM, "enough values to be shared");
        let (mut shared, mut here) = (QuantizedRows::default(), QuantizedRows::default());
        shared.quantize(&xs, cols, true, true);
        here.quantize_sharing(&xs, cols, true, true, false);
        assert_eq!((&shared.d, &shared.sum, &shared.s, &shared.qs), (&here.d, &here.sum, &here.s, &here.qs));
        assert_eq!((&shared.k.d, &shared.k.sums16, &shared.k.sums32, &shared.k.qs), (&here.k.d, &here.k.sums16, &here.k.sums32, &here.k.qs));
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert!(QuantMatrix::new(BlockFormat::Q4_1, 2, 48, &[0; 40]).is_err());
        assert!(QuantMatrix::new(BlockFormat::Q5_0, 2, 64, &[0; 87]).is_err());
        assert!(QuantMatrix::new(BlockFormat::Q4K, 1, 128, &[0; 72]).is_err());
        assert!(QuantMatrix::new(BlockFormat::Q6K, 1, 256, &[0; 209]).is_err());
    }
}

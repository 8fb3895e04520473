//! The 32-value formats (Q4_1, Q5_0, Q5_1, Q8_0) repacked sixteen weight rows at a
//! time, so that one vector's lanes are the rows' sums and no lane ever needs
//! a horizontal sum.
//!
//! A panel holds one block (32 values) of sixteen rows. Its quantized values
//! are four (nibble formats) or eight (Q8_0) 64-byte vectors; in vector c,
//! bytes 4r..4r+4 are row r's values 4c..4c+4 (Q8_0), or, for the nibble
//! formats, bytes 4c..4c+4 of row r's 16, whose low nibbles are values
//! 4c..4c+4 and high nibbles values 16+4c..16+4c+4. So chunk c of the input
//! (four values, broadcast to every lane) meets each row's own four values in
//! one `vpdpbusd` on a 512-bit vector, or, in the AVX2 kernels, each half of
//! the panel (eight rows, a 256-bit vector's bytes) in one `maddubs`; the
//! scalar kernel goes row by row. Q8_0's values are kept plus 128, unsigned,
//! because `vpdpbusd` takes one side unsigned: the 128 · Σx this adds comes
//! off as the sums' starting value, as Q5_0's −16 does (AVX2 flips the top
//! bit back, one `xor` per weight vector). Beside the values, per panel: the
//! rows' sixteen scales (f16), Q4_1's and Q5_1's sixteen minimums, and Q5_0's and Q5_1's fifth bits
//! as one 64-byte plane whose byte 4r+k holds, in bit c, the fifth bit of row
//! r's value 4c+k (one shift and one mask put chunk c's bits in place). The
//! bytes are GGUF's, moved: sixteen rows take what sixteen GGUF blocks take.
//! Rows past the last group of sixteen are zeros (their results are never
//! written).
//!
//! Each (row, block) integer dot product is exact, and its float expression is
//! candle's, in candle's order, block after block: `((sumi·d)·d_x) + m·s` for
//! Q4_1 and Q5_1, `(sumi·d)·d_x` for Q5_0 (sumi counts the −16) and Q8_0. The AVX2
//! kernels do it in eight lanes at once (one half of a panel per pass), the
//! AVX-512 VNNI kernels in sixteen, the scalar kernel one lane at a time: all
//! give candle's scalar bits, for one input or many.

use half::f16;

use super::lines::LineBytes;
use super::{Activations, BlockFormat, QK};

/// Weight rows per panel: the i32 lanes of a 512-bit vector.
pub const ROWS: usize = 16;

/// Weight rows per AVX2 pass, half a panel: the i32 lanes of a 256-bit
/// vector.
pub const HALF: usize = ROWS / 2;

/// Bytes of one quantized-value vector: four bytes of each row.
const VECTOR: usize = 4 * ROWS;

pub struct Panels {
    format: BlockFormat,
    /// Blocks per row.
    nb: usize,
    /// Per panel (group after group, each group's blocks in order): the values.
    values: LineBytes,
    /// Per panel: the sixteen rows' scales.
    scales: Vec<f16>,
    /// Q4_1 and Q5_1, per panel: the sixteen rows' minimums (empty otherwise).
    minimums: Vec<f16>,
    /// Q5_0 and Q5_1, per panel: the 64-byte plane of fifth bits (empty otherwise).
    fifth_bits: LineBytes,
}

/// Where value `v` (0..32) of row `r` sits in a panel: its byte, and for the
/// nibble formats whether it is the high nibble.
fn place(format: BlockFormat, r: usize, v: usize) -> (usize, bool) {
    match format {
        BlockFormat::Q8_0 => ((v / 4) * VECTOR + r * 4 + v % 4, false),
        _ => (((v % 16) / 4) * VECTOR + r * 4 + v % 4, v >= 16),
    }
}

fn panel_bytes(format: BlockFormat) -> usize {
    if format == BlockFormat::Q8_0 { ROWS * QK } else { ROWS * QK / 2 }
}

/// Q8_0's values are kept as `w + 128` (unsigned); flipping the top bit
/// adds or takes off the 128.
const Q8_0_BIAS: u8 = 0x80;

/// Two halves' results as one group's: `[input][row]`.
pub fn join_halves<const X: usize>(first: [[f32; HALF]; X], second: [[f32; HALF]; X]) -> [[f32; ROWS]; X] {
    std::array::from_fn(|i| std::array::from_fn(|r| if r < HALF { first[i][r] } else { second[i][r - HALF] }))
}

impl Panels {
    /// Zeros for `rows` rows of `nb` blocks, to be filled by `put_row`.
    pub fn zeros(format: BlockFormat, rows: usize, nb: usize) -> Panels {
        let panels = rows.div_ceil(ROWS) * nb;
        Panels {
            format,
            nb,
            values: LineBytes::filled(if format == BlockFormat::Q8_0 { Q8_0_BIAS } else { 0 }, panels * panel_bytes(format)),
            scales: vec![f16::ZERO; panels * ROWS],
            minimums: if format.has_minimum() { vec![f16::ZERO; panels * ROWS] } else { Vec::new() },
            fifth_bits: LineBytes::filled(0, if format.has_fifth_bits() { panels * VECTOR } else { 0 }),
        }
    }

    /// Row `row` from its `nb` GGUF blocks.
    pub fn put_row(&mut self, row: usize, blocks: &[u8]) {
        let (format, pb) = (self.format, panel_bytes(self.format));
        let (g, r) = (row / ROWS, row % ROWS);
        let half_at = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]);
        for (b, block) in blocks.chunks_exact(format.block_bytes()).enumerate() {
            let panel = g * self.nb + b;
            let values = &mut self.values[panel * pb..(panel + 1) * pb];
            self.scales[panel * ROWS + r] = half_at(block, 0);
            let (quantized, bias) = match format {
                BlockFormat::Q4_1 => {
                    self.minimums[panel * ROWS + r] = half_at(block, 2);
                    (&block[4..20], 0)
                }
                BlockFormat::Q5_0 | BlockFormat::Q5_1 => {
                    // Q5_1: d, m, then Q5_0's fifth bits and nibbles.
                    let at = if format == BlockFormat::Q5_1 {
                        self.minimums[panel * ROWS + r] = half_at(block, 2);
                        4
                    } else {
                        2
                    };
                    let high = u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]]);
                    let plane = &mut self.fifth_bits[panel * VECTOR..(panel + 1) * VECTOR];
                    for v in 0..QK {
                        plane[r * 4 + v % 4] |= (((high >> v) & 1) as u8) << (v / 4);
                    }
                    (&block[at + 4..at + 20], 0)
                }
                BlockFormat::Q8_0 => (&block[2..34], Q8_0_BIAS),
                BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K => unreachable!("super-blocks are not panelled"),
                BlockFormat::Q4_0 => unreachable!("Q4_0 is read as Q4_1"),
            };
            // Nibble bytes and Q8_0 values alike: byte j goes where value j does.
            for (j, &byte) in quantized.iter().enumerate() {
                values[place(format, r, j).0] = byte ^ bias;
            }
        }
    }

    /// Bytes held.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.values.len() + 2 * (self.scales.len() + self.minimums.len()) + self.fifth_bits.len()
    }

    /// Row `row`'s quantized value `v` of block `b`, as an integer (Q5_0's
    /// without its −16).
    fn value(&self, row: usize, b: usize, v: usize) -> i32 {
        let panel = (row / ROWS) * self.nb + b;
        let (at, high) = place(self.format, row % ROWS, v);
        let byte = self.values[panel * panel_bytes(self.format) + at];
        match self.format {
            BlockFormat::Q8_0 => (byte ^ Q8_0_BIAS) as i8 as i32,
            BlockFormat::Q5_0 | BlockFormat::Q5_1 => {
                let nibble = (if high { byte >> 4 } else { byte & 0x0F }) as i32;
                let bit = (self.fifth_bits[panel * VECTOR + (row % ROWS) * 4 + v % 4] >> (v / 4)) & 1;
                (nibble | (bit as i32) << 4) - if self.format == BlockFormat::Q5_0 { 16 } else { 0 }
            }
            _ => (if high { byte >> 4 } else { byte & 0x0F }) as i32,
        }
    }

    /// Row `row` as f32 values, as candle dequantizes it.
    pub fn dequantize_row(&self, row: usize, out: &mut Vec<f32>) {
        let (g, r) = (row / ROWS, row % ROWS);
        for b in 0..self.nb {
            let panel = g * self.nb + b;
            let d = self.scales[panel * ROWS + r].to_f32();
            match self.format {
                BlockFormat::Q4_1 | BlockFormat::Q5_1 => {
                    let m = self.minimums[panel * ROWS + r].to_f32();
                    out.extend((0..QK).map(|v| self.value(row, b, v) as f32 * d + m));
                }
                _ => out.extend((0..QK).map(|v| self.value(row, b, v) as f32 * d)),
            }
        }
    }

    /// Group `g`'s sixteen rows dotted with each input: `[input][row]`.
    #[inline(always)]
    pub fn group_times<const X: usize>(&self, g: usize, xs: [&Activations<'_>; X], kernel: super::Kernel) -> [[f32; ROWS]; X] {
        assert!(xs.iter().all(|x| x.qs.len() >= self.nb * QK && x.d.len() >= self.nb && x.s.len() >= self.nb && x.sum.len() >= self.nb));
        assert!((g + 1) * self.nb * ROWS <= self.scales.len(), "group past the matrix");
        match kernel {
            super::Kernel::Scalar => xs.map(|x| std::array::from_fn(|r| self.scalar_dot(g * ROWS + r, x))),
            // SAFETY: `Kernel::detect` saw AVX2, FMA and F16C (and with `vnni`,
            // AVX-512 F, BW and VNNI); the lengths are checked above.
            #[cfg(target_arch = "x86_64")]
            super::Kernel::Avx2 { vnni: true } => unsafe {
                match self.format {
                    BlockFormat::Q4_1 => vnni::group_q4_1(self, g, xs),
                    // And GFNI, where `has_gfni` saw it.
                    BlockFormat::Q5_0 if crate::model::kernel::has_gfni() => vnni::group_q5_gfni::<false, X>(self, g, xs),
                    BlockFormat::Q5_1 if crate::model::kernel::has_gfni() => vnni::group_q5_gfni::<true, X>(self, g, xs),
                    BlockFormat::Q5_0 => vnni::group_q5::<false, X>(self, g, xs),
                    BlockFormat::Q5_1 => vnni::group_q5::<true, X>(self, g, xs),
                    _ => vnni::group_q8_0(self, g, xs),
                }
            },
            #[cfg(target_arch = "x86_64")]
            super::Kernel::Avx2 { vnni: false } => unsafe {
                let half = |h| match self.format {
                    BlockFormat::Q4_1 => avx2::group_q4_1(self, g, h, xs),
                    BlockFormat::Q5_0 => avx2::group_q5::<false, X>(self, g, h, xs),
                    BlockFormat::Q5_1 => avx2::group_q5::<true, X>(self, g, h, xs),
                    _ => avx2::group_q8_0(self, g, h, xs),
                };
                join_halves(half(0), half(1))
            },
        }
    }

    /// One row's dot product, block after block in candle's expression.
    fn scalar_dot(&self, row: usize, x: &Activations<'_>) -> f32 {
        let panel0 = (row / ROWS) * self.nb;
        let mut sum = 0f32;
        for b in 0..self.nb {
            let sumi: i32 = (0..QK).map(|v| self.value(row, b, v) * x.qs[b * QK + v] as i32).sum();
            let d = self.scales[(panel0 + b) * ROWS + row % ROWS].to_f32();
            sum += match self.format {
                BlockFormat::Q4_1 | BlockFormat::Q5_1 => sumi as f32 * d * x.d[b] + self.minimums[(panel0 + b) * ROWS + row % ROWS].to_f32() * x.s[b],
                _ => sumi as f32 * d * x.d[b],
            };
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::model::kernel::avx2::{broadcast4, load};
    use crate::model::kernel::Value;

    /// Chunk c (four values) of an input block, in every lane.
    #[inline(always)]
    unsafe fn chunk(x: *const i8, c: usize) -> __m256i {
        broadcast4(x.add(4 * c) as *const u8)
    }

    /// `(sumi·d)·d_x`, lane by lane, as candle rounds it.
    #[inline(always)]
    unsafe fn scaled(sumi: __m256i, d: __m256, dx: f32) -> __m256 {
        _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sumi), d), _mm256_set1_ps(dx))
    }

    #[inline(always)]
    unsafe fn rows_out<const X: usize>(acc: [__m256; X]) -> [[f32; HALF]; X] {
        acc.map(|a| {
            let mut out = [0f32; HALF];
            _mm256_storeu_ps(out.as_mut_ptr(), a);
            out
        })
    }

    /// Half `h` of panel `panel`: its first vector's bytes (the others follow
    /// one `VECTOR` apart), and the index of its first scale.
    #[inline(always)]
    unsafe fn half_at(p: &Panels, panel: usize, h: usize) -> (*const u8, usize) {
        (p.values.as_ptr().add(panel * panel_bytes(p.format) + 32 * h), panel * ROWS + HALF * h)
    }

    /// Q4_1: w < 16, so all eight chunks sum in i16 (8 · 2 · 15 · 127 < 2^15).
    /// Chunk by chunk, each unpacked vector meets every input before the
    /// next is unpacked: X sums and X accumulators stay in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_q4_1<const X: usize>(p: &Panels, g: usize, h: usize, xs: [&Activations<'_>; X]) -> [[f32; HALF]; X] {
        let (ones, low) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x0F));
        let mut acc = [_mm256_setzero_ps(); X];
        for b in 0..p.nb {
            let (at, scale_at) = half_at(p, g * p.nb + b, h);
            let x: [*const i8; X] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK));
            let mut s = [_mm256_setzero_si256(); X];
            for c in 0..4 {
                let raw = load(at.add(VECTOR * c));
                let (lo, hi) = (_mm256_and_si256(raw, low), _mm256_and_si256(_mm256_srli_epi16(raw, 4), low));
                for i in 0..X {
                    let pair = _mm256_add_epi16(_mm256_maddubs_epi16(lo, chunk(x[i], c)), _mm256_maddubs_epi16(hi, chunk(x[i], c + 4)));
                    s[i] = _mm256_add_epi16(s[i], pair);
                }
            }
            let d = f16::load8(p.scales.as_ptr().add(scale_at));
            let m = f16::load8(p.minimums.as_ptr().add(scale_at));
            for i in 0..X {
                let term = scaled(_mm256_madd_epi16(s[i], ones), d, *xs[i].d.get_unchecked(b));
                let term = _mm256_add_ps(term, _mm256_mul_ps(m, _mm256_set1_ps(*xs[i].s.get_unchecked(b))));
                acc[i] = _mm256_add_ps(acc[i], term);
            }
        }
        rows_out(acc)
    }

    /// Four Q5_0 chunks (`v`, the input's chunks `c`) into each input's i32
    /// sums, through one i16 sum per input.
    #[inline(always)]
    unsafe fn half_q5_0<const X: usize>(v: [__m256i; 4], c: [usize; 4], x: [*const i8; X], sumi: &mut [__m256i; X], ones: __m256i) {
        for i in 0..X {
            let s = _mm256_add_epi16(
                _mm256_add_epi16(_mm256_maddubs_epi16(v[0], chunk(x[i], c[0])), _mm256_maddubs_epi16(v[1], chunk(x[i], c[1]))),
                _mm256_add_epi16(_mm256_maddubs_epi16(v[2], chunk(x[i], c[2])), _mm256_maddubs_epi16(v[3], chunk(x[i], c[3]))),
            );
            sumi[i] = _mm256_add_epi32(sumi[i], _mm256_madd_epi16(s, ones));
        }
    }

    /// Q5_0 and (`MIN`) Q5_1: the values with their fifth bits are unsigned
    /// (< 32); Q5_0's −16 is taken off the integer sum as 16 · Σx, Q5_1's
    /// minimum added as Q4_1's is. Four chunks fit in i16
    /// (4 · 2 · 31 · 127 < 2^15), so each half block's four unpacked vectors
    /// meet every input and are widened to i32 before the next half.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_q5<const MIN: bool, const X: usize>(p: &Panels, g: usize, h: usize, xs: [&Activations<'_>; X]) -> [[f32; HALF]; X] {
        let (ones, low, bit4) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
        let mut acc = [_mm256_setzero_ps(); X];
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let (at, scale_at) = half_at(p, panel, h);
            let x: [*const i8; X] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK));
            // Chunk c's fifth bits are bit c of the plane's bytes: moved to bit 4.
            let fifth = load(p.fifth_bits.as_ptr().add(panel * VECTOR + 32 * h));
            let five = |nibbles: __m256i, placed: __m256i| _mm256_or_si256(_mm256_and_si256(nibbles, low), _mm256_and_si256(placed, bit4));
            let mut sumi: [__m256i; X] = std::array::from_fn(|i| _mm256_set1_epi32(if MIN { 0 } else { -16 * *xs[i].sum.get_unchecked(b) }));
            let (raw0, raw1) = (load(at), load(at.add(VECTOR)));
            let first = [
                five(raw0, _mm256_slli_epi16(fifth, 4)),
                five(raw1, _mm256_slli_epi16(fifth, 3)),
                five(_mm256_srli_epi16(raw0, 4), fifth),
                five(_mm256_srli_epi16(raw1, 4), _mm256_srli_epi16(fifth, 1)),
            ];
            half_q5_0(first, [0, 1, 4, 5], x, &mut sumi, ones);
            let (raw2, raw3) = (load(at.add(2 * VECTOR)), load(at.add(3 * VECTOR)));
            let second = [
                five(raw2, _mm256_slli_epi16(fifth, 2)),
                five(raw3, _mm256_slli_epi16(fifth, 1)),
                five(_mm256_srli_epi16(raw2, 4), _mm256_srli_epi16(fifth, 2)),
                five(_mm256_srli_epi16(raw3, 4), _mm256_srli_epi16(fifth, 3)),
            ];
            half_q5_0(second, [2, 3, 6, 7], x, &mut sumi, ones);
            let d = f16::load8(p.scales.as_ptr().add(scale_at));
            for i in 0..X {
                let mut term = scaled(sumi[i], d, *xs[i].d.get_unchecked(b));
                if MIN {
                    let m = f16::load8(p.minimums.as_ptr().add(scale_at));
                    term = _mm256_add_ps(term, _mm256_mul_ps(m, _mm256_set1_ps(*xs[i].s.get_unchecked(b))));
                }
                acc[i] = _mm256_add_ps(acc[i], term);
            }
        }
        rows_out(acc)
    }

    /// Q8_0: signed × signed through the sign trick (|w| times x with w's
    /// sign), each chunk's pairs widened to i32 at once (2 · 127 · 127 fills
    /// i16). Each chunk's weights meet every input before the next is loaded.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_q8_0<const X: usize>(p: &Panels, g: usize, h: usize, xs: [&Activations<'_>; X]) -> [[f32; HALF]; X] {
        let (ones, bias) = (_mm256_set1_epi16(1), _mm256_set1_epi8(Q8_0_BIAS as i8));
        let mut acc = [_mm256_setzero_ps(); X];
        for b in 0..p.nb {
            let (at, scale_at) = half_at(p, g * p.nb + b, h);
            let x: [*const i8; X] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK));
            let mut sumi = [_mm256_setzero_si256(); X];
            for c in 0..8 {
                // The stored values less their 128: the signed weights.
                let w = _mm256_xor_si256(load(at.add(VECTOR * c)), bias);
                let magnitude = _mm256_sign_epi8(w, w);
                for i in 0..X {
                    let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(chunk(x[i], c), w));
                    sumi[i] = _mm256_add_epi32(sumi[i], _mm256_madd_epi16(pairs, ones));
                }
            }
            let d = f16::load8(p.scales.as_ptr().add(scale_at));
            for i in 0..X {
                acc[i] = _mm256_add_ps(acc[i], scaled(sumi[i], d, *xs[i].d.get_unchecked(b)));
            }
        }
        rows_out(acc)
    }
}

/// The same kernels with AVX-512 VNNI on 512-bit vectors, a whole panel
/// (sixteen rows) per pass: each `vpdpbusd` adds four bytes' products
/// straight into sixteen rows' i32 sums, where AVX2 needs `maddubs`, i16
/// sums and a `madd` for eight. The integer sums are the same exact numbers,
/// and the float steps are AVX2's, lane for lane, so the bits are too.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::*;
    use crate::model::kernel::avx512::{broadcast4, join_nibbles, load, load16, moved_bits, moving_bits};

    /// Chunk c (four values) of an input block, in every lane.
    #[inline(always)]
    unsafe fn chunk(x: *const i8, c: usize) -> __m512i {
        broadcast4(x.add(4 * c) as *const u8)
    }

    /// `(sumi·d)·d_x`, lane by lane, as candle rounds it.
    #[inline(always)]
    unsafe fn scaled(sumi: __m512i, d: __m512, dx: f32) -> __m512 {
        _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sumi), d), _mm512_set1_ps(dx))
    }

    #[inline(always)]
    unsafe fn rows_out<const X: usize>(acc: [__m512; X]) -> [[f32; ROWS]; X] {
        acc.map(|a| {
            let mut out = [0f32; ROWS];
            _mm512_storeu_ps(out.as_mut_ptr(), a);
            out
        })
    }

    /// Q4_1: the nibbles are unsigned, so they go into `vpdpbusd` as they are.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn group_q4_1<const X: usize>(p: &Panels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); X];
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let at = p.values.as_ptr().add(panel * panel_bytes(BlockFormat::Q4_1));
            let x: [*const i8; X] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK));
            let mut s = [_mm512_setzero_si512(); X];
            for c in 0..4 {
                let raw = load(at.add(VECTOR * c));
                let (lo, hi) = (_mm512_and_si512(raw, low), _mm512_and_si512(_mm512_srli_epi16(raw, 4), low));
                for i in 0..X {
                    s[i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s[i], lo, chunk(x[i], c)), hi, chunk(x[i], c + 4));
                }
            }
            let d = load16(p.scales.as_ptr().add(panel * ROWS));
            let m = load16(p.minimums.as_ptr().add(panel * ROWS));
            for i in 0..X {
                let term = scaled(s[i], d, *xs[i].d.get_unchecked(b));
                let term = _mm512_add_ps(term, _mm512_mul_ps(m, _mm512_set1_ps(*xs[i].s.get_unchecked(b))));
                acc[i] = _mm512_add_ps(acc[i], term);
            }
        }
        rows_out(acc)
    }

    /// Q5_0 and (`MIN`) Q5_1: the values with their fifth bits are unsigned
    /// (< 32); Q5_0's −16 comes off as 16 · Σx, the sums' starting value,
    /// and Q5_1's minimum is added as Q4_1's is.
    /// With `GFNI`, each fifth bit moves to bit 4 (`moved_bits`) and joins
    /// its nibble (`join_nibbles`): the same bytes as the shifts.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn group_q5<const MIN: bool, const X: usize>(p: &Panels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        q5_times::<MIN, false, X>(p, g, xs)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,gfni")]
    pub unsafe fn group_q5_gfni<const MIN: bool, const X: usize>(p: &Panels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        q5_times::<MIN, true, X>(p, g, xs)
    }

    #[inline(always)]
    unsafe fn q5_times<const MIN: bool, const GFNI: bool, const X: usize>(p: &Panels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        let (low, bit4) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x10));
        let mut acc = [_mm512_setzero_ps(); X];
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let at = p.values.as_ptr().add(panel * panel_bytes(p.format));
            let x: [*const i8; X] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK));
            let fifth = load(p.fifth_bits.as_ptr().add(panel * VECTOR));
            let mut sumi: [__m512i; X] = std::array::from_fn(|i| _mm512_set1_epi32(if MIN { 0 } else { -16 * *xs[i].sum.get_unchecked(b) }));
            for c in 0..4 {
                let raw = load(at.add(VECTOR * c));
                // Chunk c's fifth bits are bit c of the plane's bytes, chunk
                // c + 4's bit c + 4: each moved to bit 4.
                let (lo, hi) = if GFNI {
                    (join_nibbles(raw, moved_bits(fifth, moving_bits(c, 4, 1))), join_nibbles(_mm512_srli_epi16(raw, 4), moved_bits(fifth, moving_bits(c + 4, 4, 1))))
                } else {
                    let (fifth_lo, fifth_hi) = (shift_to_bit4(fifth, c), shift_to_bit4(fifth, c + 4));
                    let lo = _mm512_or_si512(_mm512_and_si512(raw, low), _mm512_and_si512(fifth_lo, bit4));
                    (lo, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(raw, 4), low), _mm512_and_si512(fifth_hi, bit4)))
                };
                for i in 0..X {
                    sumi[i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sumi[i], lo, chunk(x[i], c)), hi, chunk(x[i], c + 4));
                }
            }
            let d = load16(p.scales.as_ptr().add(panel * ROWS));
            for i in 0..X {
                let mut term = scaled(sumi[i], d, *xs[i].d.get_unchecked(b));
                if MIN {
                    let m = load16(p.minimums.as_ptr().add(panel * ROWS));
                    term = _mm512_add_ps(term, _mm512_mul_ps(m, _mm512_set1_ps(*xs[i].s.get_unchecked(b))));
                }
                acc[i] = _mm512_add_ps(acc[i], term);
            }
        }
        rows_out(acc)
    }

    /// `h` shifted so that bit `k` of each byte lands on bit 4 (the bits
    /// that cross into a neighbouring byte are masked off by the caller).
    #[inline(always)]
    unsafe fn shift_to_bit4(h: __m512i, k: usize) -> __m512i {
        match k {
            0 => _mm512_slli_epi16(h, 4),
            1 => _mm512_slli_epi16(h, 3),
            2 => _mm512_slli_epi16(h, 2),
            3 => _mm512_slli_epi16(h, 1),
            4 => h,
            5 => _mm512_srli_epi16(h, 1),
            6 => _mm512_srli_epi16(h, 2),
            _ => _mm512_srli_epi16(h, 3),
        }
    }

    /// Q8_0: the stored values are w + 128, unsigned, so they go into
    /// `vpdpbusd` as they are, and the 128 · Σx they add comes off as the
    /// sums' starting value.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn group_q8_0<const X: usize>(p: &Panels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        let mut acc = [_mm512_setzero_ps(); X];
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let at = p.values.as_ptr().add(panel * panel_bytes(BlockFormat::Q8_0));
            let x: [*const i8; X] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK));
            let mut sumi: [__m512i; X] = std::array::from_fn(|i| _mm512_set1_epi32(-128 * *xs[i].sum.get_unchecked(b)));
            for c in 0..8 {
                let w = load(at.add(VECTOR * c));
                for i in 0..X {
                    sumi[i] = _mm512_dpbusd_epi32(sumi[i], w, chunk(x[i], c));
                }
            }
            let d = load16(p.scales.as_ptr().add(panel * ROWS));
            for i in 0..X {
                acc[i] = _mm512_add_ps(acc[i], scaled(sumi[i], d, *xs[i].d.get_unchecked(b)));
            }
        }
        rows_out(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GFNI's fifth bits give the shifts' bytes, so the same sums, for Q5_0
    /// and Q5_1 in tiles of one and four inputs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn gfni_fifth_bits_give_the_shifts_bits() {
        use super::super::gfni_check::{available, random_inputs, random_rows};
        use rand::SeedableRng;
        if !available() {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
        let nb = 3;
        let quantized = random_inputs(&mut rng, nb * QK, true);
        let inputs: [Activations<'_>; 4] = std::array::from_fn(|i| quantized.row(i));
        for format in [BlockFormat::Q5_0, BlockFormat::Q5_1] {
            let mut panels = Panels::zeros(format, ROWS, nb);
            // Finite scales (and Q5_1's minimums).
            let scales_at: &[usize] = if format == BlockFormat::Q5_1 { &[0, 2] } else { &[0] };
            random_rows(&mut rng, ROWS, nb, format.block_bytes(), scales_at, |r, blocks| panels.put_row(r, blocks));
            // SAFETY: the CPU has AVX-512 VNNI and GFNI (checked above).
            unsafe {
                if format == BlockFormat::Q5_0 {
                    assert_eq!(vnni::group_q5::<false, 4>(&panels, 0, inputs.each_ref()), vnni::group_q5_gfni::<false, 4>(&panels, 0, inputs.each_ref()));
                    assert_eq!(vnni::group_q5::<false, 1>(&panels, 0, [&inputs[1]]), vnni::group_q5_gfni::<false, 1>(&panels, 0, [&inputs[1]]));
                } else {
                    assert_eq!(vnni::group_q5::<true, 4>(&panels, 0, inputs.each_ref()), vnni::group_q5_gfni::<true, 4>(&panels, 0, inputs.each_ref()));
                    assert_eq!(vnni::group_q5::<true, 1>(&panels, 0, [&inputs[1]]), vnni::group_q5_gfni::<true, 1>(&panels, 0, [&inputs[1]]));
                }
            }
        }
    }

    #[test]
    fn panels_take_the_bytes_of_the_gguf_blocks() {
        // Sixteen rows of two blocks each.
        for format in [BlockFormat::Q4_1, BlockFormat::Q5_0, BlockFormat::Q5_1, BlockFormat::Q8_0] {
            let blocks = vec![0u8; ROWS * 2 * format.block_bytes()];
            assert_eq!(Panels::zeros(format, ROWS, 2).bytes(), blocks.len(), "{format:?}");
            // A seventeenth row costs a whole group of zeros.
            assert_eq!(Panels::zeros(format, ROWS + 1, 2).bytes(), 2 * ROWS * 2 * format.block_bytes(), "{format:?}");
        }
    }

    #[test]
    fn each_value_reads_back_from_its_place() {
        // Row 11 (in a panel's second half) of a matrix of three blocks:
        // GGUF blocks whose bytes count up, so every value differs.
        for format in [BlockFormat::Q4_1, BlockFormat::Q5_0, BlockFormat::Q5_1, BlockFormat::Q8_0] {
            let mut panels = Panels::zeros(format, 12, 3);
            let blocks: Vec<u8> = (0..3 * format.block_bytes()).map(|i| (i * 37 % 251) as u8).collect();
            panels.put_row(11, &blocks);
            for b in 0..3 {
                let block = &blocks[b * format.block_bytes()..(b + 1) * format.block_bytes()];
                for v in 0..QK {
                    let expected = match format {
                        BlockFormat::Q8_0 => block[2 + v] as i8 as i32,
                        BlockFormat::Q4_1 => ((block[4 + v % 16] >> (4 * (v / 16))) & 0x0F) as i32,
                        BlockFormat::Q5_1 => {
                            let high = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
                            let nibble = (block[8 + v % 16] >> (4 * (v / 16))) & 0x0F;
                            nibble as i32 | (((high >> v) & 1) as i32) << 4
                        }
                        _ => {
                            let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                            let nibble = (block[6 + v % 16] >> (4 * (v / 16))) & 0x0F;
                            (nibble as i32 | (((high >> v) & 1) as i32) << 4) - 16
                        }
                    };
                    assert_eq!(panels.value(11, b, v), expected, "{format:?}, block {b}, value {v}");
                }
            }
            // The other rows stay zeros (Q5_0's read as −16).
            let zero = if format == BlockFormat::Q5_0 { -16 } else { 0 };
            assert!((0..11).all(|r| (0..QK).all(|v| panels.value(r, 1, v) == zero)), "{format:?}");
        }
    }
}

//! The 32-value formats (Q4_1, Q5_0, Q8_0) repacked eight weight rows at a
//! time, so that one vector's eight lanes are eight rows' sums and no lane
//! ever needs a horizontal sum.
//!
//! A panel holds one block (32 values) of eight rows. Its quantized values
//! are four (nibble formats) or eight (Q8_0) 32-byte vectors; in vector c,
//! bytes 4r..4r+4 are row r's values 4c..4c+4 (Q8_0), or, for the nibble
//! formats, bytes 4c..4c+4 of row r's 16, whose low nibbles are values
//! 4c..4c+4 and high nibbles values 16+4c..16+4c+4. So chunk c of the input
//! (four values, broadcast to every lane) meets each row's own four values in
//! one `maddubs`. Beside the values, per panel: the rows' eight scales (f16),
//! Q4_1's eight minimums, and Q5_0's fifth bits as one 32-byte plane whose
//! byte 4r+k holds, in bit c, the fifth bit of row r's value 4c+k (one shift
//! and one mask put chunk c's bits in place). The bytes are GGUF's, moved:
//! eight rows take what eight GGUF blocks take. Rows past the last group of
//! eight are zeros (their results are never written).
//!
//! Each (row, block) integer dot product is exact, and its float expression is
//! candle's, in candle's order, block after block: `((sumi·d)·d_x) + m·s` for
//! Q4_1, `(sumi·d)·d_x` for Q5_0 (sumi counts the −16) and Q8_0. The AVX2
//! and AVX-512 VNNI kernels do it in eight lanes at once, the scalar kernel
//! one lane at a time: all give candle's scalar bits, for one input or many.

use half::f16;

use super::{Activations, BlockFormat, QK};

/// Weight rows per panel.
pub const ROWS: usize = 8;

pub struct Panels {
    format: BlockFormat,
    /// Blocks per row.
    nb: usize,
    /// Per panel (group after group, each group's blocks in order): the values.
    values: Vec<u8>,
    /// Per panel: the eight rows' scales.
    scales: Vec<f16>,
    /// Q4_1, per panel: the eight rows' minimums (empty otherwise).
    minimums: Vec<f16>,
    /// Q5_0, per panel: the 32-byte plane of fifth bits (empty otherwise).
    fifth_bits: Vec<u8>,
}

/// Where value `v` (0..32) of row `r` sits in a panel: its byte, and for the
/// nibble formats whether it is the high nibble.
fn place(format: BlockFormat, r: usize, v: usize) -> (usize, bool) {
    match format {
        BlockFormat::Q8_0 => ((v / 4) * 32 + r * 4 + v % 4, false),
        _ => (((v % 16) / 4) * 32 + r * 4 + v % 4, v >= 16),
    }
}

fn panel_bytes(format: BlockFormat) -> usize {
    if format == BlockFormat::Q8_0 { 8 * QK } else { 4 * QK }
}

impl Panels {
    /// Zeros for `rows` rows of `nb` blocks, to be filled by `put_row`.
    pub fn zeros(format: BlockFormat, rows: usize, nb: usize) -> Panels {
        let panels = rows.div_ceil(ROWS) * nb;
        Panels {
            format,
            nb,
            values: vec![0; panels * panel_bytes(format)],
            scales: vec![f16::ZERO; panels * ROWS],
            minimums: if format == BlockFormat::Q4_1 { vec![f16::ZERO; panels * ROWS] } else { Vec::new() },
            fifth_bits: if format == BlockFormat::Q5_0 { vec![0; panels * 32] } else { Vec::new() },
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
            let quantized = match format {
                BlockFormat::Q4_1 => {
                    self.minimums[panel * ROWS + r] = half_at(block, 2);
                    &block[4..20]
                }
                BlockFormat::Q5_0 => {
                    let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                    let plane = &mut self.fifth_bits[panel * 32..(panel + 1) * 32];
                    for v in 0..QK {
                        plane[r * 4 + v % 4] |= (((high >> v) & 1) as u8) << (v / 4);
                    }
                    &block[6..22]
                }
                BlockFormat::Q8_0 => &block[2..34],
                BlockFormat::Q4K | BlockFormat::Q6K => unreachable!("super-blocks are not panelled"),
            };
            // Nibble bytes and Q8_0 values alike: byte j goes where value j does.
            for (j, &byte) in quantized.iter().enumerate() {
                values[place(format, r, j).0] = byte;
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
            BlockFormat::Q8_0 => byte as i8 as i32,
            BlockFormat::Q5_0 => {
                let nibble = (if high { byte >> 4 } else { byte & 0x0F }) as i32;
                let bit = (self.fifth_bits[panel * 32 + (row % ROWS) * 4 + v % 4] >> (v / 4)) & 1;
                (nibble | (bit as i32) << 4) - 16
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
                BlockFormat::Q4_1 => {
                    let m = self.minimums[panel * ROWS + r].to_f32();
                    out.extend((0..QK).map(|v| self.value(row, b, v) as f32 * d + m));
                }
                _ => out.extend((0..QK).map(|v| self.value(row, b, v) as f32 * d)),
            }
        }
    }

    /// Group `g`'s eight rows dotted with each input: `[input][row]`.
    pub fn group_times<const X: usize>(&self, g: usize, xs: [&Activations<'_>; X], kernel: super::Kernel) -> [[f32; ROWS]; X] {
        assert!(xs.iter().all(|x| x.qs.len() >= self.nb * QK && x.d.len() >= self.nb && x.s.len() >= self.nb && x.sum.len() >= self.nb));
        assert!((g + 1) * self.nb * ROWS <= self.scales.len(), "group past the matrix");
        match kernel {
            super::Kernel::Scalar => xs.map(|x| std::array::from_fn(|r| self.scalar_dot(g * ROWS + r, x))),
            // SAFETY: `Kernel::detect` saw AVX2, FMA and F16C (and with `vnni`,
            // AVX-512 VNNI and VL); the lengths are checked above.
            #[cfg(target_arch = "x86_64")]
            super::Kernel::Avx2 { vnni: true } => unsafe {
                match self.format {
                    BlockFormat::Q4_1 => vnni::group_q4_1(self, g, xs),
                    BlockFormat::Q5_0 => vnni::group_q5_0(self, g, xs),
                    _ => vnni::group_q8_0(self, g, xs),
                }
            },
            #[cfg(target_arch = "x86_64")]
            super::Kernel::Avx2 { vnni: false } => unsafe {
                match self.format {
                    BlockFormat::Q4_1 => avx2::group_q4_1(self, g, xs),
                    BlockFormat::Q5_0 => avx2::group_q5_0(self, g, xs),
                    _ => avx2::group_q8_0(self, g, xs),
                }
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
                BlockFormat::Q4_1 => sumi as f32 * d * x.d[b] + self.minimums[(panel0 + b) * ROWS + row % ROWS].to_f32() * x.s[b],
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
    pub(super) unsafe fn chunk(x: *const i8, c: usize) -> __m256i {
        broadcast4(x.add(4 * c) as *const u8)
    }

    /// `(sumi·d)·d_x`, lane by lane, as candle rounds it.
    #[inline(always)]
    pub(super) unsafe fn scaled(sumi: __m256i, d: __m256, dx: f32) -> __m256 {
        _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sumi), d), _mm256_set1_ps(dx))
    }

    #[inline(always)]
    pub(super) unsafe fn rows_out<const X: usize>(acc: [__m256; X]) -> [[f32; ROWS]; X] {
        acc.map(|a| {
            let mut out = [0f32; ROWS];
            _mm256_storeu_ps(out.as_mut_ptr(), a);
            out
        })
    }

    /// Q4_1: w < 16, so all eight chunks sum in i16 (8 · 2 · 15 · 127 < 2^15).
    /// Chunk by chunk, each unpacked vector meets every input before the
    /// next is unpacked: X sums and X accumulators stay in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_q4_1<const X: usize>(p: &Panels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        let (ones, low) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x0F));
        let mut acc = [_mm256_setzero_ps(); X];
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let at = p.values.as_ptr().add(panel * 4 * QK);
            let x: [*const i8; X] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK));
            let mut s = [_mm256_setzero_si256(); X];
            for c in 0..4 {
                let raw = load(at.add(32 * c));
                let (lo, hi) = (_mm256_and_si256(raw, low), _mm256_and_si256(_mm256_srli_epi16(raw, 4), low));
                for i in 0..X {
                    let pair = _mm256_add_epi16(_mm256_maddubs_epi16(lo, chunk(x[i], c)), _mm256_maddubs_epi16(hi, chunk(x[i], c + 4)));
                    s[i] = _mm256_add_epi16(s[i], pair);
                }
            }
            let d = f16::load8(p.scales.as_ptr().add(panel * ROWS));
            let m = f16::load8(p.minimums.as_ptr().add(panel * ROWS));
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

    /// Q5_0: the values with their fifth bits are unsigned (< 32); the −16 is
    /// taken off the integer sum as 16 · Σx. Four chunks fit in i16
    /// (4 · 2 · 31 · 127 < 2^15), so each half block's four unpacked vectors
    /// meet every input and are widened to i32 before the next half.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_q5_0<const X: usize>(p: &Panels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        let (ones, low, bit4) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
        let mut acc = [_mm256_setzero_ps(); X];
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let at = p.values.as_ptr().add(panel * 4 * QK);
            let x: [*const i8; X] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK));
            // Chunk c's fifth bits are bit c of the plane's bytes: moved to bit 4.
            let h = load(p.fifth_bits.as_ptr().add(panel * 32));
            let five = |nibbles: __m256i, placed: __m256i| _mm256_or_si256(_mm256_and_si256(nibbles, low), _mm256_and_si256(placed, bit4));
            let mut sumi: [__m256i; X] = std::array::from_fn(|i| _mm256_set1_epi32(-16 * *xs[i].sum.get_unchecked(b)));
            let (raw0, raw1) = (load(at), load(at.add(32)));
            let first = [
                five(raw0, _mm256_slli_epi16(h, 4)),
                five(raw1, _mm256_slli_epi16(h, 3)),
                five(_mm256_srli_epi16(raw0, 4), h),
                five(_mm256_srli_epi16(raw1, 4), _mm256_srli_epi16(h, 1)),
            ];
            half_q5_0(first, [0, 1, 4, 5], x, &mut sumi, ones);
            let (raw2, raw3) = (load(at.add(64)), load(at.add(96)));
            let second = [
                five(raw2, _mm256_slli_epi16(h, 2)),
                five(raw3, _mm256_slli_epi16(h, 1)),
                five(_mm256_srli_epi16(raw2, 4), _mm256_srli_epi16(h, 2)),
                five(_mm256_srli_epi16(raw3, 4), _mm256_srli_epi16(h, 3)),
            ];
            half_q5_0(second, [2, 3, 6, 7], x, &mut sumi, ones);
            let d = f16::load8(p.scales.as_ptr().add(panel * ROWS));
            for i in 0..X {
                acc[i] = _mm256_add_ps(acc[i], scaled(sumi[i], d, *xs[i].d.get_unchecked(b)));
            }
        }
        rows_out(acc)
    }

    /// Q8_0: signed × signed through the sign trick (|w| times x with w's
    /// sign), each chunk's pairs widened to i32 at once (2 · 127 · 127 fills
    /// i16). Each chunk's weights meet every input before the next is loaded.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_q8_0<const X: usize>(p: &Panels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); X];
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let at = p.values.as_ptr().add(panel * 8 * QK);
            let x: [*const i8; X] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK));
            let mut sumi = [_mm256_setzero_si256(); X];
            for c in 0..8 {
                let w = load(at.add(32 * c));
                let magnitude = _mm256_sign_epi8(w, w);
                for i in 0..X {
                    let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(chunk(x[i], c), w));
                    sumi[i] = _mm256_add_epi32(sumi[i], _mm256_madd_epi16(pairs, ones));
                }
            }
            let d = f16::load8(p.scales.as_ptr().add(panel * ROWS));
            for i in 0..X {
                acc[i] = _mm256_add_ps(acc[i], scaled(sumi[i], d, *xs[i].d.get_unchecked(b)));
            }
        }
        rows_out(acc)
    }
}

/// The same kernels with AVX-512 VNNI on 256-bit vectors: each `vpdpbusd`
/// adds four bytes' products straight into a row's i32 sum, where AVX2 needs
/// `maddubs`, i16 sums and a `madd`. The integer sums are the same exact
/// numbers, and the float steps are AVX2's, so the bits are too.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::avx2::{chunk, rows_out, scaled};
    use super::*;
    use crate::model::kernel::avx2::load;
    use crate::model::kernel::Value;

    /// Q4_1: the nibbles are unsigned, so they go into `vpdpbusd` as they are.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn group_q4_1<const X: usize>(p: &Panels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        let low = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); X];
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let at = p.values.as_ptr().add(panel * 4 * QK);
            let x: [*const i8; X] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK));
            let mut s = [_mm256_setzero_si256(); X];
            for c in 0..4 {
                let raw = load(at.add(32 * c));
                let (lo, hi) = (_mm256_and_si256(raw, low), _mm256_and_si256(_mm256_srli_epi16(raw, 4), low));
                for i in 0..X {
                    s[i] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(s[i], lo, chunk(x[i], c)), hi, chunk(x[i], c + 4));
                }
            }
            let d = f16::load8(p.scales.as_ptr().add(panel * ROWS));
            let m = f16::load8(p.minimums.as_ptr().add(panel * ROWS));
            for i in 0..X {
                let term = scaled(s[i], d, *xs[i].d.get_unchecked(b));
                let term = _mm256_add_ps(term, _mm256_mul_ps(m, _mm256_set1_ps(*xs[i].s.get_unchecked(b))));
                acc[i] = _mm256_add_ps(acc[i], term);
            }
        }
        rows_out(acc)
    }

    /// Q5_0: the values with their fifth bits are unsigned (< 32); the −16
    /// comes off as 16 · Σx, the sums' starting value.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn group_q5_0<const X: usize>(p: &Panels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        let (low, bit4) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
        let mut acc = [_mm256_setzero_ps(); X];
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let at = p.values.as_ptr().add(panel * 4 * QK);
            let x: [*const i8; X] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK));
            let h = load(p.fifth_bits.as_ptr().add(panel * 32));
            let mut sumi: [__m256i; X] = std::array::from_fn(|i| _mm256_set1_epi32(-16 * *xs[i].sum.get_unchecked(b)));
            for c in 0..4 {
                let raw = load(at.add(32 * c));
                // Chunk c's fifth bits are bit c of the plane's bytes, chunk
                // c + 4's bit c + 4: each moved to bit 4.
                let (h_lo, h_hi) = (shift_to_bit4(h, c), shift_to_bit4(h, c + 4));
                let lo = _mm256_or_si256(_mm256_and_si256(raw, low), _mm256_and_si256(h_lo, bit4));
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low), _mm256_and_si256(h_hi, bit4));
                for i in 0..X {
                    sumi[i] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(sumi[i], lo, chunk(x[i], c)), hi, chunk(x[i], c + 4));
                }
            }
            let d = f16::load8(p.scales.as_ptr().add(panel * ROWS));
            for i in 0..X {
                acc[i] = _mm256_add_ps(acc[i], scaled(sumi[i], d, *xs[i].d.get_unchecked(b)));
            }
        }
        rows_out(acc)
    }

    /// `h` shifted so that bit `k` of each byte lands on bit 4 (the bits
    /// that cross into a neighbouring byte are masked off by the caller).
    #[inline(always)]
    unsafe fn shift_to_bit4(h: __m256i, k: usize) -> __m256i {
        match k {
            0 => _mm256_slli_epi16(h, 4),
            1 => _mm256_slli_epi16(h, 3),
            2 => _mm256_slli_epi16(h, 2),
            3 => _mm256_slli_epi16(h, 1),
            4 => h,
            5 => _mm256_srli_epi16(h, 1),
            6 => _mm256_srli_epi16(h, 2),
            _ => _mm256_srli_epi16(h, 3),
        }
    }

    /// Q8_0: signed × signed through the sign trick, as in AVX2.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn group_q8_0<const X: usize>(p: &Panels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        let mut acc = [_mm256_setzero_ps(); X];
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let at = p.values.as_ptr().add(panel * 8 * QK);
            let x: [*const i8; X] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK));
            let mut sumi = [_mm256_setzero_si256(); X];
            for c in 0..8 {
                let w = load(at.add(32 * c));
                let magnitude = _mm256_sign_epi8(w, w);
                for i in 0..X {
                    sumi[i] = _mm256_dpbusd_epi32(sumi[i], magnitude, _mm256_sign_epi8(chunk(x[i], c), w));
                }
            }
            let d = f16::load8(p.scales.as_ptr().add(panel * ROWS));
            for i in 0..X {
                acc[i] = _mm256_add_ps(acc[i], scaled(sumi[i], d, *xs[i].d.get_unchecked(b)));
            }
        }
        rows_out(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_take_the_bytes_of_the_gguf_blocks() {
        // Eight rows of two blocks each.
        for format in [BlockFormat::Q4_1, BlockFormat::Q5_0, BlockFormat::Q8_0] {
            let blocks = vec![0u8; 8 * 2 * format.block_bytes()];
            assert_eq!(Panels::zeros(format, 8, 2).bytes(), blocks.len(), "{format:?}");
            // A ninth row costs a whole group of zeros.
            assert_eq!(Panels::zeros(format, 9, 2).bytes(), 2 * 8 * 2 * format.block_bytes(), "{format:?}");
        }
    }
}

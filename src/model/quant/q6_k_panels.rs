//! Q6_K repacked sixteen weight rows at a time, as `q4_k_panels` does for
//! Q4_K: one 512-bit vector's lanes are sixteen rows' sums (a 256-bit
//! vector's, eight rows': half a panel).
//!
//! A Q6_K super-block (210 bytes, 256 values): 128 bytes of low nibbles, 64
//! bytes of high bit pairs, sixteen i8 scales (one per 16 values), f16 d.
//! Value = d·sc·(q − 32), q = nibble | high pair << 4. In half h (128 values),
//! quarter u (32 values) takes the low (u < 2) or high nibbles of nibble bytes
//! 64h + 32·(u mod 2) + t, and bits 2u, 2u+1 of high byte 32h + t (t < 32).
//!
//! A panel holds one super-block of sixteen rows, in the file's bytes, moved:
//! - nibbles: for each run of 32 nibble bytes (i / 32) and chunk c (0..8), one
//!   64-byte vector whose bytes 4r..4r+4 are row r's bytes 32(i / 32) + 4c..+4;
//! - high pairs: the same for the 64 high bytes (two runs of 32);
//! - scales: bytes 32k + 2r and 32k + 2r + 1 are row r's scales of sub-blocks
//!   2k and 2k + 1 (one i16 pair per row once widened, for `madd`);
//! - d: the sixteen rows' f16 values.
//!
//! Half `side` of a panel (rows 8·side.., for AVX2) is bytes 32·side..+32 of
//! each vector and 16·side..+16 of each pair of scales. 3,360 bytes for
//! sixteen rows' 3,360 in the file.
//!
//! Per super-block and row, one exact integer sum: Σ_s sc_s·Σ q·x over
//! sub-block s, less 32·Σ_s sc_s·(sum of sub-block s's inputs); scaled into
//! the row's float accumulator with one fused multiply-add by d·d_x. The
//! scalar kernel takes the same steps one row at a time, so both give the same
//! bits for one input or many.

use half::f16;

use super::panels::{join_halves, HALF, ROWS};
use super::super_blocks::{Q6_K_BYTES, QK_K};
use super::lines::LineBytes;
use super::Activations;

/// Bytes of one nibble (or high-pair) vector: four of each row.
const VECTOR: usize = 4 * ROWS;

const NIBBLE_BYTES: usize = 128 * ROWS;
const HIGH_BYTES: usize = 64 * ROWS;
const SCALE_BYTES: usize = 16 * ROWS;

pub struct Q6KPanels {
    /// Super-blocks per row.
    nb: usize,
    nibbles: LineBytes,
    highs: LineBytes,
    scales: Vec<i8>,
    d: Vec<f16>,
}

/// Where row r's byte i of a run of nibble (or high) bytes sits in its panel.
fn byte_at(r: usize, i: usize) -> usize {
    (i / 32) * 8 * VECTOR + ((i % 32) / 4) * VECTOR + r * 4 + i % 4
}

/// Where row r's scale of sub-block s sits in its panel.
fn scale_at(r: usize, s: usize) -> usize {
    2 * ROWS * (s / 2) + 2 * r + s % 2
}

impl Q6KPanels {
    /// Zeros for `rows` rows of `nb` super-blocks, to be filled by `put_row`.
    pub fn zeros(rows: usize, nb: usize) -> Q6KPanels {
        let panels = rows.div_ceil(ROWS) * nb;
        Q6KPanels {
            nb,
            nibbles: LineBytes::filled(0, panels * NIBBLE_BYTES),
            highs: LineBytes::filled(0, panels * HIGH_BYTES),
            scales: vec![0; panels * SCALE_BYTES],
            d: vec![f16::ZERO; panels * ROWS],
        }
    }

    /// Row `row` from its `nb` GGUF super-blocks.
    pub fn put_row(&mut self, row: usize, blocks: &[u8]) {
        let (g, r) = (row / ROWS, row % ROWS);
        for (b, block) in blocks.chunks_exact(Q6_K_BYTES).enumerate() {
            let panel = g * self.nb + b;
            let nibbles = &mut self.nibbles[panel * NIBBLE_BYTES..(panel + 1) * NIBBLE_BYTES];
            for (i, &byte) in block[..128].iter().enumerate() {
                nibbles[byte_at(r, i)] = byte;
            }
            let highs = &mut self.highs[panel * HIGH_BYTES..(panel + 1) * HIGH_BYTES];
            for (i, &byte) in block[128..192].iter().enumerate() {
                highs[byte_at(r, i)] = byte;
            }
            for (s, &scale) in block[192..208].iter().enumerate() {
                self.scales[panel * SCALE_BYTES + scale_at(r, s)] = scale as i8;
            }
            self.d[panel * ROWS + r] = f16::from_le_bytes([block[208], block[209]]);
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.nibbles.len() + self.highs.len() + self.scales.len() + 2 * self.d.len()
    }

    /// Row `row`'s super-block `b`: value v (unsigned, 0..64) and its scale.
    fn value(&self, row: usize, b: usize, v: usize) -> (i32, i32) {
        let (panel, r) = ((row / ROWS) * self.nb + b, row % ROWS);
        let (h, u, t) = (v / 128, (v % 128) / 32, v % 32);
        let byte = self.nibbles[panel * NIBBLE_BYTES + byte_at(r, 64 * h + 32 * (u % 2) + t)];
        let nibble = if u < 2 { byte & 0x0F } else { byte >> 4 };
        let high = (self.highs[panel * HIGH_BYTES + byte_at(r, 32 * h + t)] >> (2 * u)) & 3;
        ((nibble | high << 4) as i32, self.scales[panel * SCALE_BYTES + scale_at(r, v / 16)] as i32)
    }

    fn d(&self, row: usize, b: usize) -> f32 {
        self.d[((row / ROWS) * self.nb + b) * ROWS + row % ROWS].to_f32()
    }

    /// Row `row` as f32 values, in candle's expression.
    pub fn dequantize_row(&self, row: usize, out: &mut Vec<f32>) {
        for b in 0..self.nb {
            let d = self.d(row, b);
            out.extend((0..QK_K).map(|v| {
                let (q, sc) = self.value(row, b, v);
                d * sc as f32 * (q - 32) as f32
            }));
        }
    }

    /// Group `g`'s sixteen rows dotted with each input: `[input][row]`.
    #[inline(always)]
    pub fn group_times<const X: usize>(&self, g: usize, xs: [&Activations<'_>; X], kernel: super::Kernel) -> [[f32; ROWS]; X] {
        let nb = self.nb;
        assert!(xs.iter().all(|x| x.k_qs.len() >= nb * QK_K && x.k_d.len() >= nb && x.k_sums16.len() >= 16 * nb));
        assert!((g + 1) * nb * ROWS <= self.d.len(), "group past the matrix");
        match kernel {
            super::Kernel::Scalar => xs.map(|x| std::array::from_fn(|r| self.scalar_dot(g * ROWS + r, x))),
            // SAFETY: `Kernel::detect` saw AVX2, FMA and F16C (and with `vnni`,
            // AVX-512 F, BW and VNNI); the lengths are checked above.
            #[cfg(target_arch = "x86_64")]
            super::Kernel::Avx2 { vnni: true } if crate::model::kernel::has_gfni() => unsafe { vnni::group_times_gfni(self, g, xs) },
            #[cfg(target_arch = "x86_64")]
            super::Kernel::Avx2 { vnni: true } => unsafe { vnni::group_times(self, g, xs) },
            #[cfg(target_arch = "x86_64")]
            super::Kernel::Avx2 { vnni: false } => unsafe { join_halves(avx2::half_times(self, g, 0, xs), avx2::half_times(self, g, 1, xs)) },
        }
    }

    fn scalar_dot(&self, row: usize, x: &Activations<'_>) -> f32 {
        let mut acc = 0f32;
        for b in 0..self.nb {
            let mut sumi = 0i32;
            for s in 0..16 {
                let mut sub = 0i32;
                for v in 16 * s..16 * s + 16 {
                    sub += self.value(row, b, v).0 * x.k_qs[b * QK_K + v] as i32;
                }
                let sc = self.value(row, b, 16 * s).1;
                sumi += sc * (sub - 32 * x.k_sums16[16 * b + s] as i32);
            }
            acc = (sumi as f32).mul_add(self.d(row, b) * x.k_d[b], acc);
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::model::kernel::avx2::{broadcast4, load};
    use crate::model::kernel::Value;

    /// Quarter `U` of a half's chunk: the nibbles of `nibbles` (low for
    /// U < 2, high otherwise) with their high pair from `highs` (bits 2U,
    /// 2U + 1) as bits 4 and 5: unsigned values below 64.
    #[inline(always)]
    unsafe fn values<const U: usize>(nibbles: __m256i, highs: __m256i) -> __m256i {
        let (low, pair) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        let nibble = if U < 2 { nibbles } else { _mm256_srli_epi16(nibbles, 4) };
        let high = match U {
            0 => _mm256_slli_epi16(highs, 4),
            1 => _mm256_slli_epi16(highs, 2),
            2 => highs,
            _ => _mm256_srli_epi16(highs, 2),
        };
        _mm256_or_si256(_mm256_and_si256(nibble, low), _mm256_and_si256(high, pair))
    }

    /// Row r's scale of one sub-block in both i16 halves of lane r, from the
    /// pairs (sub-blocks 2k, 2k + 1) widened to i16: the first of each pair,
    /// or the second.
    #[inline(always)]
    unsafe fn scale_of(pairs: __m256i, second: bool) -> __m256i {
        let high_halves = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        if second {
            _mm256_or_si256(_mm256_srli_epi32(pairs, 16), _mm256_and_si256(pairs, high_halves))
        } else {
            _mm256_or_si256(_mm256_slli_epi32(pairs, 16), _mm256_andnot_si256(high_halves, pairs))
        }
    }

    /// Quarter `U` of half `h` (sub-blocks 8h + 2U and 8h + 2U + 1) into
    /// every input's integer sum. Values below 64 and inputs ≥ −128: two
    /// chunks' pairs sum in i16 (2 · 2 · 63 · 128 < 2^15), then `madd` by the
    /// scale widens them to i32.
    #[inline(always)]
    unsafe fn quarter<const U: usize, const X: usize>(nibbles: *const u8, highs: *const u8, pairs: [__m256i; 8], h: usize, x: [*const u8; X], sumi: &mut [__m256i; X]) {
        let run = 2 * h + U % 2;
        for half_quarter in 0..2 {
            let s = 8 * h + 2 * U + half_quarter;
            let scale = scale_of(pairs[s / 2], s % 2 == 1);
            for c in (4 * half_quarter..4 * half_quarter + 4).step_by(2) {
                let v0 = values::<U>(load(nibbles.add((run * 8 + c) * VECTOR)), load(highs.add((h * 8 + c) * VECTOR)));
                let v1 = values::<U>(load(nibbles.add((run * 8 + c + 1) * VECTOR)), load(highs.add((h * 8 + c + 1) * VECTOR)));
                let at = 128 * h + 32 * U + 4 * c;
                for i in 0..X {
                    let t = _mm256_add_epi16(_mm256_maddubs_epi16(v0, broadcast4(x[i].add(at))), _mm256_maddubs_epi16(v1, broadcast4(x[i].add(at + 4))));
                    sumi[i] = _mm256_add_epi32(sumi[i], _mm256_madd_epi16(t, scale));
                }
            }
        }
    }

    /// Half `side` of group `g` (eight rows) dotted with each input.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn half_times<const X: usize>(p: &Q6KPanels, g: usize, side: usize, xs: [&Activations<'_>; X]) -> [[f32; HALF]; X] {
        let mut acc = [_mm256_setzero_ps(); X];
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let nibbles = p.nibbles.as_ptr().add(panel * NIBBLE_BYTES + 32 * side);
            let highs = p.highs.as_ptr().add(panel * HIGH_BYTES + 32 * side);
            let scales = p.scales.as_ptr().add(panel * SCALE_BYTES + 2 * HALF * side);
            // Pair k: lane r holds row r's scales of sub-blocks 2k and 2k + 1.
            let pairs: [__m256i; 8] = std::array::from_fn(|k| _mm256_cvtepi8_epi16(_mm_loadu_si128(scales.add(2 * ROWS * k) as *const __m128i)));
            let x: [*const u8; X] = std::array::from_fn(|i| xs[i].k_qs.as_ptr().add(b * QK_K) as *const u8);
            // The − 32: 32 · Σ_s sc_s · (sum of sub-block s's inputs), pairs of sub-blocks at a time.
            let mut sumi: [__m256i; X] = std::array::from_fn(|i| {
                let sums = xs[i].k_sums16.as_ptr().add(16 * b) as *const u8;
                let mut offset = _mm256_madd_epi16(pairs[0], broadcast4(sums));
                for (k, &pair) in pairs.iter().enumerate().skip(1) {
                    offset = _mm256_add_epi32(offset, _mm256_madd_epi16(pair, broadcast4(sums.add(4 * k))));
                }
                _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(offset, 5))
            });
            for h in 0..2 {
                quarter::<0, X>(nibbles, highs, pairs, h, x, &mut sumi);
                quarter::<1, X>(nibbles, highs, pairs, h, x, &mut sumi);
                quarter::<2, X>(nibbles, highs, pairs, h, x, &mut sumi);
                quarter::<3, X>(nibbles, highs, pairs, h, x, &mut sumi);
            }
            let d = f16::load8(p.d.as_ptr().add(panel * ROWS + HALF * side));
            for i in 0..X {
                let dx = _mm256_set1_ps(*xs[i].k_d.get_unchecked(b));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[i]), _mm256_mul_ps(d, dx), acc[i]);
            }
        }
        acc.map(|a| {
            let mut out = [0f32; HALF];
            _mm256_storeu_ps(out.as_mut_ptr(), a);
            out
        })
    }
}

/// The same kernel with AVX-512 VNNI on 512-bit vectors, a whole panel
/// (sixteen rows) per pass: a sub-block's four chunks go into each row's
/// i32 sum by `vpdpbusd`, then one `vpmulld` by the row's scale, where AVX2
/// sums pairs of chunks in i16 and widens them by `madd`. The same exact
/// integers, so the same bits.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::*;
    use crate::model::kernel::avx512::{broadcast4, join_nibbles, load, load16, moved_bits, moving_bits};

    /// AVX2's `values` on sixteen rows. With `GFNI`, bits 2U and 2U + 1 of
    /// each byte move to bits 4 and 5 (`moved_bits`) and join the nibble
    /// (`join_nibbles`): the same bytes as the shifts and masks, in two
    /// instructions for four.
    #[inline(always)]
    unsafe fn values<const U: usize, const GFNI: bool>(nibbles: __m512i, highs: __m512i) -> __m512i {
        let (low, pair) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
        let nibble = if U < 2 { nibbles } else { _mm512_srli_epi16(nibbles, 4) };
        if GFNI {
            return join_nibbles(nibble, moved_bits(highs, moving_bits(2 * U, 4, 2)));
        }
        let high = match U {
            0 => _mm512_slli_epi16(highs, 4),
            1 => _mm512_slli_epi16(highs, 2),
            2 => highs,
            _ => _mm512_srli_epi16(highs, 2),
        };
        _mm512_or_si512(_mm512_and_si512(nibble, low), _mm512_and_si512(high, pair))
    }

    /// Quarter `U` of half `h` (sub-blocks 8h + 2U and 8h + 2U + 1) into
    /// every input's integer sum.
    #[inline(always)]
    unsafe fn quarter<const U: usize, const GFNI: bool, const X: usize>(nibbles: *const u8, highs: *const u8, pairs: [__m512i; 8], h: usize, x: [*const u8; X], sumi: &mut [__m512i; X]) {
        let run = 2 * h + U % 2;
        for half_quarter in 0..2 {
            let s = 8 * h + 2 * U + half_quarter;
            // Row r's scale of sub-block s, sign-extended to i32 in lane r.
            let pair = pairs[s / 2];
            let scale = if s % 2 == 1 { _mm512_srai_epi32(pair, 16) } else { _mm512_srai_epi32(_mm512_slli_epi32(pair, 16), 16) };
            let mut sub = [_mm512_setzero_si512(); X];
            for c in 4 * half_quarter..4 * half_quarter + 4 {
                let v = values::<U, GFNI>(load(nibbles.add((run * 8 + c) * VECTOR)), load(highs.add((h * 8 + c) * VECTOR)));
                let at = 128 * h + 32 * U + 4 * c;
                for i in 0..X {
                    sub[i] = _mm512_dpbusd_epi32(sub[i], v, broadcast4(x[i].add(at)));
                }
            }
            for i in 0..X {
                sumi[i] = _mm512_add_epi32(sumi[i], _mm512_mullo_epi32(sub[i], scale));
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn group_times<const X: usize>(p: &Q6KPanels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        panel_times::<false, X>(p, g, xs)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,gfni")]
    pub unsafe fn group_times_gfni<const X: usize>(p: &Q6KPanels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        panel_times::<true, X>(p, g, xs)
    }

    #[inline(always)]
    unsafe fn panel_times<const GFNI: bool, const X: usize>(p: &Q6KPanels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        let mut acc = [_mm512_setzero_ps(); X];
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let nibbles = p.nibbles.as_ptr().add(panel * NIBBLE_BYTES);
            let highs = p.highs.as_ptr().add(panel * HIGH_BYTES);
            let scales = p.scales.as_ptr().add(panel * SCALE_BYTES);
            // Pair k: lane r holds row r's scales of sub-blocks 2k and 2k + 1.
            let pairs: [__m512i; 8] = std::array::from_fn(|k| _mm512_cvtepi8_epi16(_mm256_loadu_si256(scales.add(2 * ROWS * k) as *const __m256i)));
            let x: [*const u8; X] = std::array::from_fn(|i| xs[i].k_qs.as_ptr().add(b * QK_K) as *const u8);
            // The − 32: 32 · Σ_s sc_s · (sum of sub-block s's inputs), pairs of sub-blocks at a time.
            let mut sumi: [__m512i; X] = std::array::from_fn(|i| {
                let sums = xs[i].k_sums16.as_ptr().add(16 * b) as *const u8;
                let mut offset = _mm512_madd_epi16(pairs[0], broadcast4(sums));
                for (k, &pair) in pairs.iter().enumerate().skip(1) {
                    offset = _mm512_add_epi32(offset, _mm512_madd_epi16(pair, broadcast4(sums.add(4 * k))));
                }
                _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(offset, 5))
            });
            for h in 0..2 {
                quarter::<0, GFNI, X>(nibbles, highs, pairs, h, x, &mut sumi);
                quarter::<1, GFNI, X>(nibbles, highs, pairs, h, x, &mut sumi);
                quarter::<2, GFNI, X>(nibbles, highs, pairs, h, x, &mut sumi);
                quarter::<3, GFNI, X>(nibbles, highs, pairs, h, x, &mut sumi);
            }
            let d = load16(p.d.as_ptr().add(panel * ROWS));
            for i in 0..X {
                let dx = _mm512_set1_ps(*xs[i].k_d.get_unchecked(b));
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[i]), _mm512_mul_ps(d, dx), acc[i]);
            }
        }
        acc.map(|a| {
            let mut out = [0f32; ROWS];
            _mm512_storeu_ps(out.as_mut_ptr(), a);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GFNI's high bits give the shifts' bytes, so the same sums, in tiles
    /// of one and four inputs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn gfni_high_bits_give_the_shifts_bits() {
        use super::super::gfni_check::{available, random_inputs, random_rows};
        use rand::SeedableRng;
        if !available() {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(22);
        let (rows, nb) = (16, 2);
        let mut panels = Q6KPanels::zeros(rows, nb);
        random_rows(&mut rng, rows, nb, Q6_K_BYTES, &[Q6_K_BYTES - 2], |r, blocks| panels.put_row(r, blocks));
        let quantized = random_inputs(&mut rng, nb * QK_K, false);
        let inputs: [Activations<'_>; 4] = std::array::from_fn(|i| quantized.row(i));
        // SAFETY: the CPU has AVX-512 VNNI and GFNI (checked above).
        unsafe {
            assert_eq!(vnni::group_times::<4>(&panels, 0, inputs.each_ref()), vnni::group_times_gfni::<4>(&panels, 0, inputs.each_ref()));
            assert_eq!(vnni::group_times::<1>(&panels, 0, [&inputs[3]]), vnni::group_times_gfni::<1>(&panels, 0, [&inputs[3]]));
        }
    }

    #[test]
    fn panels_take_the_files_bytes() {
        // Sixteen rows of two super-blocks: 3,360 bytes a panel, as in the file.
        assert_eq!(Q6KPanels::zeros(16, 2).bytes(), 2 * 16 * Q6_K_BYTES);
    }
}

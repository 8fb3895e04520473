//! Q4_K and Q5_K repacked sixteen weight rows at a time, as `panels` does
//! for the 32-value formats: one 512-bit vector's lanes are sixteen rows'
//! sums (a 256-bit vector's, eight rows': half a panel).
//!
//! A Q4_K super-block (144 bytes, 256 values): f16 d and dmin; 12 bytes
//! packing eight 6-bit scales and eight 6-bit minimums, one of each per 32
//! values (a sub-block); 128 bytes of nibbles, bytes 32p..32p+32 holding
//! values 64p..64p+32 in their low nibbles and 64p+32..64p+64 in their high
//! ones. Value = d·sc·q − dmin·m.
//!
//! A Q5_K super-block (176 bytes) is a Q4_K one with 32 bytes of fifth bits
//! (`qh`) between the scales and the nibbles: bit j of byte l is the fifth
//! bit of value 32j + l, so q = nibble | bit << 4 (0..32).
//!
//! A panel holds one super-block of sixteen rows:
//! - nibbles: for each pair p and chunk c (0..8), one 64-byte vector whose
//!   bytes 4r..4r+4 are row r's nibble bytes 32p+4c..32p+4c+4; the low
//!   nibbles are chunk c of sub-block 2p, the high ones of sub-block 2p+1;
//! - scales: byte 16j+r is row r's scale of sub-block j;
//! - minimums: bytes 32q+2r and 32q+2r+1 are row r's minimums of sub-blocks
//!   2q and 2q+1 (one i16 pair per row once widened, for `madd`);
//! - d and dmin: the sixteen rows' f16 values;
//! - Q5_K's fifth bits: for each chunk c (0..8), one 64-byte vector whose
//!   bytes 4r..4r+4 are row r's `qh` bytes 4c..4c+4, beside chunk c's nibbles.
//!
//! Half h of a panel (rows 8h..8h+8, an AVX2 pass) is bytes 32h..32h+32 of each
//! vector, 8h..8h+8 of each sub-block's scales, 16h..16h+16 of each pair's
//! minimums. 2,368 bytes for sixteen rows' 2,304 in the file (Q5_K: 2,880
//! for 2,816).
//!
//! Per super-block and row, two exact integer sums: Σ_j sc_j·Σ q·x and
//! Σ_j m_j·(sum of sub-block j's inputs); each scaled into its own float
//! accumulator with one fused multiply-add (by d·d_x and dmin·d_x), their
//! difference the result. The scalar kernel takes the same steps one row at a
//! time, so both give the same bits for one input or many.

use half::f16;

use super::panels::{join_halves, HALF, ROWS};
use super::super_blocks::QK_K;
use super::lines::LineBytes;
use super::Activations;

const NIBBLE_BYTES: usize = 128 * ROWS;
/// Q5_K's fifth bits of a panel.
const HIGH_BYTES: usize = 32 * ROWS;
const Q4_K_BYTES: usize = 144;
const Q5_K_BYTES: usize = 176;
/// Bytes of one nibble vector: four of each row.
const VECTOR: usize = 4 * ROWS;
/// Per panel: the scales (or the minimums) of eight sub-blocks.
const SCALE_BYTES: usize = 8 * ROWS;

pub struct Q4KPanels {
    /// Super-blocks per row.
    nb: usize,
    nibbles: LineBytes,
    scales: Vec<u8>,
    minimums: Vec<u8>,
    d: Vec<f16>,
    dmin: Vec<f16>,
    /// Q5_K: the fifth bits (`None` for Q4_K).
    highs: Option<LineBytes>,
}

/// The file's eight 6-bit scales and eight 6-bit minimums, a byte each.
pub fn unpack_scales(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut scales = [0u8; 8];
    let mut minimums = [0u8; 8];
    for j in 0..8 {
        (scales[j], minimums[j]) = if j < 4 {
            (packed[j] & 63, packed[j + 4] & 63)
        } else {
            ((packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))
        };
    }
    (scales, minimums)
}

/// Where row r's nibble byte i (0..128) sits in its panel.
fn nibble_at(r: usize, i: usize) -> usize {
    (i / 32) * 8 * VECTOR + ((i % 32) / 4) * VECTOR + r * 4 + i % 4
}

impl Q4KPanels {
    /// Zeros for `rows` rows of `nb` super-blocks (Q5_K's with `fifth_bits`),
    /// to be filled by `put_row`.
    pub fn zeros(rows: usize, nb: usize, fifth_bits: bool) -> Q4KPanels {
        let panels = rows.div_ceil(ROWS) * nb;
        Q4KPanels {
            nb,
            nibbles: LineBytes::filled(0, panels * NIBBLE_BYTES),
            scales: vec![0; panels * SCALE_BYTES],
            minimums: vec![0; panels * SCALE_BYTES],
            d: vec![f16::ZERO; panels * ROWS],
            dmin: vec![f16::ZERO; panels * ROWS],
            highs: fifth_bits.then(|| LineBytes::filled(0, panels * HIGH_BYTES)),
        }
    }

    /// Row `row` from its `nb` GGUF super-blocks.
    pub fn put_row(&mut self, row: usize, blocks: &[u8]) {
        let (g, r) = (row / ROWS, row % ROWS);
        let block_bytes = if self.highs.is_some() { Q5_K_BYTES } else { Q4_K_BYTES };
        for (b, block) in blocks.chunks_exact(block_bytes).enumerate() {
            let panel = g * self.nb + b;
            self.d[panel * ROWS + r] = f16::from_le_bytes([block[0], block[1]]);
            self.dmin[panel * ROWS + r] = f16::from_le_bytes([block[2], block[3]]);
            let (scales, minimums) = unpack_scales(&block[4..16]);
            for j in 0..8 {
                self.scales[panel * SCALE_BYTES + ROWS * j + r] = scales[j];
                self.minimums[panel * SCALE_BYTES + 2 * ROWS * (j / 2) + 2 * r + j % 2] = minimums[j];
            }
            if let Some(highs) = self.highs.as_mut() {
                let highs = &mut highs[panel * HIGH_BYTES..(panel + 1) * HIGH_BYTES];
                for (l, &byte) in block[16..48].iter().enumerate() {
                    highs[nibble_at(r, l)] = byte;
                }
            }
            let nibbles = &mut self.nibbles[panel * NIBBLE_BYTES..(panel + 1) * NIBBLE_BYTES];
            for (i, &byte) in block[block_bytes - 128..].iter().enumerate() {
                nibbles[nibble_at(r, i)] = byte;
            }
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.nibbles.len() + self.highs.as_ref().map_or(0, |h| h.len()) + self.scales.len() + self.minimums.len() + 2 * (self.d.len() + self.dmin.len())
    }

    /// Row `row`'s super-block `b`: value v's nibble, v's scale and minimum.
    fn value(&self, row: usize, b: usize, v: usize) -> (i32, i32, i32) {
        let (panel, r) = ((row / ROWS) * self.nb + b, row % ROWS);
        let (p, within) = (v / 64, v % 64);
        let byte = self.nibbles[panel * NIBBLE_BYTES + nibble_at(r, 32 * p + within % 32)];
        let mut q = if within < 32 { byte & 0x0F } else { byte >> 4 };
        let j = v / 32;
        if let Some(highs) = &self.highs {
            q |= ((highs[panel * HIGH_BYTES + nibble_at(r, v % 32)] >> j) & 1) << 4;
        }
        (q as i32, self.scales[panel * SCALE_BYTES + ROWS * j + r] as i32, self.minimums[panel * SCALE_BYTES + 2 * ROWS * (j / 2) + 2 * r + j % 2] as i32)
    }

    /// Row `row` as f32 values, in candle's expression.
    pub fn dequantize_row(&self, row: usize, out: &mut Vec<f32>) {
        for b in 0..self.nb {
            let at = (row / ROWS) * self.nb * ROWS + b * ROWS + row % ROWS;
            let (d, dmin) = (self.d[at].to_f32(), self.dmin[at].to_f32());
            out.extend((0..QK_K).map(|v| {
                let (q, sc, m) = self.value(row, b, v);
                d * sc as f32 * q as f32 - dmin * m as f32
            }));
        }
    }

    /// Group `g`'s sixteen rows dotted with each input: `[input][row]`.
    #[inline(always)]
    pub fn group_times<const X: usize>(&self, g: usize, xs: [&Activations<'_>; X], kernel: super::Kernel) -> [[f32; ROWS]; X] {
        let nb = self.nb;
        assert!(xs.iter().all(|x| x.k_qs.len() >= nb * QK_K && x.k_d.len() >= nb && x.k_sums32.len() >= 8 * nb));
        assert!((g + 1) * nb * ROWS <= self.d.len(), "group past the matrix");
        match kernel {
            super::Kernel::Scalar => xs.map(|x| std::array::from_fn(|r| self.scalar_dot(g * ROWS + r, x))),
            // SAFETY: `Kernel::detect` saw AVX2, FMA and F16C (and with `vnni`,
            // AVX-512 F, BW and VNNI); the lengths are checked above.
            #[cfg(target_arch = "x86_64")]
            super::Kernel::Avx2 { vnni: true } => match self.highs {
                None => unsafe { vnni::group_times::<false, X>(self, g, xs) },
                // SAFETY: and GFNI, where `has_gfni` saw it.
                Some(_) if crate::model::kernel::has_gfni() => unsafe { vnni::group_times_gfni::<X>(self, g, xs) },
                Some(_) => unsafe { vnni::group_times::<true, X>(self, g, xs) },
            },
            #[cfg(target_arch = "x86_64")]
            super::Kernel::Avx2 { vnni: false } => match self.highs {
                None => unsafe { join_halves(avx2::half_times::<false, X>(self, g, 0, xs), avx2::half_times::<false, X>(self, g, 1, xs)) },
                Some(_) => unsafe { join_halves(avx2::half_times::<true, X>(self, g, 0, xs), avx2::half_times::<true, X>(self, g, 1, xs)) },
            },
        }
    }

    fn scalar_dot(&self, row: usize, x: &Activations<'_>) -> f32 {
        let (mut acc, mut acc_m) = (0f32, 0f32);
        for b in 0..self.nb {
            let (mut sumi, mut summ) = (0i32, 0i32);
            for j in 0..8 {
                let mut sub = 0i32;
                for v in 32 * j..32 * j + 32 {
                    sub += self.value(row, b, v).0 * x.k_qs[b * QK_K + v] as i32;
                }
                let (_, sc, m) = self.value(row, b, 32 * j);
                sumi += sc * sub;
                summ += m * x.k_sums32[8 * b + j] as i32;
            }
            let at = (row / ROWS) * self.nb * ROWS + b * ROWS + row % ROWS;
            let dx = x.k_d[b];
            acc = (sumi as f32).mul_add(self.d[at].to_f32() * dx, acc);
            acc_m = (summ as f32).mul_add(self.dmin[at].to_f32() * dx, acc_m);
        }
        acc - acc_m
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::model::kernel::avx2::{broadcast4, load};
    use crate::model::kernel::Value;

    /// Bit j of each byte of `highs` moved to bit 4 (j < 8), the rest cleared.
    #[inline(always)]
    unsafe fn fifth_bits(highs: __m256i, j: usize) -> __m256i {
        // Shifting 16-bit lanes is safe here: bit 4 of each byte comes from its own byte.
        let moved = if j <= 4 { _mm256_sll_epi16(highs, _mm_cvtsi32_si128(4 - j as i32)) } else { _mm256_srl_epi16(highs, _mm_cvtsi32_si128(j as i32 - 4)) };
        _mm256_and_si256(moved, _mm256_set1_epi8(0x10))
    }

    /// Half `h` of group `g` (eight rows) dotted with each input; `FIVE`:
    /// Q5_K, the nibbles with their fifth bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn half_times<const FIVE: bool, const X: usize>(p: &Q4KPanels, g: usize, h: usize, xs: [&Activations<'_>; X]) -> [[f32; HALF]; X] {
        let low = _mm256_set1_epi8(0x0F);
        // Values < 16 and inputs ≥ −128: eight chunks' pairs sum in i16
        // (8 · 2 · 15 · 128 < 2^15); Q5_K's values < 32, four chunks.
        let run = if FIVE { 4 } else { 8 };
        let (mut acc, mut acc_m) = ([_mm256_setzero_ps(); X], [_mm256_setzero_ps(); X]);
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let nibbles = p.nibbles.as_ptr().add(panel * NIBBLE_BYTES + 32 * h);
            let highs = p.highs.as_ref().map_or(std::ptr::null(), |hi| hi.as_ptr().add(panel * HIGH_BYTES + 32 * h));
            let (scales, minimums) = (p.scales.as_ptr().add(panel * SCALE_BYTES + HALF * h), p.minimums.as_ptr().add(panel * SCALE_BYTES + 2 * HALF * h));
            let mut sumi = [_mm256_setzero_si256(); X];
            for j in 0..8 {
                let pair = nibbles.add((j / 2) * 8 * VECTOR);
                let x: [*const u8; X] = std::array::from_fn(|i| xs[i].k_qs.as_ptr().add(b * QK_K + 32 * j) as *const u8);
                // Each row's scale in both i16 halves of its lane.
                let sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64(scales.add(ROWS * j) as *const __m128i));
                let sc = _mm256_or_si256(sc, _mm256_slli_epi32(sc, 16));
                // Chunk by chunk, each unpacked vector meets every input before the next.
                for first in (0..8).step_by(run) {
                    let mut s = [_mm256_setzero_si256(); X];
                    for c in first..first + run {
                        let bytes = load(pair.add(VECTOR * c));
                        let mut v = if j % 2 == 0 { _mm256_and_si256(bytes, low) } else { _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low) };
                        if FIVE {
                            v = _mm256_or_si256(v, fifth_bits(load(highs.add(VECTOR * c)), j));
                        }
                        for i in 0..X {
                            s[i] = _mm256_add_epi16(s[i], _mm256_maddubs_epi16(v, broadcast4(x[i].add(4 * c))));
                        }
                    }
                    for i in 0..X {
                        sumi[i] = _mm256_add_epi32(sumi[i], _mm256_madd_epi16(s[i], sc));
                    }
                }
            }
            let minimums: [__m256i; 4] = std::array::from_fn(|q| _mm256_cvtepu8_epi16(_mm_loadu_si128(minimums.add(2 * ROWS * q) as *const __m128i)));
            let (d, dmin) = (f16::load8(p.d.as_ptr().add(panel * ROWS + HALF * h)), f16::load8(p.dmin.as_ptr().add(panel * ROWS + HALF * h)));
            for i in 0..X {
                let sums = xs[i].k_sums32.as_ptr().add(8 * b) as *const u8;
                let mut summ = _mm256_madd_epi16(minimums[0], broadcast4(sums));
                for (q, &minimum) in minimums.iter().enumerate().skip(1) {
                    summ = _mm256_add_epi32(summ, _mm256_madd_epi16(minimum, broadcast4(sums.add(4 * q))));
                }
                let dx = _mm256_set1_ps(*xs[i].k_d.get_unchecked(b));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[i]), _mm256_mul_ps(d, dx), acc[i]);
                acc_m[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(summ), _mm256_mul_ps(dmin, dx), acc_m[i]);
            }
        }
        std::array::from_fn(|i| {
            let mut out = [0f32; HALF];
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(acc[i], acc_m[i]));
            out
        })
    }
}

/// The same kernel with AVX-512 VNNI on 512-bit vectors, a whole panel
/// (sixteen rows) per pass: a sub-block's chunks go into each row's i32 sum
/// by `vpdpbusd`, then one `vpmulld` by the row's scale, where AVX2 sums them
/// in i16 and widens by `madd`. The same exact integers, so the same bits.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::*;
    use crate::model::kernel::avx512::{broadcast4, join_nibbles, load, load16, moved_bits, moving_bits};

    /// AVX2's `fifth_bits` on sixteen rows.
    #[inline(always)]
    unsafe fn fifth_bits(highs: __m512i, j: usize) -> __m512i {
        let moved = if j <= 4 { _mm512_sll_epi16(highs, _mm_cvtsi32_si128(4 - j as i32)) } else { _mm512_srl_epi16(highs, _mm_cvtsi32_si128(j as i32 - 4)) };
        _mm512_and_si512(moved, _mm512_set1_epi8(0x10))
    }

    /// Q5_K: `GFNI` moves each fifth bit to bit 4 (`moved_bits`) and joins
    /// it to its nibble (`join_nibbles`): the same bytes as the shifts.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn group_times<const FIVE: bool, const X: usize>(p: &Q4KPanels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        panel_times::<FIVE, false, X>(p, g, xs)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,gfni")]
    pub unsafe fn group_times_gfni<const X: usize>(p: &Q4KPanels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        panel_times::<true, true, X>(p, g, xs)
    }

    #[inline(always)]
    unsafe fn panel_times<const FIVE: bool, const GFNI: bool, const X: usize>(p: &Q4KPanels, g: usize, xs: [&Activations<'_>; X]) -> [[f32; ROWS]; X] {
        let low = _mm512_set1_epi8(0x0F);
        let (mut acc, mut acc_m) = ([_mm512_setzero_ps(); X], [_mm512_setzero_ps(); X]);
        for b in 0..p.nb {
            let panel = g * p.nb + b;
            let nibbles = p.nibbles.as_ptr().add(panel * NIBBLE_BYTES);
            let highs = p.highs.as_ref().map_or(std::ptr::null(), |hi| hi.as_ptr().add(panel * HIGH_BYTES));
            let (scales, minimums) = (p.scales.as_ptr().add(panel * SCALE_BYTES), p.minimums.as_ptr().add(panel * SCALE_BYTES));
            let mut sumi = [_mm512_setzero_si512(); X];
            for j in 0..8 {
                let pair = nibbles.add((j / 2) * 8 * VECTOR);
                let x: [*const u8; X] = std::array::from_fn(|i| xs[i].k_qs.as_ptr().add(b * QK_K + 32 * j) as *const u8);
                let mut s = [_mm512_setzero_si512(); X];
                let matrix = moving_bits(j, 4, 1);
                for c in 0..8 {
                    let bytes = load(pair.add(VECTOR * c));
                    let v = if FIVE && GFNI {
                        let nibbles = if j % 2 == 0 { bytes } else { _mm512_srli_epi16(bytes, 4) };
                        join_nibbles(nibbles, moved_bits(load(highs.add(VECTOR * c)), matrix))
                    } else {
                        let v = if j % 2 == 0 { _mm512_and_si512(bytes, low) } else { _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low) };
                        if FIVE { _mm512_or_si512(v, fifth_bits(load(highs.add(VECTOR * c)), j)) } else { v }
                    };
                    for i in 0..X {
                        s[i] = _mm512_dpbusd_epi32(s[i], v, broadcast4(x[i].add(4 * c)));
                    }
                }
                let sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(scales.add(ROWS * j) as *const __m128i));
                for i in 0..X {
                    sumi[i] = _mm512_add_epi32(sumi[i], _mm512_mullo_epi32(s[i], sc));
                }
            }
            let minimums: [__m512i; 4] = std::array::from_fn(|q| _mm512_cvtepu8_epi16(_mm256_loadu_si256(minimums.add(2 * ROWS * q) as *const __m256i)));
            let (d, dmin) = (load16(p.d.as_ptr().add(panel * ROWS)), load16(p.dmin.as_ptr().add(panel * ROWS)));
            for i in 0..X {
                let sums = xs[i].k_sums32.as_ptr().add(8 * b) as *const u8;
                let mut summ = _mm512_madd_epi16(minimums[0], broadcast4(sums));
                for (q, &minimum) in minimums.iter().enumerate().skip(1) {
                    summ = _mm512_add_epi32(summ, _mm512_madd_epi16(minimum, broadcast4(sums.add(4 * q))));
                }
                let dx = _mm512_set1_ps(*xs[i].k_d.get_unchecked(b));
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[i]), _mm512_mul_ps(d, dx), acc[i]);
                acc_m[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(summ), _mm512_mul_ps(dmin, dx), acc_m[i]);
            }
        }
        std::array::from_fn(|i| {
            let mut out = [0f32; ROWS];
            _mm512_storeu_ps(out.as_mut_ptr(), _mm512_sub_ps(acc[i], acc_m[i]));
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_take_about_the_files_bytes() {
        // Sixteen rows of two super-blocks: 2,368 bytes a panel for the file's 2,304.
        assert_eq!(Q4KPanels::zeros(16, 2, false).bytes(), 2 * 2368);
        // Q5_K: 2,880 for the file's 2,816.
        assert_eq!(Q4KPanels::zeros(16, 2, true).bytes(), 2 * 2880);
    }

    /// GFNI's fifth bits give the shifts' bytes, so the same sums, in tiles
    /// of one and four inputs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn gfni_fifth_bits_give_the_shifts_bits() {
        use super::super::gfni_check::{available, random_inputs, random_rows};
        use rand::SeedableRng;
        if !available() {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        let (rows, nb) = (16, 2);
        let mut panels = Q4KPanels::zeros(rows, nb, true);
        random_rows(&mut rng, rows, nb, Q5_K_BYTES, &[0, 2], |r, blocks| panels.put_row(r, blocks));
        let quantized = random_inputs(&mut rng, nb * QK_K, false);
        let inputs: [Activations<'_>; 4] = std::array::from_fn(|i| quantized.row(i));
        // SAFETY: the CPU has AVX-512 VNNI and GFNI (checked above).
        unsafe {
            assert_eq!(vnni::group_times::<true, 4>(&panels, 0, inputs.each_ref()), vnni::group_times_gfni::<4>(&panels, 0, inputs.each_ref()));
            assert_eq!(vnni::group_times::<true, 1>(&panels, 0, [&inputs[2]]), vnni::group_times_gfni::<1>(&panels, 0, [&inputs[2]]));
        }
    }

    #[test]
    fn scales_and_minimums_unpack_as_the_format_packs_them() {
        // Scales 0..8 are 1..8 and minimums 40..48: the low four in 6 bits,
        // the high four split into a nibble and two top bits.
        let (sc, m): ([u8; 8], [u8; 8]) = (std::array::from_fn(|j| j as u8 + 1), std::array::from_fn(|j| j as u8 + 40));
        let mut packed = [0u8; 12];
        for j in 0..4 {
            packed[j] = sc[j] | (sc[j + 4] >> 4) << 6;
            packed[j + 4] = m[j] | (m[j + 4] >> 4) << 6;
            packed[j + 8] = (sc[j + 4] & 0x0F) | (m[j + 4] & 0x0F) << 4;
        }
        assert_eq!(unpack_scales(&packed), (sc, m));
    }
}

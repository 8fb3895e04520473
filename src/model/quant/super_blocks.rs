//! GGUF's 256-value super-blocks: how their inputs are quantized (for Q4_K,
//! whose kernels live in `q4_k_panels`, and Q6_K), and Q6_K's kernels. Q6_K
//! is half of Qwen2.5-0.5B's down projections, half of 1.5B's value
//! projections, and 1.5B's head. candle has SIMD kernels for it too, but on
//! x86 it repacks a second copy of the weights for many input rows, and
//! multiplies a lone row with a kernel whose bits differ from its many-row one.
//!
//! A Q6_K super-block (210 bytes) holds 256 values: 128 bytes of low nibbles,
//! 64 bytes of high bit pairs, sixteen i8 scales (one per 16 values), f16 d.
//! Value = d·sc·(q − 32) with q = low | high << 4. In half h (128 values),
//! chunk u of 32 values takes the low (u < 2) or high nibbles of low-nibble
//! bytes 64h + 32·(u mod 2) + t and bits 2u, 2u+1 of high byte 32h + t.
//! Blocks stay as the file holds them, so a weight row is one stream of memory.
//!
//! Activations are quantized per 256 values exactly as candle's Q8_K (an f32
//! scale, and the sums of each 16 and 32 quantized values), so every integer
//! dot product is candle's. Each super-block's products, weighted by their
//! sub-block scales, add up in eight exact i32 lanes (lane k sums values
//! 4k..4k+4 of every 32), which one fused multiply-add scales into eight
//! float lanes; the lanes are summed at the end. The scalar fallback takes the
//! same steps lane by lane, so both kernels give the same bits, and a row's
//! result never depends on the tile or the batch it is computed in.

use super::{Activations, WeightRow};

pub const QK_K: usize = 256;

/// A Q6_K super-block's bytes, and where its parts start.
pub const Q6_K_BYTES: usize = 210;
const Q6_K_HIGH: usize = 128;
const Q6_K_SCALES: usize = 192;
const Q6_K_D: usize = 208;

#[inline(always)]
fn half_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// Q6_K value `v` (0..256) of a super-block's low-nibble and high-bit bytes, unsigned (0..64).
#[inline(always)]
fn q6_k_value(low: &[u8], high: &[u8], v: usize) -> u8 {
    let (h, u, t) = (v / 128, (v % 128) / 32, v % 32);
    let byte = low[64 * h + 32 * (u % 2) + t];
    let nibble = if u < 2 { byte & 0x0F } else { byte >> 4 };
    nibble | ((high[32 * h + t] >> (2 * u)) & 3) << 4
}

pub fn dequantize_q6_k(w: WeightRow<'_>, out: &mut Vec<f32>) {
    for block in w.values.chunks_exact(Q6_K_BYTES) {
        let d = half_at(block, Q6_K_D);
        let scales = &block[Q6_K_SCALES..Q6_K_D];
        let (low, high) = (&block[..Q6_K_HIGH], &block[Q6_K_HIGH..Q6_K_SCALES]);
        out.extend((0..QK_K).map(|v| d * scales[v / 16] as i8 as f32 * (q6_k_value(low, high, v) as i32 - 32) as f32));
    }
}

/// Rows of activations quantized per 256 values as candle's Q8_K.
#[derive(Default)]
pub struct SuperRows {
    pub d: Vec<f32>,
    pub sums16: Vec<i16>,
    pub sums32: Vec<i16>,
    pub qs: Vec<i8>,
}

impl SuperRows {
    #[cfg(test)]
    pub(super) fn with_kernel(xs: &[f32], kernel: super::Kernel) -> Self {
        let mut rows = SuperRows::default();
        rows.resize(xs.len());
        quantize(xs, kernel, SuperPart { d: &mut rows.d, sums16: &mut rows.sums16, sums32: &mut rows.sums32, qs: &mut rows.qs });
        rows
    }

    /// Room for `values` quantized values (kept capacity: no allocation
    /// when a step is no larger than an earlier one).
    pub fn resize(&mut self, values: usize) {
        self.d.resize(values / QK_K, 0.0);
        self.sums16.resize(values / 16, 0);
        self.sums32.resize(values / super::QK, 0);
        self.qs.resize(values, 0);
    }
}

/// Where one run of values' super-block quantization goes: the parts of a
/// `SuperRows`' buffers that belong to those values.
pub struct SuperPart<'a> {
    pub d: &'a mut [f32],
    pub sums16: &'a mut [i16],
    pub sums32: &'a mut [i16],
    pub qs: &'a mut [i8],
}

/// `xs` (a multiple of 256 values) quantized per block of 256 into `out`.
pub fn quantize(xs: &[f32], kernel: super::Kernel, out: SuperPart<'_>) {
    assert!(xs.len().is_multiple_of(QK_K) && out.qs.len() == xs.len() && out.d.len() == xs.len() / QK_K);
    assert!(out.sums16.len() == xs.len() / 16 && out.sums32.len() == xs.len() / super::QK);
    for (i, (block, q)) in xs.chunks_exact(QK_K).zip(out.qs.chunks_exact_mut(QK_K)).enumerate() {
        // candle's choice: the first value of largest magnitude, with its sign.
        let max = match kernel {
            // SAFETY: `detect` saw AVX2; the block holds 256 values.
            #[cfg(target_arch = "x86_64")]
            super::Kernel::Avx2 => {
                let amax = block.chunks_exact(super::QK).map(|b| unsafe { super::amax_avx2(b) }).fold(0f32, f32::max);
                block.iter().copied().find(|x| x.abs() == amax).unwrap_or(0.0)
            }
            _ => {
                let (mut amax, mut max) = (0f32, 0f32);
                for &x in block {
                    if amax < x.abs() {
                        amax = x.abs();
                        max = x;
                    }
                }
                max
            }
        };
        if max == 0.0 {
            q.fill(0);
            out.d[i] = 0.0;
        } else {
            let iscale = -127.0 / max;
            match kernel {
                // SAFETY: as above. The AVX2 rounding is f32::round's (tested
                // on the 32-value blocks), and packing to bytes saturates
                // as the clamp does.
                #[cfg(target_arch = "x86_64")]
                super::Kernel::Avx2 => {
                    for (b, q) in block.chunks_exact(super::QK).zip(q.chunks_exact_mut(super::QK)) {
                        unsafe { super::quantize_avx2(b, iscale, q) };
                    }
                }
                _ => {
                    for (q, &x) in q.iter_mut().zip(block) {
                        *q = (iscale * x).round().clamp(-128.0, 127.0) as i8;
                    }
                }
            }
            out.d[i] = 1.0 / iscale;
        }
        let sums: [i16; 16] = match kernel {
            // SAFETY: as above; `q` holds 256 values.
            #[cfg(target_arch = "x86_64")]
            super::Kernel::Avx2 => unsafe { avx2::sums_of_sixteen(q) },
            _ => std::array::from_fn(|j| q[16 * j..16 * j + 16].iter().map(|&v| v as i16).sum()),
        };
        for (to, pair) in out.sums32[8 * i..8 * i + 8].iter_mut().zip(sums.chunks_exact(2)) {
            *to = pair[0] + pair[1];
        }
        out.sums16[16 * i..16 * i + 16].copy_from_slice(&sums);
    }
}

/// Eight float lanes summed in the AVX2 kernels' order.
fn sum8(acc: [f32; 8]) -> f32 {
    let t: [f32; 4] = std::array::from_fn(|j| acc[j + 4] + acc[j]);
    (t[0] + t[2]) + (t[1] + t[3])
}

pub mod scalar {
    use super::*;

    pub fn dot_q6_k(w: WeightRow<'_>, x: &Activations<'_>) -> f32 {
        let mut acc = [0f32; 8];
        for (b, block) in w.values.chunks_exact(Q6_K_BYTES).enumerate() {
            let (low, high) = (&block[..Q6_K_HIGH], &block[Q6_K_HIGH..Q6_K_SCALES]);
            let scales = &block[Q6_K_SCALES..Q6_K_D];
            let xq = &x.k_qs[QK_K * b..QK_K * (b + 1)];
            let sums = &x.k_sums16[16 * b..16 * b + 16];
            let mut sumi = [0i32; 8];
            for v in 0..QK_K {
                sumi[(v % 32) / 4] += scales[v / 16] as i8 as i32 * q6_k_value(low, high, v) as i32 * xq[v] as i32;
            }
            // The − 32 of every value, through the sums of the inputs.
            for (k, s) in sumi.iter_mut().enumerate() {
                *s -= 32 * (scales[2 * k] as i8 as i32 * sums[2 * k] as i32 + scales[2 * k + 1] as i8 as i32 * sums[2 * k + 1] as i32);
            }
            let d = half_at(block, Q6_K_D) * x.k_d[b];
            for (acc, s) in acc.iter_mut().zip(sumi) {
                *acc = (s as f32).mul_add(d, *acc);
            }
        }
        sum8(acc)
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// The sums of each sixteen of a super-block's 256 quantized values:
    /// shifted to unsigned (+128) and summed eight at a time by `psadbw`
    /// against zero, exact in integers.
    #[target_feature(enable = "avx2")]
    pub unsafe fn sums_of_sixteen(q: &[i8]) -> [i16; 16] {
        assert!(q.len() >= QK_K);
        let (shift, zero) = (_mm256_set1_epi8(-128), _mm256_setzero_si256());
        let mut sums = [0i16; 16];
        for c in 0..QK_K / 32 {
            let v = _mm256_xor_si256(_mm256_loadu_si256(q.as_ptr().add(32 * c) as *const __m256i), shift);
            let mut eights = [0u64; 4];
            _mm256_storeu_si256(eights.as_mut_ptr() as *mut __m256i, _mm256_sad_epu8(v, zero));
            sums[2 * c] = (eights[0] + eights[1]) as i16 - 16 * 128;
            sums[2 * c + 1] = (eights[2] + eights[3]) as i16 - 16 * 128;
        }
        sums
    }

    /// Every row of a tile holds `nb` super-blocks, so the inner loops may
    /// read without checks.
    #[inline(always)]
    fn check_lengths<const W: usize, const X: usize>(ws: &[WeightRow<'_>; W], xs: &[&Activations<'_>; X], nb: usize, block_bytes: usize) {
        assert!(ws.iter().all(|w| w.values.len() >= nb * block_bytes));
        assert!(xs.iter().all(|x| x.k_qs.len() >= nb * QK_K && x.k_d.len() >= nb && x.k_sums16.len() >= 16 * nb && x.k_sums32.len() >= 8 * nb));
    }

    /// The f16 value at `p`.
    #[inline(always)]
    unsafe fn half_from(p: *const u8) -> f32 {
        half::f16::from_bits(std::ptr::read_unaligned(p as *const u16)).to_f32()
    }

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// Σ w·x of 32 values weighted by `scales` (sixteen i16 lanes, one per pair
    /// of values), as eight i32 lanes. w is unsigned below 64: no saturation.
    #[inline(always)]
    unsafe fn weighted(w: __m256i, x: *const i8, scales: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, load(x as *const u8)), scales)
    }

    /// Eight float lanes summed: high half onto low, then pairs.
    #[inline(always)]
    unsafe fn sum_f32(x: __m256) -> f32 {
        sum_f32x4(_mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x)))
    }

    #[inline(always)]
    unsafe fn sum_f32x4(s: __m128) -> f32 {
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// W weight rows × X activation rows of Q6_K: values unsigned (0..64),
    /// weighted by their 16-value sub-block scales; the − 32 comes off once
    /// per super-block through the inputs' sums of 16.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_q6_k<const W: usize, const X: usize>(ws: [WeightRow<'_>; W], xs: [&Activations<'_>; X]) -> [[f32; X]; W] {
        let nb = ws[0].values.len() / Q6_K_BYTES;
        check_lengths(&ws, &xs, nb, Q6_K_BYTES);
        let mut acc = [[_mm256_setzero_ps(); X]; W];
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let high_pair = _mm256_set1_epi8(0x30);
        // Shuffle c puts scale 2c in bytes 0..8 and scale 2c+1 in bytes 8..16.
        let pick: [__m128i; 8] = std::array::from_fn(|c| _mm_set_epi64x(0x0101_0101_0101_0101 * (2 * c as i64 + 1), 0x0101_0101_0101_0101 * 2 * c as i64));
        let x_values = xs.map(|x| x.k_qs.as_ptr());
        for b in 0..nb {
            // One weight row at a time, so that only its X sums are live.
            for (r, w) in ws.iter().enumerate() {
                let q = w.values.as_ptr().add(b * Q6_K_BYTES);
                let scale_bytes = _mm_loadu_si128(q.add(Q6_K_SCALES) as *const __m128i);
                let mut sumi = [_mm256_setzero_si256(); X];
                for h in 0..2 {
                    let (low0, low1, high) = (load(q.add(64 * h)), load(q.add(64 * h + 32)), load(q.add(Q6_K_HIGH + 32 * h)));
                    let values = [
                        _mm256_or_si256(_mm256_and_si256(low0, low_nibbles), _mm256_and_si256(_mm256_slli_epi16(high, 4), high_pair)),
                        _mm256_or_si256(_mm256_and_si256(low1, low_nibbles), _mm256_and_si256(_mm256_slli_epi16(high, 2), high_pair)),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low0, 4), low_nibbles), _mm256_and_si256(high, high_pair)),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low1, 4), low_nibbles), _mm256_and_si256(_mm256_srli_epi16(high, 2), high_pair)),
                    ];
                    for (u, &v) in values.iter().enumerate() {
                        let c = 4 * h + u;
                        let scales = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scale_bytes, pick[c]));
                        for (sumi, x) in sumi.iter_mut().zip(x_values) {
                            *sumi = _mm256_add_epi32(*sumi, weighted(v, x.add(b * QK_K + 32 * c), scales));
                        }
                    }
                }
                let scales = _mm256_cvtepi8_epi16(scale_bytes);
                let d = half_from(q.add(Q6_K_D));
                for (i, x) in xs.iter().enumerate() {
                    let sums = _mm256_loadu_si256(x.k_sums16.as_ptr().add(16 * b) as *const __m256i);
                    let offset = _mm256_slli_epi32(_mm256_madd_epi16(scales, sums), 5);
                    let s = _mm256_sub_epi32(sumi[i], offset);
                    acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * *x.k_d.get_unchecked(b)), acc[r][i]);
                }
            }
        }
        acc.map(|row| row.map(|a| sum_f32(a)))
    }
}

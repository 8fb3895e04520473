//! GGUF's 256-value super-blocks: how the inputs of Q4_K and Q6_K matrices
//! (whose kernels live in `q4_k_panels` and `q6_k_panels`) are quantized.
//!
//! Activations are quantized per 256 values exactly as candle's Q8_K: an f32
//! scale, and the sums of each 16 and 32 quantized values, so every integer
//! dot product of the kernels is candle's.

pub const QK_K: usize = 256;

/// A Q6_K super-block's bytes: 128 of low nibbles, 64 of high bit pairs, 16
/// scales and an f16 d.
pub const Q6_K_BYTES: usize = 210;

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
            super::Kernel::Avx2 { .. } => {
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
                super::Kernel::Avx2 { .. } => {
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
            super::Kernel::Avx2 { .. } => unsafe { avx2::sums_of_sixteen(q) },
            _ => std::array::from_fn(|j| q[16 * j..16 * j + 16].iter().map(|&v| v as i16).sum()),
        };
        for (to, pair) in out.sums32[8 * i..8 * i + 8].iter_mut().zip(sums.chunks_exact(2)) {
            *to = pair[0] + pair[1];
        }
        out.sums16[16 * i..16 * i + 16].copy_from_slice(&sums);
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
}

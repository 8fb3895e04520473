//! Which instruction set the CPU kernels (quantized, 2:4 sparse, attention)
//! run with, chosen at run time: one binary is fast where AVX2 exists (the
//! quantized kernels faster still with AVX-512 VNNI) and still correct where
//! it does not. Each kernel module adds its own methods.
//! `Value` is a stored number format the kernels widen to f32 (2:4 sparse
//! values, the f16 KV cache).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    /// AVX2, FMA and F16C; with `vnni`, AVX-512 F, BW and VNNI too, which
    /// only the quantized kernels use: on 512-bit vectors, `vpdpbusd` sums
    /// four bytes' products into i32 in one instruction where AVX2 takes
    /// `maddubs`, `madd` and an add. Their integer sums are exact either
    /// way, so both give the same bits; every other kernel runs its AVX2
    /// code for both.
    #[cfg(target_arch = "x86_64")]
    Avx2 { vnni: bool },
}

impl Kernel {
    /// The best this CPU has, detected once. `TERSE_NO_VNNI=1` stops at
    /// AVX2 (to compare the two in one binary).
    pub fn detect() -> Kernel {
        static DETECTED: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            // F16C (half-precision loads) comes with every AVX2 CPU.
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
                let avx512 = std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw");
                let vnni = avx512 && std::is_x86_feature_detected!("avx512vnni") && std::env::var_os("TERSE_NO_VNNI").is_none();
                return Kernel::Avx2 { vnni };
            }
            Kernel::Scalar
        })
    }
}

/// Whether the CPU has GFNI (every AVX-512 VNNI CPU since Ice Lake and Zen 4
/// does), detected once. `TERSE_NO_GFNI=1` says no (to compare in one binary).
#[cfg(target_arch = "x86_64")]
pub fn has_gfni() -> bool {
    static GFNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GFNI.get_or_init(|| std::is_x86_feature_detected!("gfni") && std::env::var_os("TERSE_NO_GFNI").is_none())
}

/// A stored value type: read as f32, one at a time or eight at a time.
pub trait Value: Copy + Send + Sync {
    fn to_f32(self) -> f32;

    /// Eight values from `p` as f32 lanes.
    ///
    /// # Safety
    /// Eight values are readable at `p`, and the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Value for f32 {
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Value for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }

    /// bf16 is the top half of an f32: widen and shift.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)), 16))
    }
}

impl Value for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// AVX2 pieces more than one kernel uses.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    /// The 32 bytes at `at`.
    #[inline(always)]
    pub unsafe fn load(at: *const u8) -> __m256i {
        _mm256_loadu_si256(at as *const __m256i)
    }

    /// The four bytes at `at` (four 8-bit inputs, or two i16 sums), as one
    /// i32 in every lane.
    #[inline(always)]
    pub unsafe fn broadcast4(at: *const u8) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(at as *const i32))
    }

    /// The lane sums of eight vectors, as one vector: lane i is the sum of
    /// `a[i]`'s lanes, always in the order ((0+1)+(2+3))+((4+5)+(6+7)). Three
    /// rounds of pairwise adds for all eight, instead of a horizontal sum each.
    #[inline(always)]
    pub unsafe fn sum_eight(a: [__m256; 8]) -> __m256 {
        let (p0, p1) = (_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let (p2, p3) = (_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        let (q0, q1) = (_mm256_hadd_ps(p0, p1), _mm256_hadd_ps(p2, p3));
        // q0's low half: lanes 0–3 summed for a[0..4]; its high half: lanes 4–7.
        _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31))
    }
}

/// AVX-512 pieces the quantized kernels share (512-bit vectors).
#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use std::arch::x86_64::*;

    use half::f16;

    /// The GF(2) matrix with which `moved_bits` takes bits `from..from +
    /// count` of every byte to bits `to..to + count` and clears the rest
    /// (`vgf2p8affineqb`: output bit i is the parity of the matrix's byte
    /// 7 − i and the input byte).
    pub const fn moving_bits(from: usize, to: usize, count: usize) -> i64 {
        let mut matrix = 0i64;
        let mut k = 0;
        while k < count {
            matrix |= 1i64 << (8 * (7 - (to + k)) + from + k);
            k += 1;
        }
        matrix
    }

    /// `x`'s bytes through `matrix` (`moving_bits`): one instruction where
    /// a shift and a mask take two. The caller enables GFNI.
    #[inline(always)]
    pub unsafe fn moved_bits(x: __m512i, matrix: i64) -> __m512i {
        _mm512_gf2p8affine_epi64_epi8::<0>(x, _mm512_set1_epi64(matrix))
    }

    /// Bits 0–3 of each byte of `nibbles` with bits 4–7 of `high`'s: one
    /// ternary-logic select (0xE4 is c ? a : b, bit by bit, c the nibble mask)
    /// where two masks and an OR take three.
    #[inline(always)]
    pub unsafe fn join_nibbles(nibbles: __m512i, high: __m512i) -> __m512i {
        _mm512_ternarylogic_epi32::<0xE4>(nibbles, high, _mm512_set1_epi8(0x0F))
    }

    /// The 64 bytes at `at`.
    #[inline(always)]
    pub unsafe fn load(at: *const u8) -> __m512i {
        _mm512_loadu_si512(at as *const __m512i)
    }

    /// The four bytes at `at`, as one i32 in every lane.
    #[inline(always)]
    pub unsafe fn broadcast4(at: *const u8) -> __m512i {
        _mm512_set1_epi32(std::ptr::read_unaligned(at as *const i32))
    }

    /// The sixteen f16 values at `at`, as f32 lanes.
    #[inline(always)]
    pub unsafe fn load16(at: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(at as *const __m256i))
    }
}

//! The row-wise steps of the CPU forward pass, on plain f32 rows: RMS norm,
//! residual adds, SiLU gating, and the exponential that softmax and SiLU
//! need. Between two matrix products the activations stay one `Vec<f32>`:
//! no tensor per step, no copies in and out of candle's storage.
//!
//! Every function treats each row on its own, in an order fixed by the row's
//! width, so a row's result does not depend on the rows beside it.

use super::kernel::Kernel;
use super::threads::on_candles_threads;

/// Below this many values a step runs on the calling thread: waking the
/// pool would cost more than it saves.
const SHARED_FROM: usize = 8192;
/// Elementwise steps hand out their values in runs of this many.
const RUN: usize = 512;

/// `work(first_row, part)` over the rows of `out` (rows of `width`): on the
/// pool when there is enough to share, else here.
fn by_rows(out: &mut [f32], width: usize, work: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() >= SHARED_FROM {
        on_candles_threads(out, width, 1, work);
    } else {
        work(0, out);
    }
}

/// Each row of `x` (rows of `weight.len()` values) divided by its root mean
/// square (ε added to the mean square) and scaled by `weight`, as candle's
/// `rms_norm` writes it (`x / rms · weight`). The sum of squares runs in
/// eight lanes, which the compiler keeps in one vector register. The rows go
/// into `out`, whose buffer is reused.
pub fn rms_norm_into(x: &[f32], weight: &[f32], eps: f32, out: &mut Vec<f32>) {
    let width = weight.len();
    assert!(width > 0 && x.len().is_multiple_of(width), "rows of the norm's width");
    // Every element is written below: resizing only keeps the length right.
    out.resize(x.len(), 0.0);
    by_rows(out, width, |first_row, part| {
        let rows = x[first_row * width..].chunks_exact(width);
        for (row, out) in rows.zip(part.chunks_exact_mut(width)) {
            let mut lanes = [0f32; 8];
            let eights = row.chunks_exact(8);
            let tail: f32 = eights.remainder().iter().map(|v| v * v).sum();
            for v in eights {
                for k in 0..8 {
                    lanes[k] += v[k] * v[k];
                }
            }
            let sum = lanes.iter().sum::<f32>() + tail;
            let rms = (sum / width as f32 + eps).sqrt();
            for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
                *o = v / rms * w;
            }
        }
    });
}

/// `x += y`, element by element.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "a residual add of unequal lengths");
    by_rows(x, RUN, |first, part| {
        for (x, &y) in part.iter_mut().zip(&y[first * RUN..]) {
            *x += y;
        }
    });
}

/// `gate = silu(gate) · up` (silu(g) = g / (1 + e^−g)), the gated MLP's
/// activation, in one pass.
pub fn silu_times(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up of unequal lengths");
    by_rows(gate, RUN, |first, part| silu_times_here(part, &up[first * RUN..first * RUN + part.len()]));
}

fn silu_times_here(gate: &mut [f32], up: &[f32]) {
    let done = match Kernel::detect() {
        // SAFETY: `detect` saw AVX2 and FMA; the lengths are equal (asserted).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 { .. } => unsafe { avx2::silu_times(gate, up) },
        _ => 0,
    };
    for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

/// √(2/π), doubled: GELU's tanh approximation 0.5·g·(1 + tanh(y)), y =
/// √(2/π)·(g + 0.044715·g³), is g / (1 + e^(−2y)), the form SiLU takes.
const GELU_2_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
const GELU_CUBIC: f32 = 0.044715;

/// `gate = gelu(gate) · up` with GELU's tanh approximation, Gemma's MLP
/// activation, in one pass (as `silu_times`, on e^(−2y)).
pub fn gelu_tanh_times(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up of unequal lengths");
    by_rows(gate, RUN, |first, part| gelu_tanh_times_here(part, &up[first * RUN..first * RUN + part.len()]));
}

fn gelu_tanh_times_here(gate: &mut [f32], up: &[f32]) {
    let done = match Kernel::detect() {
        // SAFETY: `detect` saw AVX2 and FMA; the lengths are equal (asserted).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 { .. } => unsafe { avx2::gelu_tanh_times(gate, up) },
        _ => 0,
    };
    for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
        let x = *g;
        let two_y = GELU_2_SQRT_2_OVER_PI * (x + GELU_CUBIC * (x * x * x));
        *g = x / (1.0 + exp(-two_y)) * u;
    }
}

/// Every value of `x` times `factor`, in place.
pub fn scale(x: &mut [f32], factor: f32) {
    by_rows(x, RUN, |_, part| {
        for v in part {
            *v *= factor;
        }
    });
}

/// `e^x` for every value, in place.
pub fn exp_in_place(xs: &mut [f32]) {
    let done = match Kernel::detect() {
        // SAFETY: `detect` saw AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 { .. } => unsafe { avx2::exp_in_place(xs) },
        _ => 0,
    };
    for x in &mut xs[done..] {
        *x = exp(*x);
    }
}

// e^x = 2^n · e^r, n = round(x / ln 2), r = x − n·ln 2 in [−ln2/2, ln2/2],
// e^r by its Taylor series to r^7 (the first term left out is below f32's
// precision there). ln 2 is f32's ln 2 plus the remainder f32 drops, taken
// off in a second fused step, so that r keeps the bits a single step loses.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HIGH: f32 = std::f32::consts::LN_2;
const LN2_LOW: f32 = -1.904_654_3e-9;
/// 1/k! for k = 0..=7.
const TAYLOR: [f32; 8] = [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];
/// Inputs are clamped to where 2^n stays a normal f32.
const LOWEST: f32 = -87.0;
const HIGHEST: f32 = 88.0;

/// The scalar e^x: the same operations, in the same order, as the AVX2 one
/// (fused multiply-adds included), so both give the same bits.
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(LOWEST, HIGHEST);
    let n = (x * LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_HIGH, x);
    let r = (-n).mul_add(LN2_LOW, r);
    let mut p = TAYLOR[7];
    for &c in TAYLOR[..7].iter().rev() {
        p = p.mul_add(r, c);
    }
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{HIGHEST, LN2_HIGH, LN2_LOW, LOG2_E, LOWEST, TAYLOR};

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LOWEST)), _mm256_set1_ps(HIGHEST));
        let n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HIGH), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LOW), r);
        let mut p = _mm256_set1_ps(TAYLOR[7]);
        for &c in TAYLOR[..7].iter().rev() {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(p, _mm256_castsi256_ps(two_n))
    }

    /// The whole groups of eight; returns how many values were done.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_in_place(xs: &mut [f32]) -> usize {
        let whole = xs.len() / 8 * 8;
        for i in (0..whole).step_by(8) {
            let p = xs.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, exp8(_mm256_loadu_ps(p)));
        }
        whole
    }

    /// `row_ops::gelu_tanh_times` on whole vectors of eight; the scalar
    /// steps' operations, in their order (multiplies and adds unfused), so
    /// both give the same bits.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_tanh_times(gate: &mut [f32], up: &[f32]) -> usize {
        let whole = gate.len() / 8 * 8;
        let (one, sign) = (_mm256_set1_ps(1.0), _mm256_set1_ps(-0.0));
        let (scale, cubic) = (_mm256_set1_ps(super::GELU_2_SQRT_2_OVER_PI), _mm256_set1_ps(super::GELU_CUBIC));
        for i in (0..whole).step_by(8) {
            let x = _mm256_loadu_ps(gate.as_ptr().add(i));
            let cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            let two_y = _mm256_mul_ps(scale, _mm256_add_ps(x, _mm256_mul_ps(cubic, cube)));
            let gelu = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_xor_ps(two_y, sign))));
            _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(gelu, _mm256_loadu_ps(up.as_ptr().add(i))));
        }
        whole
    }

    /// The whole groups of eight; returns how many values were done.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_times(gate: &mut [f32], up: &[f32]) -> usize {
        let whole = gate.len() / 8 * 8;
        let (one, sign) = (_mm256_set1_ps(1.0), _mm256_set1_ps(-0.0));
        for i in (0..whole).step_by(8) {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, sign))));
            _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(silu, _mm256_loadu_ps(up.as_ptr().add(i))));
        }
        whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values across the range softmax and SiLU see, with every tail length.
    fn samples() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..2001).map(|i| (i as f32 - 1000.0) * 0.0917).collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 87.5, -86.9, 88.0, -87.0, 200.0, -200.0, 0.5, -0.5]);
        xs
    }

    #[test]
    fn gelu_tanh_matches_its_tanh_form_and_the_vector_path_gives_the_scalar_bits() {
        let xs = samples();
        let up: Vec<f32> = xs.iter().map(|x| 1.0 + x.abs() * 0.01).collect();
        let mut fast = xs.clone();
        gelu_tanh_times(&mut fast, &up);
        for ((&x, &u), &got) in xs.iter().zip(&up).zip(&fast) {
            let want = 0.5 * x as f64 * (1.0 + (0.797_884_560_8 * (x as f64 + 0.044715 * (x as f64).powi(3))).tanh()) * u as f64;
            assert!((got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "gelu({x}) = {got}, expected {want}");
        }
        // Each value on its own (the scalar tail) gives the bits the vectors gave.
        for (i, (&x, &u)) in xs.iter().zip(&up).enumerate() {
            let mut one = [x];
            gelu_tanh_times_here(&mut one, &[u]);
            assert_eq!(one[0].to_bits(), fast[i].to_bits(), "gelu({x})");
        }
    }

    #[test]
    fn exp_is_within_two_ulps_of_the_exact_value() {
        for x in samples() {
            let ours = exp(x) as f64;
            let exact = (x.clamp(LOWEST, HIGHEST) as f64).exp();
            let ulp = (exact as f32).abs() as f64 * f32::EPSILON as f64;
            assert!((ours - exact).abs() <= 2.0 * ulp, "exp({x}) = {ours}, exactly {exact}");
        }
    }

    #[test]
    fn the_vector_exp_and_silu_give_the_scalar_bits() {
        let xs = samples();
        for len in [xs.len(), 7, 8, 9, 17] {
            let xs = &xs[..len];
            let mut vector = xs.to_vec();
            exp_in_place(&mut vector);
            let scalar: Vec<f32> = xs.iter().map(|&x| exp(x)).collect();
            assert_eq!(vector.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), scalar.iter().map(|v| v.to_bits()).collect::<Vec<_>>());

            let up: Vec<f32> = xs.iter().map(|x| 0.3 - x * 0.01).collect();
            let mut gate = xs.to_vec();
            silu_times(&mut gate, &up);
            for ((&g, &x), &u) in gate.iter().zip(xs).zip(&up) {
                assert_eq!(g.to_bits(), (x / (1.0 + exp(-x)) * u).to_bits(), "silu({x}) · {u}");
                let exact = x as f64 / (1.0 + (-x as f64).exp()) * u as f64;
                // Past the clamp (|x| > 87) the error is absolute and below 1e-30.
                assert!((g as f64 - exact).abs() <= 1e-6 * exact.abs() + 1e-30, "silu({x}) · {u} = {g}, exactly {exact}");
            }
        }
    }

    #[test]
    fn rms_norm_matches_candles() {
        let (rows, width) = (3, 60);
        let x: Vec<f32> = (0..rows * width).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.07).collect();
        let w: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 * 0.01).collect();
        // A reused buffer of another length: every value is rewritten.
        let mut ours = vec![f32::NAN; 7];
        rms_norm_into(&x, &w, 1e-5, &mut ours);
        let dev = candle_core::Device::Cpu;
        let candle = candle_nn::ops::rms_norm(
            &candle_core::Tensor::from_vec(x, (rows, width), &dev).unwrap(),
            &candle_core::Tensor::new(w.as_slice(), &dev).unwrap(),
            1e-5,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        for (a, b) in ours.iter().zip(&candle) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} against candle's {b}");
        }
    }
}

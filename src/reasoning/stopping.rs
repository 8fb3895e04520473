//! Temperature-scaled stopping (TS): raise the probability of stopping.
//!
//! With stop set S and stop temperature τ ≥ 1, let p = Σ_{s∈S} softmax(z)_s.
//! The stop mass becomes p' = p^(1/τ) and every other token keeps its share of
//! the rest, 1 − p'. Working on probabilities (not raw logits) makes the edit
//! independent of the logits' arbitrary offset. τ = 1 leaves the logits
//! untouched, bit for bit; as τ grows p' → 1.
//!
//! The edit is two constant shifts in log space: stop logits move by
//! log p' − log p, the others by log(1 − p') − log(1 − p). Both are computed from
//! log-sum-exps, so p near 0 or 1 and −inf logits (masked tokens) stay exact.

/// Apply TS to `logits` in place. Returns the stop probability before and after.
pub fn scale_stop_mass(logits: &mut [f32], stop_ids: &[u32], tau: f32) -> Option<(f64, f64)> {
    if tau == 1.0 || stop_ids.is_empty() || !(tau > 1.0) {
        return None;
    }
    let is_stop = |i: usize| stop_ids.contains(&(i as u32));
    let log_all = log_sum_exp(logits.iter().copied());
    let log_stop = log_sum_exp(stop_ids.iter().filter_map(|&s| logits.get(s as usize).copied()));
    let log_rest = log_sum_exp(logits.iter().enumerate().filter(|(i, _)| !is_stop(*i)).map(|(_, &l)| l));
    let shift = stop_shifts(log_all, log_stop, log_rest, tau)?;
    for (i, l) in logits.iter_mut().enumerate() {
        if *l == f32::NEG_INFINITY {
            continue;
        }
        *l += if is_stop(i) { shift.stop } else { shift.rest };
    }
    Some((shift.p, shift.p_new))
}

/// The two log-space shifts of TS, and the stop probability before and after.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StopShift {
    pub stop: f32,
    pub rest: f32,
    pub p: f64,
    pub p_new: f64,
}

/// TS's shifts from the log-sum-exps of all logits, of the stop logits and of
/// the others (computed wherever the logits are: host or GPU). `None` when
/// there is nothing to move: τ ≤ 1, no stop mass, or nothing but stop mass.
pub fn stop_shifts(log_all: f64, log_stop: f64, log_rest: f64, tau: f32) -> Option<StopShift> {
    if !(tau > 1.0) || !log_all.is_finite() || !log_stop.is_finite() || !log_rest.is_finite() {
        return None;
    }
    let log_rest_old = log_rest - log_all; // log(1 − p), exact even when p ≈ 1
    // log p from whichever side is small: near p = 1, log_stop − log_all rounds to 0.
    let log_p = if log_rest_old < -std::f64::consts::LN_2 {
        (-log_rest_old.exp()).ln_1p()
    } else {
        log_stop - log_all
    };
    let log_p_new = log_p / tau as f64; // p' = p^(1/τ), closer to 0 in log space
    // log(1 − p') = log(−expm1(log p')), stable for p' near 0 and near 1.
    let log_rest_new = (-(log_p_new.exp_m1())).ln();
    Some(StopShift {
        stop: (log_p_new - log_p) as f32,
        rest: (log_rest_new - log_rest_old) as f32,
        p: log_p.exp(),
        p_new: log_p_new.exp(),
    })
}

/// log Σ exp(v), in f64.
pub fn log_sum_exp(values: impl Iterator<Item = f32> + Clone) -> f64 {
    let max = values.clone().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let sum: f64 = values.map(|v| ((v - max) as f64).exp()).sum();
    max as f64 + sum.ln()
}

/// Index of the largest logit; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(z: &[f32]) -> Vec<f64> {
        let lse = log_sum_exp(z.iter().copied());
        z.iter().map(|&v| (v as f64 - lse).exp()).collect()
    }

    fn stop_mass(z: &[f32], stops: &[u32]) -> f64 {
        let p = softmax(z);
        stops.iter().map(|&s| p[s as usize]).sum()
    }

    #[test]
    fn tau_one_is_bit_identical() {
        let z = vec![0.3f32, -1.2, 4.0, 2.5, f32::NEG_INFINITY];
        let mut edited = z.clone();
        assert!(scale_stop_mass(&mut edited, &[2], 1.0).is_none());
        assert!(z.iter().zip(&edited).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn stop_mass_becomes_p_to_the_one_over_tau() {
        let z = vec![1.0f32, 2.0, 0.5, -0.3, 0.0];
        let stops = [4u32, 2];
        let p = stop_mass(&z, &stops);
        for tau in [1.5f32, 2.0, 4.0, 10.0] {
            let mut e = z.clone();
            let (before, after) = scale_stop_mass(&mut e, &stops, tau).unwrap();
            assert!((before - p).abs() < 1e-9);
            let want = p.powf(1.0 / tau as f64);
            assert!((after - want).abs() < 1e-9);
            assert!((stop_mass(&e, &stops) - want).abs() < 1e-5, "τ={tau}");
            // The other tokens keep their relative odds.
            let q = softmax(&e);
            let ratio_before = softmax(&z)[0] / softmax(&z)[1];
            assert!((q[0] / q[1] - ratio_before).abs() < 1e-5);
        }
    }

    #[test]
    fn stop_mass_grows_with_tau() {
        let z = vec![3.0f32, 0.0, -2.0];
        let mut last = stop_mass(&z, &[2]);
        for tau in [1.1f32, 2.0, 5.0, 50.0, 1e6] {
            let mut e = z.clone();
            scale_stop_mass(&mut e, &[2], tau);
            let m = stop_mass(&e, &[2]);
            assert!(m > last, "τ={tau}: {m} ≤ {last}");
            last = m;
        }
        assert!(last > 0.999, "a huge τ all but forces the stop: {last}");
    }

    #[test]
    fn stable_at_the_extremes() {
        // p ≈ 1e-30: the shift must stay finite and the mass exact.
        let mut tiny = vec![0.0f32, 0.0, -69.0];
        let (p, p_new) = scale_stop_mass(&mut tiny, &[2], 2.0).unwrap();
        assert!(p > 0.0 && (p_new - p.sqrt()).abs() < 1e-20);
        assert!(tiny.iter().all(|v| v.is_finite()));
        // p ≈ 1: the non-stop tokens keep a finite, smaller logit.
        let mut huge = vec![-40.0f32, 0.0];
        scale_stop_mass(&mut huge, &[1], 3.0).unwrap();
        assert!(huge[0].is_finite() && huge[0] < -40.0);
        // Masked (−inf) tokens stay masked, and an all-masked stop set is left alone.
        let mut masked = vec![1.0f32, f32::NEG_INFINITY, 0.5];
        scale_stop_mass(&mut masked, &[2], 4.0).unwrap();
        assert_eq!(masked[1], f32::NEG_INFINITY);
        let mut no_stop = vec![1.0f32, f32::NEG_INFINITY];
        assert!(scale_stop_mass(&mut no_stop, &[1], 4.0).is_none());
        assert_eq!(no_stop, vec![1.0, f32::NEG_INFINITY]);
    }
}

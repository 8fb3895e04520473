//! Greedy token choice where the logits are (on a GPU), for sequences that
//! need no host-side sampling: a few numbers per row cross to the host
//! instead of a whole vocabulary row.
//!
//! Temperature-scaled stopping fits this: its edit adds one constant to the
//! stop logits and another to the rest, so the edited argmax is the larger of
//! (best stop + stop shift) and (best other + rest shift). The log-sum-exps the
//! shifts come from are reduced on the device; the shifts themselves are the
//! host path's own arithmetic (`stopping::stop_shifts`).

use candle_core::{Result, Tensor, D};

use crate::reasoning::stopping::{log_sum_exp, stop_shifts};

/// One row of the step's logits to choose greedily.
pub struct GreedyRow<'a> {
    pub row: usize,
    /// TS's stop set and τ, when TS moves anything for this token.
    pub ts: Option<(&'a [u32], f32)>,
}

/// When the engine chooses greedy tokens on the model's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PickOnDevice {
    /// On a GPU, not on the CPU (where the logits already are in host memory).
    #[default]
    Auto,
    On,
    Off,
}

impl PickOnDevice {
    pub fn enabled(self, device: &candle_core::Device) -> bool {
        match self {
            PickOnDevice::Auto => !device.is_cpu(),
            PickOnDevice::On => true,
            PickOnDevice::Off => false,
        }
    }
}

/// A row's greedy token, and whether its top token before TS's edit was a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pick {
    pub token: u32,
    pub top_was_stop: bool,
}

/// The greedy token of each row of `logits` (rows, vocab), TS applied where asked.
pub fn pick_greedy(logits: &Tensor, rows: &[GreedyRow<'_>]) -> Result<Vec<Pick>> {
    let mut picks = vec![Pick::default(); rows.len()];
    // Rows without TS: one argmax over all of them and one copy of their ids.
    let plain: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].ts.is_none()).collect();
    if !plain.is_empty() {
        let index: Vec<u32> = plain.iter().map(|&i| rows[i].row as u32).collect();
        let index = Tensor::new(index.as_slice(), logits.device())?;
        let ids = logits.index_select(&index, 0)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (&i, id) in plain.iter().zip(ids) {
            picks[i].token = id;
        }
    }
    for (i, r) in rows.iter().enumerate() {
        if let Some((stops, tau)) = r.ts {
            picks[i] = pick_with_ts(&logits.get(r.row)?, stops, tau)?;
        }
    }
    Ok(picks)
}

/// Greedy choice of one (vocab,) row after TS with stop set `stops` and τ.
fn pick_with_ts(row: &Tensor, stops: &[u32], tau: f32) -> Result<Pick> {
    let vocab = row.dim(0)?;
    let mut stops: Vec<u32> = stops.iter().copied().filter(|&s| (s as usize) < vocab).collect();
    stops.sort_unstable();
    stops.dedup();
    if stops.is_empty() {
        return Ok(Pick { token: row.argmax(0)?.to_scalar::<u32>()?, top_was_stop: false });
    }
    let device = row.device();
    let stop_index = Tensor::new(stops.as_slice(), device)?;
    let stop_values = row.index_select(&stop_index, 0)?;
    let minus_inf = Tensor::full(f32::NEG_INFINITY, stops.len(), device)?;
    let rest = row.index_add(&stop_index, &minus_inf, 0)?;
    let lse = |t: &Tensor| -> Result<Tensor> {
        let max = t.max_keepdim(0)?;
        t.broadcast_sub(&max)?.exp()?.sum_keepdim(0)?.log()? + max
    };
    // One copy of floats and one of the best other token's id.
    let numbers = Tensor::cat(&[lse(row)?, lse(&rest)?, rest.max_keepdim(0)?, stop_values], 0)?.to_vec1::<f32>()?;
    let rest_id = rest.argmax(0)?.to_scalar::<u32>()?;
    let (log_all, log_rest, best_rest, stop_values) = (numbers[0], numbers[1], numbers[2], &numbers[3..]);

    // The best stop token; ties go to the lower id, as the host's argmax does.
    let (mut stop_id, mut best_stop) = (stops[0], stop_values[0]);
    for (&id, &v) in stops.iter().zip(stop_values) {
        if v > best_stop {
            (stop_id, best_stop) = (id, v);
        }
    }
    // Ties go to the lower id, as the host's argmax does.
    let beats = |a: f32, a_id: u32, b: f32, b_id: u32| a > b || (a == b && a_id < b_id);
    let top_was_stop = beats(best_stop, stop_id, best_rest, rest_id);
    let log_stop = log_sum_exp(stop_values.iter().copied());
    let (stop_score, rest_score) = match stop_shifts(log_all as f64, log_stop, log_rest as f64, tau) {
        Some(shift) => (best_stop + shift.stop, best_rest + shift.rest),
        None => (best_stop, best_rest),
    };
    let token = if beats(stop_score, stop_id, rest_score, rest_id) { stop_id } else { rest_id };
    Ok(Pick { token, top_was_stop })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::argmax;
    use crate::reasoning::stopping::scale_stop_mass;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    /// The host path: edit every logit, then argmax.
    fn host_pick(row: &[f32], ts: Option<(&[u32], f32)>) -> u32 {
        let mut row = row.to_vec();
        if let Some((stops, tau)) = ts {
            scale_stop_mass(&mut row, stops, tau);
        }
        argmax(&row)
    }

    #[test]
    fn device_choice_matches_the_host_path() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (rows, vocab) = (6, 1000);
        let mut moved = 0;
        for case in 0..40 {
            let mut data: Vec<f32> = (0..rows * vocab).map(|_| rng.random_range(-8.0..8.0)).collect();
            let stop_sets: Vec<Vec<u32>> = (0..rows).map(|r| (0..1 + r % 2).map(|_| rng.random_range(0..vocab as u32)).collect()).collect();
            // Put the stop tokens just under the best other token, where TS decides.
            for (r, stops) in stop_sets.iter().enumerate() {
                let best = data[r * vocab..(r + 1) * vocab].iter().copied().fold(f32::MIN, f32::max);
                for &s in stops {
                    data[r * vocab + s as usize] = best - rng.random_range(0.0..3.0);
                }
            }
            let taus = [1.0f32, 1.5, 4.0, 50.0];
            let greedy: Vec<GreedyRow<'_>> = (0..rows)
                .map(|r| GreedyRow { row: r, ts: (r % 3 != 0).then(|| (stop_sets[r].as_slice(), taus[(case + r) % 4])) })
                .collect();
            let logits = Tensor::from_vec(data.clone(), (rows, vocab), &Device::Cpu).unwrap();
            let picks = pick_greedy(&logits, &greedy).unwrap();
            for (r, g) in greedy.iter().enumerate() {
                let row = &data[r * vocab..(r + 1) * vocab];
                assert_eq!(picks[r].token, host_pick(row, g.ts), "case {case} row {r}");
                if let Some((stops, _)) = g.ts {
                    assert_eq!(picks[r].top_was_stop, stops.contains(&argmax(row)), "case {case} row {r}");
                }
                moved += (picks[r].token != argmax(row)) as usize;
            }
        }
        assert!(moved > 10, "TS changed only {moved} choices: the cases do not exercise it");
    }

    #[test]
    fn ts_turns_a_close_second_stop_into_the_choice() {
        let mut row = vec![0.0f32; 100];
        row[7] = 5.0;
        row[42] = 4.9; // the stop token
        let logits = Tensor::from_vec(row.clone(), (1, 100), &Device::Cpu).unwrap();
        let plain = pick_greedy(&logits, &[GreedyRow { row: 0, ts: None }]).unwrap();
        let ts = pick_greedy(&logits, &[GreedyRow { row: 0, ts: Some((&[42], 4.0)) }]).unwrap();
        assert_eq!((plain[0].token, ts[0].token), (7, 42));
        assert!(!ts[0].top_was_stop, "TS made this stop");
        assert_eq!(ts[0].token, host_pick(&row, Some((&[42], 4.0))));
    }
}

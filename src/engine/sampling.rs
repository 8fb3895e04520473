//! Choosing the next token from edited logits (`logits.rs`): temperature, top-k, top-p, seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::request::SamplingParams;
use crate::reasoning::stopping::argmax;

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    /// Greedy: the argmax of the edited logits is the whole choice, so it can
    /// be made where the logits are (when the processors allow).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// Pick the next token from logits the processors have edited.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            .filter(|(_, w)| *w > 0.0)
            .collect();
        if p.top_k > 0 || p.top_p < 1.0 {
            // Highest first; ties broken by token id so the order is reproducible.
            probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if p.top_k > 0 {
                probs.truncate(p.top_k);
            }
            if p.top_p < 1.0 {
                let total: f32 = probs.iter().map(|(_, w)| w).sum();
                let mut acc = 0.0;
                let mut keep = probs.len();
                for (i, (_, w)) in probs.iter().enumerate() {
                    acc += w / total;
                    if acc >= p.top_p {
                        keep = i + 1;
                        break;
                    }
                }
                probs.truncate(keep);
            }
        }
        let total: f32 = probs.iter().map(|(_, w)| w).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(id, w) in &probs {
            r -= w;
            if r <= 0.0 {
                return id;
            }
        }
        probs.last().map(|(id, _)| *id).unwrap_or_else(|| argmax(logits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: Some(7), ..Default::default() }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_choices() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = || {
            let mut s = Sampler::new(params(1.0));
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams { top_k: 1, ..params(1.5) });
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 1.0, 5.0, 4.9]), 2);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 holds ~98% of the mass: top_p 0.5 must always pick it.
        let mut s = Sampler::new(SamplingParams { top_p: 0.5, ..params(1.0) });
        for _ in 0..50 {
            assert_eq!(s.sample(&[6.0, 1.0, 1.0, 0.5]), 0);
        }
    }
}

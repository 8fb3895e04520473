//! Choosing the next token from logits: penalties, temperature, top-k, top-p.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

use super::request::SamplingParams;

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// How often each token has been generated so far (for OpenAI's penalties).
    counts: HashMap<u32, u32>,
    /// Tokens seen in prompt or output (for the repetition penalty).
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        let seen = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { Default::default() };
        Sampler { params, rng, counts: HashMap::new(), seen }
    }

    /// Greedy with no penalties: the argmax of the (TS-edited) logits is the
    /// whole choice, so it can be made where the logits are.
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature <= 0.0 && p.repetition_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0
    }

    /// Record a token the sequence now contains (sampled or injected).
    pub fn observe(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
    }

    /// Pick the next token; `logits` is edited in place.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
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

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }
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

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: Some(7), ..Default::default() }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(params(0.0), &[]);
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_choices() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = || {
            let mut s = Sampler::new(params(1.0), &[]);
            (0..20).map(|_| s.sample(&mut logits.clone())).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams { top_k: 1, ..params(1.5) }, &[]);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 5.0, 4.9]), 2);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 holds ~98% of the mass: top_p 0.5 must always pick it.
        let mut s = Sampler::new(SamplingParams { top_p: 0.5, ..params(1.0) }, &[]);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [6.0, 1.0, 1.0, 0.5]), 0);
        }
    }

    #[test]
    fn frequency_penalty_discourages_repeats() {
        let mut s = Sampler::new(SamplingParams { frequency_penalty: 2.0, ..params(0.0) }, &[]);
        s.observe(0);
        assert_eq!(s.sample(&mut [1.0, 0.5]), 1);
    }

    #[test]
    fn repetition_penalty_covers_the_prompt() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 3.0, ..params(0.0) }, &[0]);
        assert_eq!(s.sample(&mut [1.0, 0.5]), 1);
    }
}

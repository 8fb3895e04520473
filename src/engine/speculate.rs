//! Speculative decoding: a few tokens are proposed as a sequence's next
//! ones, fed in one forward pass with its last token, and kept as far as
//! the model, sampling each position as it would have anyway, agrees with
//! them. Proposals come from prompt lookup (the tokens that followed the
//! latest earlier occurrence of the sequence's last few) or from a small
//! draft model with the same vocabulary, decoding greedily.
//!
//! A draft is a guess, never a distribution: each verified position is
//! sampled from its own logits, after every logit processor, with the same
//! sampler draws as plain decoding. So the output, greedy or sampled with a
//! seed, is the plain engine's token for token, and only the number of
//! forward passes changes. For a deterministic draft this is the standard
//! acceptance rule itself: with the draft's distribution q all on the
//! proposed token x, "accept with probability min(1, p(x)/q(x))" is "accept
//! with probability p(x)", and the residual (p − q)⁺ renormalised is p
//! without x, which is what a draw from p that is not x follows.

use std::path::PathBuf;

use crate::model::{SeqKvCache, Transformer};

/// What `--speculate` asks of the engine.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Speculation {
    /// Plain decoding, one token a step.
    #[default]
    Off,
    /// Prompt lookup (n-grams of the prompt and the output so far).
    Ngram,
    /// A draft model (a GGUF file or Hugging Face directory; `terse serve`
    /// resolves a fetched model's name to its path) with the target's vocabulary.
    Draft(PathBuf),
}

impl std::str::FromStr for Speculation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Speculation::Off),
            "ngram" => Ok(Speculation::Ngram),
            other => match other.strip_prefix("draft:") {
                Some("") => Err("`draft:` needs a model: `draft:NAME` or `draft:PATH`".into()),
                Some(model) => Ok(Speculation::Draft(PathBuf::from(model))),
                None => Err(format!("`{other}` is not a speculation mode: use `ngram`, `draft:MODEL` or `off`")),
            },
        }
    }
}

/// Longest and shortest suffix looked up.
const MAX_NGRAM: usize = 4;
const MIN_NGRAM: usize = 2;
/// The rows of a step that the quantized kernels take in one tile, reading
/// and unpacking each block of weights once: on a 1.5B model on two cores
/// a step of eight rows takes 75 ms, of nine 85 ms, of one 54 ms. Drafts
/// fill a step up to this many rows and no further.
pub const STEP_TILE_ROWS: usize = 8;
/// Most tokens proposed at once: with the token before them, one tile.
pub const MAX_DRAFT: usize = STEP_TILE_ROWS - 1;

/// The rows a step has left for drafts (one tile's, less one a running
/// sequence), handed out among the sequences that may draft: each gets an
/// even share of what is left, and what one leaves goes to the next. So one
/// sequence may draft seven tokens, two three or four each, four one each,
/// and eight none.
#[derive(Debug)]
pub struct DraftRows {
    spare: usize,
    drafters: usize,
}

impl DraftRows {
    /// A step of `running` sequences, `drafters` of which may draft.
    pub fn new(running: usize, drafters: usize) -> Self {
        DraftRows { spare: STEP_TILE_ROWS.saturating_sub(running), drafters }
    }

    /// The most tokens the next sequence that may draft is given.
    pub fn next_share(&mut self) -> usize {
        let share = self.spare.div_ceil(self.drafters.max(1));
        self.drafters = self.drafters.saturating_sub(1);
        share
    }

    /// `drafted` of the rows are taken.
    pub fn take(&mut self, drafted: usize) {
        self.spare = self.spare.saturating_sub(drafted);
    }
}

/// The tokens that followed the latest earlier occurrence of the longest
/// suffix of `tokens` (of `MAX_NGRAM` down to `MIN_NGRAM` tokens), at most
/// `len`; empty when no suffix occurs earlier.
pub fn propose(tokens: &[u32], len: usize) -> Vec<u32> {
    for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
        if tokens.len() <= n {
            continue;
        }
        let suffix = &tokens[tokens.len() - n..];
        // Latest first: recent text predicts best. The match must end
        // before the suffix starts, so that something follows it.
        let found = (0..tokens.len() - n).rev().find(|&at| &tokens[at..at + n] == suffix);
        if let Some(at) = found {
            let from = at + n;
            return tokens[from..(from + len).min(tokens.len())].to_vec();
        }
    }
    Vec::new()
}

/// One sequence's draft length.
///
/// For prompt lookup, whose drafts cost nothing to make: grown while drafts
/// are kept whole and shrunk to what was kept when they are not, so a
/// sequence whose text does not repeat stops paying for rows it throws away
/// (its drafts are copy or miss, which no per-token rate describes).
///
/// For a draft model, whose every drafted token costs one of its own
/// forward passes: the length that buys the most tokens per unit of time
/// at the sequence's rate of kept drafted tokens α, counted over its
/// recent drafts. k drafted tokens give (1 − α^(k+1)) / (1 − α) tokens a
/// verifying step and cost 1 + k·(c + v) plain steps, c the draft model's
/// pass and v a verified row, both in target passes. Where no length pays,
/// the sequence drafts one token every `PROBE_EVERY` steps, to notice when
/// drafts start paying again.
#[derive(Debug, Clone)]
pub struct DraftLength {
    len: usize,
    /// With a draft model: its cost per drafted token (c + v) and the recent counts.
    cost: Option<f32>,
    kept: f32,
    refused: f32,
    idle_steps: usize,
    /// A length set by the operator, never adapted.
    fixed: bool,
}

impl Default for DraftLength {
    fn default() -> Self {
        DraftLength { len: 4, cost: None, kept: 1.0, refused: 1.0, idle_steps: 0, fixed: false }
    }
}

/// A verified row's cost in plain decoding steps on the host path: a 1.5B
/// model's step of eight rows takes about 1.4x a one-row step on two cores,
/// now that a step's rows go through the kernels in one tile (docs/perf.md,
/// "Verifying in one tile").
pub const VERIFIED_ROW_COST: f32 = 0.06;
/// Counts decay by this much per verified draft, so the rate follows the text.
const RATE_MEMORY: f32 = 0.9;
/// A drafted token is taken to be kept 3 times in 4 until counted.
const PRIOR_KEPT: f32 = 3.0;
const PRIOR_REFUSED: f32 = 1.0;
/// When no length pays, one drafted token every so many steps.
const PROBE_EVERY: usize = 8;

impl DraftLength {
    /// The length policy of a draft model whose pass costs `draft_pass`
    /// target passes (its weight bytes over the target's).
    pub fn for_draft_model(draft_pass: f32) -> Self {
        DraftLength { len: 1, cost: Some(draft_pass + VERIFIED_ROW_COST), kept: PRIOR_KEPT, refused: PRIOR_REFUSED, ..Self::default() }
    }

    /// Always `len` tokens (at most `MAX_DRAFT`).
    pub fn fixed(len: usize) -> Self {
        DraftLength { len: len.clamp(1, MAX_DRAFT), fixed: true, ..Self::default() }
    }

    /// The most tokens to draft this step (0: none).
    pub fn get(&mut self) -> usize {
        if self.cost.is_none() || self.len > 0 {
            return self.len;
        }
        self.idle_steps += 1;
        if self.idle_steps >= PROBE_EVERY {
            self.idle_steps = 0;
            1
        } else {
            0
        }
    }

    /// `accepted` of `proposed` drafted tokens were kept; `refuted`: the
    /// model chose another token than the next drafted one.
    pub fn update(&mut self, proposed: usize, accepted: usize, refuted: bool) {
        self.kept = self.kept * RATE_MEMORY + accepted as f32;
        self.refused = self.refused * RATE_MEMORY + f32::from(u8::from(refuted));
        if self.fixed {
            return;
        }
        self.len = match self.cost {
            None if accepted == proposed => (self.len + 2).min(MAX_DRAFT),
            None => (accepted + 1).clamp(1, MAX_DRAFT),
            Some(cost) => best_draft_length(self.rate(), cost),
        };
    }

    /// The recent rate of kept drafted tokens (each refusal ends a draft).
    pub fn rate(&self) -> f32 {
        self.kept / (self.kept + self.refused)
    }

    /// Tokens per unit of time a draft model's next draft is expected to
    /// give (1: no better than plain decoding).
    pub fn model_gain(&self) -> f32 {
        match (self.cost, self.len) {
            (Some(cost), len) if len > 0 => draft_gain(self.rate(), len, cost),
            _ => 1.0,
        }
    }
}

/// Tokens a verifying step gives per unit of time for a draft of `len`
/// tokens, each kept at `rate` and costing `cost` plain steps.
pub fn draft_gain(rate: f32, len: usize, cost: f32) -> f32 {
    let rate = rate.clamp(0.0, 0.999);
    (1.0 - rate.powi(len as i32 + 1)) / (1.0 - rate) / (1.0 + len as f32 * cost)
}

/// The draft length with the most tokens per cost at a kept rate `rate`
/// and a cost `cost` per drafted token; 0 when drafting does not beat
/// plain decoding.
pub fn best_draft_length(rate: f32, cost: f32) -> usize {
    let gain = |k: usize| draft_gain(rate, k, cost);
    let best = (1..=MAX_DRAFT).max_by(|&a, &b| gain(a).total_cmp(&gain(b))).expect("lengths to choose from");
    if gain(best) > 1.0 {
        best
    } else {
        0
    }
}

/// A draft model's view of one sequence: its KV cache and the tokens that
/// cache was fed, which may run past the sequence's own (drafted tokens the
/// target refused) until [`DraftCache::sync`] cuts them back.
pub struct DraftCache {
    pub cache: SeqKvCache,
    pub fed: Vec<u32>,
}

impl DraftCache {
    /// A cache for a sequence whose tokens so far are `tokens`, holding what
    /// the draft model's prefix cache has of them.
    pub fn new(model: &Transformer, tokens: &[u32]) -> Self {
        let cache = model.new_cache_for(tokens);
        let fed = tokens[..cache.len()].to_vec();
        DraftCache { cache, fed }
    }

    /// Forget what was fed past the start it shares with `tokens`, keeping
    /// at least the last token unfed (a step needs a token to feed).
    pub fn sync(&mut self, tokens: &[u32]) -> candle_core::Result<()> {
        let common = self.fed.iter().zip(tokens).take_while(|(a, b)| a == b).count();
        let keep = common.min(tokens.len().saturating_sub(1));
        if keep < self.fed.len() {
            self.cache.truncate(&tokens[..keep])?;
            self.fed.truncate(keep);
        }
        Ok(())
    }

    /// The tokens of `tokens` followed by `drafted` not fed yet.
    pub fn unfed(&self, tokens: &[u32], drafted: &[u32]) -> Vec<u32> {
        let from = self.fed.len();
        if from >= tokens.len() {
            drafted[from - tokens.len()..].to_vec()
        } else {
            tokens[from..].iter().chain(drafted).copied().collect()
        }
    }
}

/// Whether two vocabularies (token text → id) are the same, and if not, one
/// token that tells them apart, for the refusal.
pub fn vocabulary_difference(
    target: &std::collections::HashMap<String, u32>,
    draft: &std::collections::HashMap<String, u32>,
) -> Option<String> {
    if target.len() != draft.len() {
        return Some(format!("{} tokens against the target's {}", draft.len(), target.len()));
    }
    let mut tokens: Vec<(&String, &u32)> = target.iter().collect();
    tokens.sort_by_key(|(_, id)| **id);
    tokens.into_iter().find(|(text, id)| draft.get(*text) != Some(id)).map(|(text, id)| match draft.get(text) {
        Some(other) => format!("token {text:?} is {other} in the draft and {id} in the target"),
        None => format!("token {text:?} (id {id} in the target) is not in the draft"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_longest_match_proposes_what_followed_it() {
        // "1 2 3 4 9 ... 1 2 3" → 4 9 (the 3-gram's latest match).
        let tokens = [1, 2, 3, 4, 9, 7, 1, 2, 3];
        assert_eq!(propose(&tokens, 2), vec![4, 9]);
        assert_eq!(propose(&tokens, 8), vec![4, 9, 7, 1, 2, 3]);
        // The latest of two matches wins.
        assert_eq!(propose(&[5, 6, 1, 5, 6, 2, 5, 6], 1), vec![2]);
        // A longer suffix beats a later shorter one.
        assert_eq!(propose(&[7, 5, 6, 1, 9, 5, 6, 2, 7, 5, 6], 1), vec![1]);
        // Nothing repeats: no draft; a lone token is no suffix.
        assert!(propose(&[1, 2, 3, 4], 4).is_empty());
        assert!(propose(&[1, 1], 4).is_empty());
        assert_eq!(propose(&[1, 2, 1, 2], 4), vec![1, 2]);
        assert!(propose(&[], 4).is_empty());
    }

    #[test]
    fn the_draft_grows_while_kept_whole_and_shrinks_to_what_was_kept() {
        let mut d = DraftLength::default();
        d.update(4, 4, false);
        assert_eq!(d.get(), 6);
        d.update(6, 6, false);
        d.update(8, 8, false);
        assert_eq!(d.get(), MAX_DRAFT);
        d.update(8, 2, true);
        assert_eq!(d.get(), 3);
        d.update(3, 0, true);
        assert_eq!(d.get(), 1);
    }

    #[test]
    fn prompt_lookup_beside_a_model_goes_first_only_while_its_drafts_are_kept() {
        let model = DraftLength::for_draft_model(0.3);
        let mut lookup = DraftLength::default();
        // Unknown lookup (rate ½) against the model's prior (¾, one token).
        let lookup_gain = |l: &DraftLength| draft_gain(l.rate(), 4, VERIFIED_ROW_COST);
        for _ in 0..10 {
            lookup.update(4, 4, false);
        }
        assert!(lookup_gain(&lookup) > model.model_gain(), "copied text kept whole beats the model");
        // Refused at once, long enough for the kept ones to be forgotten.
        for _ in 0..30 {
            lookup.update(4, 0, true);
        }
        assert!(lookup_gain(&lookup) < model.model_gain(), "a lookup refused at once loses to the model");
        assert_eq!(DraftLength::default().model_gain(), 1.0);
    }

    #[test]
    fn a_draft_model_drafts_as_far_as_its_kept_rate_pays_for() {
        // Free drafts at a high rate: as long as allowed; dearer ones: shorter.
        assert_eq!(best_draft_length(0.95, 0.0), MAX_DRAFT);
        assert!(best_draft_length(0.9, 0.6) < best_draft_length(0.9, 0.2));
        assert!(best_draft_length(0.7, 0.3) < best_draft_length(0.9, 0.3));
        // At 0.8 and 0.6 a drafted token: 1.8 / 1.6 beats 2.44 / 2.2.
        assert_eq!(best_draft_length(0.8, 0.6), 1);
        // A draft as dear as the target at a modest rate does not pay.
        assert_eq!(best_draft_length(0.5, 1.0), 0);
        assert_eq!(best_draft_length(0.0, 0.1), 0);

        let mut d = DraftLength::for_draft_model(0.3);
        assert_eq!(d.get(), 1);
        for _ in 0..20 {
            let len = d.get();
            d.update(len, len, false);
        }
        assert!(d.get() >= 6, "every drafted token kept: long drafts ({})", d.get());
        // Every one refused, long enough for the kept ones to be forgotten.
        for _ in 0..60 {
            let len = d.get();
            d.update(len, 0, len > 0);
        }
        // Nothing kept: no drafts, but for one token every PROBE_EVERY steps.
        let drafted: Vec<usize> = (0..2 * PROBE_EVERY).map(|_| d.get()).collect();
        assert_eq!(drafted.iter().filter(|&&n| n == 1).count(), 2, "{drafted:?}");
        assert_eq!(drafted.iter().filter(|&&n| n == 0).count(), 2 * PROBE_EVERY - 2);
    }

    #[test]
    fn drafts_share_the_rows_of_one_tile() {
        let shares = |running: usize, drafters: usize, taking: &dyn Fn(usize) -> usize| {
            let mut rows = DraftRows::new(running, drafters);
            (0..drafters)
                .map(|_| {
                    let share = rows.next_share();
                    rows.take(taking(share));
                    share
                })
                .collect::<Vec<_>>()
        };
        let all = |share: usize| share;
        assert_eq!(shares(1, 1, &all), vec![MAX_DRAFT]);
        assert_eq!(shares(2, 2, &all), vec![3, 3]);
        assert_eq!(shares(4, 4, &all), vec![1, 1, 1, 1]);
        assert_eq!(shares(6, 6, &all), vec![1, 1, 0, 0, 0, 0]);
        assert_eq!(shares(8, 8, &all), vec![0; 8]);
        assert_eq!(shares(12, 3, &all), vec![0; 3]);
        // A sequence that drafts nothing leaves its rows to the next.
        assert_eq!(shares(2, 2, &|_| 0), vec![3, 6]);
        // A plain sequence beside one that may draft takes its own row only.
        assert_eq!(shares(2, 1, &all), vec![6]);
        // Every row handed out fits the tile.
        for running in 1..=STEP_TILE_ROWS {
            let total: usize = shares(running, running, &all).iter().sum();
            assert_eq!(total + running, STEP_TILE_ROWS, "{running} running");
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("ngram".parse::<Speculation>(), Ok(Speculation::Ngram));
        assert_eq!("off".parse::<Speculation>(), Ok(Speculation::Off));
        assert_eq!("draft:qwen2.5-0.5b".parse::<Speculation>(), Ok(Speculation::Draft("qwen2.5-0.5b".into())));
        assert!("draft:".parse::<Speculation>().unwrap_err().contains("needs a model"));
        assert!("fast".parse::<Speculation>().is_err());
    }

    #[test]
    fn vocabularies_differ_by_size_or_by_a_token() {
        let vocab = |pairs: &[(&str, u32)]| pairs.iter().map(|&(t, i)| (t.to_string(), i)).collect();
        let target = vocab(&[("a", 0), ("b", 1), ("c", 2)]);
        assert_eq!(vocabulary_difference(&target, &target), None);
        assert!(vocabulary_difference(&target, &vocab(&[("a", 0), ("b", 1)])).unwrap().contains("2 tokens against the target's 3"));
        let swapped = vocab(&[("a", 0), ("b", 2), ("c", 1)]);
        assert_eq!(vocabulary_difference(&target, &swapped).unwrap(), "token \"b\" is 2 in the draft and 1 in the target");
        assert!(vocabulary_difference(&target, &vocab(&[("a", 0), ("b", 1), ("d", 2)])).unwrap().contains("\"c\" (id 2 in the target) is not in the draft"));
    }

    /// The verification's coupling on a small vocabulary: a draw from the
    /// target's distribution p, compared with a deterministic draft x, keeps
    /// x with probability p(x), and the tokens that come out follow p. The
    /// bounds (four standard errors) fail if either drifts.
    #[test]
    fn verification_keeps_the_target_distribution() {
        use crate::engine::{Sampler, SamplingParams};
        let p = [0.5f32, 0.3, 0.15, 0.05];
        let logits: Vec<f32> = p.iter().map(|q| q.ln()).collect();
        let mut sampler = Sampler::new(SamplingParams { temperature: 1.0, seed: Some(11), ..SamplingParams::default() });
        let draft = 1u32;
        let n = 40_000;
        let mut counts = [0usize; 4];
        let mut kept = 0;
        for _ in 0..n {
            let token = sampler.sample(&logits);
            counts[token as usize] += 1;
            kept += usize::from(token == draft);
        }
        let within = |observed: usize, prob: f32| {
            let sd = (n as f32 * prob * (1.0 - prob)).sqrt();
            (observed as f32 - n as f32 * prob).abs() <= 4.0 * sd
        };
        assert!(within(kept, p[draft as usize]), "kept {kept} of {n}, expected about {}", n as f32 * p[1]);
        for (token, (&c, &prob)) in counts.iter().zip(&p).enumerate() {
            assert!(within(c, prob), "token {token}: {c} of {n}, expected about {}", n as f32 * prob);
        }
    }
}

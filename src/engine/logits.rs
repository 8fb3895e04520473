//! The editors of one sequence's next-token logits, as one chain.
//!
//! Each step, a sequence's row of logits goes through its processors in a
//! fixed order, then to the [`Sampler`](super::Sampler):
//! 1. reasoning control (temperature-scaled stopping), on the model's own
//!    distribution, before anything else has moved it;
//! 2. penalties (presence, frequency, repetition), on the request's own terms;
//! 3. the request's logit bias;
//! 4. the grammar's mask (`grammar.rs`), in the answer phase only, last, so
//!    that nothing after it can bring back a token it ruled out.
//!
//! Every token the sequence takes in, sampled or injected, reaches every
//! processor the same way ([`LogitChain::accept`]), so an injected `Wait` is
//! counted by the penalties exactly as a sampled one is.
//!
//! On a GPU a greedy row can be chosen where the logits are (`device_pick`)
//! when no processor needs the whole row on the host: each says what it
//! would do to the next token ([`DeviceEdit`]).

use std::collections::{HashMap, HashSet};

use super::grammar::GrammarMask;
use super::request::SamplingParams;
use crate::reasoning::control::{ForcedKind, ReasoningControl};
use crate::reasoning::phase::Phase;

/// What a processor does to the next token's logits, as the device path sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceEdit<'a> {
    /// Nothing.
    None,
    /// TS's edit of the stop mass, which the device path computes itself.
    ScaleStops { stops: &'a [u32], tau: f32 },
    /// Something only the host path does.
    HostOnly,
}

/// One editor of a sequence's logits.
pub trait LogitProcessor: Send {
    /// Edit the next token's logits in place.
    fn apply(&mut self, logits: &mut [f32]);
    /// A token the sequence now holds: sampled (`forced` is `None`) or injected.
    fn accept(&mut self, token: u32, forced: Option<ForcedKind>);
    /// What [`Self::apply`] would do to the next token.
    fn device_edit(&self) -> DeviceEdit<'_>;
}

impl LogitProcessor for ReasoningControl {
    fn apply(&mut self, logits: &mut [f32]) {
        self.edit_logits(logits);
    }

    fn accept(&mut self, token: u32, forced: Option<ForcedKind>) {
        self.observe(token, forced);
    }

    fn device_edit(&self) -> DeviceEdit<'_> {
        match self.stop_edit() {
            Some((stops, tau)) => DeviceEdit::ScaleStops { stops, tau },
            None => DeviceEdit::None,
        }
    }
}

/// OpenAI's additive presence and frequency penalties and the multiplicative
/// repetition penalty of CTRL / Hugging Face (which also counts the prompt).
pub struct Penalties {
    presence: f32,
    frequency: f32,
    repetition: f32,
    /// How often each token has been taken in so far.
    counts: HashMap<u32, u32>,
    /// Tokens seen in prompt or output, for the repetition penalty.
    seen: HashSet<u32>,
}

impl Penalties {
    pub fn new(params: &SamplingParams, prompt: &[u32]) -> Self {
        let repetition = params.repetition_penalty;
        let seen = if repetition != 1.0 { prompt.iter().copied().collect() } else { HashSet::new() };
        Penalties { presence: params.presence_penalty, frequency: params.frequency_penalty, repetition, counts: HashMap::new(), seen }
    }

    fn neutral(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0 && self.repetition == 1.0
    }
}

impl LogitProcessor for Penalties {
    fn apply(&mut self, logits: &mut [f32]) {
        if self.repetition != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / self.repetition } else { *l * self.repetition };
                }
            }
        }
        if self.presence != 0.0 || self.frequency != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= self.presence + self.frequency * c as f32;
                }
            }
        }
    }

    fn accept(&mut self, token: u32, _forced: Option<ForcedKind>) {
        *self.counts.entry(token).or_default() += 1;
        if self.repetition != 1.0 {
            self.seen.insert(token);
        }
    }

    fn device_edit(&self) -> DeviceEdit<'_> {
        if self.neutral() {
            DeviceEdit::None
        } else {
            DeviceEdit::HostOnly
        }
    }
}

/// OpenAI's `logit_bias`: a number added to a token's logit (−100 bans it,
/// 100 all but forces it).
pub struct LogitBias(pub Vec<(u32, f32)>);

impl LogitProcessor for LogitBias {
    fn apply(&mut self, logits: &mut [f32]) {
        for &(t, bias) in &self.0 {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
    }

    fn accept(&mut self, _token: u32, _forced: Option<ForcedKind>) {}

    fn device_edit(&self) -> DeviceEdit<'_> {
        if self.0.is_empty() {
            DeviceEdit::None
        } else {
            DeviceEdit::HostOnly
        }
    }
}

/// A sequence's processors, in the order of the module's documentation.
pub struct LogitChain {
    /// Also the sequence's phase and token counts, which the engine reads.
    pub reasoning: ReasoningControl,
    penalties: Penalties,
    bias: LogitBias,
    grammar: Option<GrammarMask>,
}

impl LogitChain {
    pub fn new(reasoning: ReasoningControl, penalties: Penalties) -> Self {
        LogitChain { reasoning, penalties, bias: LogitBias(Vec::new()), grammar: None }
    }

    /// With the request's logit bias and its answer's grammar.
    pub fn with(mut self, bias: LogitBias, grammar: Option<GrammarMask>) -> Self {
        self.bias = bias;
        self.grammar = grammar;
        self
    }

    fn processors(&mut self) -> [&mut dyn LogitProcessor; 3] {
        [&mut self.reasoning, &mut self.penalties, &mut self.bias]
    }

    fn processors_ref(&self) -> [&dyn LogitProcessor; 3] {
        [&self.reasoning, &self.penalties, &self.bias]
    }

    /// Every processor's edit of the next token's logits, in order.
    pub fn apply(&mut self, logits: &mut [f32]) {
        for p in self.processors() {
            p.apply(logits);
        }
        if let Some(grammar) = self.answer_grammar() {
            grammar.apply(logits);
        }
    }

    /// The grammar, when the next token is an answer token it holds.
    fn answer_grammar(&mut self) -> Option<&mut GrammarMask> {
        if self.reasoning.phase() != Phase::Answer {
            return None;
        }
        self.grammar.as_mut()
    }

    /// Whether the next token's logits go through a grammar's mask.
    pub fn needs_mask(&self) -> bool {
        self.grammar.is_some() && self.reasoning.phase() == Phase::Answer
    }

    /// Two or more tokens the grammar forces next, to feed at once (see
    /// `GrammarMask::fast_forward`); empty when it forces fewer.
    pub fn grammar_fast_forward(&mut self) -> Vec<u32> {
        self.answer_grammar().map_or_else(Vec::new, GrammarMask::fast_forward)
    }

    /// Work out the grammar's next step (its forced run, else its mask) ahead
    /// of [`Self::grammar_fast_forward`] and [`Self::apply`], which would
    /// otherwise do it then, so it can overlap the forward pass.
    pub fn prepare_grammar(&mut self) {
        if let Some(grammar) = self.answer_grammar() {
            grammar.prepare();
        }
    }

    /// A token the sequence now holds, to every processor. The grammar takes
    /// only the tokens sampled in the answer phase.
    pub fn accept(&mut self, token: u32, forced: Option<ForcedKind>) {
        let phase = self.reasoning.phase();
        for p in self.processors() {
            p.accept(token, forced);
        }
        if let Some(grammar) = self.grammar.as_mut() {
            if forced.is_none() && phase == Phase::Answer {
                grammar.accept(token);
            }
            grammar.note_completion_token();
        }
    }

    /// For the device's greedy choice: `Some(ts)` when the next token needs
    /// at most TS's stop scaling (`ts`, if it moves anything), `None` when a
    /// processor needs the row on the host.
    pub fn device_plan(&self) -> Option<Option<(&[u32], f32)>> {
        if self.grammar.is_some() {
            return None;
        }
        let mut ts = None;
        for p in self.processors_ref() {
            match p.device_edit() {
                DeviceEdit::None => {}
                DeviceEdit::ScaleStops { stops, tau } if ts.is_none() => ts = Some((stops, tau)),
                DeviceEdit::ScaleStops { .. } | DeviceEdit::HostOnly => return None,
            }
        }
        Some(ts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn penalties(params: SamplingParams, prompt: &[u32]) -> Penalties {
        Penalties::new(&params, prompt)
    }

    #[test]
    fn frequency_penalty_discourages_repeats() {
        let mut p = penalties(SamplingParams { frequency_penalty: 2.0, ..Default::default() }, &[]);
        p.accept(0, None);
        let mut logits = [1.0, 0.5];
        p.apply(&mut logits);
        assert!(logits[1] > logits[0], "{logits:?}");
        assert_eq!(p.device_edit(), DeviceEdit::HostOnly);
    }

    #[test]
    fn repetition_penalty_covers_the_prompt() {
        let mut p = penalties(SamplingParams { repetition_penalty: 3.0, ..Default::default() }, &[0]);
        let mut logits = [1.0, 0.5];
        p.apply(&mut logits);
        assert!(logits[1] > logits[0], "{logits:?}");
    }

    #[test]
    fn logit_bias_moves_the_named_tokens_and_needs_the_host() {
        let mut b = LogitBias(vec![(1, 100.0), (0, -100.0), (9, 5.0)]);
        let mut logits = [1.0, 0.5];
        b.apply(&mut logits);
        assert_eq!(logits, [-99.0, 100.5]);
        assert_eq!(b.device_edit(), DeviceEdit::HostOnly);
        assert_eq!(LogitBias(vec![]).device_edit(), DeviceEdit::None);
    }

    #[test]
    fn neutral_penalties_leave_the_device_path_open() {
        let p = penalties(SamplingParams::default(), &[1, 2]);
        assert_eq!(p.device_edit(), DeviceEdit::None);
    }
}

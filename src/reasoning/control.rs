//! One sequence's thinking control: TS on the logits, budget forcing, counts.
//!
//! The engine asks, each time the sequence is about to choose a token:
//! 1. [`ReasoningControl::forced_now`]: tokens to inject instead of sampling
//!    (the end-of-thinking text at the `max_thinking_tokens` cap);
//! 2. otherwise it edits the logits with [`ReasoningControl::edit_logits`] (TS),
//!    applies the request's own sampling, and reports the choice to
//!    [`ReasoningControl::after_sample`], which may replace a too-early stop by
//!    the continuation text (`min_thinking_tokens`).
//!
//! Injected tokens are fed through the model like prompt tokens, counted as
//! forced, and returned as part of the text.
//!
//! Answer probing (`probe`, see `probing`) adds a third question after each
//! kept token, [`ReasoningControl::start_probe`]: whether to append the probe
//! text now. While a probe runs the engine decodes greedily into
//! [`ReasoningControl::probe_token`] and then rolls the sequence back; a
//! probe's tokens are never observed, so no count or phase moves. Once the
//! answer has settled, `forced_now` closes the thought as at a budget.
//! Probes at reflection words come before the sampled token instead:
//! [`ReasoningControl::start_probe_before`] holds it back, and once the probe
//! is over [`ReasoningControl::take_held`] gives it back to be taken in, or
//! nothing if the answer settled (its thought ends without the `Wait`).

use super::phase::{Phase, PhaseTracker};
use super::probing::{ProbeAnswer, ProbeSettings, ProbeStep, Prober};
use super::stopping::{argmax, scale_stop_mass};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// No control: the model stops when it stops.
    None,
    /// Temperature-scaled stopping.
    Ts,
    /// s1-style budget forcing.
    Budget,
    /// Answer probing: stop once the probed answer has settled.
    Probe,
}

impl Strategy {
    pub fn parse(name: &str) -> Option<Strategy> {
        Some(match name {
            "ts" => Strategy::Ts,
            "budget" => Strategy::Budget,
            "probe" => Strategy::Probe,
            "none" => Strategy::None,
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::Ts => "ts",
            Strategy::Budget => "budget",
            Strategy::Probe => "probe",
        }
    }
}

impl<'de> serde::Deserialize<'de> for Strategy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Strategy::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("must be one of ts, budget, probe or none, got \"{name}\"")))
    }
}

impl serde::Serialize for Strategy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Why tokens were injected: the `kind` label of the forced-token metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForcedKind {
    /// The end-of-thinking (or wrap-up) text at the budget.
    EndOfThinking,
    /// The continuation text replacing an early stop.
    Continuation,
}

impl ForcedKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ForcedKind::EndOfThinking => "end_of_thinking",
            ForcedKind::Continuation => "continuation",
        }
    }
}

/// The per-request settings, after the mode preset and the request's overrides are merged.
#[derive(Debug, Clone, PartialEq)]
pub struct ReasoningSettings {
    pub strategy: Strategy,
    /// τ ≥ 1 for TS.
    pub stop_temperature: f32,
    /// Grow τ from 1 toward `stop_temperature` as thinking approaches the budget.
    pub ramp: bool,
    /// The thinking budget: the cap for budget forcing, the ramp's horizon for TS.
    pub max_thinking_tokens: Option<usize>,
    /// Below this many thinking tokens a sampled stop becomes the continuation text.
    pub min_thinking_tokens: Option<usize>,
    /// The `probe` strategy's settings.
    pub probe: ProbeSettings,
    /// Reflection words to probe before, in place of the model's (the
    /// engine tokenizes them into [`Injections::probe_words`]).
    pub probe_words: Option<Vec<String>>,
    /// TS on a model without think tokens: a stop TS made becomes the
    /// wrap-up text and a short answer, instead of ending the reply.
    pub wrap_up: bool,
}

impl Default for ReasoningSettings {
    fn default() -> Self {
        ReasoningSettings {
            strategy: Strategy::None,
            stop_temperature: 1.0,
            ramp: false,
            max_thinking_tokens: None,
            min_thinking_tokens: None,
            probe: ProbeSettings::default(),
            probe_words: None,
            wrap_up: false,
        }
    }
}

/// What a model injects, tokenized once at load from its manifest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Injections {
    /// Closes the thought (`\n</think>\n\n`), or for models without think
    /// tokens wraps up the answer (`\nFinal answer:`).
    pub end_of_thinking: Vec<u32>,
    /// Replaces an early stop (`Wait`).
    pub continuation: Vec<u32>,
    /// Models without think tokens: answer tokens allowed after the wrap-up text.
    pub answer_tokens_after_wrap_up: Option<usize>,
    /// Appended to probe the answer (`… Final answer: \boxed{`), then rolled back.
    pub probe: Vec<u32>,
    /// The probe text ends in `{`: its answer ends at the closing brace.
    pub probe_braced: bool,
    /// Tokens that begin one of the probe words (`Wait`, ` Wait`, `Hmm`,
    /// ...): where probes `at` reflection come. A token that begins a longer
    /// word (`Wait` of `Waiting`, where the tokenizer splits it) counts too.
    pub probe_words: Vec<u32>,
}

/// Why the thinking phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThinkStopReason {
    /// The model stopped thinking on its own.
    Natural,
    /// It stopped while TS was raising the stop probability, on a token that
    /// was not its own first choice (the unscaled argmax): TS made the stop.
    StopTemperature,
    /// The budget cap forced the end-of-thinking text.
    Budget,
    /// The probed answer settled and the end-of-thinking text was forced.
    Probe,
    /// max_tokens or the context ran out first.
    Length,
    /// The client went away first.
    Cancelled,
}

impl ThinkStopReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            ThinkStopReason::Natural => "natural",
            ThinkStopReason::StopTemperature => "stop_temperature",
            ThinkStopReason::Budget => "budget",
            ThinkStopReason::Probe => "probe",
            ThinkStopReason::Length => "length",
            ThinkStopReason::Cancelled => "cancelled",
        }
    }
}

/// What to do with a sampled token.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Keep the sampled token.
    Keep,
    /// Drop the sampled token and inject these instead, of this kind.
    Replace(Vec<u32>, ForcedKind),
}

/// What becomes of the token a reflection probe held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The answer did not settle: take the token in as sampled.
    Take(u32),
    /// It settled: the token is dropped, and [`ReasoningControl::forced_now`]
    /// closes the thought in its place.
    Dropped,
}

#[derive(Debug, Clone)]
pub struct ReasoningControl {
    settings: ReasoningSettings,
    injections: Injections,
    tracker: PhaseTracker,
    end_of_turn: Vec<u32>,
    /// Tokens of the controlled phase so far (THINKING, or the whole answer of a
    /// model without think tokens).
    controlled: usize,
    thinking_tokens: usize,
    answer_tokens: usize,
    /// Injected tokens, by [`ForcedKind`] (end of thinking, continuation).
    forced: [usize; 2],
    /// Models without think tokens: answer tokens still allowed after the wrap-up.
    after_wrap_up: Option<usize>,
    stop_reason: Option<ThinkStopReason>,
    /// Budget forcing has fired.
    budget_spent: bool,
    /// Before TS's edit of the latest logits, the top token was a stop token:
    /// a stop then is the model's own, not TS's doing.
    top_was_stop: bool,
    /// The phase the latest observed token belongs to.
    last_token_phase: Phase,
    /// Under `probe`: the probes' schedule, answers and cost.
    prober: Option<Prober>,
}

impl ReasoningControl {
    pub fn new(settings: ReasoningSettings, injections: Injections, tracker: PhaseTracker, end_of_turn: Vec<u32>) -> Self {
        ReasoningControl {
            end_of_turn,
            controlled: 0,
            thinking_tokens: 0,
            answer_tokens: 0,
            forced: [0; 2],
            after_wrap_up: None,
            stop_reason: None,
            budget_spent: false,
            top_was_stop: false,
            last_token_phase: tracker.phase(),
            prober: (settings.strategy == Strategy::Probe).then(|| Prober::new(settings.probe, injections.probe_braced)),
            settings,
            injections,
            tracker,
        }
    }

    fn has_think_tokens(&self) -> bool {
        self.tracker.think_tokens().is_some()
    }

    /// Whether the phase under control is running: THINKING for a thinking
    /// model, the whole answer (until a wrap-up) for one without think tokens.
    fn controlling(&self) -> bool {
        if self.has_think_tokens() {
            self.tracker.phase() == Phase::Thinking
        } else {
            self.after_wrap_up.is_none()
        }
    }

    /// τ in force for the next token. Ramp schedule: τ(n) = 1 + (τ_max − 1) · min(1, n / B)
    /// for n controlled tokens so far and budget B, so the stop probability rises
    /// smoothly and reaches the full τ at the budget (without a budget, no ramp).
    pub fn current_stop_temperature(&self) -> f32 {
        let s = &self.settings;
        if s.strategy != Strategy::Ts || !self.controlling() {
            return 1.0;
        }
        match (s.ramp, s.max_thinking_tokens) {
            (true, Some(budget)) if budget > 0 => {
                let progress = (self.controlled as f32 / budget as f32).min(1.0);
                1.0 + (s.stop_temperature - 1.0) * progress
            }
            _ => s.stop_temperature,
        }
    }

    /// Tokens to inject now instead of sampling: the end-of-thinking text once the
    /// controlled phase reaches `max_thinking_tokens` under budget forcing. The
    /// caller adds them to the sequence and reports each to [`Self::observe`].
    pub fn forced_now(&mut self) -> Option<Vec<u32>> {
        let s = &self.settings;
        if !matches!(s.strategy, Strategy::Budget | Strategy::Probe) || self.budget_spent || !self.controlling() {
            return None;
        }
        // Under `probe` the budget stays a hard cap, and a settled answer ends thinking first.
        let settled = self.prober.as_ref().is_some_and(Prober::settled);
        let at_cap = s.max_thinking_tokens.is_some_and(|cap| self.controlled >= cap);
        if !settled && !at_cap {
            return None;
        }
        Some(self.wrap_up(if settled { ThinkStopReason::Probe } else { ThinkStopReason::Budget }))
    }

    /// End the controlled phase with the end-of-thinking (or wrap-up) text,
    /// for `reason`; a model without think tokens then gets its short answer.
    fn wrap_up(&mut self, reason: ThinkStopReason) -> Vec<u32> {
        // Once only, even if the configured text lacks the close token.
        self.budget_spent = true;
        self.stop_reason = Some(reason);
        if !self.has_think_tokens() {
            self.after_wrap_up = Some(self.injections.answer_tokens_after_wrap_up.unwrap_or(usize::MAX));
        }
        self.injections.end_of_thinking.clone()
    }

    /// Whether to probe the answer now, with room for `room` more positions
    /// in the sequence: the probe text to append, fed but never observed.
    /// Asked after each kept token; the engine rolls back when the probe ends.
    pub fn start_probe(&mut self, room: usize) -> Option<Vec<u32>> {
        if !self.may_probe() {
            return None;
        }
        let (controlled, text) = (self.controlled, &self.injections.probe);
        let prober = self.prober.as_mut()?;
        prober.start(controlled, room, text.len()).then(|| text.clone())
    }

    /// Whether `start_probe(room)` would start a probe now; asking changes
    /// nothing (speculative decoding stops verifying a draft there).
    pub fn probe_due(&self, room: usize) -> bool {
        if !self.may_probe() {
            return false;
        }
        self.prober.as_ref().is_some_and(|p| p.due(self.controlled, room, self.injections.probe.len()))
    }

    /// Whether to probe before taking in the sampled `token`, a reflection
    /// word's first: the probe text to append, with `token` held back. Asked
    /// before [`Self::after_sample`]; once the probe is rolled back the
    /// engine asks [`Self::take_held`].
    pub fn start_probe_before(&mut self, token: u32, room: usize) -> Option<Vec<u32>> {
        if self.prober.is_none() || !self.may_probe() {
            return None;
        }
        let reflects = self.injections.probe_words.contains(&token);
        let (controlled, text) = (self.controlled, &self.injections.probe);
        let prober = self.prober.as_mut()?;
        prober.start_before(token, reflects, controlled, room, text.len()).then(|| text.clone())
    }

    /// Whether `start_probe_before(token, room)` would start a probe; asking
    /// changes nothing.
    pub fn probe_due_before(&self, token: u32, room: usize) -> bool {
        let Some(prober) = self.prober.as_ref().filter(|_| self.may_probe()) else { return false };
        prober.due_before(self.injections.probe_words.contains(&token), self.controlled, room, self.injections.probe.len())
    }

    fn may_probe(&self) -> bool {
        !self.budget_spent && self.controlling() && !self.injections.probe.is_empty()
    }

    /// After a reflection probe is rolled back: what becomes of the token it
    /// held; `None` after a probe that held none.
    pub fn take_held(&mut self) -> Option<Held> {
        let prober = self.prober.as_mut()?;
        let token = prober.take_held()?;
        Some(if prober.settled() { Held::Dropped } else { Held::Take(token) })
    }

    /// Whether a probe is running (its tokens are decoded greedily, on the
    /// unedited logits, into [`Self::probe_token`]).
    pub fn probing(&self) -> bool {
        self.prober.as_ref().is_some_and(Prober::running)
    }

    /// The running probe's next greedy token, its probability, whether it
    /// ends the turn; `decode` turns the probe's tokens into text.
    pub fn probe_token(&mut self, token: u32, prob: f32, decode: impl Fn(&[u32]) -> String) -> ProbeStep {
        let end_of_turn = self.end_of_turn.contains(&token);
        self.prober.as_mut().expect("a probe is running").push(token, prob, end_of_turn, decode)
    }

    /// What the latest probe answered.
    pub fn last_probe_answer(&self) -> Option<&ProbeAnswer> {
        self.prober.as_ref().and_then(|p| p.answers().last())
    }

    /// Tokens the probes fed through the model (not part of the completion).
    pub fn probe_tokens(&self) -> usize {
        self.prober.as_ref().map_or(0, Prober::spent)
    }

    /// Probes so far, by `ProbeOutcome` (settled, unsettled, no answer).
    pub fn probe_outcomes(&self) -> [usize; 3] {
        self.prober.as_ref().map_or([0; 3], Prober::outcomes)
    }

    /// The stop set and τ of TS for the next token, when TS moves anything (τ > 1).
    pub fn stop_edit(&self) -> Option<(&[u32], f32)> {
        let tau = self.current_stop_temperature();
        (tau > 1.0).then(|| (self.tracker.stop_set(&self.end_of_turn), tau))
    }

    /// Apply TS to the logits of the next token (no-op when τ = 1), noting
    /// first whether the model's own top token stops.
    pub fn edit_logits(&mut self, logits: &mut [f32]) {
        let tau = self.current_stop_temperature();
        if tau > 1.0 {
            let stops = self.tracker.stop_set(&self.end_of_turn);
            self.top_was_stop = stops.contains(&argmax(logits));
            scale_stop_mass(logits, stops, tau);
        }
    }

    /// For logits TS edited elsewhere (on the device): whether the top token
    /// before the edit was a stop token.
    pub fn note_top_before_edit(&mut self, was_stop: bool) {
        self.top_was_stop = was_stop;
    }

    /// Judge a sampled token: a stop before `min_thinking_tokens` is replaced by
    /// the continuation text (the caller injects it and reports each token to
    /// [`Self::observe`]); otherwise the caller keeps and observes the token.
    pub fn after_sample(&mut self, token: u32) -> Decision {
        let stops_phase = self.controlling() && self.tracker.stop_set(&self.end_of_turn).contains(&token);
        if !stops_phase {
            return Decision::Keep;
        }
        let min = self.settings.min_thinking_tokens.unwrap_or(0);
        if self.controlled < min && !self.injections.continuation.is_empty() {
            return Decision::Replace(self.injections.continuation.clone(), ForcedKind::Continuation);
        }
        let made_by_ts = self.current_stop_temperature() > 1.0 && !self.top_was_stop;
        // A reply without think tokens that TS cut short gets its answer said.
        if made_by_ts && self.settings.wrap_up && !self.has_think_tokens() && !self.injections.end_of_thinking.is_empty() {
            return Decision::Replace(self.wrap_up(ThinkStopReason::StopTemperature), ForcedKind::EndOfThinking);
        }
        if self.stop_reason.is_none() {
            self.stop_reason = Some(if made_by_ts { ThinkStopReason::StopTemperature } else { ThinkStopReason::Natural });
        }
        Decision::Keep
    }

    /// Count a token the sequence now holds (sampled, or `forced` by an
    /// injection of that kind); returns the phase it belongs to.
    pub fn observe(&mut self, token: u32, forced: Option<ForcedKind>) -> Phase {
        let was_controlling = self.controlling();
        let phase = self.tracker.observe(token);
        match phase {
            Phase::Thinking => self.thinking_tokens += 1,
            Phase::Answer => self.answer_tokens += 1,
        }
        if let Some(kind) = forced {
            self.forced[kind as usize] += 1;
        }
        if was_controlling && !self.budget_spent {
            self.controlled += 1;
        }
        if let Some(left) = self.after_wrap_up.as_mut() {
            if forced.is_none() {
                *left = left.saturating_sub(1);
            }
        }
        self.last_token_phase = phase;
        phase
    }

    /// The phase the latest observed token belongs to (the close token of a
    /// thought belongs to the thought, though the phase after it is ANSWER).
    pub fn last_token_phase(&self) -> Phase {
        self.last_token_phase
    }

    /// Models without think tokens: the wrap-up's answer allowance is used up.
    pub fn answer_allowance_spent(&self) -> bool {
        self.after_wrap_up == Some(0)
    }

    pub fn phase(&self) -> Phase {
        self.tracker.phase()
    }

    pub fn thinking_tokens(&self) -> usize {
        self.thinking_tokens
    }

    pub fn answer_tokens(&self) -> usize {
        self.answer_tokens
    }

    pub fn forced_tokens(&self) -> usize {
        self.forced.iter().sum()
    }

    pub fn forced_tokens_of(&self, kind: ForcedKind) -> usize {
        self.forced[kind as usize]
    }

    /// Why the controlled phase ended; `ended_by` says how the completion ended,
    /// for a phase that ran to the end. A model without think tokens always has
    /// one (its whole response); a thinking model only if it thought.
    pub fn stop_reason(&self, ended_by: ThinkStopReason) -> Option<ThinkStopReason> {
        if self.stop_reason.is_some() {
            return self.stop_reason;
        }
        if !self.has_think_tokens() || (self.thinking_tokens > 0 && self.controlling()) {
            return Some(ended_by);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::phase::ThinkTokens;
    use super::super::probing::{ProbeAt, ProbeOutcome};
    use super::*;

    const THINK: ThinkTokens = ThinkTokens { open: 10, close: 11 };
    const EOT: u32 = 0;

    fn injections() -> Injections {
        Injections { end_of_thinking: vec![12, 11, 13], continuation: vec![20], answer_tokens_after_wrap_up: Some(3), probe: vec![30, 31], probe_braced: true, probe_words: vec![40] }
    }

    fn thinking(settings: ReasoningSettings) -> ReasoningControl {
        ReasoningControl::new(settings, injections(), PhaseTracker::new(Some(THINK), &[1, 10]), vec![EOT])
    }

    fn budget(max: usize) -> ReasoningSettings {
        ReasoningSettings { strategy: Strategy::Budget, max_thinking_tokens: Some(max), ..Default::default() }
    }

    /// What the engine does with one sampled token; returns injected tokens.
    fn step(c: &mut ReasoningControl, sampled: u32) -> Vec<u32> {
        if let Some(forced) = c.forced_now() {
            for &t in &forced {
                c.observe(t, Some(ForcedKind::EndOfThinking));
            }
            return forced;
        }
        match c.after_sample(sampled) {
            Decision::Keep => {
                c.observe(sampled, None);
                vec![]
            }
            Decision::Replace(cont, kind) => {
                for &t in &cont {
                    c.observe(t, Some(kind));
                }
                cont
            }
        }
    }

    #[test]
    fn budget_forces_the_delimiter_exactly_at_the_cap() {
        let mut c = thinking(budget(3));
        for t in [5, 6, 7] {
            assert_eq!(step(&mut c, t), Vec::<u32>::new());
        }
        assert_eq!(c.thinking_tokens(), 3);
        assert_eq!(step(&mut c, 8), vec![12, 11, 13]);
        assert_eq!(c.phase(), Phase::Answer);
        assert_eq!(c.forced_tokens(), 3);
        // 3 sampled + "12" and the close token belong to the thought; 13 is the answer's.
        assert_eq!((c.thinking_tokens(), c.answer_tokens()), (5, 1));
        assert_eq!(step(&mut c, 8), Vec::<u32>::new(), "forced once");
        assert_eq!(c.stop_reason(ThinkStopReason::Length), Some(ThinkStopReason::Budget));
    }

    #[test]
    fn a_delimiter_text_without_the_close_token_forces_only_once() {
        let inj = Injections { end_of_thinking: vec![12], ..injections() };
        let mut c = ReasoningControl::new(budget(1), inj, PhaseTracker::new(Some(THINK), &[10]), vec![EOT]);
        assert_eq!(step(&mut c, 5), Vec::<u32>::new());
        assert_eq!(step(&mut c, 6), vec![12]);
        assert_eq!(step(&mut c, 7), Vec::<u32>::new());
    }

    #[test]
    fn min_thinking_replaces_an_early_stop() {
        let s = ReasoningSettings { min_thinking_tokens: Some(2), ..Default::default() };
        let mut c = thinking(s);
        assert_eq!(step(&mut c, 11), vec![20]);
        assert_eq!(c.phase(), Phase::Thinking);
        assert_eq!(step(&mut c, 11), vec![20], "1 thinking token < 2");
        assert_eq!(step(&mut c, 11), Vec::<u32>::new(), "minimum reached: the stop stands");
        assert_eq!(c.phase(), Phase::Answer);
        assert_eq!(c.stop_reason(ThinkStopReason::Length), Some(ThinkStopReason::Natural));
        assert_eq!(c.forced_tokens(), 2);
        assert_eq!(c.forced_tokens_of(ForcedKind::Continuation), 2);
    }

    #[test]
    fn ts_raises_the_stop_token_only_while_thinking() {
        let s = ReasoningSettings { strategy: Strategy::Ts, stop_temperature: 8.0, ..Default::default() };
        let mut c = thinking(s);
        let mut logits = vec![0.0f32; 14];
        logits[11] = -5.0;
        c.edit_logits(&mut logits);
        assert!(logits[11] > logits[5], "the close token now leads: {logits:?}");
        step(&mut c, 11);
        assert_eq!(c.stop_reason(ThinkStopReason::Length), Some(ThinkStopReason::StopTemperature));
        let mut answer_logits = vec![0.0f32; 14];
        c.edit_logits(&mut answer_logits);
        assert!(answer_logits.iter().all(|&l| l == 0.0), "the answer is left alone");
    }

    #[test]
    fn a_stop_the_model_would_make_anyway_is_natural() {
        let s = ReasoningSettings { strategy: Strategy::Ts, stop_temperature: 8.0, ..Default::default() };
        let mut c = thinking(s);
        let mut logits = vec![0.0f32; 14];
        logits[11] = 3.0; // the close token already leads
        c.edit_logits(&mut logits);
        step(&mut c, 11);
        assert_eq!(c.stop_reason(ThinkStopReason::Length), Some(ThinkStopReason::Natural));
    }

    #[test]
    fn ramp_grows_tau_toward_the_budget() {
        let s = ReasoningSettings { strategy: Strategy::Ts, stop_temperature: 5.0, ramp: true, max_thinking_tokens: Some(4), ..Default::default() };
        let mut c = thinking(s);
        let mut taus = vec![c.current_stop_temperature()];
        for t in [5, 6, 7, 8, 9] {
            step(&mut c, t);
            taus.push(c.current_stop_temperature());
        }
        assert_eq!(taus, vec![1.0, 2.0, 3.0, 4.0, 5.0, 5.0]);
    }

    #[test]
    fn models_without_think_tokens_wrap_up_then_answer_briefly() {
        let mut c = ReasoningControl::new(budget(2), injections(), PhaseTracker::new(None, &[1]), vec![EOT]);
        step(&mut c, 5);
        step(&mut c, 6);
        assert_eq!(step(&mut c, 99), vec![12, 11, 13]);
        assert!(!c.answer_allowance_spent());
        for t in [7, 8, 9] {
            assert_eq!(step(&mut c, t), Vec::<u32>::new());
        }
        assert!(c.answer_allowance_spent());
        assert_eq!((c.thinking_tokens(), c.answer_tokens(), c.forced_tokens()), (0, 8, 3));
    }

    fn probing(interval: usize, agreement: usize, cap: Option<usize>) -> ReasoningSettings {
        let probe = ProbeSettings { interval, tokens: 3, agreement: Some(agreement), confidence: None, at: ProbeAt::Interval };
        ReasoningSettings { strategy: Strategy::Probe, probe, max_thinking_tokens: cap, ..Default::default() }
    }

    fn probing_at_reflection(interval: usize, agreement: usize) -> ReasoningSettings {
        let mut s = probing(interval, agreement, None);
        s.probe.at = ProbeAt::Reflection;
        s
    }

    /// Decode a probe answer of ids as ASCII (`b'}'` closes it).
    fn run_probe(c: &mut ReasoningControl, answer: &[u8]) -> ProbeStep {
        let decode = |ids: &[u32]| ids.iter().map(|&i| char::from(i as u8)).collect::<String>();
        assert!(c.probing());
        for (k, &b) in answer.iter().enumerate() {
            let step = c.probe_token(b as u32, 0.9, decode);
            if k + 1 < answer.len() {
                assert_eq!(step, ProbeStep::More);
            } else {
                return step;
            }
        }
        unreachable!("an answer has tokens")
    }

    #[test]
    fn probes_come_every_interval_leave_the_counts_alone_and_stop_once_answers_agree() {
        let mut c = thinking(probing(2, 2, None));
        step(&mut c, 5);
        assert_eq!(c.start_probe(100), None, "not yet");
        step(&mut c, 6);
        let counts = (c.thinking_tokens(), c.answer_tokens(), c.forced_tokens(), c.phase());
        assert_eq!(c.start_probe(100), Some(vec![30, 31]));
        assert_eq!(run_probe(&mut c, b"7}"), ProbeStep::Done(ProbeOutcome::Unsettled));
        assert_eq!(c.take_held(), None, "an interval probe holds no token");
        assert_eq!((c.thinking_tokens(), c.answer_tokens(), c.forced_tokens(), c.phase()), counts, "a probe moves no count and no phase");
        assert!(!c.probing());
        assert_eq!(c.forced_now(), None, "one answer is not agreement");
        step(&mut c, 7);
        assert_eq!(c.start_probe(100), None);
        step(&mut c, 8);
        assert!(c.start_probe(100).is_some());
        assert_eq!(run_probe(&mut c, b"7}"), ProbeStep::Done(ProbeOutcome::Settled));
        assert_eq!(c.forced_now(), Some(vec![12, 11, 13]), "settled: the thought is closed");
        assert_eq!(c.phase(), Phase::Thinking, "until the forced tokens are observed");
        for t in [12, 11, 13] {
            c.observe(t, Some(ForcedKind::EndOfThinking));
        }
        assert_eq!(c.phase(), Phase::Answer);
        assert_eq!(c.stop_reason(ThinkStopReason::Natural), Some(ThinkStopReason::Probe));
        assert_eq!(c.probe_outcomes(), [1, 1, 0]);
        // Two probes: two probe texts and two two-token answers.
        assert_eq!(c.probe_tokens(), 8);
        assert_eq!(c.start_probe(100), None, "no probe in the answer");
    }

    #[test]
    fn reflection_probes_come_before_a_reflection_word_which_waits_for_them() {
        // Token 40 begins a reflection word (see `injections`).
        let mut c = thinking(probing_at_reflection(2, 2));
        step(&mut c, 5);
        assert_eq!(c.start_probe_before(40, 100), None, "fewer than `interval` tokens in");
        assert!(!c.probe_due_before(40, 100));
        step(&mut c, 40);
        step(&mut c, 6);
        assert_eq!(c.start_probe(100), None, "no probe at an interval");
        assert!(!c.probe_due(100));
        assert_eq!(c.start_probe_before(7, 100), None, "not a reflection word");
        assert!(c.probe_due_before(40, 100));
        assert_eq!(c.start_probe_before(40, 4), None, "no room for the text and the answer");
        let counts = (c.thinking_tokens(), c.forced_tokens());
        assert_eq!(c.start_probe_before(40, 100), Some(vec![30, 31]));
        assert_eq!(c.take_held(), None, "held while the probe runs");
        assert_eq!(run_probe(&mut c, b"7}"), ProbeStep::Done(ProbeOutcome::Unsettled));
        assert_eq!(c.take_held(), Some(Held::Take(40)), "unsettled: the word is taken in after all");
        assert_eq!(c.take_held(), None, "once");
        assert_eq!((c.thinking_tokens(), c.forced_tokens()), counts);
        step(&mut c, 40);
        assert_eq!(c.start_probe_before(40, 100), None, "the next waits `interval` tokens");
        step(&mut c, 8);
        assert!(c.start_probe_before(40, 100).is_some());
        assert_eq!(run_probe(&mut c, b"7}"), ProbeStep::Done(ProbeOutcome::Settled));
        assert_eq!(c.take_held(), Some(Held::Dropped), "settled: the word is dropped");
        assert_eq!(c.forced_now(), Some(vec![12, 11, 13]), "and the thought closed");
        assert_eq!(c.probe_outcomes(), [1, 1, 0]);
    }

    #[test]
    fn a_probe_without_room_or_an_answer_leaves_thinking_on_and_the_cap_still_holds() {
        let mut c = thinking(probing(1, 1, Some(3)));
        step(&mut c, 5);
        // The probe text (2) and its answer (3) need 5 positions.
        assert_eq!(c.start_probe(4), None);
        step(&mut c, 6);
        assert!(c.start_probe(5).is_some());
        assert_eq!(run_probe(&mut c, b"123"), ProbeStep::Done(ProbeOutcome::NoAnswer), "unclosed within 3 tokens");
        step(&mut c, 7);
        assert!(c.start_probe(5).is_some());
        assert_eq!(run_probe(&mut c, b"wait}"[..3].as_ref()), ProbeStep::Done(ProbeOutcome::NoAnswer));
        assert_eq!(c.forced_now(), Some(vec![12, 11, 13]), "the budget caps thinking at 3");
        assert_eq!(c.stop_reason(ThinkStopReason::Natural), Some(ThinkStopReason::Budget));
    }

    #[test]
    fn wrap_up_turns_a_stop_ts_made_into_the_wrap_up_and_a_short_answer() {
        let s = ReasoningSettings { strategy: Strategy::Ts, stop_temperature: 50.0, wrap_up: true, ..Default::default() };
        let mut c = ReasoningControl::new(s, injections(), PhaseTracker::new(None, &[1]), vec![EOT]);
        step(&mut c, 5);
        let mut logits = vec![0.0f32; 14];
        logits[EOT as usize] = -8.0;
        c.edit_logits(&mut logits);
        assert_eq!(c.after_sample(EOT), Decision::Replace(vec![12, 11, 13], ForcedKind::EndOfThinking));
        for t in [12, 11, 13] {
            c.observe(t, Some(ForcedKind::EndOfThinking));
        }
        assert_eq!(c.current_stop_temperature(), 1.0, "TS is over");
        assert_eq!(c.stop_reason(ThinkStopReason::Natural), Some(ThinkStopReason::StopTemperature));
        for t in [7, 8, 9] {
            assert_eq!(step(&mut c, t), Vec::<u32>::new());
        }
        assert!(c.answer_allowance_spent());
        // A stop that was the model's own top token ends the reply as before.
        let s = ReasoningSettings { strategy: Strategy::Ts, stop_temperature: 50.0, wrap_up: true, ..Default::default() };
        let mut own = ReasoningControl::new(s, injections(), PhaseTracker::new(None, &[1]), vec![EOT]);
        let mut logits = vec![0.0f32; 14];
        logits[EOT as usize] = 5.0;
        own.edit_logits(&mut logits);
        assert_eq!(own.after_sample(EOT), Decision::Keep);
    }

    #[test]
    fn ts_on_a_model_without_think_tokens_targets_end_of_turn() {
        let s = ReasoningSettings { strategy: Strategy::Ts, stop_temperature: 50.0, ..Default::default() };
        let mut c = ReasoningControl::new(s, injections(), PhaseTracker::new(None, &[1]), vec![EOT]);
        let mut logits = vec![0.0f32; 14];
        logits[EOT as usize] = -8.0;
        c.edit_logits(&mut logits);
        assert!(logits[EOT as usize] > logits[3]);
    }
}

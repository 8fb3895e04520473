//! Answer probing: stop thinking once the answer has stopped changing.
//!
//! Every `interval` tokens of the controlled phase (or, `at` a reflection
//! word, DEER's transition points: before a sampled `Wait` is taken) the
//! engine appends the model's probe text (`… Final answer: \boxed{`), decodes
//! at most `tokens` answer tokens greedily, and rolls the sequence back to
//! before the probe, so the probe leaves no trace in the output. What the
//! probe answered is judged here:
//! - **agreement** (as Dynasor-CoT's certaindex): the last `agreement`
//!   probes gave the same complete answer, none of them hedged;
//! - **confidence** (as DEER): the latest complete, unhedged answer's mean
//!   top-1 probability is at least `confidence`.
//!
//! Thinking stops when the rule that is set holds; with both set, when both
//! hold (a small model's early guesses can agree, or be sure, and be wrong).

/// Where probes come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeAt {
    /// Every `interval` controlled tokens.
    #[default]
    Interval,
    /// Before a reflection word (`Wait`, `Hmm`, ...) the model is about to
    /// write, at least `interval` controlled tokens after the previous probe
    /// (and the start): where a thought turns, its answer so far is whole.
    Reflection,
}

/// A probe's settings, after the mode preset and the request are merged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeSettings {
    /// At an interval, or before a reflection word.
    pub at: ProbeAt,
    /// Controlled tokens between two probes (the first comes after this many);
    /// `at` a reflection word, the least between two.
    pub interval: usize,
    /// Most answer tokens one probe decodes.
    pub tokens: usize,
    /// Stop when this many probes in a row agree.
    pub agreement: Option<usize>,
    /// Stop when a probe's mean top-1 probability reaches this.
    pub confidence: Option<f32>,
}

impl ProbeSettings {
    pub const DEFAULT_INTERVAL: usize = 64;
    pub const DEFAULT_TOKENS: usize = 12;
    pub const DEFAULT_AGREEMENT: usize = 3;
    /// Bounds a request is held to: a probe is short, and agreement of
    /// more than a few probes would never stop a reply this server serves.
    pub const MAX_TOKENS: usize = 64;
    pub const MAX_AGREEMENT: usize = 16;
    /// Bounds on a request's own reflection words.
    pub const MAX_WORDS: usize = 16;
    pub const MAX_WORD_CHARS: usize = 32;
}

impl Default for ProbeSettings {
    fn default() -> Self {
        ProbeSettings { at: ProbeAt::Interval, interval: Self::DEFAULT_INTERVAL, tokens: Self::DEFAULT_TOKENS, agreement: Some(Self::DEFAULT_AGREEMENT), confidence: None }
    }
}

/// How one probe came out (the `outcome` label of the probe metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// An exit rule held: thinking stops.
    Settled,
    /// A complete answer, but no rule holds yet.
    Unsettled,
    /// No complete answer within the probe's tokens, or a hedged one.
    NoAnswer,
}

impl ProbeOutcome {
    pub const ALL: [ProbeOutcome; 3] = [ProbeOutcome::Settled, ProbeOutcome::Unsettled, ProbeOutcome::NoAnswer];

    pub fn as_str(&self) -> &'static str {
        match self {
            ProbeOutcome::Settled => "settled",
            ProbeOutcome::Unsettled => "unsettled",
            ProbeOutcome::NoAnswer => "no_answer",
        }
    }
}

/// What one probe answered.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeAnswer {
    /// The answer, trimmed; `None` when it did not close within the probe.
    pub answer: Option<String>,
    pub hedged: bool,
    /// Mean and minimum top-1 probability of the decoded tokens.
    pub mean_confidence: f32,
    pub min_confidence: f32,
}

impl ProbeAnswer {
    /// The answer, when it counts: complete and unhedged.
    fn firm(&self) -> Option<&str> {
        self.answer.as_deref().filter(|a| !a.is_empty() && !self.hedged)
    }
}

/// Words that mark an answer the model is not committed to.
const HEDGES: [&str; 8] = ["wait", "hmm", "maybe", "perhaps", "not sure", "however", "alternatively", "but "];

fn is_hedged(text: &str) -> bool {
    let lower = text.to_lowercase();
    HEDGES.iter().any(|h| lower.contains(h))
}

/// The answer in a probe's decoded text, when it is complete: after a probe
/// ending in `{` (`braced`), up to the brace that closes it (nested braces
/// kept); otherwise up to the first line break once some text came.
pub fn read_answer(text: &str, braced: bool) -> Option<&str> {
    if braced {
        let mut depth = 0usize;
        for (i, c) in text.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => return Some(text[..i].trim()),
                '}' => depth -= 1,
                _ => {}
            }
        }
        return None;
    }
    let start = text.len() - text.trim_start().len();
    text[start..].find('\n').map(|end| text[start..start + end].trim())
}

/// One probe's answer tokens as they are decoded.
#[derive(Debug, Clone)]
pub struct ProbeRun {
    tokens: Vec<u32>,
    probs: Vec<f32>,
    limit: usize,
    braced: bool,
}

/// What the engine does after a probe token.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeStep {
    /// Feed the token and decode the next one.
    More,
    /// The probe is over: roll the sequence back.
    Done(ProbeOutcome),
}

impl ProbeRun {
    pub fn new(limit: usize, braced: bool) -> ProbeRun {
        ProbeRun { tokens: Vec::new(), probs: Vec::new(), limit, braced }
    }

    /// Take the next greedy token and its probability; `decode` turns the
    /// probe's tokens into text. `Some(answer)` once the probe is over: its
    /// answer closed, the turn ended, or the tokens ran out.
    pub fn push(&mut self, token: u32, prob: f32, end_of_turn: bool, decode: impl Fn(&[u32]) -> String) -> Option<ProbeAnswer> {
        if !end_of_turn {
            self.tokens.push(token);
        }
        self.probs.push(prob);
        let text = decode(&self.tokens);
        let answer = read_answer(&text, self.braced).map(str::to_string);
        // At the end of the turn an unbraced answer is whatever came.
        let answer = answer.or_else(|| (end_of_turn && !self.braced).then(|| text.trim().to_string()));
        if answer.is_none() && !end_of_turn && self.probs.len() < self.limit {
            return None;
        }
        let hedged = is_hedged(answer.as_deref().unwrap_or(&text));
        let mean_confidence = self.probs.iter().sum::<f32>() / self.probs.len() as f32;
        let min_confidence = self.probs.iter().copied().fold(1.0, f32::min);
        Some(ProbeAnswer { answer, hedged, mean_confidence, min_confidence })
    }

    /// Answer tokens decoded so far.
    pub fn decoded(&self) -> usize {
        self.probs.len()
    }
}

/// Whether thinking may stop after `answers` (oldest first), and the latest
/// probe's outcome.
pub fn judge(answers: &[ProbeAnswer], settings: &ProbeSettings) -> ProbeOutcome {
    let Some(latest) = answers.last() else { return ProbeOutcome::NoAnswer };
    let Some(answer) = latest.firm() else { return ProbeOutcome::NoAnswer };
    let agreed = settings.agreement.is_some_and(|n| {
        n > 0 && answers.len() >= n && answers[answers.len() - n..].iter().all(|a| a.firm() == Some(answer))
    });
    let confident = settings.confidence.is_some_and(|c| latest.mean_confidence >= c);
    let settled = match (settings.agreement, settings.confidence) {
        (Some(_), Some(_)) => agreed && confident,
        _ => agreed || confident,
    };
    if settled {
        ProbeOutcome::Settled
    } else {
        ProbeOutcome::Unsettled
    }
}

/// One sequence's probes: when the next is due, the one running, the
/// answers so far and what they cost.
#[derive(Debug, Clone)]
pub struct Prober {
    settings: ProbeSettings,
    braced: bool,
    /// Controlled tokens at which the next probe is due.
    next_at: usize,
    running: Option<ProbeRun>,
    /// A reflection probe's sampled token, taken in (or dropped, if the
    /// answer settled) once the probe is rolled back.
    held: Option<u32>,
    answers: Vec<ProbeAnswer>,
    settled: bool,
    /// Tokens the probes fed through the model: probe texts and answers.
    spent: usize,
    /// Probes by [`ProbeOutcome`].
    outcomes: [usize; 3],
}

impl Prober {
    /// `braced`: the probe text ends in `{`, so an answer ends at its brace.
    pub fn new(settings: ProbeSettings, braced: bool) -> Prober {
        let next_at = settings.interval.max(1);
        Prober { settings, braced, next_at, running: None, held: None, answers: Vec::new(), settled: false, spent: 0, outcomes: [0; 3] }
    }

    /// Whether a probe starts now, after `controlled` tokens of the
    /// controlled phase, with room for `room` more positions; the caller
    /// then feeds the probe text of `text_len` tokens. A probe without room
    /// is skipped.
    /// Interval probes only (`at` a reflection word, see [`Self::start_before`]).
    pub fn start(&mut self, controlled: usize, room: usize, text_len: usize) -> bool {
        if self.settings.at != ProbeAt::Interval || !self.free(controlled) {
            return false;
        }
        while self.next_at <= controlled {
            self.next_at += self.settings.interval.max(1);
        }
        if room < text_len + self.settings.tokens {
            return false;
        }
        self.begin(text_len);
        true
    }

    /// Whether a reflection probe starts now, before the sampled `token`, a
    /// reflection word's (`reflects`), is taken in: the token is held until
    /// the probe is over (see [`Self::take_held`]). The next may come
    /// `interval` controlled tokens later.
    pub fn start_before(&mut self, token: u32, reflects: bool, controlled: usize, room: usize, text_len: usize) -> bool {
        if !self.due_before(reflects, controlled, room, text_len) {
            return false;
        }
        self.next_at = controlled + self.settings.interval.max(1);
        self.held = Some(token);
        self.begin(text_len);
        true
    }

    /// Whether `start_before` would start a probe (asking changes nothing).
    pub fn due_before(&self, reflects: bool, controlled: usize, room: usize, text_len: usize) -> bool {
        self.settings.at == ProbeAt::Reflection && reflects && self.free(controlled) && room >= text_len + self.settings.tokens
    }

    /// No probe runs, no token is held, none settled, and the gap since the last is kept.
    fn free(&self, controlled: usize) -> bool {
        !self.settled && self.running.is_none() && self.held.is_none() && controlled >= self.next_at
    }

    fn begin(&mut self, text_len: usize) {
        self.spent += text_len;
        self.running = Some(ProbeRun::new(self.settings.tokens, self.braced));
    }

    pub fn running(&self) -> bool {
        self.running.is_some()
    }

    /// Whether `start` would start a probe now (asking changes nothing).
    pub fn due(&self, controlled: usize, room: usize, text_len: usize) -> bool {
        self.settings.at == ProbeAt::Interval && self.free(controlled) && room >= text_len + self.settings.tokens
    }

    /// After a reflection probe: the token it held, to take in now unless
    /// the answer settled (then thinking ends instead).
    pub fn take_held(&mut self) -> Option<u32> {
        if self.running.is_some() {
            return None;
        }
        self.held.take()
    }

    /// The running probe's next greedy token (see [`ProbeRun::push`]).
    pub fn push(&mut self, token: u32, prob: f32, end_of_turn: bool, decode: impl Fn(&[u32]) -> String) -> ProbeStep {
        let run = self.running.as_mut().expect("a probe is running");
        self.spent += 1;
        let Some(answer) = run.push(token, prob, end_of_turn, decode) else { return ProbeStep::More };
        self.running = None;
        self.answers.push(answer);
        let outcome = judge(&self.answers, &self.settings);
        self.settled = outcome == ProbeOutcome::Settled;
        self.outcomes[outcome as usize] += 1;
        ProbeStep::Done(outcome)
    }

    /// An exit rule held: thinking is to stop.
    pub fn settled(&self) -> bool {
        self.settled
    }

    pub fn spent(&self) -> usize {
        self.spent
    }

    /// Probes so far, by outcome.
    pub fn outcomes(&self) -> [usize; 3] {
        self.outcomes
    }

    pub fn answers(&self) -> &[ProbeAnswer] {
        &self.answers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str, mean: f32) -> ProbeAnswer {
        ProbeAnswer { answer: Some(text.into()), hedged: is_hedged(text), mean_confidence: mean, min_confidence: mean }
    }

    fn settings(agreement: Option<usize>, confidence: Option<f32>) -> ProbeSettings {
        ProbeSettings { agreement, confidence, ..Default::default() }
    }

    #[test]
    fn answers_are_read_up_to_their_closing_brace_or_line() {
        assert_eq!(read_answer("42} and more", true), Some("42"));
        assert_eq!(read_answer("\\frac{1}{2}}", true), Some("\\frac{1}{2}"));
        assert_eq!(read_answer("\\frac{1}{2", true), None, "still open");
        assert_eq!(read_answer(" 18 dollars\nSo", false), Some("18 dollars"));
        assert_eq!(read_answer("\n 18\n", false), Some("18"), "a leading line break is not the end");
        assert_eq!(read_answer(" 18", false), None);
    }

    #[test]
    fn agreement_needs_the_last_n_firm_answers_equal() {
        let s = settings(Some(3), None);
        let a = [answer("18", 0.5), answer("18", 0.5)];
        assert_eq!(judge(&a, &s), ProbeOutcome::Unsettled, "two of three");
        let b = [answer("17", 0.5), answer("18", 0.5), answer("18", 0.5), answer("18", 0.5)];
        assert_eq!(judge(&b, &s), ProbeOutcome::Settled);
        let c = [answer("18", 0.5), answer("17", 0.5), answer("18", 0.5)];
        assert_eq!(judge(&c, &s), ProbeOutcome::Unsettled, "not in a row");
        let unclosed = ProbeAnswer { answer: None, hedged: false, mean_confidence: 1.0, min_confidence: 1.0 };
        assert_eq!(judge(&[answer("18", 0.5), answer("18", 0.5), unclosed], &s), ProbeOutcome::NoAnswer);
        assert_eq!(judge(&[], &s), ProbeOutcome::NoAnswer);
    }

    #[test]
    fn a_hedged_answer_never_settles() {
        let s = settings(Some(2), Some(0.1));
        let hedged = [answer("18, but maybe 20", 0.9), answer("18, but maybe 20", 0.9)];
        assert_eq!(judge(&hedged, &s), ProbeOutcome::NoAnswer);
        assert!(is_hedged("Wait, 12") && is_hedged("HMM") && !is_hedged("but") && !is_hedged("42"));
        // Nor does an agreeing run broken by a hedge.
        let broken = [answer("18", 0.9), answer("wait 18", 0.9), answer("18", 0.9)];
        assert_eq!(judge(&broken, &settings(Some(3), None)), ProbeOutcome::Unsettled);
    }

    #[test]
    fn confidence_settles_one_sure_answer() {
        let s = settings(None, Some(0.8));
        assert_eq!(judge(&[answer("7", 0.79)], &s), ProbeOutcome::Unsettled);
        assert_eq!(judge(&[answer("7", 0.8)], &s), ProbeOutcome::Settled);
        // With both rules set, both must hold.
        let both = settings(Some(2), Some(0.95));
        assert_eq!(judge(&[answer("7", 0.5), answer("7", 0.5)], &both), ProbeOutcome::Unsettled);
        assert_eq!(judge(&[answer("6", 0.5), answer("7", 0.99)], &both), ProbeOutcome::Unsettled);
        assert_eq!(judge(&[answer("7", 0.5), answer("7", 0.99)], &both), ProbeOutcome::Settled);
    }

    #[test]
    fn a_run_ends_at_its_closing_brace_the_end_of_turn_or_its_limit() {
        let decode = |ids: &[u32]| ids.iter().map(|&i| char::from(i as u8)).collect::<String>();
        let mut run = ProbeRun::new(4, true);
        assert_eq!(run.push(b'4' as u32, 0.5, false, decode), None);
        let done = run.push(b'}' as u32, 1.0, false, decode).unwrap();
        assert_eq!((done.answer.as_deref(), done.mean_confidence, done.min_confidence), (Some("4"), 0.75, 0.5));
        let mut short = ProbeRun::new(2, true);
        short.push(b'1' as u32, 0.9, false, decode);
        let out = short.push(b'2' as u32, 0.9, false, decode).unwrap();
        assert_eq!((out.answer, short.decoded()), (None, 2), "the limit, unclosed");
        let mut line = ProbeRun::new(8, false);
        line.push(b'9' as u32, 0.9, false, decode);
        assert_eq!(line.push(0, 0.9, true, decode).unwrap().answer.as_deref(), Some("9"), "the end of turn ends an unbraced answer");
    }
}

//! Which part of the completion the model is in: thinking, or answering.

/// The two phases of a reasoning model's completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Thinking,
    Answer,
}

/// The single tokens that open and close a think block (`<think>` / `</think>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinkTokens {
    pub open: u32,
    pub close: u32,
}

/// Follows one sequence's phase token by token.
///
/// A model without think tokens has one ANSWER phase. A thinking model starts in
/// THINKING when its prompt ends inside an open think block (DeepSeek-R1-Distill
/// templates end the prompt with `<think>\n`), enters it when it emits the open
/// token, and leaves it on the close token, sampled or forced.
#[derive(Debug, Clone)]
pub struct PhaseTracker {
    think: Option<ThinkTokens>,
    phase: Phase,
}

impl PhaseTracker {
    pub fn new(think: Option<ThinkTokens>, prompt: &[u32]) -> Self {
        let phase = match think {
            Some(t) => {
                let last_open = prompt.iter().rposition(|&id| id == t.open);
                let last_close = prompt.iter().rposition(|&id| id == t.close);
                match (last_open, last_close) {
                    (Some(o), Some(c)) if o > c => Phase::Thinking,
                    (Some(_), None) => Phase::Thinking,
                    _ => Phase::Answer,
                }
            }
            None => Phase::Answer,
        };
        PhaseTracker { think, phase }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn think_tokens(&self) -> Option<ThinkTokens> {
        self.think
    }

    /// Take in a token the sequence now holds; returns the phase it belongs to.
    /// Both delimiters belong to THINKING: the open token is the thought's first
    /// token, the close token its last.
    pub fn observe(&mut self, token: u32) -> Phase {
        let Some(t) = self.think else { return Phase::Answer };
        if token == t.open && self.phase == Phase::Answer {
            self.phase = Phase::Thinking;
            return Phase::Thinking;
        }
        if token == t.close && self.phase == Phase::Thinking {
            self.phase = Phase::Answer;
            return Phase::Thinking;
        }
        self.phase
    }

    /// The tokens that end the current phase: the close token while thinking,
    /// the end-of-turn tokens while answering.
    pub fn stop_set<'a>(&'a self, end_of_turn: &'a [u32]) -> &'a [u32] {
        match (self.phase, &self.think) {
            (Phase::Thinking, Some(t)) => std::slice::from_ref(&t.close),
            _ => end_of_turn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: ThinkTokens = ThinkTokens { open: 10, close: 11 };

    #[test]
    fn models_without_think_tokens_only_answer() {
        let mut p = PhaseTracker::new(None, &[1, 10, 2]);
        assert_eq!(p.phase(), Phase::Answer);
        assert_eq!(p.observe(10), Phase::Answer);
        assert_eq!(p.stop_set(&[0, 5]), vec![0, 5]);
    }

    #[test]
    fn prompt_ending_inside_an_open_block_starts_thinking() {
        assert_eq!(PhaseTracker::new(Some(T), &[1, 2, 10, 3]).phase(), Phase::Thinking);
        assert_eq!(PhaseTracker::new(Some(T), &[1, 10, 4, 11, 3]).phase(), Phase::Answer);
        assert_eq!(PhaseTracker::new(Some(T), &[1, 10, 11, 10]).phase(), Phase::Thinking);
        assert_eq!(PhaseTracker::new(Some(T), &[1, 2]).phase(), Phase::Answer);
    }

    #[test]
    fn emitted_delimiters_move_the_phase() {
        let mut p = PhaseTracker::new(Some(T), &[1]);
        assert_eq!(p.observe(5), Phase::Answer);
        assert_eq!(p.observe(10), Phase::Thinking);
        assert_eq!(p.stop_set(&[0]), vec![11]);
        assert_eq!(p.observe(6), Phase::Thinking);
        assert_eq!(p.observe(11), Phase::Thinking, "the close token ends the thought");
        assert_eq!(p.phase(), Phase::Answer);
        assert_eq!(p.observe(7), Phase::Answer);
        assert_eq!(p.stop_set(&[0]), vec![0]);
    }
}

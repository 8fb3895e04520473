//! What a model brings to reasoning control: its think delimiters, the texts
//! injected into its output, and its mode presets. Read from the model's
//! manifest (`[reasoning]` and `[modes.*]`); a bare GGUF gets the defaults.

use serde::Deserialize;

use super::modes::ModePresets;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReasoningProfile {
    /// The token opening a thought; a model whose vocabulary lacks either
    /// delimiter has no thinking phase.
    pub think_open: String,
    pub think_close: String,
    /// Injected at the thinking budget of a model with think tokens.
    pub end_of_thinking: String,
    /// Injected at the budget of a model without think tokens, which then
    /// answers in at most `answer_tokens_after_wrap_up` more tokens.
    pub wrap_up: String,
    pub answer_tokens_after_wrap_up: usize,
    /// Replaces a stop sampled before `min_thinking_tokens`.
    pub continuation: String,
    #[serde(skip)]
    pub modes: ModePresets,
}

impl Default for ReasoningProfile {
    fn default() -> Self {
        ReasoningProfile {
            think_open: "<think>".into(),
            think_close: "</think>".into(),
            end_of_thinking: "\n</think>\n\n".into(),
            wrap_up: "\nFinal answer:".into(),
            answer_tokens_after_wrap_up: 64,
            continuation: "Wait".into(),
            modes: ModePresets::default(),
        }
    }
}

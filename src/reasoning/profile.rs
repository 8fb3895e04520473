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
    /// Appended to probe the answer under the `probe` strategy, then rolled
    /// back. Unset: the end-of-thinking text and `Final answer: \boxed{`
    /// for a model with think tokens (the trial answer is read outside the
    /// thought), `\n\nFinal answer: \boxed{` for one without.
    pub probe: Option<String>,
    /// Reflection words, where a thought turns (DEER's transition points):
    /// probes `at` reflection come before the model writes one.
    pub probe_words: Vec<String>,
    /// Open the thought in the prompt (`think_open` and a newline after the
    /// generation prompt) where the chat template does not: DeepSeek-R1-Distill
    /// GGUFs carry a template whose prompt ends at `<｜Assistant｜>`, and the
    /// model is meant to start with `<think>\n`.
    pub start_thinking: bool,
    #[serde(skip)]
    pub modes: ModePresets,
    /// Whether a manifest set this profile (else it is the defaults, and what
    /// the model's own file says decides its thinking).
    #[serde(skip)]
    pub from_manifest: bool,
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
            probe: None,
            probe_words: ["Wait", "Hmm", "Alternatively"].map(String::from).to_vec(),
            start_thinking: false,
            modes: ModePresets::default(),
            from_manifest: false,
        }
    }
}

impl ReasoningProfile {
    /// A manifest's own checks: a probe word holds more than spaces.
    pub fn check(&self) -> Result<(), String> {
        match self.probe_words.iter().find(|w| w.trim().is_empty()) {
            Some(w) => Err(format!("reasoning.probe_words holds {w:?}: a word needs more than spaces")),
            None => Ok(()),
        }
    }

    /// The probe text: the manifest's, or the default for a model with or
    /// without think tokens.
    pub fn probe_text(&self, thinks: bool) -> String {
        match (&self.probe, thinks) {
            (Some(text), _) => text.clone(),
            (None, true) => format!("{}Final answer: \\boxed{{", self.end_of_thinking),
            (None, false) => "\n\nFinal answer: \\boxed{".into(),
        }
    }

    /// The rendered chat prompt, with the thought opened if the model needs it.
    pub fn open_thought(&self, mut prompt: String) -> String {
        if self.start_thinking && !prompt.trim_end().ends_with(&self.think_open) {
            prompt.push_str(&self.think_open);
            prompt.push('\n');
        }
        prompt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_probe_word_is_refused() {
        assert!(ReasoningProfile::default().check().is_ok());
        let blank = ReasoningProfile { probe_words: vec!["Wait".into(), " ".into()], ..Default::default() };
        assert!(blank.check().unwrap_err().contains("probe_words"));
    }

    #[test]
    fn start_thinking_opens_the_thought_once() {
        let p = ReasoningProfile { start_thinking: true, ..Default::default() };
        assert_eq!(p.open_thought("<|A|>".into()), "<|A|><think>\n");
        assert_eq!(p.open_thought("<|A|><think>\n".into()), "<|A|><think>\n");
        assert_eq!(ReasoningProfile::default().open_thought("<|A|>".into()), "<|A|>");
    }
}

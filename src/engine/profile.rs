//! The reasoning profile a model runs with: its manifest's, or, for a file
//! given without one, what its own tokenizer and chat template say.
//!
//! A model thinks, as far as terse can tell from its file, when its vocabulary
//! holds both think delimiters as single tokens AND its chat template opens or
//! closes a thought (Qwen3's and R1-Distill's templates mention `<think>` or
//! `</think>`; a vocabulary that merely contains them is not enough). Then:
//! - a template that ends the generation prompt inside a thought opens it itself;
//! - a template with Qwen3's `enable_thinking` switch leaves the opening to the
//!   model, which thinks unless switched off;
//! - any other (R1-Distill's older templates, which stop at `<｜Assistant｜>`)
//!   gets the thought opened after the generation prompt (`start_thinking`),
//!   as the model was trained to begin.

use anyhow::Result;
use serde::Serialize;

use crate::reasoning::control::Injections;
use crate::reasoning::phase::{Phase, PhaseTracker, ThinkTokens};
use crate::reasoning::profile::ReasoningProfile;
use crate::tokenize::{ChatMessage, TextTokenizer};

/// Where a model's reasoning profile came from (`/v1/models`' `terse.reasoning.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileSource {
    /// Its manifest (`models/NAME.toml`, or `--manifest`).
    Manifest,
    /// Its file's vocabulary and chat template.
    Detected,
    /// Neither: no think tokens, the whole reply is the controlled phase.
    None,
}

/// What the server says of a model's thinking.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReasoningSummary {
    pub source: ProfileSource,
    /// The delimiters, where the model has them.
    pub think_open: Option<String>,
    pub think_close: Option<String>,
    /// Whether a chat reply starts with a thought unless switched off.
    pub thinking_by_default: bool,
}

/// A model's reasoning profile, tokenized.
#[derive(Debug, Clone)]
pub struct ResolvedReasoning {
    pub profile: ReasoningProfile,
    pub think: Option<ThinkTokens>,
    pub injections: Injections,
    pub summary: ReasoningSummary,
}

/// The delimiters of `profile` when the vocabulary holds each as one token.
fn think_tokens(tokenizer: &TextTokenizer, profile: &ReasoningProfile) -> Option<ThinkTokens> {
    match (tokenizer.token_to_id(&profile.think_open), tokenizer.token_to_id(&profile.think_close)) {
        (Some(open), Some(close)) if open != close => Some(ThinkTokens { open, close }),
        _ => None,
    }
}

/// The tokens that begin one of `words` as the model writes it: at the
/// start of a line, after a space or a line break. A word is found where one
/// token holds all of it (with the space or break in front), as `Wait` and
/// ` Wait` are in Qwen's and Llama's vocabularies; a word the tokenizer
/// splits is no probe point (see [`unmatched_probe_word`]).
pub fn probe_word_ids(tokenizer: &TextTokenizer, words: &[String]) -> Vec<u32> {
    let mut ids = Vec::new();
    for word in words {
        for id in word_start_ids(tokenizer, word.trim()) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

fn word_start_ids(tokenizer: &TextTokenizer, word: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    for before in ["", " ", "\n", "\n\n"] {
        let Ok(encoded) = tokenizer.encode(&format!("{before}{word}")) else { continue };
        let Some(&last) = encoded.last() else { continue };
        if !word.is_empty() && tokenizer.decode(&[last]).trim_start() == word {
            ids.push(last);
        }
    }
    ids
}

/// The first of `words` that no single token of the vocabulary begins, so
/// that no probe would ever come before it.
pub fn unmatched_probe_word<'w>(tokenizer: &TextTokenizer, words: &'w [String]) -> Option<&'w str> {
    words.iter().map(String::as_str).find(|w| word_start_ids(tokenizer, w.trim()).is_empty())
}

/// Whether the template's generation prompt for one user turn ends inside a thought.
fn template_opens_thought(tokenizer: &TextTokenizer, think: ThinkTokens) -> bool {
    let probe = [ChatMessage::new("user", "Hello")];
    let Ok(text) = tokenizer.apply_chat_template(&probe, true) else { return false };
    let Ok(ids) = tokenizer.encode(&text) else { return false };
    PhaseTracker::new(Some(think), &ids).phase() == Phase::Thinking
}

/// `configured` (a manifest's when `from_manifest`, else the defaults)
/// resolved against the model's tokenizer and template.
pub fn resolve_reasoning(tokenizer: &TextTokenizer, configured: &ReasoningProfile, from_manifest: bool) -> Result<ResolvedReasoning> {
    let mut profile = configured.clone();
    let template = tokenizer.chat_template_source().unwrap_or("");
    let mut think = think_tokens(tokenizer, &profile);
    let source = if from_manifest {
        ProfileSource::Manifest
    } else if think.is_some() && (template.contains(&profile.think_open) || template.contains(&profile.think_close)) {
        ProfileSource::Detected
    } else {
        think = None;
        ProfileSource::None
    };
    let opens = think.is_some_and(|t| template_opens_thought(tokenizer, t));
    let switchable = template.contains("enable_thinking");
    if source == ProfileSource::Detected {
        profile.start_thinking = !opens && !switchable;
    }
    let thinking_by_default = think.is_some() && (opens || switchable || profile.start_thinking);
    let end_of_thinking = if think.is_some() { &profile.end_of_thinking } else { &profile.wrap_up };
    let probe = profile.probe_text(think.is_some());
    let injections = Injections {
        end_of_thinking: tokenizer.encode(end_of_thinking)?,
        continuation: tokenizer.encode(&profile.continuation)?,
        answer_tokens_after_wrap_up: Some(profile.answer_tokens_after_wrap_up),
        probe: tokenizer.encode(&probe)?,
        probe_braced: probe.ends_with('{'),
        probe_words: probe_word_ids(tokenizer, &profile.probe_words),
    };
    if let Some(word) = unmatched_probe_word(tokenizer, &profile.probe_words) {
        tracing::warn!("probe word {word:?} is not one token of this vocabulary: probes at reflection never come before it");
    }
    let summary = ReasoningSummary {
        source,
        think_open: think.map(|_| profile.think_open.clone()),
        think_close: think.map(|_| profile.think_close.clone()),
        thinking_by_default,
    };
    Ok(ResolvedReasoning { profile, think, injections, summary })
}

//! Turning a growing list of token ids into text deltas for streaming.
//!
//! A byte-level token can end in the middle of a UTF-8 character; its text is
//! held back until the character is complete, so every delta is valid UTF-8 and
//! the deltas concatenate to the decoded whole.

use super::TextTokenizer;
use crate::reasoning::phase::ThinkTokens;

#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window that is decoded again for context.
    prefix_offset: usize,
    /// Tokens up to here have had their text emitted.
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> String {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let after = tokenizer.decode(&self.ids[self.prefix_offset..]);
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.starts_with(&before) {
            let delta = after[before.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }

    /// Text still held back at the end (an incomplete character is emitted as U+FFFD).
    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> String {
        let before = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let after = tokenizer.decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        after.strip_prefix(before.as_str()).unwrap_or("").to_string()
    }
}

/// The text deltas of a completion whose think delimiters show no text of
/// their own: a delimiter instead releases the text held back before it, so a
/// character split across tokens just before `</think>` stays in the thought.
#[derive(Debug, Clone)]
pub struct PhasedDecoder {
    decoder: IncrementalDecoder,
    think: Option<ThinkTokens>,
}

impl PhasedDecoder {
    pub fn new(think: Option<ThinkTokens>) -> Self {
        PhasedDecoder { decoder: IncrementalDecoder::new(), think }
    }

    /// The text `id` completes, to be shown in the phase `id` belongs to.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> String {
        match self.think {
            Some(t) if id == t.open || id == t.close => self.decoder.flush(tokenizer),
            _ => self.decoder.push(tokenizer, id),
        }
    }

    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> String {
        self.decoder.flush(tokenizer)
    }
}

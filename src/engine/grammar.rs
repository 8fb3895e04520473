//! Constrained decoding: a grammar (JSON schema, tool-call syntax) masks the
//! tokens of the ANSWER, with `llguidance` computing each step's allowed set.
//!
//! The grammar never sees the thinking: it starts with the first token the
//! model samples in the answer phase (after `</think>`, sampled or forced),
//! and tokens injected by reasoning control are outside it. End of turn is
//! allowed only where the grammar accepts, and is the only choice once it is
//! complete. A model with think tokens whose prompt leaves the thought to it
//! (Qwen3) may open one with its first token. Text the grammar forces (a
//! JSON key) is fed in one step rather than decoded token by token.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use crate::tokenize::TextTokenizer;

/// The model's vocabulary as llguidance needs it: each token's bytes, and
/// our own tokenizer for the text a grammar forces.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        self.tokenizer.encode(text.as_ref(), false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
    }
}

/// Compiles grammars for one model (built once, at load).
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl GrammarCompiler {
    /// From the model's tokenizer: the token bytes of its `tokenizer.json`
    /// form (byte-level BPE or SentencePiece with byte fallback), the first
    /// end-of-turn token as the grammar's end.
    pub fn new(tokenizer: &TextTokenizer) -> Result<Self> {
        let json: serde_json::Value = serde_json::from_str(&tokenizer.inner().to_string(false).map_err(|e| anyhow!("{e}"))?)?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)?;
        let vocab = tokenizer.vocab_size().max(words.len());
        words.resize(vocab, Vec::new());
        let eos = *tokenizer.end_of_turn_ids().first().ok_or_else(|| anyhow!("the model has no end-of-turn token"))?;
        let trie = TokTrie::from(&TokRxInfo::new(vocab as u32, eos), &words);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer: tokenizer.inner().clone() });
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(GrammarCompiler { factory })
    }

    /// A matcher for `grammar`, or why it cannot be one (the message names the problem).
    pub fn compile(&self, grammar: TopLevelGrammar) -> Result<Matcher, String> {
        let parser = self.factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(matcher),
        }
    }

    /// The bytes of token `id` (a special token's text without llguidance's marker).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let trie = self.factory.tok_env().tok_trie();
        if (id as usize) >= trie.vocab_size() {
            return &[];
        }
        let bytes = trie.token(id);
        bytes.strip_prefix(&[TokTrie::SPECIAL_TOKEN_MARKER]).unwrap_or(bytes)
    }
}

/// What a request's answer is held to, for the metrics' `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstraintKind {
    JsonObject,
    JsonSchema,
    Tools,
}

impl ConstraintKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ConstraintKind::JsonObject => "json_object",
            ConstraintKind::JsonSchema => "json_schema",
            ConstraintKind::Tools => "tools",
        }
    }
}

/// A compiled grammar for one request, before it starts.
#[derive(Clone)]
pub struct Constraint {
    pub kind: ConstraintKind,
    pub matcher: Matcher,
    /// A thinking model may open a thought with its first token (off when
    /// the request turned thinking off).
    pub may_open_thought: bool,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("kind", &self.kind).finish_non_exhaustive()
    }
}

/// One sequence's grammar while it generates.
pub struct GrammarMask {
    matcher: Matcher,
    end_of_turn: Vec<u32>,
    /// The grammar's own end token (the first end-of-turn token).
    eos: u32,
    /// The think-open token a first token may be (see the module's documentation).
    think_open: Option<u32>,
    /// No completion token yet (sampled or injected, in either phase).
    fresh: bool,
    /// The next token's mask, once computed (`prepare`); cleared by each token the grammar takes in.
    ready: Option<Result<SimpleVob, String>>,
    /// The run of tokens the grammar forces next (empty: fewer than two),
    /// once worked out (`prepare`); cleared likewise.
    jump: Option<Vec<u32>>,
    /// Seconds each mask took to compute (the `terse_grammar_mask_seconds` histogram).
    mask_seconds: prometheus::Histogram,
}

impl GrammarMask {
    pub fn new(constraint: Constraint, end_of_turn: Vec<u32>, think_open: Option<u32>, mask_seconds: prometheus::Histogram) -> Self {
        let eos = end_of_turn.first().copied().unwrap_or(u32::MAX);
        let think_open = think_open.filter(|_| constraint.may_open_thought);
        GrammarMask { matcher: constraint.matcher, end_of_turn, eos, think_open, fresh: true, ready: None, jump: None, mask_seconds }
    }

    /// Work out the next step now (on a helper thread while the forward pass
    /// runs): the run of forced tokens, and the mask unless that run will be
    /// fed instead, for [`Self::fast_forward`] and [`Self::apply`] to use.
    pub fn prepare(&mut self) {
        if self.forced_run().is_empty() {
            self.prepare_mask();
        }
    }

    fn prepare_mask(&mut self) {
        if self.ready.is_none() {
            let started = Instant::now();
            self.ready = Some(self.matcher.compute_mask_or_eos().map_err(|e| e.to_string()));
            self.mask_seconds.observe(started.elapsed().as_secs_f64());
        }
    }

    /// Mask the next answer token's logits: what the grammar does not allow
    /// goes to −∞. A grammar in error (it cannot happen for a token the mask
    /// allowed) leaves only the end of turn.
    pub fn apply(&mut self, logits: &mut [f32]) {
        self.prepare_mask();
        let mask = self.ready.take().expect("prepared above");
        // The end-of-turn tokens (and a first token's think-open) are decided
        // here, not by the grammar's mask: keep their logits aside.
        let open = self.think_open.filter(|_| self.fresh);
        let own: Vec<(usize, f32)> =
            self.end_of_turn.iter().chain(open.iter()).filter_map(|&id| logits.get(id as usize).map(|&l| (id as usize, l))).collect();
        let end_allowed = match &mask {
            Ok(mask) => {
                mask_out(logits, mask);
                mask.is_allowed(self.eos)
            }
            Err(e) => {
                tracing::warn!("grammar failed: {e}");
                logits.fill(f32::NEG_INFINITY);
                true
            }
        };
        for (id, l) in own {
            let is_open = Some(id as u32) == open;
            logits[id] = if is_open || end_allowed { l } else { f32::NEG_INFINITY };
        }
        // Kept for the next call if nothing was taken in (it still holds).
        self.ready = Some(mask);
    }

    /// The tokens the grammar forces from here on, when there are two or more
    /// (a JSON key, a tool call's fixed text): the engine feeds them at once,
    /// one forward step for all, instead of one decode step each. None while
    /// the first token may still open a thought.
    pub fn fast_forward(&mut self) -> Vec<u32> {
        self.forced_run().to_vec()
    }

    /// The run [`Self::fast_forward`] gives, worked out once per grammar state.
    fn forced_run(&mut self) -> &[u32] {
        if self.jump.is_none() {
            let forced = if self.fresh && self.think_open.is_some() { Vec::new() } else { self.matcher.compute_ff_tokens() };
            let usable = forced.len() >= 2 && !forced.iter().any(|t| self.end_of_turn.contains(t));
            self.jump = Some(if usable { forced } else { Vec::new() });
        }
        self.jump.as_deref().unwrap_or_default()
    }

    /// Any completion token, in either phase, sampled or injected.
    pub fn note_completion_token(&mut self) {
        if self.fresh {
            self.fresh = false;
            self.jump = None; // worked out while a thought could still open
        }
    }

    /// A token sampled in the answer phase: the grammar takes it in. End-of-turn
    /// tokens end the sequence and the think-open token starts a thought;
    /// neither is the grammar's.
    pub fn accept(&mut self, token: u32) {
        if self.end_of_turn.contains(&token) || Some(token) == self.think_open {
            return;
        }
        self.ready = None;
        self.jump = None;
        if let Err(e) = self.matcher.consume_token(token) {
            tracing::warn!("grammar refused token {token}: {e}");
        }
    }
}

/// −∞ for every token `mask` does not allow, a 32-token word at a time
/// (most words of a JSON mask are all-allowed or all-refused).
fn mask_out(logits: &mut [f32], mask: &SimpleVob) {
    let known = mask.len().min(logits.len());
    let (covered, beyond) = logits.split_at_mut(known);
    beyond.fill(f32::NEG_INFINITY);
    for (chunk, &word) in covered.chunks_mut(32).zip(mask.as_slice()) {
        match word {
            u32::MAX => {}
            0 => chunk.fill(f32::NEG_INFINITY),
            _ => {
                for (bit, l) in chunk.iter_mut().enumerate() {
                    if word & (1 << bit) == 0 {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_word_by_word_matches_token_by_token() {
        let mut mask = SimpleVob::alloc(100);
        for id in [0u32, 5, 31, 32, 33, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95, 99] {
            mask.allow_token(id);
        }
        let mut fast: Vec<f32> = (0..110).map(|i| i as f32).collect();
        mask_out(&mut fast, &mask);
        for (id, l) in fast.iter().enumerate() {
            let allowed = id < 100 && mask.is_allowed(id as u32);
            assert_eq!(l.is_finite(), allowed, "token {id}");
        }
    }
}

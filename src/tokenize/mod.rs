//! Text to tokens and back, built from the GGUF file's own metadata, and chat
//! prompts rendered from the model's own template, so one .gguf is all a model needs.

mod chat;
mod stream;

use anyhow::{anyhow, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::Tokenizer;

pub use chat::{ChatMessage, ChatTemplate, TemplateError};
pub use stream::IncrementalDecoder;

pub struct TextTokenizer {
    inner: Tokenizer,
    template: Option<ChatTemplate>,
    /// Tokens that end the assistant's turn (EOS, `<|im_end|>`, ...).
    end_of_turn: Vec<u32>,
}

impl TextTokenizer {
    /// Build the tokenizer, template and end-of-turn set from GGUF metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let mut inner = Tokenizer::from_gguf(content).context("building the tokenizer from GGUF metadata")?;
        let meta = |key: &str| content.metadata.get(key);
        let pre = meta("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned();
        if pre.as_deref() == Some("smollm") {
            // SmolLM's own tokenizer splits digits one by one before the GPT-2 byte-level
            // step; candle's GGUF builder treats "smollm" as plain GPT-2.
            let seq = Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]);
            inner.with_pre_tokenizer(Some(seq));
        }
        let token_text = |key: &str| -> Option<String> {
            let id = meta(key)?.to_u32().ok()?;
            inner.id_to_token(id)
        };
        let bos = token_text("tokenizer.ggml.bos_token_id");
        let eos = token_text("tokenizer.ggml.eos_token_id");
        let template = match meta("tokenizer.chat_template") {
            Some(v) => Some(ChatTemplate::new(
                v.to_string().map_err(|e| anyhow!("tokenizer.chat_template: {e}"))?,
                bos.clone().unwrap_or_default(),
                eos.clone().unwrap_or_default(),
            )?),
            None => None,
        };
        let mut end_of_turn = Vec::new();
        if let Some(id) = meta("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()) {
            end_of_turn.push(id);
        }
        // Chat models end a turn with their template's closing token even where the
        // GGUF names another EOS (Qwen2.5: EOS <|endoftext|>, turn end <|im_end|>).
        for name in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"] {
            if let Some(id) = inner.token_to_id(name) {
                if !end_of_turn.contains(&id) {
                    end_of_turn.push(id);
                }
            }
        }
        Ok(TextTokenizer { inner, template, end_of_turn })
    }

    /// Tokens of `text`; special tokens written in it (e.g. `<|im_start|>`) are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    /// Render a conversation with the model's own chat template.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TemplateError> {
        match &self.template {
            Some(t) => t.render(messages, add_generation_prompt),
            None => Err(TemplateError("the model has no chat template; use /v1/completions".into())),
        }
    }

    pub fn end_of_turn_ids(&self) -> &[u32] {
        &self.end_of_turn
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

//! Text to tokens and back, built from the GGUF file's own metadata, and chat
//! prompts rendered from the model's own template, so one .gguf is all a model needs.

mod chat;
mod spm;
mod stream;

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::Tokenizer;

pub use chat::{apply_level_prompt, ChatMessage, ChatTemplate, TemplateError, TemplateFunctionCall, TemplateToolCall};
pub use stream::{IncrementalDecoder, PhasedDecoder};

pub struct TextTokenizer {
    inner: Tokenizer,
    template: Option<ChatTemplate>,
    /// Tokens that end the assistant's turn (EOS, `<|im_end|>`, ...).
    end_of_turn: Vec<u32>,
    /// The BOS a prompt must start with, where the file asks for it
    /// (`tokenizer.ggml.add_bos_token`: Gemma, R1-Distill, Llama).
    bos_first: Option<u32>,
}

/// How the o200k vocabulary (`tokenizer.ggml.pre` "gpt-4o": Phi-4) splits
/// text before its byte-level BPE, as its `tokenizer.json` publishes it.
const O200K_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// llama.cpp's names for pre-tokenizers that candle builds under another name.
/// Without this, candle falls back to GPT-2's pipeline, which adds a space in
/// front of every prompt (DeepSeek-R1-Distill-Qwen GGUFs say `deepseek-r1-qwen`).
fn candle_pipeline_alias(pre: &str) -> Option<&'static str> {
    match pre {
        "deepseek-r1-qwen" => Some("qwen2"),
        "llama-bpe" => Some("llama3"),
        _ => None,
    }
}

/// EOS, and the turn-closing tokens chat models use even where their EOS is
/// another token (Qwen2.5: EOS `<|endoftext|>`, turn end `<|im_end|>`).
fn end_of_turn_ids(tokenizer: &Tokenizer, eos: Option<u32>) -> Vec<u32> {
    let mut ids: Vec<u32> = eos.into_iter().collect();
    for name in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<｜end▁of▁sentence｜>"] {
        if let Some(id) = tokenizer.token_to_id(name) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// GGUF's token type of tokens a vocabulary added as text (`special: false`
/// in `tokenizer.json`), such as Qwen's `<tool_call>`.
const USER_DEFINED_TOKEN: u32 = 4;

/// candle marks every added token of a GGUF special, so decoding drops them;
/// Hugging Face keeps the user-defined ones (`<tool_call>`) as text. Rebuild
/// the added vocabulary with those as text, as `tokenizer.json` had them.
fn keep_user_defined_tokens_as_text(inner: &mut Tokenizer, content: &gguf_file::Content) -> Result<()> {
    let Some(gguf_file::Value::Array(types)) = content.metadata.get("tokenizer.ggml.token_type") else { return Ok(()) };
    let is_text = |id: u32| types.get(id as usize).and_then(|v| v.to_i32().ok()) == Some(USER_DEFINED_TOKEN as i32);
    let mut added: Vec<(u32, tokenizers::AddedToken)> = inner.get_added_tokens_decoder().into_iter().collect();
    if !added.iter().any(|(id, t)| t.special && is_text(*id)) {
        return Ok(());
    }
    added.sort_by_key(|(id, _)| *id);
    let mut vocabulary = tokenizers::AddedVocabulary::new();
    let tokens = added.into_iter().map(|(id, mut t)| {
        t.special = t.special && !is_text(id);
        t
    });
    vocabulary.add_tokens(tokens, inner.get_model(), inner.get_normalizer()).map_err(|e| anyhow!("re-adding tokens: {e}"))?;
    inner.with_added_vocabulary(vocabulary);
    Ok(())
}

impl TextTokenizer {
    /// Build the tokenizer, template and end-of-turn set from GGUF metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let pre = content.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned();
        let kind = content.metadata.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        let mut inner = match pre.as_deref().and_then(candle_pipeline_alias) {
            // SentencePiece vocabularies (Gemma, Llama 2), which candle does not read.
            _ if kind == "llama" => spm::from_gguf(content),
            // candle knows the pipeline under another name: build from a copy of the
            // metadata that uses it (the tensors are not needed for a tokenizer).
            Some(alias) => {
                let mut renamed = gguf_file::Content {
                    magic: content.magic,
                    metadata: content.metadata.clone(),
                    tensor_infos: Default::default(),
                    tensor_data_offset: content.tensor_data_offset,
                };
                renamed.metadata.insert("tokenizer.ggml.pre".into(), gguf_file::Value::String(alias.into()));
                Tokenizer::from_gguf(&renamed).map_err(anyhow::Error::from)
            }
            None => Tokenizer::from_gguf(content).map_err(anyhow::Error::from),
        }
        .context("building the tokenizer from GGUF metadata")?;
        let meta = |key: &str| content.metadata.get(key);
        keep_user_defined_tokens_as_text(&mut inner, content)?;
        if pre.as_deref() == Some("smollm") {
            // SmolLM's own tokenizer splits digits one by one before the GPT-2 byte-level
            // step; candle's GGUF builder treats "smollm" as plain GPT-2.
            let seq = Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]);
            inner.with_pre_tokenizer(Some(seq));
        }
        if pre.as_deref() == Some("gpt-4o") {
            // Phi-4's vocabulary (o200k) splits words by case, digits in
            // threes, and adds no space in front; candle knows no such pipeline.
            let split = Split::new(SplitPattern::Regex(O200K_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| anyhow!("the gpt-4o pre-tokenizer: {e}"))?;
            inner.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()])));
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
        let eos_id = meta("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok());
        let end_of_turn = end_of_turn_ids(&inner, eos_id);
        let add_bos = meta("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        let bos_first = meta("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok()).filter(|_| add_bos);
        Ok(TextTokenizer { inner, template, end_of_turn, bos_first })
    }

    /// Build the tokenizer from a Hugging Face `tokenizer.json`, and the template
    /// and special tokens from its `tokenizer_config.json`.
    pub fn from_hf_files(tokenizer_json: &Path, tokenizer_config_json: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(tokenizer_json)
            .map_err(|e| anyhow!("reading {}: {e}", tokenizer_json.display()))?;
        let text = std::fs::read_to_string(tokenizer_config_json)
            .with_context(|| format!("reading {}", tokenizer_config_json.display()))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", tokenizer_config_json.display()))?;
        // Special tokens are written either as strings or as {"content": ...} objects.
        let special = |key: &str| -> Option<String> {
            match config.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let bos = special("bos_token");
        let eos = special("eos_token");
        let template = match config.get("chat_template") {
            Some(serde_json::Value::String(source)) => Some(source.clone()),
            // A list of named templates: the one named "default".
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let template = template
            .map(|source| ChatTemplate::new(&source, bos.clone().unwrap_or_default(), eos.clone().unwrap_or_default()))
            .transpose()?;
        let eos_id = eos.as_deref().and_then(|t| inner.token_to_id(t));
        let end_of_turn = end_of_turn_ids(&inner, eos_id);
        let bos_first = bos.as_deref().and_then(|t| inner.token_to_id(t)).filter(|_| config.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false));
        Ok(TextTokenizer { inner, template, end_of_turn, bos_first })
    }

    /// Add the end-of-sequence ids a Hugging Face `generation_config.json` names
    /// (`eos_token_id`, one id or a list) to the end-of-turn set.
    pub fn add_end_of_turn_from_generation_config(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let ids: Vec<u32> = match config.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
            Some(serde_json::Value::Array(list)) => list.iter().filter_map(|v| v.as_u64().map(|n| n as u32)).collect(),
            _ => vec![],
        };
        for id in ids {
            if !self.end_of_turn.contains(&id) {
                self.end_of_turn.push(id);
            }
        }
        Ok(())
    }

    /// The underlying Hugging Face tokenizer (to write it out as `tokenizer.json`).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The chat template's source, if the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.template.as_ref().map(|t| t.source())
    }

    /// Tokens of `text`; special tokens written in it (e.g. `<|im_start|>`) are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokens of a prompt (a rendered chat or a raw completion prompt): as
    /// [`Self::encode`], starting with BOS where the file asks for it and the
    /// text did not write it (a chat template usually does).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if let Some(bos) = self.bos_first.filter(|&b| ids.first() != Some(&b)) {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    /// Render a conversation with the model's own chat template.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TemplateError> {
        self.apply_chat_template_with(messages, add_generation_prompt, None, None)
    }

    /// Like [`Self::apply_chat_template`], with the template's
    /// `enable_thinking` switch and the request's `tools`.
    pub fn apply_chat_template_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, TemplateError> {
        match &self.template {
            Some(t) => t.render_with(messages, add_generation_prompt, enable_thinking, tools),
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

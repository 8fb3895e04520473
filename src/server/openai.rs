//! OpenAI's response objects, as sent on the wire. Requests are read field by
//! field in `validate.rs`, so that each error can name its field.

use serde::Serialize;

use crate::engine::{ReasoningUsage, Usage};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UsageBody {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
    pub completion_tokens_details: CompletionTokensDetails,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CompletionTokensDetails {
    pub reasoning_tokens: usize,
}

impl UsageBody {
    pub fn new(u: Usage, r: &ReasoningUsage) -> Self {
        UsageBody {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: u.cached_tokens },
            completion_tokens_details: CompletionTokensDetails { reasoning_tokens: r.thinking_tokens },
        }
    }
}

/// terse's extension object: how the completion's tokens were spent.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TerseExtension {
    pub mode: &'static str,
    pub thinking_tokens: usize,
    pub answer_tokens: usize,
    pub forced_tokens: usize,
    /// Tokens answer probes fed through the model: spent, not returned, not in `completion_tokens`.
    pub probe_tokens: usize,
    /// Answer probes made.
    pub probes: usize,
    /// `natural | stop_temperature | budget | probe | length | cancelled`; null without a thinking phase.
    pub think_stop_reason: Option<&'static str>,
}

impl TerseExtension {
    pub fn new(mode: &'static str, r: &ReasoningUsage) -> Self {
        TerseExtension {
            mode,
            thinking_tokens: r.thinking_tokens,
            answer_tokens: r.answer_tokens,
            forced_tokens: r.forced_tokens,
            probe_tokens: r.probe_tokens,
            probes: r.probes.iter().sum(),
            think_stop_reason: r.think_stop_reason.map(|s| s.as_str()),
        }
    }
}

/// What every reply and stream chunk of a generation wraps its choices in.
#[derive(Debug, Serialize)]
pub struct Completion<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    /// A whole reply's; in a stream, the usage-only chunk's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
    /// A whole reply's; in a stream, the chunk that carries `finish_reason`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terse: Option<TerseExtension>,
}

// ---- /v1/chat/completions ----

/// `chat.completion`.
pub type ChatCompletion = Completion<ChatChoice>;
/// `chat.completion.chunk`.
pub type ChatCompletionChunk = Completion<ChatChunkChoice>;

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: &'static str,
    pub logprobs: Option<ChatLogprobs>,
}

/// A chat choice's log-probabilities: the answer's tokens in `content`, the
/// thinking's in `reasoning_content` (terse's addition, absent without thinking).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<LogprobToken>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasoning_content: Vec<LogprobToken>,
    pub refusal: Option<()>,
}

/// One completion token: its text and bytes, its log-probability, and the
/// most likely alternatives the request asked for.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogprobToken {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// The legacy completions' shape of the same figures.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
    /// Where each token starts in the choice's text, in bytes.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// From tokens in order, the first at `offset` bytes into the text.
    pub fn new(tokens: &[LogprobToken], mut offset: usize) -> Self {
        let mut out = CompletionLogprobs::default();
        for t in tokens {
            out.tokens.push(t.token.clone());
            out.token_logprobs.push(t.logprob);
            out.top_logprobs.push(t.top_logprobs.iter().map(|a| (a.token.clone(), a.logprob)).collect());
            out.text_offset.push(offset);
            offset += t.bytes.len();
        }
        out
    }
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// `null` when the reply is only tool calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallBody>,
    /// The thinking, apart from the answer; absent when the model did not think.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<ChatLogprobs>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// A call the reply makes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ToolCallBody {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCallBody,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionCallBody {
    pub name: String,
    /// JSON text, as OpenAI sends it.
    pub arguments: String,
}

/// A fragment of a streamed call: the first of a call carries its `id`,
/// `type` and name, the next ones pieces of its arguments; clients join
/// the fragments of one `index`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

// ---- /v1/completions ----

/// `text_completion`, whole or as a stream chunk.
pub type TextCompletion = Completion<TextChoice>;

#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub index: u32,
    /// The answer (the thinking is in `reasoning_content`).
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<CompletionLogprobs>,
}

// ---- /v1/models ----

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Prompt + completion tokens one request may use (known once the model is loaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    /// What terse knows of the loaded model (absent until it is loaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terse: Option<ModelDetails>,
}

#[derive(Debug, Serialize)]
pub struct ModelDetails {
    pub arch: String,
    /// `gguf` or `safetensors`.
    pub format: String,
    pub dtype: String,
    /// Bytes the weights take in memory, as stored (2:4-compressed where they are).
    pub weight_bytes: u64,
    /// Share of projection weights stored 2:4-compressed.
    pub sparse_fraction: f64,
    /// Where the model runs: `cpu` or `cuda:N`.
    pub device: String,
    /// How it thinks, and where terse learned it.
    pub reasoning: crate::engine::ReasoningSummary,
    /// How it writes tool calls: `hermes | llama3_json | generic` (`docs/api.md`),
    /// or `none` when its template uses a syntax terse does not know.
    pub tool_calls: &'static str,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

//! What the HTTP side hands the engine, and what comes back.

use std::time::Instant;

use super::grammar::Constraint;
use crate::reasoning::control::{ReasoningSettings, ThinkStopReason};
use crate::reasoning::phase::Phase;

/// How the next token is chosen. Validated by the server before it gets here.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (arg-max).
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// Same seed, same prompt, same settings: same output.
    pub seed: Option<u64>,
    /// OpenAI's additive penalties, in [-2, 2].
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// The multiplicative penalty of CTRL / Hugging Face; 1 disables it.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The request id (also the `x-request-id` header), for logs.
    pub id: String,
    /// The tokenized prompt (chat template already applied).
    pub prompt: Vec<u32>,
    /// Upper bound on generated tokens; prompt + max_tokens must fit the context.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop strings: generation ends before the first of them, which is not returned.
    pub stop: Vec<String>,
    /// When the server received the request (for time-to-first-token).
    pub received_at: Instant,
    /// How long the model may think, and how it is stopped.
    pub reasoning: ReasoningSettings,
    /// Logit bias, the answer's grammar, log-probabilities.
    pub choice: ChoiceOptions,
}

/// What a request adds to the choice of each token besides sampling.
#[derive(Debug, Clone, Default)]
pub struct ChoiceOptions {
    /// Added to the named tokens' logits (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// The grammar the answer must follow.
    pub constraint: Option<Constraint>,
    /// Report each token's log-probability, and this many of the most likely
    /// alternatives (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
    /// Decode this one a token a step, even where the engine speculates.
    pub no_speculation: bool,
}

/// A completion token's log-probability under the distribution it was drawn
/// from: the model's logits after every edit (TS, penalties, bias, grammar
/// mask), at temperature 1, before top-k / top-p. An injected token was not
/// drawn: it has probability 1 (log-probability 0) and no alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The client went away.
    Cancelled,
}

impl FinishReason {
    pub fn as_openai(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens found in the prefix cache (not computed again).
    pub cached_tokens: usize,
}

/// How the completion's tokens split between thinking and answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReasoningUsage {
    pub thinking_tokens: usize,
    pub answer_tokens: usize,
    /// Injected by budget forcing or min-thinking (counted in the two above too).
    pub forced_tokens: usize,
    /// The part of `forced_tokens` that closed the thought (or wrapped up) at the budget.
    pub forced_end_of_thinking: usize,
    /// The part of `forced_tokens` that replaced early stops (`Wait`).
    pub forced_continuation: usize,
    /// Why thinking ended; `None` when the completion had no controlled thinking phase.
    pub think_stop_reason: Option<ThinkStopReason>,
    /// Tokens answer probes fed through the model (none of them in the completion).
    pub probe_tokens: usize,
    /// Answer probes, by `ProbeOutcome`: settled, unsettled, no answer.
    pub probes: [usize; 3],
}

/// Streamed from the engine to the handler of one request.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// Newly decoded text of one completion token (sampled or injected), in the
    /// phase it belongs to. `text` may be empty when the token ends inside a UTF-8
    /// character or might start a stop string; held-back text may come with a
    /// later token. Count tokens from `Finished`, not from these events.
    /// `forced` marks tokens injected by reasoning control.
    Token { id: u32, text: String, phase: Phase, forced: bool, logprob: Option<TokenLogprob> },
    /// The last event of a successful generation; any held-back text has been sent.
    Finished { reason: FinishReason, usage: Usage, reasoning: ReasoningUsage },
    /// The engine failed on this sequence; nothing more follows.
    Failed { message: String },
}

/// Why the engine refused a request at once.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    #[error("prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the context length of {context} tokens")]
    TooLong { prompt: usize, max_tokens: usize, context: usize },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("the request needs {needed} bytes of KV cache but the whole budget is {budget} bytes")]
    OverBudget { needed: u64, budget: u64 },
    #[error("the server is shutting down")]
    ShuttingDown,
}

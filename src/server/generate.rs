//! What the generation endpoints share between checking a request and
//! answering it: submitting a tokenized prompt to the engine, and reading the
//! engine's events as one [`Generation`], streamed (`sse.rs`) or collected.

use std::time::Instant;

use super::error::ApiError;
use super::record::RequestRecord;
use super::validate::GenerationParams;
use super::{AppState, RequestLimits};
use super::openai::{ChatLogprobs, LogprobToken, TopLogprob};
use crate::engine::{
    unmatched_probe_word, ChoiceOptions, Constraint, EngineHandle, FinishReason, GenerationEvent, GenerationRequest, GenerationStream, ReasoningUsage, TokenLogprob,
    Usage,
};
use crate::reasoning::control::{ReasoningSettings, Strategy};
use crate::reasoning::modes::merge;
use crate::reasoning::phase::{Phase, PhaseTracker};

/// The loaded engine, or why there is none to use.
pub fn engine(state: &AppState) -> Result<EngineHandle, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    state.engine.get().cloned().ok_or(ApiError::NotReady)
}

/// Run CPU-bound prompt work (templating, tokenizing) off the async workers.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(format!("prompt processing failed: {e}")))?
}

/// The mode's preset for this model, overridden by the request's own fields.
pub fn reasoning_settings(engine: &EngineHandle, params: &GenerationParams) -> Result<ReasoningSettings, ApiError> {
    let preset = engine.reasoning_profile().modes.get(params.mode);
    let settings = merge(preset, &params.reasoning).map_err(|e| ApiError::field(format!("reasoning.{}", e.field), e.message))?;
    let words = settings.probe_words.as_deref().unwrap_or_default();
    if let Some(word) = unmatched_probe_word(engine.tokenizer(), words) {
        let message = format!("`reasoning.probe_words`: {word:?} is not one token of this model's vocabulary (alone, after a space or a line break), so no probe would come before it");
        return Err(ApiError::field("reasoning.probe_words", message));
    }
    Ok(settings)
}

/// Mode `none` on a model whose prompt opens a thought (DeepSeek-R1-Distill's
/// template ends with `<think>\n`): close it at once, so the model answers
/// without thinking. The closing text is part of the prompt, not the completion.
pub fn close_open_thought(engine: &EngineHandle, prompt: &mut Vec<u32>) {
    let opens_a_thought = PhaseTracker::new(engine.think_tokens(), prompt).phase() == Phase::Thinking;
    if opens_a_thought {
        prompt.extend_from_slice(engine.end_of_thinking_tokens());
    }
}

/// Check the prompt against the context and the server's limits, and queue
/// it, its answer held to `constraint` if any.
pub fn submit(
    engine: &EngineHandle,
    prompt: Vec<u32>,
    params: &GenerationParams,
    constraint: Option<Constraint>,
    limits: &RequestLimits,
    record: &mut RequestRecord,
) -> Result<GenerationStream, ApiError> {
    let context = engine.context_length();
    if prompt.is_empty() {
        return Err(ApiError::field("prompt", "the prompt is empty"));
    }
    if prompt.len() >= context {
        return Err(ApiError::PromptTooLong { prompt: prompt.len(), context });
    }
    let room = context - prompt.len();
    let max_tokens = match (params.max_tokens, limits.max_tokens) {
        (Some(asked), Some(limit)) if asked > limit => {
            return Err(ApiError::field(
                "max_tokens",
                format!("`max_tokens` (or `max_completion_tokens`) is {asked} but this server allows at most {limit}"),
            ))
        }
        (Some(asked), _) => asked,
        (None, Some(limit)) => limit.min(room),
        (None, None) => room,
    };
    let reasoning = reasoning_settings(engine, params)?;
    if let Some(min) = reasoning.min_thinking_tokens.filter(|&m| m > max_tokens) {
        return Err(ApiError::field(
            "reasoning.min_thinking_tokens",
            format!("`reasoning.min_thinking_tokens` ({min}) is more than `max_tokens` ({max_tokens})"),
        ));
    }
    if constraint.is_some() && engine.think_tokens().is_none() {
        refuse_injections_into_constrained(&reasoning)?;
    }
    let vocab = engine.tokenizer().vocab_size();
    if let Some(&(id, _)) = params.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
        return Err(ApiError::field(format!("logit_bias.{id}"), format!("token id {id} is outside the vocabulary (size {vocab})")));
    }
    let request = GenerationRequest {
        id: record.request_id().to_string(),
        prompt,
        max_tokens,
        sampling: params.sampling.clone(),
        stop: params.stop.clone(),
        received_at: record.received(),
        reasoning,
        choice: ChoiceOptions { logit_bias: params.logit_bias.clone(), constraint, logprobs: params.logprobs, no_speculation: params.no_speculation },
    };
    let prompt_tokens = request.prompt.len();
    let stream = engine.submit(request)?;
    record.on_submitted(prompt_tokens);
    Ok(stream)
}

/// On a model without think tokens the whole reply is the constrained answer:
/// text injected into it (budget forcing's wrap-up, min-thinking's `Wait`)
/// would break the grammar, so a request cannot have both.
fn refuse_injections_into_constrained(reasoning: &ReasoningSettings) -> Result<(), ApiError> {
    let why = "on a model without think tokens, the text it injects would break the answer's grammar";
    if matches!(reasoning.strategy, Strategy::Budget | Strategy::Probe) {
        let name = reasoning.strategy.name();
        return Err(ApiError::unsupported("reasoning.strategy", format!("strategy {name} cannot go with a constrained answer: {why}")));
    }
    if reasoning.wrap_up && reasoning.strategy == Strategy::Ts {
        return Err(ApiError::unsupported("reasoning.wrap_up", format!("`wrap_up` cannot go with a constrained answer: {why}")));
    }
    if reasoning.min_thinking_tokens.is_some_and(|m| m > 0) {
        return Err(ApiError::unsupported("reasoning.min_thinking_tokens", format!("`min_thinking_tokens` cannot go with a constrained answer: {why}")));
    }
    Ok(())
}

/// One submitted generation as a handler reads it: the engine's events under
/// the request's deadline, each noted in the request's record.
///
/// Dropped before the end (the client went away, the deadline passed), it
/// cancels the sequence and hands the record to a task that waits for the
/// engine's last answer, so a cancelled request is counted with the tokens
/// it really used.
pub struct Generation {
    stream: Option<GenerationStream>,
    record: Option<RequestRecord>,
    deadline: Option<Instant>,
    finished: bool,
    /// For the text of tokens in log-probabilities.
    engine: EngineHandle,
    /// Log-probabilities of tokens read but not yet taken (`take_logprobs`).
    logprobs: ChatLogprobs,
    wants_logprobs: bool,
}

/// A generation's last event.
#[derive(Debug, Clone, Copy)]
pub struct Finished {
    pub reason: FinishReason,
    pub usage: Usage,
    pub reasoning: ReasoningUsage,
}

/// What [`Generation::next`] reads.
pub enum Output {
    /// Text of the thinking or of the answer (never empty).
    Text(String, Phase),
    Finished(Finished),
}

impl Generation {
    /// A submitted sequence's events, read for `record` under the server's deadline.
    pub fn new(engine: &EngineHandle, stream: GenerationStream, record: RequestRecord, limits: &RequestLimits) -> Self {
        let deadline = limits.timeout.map(|t| record.received() + t);
        Generation { stream: Some(stream), record: Some(record), deadline, finished: false, engine: engine.clone(), logprobs: ChatLogprobs::default(), wants_logprobs: false }
    }

    /// The request asked for log-probabilities (they come with its tokens).
    pub fn with_logprobs(mut self, wanted: bool) -> Self {
        self.wants_logprobs = wanted;
        self
    }

    pub fn wants_logprobs(&self) -> bool {
        self.wants_logprobs
    }

    /// The log-probabilities of the tokens read since the last call, by phase.
    pub fn take_logprobs(&mut self) -> ChatLogprobs {
        std::mem::take(&mut self.logprobs)
    }

    fn token_entry(&self, id: u32, logprob: f32) -> TopLogprob {
        let bytes = self.engine.token_bytes(id);
        TopLogprob { token: String::from_utf8_lossy(&bytes).into_owned(), logprob, bytes }
    }

    fn note_logprob(&mut self, id: u32, phase: Phase, lp: TokenLogprob) {
        let own = self.token_entry(id, lp.logprob);
        let top_logprobs = lp.top.iter().map(|&(t, l)| self.token_entry(t, l)).collect();
        let entry = LogprobToken { token: own.token, logprob: own.logprob, bytes: own.bytes, top_logprobs };
        match phase {
            Phase::Thinking => self.logprobs.reasoning_content.push(entry),
            Phase::Answer => self.logprobs.content.push(entry),
        }
    }

    pub fn record(&mut self) -> &mut RequestRecord {
        self.record.as_mut().expect("a generation holds its record until dropped")
    }

    /// The next piece of text, or the end. A failure, and the deadline, are errors.
    pub async fn next(&mut self) -> Result<Output, ApiError> {
        loop {
            let stream = self.stream.as_mut().expect("a generation holds its stream until dropped");
            let event = match self.deadline {
                None => stream.read().await,
                Some(deadline) => {
                    let received = self.record.as_ref().map_or(deadline, RequestRecord::received);
                    tokio::time::timeout_at(deadline.into(), stream.read())
                        .await
                        .map_err(|_| ApiError::Timeout(deadline.duration_since(received).as_secs()))?
                }
            };
            match event.map_err(ApiError::Internal)? {
                GenerationEvent::Token { id, text, phase, logprob, .. } => {
                    self.record().on_token();
                    if let Some(lp) = logprob {
                        self.note_logprob(id, phase, lp);
                    }
                    if !text.is_empty() {
                        return Ok(Output::Text(text, phase));
                    }
                }
                GenerationEvent::Finished { reason, usage, reasoning } => {
                    if reason == FinishReason::Cancelled {
                        self.record().on_usage(&usage, &reasoning);
                    } else {
                        self.record().on_finished(&usage, &reasoning);
                    }
                    self.finished = true;
                    return Ok(Output::Finished(Finished { reason, usage, reasoning }));
                }
                GenerationEvent::Failed { message } => return Err(ApiError::Internal(format!("generation failed: {message}"))),
            }
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let (Some(mut stream), Some(mut record)) = (self.stream.take(), self.record.take()) else { return };
        if self.finished {
            return;
        }
        stream.cancel();
        // Without a runtime (it is shutting down) the record is written as it is.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                while let Some(event) = stream.next().await {
                    if let GenerationEvent::Finished { usage, reasoning, .. } = event {
                        record.on_usage(&usage, &reasoning);
                        break;
                    }
                }
            });
        }
    }
}

/// A whole (non-streamed) generation.
pub struct Collected {
    /// The answer.
    pub text: String,
    /// The thinking, if the model thought.
    pub reasoning: Option<String>,
    pub finished: Finished,
    /// When the request asked for them.
    pub logprobs: Option<ChatLogprobs>,
}

pub async fn collect(generation: &mut Generation) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut thinking: Option<String> = None;
    loop {
        match generation.next().await? {
            Output::Text(piece, Phase::Thinking) => thinking.get_or_insert_with(String::new).push_str(&piece),
            Output::Text(piece, Phase::Answer) => text.push_str(&piece),
            Output::Finished(finished) => {
                let logprobs = generation.wants_logprobs().then(|| generation.take_logprobs());
                return Ok(Collected { text, reasoning: thinking, finished, logprobs });
            }
        }
    }
}

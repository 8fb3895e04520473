//! What the generation endpoints share: the per-request metrics record (a Drop
//! guard, so a streamed request is counted when its stream ends), submitting a
//! tokenized prompt to the engine, and collecting a whole answer.

use std::sync::Arc;
use std::time::Instant;

use super::error::ApiError;
use super::validate::{CommonParams, Mode};
use super::AppState;
use crate::engine::{
    EngineHandle, FinishReason, GenerationEvent, GenerationRequest, GenerationStream, ReasoningUsage, Usage,
};
use crate::reasoning::control::{ForcedKind, ReasoningSettings, ThinkStopReason};
use crate::reasoning::modes::merge;
use crate::reasoning::phase::{Phase, PhaseTracker};
use crate::metrics::Metrics;

/// The `status` label of a request whose client went away before the end
/// (nginx's convention: no HTTP status was ever sent for it).
pub const STATUS_CLIENT_CLOSED: u16 = 499;

/// Metrics of one generation request, recorded when it is dropped.
pub struct RequestRecord {
    metrics: Arc<Metrics>,
    model: String,
    endpoint: &'static str,
    request_id: String,
    mode: Mode,
    received: Instant,
    status: u16,
    submitted: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    reasoning: Option<ReasoningUsage>,
    /// The whole request's deadline (`RequestLimits::timeout`).
    deadline: Option<Instant>,
    max_tokens_limit: Option<usize>,
    /// Why it failed, for the log line.
    error: Option<String>,
    /// Tokens streamed so far by phase, for requests that never finish.
    seen_thinking: usize,
    seen_answer: usize,
    /// Whether the controlled phase (thinking, or the whole answer of a model
    /// without think tokens) is still running, as far as the streamed tokens tell.
    controlled_open: bool,
    has_think_tokens: bool,
}

impl RequestRecord {
    pub fn new(state: &AppState, endpoint: &'static str, request_id: String) -> Self {
        RequestRecord {
            metrics: state.metrics.clone(),
            model: state.served_name.clone(),
            endpoint,
            request_id,
            mode: Mode::Default,
            received: Instant::now(),
            status: STATUS_CLIENT_CLOSED,
            submitted: false,
            prompt_tokens: 0,
            completion_tokens: 0,
            first_token: None,
            last_token: None,
            reasoning: None,
            deadline: state.limits.timeout.map(|t| Instant::now() + t),
            max_tokens_limit: state.limits.max_tokens,
            error: None,
            seen_thinking: 0,
            seen_answer: 0,
            controlled_open: false,
            has_think_tokens: false,
        }
    }

    pub fn received(&self) -> Instant {
        self.received
    }

    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    /// Record `e`'s status and answer with it.
    pub fn reject(&mut self, e: ApiError) -> axum::response::Response {
        self.set_error(&e);
        axum::response::IntoResponse::into_response(e)
    }

    /// Record the status and message of an error (for a stream, whose status was 200).
    pub fn set_error(&mut self, e: &ApiError) {
        self.status = e.status().as_u16();
        self.error = Some(e.to_string());
    }

    /// The next event of `stream`, or a timeout error once the request's deadline has passed.
    pub async fn next_event(&self, stream: &mut GenerationStream) -> Result<Option<GenerationEvent>, ApiError> {
        let Some(deadline) = self.deadline else {
            return Ok(stream.next().await);
        };
        tokio::time::timeout_at(deadline.into(), stream.next())
            .await
            .map_err(|_| ApiError::Timeout(deadline.duration_since(self.received).as_secs()))
    }

    fn on_submitted(&mut self, prompt_tokens: usize, has_think_tokens: bool, prompt_opens_thought: bool) {
        self.submitted = true;
        self.prompt_tokens = prompt_tokens;
        self.has_think_tokens = has_think_tokens;
        self.controlled_open = !has_think_tokens || prompt_opens_thought;
    }

    pub fn on_token(&mut self, phase: Phase) {
        let now = Instant::now();
        self.first_token.get_or_insert(now);
        self.last_token = Some(now);
        self.completion_tokens += 1;
        match phase {
            Phase::Thinking => self.seen_thinking += 1,
            Phase::Answer => self.seen_answer += 1,
        }
        if self.has_think_tokens {
            self.controlled_open = phase == Phase::Thinking;
        }
    }

    pub fn mode_label(&self) -> &'static str {
        self.mode.label()
    }

    pub fn on_finished(&mut self, usage: &Usage, reasoning: &ReasoningUsage) {
        self.status = 200;
        self.reasoning = Some(*reasoning);
        self.prompt_tokens = usage.prompt_tokens;
        self.completion_tokens = usage.completion_tokens;
    }
}

impl RequestRecord {
    /// The one log line of a generation request.
    fn log(&self, secs: f64) {
        let latency_ms = secs * 1000.0;
        let error = self.error.as_deref().unwrap_or("");
        let (thinking_tokens, answer_tokens) = match &self.reasoning {
            Some(r) => (r.thinking_tokens, r.answer_tokens),
            // Not finished: what was streamed so far.
            None => (self.seen_thinking, self.seen_answer),
        };
        tracing::info!(
            request_id = %self.request_id,
            model = %self.model,
            endpoint = self.endpoint,
            mode = self.mode.label(),
            status = self.status,
            prompt_tokens = self.prompt_tokens,
            thinking_tokens,
            answer_tokens,
            completion_tokens = self.completion_tokens,
            latency_ms,
            error,
            "request"
        );
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let m = &self.metrics;
        let mode = self.mode.label();
        let status = self.status.to_string();
        m.requests_total
            .with_label_values(&[&self.model, self.endpoint, mode, &status])
            .inc();
        let secs = self.received.elapsed().as_secs_f64();
        self.log(secs);
        if !self.submitted {
            return;
        }
        let labels = [self.model.as_str(), self.endpoint, mode];
        m.request_duration_seconds.with_label_values(&labels).observe(secs);
        m.prompt_tokens_total
            .with_label_values(&labels)
            .inc_by(self.prompt_tokens as u64);
        m.completion_tokens_total
            .with_label_values(&labels)
            .inc_by(self.completion_tokens as u64);
        // A request that never finished (its client went away) counts what it
        // streamed, and a thought it left running ended as `cancelled`.
        let reasoning = self.reasoning.unwrap_or(ReasoningUsage {
            thinking_tokens: self.seen_thinking,
            answer_tokens: self.seen_answer,
            think_stop_reason: (self.controlled_open && self.status == STATUS_CLIENT_CLOSED)
                .then_some(ThinkStopReason::Cancelled),
            ..Default::default()
        });
        {
            let r = &reasoning;
            let by_mode = [self.model.as_str(), mode];
            m.reasoning_tokens_total.with_label_values(&by_mode).inc_by(r.thinking_tokens as u64);
            m.answer_tokens_total.with_label_values(&by_mode).inc_by(r.answer_tokens as u64);
            m.reasoning_tokens_per_request.with_label_values(&by_mode).observe(r.thinking_tokens as f64);
            m.answer_tokens_per_request.with_label_values(&by_mode).observe(r.answer_tokens as f64);
            for (kind, n) in [
                (ForcedKind::EndOfThinking, r.forced_end_of_thinking),
                (ForcedKind::Continuation, r.forced_continuation),
            ] {
                m.forced_tokens_total.with_label_values(&[self.model.as_str(), mode, kind.as_str()]).inc_by(n as u64);
            }
            if let Some(reason) = r.think_stop_reason {
                m.think_stops_total.with_label_values(&[self.model.as_str(), mode, reason.as_str()]).inc();
            }
        }
        if let Some(first) = self.first_token {
            m.time_to_first_token_seconds
                .with_label_values(&labels)
                .observe(first.duration_since(self.received).as_secs_f64());
            if let Some(last) = self.last_token.filter(|_| self.completion_tokens >= 2) {
                let per_token = last.duration_since(first).as_secs_f64() / (self.completion_tokens - 1) as f64;
                m.time_per_output_token_seconds
                    .with_label_values(&labels)
                    .observe(per_token);
            }
        }
    }
}

/// The loaded engine, or why there is none to use.
pub fn engine(state: &AppState) -> Result<EngineHandle, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    state.engine.get().cloned().ok_or(ApiError::NotReady)
}

/// Run CPU-bound prompt work (templating, tokenizing) off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("prompt processing failed: {e}")))?
}

/// The mode's preset for this model, overridden by the request's own fields.
pub fn reasoning_settings(engine: &EngineHandle, params: &CommonParams) -> Result<ReasoningSettings, ApiError> {
    let preset = engine.reasoning_profile().modes.get(params.mode);
    merge(preset, &params.reasoning).map_err(|e| ApiError::field(format!("reasoning.{}", e.field), e.message))
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

/// Check the prompt against the context and queue it.
pub fn submit(
    engine: &EngineHandle,
    prompt: Vec<u32>,
    params: &CommonParams,
    record: &mut RequestRecord,
) -> Result<GenerationStream, ApiError> {
    let context = engine.context_length();
    if prompt.is_empty() {
        return Err(ApiError::field("prompt", "the prompt is empty"));
    }
    if prompt.len() >= context {
        return Err(ApiError::PromptTooLong {
            prompt: prompt.len(),
            context,
        });
    }
    let prompt_len = prompt.len();
    let room = context - prompt_len;
    let max_tokens = match (params.max_tokens, record.max_tokens_limit) {
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
    let request = GenerationRequest {
        id: record.request_id.clone(),
        prompt,
        max_tokens,
        sampling: params.sampling.clone(),
        stop: params.stop.clone(),
        received_at: record.received(),
        reasoning: reasoning_settings(engine, params)?,
    };
    let think = engine.think_tokens();
    let opens_thought = PhaseTracker::new(think, &request.prompt).phase() == Phase::Thinking;
    let stream = engine.submit(request)?;
    record.on_submitted(prompt_len, think.is_some(), opens_thought);
    Ok(stream)
}

/// A whole (non-streamed) generation.
pub struct Collected {
    /// The answer.
    pub text: String,
    /// The thinking, if the model thought.
    pub reasoning: Option<String>,
    pub reason: FinishReason,
    pub usage: Usage,
    pub reasoning_usage: ReasoningUsage,
}

pub async fn collect(mut stream: GenerationStream, record: &mut RequestRecord) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut thinking: Option<String> = None;
    // On a timeout `stream` is dropped on return, which cancels the sequence.
    while let Some(event) = record.next_event(&mut stream).await? {
        match event {
            GenerationEvent::Token { text: piece, phase, .. } => {
                record.on_token(phase);
                match phase {
                    Phase::Thinking => thinking.get_or_insert_with(String::new).push_str(&piece),
                    Phase::Answer => text.push_str(&piece),
                }
            }
            GenerationEvent::Finished { reason, usage, reasoning } => {
                record.on_finished(&usage, &reasoning);
                return Ok(Collected { text, reasoning: thinking, reason, usage, reasoning_usage: reasoning });
            }
            GenerationEvent::Failed { message } => {
                return Err(ApiError::Internal(format!("generation failed: {message}")));
            }
        }
    }
    Err(ApiError::Internal(
        "the engine stopped before finishing the request".into(),
    ))
}

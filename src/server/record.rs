//! The metrics and the log line of one generation request, recorded when its
//! [`RequestRecord`] is dropped: for a stream, when the stream ends; for a
//! request whose client went away, once the engine has said what it used.

use std::sync::Arc;
use std::time::Instant;

use super::error::ApiError;
use super::validate::Mode;
use super::AppState;
use crate::engine::{ReasoningUsage, Usage};
use crate::metrics::Metrics;
use crate::reasoning::control::ForcedKind;
use crate::reasoning::probing::ProbeOutcome;

/// The `status` label of a request whose client went away before the end
/// (nginx's convention: no HTTP status was ever sent for it).
pub const STATUS_CLIENT_CLOSED: u16 = 499;

/// What one generation request did, written to the metrics and the log on drop.
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
    /// The engine's account of the tokens, once it has given it.
    reasoning: Option<ReasoningUsage>,
    /// Why it failed, for the log line.
    error: Option<String>,
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
            error: None,
        }
    }

    pub fn received(&self) -> Instant {
        self.received
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    pub fn mode_label(&self) -> &'static str {
        self.mode.label()
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

    pub fn on_submitted(&mut self, prompt_tokens: usize) {
        self.submitted = true;
        self.prompt_tokens = prompt_tokens;
    }

    /// A completion token streamed (for the time to the first one and between them).
    pub fn on_token(&mut self) {
        let now = Instant::now();
        self.first_token.get_or_insert(now);
        self.last_token = Some(now);
        self.completion_tokens += 1;
    }

    /// The engine's last word on a request answered in full: status 200.
    pub fn on_finished(&mut self, usage: &Usage, reasoning: &ReasoningUsage) {
        self.status = 200;
        self.on_usage(usage, reasoning);
    }

    /// The engine's account of a request the client never got the end of
    /// (it went away, or an error ended the reply): the status stays as it
    /// is (499, or the error's), even when the sequence had ended anyway.
    pub fn on_usage(&mut self, usage: &Usage, reasoning: &ReasoningUsage) {
        self.reasoning = Some(*reasoning);
        self.prompt_tokens = usage.prompt_tokens;
        self.completion_tokens = usage.completion_tokens;
    }

    /// The one log line of a generation request.
    fn log(&self, secs: f64) {
        let reasoning = self.reasoning.unwrap_or_default();
        tracing::info!(
            request_id = %self.request_id,
            model = %self.model,
            endpoint = self.endpoint,
            mode = self.mode.label(),
            status = self.status,
            prompt_tokens = self.prompt_tokens,
            thinking_tokens = reasoning.thinking_tokens,
            answer_tokens = reasoning.answer_tokens,
            completion_tokens = self.completion_tokens,
            latency_ms = secs * 1000.0,
            error = self.error.as_deref().unwrap_or(""),
            "request"
        );
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let m = &self.metrics;
        let mode = self.mode.label();
        let status = self.status.to_string();
        m.requests_total.with_label_values(&[&self.model, self.endpoint, mode, &status]).inc();
        let secs = self.received.elapsed().as_secs_f64();
        self.log(secs);
        if !self.submitted {
            return;
        }
        let labels = [self.model.as_str(), self.endpoint, mode];
        m.request_duration_seconds.with_label_values(&labels).observe(secs);
        m.prompt_tokens_total.with_label_values(&labels).inc_by(self.prompt_tokens as u64);
        m.completion_tokens_total.with_label_values(&labels).inc_by(self.completion_tokens as u64);
        // Without the engine's account (it stopped first) there are no token counts to split.
        let r = self.reasoning.unwrap_or_default();
        let by_mode = [self.model.as_str(), mode];
        m.reasoning_tokens_total.with_label_values(&by_mode).inc_by(r.thinking_tokens as u64);
        m.answer_tokens_total.with_label_values(&by_mode).inc_by(r.answer_tokens as u64);
        m.reasoning_tokens_per_request.with_label_values(&by_mode).observe(r.thinking_tokens as f64);
        m.answer_tokens_per_request.with_label_values(&by_mode).observe(r.answer_tokens as f64);
        for (kind, n) in [(ForcedKind::EndOfThinking, r.forced_end_of_thinking), (ForcedKind::Continuation, r.forced_continuation)] {
            m.forced_tokens_total.with_label_values(&[self.model.as_str(), mode, kind.as_str()]).inc_by(n as u64);
        }
        m.probe_tokens_total.with_label_values(&by_mode).inc_by(r.probe_tokens as u64);
        for (outcome, n) in ProbeOutcome::ALL.iter().zip(r.probes) {
            m.probes_total.with_label_values(&[self.model.as_str(), mode, outcome.as_str()]).inc_by(n as u64);
        }
        if let Some(reason) = r.think_stop_reason {
            m.think_stops_total.with_label_values(&[self.model.as_str(), mode, reason.as_str()]).inc();
        }
        if let Some(first) = self.first_token {
            m.time_to_first_token_seconds.with_label_values(&labels).observe(first.duration_since(self.received).as_secs_f64());
            if let Some(last) = self.last_token.filter(|_| self.completion_tokens >= 2) {
                let per_token = last.duration_since(first).as_secs_f64() / (self.completion_tokens - 1) as f64;
                m.time_per_output_token_seconds.with_label_values(&labels).observe(per_token);
            }
        }
    }
}

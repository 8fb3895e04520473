//! The one error type of the HTTP API. Each variant knows its status code and
//! renders OpenAI's body `{"error": {"message", "type", "param", "code"}}`, as a
//! plain response or, once a stream has started, as an SSE `data:` event.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::SubmitError;

/// Seconds a client is told to wait (`Retry-After`) after a 429, or a 503 while loading.
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// A field is missing, of the wrong type or out of range (`param` names it).
    #[error("{message}")]
    InvalidField { param: String, message: String },
    /// The body is not a JSON object (malformed JSON, not UTF-8, ...).
    #[error("{0}")]
    BadBody(String),
    /// A request the server understands but does not support (e.g. `n` > 1).
    #[error("{message}")]
    Unsupported { param: String, message: String },
    /// The chat template refused the conversation.
    #[error("{0}")]
    Template(String),
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("{0}")]
    RouteNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the request body exceeds the limit of {0} bytes")]
    BodyTooLarge(usize),
    #[error("the prompt has {prompt} tokens but the model's context length is {context} tokens")]
    PromptTooLong { prompt: usize, context: usize },
    /// prompt + max_tokens does not fit the context or the KV budget.
    #[error("{0}")]
    TooManyTokens(String),
    #[error("{0}")]
    QueueFull(String),
    #[error("the model is still loading; retry when /ready answers 200")]
    NotReady,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Internal(String),
    /// No API key, or not a valid one (see `auth.rs`).
    #[error("{0}")]
    Unauthorized(String),
    /// The request ran past the server's whole-request deadline.
    #[error("the request did not finish within the server's limit of {0} seconds; ask for fewer tokens or retry later")]
    Timeout(u64),
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn field(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidField {
            param: param.into(),
            message: message.into(),
        }
    }

    pub fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Unsupported {
            param: param.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidField { .. }
            | ApiError::BadBody(_)
            | ApiError::Unsupported { .. }
            | ApiError::Template(_)
            | ApiError::TooManyTokens(_) => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTooLarge(_) | ApiError::PromptTooLong { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::NOT_FOUND if matches!(self, ApiError::RouteNotFound(_)) => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            ApiError::InvalidField { param, .. } | ApiError::Unsupported { param, .. } => Some(param.clone()),
            ApiError::ModelNotFound(_) => Some("model".into()),
            ApiError::Template(_) => Some("messages".into()),
            ApiError::PromptTooLong { .. } => Some("prompt".into()),
            ApiError::TooManyTokens(_) => Some("max_tokens".into()),
            _ => None,
        }
    }

    fn code(&self) -> Option<&'static str> {
        Some(match self {
            ApiError::InvalidField { .. } => "invalid_value",
            ApiError::BadBody(_) => "invalid_json",
            ApiError::Unsupported { .. } => "unsupported_parameter",
            ApiError::Template(_) => "invalid_messages",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::RouteNotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::BodyTooLarge(_) => "request_too_large",
            ApiError::PromptTooLong { .. } | ApiError::TooManyTokens(_) => "context_length_exceeded",
            ApiError::QueueFull(_) => "rate_limit_exceeded",
            ApiError::NotReady => "model_not_ready",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Internal(_) => "internal_error",
            ApiError::Unauthorized(_) => "invalid_api_key",
            ApiError::Timeout(_) => "request_timeout",
        })
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        }
    }

    /// The JSON of [`ApiError::body`], for an SSE `data:` line once a stream has begun.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.body()).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.into()
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Worth retrying here soon: the queue drains, the model finishes loading.
        let retry = matches!(self, ApiError::QueueFull(_) | ApiError::NotReady);
        // The one line per request is the access log's (`access_log.rs`) or
        // the generation record's; this is detail for debugging.
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "request rejected");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull(_) => ApiError::QueueFull(e.to_string()),
            SubmitError::TooLong { .. } | SubmitError::OverBudget { .. } => ApiError::TooManyTokens(e.to_string()),
            SubmitError::EmptyPrompt => ApiError::field("prompt", "the prompt is empty"),
            SubmitError::ShuttingDown => ApiError::ShuttingDown,
        }
    }
}

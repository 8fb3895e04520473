//! The JSON body extractor of the generation endpoints. Unlike axum's `Json`,
//! every rejection is an [`ApiError`] (OpenAI-shaped), the content type is not
//! required (curl's `-d` sends a form type), and an over-long body is drained
//! before answering 413 so that the client reads the answer instead of a reset.

use std::sync::Arc;

use axum::extract::{FromRequest, Request};
use axum::http::header;
use futures::StreamExt;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::AppState;

/// Bodies up to this many times the limit are read and thrown away before the
/// 413 is sent; beyond it the connection is simply answered and closed.
const DRAIN_FACTOR: usize = 4;

/// The request body parsed as a JSON object.
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<Arc<AppState>> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let limit = state.max_body_bytes;
        let drain_limit = limit.saturating_mul(DRAIN_FACTOR);
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > drain_limit as u64) {
            return Err(ApiError::BodyTooLarge(limit));
        }
        let mut body = req.into_body().into_data_stream();
        let mut buf = Vec::new();
        let mut seen = 0usize;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ApiError::BadBody(format!("failed to read the request body: {e}")))?;
            seen = seen.saturating_add(chunk.len());
            if seen > drain_limit {
                break;
            }
            if seen <= limit {
                buf.extend_from_slice(&chunk);
            }
        }
        if seen > limit {
            return Err(ApiError::BodyTooLarge(limit));
        }
        parse_object(&buf).map(JsonObject)
    }
}

/// Parse `bytes` as one JSON object, with errors a client can act on.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::BadBody(
            "the request body is empty; expected a JSON object".into(),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::BadBody(format!(
            "the request body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::BadBody(format!(
            "the request body must be a JSON object, not {}",
            super::validate::json_type_name(&other)
        ))),
        Err(e) => Err(ApiError::BadBody(format!("the request body is not valid JSON: {e}"))),
    }
}

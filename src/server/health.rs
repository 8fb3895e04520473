//! Probes and metrics: `GET /health`, `GET /ready`, `GET /metrics`, and the
//! OpenAI-shaped answers for unknown routes and methods.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::AppState;

/// Liveness: 200 while the process runs.
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: 200 only between the model's load and the start of shutdown.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let (status, word) = if state.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
    } else if state.engine.get().is_some() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    };
    (status, Json(json!({"status": word, "model": state.served_name}))).into_response()
}

/// Prometheus text exposition format 0.0.4.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound(format!("no route for {method} {}", uri.path()))
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// The playground page, built into the binary. Its policy lets it load
/// nothing from elsewhere: its script and style are inline, its requests
/// same-origin.
pub async fn playground() -> Response {
    let policy = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:";
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CONTENT_SECURITY_POLICY, policy),
        ],
        include_str!("playground.html"),
    )
        .into_response()
}

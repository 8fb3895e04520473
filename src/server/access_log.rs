//! One log line per request that is not a generation request (those are
//! logged by their `RequestRecord` when they end, which for a stream is long
//! after the response has begun). Probes and scrapes that succeed are logged
//! at debug level only, or kubelets and Prometheus would fill the log.

use std::time::Instant;

use axum::extract::Request;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::{request_id, CHAT_COMPLETIONS, COMPLETIONS, HEALTH, METRICS, READY};

pub async fn log_request(request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    if method == Method::POST && (path == CHAT_COMPLETIONS || path == COMPLETIONS) {
        return next.run(request).await;
    }
    let id = request_id(request.headers());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let routine = [HEALTH, READY, METRICS].contains(&path.as_str()) && response.status().is_success();
    if routine {
        tracing::debug!(request_id = %id, %method, path, status, latency_ms, "request");
    } else {
        tracing::info!(request_id = %id, %method, path, status, latency_ms, "request");
    }
    response
}

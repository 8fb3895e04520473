//! Optional API keys. With keys configured, every route but the probes and
//! the metrics (`/health`, `/ready`, `/metrics`, which kubelets and Prometheus
//! call without credentials) needs `Authorization: Bearer KEY`; anything else
//! gets 401 in OpenAI's error shape (`invalid_api_key`).
//!
//! Keys are compared with the `subtle` crate's constant-time equality, against
//! every configured key without stopping at the first match, so the answer's
//! timing tells nothing about how much of a guess was right. (`subtle` is a
//! tiny, dependency-free crate written for exactly this; a hand-written loop
//! could be turned back into an early-exit compare by the optimiser.) Only a
//! key's length can show, as with any such compare. Keys are never logged:
//! [`ApiKeys`]'s `Debug` prints how many there are, not what they are.

use std::sync::Arc;

use anyhow::{bail, Result};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::{Choice, ConstantTimeEq};

use super::error::ApiError;
use super::ROUTES;

/// Whether `path` is open without a key (`Route::open`: the probes, the
/// metrics, the API description).
fn is_open(path: &str) -> bool {
    ROUTES.iter().any(|r| r.open && r.path == path)
}

/// The accepted keys; empty means no authentication.
#[derive(Clone, Default)]
pub struct ApiKeys(Arc<Vec<Vec<u8>>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

impl ApiKeys {
    /// Keys as given; empty or blank ones and ones with whitespace inside are refused.
    pub fn new(keys: impl IntoIterator<Item = String>) -> Result<Self> {
        let mut out = Vec::new();
        for (i, key) in keys.into_iter().enumerate() {
            if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                // Say which one, never what it is.
                bail!("API key #{} is empty or holds whitespace or control characters", i + 1);
            }
            out.push(key.into_bytes());
        }
        Ok(ApiKeys(Arc::new(out)))
    }

    /// Keys from a file: one a line; blank lines and lines starting with `#` are skipped.
    pub fn parse_file(text: &str) -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `presented` is one of the keys, in time independent of which
    /// key (if any) it matches and of where it first differs.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let mut found = Choice::from(0);
        for key in self.0.iter() {
            found |= key.as_slice().ct_eq(presented);
        }
        found.into()
    }
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme is case-insensitive).
fn bearer_token(value: &HeaderValue) -> Option<&[u8]> {
    let bytes = value.as_bytes();
    let scheme = bytes.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = bytes[7..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The middleware: pass open routes and requests with a valid key, answer 401 otherwise.
pub async fn require_api_key(State(keys): State<ApiKeys>, request: Request, next: Next) -> Response {
    if is_open(request.uri().path()) {
        return next.run(request).await;
    }
    let error = match request.headers().get(header::AUTHORIZATION) {
        None => ApiError::Unauthorized(
            "no API key given; send it in an `Authorization: Bearer KEY` header".into(),
        ),
        Some(value) => match bearer_token(value) {
            Some(token) if keys.accepts(token) => return next.run(request).await,
            Some(_) => ApiError::Unauthorized("incorrect API key provided".into()),
            None => ApiError::Unauthorized(
                "the Authorization header must be `Bearer KEY`".into(),
            ),
        },
    };
    // The one log line of this request (it never reaches the access log).
    tracing::info!(
        request_id = %super::request_id(request.headers()),
        method = %request.method(),
        path = request.uri().path(),
        status = 401,
        error = %error,
        "request"
    );
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_keys() {
        let keys = ApiKeys::new(["alpha-key".to_string(), "beta".to_string()]).unwrap();
        assert!(keys.accepts(b"alpha-key"));
        assert!(keys.accepts(b"beta"));
        assert!(!keys.accepts(b"alpha-kez"));
        assert!(!keys.accepts(b"alpha"));
        assert!(!keys.accepts(b"alpha-key "));
        assert!(!keys.accepts(b""));
        assert!(!ApiKeys::default().accepts(b"anything"));
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)");
    }

    #[test]
    fn refuses_blank_keys_without_echoing_them() {
        let e = ApiKeys::new(["ok".to_string(), "has space".to_string()]).unwrap_err().to_string();
        assert!(e.contains("#2") && !e.contains("has space"), "{e}");
        assert!(ApiKeys::new([String::new()]).is_err());
    }

    #[test]
    fn key_files_and_bearer_headers() {
        assert_eq!(ApiKeys::parse_file("# team keys\nk1\n\n  k2  \n"), vec!["k1", "k2"]);
        let token = |s: &'static str| bearer_token(&HeaderValue::from_static(s)).map(|t| t.to_vec());
        assert_eq!(token("Bearer abc"), Some(b"abc".to_vec()));
        assert_eq!(token("bearer  abc "), Some(b"abc".to_vec()));
        assert_eq!(token("Basic abc"), None);
        assert_eq!(token("Bearer "), None);
        assert_eq!(token("Bear"), None);
    }
}

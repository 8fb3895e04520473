//! The production options of `serve` on the real server and model over real
//! HTTP: API keys, the whole-request deadline and the `max_tokens` ceiling.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use terse::server::{ApiKeys, RequestLimits};

const KEY: &str = "test-key-0123456789";

async fn send(req: reqwest::RequestBuilder) -> Reply {
    let resp = req.send().await.expect("request failed");
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply { status, headers, json }
}

#[tokio::test]
async fn api_keys_guard_everything_but_probes_and_metrics() {
    let server = TestServer::start_with(|c| {
        c.api_keys = ApiKeys::new([KEY.to_string(), "second-key".to_string()]).unwrap();
    });
    let http = client();
    let body = chat_body("Hi", 4);

    // No key, a wrong key, a key of the wrong scheme: 401 in OpenAI's shape.
    for auth in [None, Some(format!("Bearer {KEY}x")), Some(format!("Basic {KEY}")), Some("Bearer".into())] {
        let mut req = http.post(server.url(CHAT)).json(&body);
        if let Some(a) = &auth {
            req = req.header("authorization", a);
        }
        let r = send(req).await;
        let error = assert_openai_error(&r, 401);
        assert_eq!(error["type"], "invalid_request_error", "{auth:?}");
        assert_eq!(error["code"], "invalid_api_key", "{auth:?}");
        assert!(!error["message"].as_str().unwrap().contains(KEY), "the key is echoed: {error}");
        assert_eq!(r.headers["www-authenticate"], "Bearer");
    }
    // Other routes too, unknown ones included (no probing for routes without a key).
    for path in ["/v1/models", "/v1/completions", "/no/such/route"] {
        let r = send(http.get(server.url(path))).await;
        assert_openai_error(&r, 401);
    }
    // Probes and metrics stay open.
    for path in ["/health", "/ready", "/metrics"] {
        let r = send(http.get(server.url(path))).await;
        assert_eq!(r.status, 200, "{path}");
    }
    // Either key works, the scheme in any case.
    for auth in [format!("Bearer {KEY}"), "bearer second-key".to_string()] {
        let r = send(http.post(server.url(CHAT)).header("authorization", &auth).json(&body)).await;
        assert_eq!(r.status, 200, "{}", r.json);
        assert!(r.json["choices"][0]["message"]["content"].is_string());
    }
    let r = send(http.get(server.url("/v1/models")).bearer_auth(KEY)).await;
    assert_eq!(r.json["data"][0]["id"], MODEL);
    server.shutdown_and_wait().unwrap();
}

#[tokio::test]
async fn max_tokens_over_the_ceiling_is_refused_and_the_ceiling_is_the_default() {
    let server = TestServer::start_with(|c| {
        c.limits = RequestLimits { max_tokens: Some(8), timeout: None };
    });
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut body = chat_body("Hi", 4);
        body.as_object_mut().unwrap().remove("max_tokens");
        body[field] = json!(9);
        let r = post_json(&server.url(CHAT), &body).await;
        let error = assert_openai_error(&r, 400);
        assert_eq!(error["param"], "max_tokens");
        assert!(error["message"].as_str().unwrap().contains("at most 8"), "{error}");
    }
    let at_limit = post_json(&server.url(CHAT), &chat_body("Tell me a long story.", 8)).await;
    assert_eq!(at_limit.status, 200, "{}", at_limit.json);

    // No max_tokens: the ceiling applies, so the answer stops at 8 tokens.
    let mut body = chat_body("Write a long essay about the history of Rome.", 1);
    body.as_object_mut().unwrap().remove("max_tokens");
    let r = post_json(&server.url(CHAT), &body).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["usage"]["completion_tokens"], 8, "{}", r.json);
    assert_eq!(r.json["choices"][0]["finish_reason"], "length");
    server.shutdown_and_wait().unwrap();
}

#[tokio::test]
async fn a_request_past_its_deadline_is_cancelled_with_a_clear_error() {
    // 100 ms cannot hold 2000 tokens of an essay (nor their prefill) on any CPU.
    let server = TestServer::start_with(|c| {
        c.limits = RequestLimits { timeout: Some(Duration::from_millis(100)), max_tokens: None };
    });
    let body = chat_body("Write a very long essay about the history of Rome.", 2000);
    let r = post_json(&server.url(CHAT), &body).await;
    let error = assert_openai_error(&r, 504);
    assert_eq!(error["code"], "request_timeout");

    // Streamed: the stream ends with the error event, then [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, events) = post_sse(&server.url(CHAT), &streamed).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap(), "[DONE]", "{events:?}");
    let error = &events[events.len() - 2]["error"];
    assert_eq!(error["code"], "request_timeout", "{events:?}");

    // Both sequences were cancelled: the batch empties, and both were counted as 504.
    let mut text = String::new();
    for _ in 0..600 {
        text = metrics_text(&server).await;
        let counted = metric_sum(&text, "terse_requests_total", &["status=\"504\""]);
        if metric_value(&text, "terse_running_sequences") == Some(0.0) && counted == 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric_value(&text, "terse_running_sequences"), Some(0.0), "{text}");
    assert_eq!(metric_value(&text, "terse_queue_depth"), Some(0.0));
    assert_eq!(metric_sum(&text, "terse_requests_total", &["status=\"504\""]), 2.0, "{text}");
    server.shutdown_and_wait().unwrap();
}

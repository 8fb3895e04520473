//! Clients that misbehave, on the real server and model: hanging up while
//! their prompt is being prefilled or while they wait in the queue, and
//! reading a stream very slowly. Each time the engine lets go of the
//! sequence (gauges back to 0, its KV pages let go), the request is counted,
//! and others are served.
//! (Hanging up mid-stream: http_api.rs; SIGTERM and a broken model file: cli.rs.)

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use terse::engine::EngineConfig;


fn stream_body(prompt: &str, max_tokens: usize) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
    })
}

/// Polls /metrics until `series` reads `want` (bounded: one minute).
async fn wait_for(server: &TestServer, series: &str, want: f64) {
    let mut last = None;
    for _ in 0..1200 {
        last = metric_value(&metrics_text(server).await, series);
        if last == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{series} stayed at {last:?}, expected {want}");
}

/// Polls /metrics until the chat requests counted with `status` number `want`.
async fn wait_for_status(server: &TestServer, status: u16, want: f64) {
    let label = format!("status=\"{status}\"");
    let mut last = 0.0;
    for _ in 0..1200 {
        last = metric_sum(&metrics_text(server).await, "terse_requests_total", &["endpoint=\"chat_completions\"", &label]);
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{last} chat requests with status {status}, expected {want}");
}

async fn still_serves(server: &TestServer) {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0});
    let r = post_json(&server.url(CHAT), &body).await;
    assert_eq!(r.status, 200, "{}", r.json);
}

#[tokio::test]
async fn hanging_up_during_prefill_or_in_the_queue_frees_everything() {
    // One sequence at a time, small prefill chunks: a long prompt prefills over many steps.
    // ~5,400 prompt tokens in chunks of 16: hundreds of steps before a first token.
    let server = TestServer::start(EngineConfig { max_batch: 1, prefill_chunk: 16, ..EngineConfig::default() });
    let long_prompt = "Tell me about the sea. ".repeat(900);

    // Mid-prefill: the response has begun (role chunk) but no token can exist yet.
    let mut prefilling = client().post(server.url(CHAT)).json(&stream_body(&long_prompt, 64)).send().await.unwrap();
    assert_eq!(prefilling.status(), 200);
    let opening = prefilling.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&opening).contains("\"role\":\"assistant\""));
    wait_for(&server, "terse_running_sequences", 1.0).await;

    // Queued behind it (the batch holds one): a second request waits.
    let mut queued = client().post(server.url(CHAT)).json(&stream_body("Count to ten.", 8)).send().await.unwrap();
    assert_eq!(queued.status(), 200);
    queued.chunk().await.unwrap().unwrap();
    wait_for(&server, "terse_queue_depth", 1.0).await;

    // The queued one hangs up first, then the prefilling one.
    drop(queued);
    wait_for(&server, "terse_queue_depth", 0.0).await;
    let text = metrics_text(&server).await;
    assert_eq!(metric_value(&text, "terse_running_sequences"), Some(1.0), "the prefill goes on");
    drop(prefilling);
    wait_for(&server, "terse_running_sequences", 0.0).await;
    wait_for(&server, "terse_kv_cache_used_bytes", 0.0).await;
    // Its pages are let go (the full ones stay cached, idle, for a retry).
    wait_for(&server, "terse_kv_cache_held_bytes", 0.0).await;
    wait_for_status(&server, 499, 2.0).await;
    // Neither produced a token, so neither has a time to first token.
    let text = metrics_text(&server).await;
    assert!(!text.contains("terse_time_to_first_token_seconds_count"), "no first token was generated");

    still_serves(&server).await;
    server.shutdown_and_wait().unwrap();
}

#[tokio::test]
async fn a_very_slow_reader_gets_its_whole_stream_and_blocks_no_one() {
    let server = TestServer::start(EngineConfig::default());
    // Ask for a stream, then read nothing while the engine generates it all.
    let body = stream_body("Write a long story about a lighthouse keeper.", 96);
    let mut slow = client().post(server.url(CHAT)).json(&body).send().await.unwrap();
    assert_eq!(slow.status(), 200);

    // Others are served meanwhile, and the engine finishes the slow one unread.
    still_serves(&server).await;
    wait_for_status(&server, 200, 1.0).await;
    wait_for(&server, "terse_running_sequences", 0.0).await;

    // Then the slow reader takes its stream a few bytes at a time: all of it is there.
    let mut text = String::new();
    while let Some(chunk) = slow.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let events = parse_sse(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let finish = &events[events.len() - 2];
    assert!(finish["choices"][0]["finish_reason"].is_string(), "{finish}");
    let pieces = events.iter().filter(|e| e["choices"][0]["delta"]["content"].is_string()).count();
    assert!(pieces > 10, "{pieces} content chunks");

    // The same greedy request read at once gives the same text.
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let r = post_json(&server.url(CHAT), &whole).await;
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(r.json["choices"][0]["message"]["content"].as_str().unwrap(), streamed);
    wait_for_status(&server, 200, 3.0).await;
    server.shutdown_and_wait().unwrap();
}

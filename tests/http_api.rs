//! The HTTP API end to end: the real server, the real model (smollm2-135m),
//! real HTTP. Most tests share one server (see `common::shared`); those that
//! watch gauges, overload the queue or shut down start their own.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::future::join_all;
use serde_json::{json, Value};
use terse::engine::EngineConfig;

const COMPLETIONS: &str = "/v1/completions";

fn completion_body(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn chat_text(server: &TestServer, body: &Value) -> String {
    let r = post_json(&server.url(CHAT), body).await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

async fn completion_text(server: &TestServer, body: &Value) -> (String, Value) {
    let r = post_json(&server.url(COMPLETIONS), body).await;
    assert_eq!(r.status, 200, "{}", r.json);
    (r.json["choices"][0]["text"].as_str().unwrap().to_string(), r.json)
}

#[tokio::test]
async fn health_ready_models_and_request_ids() {
    let s = shared();
    let r = get(&s.url("/health")).await;
    assert_eq!(r.status, 200);
    let r = get(&s.url("/ready")).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["status"], "ready");

    let r = get(&s.url("/v1/models")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["object"], "list");
    assert_eq!(r.json["data"][0]["id"], MODEL);
    assert_eq!(r.json["data"][0]["object"], "model");
    assert!(r.json["data"][0]["context_length"].as_u64().unwrap() > 0);
    let details = &r.json["data"][0]["terse"];
    assert_eq!((details["arch"].as_str(), details["format"].as_str()), (Some("llama"), Some("gguf")));
    assert!(details["weight_bytes"].as_u64().unwrap() > 50_000_000, "{details}");
    assert_eq!(details["sparse_fraction"], 0.0);
    assert_eq!(details["device"], "cpu");
    // SmolLM2's manifest gives it its profile; it has no think tokens.
    let reasoning = &details["reasoning"];
    assert_eq!(reasoning["source"], "manifest", "{details}");
    assert!(reasoning["think_open"].is_null() && reasoning["thinking_by_default"] == false, "{details}");
    let r = get(&s.url(&format!("/v1/models/{MODEL}"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["id"], MODEL);
    let r = get(&s.url("/v1/models/gpt-4")).await;
    assert_eq!(assert_openai_error(&r, 404)["code"], "model_not_found");

    // A request id is made up when the client sends none, and echoed when it does.
    assert!(!r.headers["x-request-id"].is_empty());
    let resp = client()
        .get(s.url("/health"))
        .header("x-request-id", "my-id-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "my-id-42");
}

#[tokio::test]
async fn chat_streamed_equals_non_streamed() {
    let s = shared();
    let body = chat_body("Write a sentence about the sea.", 24);
    let r = post_json(&s.url(CHAT), &body).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let j = &r.json;
    assert_eq!(j["object"], "chat.completion");
    assert!(j["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(j["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(j["model"], MODEL);
    assert_eq!(j["choices"][0]["message"]["role"], "assistant");
    let text = j["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    let finish = j["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length");
    let usage = &j["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&completion_tokens));
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion_tokens
    );
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 0);

    let stream_body = with(
        body.clone(),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let (status, events) = post_sse(&s.url(CHAT), &stream_body).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = &events[..events.len() - 1];
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    let mut streamed = String::new();
    let mut stream_finish = None;
    for c in chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        if let Some(choice) = c["choices"].get(0) {
            if let Some(t) = choice["delta"]["content"].as_str() {
                streamed.push_str(t);
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                stream_finish = Some(f.to_string());
            }
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(stream_finish.as_deref(), Some(finish));
    let last = chunks.last().unwrap();
    assert_eq!(
        last["choices"].as_array().unwrap().len(),
        0,
        "usage chunk has no choices"
    );
    assert_eq!(usage_counts(&last["usage"]), usage_counts(usage));
    // The same prompt again: all but its last token came from the prefix cache.
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], json!(prompt_tokens - 1));

    // Without include_usage there is no usage chunk.
    let (_, events) = post_sse(&s.url(CHAT), &with(body, json!({"stream": true}))).await;
    assert!(events.iter().all(|e| e.get("usage").is_none_or(Value::is_null)));
}

#[tokio::test]
async fn completions_streamed_equals_non_streamed() {
    let s = shared();
    let body = completion_body("Once upon a time, in a small village,", 24);
    let (text, j) = completion_text(s, &body).await;
    assert_eq!(j["object"], "text_completion");
    assert!(j["id"].as_str().unwrap().starts_with("cmpl-"));
    assert!(!text.is_empty());
    let finish = j["choices"][0]["finish_reason"].as_str().unwrap().to_string();

    let (status, events) = post_sse(
        &s.url(COMPLETIONS),
        &with(
            body.clone(),
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = &events[..events.len() - 1];
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|ch| ch["text"].as_str()))
        .collect();
    assert_eq!(streamed, text);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let finishes: Vec<_> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|ch| ch["finish_reason"].as_str()))
        .collect();
    assert_eq!(finishes, vec![finish.as_str()]);
    assert_eq!(usage_counts(&chunks.last().unwrap()["usage"]), usage_counts(&j["usage"]));

    // A prompt given as an array of one string means the same.
    let one = json!({"prompt": ["Once upon a time, in a small village,"]});
    let (again, _) = completion_text(s, &with(body.clone(), one)).await;
    assert_eq!(again, text);
}

#[tokio::test]
async fn concurrent_greedy_requests_match_solo_ones() {
    let s = shared();
    let prompts = [
        "Name a colour.",
        "What is two plus two?",
        "Say hello in French.",
        "Write a haiku about rain.",
        "What is the capital of Italy?",
        "List three fruits.",
        "Describe a cat in one sentence.",
        "Why is the sky blue?",
    ];
    let bodies: Vec<Value> = prompts.iter().map(|p| chat_body(p, 16)).collect();
    let mut alone = Vec::new();
    for b in &bodies {
        alone.push(chat_text(s, b).await);
    }
    let together = join_all(bodies.iter().map(|b| chat_text(s, b))).await;
    for ((p, a), t) in prompts.iter().zip(&alone).zip(&together) {
        assert_eq!(a, t, "prompt {p:?}: alone vs. in a batch");
    }
}

/// `--kv-cache-dtype f32` (f16 is the default): the default budget (a full
/// batch of full-context sequences) takes twice the bytes, and batching still
/// keeps each greedy answer.
#[tokio::test]
async fn an_f32_kv_cache_doubles_the_budget_and_serves_the_same_batched_answers() {
    let f32 = TestServer::start(EngineConfig { kv_cache_dtype: terse::model::KvPrecision::F32, ..EngineConfig::default() });
    let budget = |text: String| metric_value(&text, "terse_kv_cache_budget_bytes").expect("a KV budget gauge");
    let (half, full) = (budget(metrics_text(shared()).await), budget(metrics_text(&f32).await));
    assert_eq!(half * 2.0, full, "f16 budget {half}, f32 budget {full}");
    let bodies: Vec<Value> = ["Name a colour.", "What is two plus two?", "Say hello in French.", "List three fruits."].iter().map(|p| chat_body(p, 16)).collect();
    let mut alone = Vec::new();
    for b in &bodies {
        alone.push(chat_text(&f32, b).await);
    }
    let together = join_all(bodies.iter().map(|b| chat_text(&f32, b))).await;
    assert_eq!(alone, together, "f32 cache: alone vs. in a batch");
    assert!(alone.iter().all(|t| !t.is_empty()));
    f32.shutdown_and_wait().unwrap();
}

#[tokio::test]
async fn same_seed_same_text_at_temperature_one() {
    let s = shared();
    let body = with(
        chat_body("Tell me a story about a dragon.", 24),
        json!({"temperature": 1.0, "seed": 1234}),
    );
    let a = chat_text(s, &body).await;
    let b = chat_text(s, &body).await;
    assert_eq!(a, b);
    let body = with(
        completion_body("My favourite animal is", 24),
        json!({"temperature": 1.0, "seed": 99, "top_p": 0.9, "top_k": 40}),
    );
    let (a, _) = completion_text(s, &body).await;
    let (b, _) = completion_text(s, &body).await;
    assert_eq!(a, b);
}

#[tokio::test]
async fn stop_strings_are_honoured() {
    let s = shared();
    let body = completion_body("The three primary colours are", 32);
    let (full, _) = completion_text(s, &body).await;
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 8, "too short to pick a stop string: {full:?}");
    // A stop string taken from the middle of the greedy answer.
    let mid = chars.len() / 2;
    let stop: String = chars[mid..mid + 3].iter().collect();
    let cut = full.find(&stop).unwrap();
    let expected = &full[..cut];

    let (text, j) = completion_text(s, &with(body.clone(), json!({"stop": [stop.clone(), "zzzzzz"]}))).await;
    assert!(!text.contains(&stop), "{text:?} contains the stop string {stop:?}");
    assert_eq!(text, expected);
    assert_eq!(j["choices"][0]["finish_reason"], "stop");

    let (status, events) = post_sse(
        &s.url(COMPLETIONS),
        &with(body, json!({"stop": stop.clone(), "stream": true})),
    )
    .await;
    assert_eq!(status, 200);
    let streamed: String = events
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|ch| ch["text"].as_str()))
        .collect();
    assert_eq!(streamed, expected);
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_the_server_carries_on() {
    let s = shared();
    let chat = s.url(CHAT);
    let completions = s.url(COMPLETIONS);
    let context = get(&s.url("/v1/models")).await.json["data"][0]["context_length"]
        .as_u64()
        .unwrap() as usize;
    let good = chat_body("Hi", 4);

    // (what, url, body, status, param)
    type Case<'a> = (&'a str, &'a String, Vec<u8>, u16, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            &chat,
            br#"{"model": "x", "messages": ["#.to_vec(),
            400,
            None,
        ),
        ("not an object", &chat, b"[1, 2, 3]".to_vec(), 400, None),
        ("empty body", &chat, b"".to_vec(), 400, None),
        (
            "invalid UTF-8",
            &completions,
            b"{\"prompt\": \"\xff\xfe\xfd\"}".to_vec(),
            400,
            None,
        ),
        (
            "messages not an array",
            &chat,
            json!({"messages": "hi"}).to_string().into(),
            400,
            Some("messages"),
        ),
        (
            "missing messages",
            &chat,
            json!({"model": MODEL}).to_string().into(),
            400,
            Some("messages"),
        ),
        (
            "empty messages",
            &chat,
            json!({"messages": []}).to_string().into(),
            400,
            Some("messages"),
        ),
        (
            "unknown role",
            &chat,
            json!({"messages": [{"role": "wizard", "content": "x"}]})
                .to_string()
                .into(),
            400,
            Some("messages[0].role"),
        ),
        (
            "content of the wrong type",
            &chat,
            json!({"messages": [{"role": "user", "content": 7}]}).to_string().into(),
            400,
            Some("messages[0].content"),
        ),
        (
            "temperature a string",
            &chat,
            with(good.clone(), json!({"temperature": "hot"})).to_string().into(),
            400,
            Some("temperature"),
        ),
        (
            "temperature < 0",
            &chat,
            with(good.clone(), json!({"temperature": -0.5})).to_string().into(),
            400,
            Some("temperature"),
        ),
        (
            "temperature > 2",
            &chat,
            with(good.clone(), json!({"temperature": 2.5})).to_string().into(),
            400,
            Some("temperature"),
        ),
        (
            "top_p 0",
            &chat,
            with(good.clone(), json!({"top_p": 0})).to_string().into(),
            400,
            Some("top_p"),
        ),
        (
            "negative max_tokens",
            &chat,
            with(good.clone(), json!({"max_tokens": -5})).to_string().into(),
            400,
            Some("max_tokens"),
        ),
        (
            "zero max_tokens",
            &chat,
            with(good.clone(), json!({"max_tokens": 0})).to_string().into(),
            400,
            Some("max_tokens"),
        ),
        (
            "max_tokens a string",
            &chat,
            with(good.clone(), json!({"max_tokens": "10"})).to_string().into(),
            400,
            Some("max_tokens"),
        ),
        (
            "huge max_tokens",
            &chat,
            with(good.clone(), json!({"max_tokens": 1_000_000_000u64}))
                .to_string()
                .into(),
            400,
            Some("max_tokens"),
        ),
        (
            "max_tokens beyond u64",
            &chat,
            with(good.clone(), json!({"max_tokens": 1e30})).to_string().into(),
            400,
            Some("max_tokens"),
        ),
        (
            "n = 2",
            &chat,
            with(good.clone(), json!({"n": 2})).to_string().into(),
            400,
            Some("n"),
        ),
        (
            "five stop strings",
            &chat,
            with(good.clone(), json!({"stop": ["a", "b", "c", "d", "e"]}))
                .to_string()
                .into(),
            400,
            Some("stop"),
        ),
        (
            "stream not a bool",
            &chat,
            with(good.clone(), json!({"stream": "yes"})).to_string().into(),
            400,
            Some("stream"),
        ),
        (
            "bad reasoning_effort",
            &chat,
            with(good.clone(), json!({"reasoning_effort": "max"}))
                .to_string()
                .into(),
            400,
            Some("reasoning_effort"),
        ),
        (
            "bad reasoning strategy",
            &chat,
            with(good.clone(), json!({"reasoning": {"strategy": "guess"}}))
                .to_string()
                .into(),
            400,
            Some("reasoning.strategy"),
        ),
        (
            "a misspelt reasoning field",
            &chat,
            with(good.clone(), json!({"reasoning": {"max_thinking_token": 8}})).to_string().into(),
            400,
            Some("reasoning.max_thinking_token"),
        ),
        (
            "a probe word no token begins",
            &chat,
            with(good.clone(), json!({"reasoning": {"strategy": "probe", "probe_at": "reflection", "probe_words": ["Wait", "zqxjkvw"]}})).to_string().into(),
            400,
            Some("reasoning.probe_words"),
        ),
        (
            "probe settings under another strategy",
            &chat,
            with(good.clone(), json!({"reasoning": {"strategy": "ts", "stop_temperature": 2, "probe_interval": 8}})).to_string().into(),
            400,
            Some("reasoning.probe_interval"),
        ),
        (
            "answer probing into a JSON answer on a model without think tokens",
            &chat,
            with(good.clone(), json!({"reasoning": {"strategy": "probe"}, "response_format": {"type": "json_object"}})).to_string().into(),
            400,
            Some("reasoning.strategy"),
        ),
        // Features terse lacks are refused by name, never answered as if absent.
        (
            "a response format of an unknown type",
            &chat,
            with(good.clone(), json!({"response_format": {"type": "json_schema_v2"}})).to_string().into(),
            400,
            Some("response_format.type"),
        ),
        (
            "a tool_choice naming no tool",
            &chat,
            with(good.clone(), json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}))
                .to_string()
                .into(),
            400,
            Some("tool_choice"),
        ),
        (
            "a logit bias that is not a number",
            &completions,
            json!({"prompt": "Hi", "logit_bias": {"1": "big"}}).to_string().into(),
            400,
            Some("logit_bias.1"),
        ),
        (
            "unknown model",
            &chat,
            with(good.clone(), json!({"model": "gpt-4o"})).to_string().into(),
            404,
            Some("model"),
        ),
        (
            "prompt missing",
            &completions,
            json!({"model": MODEL}).to_string().into(),
            400,
            Some("prompt"),
        ),
        (
            "prompt a number",
            &completions,
            json!({"prompt": 5}).to_string().into(),
            400,
            Some("prompt"),
        ),
        (
            "two prompts",
            &completions,
            json!({"prompt": ["a", "b"]}).to_string().into(),
            400,
            Some("prompt"),
        ),
        (
            "token id outside the vocabulary",
            &completions,
            json!({"prompt": [1, 99999999]}).to_string().into(),
            400,
            Some("prompt[1]"),
        ),
        (
            "prompt longer than the context",
            &completions,
            json!({"prompt": " hello".repeat(context + 100)}).to_string().into(),
            413,
            Some("prompt"),
        ),
        (
            "body over the limit",
            &completions,
            json!({"prompt": "a".repeat(5 << 20)}).to_string().into(),
            413,
            None,
        ),
    ];
    for (what, url, body, status, param) in cases {
        let r = post_raw(url, body).await;
        let error = assert_openai_error(&r, status);
        if let Some(param) = param {
            assert_eq!(error["param"], param, "{what}: {error}");
        }
        if status == 404 {
            assert_eq!(error["code"], "model_not_found");
        }
        eprintln!("{what}: {} {}", r.status, error["message"]);
    }

    // Unknown routes and methods answer in the same shape.
    assert_openai_error(&get(&s.url("/v1/nothing")).await, 404);
    assert_openai_error(&get(&chat).await, 405);

    // The server still serves.
    assert!(!chat_text(s, &good).await.is_empty());
}

/// Waits until `series` reads `want` in /metrics.
async fn wait_for_metric(server: &TestServer, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = metrics_text(server).await;
        let v = metric_value(&text, series);
        if v == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {v:?}, expected {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_dropped_stream_frees_its_slot() {
    let server = TestServer::start(EngineConfig::default());
    let body = with(
        chat_body("Write a very long essay about the history of Rome.", 2000),
        json!({"stream": true}),
    );
    let mut resp = client().post(server.url(CHAT)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // Read until some content has arrived, then hang up.
    let mut seen = String::new();
    while seen.matches("\"content\"").count() < 4 {
        let chunk = resp.chunk().await.unwrap().expect("the stream ended early");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    wait_for_metric(&server, "terse_running_sequences", 1.0).await;
    drop(resp);
    wait_for_metric(&server, "terse_running_sequences", 0.0).await;
    // The abandoned request is counted, as the client's closing (499).
    let series =
        format!("terse_requests_total{{endpoint=\"chat_completions\",mode=\"default\",model=\"{MODEL}\",status=\"499\"}}");
    wait_for_metric(&server, &series, 1.0).await;
    // And the server still serves.
    assert!(!chat_text(&server, &chat_body("Hi", 4)).await.is_empty());
    server.shutdown_and_wait().unwrap();
}

#[tokio::test]
async fn a_full_queue_gives_429_and_admitted_requests_complete() {
    let server = TestServer::start(EngineConfig {
        max_batch: 1,
        max_queue: 2,
        ..EngineConfig::default()
    });
    let body = completion_body("Count from one to fifty: one, two, three,", 24);
    let url = server.url(COMPLETIONS);
    let replies = join_all((0..8).map(|_| post_json(&url, &body))).await;
    let mut ok = 0;
    let mut refused = 0;
    let mut texts = Vec::new();
    for r in &replies {
        match r.status.as_u16() {
            200 => {
                ok += 1;
                texts.push(r.json["choices"][0]["text"].as_str().unwrap().to_string());
                assert!(r.json["usage"]["completion_tokens"].as_u64().unwrap() > 0);
            }
            429 => {
                refused += 1;
                let error = assert_openai_error(r, 429);
                assert_eq!(error["type"], "rate_limit_error");
                let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!(retry >= 1);
            }
            other => panic!("unexpected status {other}: {}", r.json),
        }
    }
    // At least the queue's worth is admitted (plus the running one, if the
    // engine picked it up before the others arrived).
    assert!(ok >= 2, "the first 2 requests fit the queue, got {ok} admitted");
    assert!(refused >= 1, "8 requests at once must overflow a queue of 2");
    assert!(
        texts.windows(2).all(|w| w[0] == w[1]),
        "greedy answers differ: {texts:?}"
    );
    wait_for_metric(&server, "terse_queue_depth", 0.0).await;
    server.shutdown_and_wait().unwrap();
}

#[tokio::test]
async fn loading_then_ready_then_graceful_shutdown() {
    // Started on this test's runtime, to watch it from its first moment.
    let model = terse::manifest::resolve_model(MODEL).unwrap();
    let mut config = terse::server::ServeConfig::new(model.path, model.served_name);
    config.port = 0;
    let server = terse::server::spawn(config, std::sync::Arc::new(terse::metrics::Metrics::new()))
        .await
        .unwrap();
    let url = |path: &str| format!("{}{path}", server.url());

    // While the model loads: alive, not ready, generation refused with 503.
    assert_eq!(get(&url("/health")).await.status, 200);
    let r = get(&url("/ready")).await;
    assert_eq!(r.status, 503, "{}", r.json);
    assert_eq!(r.json["status"], "loading");
    let r = post_json(&url(CHAT), &chat_body("Hi", 4)).await;
    assert_eq!(assert_openai_error(&r, 503)["code"], "model_not_ready");
    assert!(r.headers.contains_key("retry-after"));

    server.wait_ready().await.unwrap();
    assert_eq!(get(&url("/ready")).await.status, 200);

    // A stream in flight when shutdown begins runs to its end.
    let body = with(
        chat_body("Write a poem about autumn leaves.", 48),
        json!({"stream": true}),
    );
    let mut resp = client().post(url(CHAT)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("assistant"));
    server.shutdown();
    let mut rest = String::from_utf8_lossy(&first).to_string();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(rest.trim_end().ends_with("data: [DONE]"), "the stream was cut: {rest}");
    assert!(rest.contains("finish_reason\":\""));
    let ready = url("/ready");
    tokio::time::timeout(Duration::from_secs(60), server.join())
        .await
        .expect("shutdown hangs")
        .unwrap();
    // Stopped: nothing listens any more.
    assert!(client().get(&ready).send().await.is_err());
}

#[tokio::test]
async fn serve_fails_when_the_model_cannot_load() {
    let mut config = terse::server::ServeConfig::new("/nonexistent/model.gguf", "nothing");
    config.port = 0;
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        terse::server::serve(config, std::sync::Arc::new(terse::metrics::Metrics::new())),
    )
    .await
    .expect("serve must stop when loading fails");
    let message = format!("{:#}", result.unwrap_err());
    assert!(message.contains("loading the model failed"), "{message}");
}

#[tokio::test]
async fn metrics_parse_with_the_prometheus_client() {
    let s = shared();
    chat_text(s, &with(chat_body("Hi", 4), json!({"reasoning_effort": "low"}))).await;
    let resp = client().get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("mode=\"short\""),
        "reasoning_effort low is the short mode"
    );
    run_python("check_metrics.py", &[&s.url("/metrics")]);
}

#[tokio::test]
async fn the_official_openai_python_client_works() {
    let s = shared();
    run_python("openai_client.py", &[&s.url("/v1"), MODEL]);
}

#[tokio::test]
async fn the_openapi_document_is_valid_and_lists_exactly_the_routes() {
    let s = shared();
    let url = s.url(terse::server::OPENAPI);
    let listed = tokio::task::spawn_blocking(move || run_python_output("check_openapi.py", &[&url])).await.unwrap();
    let mut listed: Vec<&str> = listed.lines().collect();
    listed.sort();
    let mut routes: Vec<String> = terse::server::ROUTES.iter().map(|r| format!("{} {}", r.method, r.path)).collect();
    routes.sort();
    assert_eq!(listed, routes, "the document's paths are the router's routes");
    // Each route is served (a POST of `{}` is a 400 of its own, not a 404) ...
    for r in terse::server::ROUTES {
        let path = r.path.replace("{model}", MODEL);
        let status = match r.method {
            "GET" => get(&s.url(&path)).await.status,
            _ => post_json(&s.url(&path), &serde_json::json!({})).await.status,
        };
        assert_ne!(status.as_u16(), 404, "{} {path}", r.method);
        assert_ne!(status.as_u16(), 405, "{} {path}", r.method);
    }
    // ... and nothing else is.
    assert_eq!(get(&s.url("/v1/responses/resp_1")).await.status, 404);
}

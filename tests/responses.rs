//! `POST /v1/responses` through the official OpenAI client: on Qwen2.5-Coder-0.5B
//! (answers, structured output, tool calls, usage equal to chat's), and on the
//! synthetic R1-vocabulary model (the reasoning item, whole and streamed).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use terse::server::responses::RESPONSES_FIELDS;
use terse::server::wire::FieldUse;
use terse::server::RequestLimits;

/// A value of each field that asks for something.
fn sample(field: &str) -> Value {
    match field {
        "model" => json!("qwen2.5-0.5b"),
        "input" => json!("hi"),
        "instructions" => json!("Be brief."),
        "max_output_tokens" => json!(3),
        "temperature" => json!(0.5),
        "top_p" => json!(0.9),
        "stream" => json!(false),
        "reasoning" => json!({"effort": "low"}),
        "text" => json!({"format": {"type": "json_object"}}),
        "tools" => json!([{"type": "function", "name": "f", "parameters": {"type": "object"}}]),
        "tool_choice" => json!("auto"),
        "parallel_tool_calls" => json!(false),
        "store" => json!(true),
        "previous_response_id" => json!("resp_1"),
        "background" => json!(true),
        "include" => json!(["reasoning.encrypted_content"]),
        "top_logprobs" => json!(2),
        "truncation" => json!("auto"),
        "prompt" => json!({"id": "pmpt_1"}),
        "conversation" => json!("conv_1"),
        "user" | "prompt_cache_key" | "safety_identifier" => json!("someone"),
        "metadata" => json!({"k": "v"}),
        "service_tier" => json!("auto"),
        "stream_options" => json!({"include_obfuscation": false}),
        other => panic!("no sample value for `{other}`: add one, so the field's treatment is tested"),
    }
}

#[tokio::test]
async fn the_official_client_creates_and_streams_responses() {
    let s = TestServer::start_model_with("qwen2.5-0.5b", |_| {});
    let url = s.url("/v1");
    tokio::task::spawn_blocking(move || run_python("responses.py", &[&url, "qwen2.5-0.5b"])).await.unwrap();

    for &(field, how) in RESPONSES_FIELDS {
        let mut body = json!({"input": "hi", "max_output_tokens": 3, "temperature": 0});
        body[field] = sample(field);
        if field == "tool_choice" || field == "parallel_tool_calls" {
            body["tools"] = sample("tools");
        }
        let reply = post_json(&s.url("/v1/responses"), &body).await;
        match how {
            FieldUse::Honoured | FieldUse::Ignored => assert_eq!(reply.status, 200, "{field}: {}", reply.json),
            FieldUse::Refused => {
                assert_eq!(reply.status, 400, "{field}: {}", reply.json);
                assert_eq!(reply.json["error"]["param"], field, "{}", reply.json);
            }
        }
    }
}

#[tokio::test]
async fn a_thinking_model_gives_a_reasoning_item_before_its_message() {
    let s = thinking_server(|_| {});
    // One whose deadline a long stream runs past.
    let hasty = thinking_server(|c| c.limits = RequestLimits { max_tokens: None, timeout: Some(Duration::from_millis(100)) });

    let url = s.url("/v1");
    let name = "tiny-r1".to_string();
    tokio::task::spawn_blocking(move || run_python("responses.py", &[&url, &name, "--thinking"])).await.unwrap();

    // A stream that fails (here: past the deadline) ends with a typed `error` event.
    let (status, events) = post_sse(&hasty.url("/v1/responses"), &json!({"input": "x", "stream": true})).await;
    assert_eq!(status, 200);
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds[..2], ["response.created", "response.in_progress"], "{kinds:?}");
    let last = events.iter().rev().find(|e| e.is_object()).unwrap();
    assert_eq!((last["type"].as_str(), last["code"].as_str()), (Some("error"), Some("request_timeout")), "{last}");
    let numbers: Vec<u64> = events.iter().filter_map(|e| e["sequence_number"].as_u64()).collect();
    assert!(numbers.iter().enumerate().all(|(i, &n)| n == i as u64), "sequence numbers count up: {numbers:?}");

    // A schema that cannot be used is refused before any stream, naming the Responses field.
    let bad = post_json(&s.url("/v1/responses"), &json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"$ref": "#/nope"}}}})).await;
    assert_eq!((bad.status.as_u16(), bad.json["error"]["param"].as_str()), (400, Some("text.format.schema")), "{}", bad.json);
}

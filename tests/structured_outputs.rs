//! Structured outputs, log-probabilities, logit bias, and the rule that no
//! request field is silently ignored: the real server on the default model,
//! over HTTP, checked with the official OpenAI client and `jsonschema`.

mod common;

use std::fs::File;

use candle_core::quantized::gguf_file;
use common::*;
use serde_json::{json, Value};
use terse::server::wire::{FieldUse, CHAT_FIELDS, COMPLETION_FIELDS, SHARED_FIELDS};
use terse::tokenize::TextTokenizer;

fn tokenizer() -> TextTokenizer {
    let model = terse::manifest::resolve_model(MODEL).unwrap();
    let content = gguf_file::Content::read(&mut File::open(&model.path).unwrap()).unwrap();
    TextTokenizer::from_gguf(&content).unwrap()
}

#[tokio::test]
async fn the_official_client_gets_valid_json_and_consistent_logprobs() {
    let s = shared();
    let url = s.url("/v1");
    tokio::task::spawn_blocking(move || run_python("structured_outputs.py", &[&url, MODEL])).await.unwrap();
    // Fixed keys were fed several tokens a step (jump-forward), not decoded one by one.
    let metrics = metrics_text(s).await;
    let jumped: f64 = metrics.lines().find(|l| l.starts_with("terse_grammar_jump_tokens_total ")).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0);
    assert!(jumped > 0.0, "no jump-forward tokens: {metrics}");
}

/// The ids of a greedy reply's tokens, read back through the tokenizer.
async fn greedy_tokens(body: &Value) -> Vec<String> {
    let reply = post_json(&shared().url(CHAT), body).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    reply.json["choices"][0]["logprobs"]["content"].as_array().unwrap().iter().map(|t| t["token"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn logit_bias_bans_and_forces_tokens() {
    let tokenizer = tokenizer();
    let mut body = chat_body("Name a colour.", 4);
    body["logprobs"] = json!(true);
    let free = greedy_tokens(&body).await;
    let first = tokenizer.encode(&free[0]).unwrap();
    assert_eq!(first.len(), 1, "{:?} is one token", free[0]);

    body["logit_bias"] = json!({ first[0].to_string(): -100 });
    let banned = greedy_tokens(&body).await;
    assert_ne!(banned[0], free[0], "a bias of -100 keeps the greedy token out");

    let forced_id = tokenizer.encode(" blue").unwrap()[0];
    body["logit_bias"] = json!({ forced_id.to_string(): 100 });
    let forced = greedy_tokens(&body).await;
    let expected = tokenizer.decode(&[forced_id]);
    assert_eq!(forced.len(), 4);
    assert!(forced.iter().all(|t| *t == expected), "{forced:?} is {expected:?} four times");
}

/// A value of each field that asks for something.
fn sample(field: &str) -> Value {
    match field {
        "model" => json!(MODEL),
        "max_tokens" | "max_completion_tokens" => json!(2),
        "temperature" => json!(0.5),
        "top_p" => json!(0.9),
        "top_k" => json!(5),
        "seed" => json!(7),
        "stop" => json!(["zzz"]),
        "n" | "best_of" => json!(1),
        "stream" => json!(false),
        "stream_options" => json!({"include_usage": true}),
        "presence_penalty" | "frequency_penalty" => json!(0.5),
        "repetition_penalty" => json!(1.1),
        "reasoning_effort" => json!("low"),
        "reasoning" => json!({"strategy": "ts", "stop_temperature": 2}),
        "response_format" => json!({"type": "json_object"}),
        "logit_bias" => json!({"10": 1}),
        "speculate" => json!(false),
        "tools" => json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
        "tool_choice" => json!("required"),
        "parallel_tool_calls" => json!(false),
        "functions" => json!([{"name": "f", "parameters": {"type": "object"}}]),
        "function_call" => json!({"name": "f"}),
        "user" | "prompt_cache_key" | "safety_identifier" => json!("someone"),
        "metadata" => json!({"k": "v"}),
        "store" => json!(true),
        "service_tier" => json!("auto"),
        "messages" => json!([{"role": "user", "content": "hi"}]),
        "logprobs" => json!(true),
        "top_logprobs" => json!(2),
        "modalities" => json!(["text", "audio"]),
        "audio" => json!({"voice": "alloy", "format": "wav"}),
        "prediction" => json!({"type": "content", "content": "hello"}),
        "web_search_options" => json!({}),
        "verbosity" => json!("low"),
        "prompt" => json!("The sky is"),
        "echo" => json!(true),
        "suffix" => json!(" and so on."),
        other => panic!("no sample value for `{other}`: add one, so the field's treatment is tested"),
    }
}

#[tokio::test]
async fn every_field_is_honoured_ignored_or_refused_by_name() {
    let s = shared();
    type FieldList = &'static [(&'static str, FieldUse)];
    let endpoints: [(&str, FieldList, Value); 2] = [
        (CHAT, CHAT_FIELDS, chat_body("hi", 2)),
        ("/v1/completions", COMPLETION_FIELDS, json!({"model": MODEL, "prompt": "The sky is", "max_tokens": 2, "temperature": 0})),
    ];
    for (path, own, base) in endpoints {
        for &(field, how) in SHARED_FIELDS.iter().chain(own) {
            let mut body = base.clone();
            // Completions' logprobs is a count, not a switch.
            body[field] = if path != CHAT && field == "logprobs" { json!(2) } else { sample(field) };
            // As OpenAI, these need their partner.
            if field == "top_logprobs" {
                body["logprobs"] = json!(true);
            }
            if field == "tool_choice" || field == "parallel_tool_calls" {
                body["tools"] = sample("tools");
            }
            let reply = post_json(&s.url(path), &body).await;
            match how {
                FieldUse::Honoured | FieldUse::Ignored => assert_eq!(reply.status, 200, "{path} {field}: {}", reply.json),
                FieldUse::Refused => {
                    assert_eq!(reply.status, 400, "{path} {field}: {}", reply.json);
                    let param = reply.json["error"]["param"].as_str().unwrap_or_default();
                    assert!(param == field || param.starts_with(&format!("{field}.")), "{path} {field}: {}", reply.json);
                }
            }
        }
        let mut body = base.clone();
        body["frobnicate"] = json!(1);
        let reply = post_json(&s.url(path), &body).await;
        assert_eq!((reply.status.as_u16(), reply.json["error"]["param"].as_str()), (400, Some("frobnicate")), "{}", reply.json);
    }
}

#[tokio::test]
async fn a_thinking_model_thinks_freely_then_answers_in_json_streamed_or_not() {
    let s = thinking_server(|_| {});
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"], "additionalProperties": false});
    for reasoning in [json!({"strategy": "budget", "max_thinking_tokens": 6}), json!({"strategy": "ts", "stop_temperature": 1e6, "min_thinking_tokens": 3})] {
        let body = json!({
            "messages": [{"role": "user", "content": "What is 7 times 6?"}],
            "max_tokens": 200, "temperature": 1.0, "seed": 11,
            "reasoning": reasoning,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": true}},
        });
        let whole = post_json(&s.url(CHAT), &body).await;
        assert_eq!(whole.status, 200, "{}", whole.json);
        let message = &whole.json["choices"][0]["message"];
        let answer: Value = serde_json::from_str(message["content"].as_str().unwrap().trim()).unwrap_or_else(|e| panic!("{e}: {message}"));
        assert!(answer["n"].as_u64().is_some_and(|n| n <= 99) && answer.as_object().unwrap().len() == 1, "{answer}");
        assert_eq!(whole.json["choices"][0]["finish_reason"], "stop");
        let thinking = message["reasoning_content"].as_str().unwrap_or_default();
        assert!(whole.json["terse"]["thinking_tokens"].as_u64().unwrap() >= 3, "{}", whole.json);
        assert!(serde_json::from_str::<Value>(thinking.trim()).is_err(), "the thought is not the answer: {thinking:?}");

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (status, events) = post_sse(&s.url(CHAT), &streamed).await;
        assert_eq!(status, 200);
        let joined = |field: &str| -> String {
            events.iter().filter_map(|e| e["choices"][0]["delta"][field].as_str()).collect()
        };
        assert_eq!(joined("reasoning_content"), thinking, "the same thought, streamed");
        assert_eq!(joined("content"), message["content"].as_str().unwrap(), "the same JSON, streamed; none of it in reasoning_content");
    }
}

#[tokio::test]
async fn echo_puts_the_prompt_before_the_completion_streamed_or_not() {
    let s = shared();
    let url = s.url("/v1/completions");
    let body = json!({"model": MODEL, "prompt": "The sky is", "max_tokens": 6, "temperature": 0});
    let plain = post_json(&url, &body).await.json["choices"][0]["text"].as_str().unwrap().to_string();
    let mut echoed = body.clone();
    echoed["echo"] = json!(true);
    let whole = post_json(&url, &echoed).await.json["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(whole, format!("The sky is{plain}"));
    echoed["stream"] = json!(true);
    let (status, events) = post_sse(&url, &echoed).await;
    assert_eq!(status, 200);
    let streamed: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(streamed, whole);
    echoed["stream"] = json!(false);
    echoed["logprobs"] = json!(1);
    let refused = post_json(&url, &echoed).await;
    assert_eq!((refused.status.as_u16(), refused.json["error"]["param"].as_str()), (400, Some("echo")), "{}", refused.json);
}

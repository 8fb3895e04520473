//! Tool calling on real models over HTTP, with the official OpenAI client:
//! SmolLM2, whose template knows no tools (terse's generic family), and
//! Qwen2.5-Coder-0.5B, whose template writes `<tool_call>` blocks (hermes).

mod common;

use std::fs::File;

use candle_core::quantized::gguf_file;
use common::*;
use serde_json::json;
use terse::tokenize::{ChatMessage, TemplateFunctionCall, TemplateToolCall, TextTokenizer};

const QWEN: &str = "qwen2.5-0.5b";

#[test]
fn forced_calls_validate_and_stream_on_a_template_without_tools() {
    let s = shared();
    run_python("tool_calls.py", &[&s.url("/v1"), MODEL]);
}

#[tokio::test]
async fn qwen_calls_tools_in_its_own_syntax_forced_or_on_its_own() {
    let s = TestServer::start_model_with(QWEN, |_| {});
    let url = s.url("/v1");
    tokio::task::spawn_blocking(move || run_python("tool_calls.py", &[&url, QWEN, "--auto-calls"])).await.unwrap();
    let models = get(&s.url("/v1/models")).await;
    assert_eq!(models.json["data"][0]["terse"]["tool_calls"], "hermes", "{}", models.json);
    let metrics = metrics_text(&s).await;
    let count = |name: &str| -> f64 {
        metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    assert!(count("terse_tool_calls_total{") >= 6.0, "{metrics}");
    assert!(count("terse_constrained_requests_total{kind=\"tools\"") >= 4.0, "{metrics}");
}

#[test]
fn qwen_template_renders_tools_calls_and_results() {
    let model = terse::manifest::resolve_model(QWEN).unwrap();
    let content = gguf_file::Content::read(&mut File::open(&model.path).unwrap()).unwrap();
    let qwen = TextTokenizer::from_gguf(&content).unwrap();
    let tools = [json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}})];
    let call = TemplateToolCall {
        id: "call_1".into(),
        kind: "function".into(),
        function: TemplateFunctionCall { name: "get_weather".into(), arguments: json!({"city": "Paris"}) },
    };
    let chat = [
        ChatMessage::new("user", "Weather in Paris?"),
        ChatMessage { tool_calls: vec![call], ..ChatMessage::new("assistant", "") },
        ChatMessage { tool_call_id: Some("call_1".into()), ..ChatMessage::new("tool", "18 C") },
    ];
    let prompt = qwen.apply_chat_template_with(&chat, true, None, Some(&tools)).unwrap();
    assert!(prompt.contains("<tools>\n{\"type\": \"function\"") || prompt.contains("<tools>\n{\"type\":\"function\""), "{prompt}");
    assert!(prompt.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"), "{prompt}");
    assert!(prompt.contains("<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>"), "{prompt}");
    // `<tool_call>` is text to Qwen (a user-defined token), not a special token to drop.
    let id = qwen.token_to_id("<tool_call>").unwrap();
    assert_eq!(qwen.decode(&[id]), "<tool_call>");
}

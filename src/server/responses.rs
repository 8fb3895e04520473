//! `POST /v1/responses`: OpenAI's Responses API, stateless.
//!
//! A request is read in the Responses shape, turned into the chat request it
//! means (`instructions` as the system turn, `input` items as turns, the
//! flat `tools` as chat's, `text.format` as `response_format`,
//! `reasoning.effort` as a mode) and run through the chat endpoint's own
//! checks, prompt and engine; errors name the Responses field. The reply is
//! a `reasoning` item holding the thinking (as `reasoning_text` content; no
//! summary: terse has no summariser and says so with an empty `summary`),
//! a `message` item holding the answer, and a `function_call` item per tool
//! call. Streamed, the typed events of OpenAI's API, each with its
//! `sequence_number`, so `client.responses.stream(...)` works unmodified.
//!
//! Stateless: `previous_response_id`, `store: true` and `background: true`
//! are refused with a 400 that says so; nothing is kept after the reply.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, StreamExt};
use serde_json::{json, Map, Value};

use super::chat::Chat;
use super::endpoint::{start, Started};
use super::error::ApiError;
use super::extract::JsonObject;
use super::generate::{self, Finished, Generation, Output};
use super::openai::{unix_now, TerseExtension};
use super::record::RequestRecord;
use super::tool_calls::{call_id, split_pieces, CallParser, ParsedCall, Piece};
use super::validate::json_type_name;
use super::wire::FieldUse::{self, Honoured, Ignored, Refused};
use super::{request_id, AppState};
use crate::engine::FinishReason;
use crate::reasoning::phase::Phase;

/// Every top-level field of a Responses request, and what terse does with it.
pub const RESPONSES_FIELDS: &[(&str, FieldUse)] = &[
    ("model", Honoured),
    ("input", Honoured),
    ("instructions", Honoured),
    ("max_output_tokens", Honoured),
    ("temperature", Honoured),
    ("top_p", Honoured),
    ("stream", Honoured),
    ("reasoning", Honoured),
    ("text", Honoured),
    ("tools", Honoured),
    ("tool_choice", Honoured),
    ("parallel_tool_calls", Honoured),
    ("store", Refused),
    ("previous_response_id", Refused),
    ("background", Refused),
    ("include", Refused),
    ("top_logprobs", Refused),
    ("truncation", Refused),
    ("prompt", Refused),
    ("conversation", Refused),
    ("user", Ignored),
    ("metadata", Ignored),
    ("service_tier", Ignored),
    ("prompt_cache_key", Ignored),
    ("safety_identifier", Ignored),
    ("stream_options", Ignored),
];

/// terse's own `reasoning` fields, accepted beside OpenAI's `effort` and `summary`.
const TERSE_REASONING: &[&str] = &["mode", "strategy", "stop_temperature", "ramp", "max_thinking_tokens", "min_thinking_tokens"];

/// The chat request a Responses request means, and what the reply repeats.
struct Translated {
    chat: Value,
    /// Chat's `messages[i]` is this Responses field.
    message_params: Vec<String>,
    /// Request fields echoed in the response object.
    echo: Map<String, Value>,
}

fn field(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::field(param, message)
}

fn stateless(param: &str) -> ApiError {
    ApiError::unsupported(param, format!("`{param}` needs stored responses, and this server is stateless: send the whole conversation in `input`"))
}

fn translate(body: &Map<String, Value>) -> Result<Translated, ApiError> {
    for key in body.keys() {
        if !RESPONSES_FIELDS.iter().any(|(name, _)| name == key) {
            return Err(field(key, format!("unknown field `{key}`")));
        }
    }
    let get = |k: &str| body.get(k).filter(|v| !v.is_null());
    if get("previous_response_id").is_some() {
        return Err(stateless("previous_response_id"));
    }
    if get("store").and_then(Value::as_bool) == Some(true) {
        return Err(stateless("store"));
    }
    if get("background").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::unsupported("background", "background responses need stored responses; this server is stateless"));
    }
    for param in ["include", "prompt", "conversation"] {
        if get(param).is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(ApiError::unsupported(param, format!("`{param}` is not supported")));
        }
    }
    if get("top_logprobs").is_some_and(|v| v.as_i64() != Some(0)) {
        return Err(ApiError::unsupported("top_logprobs", "`top_logprobs` is not supported on /v1/responses; use /v1/chat/completions"));
    }
    if get("truncation").is_some_and(|v| v.as_str() != Some("disabled")) {
        return Err(ApiError::unsupported("truncation", "only `truncation: \"disabled\"` is supported"));
    }

    let mut chat = Map::new();
    let mut message_params = Vec::new();
    let mut messages = Vec::new();
    match get("instructions") {
        None => {}
        Some(Value::String(s)) => {
            messages.push(json!({"role": "system", "content": s}));
            message_params.push("instructions".to_string());
        }
        Some(v) => return Err(field("instructions", format!("`instructions` must be a string, not {}", json_type_name(v)))),
    }
    match get("input") {
        None => return Err(field("input", "`input` is required")),
        Some(Value::String(s)) => {
            messages.push(json!({"role": "user", "content": s}));
            message_params.push("input".to_string());
        }
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(field("input", "`input` must hold at least one item"));
            }
            for (i, item) in items.iter().enumerate() {
                let param = format!("input[{i}]");
                messages.push(input_item(item, &param)?);
                message_params.push(param);
            }
        }
        Some(v) => return Err(field("input", format!("`input` must be a string or an array of items, not {}", json_type_name(v)))),
    }
    chat.insert("messages".into(), Value::Array(merge_calls(messages, &mut message_params)));
    for (from, to) in [("model", "model"), ("temperature", "temperature"), ("top_p", "top_p"), ("stream", "stream"), ("max_output_tokens", "max_completion_tokens"), ("parallel_tool_calls", "parallel_tool_calls")] {
        if let Some(v) = get(from) {
            chat.insert(to.into(), v.clone());
        }
    }
    if let Some(reasoning) = get("reasoning") {
        let Some(r) = reasoning.as_object() else {
            return Err(field("reasoning", format!("`reasoning` must be an object, not {}", json_type_name(reasoning))));
        };
        let mut own = Map::new();
        for (k, v) in r {
            match k.as_str() {
                "effort" if v.is_null() => {}
                "effort" => {
                    let effort = v.as_str().ok_or_else(|| field("reasoning.effort", "`reasoning.effort` must be a string"))?;
                    let mode = match effort {
                        "minimal" | "low" => "short",
                        "medium" => "medium",
                        "high" => "long",
                        "none" => "none",
                        other => return Err(field("reasoning.effort", format!("`reasoning.effort` must be none, minimal, low, medium or high, got \"{other}\""))),
                    };
                    chat.insert("reasoning_effort".into(), json!(mode));
                }
                // No summaries: the thinking itself is in the reasoning item.
                "summary" | "generate_summary" => {}
                k if TERSE_REASONING.contains(&k) => {
                    own.insert(k.into(), v.clone());
                }
                other => return Err(field(&format!("reasoning.{other}"), format!("unknown field `reasoning.{other}`"))),
            }
        }
        if !own.is_empty() {
            chat.insert("reasoning".into(), Value::Object(own));
        }
    }
    if let Some(text) = get("text") {
        let format = text.get("format").filter(|f| !f.is_null());
        match format.map(|f| (f, f.get("type").and_then(Value::as_str))) {
            None | Some((_, Some("text"))) => {}
            Some((_, Some("json_object"))) => {
                chat.insert("response_format".into(), json!({"type": "json_object"}));
            }
            Some((f, Some("json_schema"))) => {
                let spec = json!({"name": f.get("name"), "schema": f.get("schema"), "strict": f.get("strict")});
                chat.insert("response_format".into(), json!({"type": "json_schema", "json_schema": spec}));
            }
            Some((_, other)) => {
                return Err(ApiError::unsupported("text.format.type", format!("`text.format.type` must be text, json_object or json_schema, got {other:?}")))
            }
        }
    }
    if let Some(tools) = get("tools") {
        let Some(items) = tools.as_array() else { return Err(field("tools", format!("`tools` must be an array, not {}", json_type_name(tools)))) };
        let chat_tools = items
            .iter()
            .enumerate()
            .map(|(i, t)| match t.get("type").and_then(Value::as_str) {
                Some("function") => Ok(json!({"type": "function", "function": {"name": t.get("name"), "description": t.get("description"), "parameters": t.get("parameters")}})),
                other => Err(ApiError::unsupported(format!("tools[{i}].type"), format!("tools of type {other:?} are not supported; only \"function\""))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        chat.insert("tools".into(), Value::Array(chat_tools));
    }
    if let Some(choice) = get("tool_choice") {
        let chat_choice = match choice {
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => json!({"type": "function", "function": {"name": o.get("name")}}),
            other => other.clone(),
        };
        chat.insert("tool_choice".into(), chat_choice);
    }
    let mut echo = Map::new();
    for k in ["instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice", "parallel_tool_calls", "metadata", "text"] {
        echo.insert(k.into(), body.get(k).cloned().unwrap_or(Value::Null));
    }
    Ok(Translated { chat: Value::Object(chat), message_params, echo })
}

/// One `input` item as a chat turn: a message (text or `input_text` /
/// `output_text` parts), a `function_call`, or a `function_call_output`.
fn input_item(item: &Value, param: &str) -> Result<Value, ApiError> {
    let Some(obj) = item.as_object() else { return Err(field(param, format!("`{param}` must be an object"))) };
    match obj.get("type").and_then(Value::as_str).unwrap_or("message") {
        "message" => {
            let role = obj.get("role").and_then(Value::as_str).ok_or_else(|| field(&format!("{param}.role"), format!("`{param}.role` is required")))?;
            let content = match obj.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match part.get("type").and_then(Value::as_str) {
                            Some("input_text" | "output_text" | "text") => text.push_str(part.get("text").and_then(Value::as_str).unwrap_or_default()),
                            other => {
                                return Err(ApiError::unsupported(
                                    format!("{param}.content[{j}].type"),
                                    format!("content parts of type {other:?} are not supported; only input_text and output_text"),
                                ))
                            }
                        }
                    }
                    text
                }
                _ => return Err(field(&format!("{param}.content"), format!("`{param}.content` must be a string or an array of parts"))),
            };
            Ok(json!({"role": role, "content": content}))
        }
        "function_call" => {
            let call_id = obj.get("call_id").and_then(Value::as_str).unwrap_or_default();
            let call = json!({"id": call_id, "type": "function", "function": {"name": obj.get("name"), "arguments": obj.get("arguments")}});
            Ok(json!({"role": "assistant", "content": null, "tool_calls": [call]}))
        }
        "function_call_output" => {
            let output = match obj.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => return Err(field(&format!("{param}.output"), format!("`{param}.output` is required"))),
            };
            Ok(json!({"role": "tool", "tool_call_id": obj.get("call_id"), "content": output}))
        }
        // The thinking of an earlier turn: templates drop it.
        "reasoning" => Ok(Value::Null),
        other => Err(ApiError::unsupported(format!("{param}.type"), format!("input items of type \"{other}\" are not supported"))),
    }
}

/// Consecutive `function_call` items are one assistant turn with several
/// calls, as chat templates expect; reasoning items drop out.
fn merge_calls(messages: Vec<Value>, params: &mut Vec<String>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut kept = Vec::new();
    for (m, p) in messages.into_iter().zip(params.drain(..)) {
        if m.is_null() {
            continue;
        }
        let is_calls = m.get("tool_calls").is_some() && m["content"].is_null();
        if let (true, Some(last)) = (is_calls, out.last_mut()) {
            if last.get("tool_calls").is_some() && last["content"].is_null() {
                let more = m["tool_calls"].as_array().cloned().unwrap_or_default();
                last["tool_calls"].as_array_mut().expect("an array").extend(more);
                continue;
            }
        }
        out.push(m);
        kept.push(p);
    }
    *params = kept;
    out
}

/// A chat error's `param` in the Responses request's words.
fn rename(message_params: &[String]) -> impl Fn(ApiError) -> ApiError + '_ {
    move |e| {
        let rename_param = |param: String| -> String {
            if let Some(rest) = param.strip_prefix("messages[") {
                if let Some((index, tail)) = rest.split_once(']') {
                    if let Some(p) = index.parse::<usize>().ok().and_then(|i| message_params.get(i)) {
                        return format!("{p}{tail}");
                    }
                }
                return "input".into();
            }
            if param == "messages" {
                return "input".into();
            }
            for (from, to) in [("max_completion_tokens", "max_output_tokens"), ("max_tokens", "max_output_tokens"), ("response_format.json_schema", "text.format"), ("response_format", "text.format"), ("reasoning_effort", "reasoning.effort")] {
                if let Some(rest) = param.strip_prefix(from) {
                    return format!("{to}{rest}");
                }
            }
            param.replace(".function.", ".")
        };
        match e {
            ApiError::InvalidField { param, message } => ApiError::InvalidField { param: rename_param(param), message },
            ApiError::Unsupported { param, message } => ApiError::Unsupported { param: rename_param(param), message },
            other => other,
        }
    }
}

/// The ids and request fields every event's response repeats.
#[derive(Clone)]
struct Skeleton {
    id: String,
    created_at: u64,
    model: String,
    echo: Map<String, Value>,
    effort: Value,
}

impl Skeleton {
    fn response(&self, status: &str, output: Vec<Value>, usage: Value, incomplete: Value, terse: Value) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": output, "usage": usage, "error": null,
            "incomplete_details": incomplete, "reasoning": {"effort": self.effort, "summary": null},
        });
        let obj = r.as_object_mut().expect("an object");
        for (k, v) in &self.echo {
            obj.insert(k.clone(), v.clone());
        }
        if obj["tools"].is_null() {
            obj.insert("tools".into(), json!([]));
        }
        if obj["tool_choice"].is_null() {
            obj.insert("tool_choice".into(), json!("auto"));
        }
        if obj["parallel_tool_calls"].is_null() {
            obj.insert("parallel_tool_calls".into(), json!(true));
        }
        if obj["text"].is_null() {
            obj.insert("text".into(), json!({"format": {"type": "text"}}));
        }
        if !terse.is_null() {
            obj.insert("terse".into(), terse);
        }
        r
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

fn usage(f: &Finished) -> Value {
    let u = &f.usage;
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": f.reasoning.thinking_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// `completed`, or `incomplete` with its reason when the output ran out.
fn status(f: &Finished) -> (&'static str, Value) {
    match f.reason {
        FinishReason::Length => ("incomplete", json!({"reason": "max_output_tokens"})),
        _ => ("completed", Value::Null),
    }
}

fn reasoning_item(id: &str, text: &str, status: &str) -> Value {
    let content = if text.is_empty() && status != "completed" { json!([]) } else { json!([{"type": "reasoning_text", "text": text}]) };
    json!({"type": "reasoning", "id": id, "summary": [], "content": content, "status": status})
}

fn message_item(id: &str, text: Option<&str>, status: &str) -> Value {
    let content = match text {
        Some(t) => json!([{"type": "output_text", "text": t, "annotations": [], "logprobs": []}]),
        None => json!([]),
    };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

fn call_item(id: &str, call_id: &str, call: &ParsedCall, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": call.name, "arguments": arguments, "status": status})
}

/// The axum handler.
pub async fn handle(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Result<JsonObject, ApiError>) -> Response {
    let mut record = RequestRecord::new(&state, "responses", request_id(&headers));
    let translated = match body.and_then(|JsonObject(map)| translate(&map)) {
        Ok(t) => t,
        Err(e) => return record.reject(e),
    };
    let Translated { chat, message_params, echo } = translated;
    let effort = chat.get("reasoning_effort").cloned().unwrap_or(Value::Null);
    let Started { mut generation, params, shape, tool_calls } = match start::<Chat>(&state, Ok(chat), record, rename(&message_params)).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    let skeleton = Skeleton { id: new_id("resp"), created_at: unix_now(), model: state.served_name.clone(), echo, effort };
    if params.stream {
        let stream = ResponseStream::new(generation, skeleton, shape, tool_calls);
        return Sse::new(stream.events()).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(10))).into_response();
    }
    let done = match generate::collect(&mut generation).await {
        Ok(done) => done,
        Err(e) => return generation.record().reject(e),
    };
    let mut output = Vec::new();
    if let Some(thinking) = done.reasoning.as_deref() {
        output.push(reasoning_item(&new_id("rs"), thinking, "completed"));
    }
    let (content, calls) = match shape {
        Some(mut parser) => {
            let mut pieces = parser.push(&done.text);
            pieces.extend(parser.finish());
            split_pieces(pieces)
        }
        None => (done.text.clone(), Vec::new()),
    };
    if !content.trim().is_empty() || calls.is_empty() {
        output.push(message_item(&new_id("msg"), Some(&content), "completed"));
    }
    tool_calls.inc_by(calls.len() as u64);
    for call in &calls {
        output.push(call_item(&new_id("fc"), &call_id(), call, &call.arguments, "completed"));
    }
    let (status, incomplete) = status(&done.finished);
    let terse = serde_json::to_value(TerseExtension::new(generation.record().mode_label(), &done.finished.reasoning)).unwrap_or(Value::Null);
    Json(skeleton.response(status, output, usage(&done.finished), incomplete, terse)).into_response()
}

/// An output item being streamed.
enum Open {
    Reasoning { index: usize, id: String, text: String },
    Message { index: usize, id: String, text: String },
}

/// One streamed response: the events so far and the items still open.
struct ResponseStream {
    generation: Generation,
    skeleton: Skeleton,
    calls: Option<CallParser>,
    tool_calls: prometheus::IntCounter,
    sequence: u64,
    open: Option<Open>,
    /// Completed items, in output order.
    done: Vec<Value>,
    finished: bool,
}

impl ResponseStream {
    fn new(generation: Generation, skeleton: Skeleton, calls: Option<CallParser>, tool_calls: prometheus::IntCounter) -> Self {
        ResponseStream { generation, skeleton, calls, tool_calls, sequence: 0, open: None, done: Vec::new(), finished: false }
    }

    fn event(&mut self, kind: &'static str, mut body: Value) -> Event {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        Event::default().event(kind).data(body.to_string())
    }

    fn next_index(&self) -> usize {
        self.done.len() + usize::from(self.open.is_some())
    }

    /// Close the open item, if any.
    fn close(&mut self, out: &mut Vec<Event>) {
        match self.open.take() {
            Some(Open::Reasoning { index, id, text }) => {
                out.push(self.event("response.reasoning_text.done", json!({"item_id": id, "output_index": index, "content_index": 0, "text": text})));
                let item = reasoning_item(&id, &text, "completed");
                out.push(self.event("response.output_item.done", json!({"output_index": index, "item": item})));
                self.done.push(item);
            }
            Some(Open::Message { index, id, text }) => {
                let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                out.push(self.event("response.output_text.done", json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []})));
                out.push(self.event("response.content_part.done", json!({"item_id": id, "output_index": index, "content_index": 0, "part": part})));
                let item = message_item(&id, Some(&text), "completed");
                out.push(self.event("response.output_item.done", json!({"output_index": index, "item": item})));
                self.done.push(item);
            }
            None => {}
        }
    }

    fn thinking(&mut self, piece: String, out: &mut Vec<Event>) {
        if !matches!(self.open, Some(Open::Reasoning { .. })) {
            self.close(out);
            let (index, id) = (self.next_index(), new_id("rs"));
            out.push(self.event("response.output_item.added", json!({"output_index": index, "item": reasoning_item(&id, "", "in_progress")})));
            self.open = Some(Open::Reasoning { index, id, text: String::new() });
        }
        if let Some(Open::Reasoning { index, id, text }) = &mut self.open {
            text.push_str(&piece);
            let body = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": piece});
            out.push(self.event("response.reasoning_text.delta", body));
        }
    }

    fn answer_text(&mut self, piece: String, out: &mut Vec<Event>) {
        if piece.is_empty() {
            return;
        }
        if !matches!(self.open, Some(Open::Message { .. })) {
            self.close(out);
            let (index, id) = (self.next_index(), new_id("msg"));
            out.push(self.event("response.output_item.added", json!({"output_index": index, "item": message_item(&id, None, "in_progress")})));
            let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
            out.push(self.event("response.content_part.added", json!({"item_id": id, "output_index": index, "content_index": 0, "part": part})));
            self.open = Some(Open::Message { index, id, text: String::new() });
        }
        if let Some(Open::Message { index, id, text }) = &mut self.open {
            text.push_str(&piece);
            let body = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": piece, "logprobs": []});
            out.push(self.event("response.output_text.delta", body));
        }
    }

    fn call(&mut self, call: ParsedCall, out: &mut Vec<Event>) {
        self.close(out);
        self.tool_calls.inc();
        let (index, id, call_id) = (self.next_index(), new_id("fc"), call_id());
        out.push(self.event("response.output_item.added", json!({"output_index": index, "item": call_item(&id, &call_id, &call, "", "in_progress")})));
        out.push(self.event("response.function_call_arguments.delta", json!({"item_id": id, "output_index": index, "delta": call.arguments})));
        out.push(self.event("response.function_call_arguments.done", json!({"item_id": id, "output_index": index, "arguments": call.arguments, "name": call.name})));
        let item = call_item(&id, &call_id, &call, &call.arguments, "completed");
        out.push(self.event("response.output_item.done", json!({"output_index": index, "item": item})));
        self.done.push(item);
    }

    fn answer(&mut self, pieces: Vec<Piece>, out: &mut Vec<Event>) {
        for p in pieces {
            match p {
                Piece::Text(t) => self.answer_text(t, out),
                Piece::Call(c) => self.call(c, out),
            }
        }
    }

    fn finish(&mut self, end: Finished, out: &mut Vec<Event>) {
        if let Some(pieces) = self.calls.as_mut().map(CallParser::finish) {
            self.answer(pieces, out);
        }
        if self.done.is_empty() && self.open.is_none() {
            self.answer_text(String::new(), out);
        }
        self.close(out);
        let (status, incomplete) = status(&end);
        let terse = serde_json::to_value(TerseExtension::new(self.generation.record().mode_label(), &end.reasoning)).unwrap_or(Value::Null);
        let response = self.skeleton.response(status, self.done.clone(), usage(&end), incomplete, terse);
        let kind = if status == "completed" { "response.completed" } else { "response.incomplete" };
        out.push(self.event(kind, json!({"response": response})));
    }

    async fn step(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if self.sequence == 0 {
            let created = self.skeleton.response("in_progress", vec![], Value::Null, Value::Null, Value::Null);
            out.push(self.event("response.created", json!({"response": created.clone()})));
            out.push(self.event("response.in_progress", json!({"response": created})));
            return out;
        }
        match self.generation.next().await {
            Ok(Output::Text(text, Phase::Thinking)) => self.thinking(text, &mut out),
            Ok(Output::Text(text, Phase::Answer)) => match self.calls.as_mut() {
                Some(parser) => {
                    let pieces = parser.push(&text);
                    self.answer(pieces, &mut out);
                }
                None => self.answer_text(text, &mut out),
            },
            Ok(Output::Finished(end)) => {
                self.finished = true;
                self.finish(end, &mut out);
            }
            Err(e) => {
                tracing::warn!(error = %e, "response stream failed");
                self.generation.record().set_error(&e);
                self.finished = true;
                let body = serde_json::from_str::<Value>(&e.to_json()).unwrap_or(Value::Null);
                let err = &body["error"];
                out.push(self.event("error", json!({"code": err["code"], "message": err["message"], "param": err["param"]})));
            }
        }
        out
    }

    fn events(self) -> impl futures::Stream<Item = Result<Event, Infallible>> + Send {
        stream::unfold(self, |mut st| async move {
            if st.finished {
                return None;
            }
            let batch = st.step().await;
            Some((batch, st))
        })
        .flat_map(|batch| stream::iter(batch.into_iter().map(Ok)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_of(body: Value) -> Result<Value, ApiError> {
        translate(body.as_object().unwrap()).map(|t| t.chat)
    }

    #[test]
    fn requests_become_the_chat_requests_they_mean() {
        let chat = chat_of(json!({"model": "m", "input": "Hi", "instructions": "Be brief.", "max_output_tokens": 9, "reasoning": {"effort": "minimal", "summary": "auto", "stop_temperature": 4}})).unwrap();
        assert_eq!(chat["messages"], json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]));
        assert_eq!((chat["max_completion_tokens"].clone(), chat["reasoning_effort"].clone()), (json!(9), json!("short")));
        assert_eq!(chat["reasoning"], json!({"stop_temperature": 4}));
        let chat = chat_of(json!({"input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ], "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}], "tool_choice": {"type": "function", "name": "w"},
           "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}}))
        .unwrap();
        assert_eq!(chat["messages"][1]["tool_calls"].as_array().unwrap().len(), 2, "consecutive calls are one turn");
        assert_eq!(chat["messages"][2], json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"}));
        assert_eq!(chat["tools"][0]["function"]["name"], "w");
        assert_eq!(chat["tool_choice"], json!({"type": "function", "function": {"name": "w"}}));
        assert_eq!(chat["response_format"]["json_schema"]["name"], "x");
    }

    #[test]
    fn what_needs_state_or_is_unknown_is_refused_by_name() {
        for (body, param) in [
            (json!({"input": "x", "previous_response_id": "resp_1"}), "previous_response_id"),
            (json!({"input": "x", "store": true}), "store"),
            (json!({"input": "x", "frobnicate": 1}), "frobnicate"),
            (json!({"input": "x", "reasoning": {"effort": "extreme"}}), "reasoning.effort"),
            (json!({"input": "x", "reasoning": {"bogus": 1}}), "reasoning.bogus"),
            (json!({"input": [{"type": "image", "url": "x"}]}), "input[0].type"),
            (json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}), "input[0].content[0].type"),
            (json!({"input": "x", "tools": [{"type": "web_search"}]}), "tools[0].type"),
            (json!({}), "input"),
            (json!({"input": []}), "input"),
        ] {
            match chat_of(body.clone()) {
                Err(ApiError::InvalidField { param: p, .. } | ApiError::Unsupported { param: p, .. }) => assert_eq!(p, param, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        chat_of(json!({"input": "x", "store": false, "user": "u", "metadata": {}})).unwrap();
    }

    #[test]
    fn chat_errors_name_the_responses_fields() {
        let params = vec!["instructions".to_string(), "input[0]".to_string()];
        let r = rename(&params);
        let p = |param: &str| match r(ApiError::field(param, "x")) {
            ApiError::InvalidField { param, .. } => param,
            other => panic!("{other:?}"),
        };
        assert_eq!(p("messages[1].content"), "input[0].content");
        assert_eq!(p("max_completion_tokens"), "max_output_tokens");
        assert_eq!(p("response_format.json_schema.schema"), "text.format.schema");
        assert_eq!(p("tools[0].function.name"), "tools[0].name");
        assert_eq!(p("temperature"), "temperature");
    }
}

//! `GET /openapi.json`: an OpenAPI 3.1 description of every route and body.
//!
//! Written from the server's own tables so it cannot drift: the paths are
//! [`super::ROUTES`] (the router is built from the same table), and each
//! request body's properties are the field lists of `wire.rs` and
//! `responses.rs`, every field with its schema here (a unit test fails when
//! a listed field has none). Response bodies are described by their main
//! fields; `additionalProperties` stays open, as terse adds its own.

use serde_json::{json, Map, Value};

use super::responses::RESPONSES_FIELDS;
use super::wire::{FieldUse, CHAT_FIELDS, COMPLETION_FIELDS, SHARED_FIELDS};
use super::{Route, ROUTES};

fn string(description: &str) -> Value {
    json!({"type": "string", "description": description})
}

fn integer(description: &str) -> Value {
    json!({"type": "integer", "description": description})
}

fn object(description: &str) -> Value {
    json!({"type": "object", "description": description})
}

/// The schema of a top-level request field, by name.
fn field_schema(name: &str) -> Option<Value> {
    Some(match name {
        "model" => string("The served model's name (optional: one model is served)"),
        "max_tokens" | "max_completion_tokens" => json!({"type": "integer", "minimum": 1, "description": "Most completion tokens, thinking included"}),
        "max_output_tokens" => json!({"type": "integer", "minimum": 1, "description": "Most output tokens, thinking included"}),
        "temperature" => json!({"type": "number", "minimum": 0, "maximum": 2, "description": "0 is greedy"}),
        "top_p" => json!({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k" => json!({"type": "integer", "minimum": 0, "description": "0 disables it"}),
        "seed" => integer("Same seed, same settings: the same output"),
        "stop" => json!({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}], "description": "At most 4 strings of at most 256 bytes"}),
        "n" | "best_of" => json!({"type": "integer", "const": 1, "description": "Only 1"}),
        "stream" => json!({"type": "boolean"}),
        "stream_options" => object("`include_usage`: a last chunk with the usage"),
        "presence_penalty" | "frequency_penalty" => json!({"type": "number", "minimum": -2, "maximum": 2}),
        "repetition_penalty" => json!({"type": "number", "exclusiveMinimum": 0, "description": "1 disables it"}),
        "reasoning_effort" => json!({"type": "string", "enum": ["short", "medium", "long", "low", "high", "none"]}),
        "reasoning" => object("terse's thinking control: mode, strategy (ts | budget | probe | none), stop_temperature, ramp, max_thinking_tokens, min_thinking_tokens, probe_interval, probe_tokens, probe_agreement, probe_confidence, probe_at (interval | reflection), probe_words, wrap_up; on /v1/responses also effort and summary"),
        "response_format" => object("{\"type\": \"text\" | \"json_object\" | \"json_schema\", \"json_schema\": {\"name\", \"schema\", \"strict\"}}"),
        "text" => object("{\"format\": {\"type\": \"text\" | \"json_object\" | \"json_schema\", \"name\", \"schema\", \"strict\"}}"),
        "speculate" => json!({"type": "boolean", "description": "terse's own: false decodes this request without speculation on a server started with --speculate"}),
        "logit_bias" => json!({"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}, "description": "Token id to bias"}),
        "logprobs" => json!({"oneOf": [{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": 20}], "description": "Chat: a switch; completions: how many alternatives"}),
        "top_logprobs" => json!({"type": "integer", "minimum": 0, "maximum": 20}),
        "tools" => json!({"type": "array", "items": {"type": "object"}, "description": "Functions with JSON-schema parameters"}),
        "tool_choice" => json!({"oneOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {"type": "object"}]}),
        "parallel_tool_calls" => json!({"type": "boolean"}),
        "messages" => json!({"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]},
            "tool_calls": {"type": "array", "items": {"type": "object"}},
            "tool_call_id": {"type": "string"}}, "required": ["role"]}}),
        "prompt" => json!({"oneOf": [{"type": "string"}, {"type": "array"}], "description": "Text, one text in an array, or token ids"}),
        "echo" => json!({"type": "boolean", "description": "The prompt before the completion (not with logprobs)"}),
        "input" => json!({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}], "description": "Text, or message / function_call / function_call_output items"}),
        "instructions" => string("The system message"),
        "user" | "prompt_cache_key" | "safety_identifier" | "service_tier" => string("Accepted and ignored"),
        "metadata" => object("Accepted and ignored"),
        "store" => json!({"type": "boolean", "description": "Chat: ignored; Responses: only false (the server is stateless)"}),
        "functions" | "function_call" => json!({"description": "Refused: use tools and tool_choice"}),
        "modalities" => json!({"type": "array", "items": {"type": "string", "const": "text"}}),
        "audio" | "prediction" | "web_search_options" | "verbosity" | "suffix" => json!({"description": "Refused: not supported"}),
        "previous_response_id" | "background" | "conversation" => json!({"description": "Refused: the server is stateless"}),
        "include" | "truncation" => json!({"description": "Refused unless empty / disabled"}),
        _ => return None,
    })
}

/// A request body's schema: every listed field, what terse does with it in
/// `x-terse-use` (honoured, ignored, refused), no other field allowed.
fn request_schema(lists: &[&[(&str, FieldUse)]], required: &[&str]) -> Value {
    let mut properties = Map::new();
    for list in lists {
        for &(name, how) in *list {
            let mut schema = field_schema(name).unwrap_or_else(|| json!({}));
            let label = match how {
                FieldUse::Honoured => "honoured",
                FieldUse::Ignored => "ignored",
                FieldUse::Refused => "refused",
            };
            schema["x-terse-use"] = json!(label);
            properties.insert(name.to_string(), schema);
        }
    }
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn json_response(schema: &str, description: &str) -> Value {
    json!({
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}},
            "text/event-stream": {"schema": {"type": "string", "description": "Server-Sent Events when `stream` is true"}},
        },
    })
}

fn operation(route: &Route) -> Value {
    let generation = |request: &str, reply: &str, summary: &str| {
        json!({
            "summary": summary,
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{request}")}}}},
            "responses": {
                "200": json_response(reply, "The generation"),
                "400": error_response("A field is wrong or refused; `param` names it"),
                "401": error_response("An API key is required"),
                "404": error_response("Another model"),
                "413": error_response("The body or the prompt is too large"),
                "429": error_response("The queue is full"),
                "503": error_response("The model is loading, or the server shutting down"),
                "504": error_response("The request ran past the server's deadline"),
            },
        })
    };
    let plain = |summary: &str, content: Value| json!({"summary": summary, "responses": {"200": {"description": summary, "content": content}}});
    match route.path {
        super::CHAT_COMPLETIONS => generation("ChatRequest", "ChatCompletion", "A chat completion, thinking and answer apart"),
        super::COMPLETIONS => generation("CompletionRequest", "TextCompletion", "A text completion"),
        super::RESPONSES => generation("ResponsesRequest", "Response", "A response (OpenAI's Responses API, stateless)"),
        super::MODELS => plain("The served model", json!({"application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}})),
        super::MODEL => {
            let mut op = plain("One model", json!({"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}));
            op["parameters"] = json!([{"name": "model", "in": "path", "required": true, "schema": {"type": "string"}}]);
            op["responses"]["404"] = error_response("No such model");
            op
        }
        super::HEALTH => plain("200 while the process runs", json!({"application/json": {"schema": {"type": "object"}}})),
        super::READY => {
            let mut op = plain("200 once the model is loaded", json!({"application/json": {"schema": {"type": "object"}}}));
            op["responses"]["503"] = json!({"description": "Loading, or shutting down"});
            op
        }
        super::METRICS => plain("Prometheus text format", json!({"text/plain": {"schema": {"type": "string"}}})),
        super::OPENAPI => plain("This document", json!({"application/json": {"schema": {"type": "object"}}})),
        super::PLAYGROUND => plain("The playground: a chat that shows the thinking apart, with the reasoning controls", json!({"text/html": {"schema": {"type": "string"}}})),
        other => plain(other, json!({})),
    }
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        // OpenAPI writes path parameters as `{name}`, as axum does.
        let entry = paths.entry(route.path.to_string()).or_insert_with(|| json!({}));
        let mut op = operation(route);
        if !route.open {
            op["security"] = json!([{"bearer": []}, {}]);
        }
        entry[route.method.to_ascii_lowercase()] = op;
    }
    let usage = json!({"type": "object", "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "terse",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "An inference server for small reasoning models: OpenAI's chat, completion and Responses APIs, with thinking control. docs/api.md says what each field does.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "Needed when the server has API keys"}},
            "schemas": {
                "ChatRequest": request_schema(&[SHARED_FIELDS, CHAT_FIELDS], &["messages"]),
                "CompletionRequest": request_schema(&[SHARED_FIELDS, COMPLETION_FIELDS], &["prompt"]),
                "ResponsesRequest": request_schema(&[RESPONSES_FIELDS], &["input"]),
                "ChatCompletion": {"type": "object", "properties": {
                    "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"}, "model": {"type": "string"},
                    "choices": {"type": "array", "items": {"type": "object", "properties": {
                        "message": {"type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                            "reasoning_content": {"type": "string"}, "tool_calls": {"type": "array", "items": {"type": "object"}}}},
                        "finish_reason": {"type": "string", "enum": ["stop", "length", "tool_calls", "cancelled"]}}}},
                    "usage": usage, "terse": {"$ref": "#/components/schemas/TerseExtension"}}},
                "TextCompletion": {"type": "object", "properties": {
                    "id": {"type": "string"}, "object": {"const": "text_completion"},
                    "choices": {"type": "array", "items": {"type": "object", "properties": {"text": {"type": "string"}, "finish_reason": {"type": ["string", "null"]}}}},
                    "usage": usage, "terse": {"$ref": "#/components/schemas/TerseExtension"}}},
                "Response": {"type": "object", "properties": {
                    "id": {"type": "string"}, "object": {"const": "response"}, "status": {"type": "string", "enum": ["completed", "incomplete", "in_progress"]},
                    "output": {"type": "array", "items": {"type": "object", "properties": {"type": {"type": "string", "enum": ["reasoning", "message", "function_call"]}}}},
                    "usage": {"type": "object", "properties": {"input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"},
                        "output_tokens_details": {"type": "object", "properties": {"reasoning_tokens": {"type": "integer"}}}}},
                    "terse": {"$ref": "#/components/schemas/TerseExtension"}}},
                "TerseExtension": {"type": "object", "properties": {
                    "mode": {"type": "string"}, "thinking_tokens": {"type": "integer"}, "answer_tokens": {"type": "integer"}, "forced_tokens": {"type": "integer"},
                    "probe_tokens": {"type": "integer"}, "probes": {"type": "integer"},
                    "think_stop_reason": {"type": ["string", "null"], "enum": ["natural", "stop_temperature", "budget", "probe", "length", "cancelled", null]}}},
                "ModelList": {"type": "object", "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}},
                "Model": {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "context_length": {"type": "integer"}, "terse": {"type": "object"}}},
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_field_has_a_schema() {
        for list in [SHARED_FIELDS, CHAT_FIELDS, COMPLETION_FIELDS, RESPONSES_FIELDS] {
            for (name, _) in list {
                assert!(field_schema(name).is_some(), "`{name}` has no schema in openapi.rs");
            }
        }
    }

    #[test]
    fn every_route_is_a_path() {
        let doc = document();
        for route in ROUTES {
            assert!(doc["paths"][route.path][route.method.to_ascii_lowercase()].is_object(), "{} {}", route.method, route.path);
        }
    }
}

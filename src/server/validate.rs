//! Request checks: the ranges, defaults and refusals of the typed requests of
//! `wire.rs`, each error naming its field by its dotted path.

use serde_json::Value;

use super::error::ApiError;
use super::structured::{response_format, AnswerFormat};
use super::wire::{ChatFields, CompletionFields, ContentPart, GenerationFields, MessageContent, WireToolCall};
use crate::engine::SamplingParams;
pub use crate::reasoning::modes::Mode;
use crate::reasoning::modes::ReasoningFields;
use crate::tokenize::{ChatMessage, TemplateFunctionCall, TemplateToolCall};

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// Longest stop string, in bytes: the stream holds back up to this much text.
pub const MAX_STOP_BYTES: usize = 256;
/// Most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;

pub fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::field(param, format!("`{param}` must be {expected}, not {}", json_type_name(got)))
}

/// What every generation endpoint runs with besides its prompt, checked.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// `max_completion_tokens`, else `max_tokens`; `None` means "up to the context".
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub mode: Mode,
    /// The request's own `reasoning` fields, merged with the mode's preset at submission.
    pub reasoning: ReasoningFields,
    /// `response_format`: what the answer must be (`None`: free text).
    pub format: Option<AnswerFormat>,
    /// `logit_bias`, token ids not yet checked against the vocabulary.
    pub logit_bias: Vec<(u32, f32)>,
    /// Log-probabilities and how many alternatives (the endpoint's own fields).
    pub logprobs: Option<usize>,
    /// `"speculate": false`: decoded one token a step even on a speculating server.
    pub no_speculation: bool,
}

/// The reasoning mode alone, read leniently from the raw body (for metrics
/// labels even when other fields are wrong).
pub fn mode_of(body: &Value) -> Mode {
    let effort = body.get("reasoning_effort").and_then(Value::as_str).and_then(Mode::parse);
    let nested = body.get("reasoning").and_then(|r| r.get("mode")).and_then(Value::as_str).and_then(Mode::parse);
    nested.or(effort).unwrap_or(Mode::Default)
}

/// `x` within `lo..=hi` (`lo` excluded when `lo_open`).
fn ranged(param: &str, x: Option<f64>, lo: f64, lo_open: bool, hi: f64) -> Result<Option<f64>, ApiError> {
    let Some(x) = x else { return Ok(None) };
    if !x.is_finite() {
        return Err(ApiError::field(param, format!("`{param}` must be a finite number")));
    }
    let ok = (if lo_open { x > lo } else { x >= lo }) && x <= hi;
    if !ok {
        let open = if lo_open { "(" } else { "[" };
        return Err(ApiError::field(param, format!("`{param}` must be in {open}{lo}, {hi}], got {x}")));
    }
    Ok(Some(x))
}

impl GenerationFields {
    /// `model` must be absent or the served name.
    pub fn check_model(&self, served_name: &str) -> Result<(), ApiError> {
        match &self.model {
            Some(m) if m != served_name => Err(ApiError::ModelNotFound(m.clone())),
            _ => Ok(()),
        }
    }

    pub fn params(&self) -> Result<GenerationParams, ApiError> {
        let mut max_tokens = None;
        for (name, n) in [("max_tokens", self.max_tokens), ("max_completion_tokens", self.max_completion_tokens)] {
            if let Some(n) = n {
                if n < 1 {
                    return Err(ApiError::field(name, format!("`{name}` must be at least 1, got {n}")));
                }
                max_tokens = Some(usize::try_from(n).unwrap_or(usize::MAX));
            }
        }
        let temperature = ranged("temperature", self.temperature, 0.0, false, 2.0)?.unwrap_or(1.0);
        let top_p = ranged("top_p", self.top_p, 0.0, true, 1.0)?.unwrap_or(1.0);
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k >= 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => return Err(ApiError::field("top_k", format!("`top_k` must be >= 0 (0 disables it), got {k}"))),
        };
        let seed = match self.seed {
            None => None,
            // Negative seeds are accepted as their two's-complement bits.
            Some(s) if s >= i64::MIN as i128 && s <= u64::MAX as i128 => Some(if s < 0 { s as i64 as u64 } else { s as u64 }),
            Some(s) => return Err(ApiError::field("seed", format!("`seed` must fit in 64 bits, got {s}"))),
        };
        let presence_penalty = ranged("presence_penalty", self.presence_penalty, -2.0, false, 2.0)?.unwrap_or(0.0);
        let frequency_penalty = ranged("frequency_penalty", self.frequency_penalty, -2.0, false, 2.0)?.unwrap_or(0.0);
        let repetition_penalty = match self.repetition_penalty {
            None => 1.0,
            Some(r) if r > 0.0 && r.is_finite() => r,
            Some(r) => return Err(ApiError::field("repetition_penalty", format!("`repetition_penalty` must be > 0, got {r}"))),
        };

        let stop = self.stop.as_ref().map(|s| s.0.clone()).unwrap_or_default();
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::field("stop", format!("`stop` may hold at most {MAX_STOP_STRINGS} strings, got {}", stop.len())));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::field("stop", "stop strings must not be empty"));
        }
        if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::field("stop", format!("stop strings may be at most {MAX_STOP_BYTES} bytes long, got one of {}", long.len())));
        }

        if let Some(n) = self.n {
            if n < 1 {
                return Err(ApiError::field("n", format!("`n` must be at least 1, got {n}")));
            }
            if n > 1 {
                return Err(ApiError::unsupported("n", "only n = 1 is supported; send several requests instead"));
            }
        }

        let (mode, reasoning) = self.reasoning_params()?;
        Ok(GenerationParams {
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k,
                seed,
                presence_penalty: presence_penalty as f32,
                frequency_penalty: frequency_penalty as f32,
                repetition_penalty: repetition_penalty as f32,
            },
            stop,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
            mode,
            reasoning,
            format: response_format(self.response_format.as_ref())?,
            logit_bias: self.logit_bias()?,
            logprobs: None,
            no_speculation: self.speculate == Some(false),
        })
    }

    /// `logit_bias`: token ids (as strings, OpenAI's shape) to numbers in [-100, 100].
    fn logit_bias(&self) -> Result<Vec<(u32, f32)>, ApiError> {
        let Some(value) = self.logit_bias.as_ref().filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
        let Some(map) = value.as_object() else { return Err(wrong_type("logit_bias", "an object of token ids to numbers", value)) };
        let mut bias = Vec::with_capacity(map.len());
        for (key, v) in map {
            let param = format!("logit_bias.{key}");
            let id: u32 = key.trim().parse().map_err(|_| ApiError::field(&param, format!("`logit_bias` keys must be token ids, got \"{key}\"")))?;
            let Some(b) = v.as_f64() else { return Err(wrong_type(&param, "a number", v)) };
            if !(-100.0..=100.0).contains(&b) {
                return Err(ApiError::field(param, format!("`logit_bias` values must be in [-100, 100], got {b}")));
            }
            bias.push((id, b as f32));
        }
        Ok(bias)
    }

    /// `reasoning_effort` and the `reasoning` object, each field checked on its
    /// own; [`crate::reasoning::modes::merge`] combines them with the mode's preset.
    fn reasoning_params(&self) -> Result<(Mode, ReasoningFields), ApiError> {
        let fields = self.reasoning.clone().unwrap_or_default();
        if let (Some(effort), Some(mode)) = (self.reasoning_effort, fields.mode) {
            if effort != mode {
                return Err(ApiError::field(
                    "reasoning.mode",
                    format!("`reasoning.mode` ({}) contradicts `reasoning_effort` ({})", mode.label(), effort.label()),
                ));
            }
        }
        fields.check().map_err(|e| ApiError::field(format!("reasoning.{}", e.field), e.message))?;
        Ok((fields.mode.or(self.reasoning_effort).unwrap_or(Mode::Default), fields))
    }

}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

impl ChatFields {
    /// `messages`, with `content` flattened to text. `developer` becomes
    /// `system`, which is what chat templates know.
    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        let Some(items) = &self.messages else {
            return Err(ApiError::field("messages", "`messages` is required"));
        };
        if items.is_empty() {
            return Err(ApiError::field("messages", "`messages` must hold at least one message"));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, msg)| {
                let param = |name: &str| format!("messages[{i}].{name}");
                let role = match msg.role.as_deref() {
                    None => return Err(ApiError::field(param("role"), format!("`{}` is required", param("role")))),
                    Some(r) if ROLES.contains(&r) => r,
                    Some(r) => {
                        return Err(ApiError::field(param("role"), format!("unknown role \"{r}\"; expected one of {}", ROLES.join(", "))))
                    }
                };
                let tool_calls = match &msg.tool_calls {
                    Some(calls) if role == "assistant" => calls.iter().enumerate().map(|(j, c)| history_call(c, &param(&format!("tool_calls[{j}]")))).collect::<Result<Vec<_>, _>>()?,
                    Some(calls) if !calls.is_empty() => {
                        return Err(ApiError::field(param("tool_calls"), format!("only assistant messages carry `tool_calls`, not {role} ones")))
                    }
                    _ => Vec::new(),
                };
                let content = match &msg.content {
                    // Assistant turns that only called tools carry no content.
                    None if role == "assistant" => String::new(),
                    None => return Err(ApiError::field(param("content"), format!("`{}` is required for a {role} message", param("content")))),
                    Some(MessageContent::Text(s)) => s.clone(),
                    Some(MessageContent::Parts(parts)) => part_texts(parts, &param("content"))?,
                };
                let role = if role == "developer" { "system" } else { role };
                Ok(ChatMessage { role: role.to_string(), content, tool_calls, tool_call_id: msg.tool_call_id.clone(), name: msg.name.clone() })
            })
            .collect()
    }

    /// OpenAI's features terse does not have: audio in or out, predicted
    /// outputs, web search, GPT-5's verbosity.
    pub fn refuse_unsupported(&self) -> Result<(), ApiError> {
        for (param, value) in [("functions", &self.functions), ("function_call", &self.function_call)] {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::unsupported(param, format!("`{param}` is the deprecated form of tools; use `tools` and `tool_choice`")));
            }
        }
        let text_only = self.modalities.as_ref().is_none_or(|m| m.is_null() || *m == serde_json::json!(["text"]));
        if !text_only {
            return Err(ApiError::unsupported("modalities", "only the \"text\" modality is supported"));
        }
        for (param, value) in [("audio", &self.audio), ("prediction", &self.prediction), ("web_search_options", &self.web_search_options), ("verbosity", &self.verbosity)] {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::unsupported(param, format!("`{param}` is not supported")));
            }
        }
        Ok(())
    }

    /// `logprobs` and `top_logprobs` (0 to 20, only with `logprobs`).
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = match self.top_logprobs {
            None => None,
            Some(n) if (0..=MAX_TOP_LOGPROBS).contains(&n) => Some(n as usize),
            Some(n) => return Err(ApiError::field("top_logprobs", format!("`top_logprobs` must be in [0, {MAX_TOP_LOGPROBS}], got {n}"))),
        };
        match (self.logprobs.unwrap_or(false), top) {
            (true, top) => Ok(Some(top.unwrap_or(0))),
            (false, Some(n)) if n > 0 => Err(ApiError::field("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
            (false, _) => Ok(None),
        }
    }
}

/// A call in the history, in the template's shape (arguments as an object).
fn history_call(call: &WireToolCall, param: &str) -> Result<TemplateToolCall, ApiError> {
    if call.kind.as_deref().is_some_and(|k| k != "function") {
        return Err(ApiError::unsupported(format!("{param}.type"), "only calls of type \"function\" are supported"));
    }
    let function = call.function.as_ref().ok_or_else(|| ApiError::field(format!("{param}.function"), format!("`{param}.function` is required")))?;
    let name = function.name.clone().ok_or_else(|| ApiError::field(format!("{param}.function.name"), format!("`{param}.function.name` is required")))?;
    let text = function.arguments.as_deref().unwrap_or("{}");
    let arguments = serde_json::from_str(text)
        .map_err(|e| ApiError::field(format!("{param}.function.arguments"), format!("`{param}.function.arguments` is not JSON: {e}")))?;
    Ok(TemplateToolCall { id: call.id.clone().unwrap_or_default(), kind: "function".into(), function: TemplateFunctionCall { name, arguments } })
}

/// The text parts of a message, joined; other part types are refused.
fn part_texts(parts: &[ContentPart], param: &str) -> Result<String, ApiError> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let pparam = |name: &str| format!("{param}[{j}].{name}");
        match part.kind.as_deref() {
            Some("text") => {}
            Some(other) => {
                return Err(ApiError::unsupported(
                    pparam("type"),
                    format!("content parts of type \"{other}\" are not supported; only \"text\""),
                ))
            }
            None => return Err(ApiError::field(pparam("type"), format!("`{}` is required", pparam("type")))),
        }
        match &part.text {
            Some(t) => text.push_str(t),
            None => return Err(ApiError::field(pparam("text"), format!("`{}` is required", pparam("text")))),
        }
    }
    Ok(text)
}

/// The `prompt` of a text completion.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl CompletionFields {
    /// Whether a prompt was given at all (checked before the engine is asked
    /// for the vocabulary size that token ids are checked against).
    pub fn require_prompt(&self) -> Result<(), ApiError> {
        match &self.prompt {
            None | Some(Value::Null) => Err(ApiError::field("prompt", "`prompt` is required")),
            Some(_) => Ok(()),
        }
    }

    pub fn prompt(&self, vocab_size: usize) -> Result<Prompt, ApiError> {
        let one_only = || ApiError::unsupported("prompt", "only one prompt per request is supported");
        match &self.prompt {
            None | Some(Value::Null) => Err(ApiError::field("prompt", "`prompt` is required")),
            Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
            Some(Value::Array(items)) => match items.as_slice() {
                [] => Err(ApiError::field("prompt", "`prompt` must not be an empty array")),
                [Value::String(s)] => Ok(Prompt::Text(s.clone())),
                [Value::Array(ids)] => token_ids(ids, vocab_size, "prompt[0]"),
                [Value::String(_) | Value::Array(_), ..] => Err(one_only()),
                [Value::Number(_), ..] => token_ids(items, vocab_size, "prompt"),
                [v, ..] => Err(wrong_type("prompt[0]", "a string, a token id or an array of token ids", v)),
            },
            Some(v) => Err(wrong_type("prompt", "a string, an array of one string or an array of token ids", v)),
        }
    }

    pub fn refuse_unsupported(&self) -> Result<(), ApiError> {
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::unsupported("best_of", "only best_of = 1 is supported"));
        }
        if self.echo.unwrap_or(false) && self.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::unsupported("echo", "`echo` with `logprobs` is not supported: the prompt's log-probabilities are not computed"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::unsupported("suffix", "suffix is not supported"));
        }
        Ok(())
    }

    /// `logprobs`: how many alternatives (0 to 20) beside each token's own.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs.as_ref() {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_i64() {
                Some(n) if (0..=MAX_TOP_LOGPROBS).contains(&n) => Ok(Some(n as usize)),
                _ => Err(ApiError::field("logprobs", format!("`logprobs` must be an integer in [0, {MAX_TOP_LOGPROBS}], got {v}"))),
            },
        }
    }
}

fn token_ids(items: &[Value], vocab_size: usize, param: &str) -> Result<Prompt, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_u64() {
            Some(id) if (id as usize) < vocab_size => Ok(id as u32),
            Some(id) => Err(ApiError::field(
                format!("{param}[{i}]"),
                format!("token id {id} is outside the vocabulary (size {vocab_size})"),
            )),
            None => Err(ApiError::field(format!("{param}[{i}]"), "token ids must be non-negative integers")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Prompt::Tokens)
}

#[cfg(test)]
mod tests {
    use super::super::wire::parse;
    use super::*;
    use serde_json::json;

    fn params(body: Value) -> Result<GenerationParams, ApiError> {
        parse::<GenerationFields>(&body)?.params()
    }

    #[test]
    fn defaults_and_ranges() {
        let p = params(json!({"model": "x", "unknown": [1, 2]})).unwrap();
        assert_eq!(p.sampling, SamplingParams::default());
        assert_eq!(p.max_tokens, None);
        assert_eq!(p.mode, Mode::Default);

        for (body, param) in [
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_k": -1}), "top_k"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_completion_tokens": 1.5}), "max_completion_tokens"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stop": [1]}), "stop[0]"),
            (json!({"stop": "x".repeat(257)}), "stop"),
            (json!({"logit_bias": {"1": "big"}}), "logit_bias.1"),
            (json!({"logit_bias": {"one": 5}}), "logit_bias.one"),
            (json!({"logit_bias": {"1": 101}}), "logit_bias.1"),
            (json!({"logit_bias": [1]}), "logit_bias"),
            (json!({"response_format": {"type": "xml"}}), "response_format.type"),
            (json!({"n": 2}), "n"),
            (json!({"presence_penalty": 3}), "presence_penalty"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"stream": "yes"}), "stream"),
            (json!({"stream_options": {"include_usage": 1}}), "stream_options.include_usage"),
            (json!({"reasoning_effort": "extreme"}), "reasoning_effort"),
            (json!({"reasoning": {"strategy": "magic"}}), "reasoning.strategy"),
            (json!({"reasoning": {"max_thinking_tokens": "many"}}), "reasoning.max_thinking_tokens"),
            (json!({"reasoning": {"stop_temperature": 0.5}}), "reasoning.stop_temperature"),
            (json!({"reasoning": {"stop_temperature": 1e300}}), "reasoning.stop_temperature"),
        ] {
            match params(body.clone()) {
                Err(ApiError::InvalidField { param: p, .. }) | Err(ApiError::Unsupported { param: p, .. }) => {
                    assert_eq!(p, param, "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_max_tokens_past_every_integer_is_refused_by_name() {
        for huge in [json!(18446744073709551615u64), json!(1e30)] {
            match params(json!({ "max_tokens": huge })) {
                Err(ApiError::InvalidField { param, .. }) => assert_eq!(param, "max_tokens"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(params(json!({"max_tokens": 1_000_000_000u64})).unwrap().max_tokens, Some(1_000_000_000));
    }

    #[test]
    fn modes() {
        let p = params(json!({"reasoning_effort": "high", "reasoning": {"strategy": "ts", "ramp": true}})).unwrap();
        assert_eq!(p.mode, Mode::Long);
        assert!(params(json!({"reasoning_effort": "low", "reasoning": {"mode": "long"}})).is_err());
        assert_eq!(mode_of(&json!({"reasoning_effort": "low", "temperature": "bad"})), Mode::Short);
    }

    #[test]
    fn features_terse_lacks_are_refused_by_name() {
        for (body, param) in [
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"function_call": "auto"}), "function_call"),
            (json!({"modalities": ["audio"]}), "modalities"),
            (json!({"prediction": {"type": "content", "content": "x"}}), "prediction"),
        ] {
            match parse::<ChatFields>(&body).unwrap().refuse_unsupported() {
                Err(ApiError::Unsupported { param: p, .. }) => assert_eq!(p, param, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        parse::<ChatFields>(&json!({"modalities": ["text"]})).unwrap().refuse_unsupported().unwrap();
        let chat = |body: Value| parse::<ChatFields>(&body).unwrap().logprobs();
        assert_eq!(chat(json!({"logprobs": true})).unwrap(), Some(0));
        assert_eq!(chat(json!({"logprobs": true, "top_logprobs": 20})).unwrap(), Some(20));
        assert_eq!(chat(json!({"logprobs": false})).unwrap(), None);
        assert!(chat(json!({"top_logprobs": 2})).is_err());
        assert!(chat(json!({"logprobs": true, "top_logprobs": 21})).is_err());
        assert!(chat(json!({"logprobs": true, "top_logprobs": -1})).is_err());
    }

    #[test]
    fn messages() {
        let chat: ChatFields = parse(&json!({"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null},
        ]}))
        .unwrap();
        let msgs = chat.messages().unwrap();
        assert_eq!(msgs[0].role, "system");
        assert_eq!(msgs[1].content, "ab");
        assert_eq!(msgs[2].content, "");
        let chat: ChatFields = parse(&json!({"messages": [
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ]}))
        .unwrap();
        let msgs = chat.messages().unwrap();
        assert_eq!(msgs[0].tool_calls[0].function.arguments, json!({"x": 1}));
        assert_eq!((msgs[1].role.as_str(), msgs[1].tool_call_id.as_deref()), ("tool", Some("c1")));
        for body in [
            json!({"messages": []}),
            json!({"messages": "hi"}),
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            json!({"messages": [{"content": "x"}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}),
            json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}),
            json!({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}),
            json!({"messages": [{"role": "user", "content": null}]}),
            json!({"messages": [{"role": "user"}]}),
            json!({}),
        ] {
            assert!(parse::<ChatFields>(&body).and_then(|c| c.messages()).is_err(), "{body}");
        }
    }

    #[test]
    fn prompts() {
        let p = |v: Value| parse::<CompletionFields>(&json!({ "prompt": v })).unwrap().prompt(100);
        assert_eq!(p(json!("hi")).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(p(json!(["hi"])).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(p(json!([1, 2])).unwrap(), Prompt::Tokens(vec![1, 2]));
        assert_eq!(p(json!([[1, 2]])).unwrap(), Prompt::Tokens(vec![1, 2]));
        assert!(p(json!(["a", "b"])).is_err());
        assert!(p(json!([100])).is_err());
        assert!(p(json!([-1])).is_err());
        assert!(p(json!(5)).is_err());
    }
}

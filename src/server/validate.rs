//! Request checks: every field the API honours is read here from the parsed
//! JSON object, type- and range-checked, and named in the error when it is
//! wrong. Unknown fields are ignored (OpenAI clients send extras).

use crate::reasoning::control::Strategy;
use crate::reasoning::modes::ReasoningOverrides;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::engine::SamplingParams;
use crate::tokenize::ChatMessage;

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

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
    ApiError::field(
        param,
        format!("`{param}` must be {expected}, not {}", json_type_name(got)),
    )
}

/// Typed, optional reads of one JSON object's fields; `null` counts as absent.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    /// Prefix for `param` in errors, e.g. `reasoning.`.
    prefix: String,
}

impl<'a> Fields<'a> {
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Fields {
            map,
            prefix: String::new(),
        }
    }

    fn nested(map: &'a Map<String, Value>, prefix: String) -> Self {
        Fields { map, prefix }
    }

    pub fn param(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(&self.param(name), "a boolean", v)),
        }
    }

    pub fn f64(&self, name: &str) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(ApiError::field(
                    self.param(name),
                    format!("`{}` must be a finite number", self.param(name)),
                )),
            },
            Some(v) => Err(wrong_type(&self.param(name), "a number", v)),
        }
    }

    /// An integer; numbers with a fraction and integers beyond i64 are refused.
    pub fn i64(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    Ok(Some(i))
                } else if n.is_u64() {
                    Ok(Some(i64::MAX))
                } else {
                    Err(ApiError::field(
                        self.param(name),
                        format!("`{}` must be an integer", self.param(name)),
                    ))
                }
            }
            Some(v) => Err(wrong_type(&self.param(name), "an integer", v)),
        }
    }

    pub fn str(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(wrong_type(&self.param(name), "a string", v)),
        }
    }

    pub fn object(&self, name: &str) -> Result<Option<Fields<'a>>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Fields::nested(m, format!("{}.", self.param(name))))),
            Some(v) => Err(wrong_type(&self.param(name), "an object", v)),
        }
    }

    /// A number in `lo..=hi` (bounds inclusive unless `lo_open`).
    fn ranged(&self, name: &str, lo: f64, lo_open: bool, hi: f64) -> Result<Option<f64>, ApiError> {
        let Some(x) = self.f64(name)? else { return Ok(None) };
        let ok = (if lo_open { x > lo } else { x >= lo }) && x <= hi;
        if !ok {
            let open = if lo_open { "(" } else { "[" };
            return Err(ApiError::field(
                self.param(name),
                format!("`{}` must be in {open}{lo}, {hi}], got {x}", self.param(name)),
            ));
        }
        Ok(Some(x))
    }
}

pub use crate::reasoning::modes::Mode;

/// What every generation endpoint reads besides its prompt.
#[derive(Debug, Clone)]
pub struct CommonParams {
    /// `max_completion_tokens`, else `max_tokens`; `None` means "up to the context".
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub mode: Mode,
    /// The request's own `reasoning` fields, merged with the mode's preset at submission.
    pub reasoning: ReasoningOverrides,
}

/// `model` must be absent or the served name.
pub fn check_model(fields: &Fields, served_name: &str) -> Result<(), ApiError> {
    match fields.str("model")? {
        Some(m) if m != served_name => Err(ApiError::ModelNotFound(m.to_string())),
        _ => Ok(()),
    }
}

/// The reasoning mode alone (for metrics labels even when other fields are wrong).
pub fn mode_of(fields: &Fields) -> Mode {
    let effort = fields
        .get("reasoning_effort")
        .and_then(Value::as_str)
        .and_then(Mode::parse);
    let nested = fields
        .get("reasoning")
        .and_then(|r| r.get("mode"))
        .and_then(Value::as_str)
        .and_then(Mode::parse);
    nested.or(effort).unwrap_or(Mode::Default)
}

pub fn common_params(fields: &Fields) -> Result<CommonParams, ApiError> {
    let mut max_tokens = None;
    for name in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = fields.i64(name)? {
            if n < 1 {
                return Err(ApiError::field(name, format!("`{name}` must be at least 1, got {n}")));
            }
            max_tokens = Some(usize::try_from(n).unwrap_or(usize::MAX));
        }
    }

    let temperature = fields.ranged("temperature", 0.0, false, 2.0)?.unwrap_or(1.0);
    let top_p = fields.ranged("top_p", 0.0, true, 1.0)?.unwrap_or(1.0);
    let top_k = match fields.i64("top_k")? {
        None => 0,
        Some(k) if k >= 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(ApiError::field(
                "top_k",
                format!("`top_k` must be >= 0 (0 disables it), got {k}"),
            ))
        }
    };
    let seed = match fields.get("seed") {
        None => None,
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Some(u),
            (None, Some(i)) => Some(i as u64),
            _ => return Err(ApiError::field("seed", "`seed` must be an integer")),
        },
        Some(v) => return Err(wrong_type("seed", "an integer", v)),
    };
    let presence_penalty = fields.ranged("presence_penalty", -2.0, false, 2.0)?.unwrap_or(0.0);
    let frequency_penalty = fields.ranged("frequency_penalty", -2.0, false, 2.0)?.unwrap_or(0.0);
    let repetition_penalty = match fields.f64("repetition_penalty")? {
        None => 1.0,
        Some(r) if r > 0.0 => r,
        Some(r) => {
            return Err(ApiError::field(
                "repetition_penalty",
                format!("`repetition_penalty` must be > 0, got {r}"),
            ))
        }
    };

    let stop = match fields.get("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP_STRINGS {
                return Err(ApiError::field(
                    "stop",
                    format!(
                        "`stop` may hold at most {MAX_STOP_STRINGS} strings, got {}",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(wrong_type(&format!("stop[{i}]"), "a string", other)),
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::field("stop", "stop strings must not be empty"));
    }

    if let Some(n) = fields.i64("n")? {
        if n < 1 {
            return Err(ApiError::field("n", format!("`n` must be at least 1, got {n}")));
        }
        if n > 1 {
            return Err(ApiError::unsupported(
                "n",
                "only n = 1 is supported; send several requests instead",
            ));
        }
    }
    if let Some(b) = fields.i64("best_of")? {
        if b != 1 {
            return Err(ApiError::unsupported("best_of", "only best_of = 1 is supported"));
        }
    }

    let stream = fields.bool("stream")?.unwrap_or(false);
    let include_usage = match fields.object("stream_options")? {
        Some(opts) => opts.bool("include_usage")?.unwrap_or(false),
        None => false,
    };

    let (mode, reasoning) = reasoning_params(fields)?;

    Ok(CommonParams {
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
        stream,
        include_usage,
        mode,
        reasoning,
    })
}

const MODE_VALUES: &str = "short, medium, long, low, high or none";

fn parse_mode(param: &str, s: &str) -> Result<Mode, ApiError> {
    Mode::parse(s).ok_or_else(|| ApiError::field(param, format!("`{param}` must be one of {MODE_VALUES}, got \"{s}\"")))
}

/// `reasoning_effort` and the `reasoning` object, each field checked on its
/// own; [`crate::reasoning::modes::merge`] combines them with the mode's preset.
fn reasoning_params(fields: &Fields) -> Result<(Mode, ReasoningOverrides), ApiError> {
    let effort = fields
        .str("reasoning_effort")?
        .map(|s| parse_mode("reasoning_effort", s))
        .transpose()?;
    let Some(r) = fields.object("reasoning")? else {
        return Ok((effort.unwrap_or(Mode::Default), ReasoningOverrides::default()));
    };
    let mode = r.str("mode")?.map(|s| parse_mode(&r.param("mode"), s)).transpose()?;
    if let (Some(a), Some(b)) = (effort, mode) {
        if a != b {
            return Err(ApiError::field(
                "reasoning.mode",
                format!(
                    "`reasoning.mode` ({}) contradicts `reasoning_effort` ({})",
                    b.label(),
                    a.label()
                ),
            ));
        }
    }
    let strategy = match r.str("strategy")? {
        None => None,
        Some(s) => Some(Strategy::parse(s).ok_or_else(|| {
            ApiError::field(
                r.param("strategy"),
                format!("`reasoning.strategy` must be one of ts, budget or none, got \"{s}\""),
            )
        })?),
    };
    let stop_temperature = r.f64("stop_temperature")?;
    if let Some(t) = stop_temperature {
        if !(t >= 1.0) || !t.is_finite() {
            return Err(ApiError::field(
                r.param("stop_temperature"),
                format!("`reasoning.stop_temperature` must be a finite number >= 1, got {t}"),
            ));
        }
    }
    let ramp = r.bool("ramp")?;
    let mut bounds = [None, None];
    for (slot, name) in bounds.iter_mut().zip(["min_thinking_tokens", "max_thinking_tokens"]) {
        if let Some(n) = r.i64(name)? {
            if n < 0 {
                return Err(ApiError::field(
                    r.param(name),
                    format!("`{}` must be >= 0, got {n}", r.param(name)),
                ));
            }
            *slot = Some(n as usize);
        }
    }
    let [min_thinking_tokens, max_thinking_tokens] = bounds;
    let overrides = ReasoningOverrides {
        strategy,
        stop_temperature: stop_temperature.map(|t| t as f32),
        ramp,
        max_thinking_tokens,
        min_thinking_tokens,
    };
    Ok((mode.or(effort).unwrap_or(Mode::Default), overrides))
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// `messages` of a chat request, with `content` flattened to text. `developer`
/// becomes `system`, which is what chat templates know.
pub fn chat_messages(fields: &Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match fields.get("messages") {
        None => return Err(ApiError::field("messages", "`messages` is required")),
        Some(Value::Array(items)) => items,
        Some(v) => return Err(wrong_type("messages", "an array of messages", v)),
    };
    if items.is_empty() {
        return Err(ApiError::field("messages", "`messages` must hold at least one message"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let param = format!("messages[{i}]");
            let Value::Object(map) = item else {
                return Err(wrong_type(&param, "an object", item));
            };
            let msg = Fields::nested(map, format!("{param}."));
            let role = match msg.str("role")? {
                None => {
                    return Err(ApiError::field(
                        msg.param("role"),
                        format!("`{}` is required", msg.param("role")),
                    ))
                }
                Some(r) if ROLES.contains(&r) => r,
                Some(r) => {
                    return Err(ApiError::field(
                        msg.param("role"),
                        format!("unknown role \"{r}\"; expected one of {}", ROLES.join(", ")),
                    ))
                }
            };
            let content = message_content(&msg)?;
            let role = if role == "developer" { "system" } else { role };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

fn message_content(msg: &Fields) -> Result<String, ApiError> {
    let param = msg.param("content");
    match msg.get("content") {
        // Assistant turns that only called tools carry no content.
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let pparam = format!("{param}[{j}]");
                let Value::Object(map) = part else {
                    return Err(wrong_type(&pparam, "an object", part));
                };
                let part = Fields::nested(map, format!("{pparam}."));
                match part.str("type")? {
                    Some("text") => {}
                    Some(other) => {
                        return Err(ApiError::unsupported(
                            part.param("type"),
                            format!("content parts of type \"{other}\" are not supported; only \"text\""),
                        ))
                    }
                    None => {
                        return Err(ApiError::field(
                            part.param("type"),
                            format!("`{}` is required", part.param("type")),
                        ))
                    }
                }
                match part.str("text")? {
                    Some(t) => text.push_str(t),
                    None => {
                        return Err(ApiError::field(
                            part.param("text"),
                            format!("`{}` is required", part.param("text")),
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(v) => Err(wrong_type(&param, "a string or an array of content parts", v)),
    }
}

/// The `prompt` of a text completion.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

pub fn completion_prompt(fields: &Fields, vocab_size: usize) -> Result<Prompt, ApiError> {
    let one_only = || ApiError::unsupported("prompt", "only one prompt per request is supported");
    match fields.get("prompt") {
        None => Err(ApiError::field("prompt", "`prompt` is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(items)) => match items.as_slice() {
            [] => Err(ApiError::field("prompt", "`prompt` must not be an empty array")),
            [Value::String(s)] => Ok(Prompt::Text(s.clone())),
            [Value::Array(ids)] => token_ids(ids, vocab_size, "prompt[0]"),
            [Value::String(_) | Value::Array(_), ..] => Err(one_only()),
            [Value::Number(_), ..] => token_ids(items, vocab_size, "prompt"),
            [v, ..] => Err(wrong_type(
                "prompt[0]",
                "a string, a token id or an array of token ids",
                v,
            )),
        },
        Some(v) => Err(wrong_type(
            "prompt",
            "a string, an array of one string or an array of token ids",
            v,
        )),
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
            None => Err(ApiError::field(
                format!("{param}[{i}]"),
                "token ids must be non-negative integers",
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Prompt::Tokens)
}

/// Features that would change the response's shape and that terse does not have.
pub fn refuse_unsupported(fields: &Fields, chat: bool) -> Result<(), ApiError> {
    if chat {
        if fields.bool("logprobs")?.unwrap_or(false) {
            return Err(ApiError::unsupported("logprobs", "logprobs are not supported"));
        }
    } else {
        if fields.get("logprobs").is_some_and(|v| v.as_i64() != Some(0)) {
            return Err(ApiError::unsupported("logprobs", "logprobs are not supported"));
        }
        if fields.bool("echo")?.unwrap_or(false) {
            return Err(ApiError::unsupported("echo", "echo is not supported"));
        }
        if fields.str("suffix")?.is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::unsupported("suffix", "suffix is not supported"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_and_ranges() {
        let m = obj(json!({"model": "x", "unknown": [1, 2]}));
        let p = common_params(&Fields::new(&m)).unwrap();
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
            (json!({"n": 2}), "n"),
            (json!({"presence_penalty": 3}), "presence_penalty"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"stream": "yes"}), "stream"),
            (
                json!({"stream_options": {"include_usage": 1}}),
                "stream_options.include_usage",
            ),
            (json!({"reasoning_effort": "extreme"}), "reasoning_effort"),
            (json!({"reasoning": {"strategy": "magic"}}), "reasoning.strategy"),
            (
                json!({"reasoning": {"max_thinking_tokens": "many"}}),
                "reasoning.max_thinking_tokens",
            ),
            (
                json!({"reasoning": {"stop_temperature": 0.5}}),
                "reasoning.stop_temperature",
            ),
        ] {
            let m = obj(body.clone());
            match common_params(&Fields::new(&m)) {
                Err(ApiError::InvalidField { param: p, .. }) | Err(ApiError::Unsupported { param: p, .. }) => {
                    assert_eq!(p, param, "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn huge_max_tokens_saturates() {
        let m = obj(json!({"max_tokens": 18446744073709551615u64}));
        assert_eq!(
            common_params(&Fields::new(&m)).unwrap().max_tokens,
            Some(i64::MAX as usize)
        );
    }

    #[test]
    fn modes() {
        let m = obj(json!({"reasoning_effort": "high", "reasoning": {"strategy": "ts", "ramp": true}}));
        assert_eq!(common_params(&Fields::new(&m)).unwrap().mode, Mode::Long);
        let m = obj(json!({"reasoning_effort": "low", "reasoning": {"mode": "long"}}));
        assert!(common_params(&Fields::new(&m)).is_err());
    }

    #[test]
    fn messages() {
        let m = obj(json!({"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null},
        ]}));
        let msgs = chat_messages(&Fields::new(&m)).unwrap();
        assert_eq!(msgs[0].role, "system");
        assert_eq!(msgs[1].content, "ab");
        assert_eq!(msgs[2].content, "");
        for body in [
            json!({"messages": []}),
            json!({"messages": "hi"}),
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            json!({"messages": [{"content": "x"}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ] {
            assert!(chat_messages(&Fields::new(&obj(body.clone()))).is_err(), "{body}");
        }
    }

    #[test]
    fn prompts() {
        let p = |v: Value| completion_prompt(&Fields::new(&obj(json!({ "prompt": v }))), 100);
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

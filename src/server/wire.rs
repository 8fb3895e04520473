//! The generation requests as types: what each endpoint reads from its JSON
//! body, deserialized with serde, so the schema exists once, as code.
//!
//! A body is read twice from the same parsed JSON: once as the fields every
//! generation endpoint shares ([`GenerationFields`]), once as the endpoint's
//! own ([`ChatFields`], [`CompletionFields`]); what terse does with each
//! field is listed in [`SHARED_FIELDS`], [`CHAT_FIELDS`] and
//! [`COMPLETION_FIELDS`], and a field none of them names is refused. Range checks, refusals and defaults are methods in
//! `validate.rs`. A deserialization error names its field by its dotted path
//! (`messages[0].role`, `reasoning.strategy`), as [`ApiError::field`] expects.

use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::reasoning::modes::{Mode, ReasoningFields};

/// What terse does with a top-level request field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldUse {
    /// It changes the reply as OpenAI says (some values may still be refused,
    /// e.g. `n` > 1, each with a 400 naming the field).
    Honoured,
    /// OpenAI defines it, and it changes nothing terse generates: accepted
    /// and ignored (the end user's id, metadata, storage and tier hints).
    Ignored,
    /// OpenAI defines it and terse does not have it: any value that asks for
    /// something is a 400 naming the field.
    Refused,
}

use FieldUse::{Honoured, Ignored, Refused};

/// Every top-level field both generation endpoints read. A field in neither
/// this list nor the endpoint's own is a 400 naming it, as with OpenAI.
pub const SHARED_FIELDS: &[(&str, FieldUse)] = &[
    ("model", Honoured),
    ("max_tokens", Honoured),
    ("max_completion_tokens", Honoured),
    ("temperature", Honoured),
    ("top_p", Honoured),
    ("top_k", Honoured),
    ("seed", Honoured),
    ("stop", Honoured),
    ("n", Honoured),
    ("stream", Honoured),
    ("stream_options", Honoured),
    ("presence_penalty", Honoured),
    ("frequency_penalty", Honoured),
    ("repetition_penalty", Honoured),
    ("reasoning_effort", Honoured),
    ("reasoning", Honoured),
    ("response_format", Honoured),
    ("logit_bias", Honoured),
    ("speculate", Honoured),
    ("user", Ignored),
    ("metadata", Ignored),
    ("store", Ignored),
    ("service_tier", Ignored),
    ("prompt_cache_key", Ignored),
    ("safety_identifier", Ignored),
];

/// `POST /v1/chat/completions`' own top-level fields.
pub const CHAT_FIELDS: &[(&str, FieldUse)] = &[
    ("messages", Honoured),
    ("logprobs", Honoured),
    ("top_logprobs", Honoured),
    ("tools", Honoured),
    ("tool_choice", Honoured),
    ("parallel_tool_calls", Honoured),
    ("functions", Refused),
    ("function_call", Refused),
    ("modalities", Refused),
    ("audio", Refused),
    ("prediction", Refused),
    ("web_search_options", Refused),
    ("verbosity", Refused),
];

/// `POST /v1/completions`' own top-level fields.
pub const COMPLETION_FIELDS: &[(&str, FieldUse)] =
    &[("prompt", Honoured), ("logprobs", Honoured), ("best_of", Honoured), ("echo", Honoured), ("suffix", Refused)];

/// A body's fields that neither list names: the first is a 400.
pub fn refuse_unknown_fields(body: &Value, lists: &[&[(&str, FieldUse)]]) -> Result<(), ApiError> {
    let Some(map) = body.as_object() else { return Ok(()) };
    for key in map.keys() {
        if !lists.iter().any(|list| list.iter().any(|(name, _)| name == key)) {
            return Err(ApiError::field(key.clone(), format!("unknown field `{key}`")));
        }
    }
    Ok(())
}

/// What every generation endpoint reads besides its prompt. `null` is the same
/// as absent.
#[derive(Debug, Default, Deserialize)]
pub struct GenerationFields {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    /// An integer; a negative one is taken as its two's-complement u64.
    pub seed: Option<i128>,
    pub stop: Option<StopStrings>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub reasoning_effort: Option<Mode>,
    pub reasoning: Option<ReasoningFields>,
    pub response_format: Option<Value>,
    pub logit_bias: Option<Value>,
    /// terse's own: `false` keeps this request out of speculative decoding.
    pub speculate: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// OpenAI's padding of stream chunks against length side channels; not needed here.
    pub include_obfuscation: Option<bool>,
}

/// A field that is one string or a list of `T`.
enum TextOr<T> {
    Text(String),
    List(Vec<T>),
}

fn text_or_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D, expecting: &'static str) -> Result<TextOr<T>, D::Error> {
    struct TextOrList<T>(&'static str, std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for TextOrList<T> {
        type Value = TextOr<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            Ok(TextOr::Text(s.to_string()))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut all = Vec::new();
            while let Some(item) = seq.next_element::<T>()? {
                all.push(item);
            }
            Ok(TextOr::List(all))
        }
    }
    d.deserialize_any(TextOrList(expecting, std::marker::PhantomData))
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq)]
pub struct StopStrings(pub Vec<String>);

impl<'de> Deserialize<'de> for StopStrings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(StopStrings(match text_or_list(d, "a string or an array of strings")? {
            TextOr::Text(one) => vec![one],
            TextOr::List(all) => all,
        }))
    }
}

/// `POST /v1/chat/completions`' own fields.
#[derive(Debug, Default, Deserialize)]
pub struct ChatFields {
    pub messages: Option<Vec<WireMessage>>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// Read by `tool_calls.rs`.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
    /// The deprecated form of tools: refused, naming `tools` instead.
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    /// Refused when they ask for anything (`validate.rs`).
    pub modalities: Option<Value>,
    pub audio: Option<Value>,
    pub prediction: Option<Value>,
    pub web_search_options: Option<Value>,
    pub verbosity: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a message object")]
pub struct WireMessage {
    pub role: Option<String>,
    pub content: Option<MessageContent>,
    /// Calls an assistant turn made.
    pub tool_calls: Option<Vec<WireToolCall>>,
    /// Which call a `tool` turn answers.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// A call in the history, as OpenAI sends it: the arguments as JSON text.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(expecting = "a tool call object")]
pub struct WireToolCall {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: Option<WireFunctionCall>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(expecting = "an object")]
pub struct WireFunctionCall {
    pub name: Option<String>,
    pub arguments: Option<String>,
}

/// A message's `content`: text, or a list of content parts.
#[derive(Debug, Clone, PartialEq)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match text_or_list(d, "a string or an array of content parts")? {
            TextOr::Text(text) => MessageContent::Text(text),
            TextOr::List(parts) => MessageContent::Parts(parts),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(expecting = "an object")]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub text: Option<String>,
}

/// `POST /v1/completions`' own fields.
#[derive(Debug, Default, Deserialize)]
pub struct CompletionFields {
    /// A string, one string in an array, or token ids (checked in `validate.rs`).
    pub prompt: Option<Value>,
    pub logprobs: Option<Value>,
    pub best_of: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
}

/// Deserialize `T` from a parsed body (or part of one), naming the field at fault.
pub fn parse<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = dotted(e.path());
        field_error(&path, &e.into_inner().to_string())
    })
}

/// `messages[0].content`, `reasoning.strategy`: the path as `param` names fields.
fn dotted(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            _ => {}
        }
    }
    out
}

/// serde's message at `path`, in the words the rest of the API uses:
/// "`temperature` must be a number, not a string".
fn field_error(path: &str, message: &str) -> ApiError {
    // An unknown key of a strict object (`reasoning`) is named by its own
    // path (which the path already ends with).
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let param = if path.is_empty() || path == name || path.ends_with(&format!(".{name}")) {
            if path.is_empty() { name.to_string() } else { path.to_string() }
        } else {
            format!("{path}.{name}")
        };
        let expected = expected.trim_start_matches(", ");
        return ApiError::field(param.clone(), format!("unknown field `{param}`; {expected}"));
    }
    let shown = if path.is_empty() { "the body".to_string() } else { format!("`{path}`") };
    let text = if let Some(rest) = message.strip_prefix("invalid type: ") {
        match rest.split_once(", expected ") {
            Some((got, expected)) => format!("{shown} must be {}, not {}", expected_kind(expected), got_kind(got)),
            None => format!("{shown}: {message}"),
        }
    } else if let Some(rest) = message.strip_prefix("invalid value: ") {
        match rest.split_once(", expected ") {
            Some((got, expected)) => format!("{shown} must be {}, got {}", expected_kind(expected), got_value(got)),
            None => format!("{shown}: {message}"),
        }
    } else if message.starts_with("must ") {
        format!("{shown} {message}")
    } else {
        format!("{shown}: {message}")
    };
    ApiError::field(path, text)
}

/// serde's name for what it expected, as a JSON type.
fn expected_kind(expected: &str) -> &str {
    match expected {
        "f32" | "f64" => "a number",
        "i8" | "i16" | "i32" | "i64" | "i128" | "u8" | "u16" | "u32" | "u64" | "u128" => "an integer",
        "usize" => "a non-negative integer",
        "a sequence" => "an array",
        other if other.starts_with("struct ") || other == "a map" => "an object",
        other => other,
    }
}

/// serde's description of the value it got, as a JSON type.
fn got_kind(got: &str) -> &str {
    let word = got.split([' ', '`']).next().unwrap_or(got);
    match word {
        "string" => "a string",
        "integer" | "floating" => "a number",
        "boolean" => "a boolean",
        "sequence" => "an array",
        "map" => "an object",
        "null" | "unit" => "null",
        _ => got,
    }
}

/// The value of "integer `-5`": `-5`.
fn got_value(got: &str) -> &str {
    got.split('`').nth(1).unwrap_or(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn param_of<T: DeserializeOwned + std::fmt::Debug>(body: Value) -> (String, String) {
        match parse::<T>(&body) {
            Err(ApiError::InvalidField { param, message }) => (param, message),
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field_by_its_path() {
        let cases = [
            (json!({"temperature": "hot"}), "temperature", "`temperature` must be a number, not a string"),
            (json!({"max_tokens": 1.5}), "max_tokens", "`max_tokens` must be an integer, not a number"),
            (json!({"stream": "yes"}), "stream", "`stream` must be a boolean, not a string"),
            (json!({"stop": [1]}), "stop[0]", "`stop[0]` must be a string, not a number"),
            (json!({"stop": {}}), "stop", "`stop` must be a string or an array of strings, not an object"),
            (json!({"stream_options": {"include_usage": 1}}), "stream_options.include_usage", "`stream_options.include_usage` must be a boolean, not a number"),
            (json!({"reasoning": "lots"}), "reasoning", "`reasoning` must be an object, not a string"),
            (json!({"reasoning": {"strategy": "magic"}}), "reasoning.strategy", "`reasoning.strategy` must be one of ts, budget, probe or none, got \"magic\""),
            (json!({"reasoning": {"max_thinking_tokens": -5}}), "reasoning.max_thinking_tokens", "`reasoning.max_thinking_tokens` must be a non-negative integer, got -5"),
            (json!({"reasoning_effort": "extreme"}), "reasoning_effort", "`reasoning_effort` must be one of short, medium, long, low, high or none, got \"extreme\""),
        ];
        for (body, param, message) in cases {
            assert_eq!(param_of::<GenerationFields>(body.clone()), (param.to_string(), message.to_string()), "{body}");
        }
        let (param, message) = param_of::<GenerationFields>(json!({"reasoning": {"max_thinking_token": 5}}));
        assert_eq!(param, "reasoning.max_thinking_token");
        assert!(message.starts_with("unknown field `reasoning.max_thinking_token`; expected one of"), "{message}");
        assert_eq!(param_of::<ChatFields>(json!({"messages": [{"role": 5}]})).0, "messages[0].role");
        assert_eq!(param_of::<ChatFields>(json!({"messages": ["hi"]})).0, "messages[0]");
        assert_eq!(param_of::<ChatFields>(json!({"messages": [{"content": [{"type": 1}]}]})).0, "messages[0].content[0].type");
        assert_eq!(param_of::<ChatFields>(json!({"messages": [{"content": 7}]})).0, "messages[0].content");
    }

    #[test]
    fn unknown_top_level_fields_and_nulls_are_absent() {
        let fields: GenerationFields = parse(&json!({"frobnicate": [1], "user": "x", "temperature": null, "stop": "END"})).unwrap();
        assert_eq!((fields.temperature, fields.stop), (None, Some(StopStrings(vec!["END".into()]))));
        let chat: ChatFields = parse(&json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}], "name": "n"}]})).unwrap();
        let message = &chat.messages.unwrap()[0];
        assert_eq!(message.content, Some(MessageContent::Parts(vec![ContentPart { kind: Some("text".into()), text: Some("a".into()) }])));
    }
}

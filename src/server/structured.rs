//! Structured outputs: `response_format` read and checked, and turned into
//! the grammar (`llguidance`) that holds the answer.

use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};

use super::error::ApiError;
use super::validate::json_type_name;
use crate::engine::{Constraint, ConstraintKind, EngineHandle};

/// Largest schema a request may give, as JSON text.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Deepest nesting of arrays and objects a schema may have.
pub const MAX_SCHEMA_DEPTH: usize = 32;

/// What `response_format` asks the answer to be.
#[derive(Debug, Clone, PartialEq)]
pub enum AnswerFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON that validates against `schema` (OpenAI's `strict` or not: the
    /// grammar holds it either way).
    JsonSchema { schema: Value },
}

/// `response_format`: `text` (or absent) is `None`.
pub fn response_format(value: Option<&Value>) -> Result<Option<AnswerFormat>, ApiError> {
    let Some(format) = value.filter(|v| !v.is_null()) else { return Ok(None) };
    let Some(object) = format.as_object() else {
        return Err(ApiError::field("response_format", format!("`response_format` must be an object, not {}", json_type_name(format))));
    };
    match object.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(AnswerFormat::JsonObject)),
        Some("json_schema") => {
            let Some(spec) = object.get("json_schema").and_then(Value::as_object) else {
                return Err(ApiError::field("response_format.json_schema", "`response_format.json_schema` must be an object with `name` and `schema`"));
            };
            match spec.get("name") {
                Some(Value::String(_)) | None => {}
                Some(v) => {
                    return Err(ApiError::field(
                        "response_format.json_schema.name",
                        format!("`response_format.json_schema.name` must be a string, not {}", json_type_name(v)),
                    ))
                }
            }
            if let Some(v) = spec.get("strict").filter(|v| !v.is_null() && !v.is_boolean()) {
                return Err(ApiError::field(
                    "response_format.json_schema.strict",
                    format!("`response_format.json_schema.strict` must be a boolean, not {}", json_type_name(v)),
                ));
            }
            let schema = match spec.get("schema") {
                None | Some(Value::Null) => json!({}),
                Some(schema @ (Value::Object(_) | Value::Bool(true))) => schema.clone(),
                Some(v) => {
                    return Err(ApiError::field(
                        "response_format.json_schema.schema",
                        format!("`response_format.json_schema.schema` must be a JSON schema object, not {}", json_type_name(v)),
                    ))
                }
            };
            check_size("response_format.json_schema.schema", &schema)?;
            Ok(Some(AnswerFormat::JsonSchema { schema }))
        }
        Some(other) => Err(ApiError::unsupported(
            "response_format.type",
            format!("`response_format.type` \"{other}\" is not supported; use \"text\", \"json_object\" or \"json_schema\""),
        )),
        None => Err(ApiError::field("response_format.type", "`response_format.type` is required")),
    }
}

/// A schema within [`MAX_SCHEMA_BYTES`] and [`MAX_SCHEMA_DEPTH`].
pub fn check_size(param: &str, schema: &Value) -> Result<(), ApiError> {
    let bytes = serde_json::to_string(schema).map_or(usize::MAX, |s| s.len());
    if bytes > MAX_SCHEMA_BYTES {
        return Err(ApiError::field(param, format!("`{param}` is {bytes} bytes of JSON; at most {MAX_SCHEMA_BYTES} are allowed")));
    }
    let depth = depth_of(schema);
    if depth > MAX_SCHEMA_DEPTH {
        return Err(ApiError::field(param, format!("`{param}` nests {depth} levels deep; at most {MAX_SCHEMA_DEPTH} are allowed")));
    }
    Ok(())
}

fn depth_of(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth_of).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth_of).max().unwrap_or(0),
        _ => 0,
    }
}

/// How the answer's JSON is laid out: one space after `,` and `:`, no
/// other whitespace (a small model left free to add whitespace can loop on
/// newlines), as Python's `json.dumps` writes it.
pub fn json_layout(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert(json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
    }
    schema
}

impl AnswerFormat {
    pub fn kind(&self) -> ConstraintKind {
        match self {
            AnswerFormat::JsonObject => ConstraintKind::JsonObject,
            AnswerFormat::JsonSchema { .. } => ConstraintKind::JsonSchema,
        }
    }

    fn grammar(&self) -> TopLevelGrammar {
        let schema = match self {
            AnswerFormat::JsonObject => json!({"type": "object"}),
            AnswerFormat::JsonSchema { schema: Value::Bool(true) } => json!({}),
            AnswerFormat::JsonSchema { schema } => schema.clone(),
        };
        TopLevelGrammar::from_json_schema(json_layout(schema))
    }

    /// The compiled grammar (blocking: a large schema takes milliseconds).
    pub fn compile(&self, engine: &EngineHandle) -> Result<Constraint, ApiError> {
        compile(engine, self.kind(), self.grammar(), "response_format.json_schema.schema")
    }
}

/// `grammar` compiled for the engine's vocabulary; a grammar llguidance
/// refuses is the request's fault, named by `param`.
pub fn compile(engine: &EngineHandle, kind: ConstraintKind, grammar: TopLevelGrammar, param: &str) -> Result<Constraint, ApiError> {
    let compiler = engine.grammar_compiler().map_err(|e| ApiError::unsupported(param, e.to_string()))?;
    let matcher = compiler.compile(grammar).map_err(|e| ApiError::field(param, format!("`{param}` cannot be used: {e}")))?;
    Ok(Constraint { kind, matcher, may_open_thought: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(v: Value) -> String {
        match response_format(Some(&v)) {
            Err(ApiError::InvalidField { param, .. } | ApiError::Unsupported { param, .. }) => param,
            other => panic!("{v}: {other:?}"),
        }
    }

    #[test]
    fn formats_and_their_errors() {
        assert_eq!(response_format(None).unwrap(), None);
        assert_eq!(response_format(Some(&json!({"type": "text"}))).unwrap(), None);
        assert_eq!(response_format(Some(&json!({"type": "json_object"}))).unwrap(), Some(AnswerFormat::JsonObject));
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            response_format(Some(&json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}))).unwrap(),
            Some(AnswerFormat::JsonSchema { schema })
        );
        assert_eq!(param_of(json!({"type": "yaml"})), "response_format.type");
        assert_eq!(param_of(json!({})), "response_format.type");
        assert_eq!(param_of(json!("json")), "response_format");
        assert_eq!(param_of(json!({"type": "json_schema"})), "response_format.json_schema");
        assert_eq!(param_of(json!({"type": "json_schema", "json_schema": {"schema": 5}})), "response_format.json_schema.schema");
        assert_eq!(param_of(json!({"type": "json_schema", "json_schema": {"strict": "yes", "schema": {}}})), "response_format.json_schema.strict");
    }

    #[test]
    fn schemas_too_deep_or_too_large_are_refused() {
        let mut deep = json!({"type": "string"});
        for _ in 0..40 {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(check_size("s", &deep).unwrap_err().to_string().contains("levels deep"));
        let wide = json!({"enum": vec!["x".repeat(100); 1000]});
        assert!(check_size("s", &wide).unwrap_err().to_string().contains("bytes"));
        check_size("s", &json!({"type": "object"})).unwrap();
    }
}

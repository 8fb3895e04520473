//! Tool calling: the request's `tools` and `tool_choice` read and checked,
//! the model's own call syntax chosen from its chat template, the grammar
//! that forces a call (`required`, a named function), and the parser that
//! finds calls in what the model wrote.
//!
//! | family | chat templates | a call as the model writes it |
//! |---|---|---|
//! | `hermes` | Qwen2.5, Qwen3, Hermes: the template writes `<tool_call>` | `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`, one block per call |
//! | `llama3_json` | Llama 3.1 / 3.2: the template asks for `"parameters"` | `{"name": "f", "parameters": {...}}`, the whole answer, one call |
//! | `generic` | templates that do not take `tools` (SmolLM2, Gemma 3) | as `hermes`; terse describes the tools in the system message itself |

use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};

use super::error::ApiError;
use super::structured::{check_size, json_layout};
use super::validate::json_type_name;

/// How the model writes a call (see the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFamily {
    Hermes,
    Llama3Json,
    Generic,
}

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
/// Most calls a forced reply may hold with `parallel_tool_calls`.
const MAX_PARALLEL_CALLS: usize = 8;

impl ToolFamily {
    /// From the chat template's source: what it writes for tools, if anything.
    pub fn of_template(source: Option<&str>) -> Result<ToolFamily, ApiError> {
        let Some(source) = source.filter(|s| s.contains("tools")) else { return Ok(ToolFamily::Generic) };
        if source.contains(CALL_OPEN) {
            Ok(ToolFamily::Hermes)
        } else if source.contains("\"parameters\"") || source.contains(PYTHON_TAG) {
            Ok(ToolFamily::Llama3Json)
        } else {
            Err(ApiError::unsupported("tools", "this model's chat template writes tool calls in a syntax terse does not know"))
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ToolFamily::Hermes => "hermes",
            ToolFamily::Llama3Json => "llama3_json",
            ToolFamily::Generic => "generic",
        }
    }

    /// Whether the template renders `tools` and tool turns itself.
    pub fn template_takes_tools(&self) -> bool {
        *self != ToolFamily::Generic
    }

    fn arguments_key(&self) -> &'static str {
        match self {
            ToolFamily::Llama3Json => "parameters",
            _ => "arguments",
        }
    }
}

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of its arguments (an object schema).
    pub parameters: Value,
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// The model may not call (the tools are not shown to it).
    None,
    /// The model decides; calls are parsed from what it writes.
    Auto,
    /// The reply is one or more calls (a grammar forces them).
    Required,
    /// The reply is a call of this function.
    Named(String),
}

/// The request's tools, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    pub functions: Vec<Function>,
    /// The `tools` array as sent, for the chat template.
    pub wire: Vec<Value>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl ToolRequest {
    /// `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tool
    /// may be called (no tools, or `tool_choice: "none"`).
    pub fn parse(tools: Option<&Value>, choice: Option<&Value>, parallel: Option<&Value>) -> Result<Option<ToolRequest>, ApiError> {
        let items = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items.clone(),
            Some(v) => return Err(ApiError::field("tools", format!("`tools` must be an array, not {}", json_type_name(v)))),
        };
        let functions = items.iter().enumerate().map(|(i, t)| function(i, t)).collect::<Result<Vec<_>, _>>()?;
        for (i, f) in functions.iter().enumerate() {
            if functions[..i].iter().any(|g| g.name == f.name) {
                return Err(ApiError::field(format!("tools[{i}].function.name"), format!("two tools are named \"{}\"", f.name)));
            }
        }
        let choice = match choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::field("tool_choice", format!("`tool_choice` must be none, auto, required or a function, got \"{other}\"")))
                }
            },
            Some(Value::Object(o)) => {
                let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
                match (o.get("type").and_then(Value::as_str), name) {
                    (Some("function"), Some(name)) => ToolChoice::Named(name.to_string()),
                    _ => return Err(ApiError::field("tool_choice", "`tool_choice` must be {\"type\": \"function\", \"function\": {\"name\": ...}}")),
                }
            }
            Some(v) => return Err(ApiError::field("tool_choice", format!("`tool_choice` must be a string or an object, not {}", json_type_name(v)))),
        };
        let parallel = match parallel {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(ApiError::field("parallel_tool_calls", format!("`parallel_tool_calls` must be a boolean, not {}", json_type_name(v)))),
        };
        match (&choice, functions.is_empty()) {
            (ToolChoice::None, _) => return Ok(None),
            (ToolChoice::Auto, true) => return Ok(None),
            (ToolChoice::Required | ToolChoice::Named(_), true) => {
                return Err(ApiError::field("tool_choice", "`tool_choice` asks for a call but `tools` is empty"))
            }
            (ToolChoice::Named(name), false) if !functions.iter().any(|f| &f.name == name) => {
                return Err(ApiError::field("tool_choice", format!("`tool_choice` names \"{name}\", which is not in `tools`")))
            }
            _ => {}
        }
        Ok(Some(ToolRequest { functions, wire: items, choice, parallel }))
    }

    /// The grammar of a forced reply (`required`, a named function); `None` for `auto`.
    pub fn grammar(&self, family: ToolFamily) -> Option<TopLevelGrammar> {
        let allowed: Vec<&Function> = match &self.choice {
            ToolChoice::Required => self.functions.iter().collect(),
            ToolChoice::Named(name) => self.functions.iter().filter(|f| &f.name == name).collect(),
            ToolChoice::None | ToolChoice::Auto => return None,
        };
        let key = family.arguments_key();
        let mut rules = Vec::new();
        let bodies: Vec<String> = allowed
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let head = lark_literal(&format!("{{\"name\": \"{}\", \"{key}\": ", escape_json_text(&f.name)));
                rules.push(format!("args{i}: %json {}", json_layout(f.parameters.clone())));
                format!("{head} args{i} \"}}\"")
            })
            .collect();
        rules.insert(0, format!("body: {}", bodies.join(" | ")));
        let start = match family {
            ToolFamily::Llama3Json => "start: body".to_string(),
            ToolFamily::Hermes | ToolFamily::Generic => {
                let call = format!("call: {} body {}", lark_literal(&format!("{CALL_OPEN}\n")), lark_literal(&format!("\n{CALL_CLOSE}")));
                rules.push(call);
                if self.parallel {
                    format!("start: call (\"\\n\" call){{0,{}}}", MAX_PARALLEL_CALLS - 1)
                } else {
                    "start: call".to_string()
                }
            }
        };
        rules.insert(0, start);
        Some(TopLevelGrammar::from_lark(rules.join("\n")))
    }

    /// The system text that shows the tools to a model whose template does not.
    pub fn generic_system_text(&self) -> String {
        let mut text = String::from(
            "You can call functions. These are the functions you can call, as JSON schemas:\n<tools>\n",
        );
        for t in &self.wire {
            text.push_str(&t.to_string());
            text.push('\n');
        }
        text.push_str(
            "</tools>\nTo call one, reply with a JSON object holding its name and its arguments between tags:\n\
             <tool_call>\n{\"name\": \"NAME\", \"arguments\": {...}}\n</tool_call>",
        );
        text
    }
}

/// `tools[i]`: `{"type": "function", "function": {"name", "description", "parameters"}}`.
fn function(i: usize, tool: &Value) -> Result<Function, ApiError> {
    let param = |name: &str| format!("tools[{i}].{name}");
    let Some(tool) = tool.as_object() else { return Err(ApiError::field(format!("tools[{i}]"), format!("`tools[{i}]` must be an object"))) };
    match tool.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => return Err(ApiError::unsupported(param("type"), format!("tools of type \"{other}\" are not supported; only \"function\""))),
        None => return Err(ApiError::field(param("type"), format!("`{}` is required", param("type")))),
    }
    let Some(f) = tool.get("function").and_then(Value::as_object) else {
        return Err(ApiError::field(param("function"), format!("`{}` must be an object", param("function"))));
    };
    let name = match f.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => n.to_string(),
        _ => {
            return Err(ApiError::field(
                param("function.name"),
                format!("`{}` must be 1 to 64 letters, digits, underscores or dashes", param("function.name")),
            ))
        }
    };
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(v) => {
            return Err(ApiError::field(param("function.parameters"), format!("`{}` must be a JSON schema object, not {}", param("function.parameters"), json_type_name(v))))
        }
    };
    check_size(&param("function.parameters"), &parameters)?;
    let description = f.get("description").and_then(Value::as_str).map(str::to_string);
    Ok(Function { name, description, parameters })
}

/// `text` as a lark string literal (lark reads them as JSON strings).
fn lark_literal(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// `text` escaped for use inside a JSON string.
fn escape_json_text(text: &str) -> String {
    let quoted = serde_json::to_string(text).expect("a string serializes");
    quoted[1..quoted.len() - 1].to_string()
}

/// A call found in the model's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as a JSON text (OpenAI's shape).
    pub arguments: String,
}

/// What the parser hands on: answer text, or a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Call(ParsedCall),
}

/// Finds calls in the answer as it streams: text that may be the start of a
/// call is held back until it is one or is not.
#[derive(Debug)]
pub struct CallParser {
    family: ToolFamily,
    names: Vec<String>,
    /// `parallel_tool_calls`: without it, a block after the first call stays text.
    parallel: bool,
    /// Text not yet handed on.
    held: String,
    /// Inside a `<tool_call>` block.
    in_call: bool,
    /// Only whitespace so far, or (`bare`) a JSON object that may be a call:
    /// a Llama 3 call is the whole answer, and small models of the other
    /// families often write a call without its tags.
    at_start: bool,
    bare: bool,
    pub calls: usize,
}

impl CallParser {
    pub fn new(family: ToolFamily, tools: &ToolRequest) -> Self {
        CallParser { family, names: tools.functions.iter().map(|f| f.name.clone()).collect(), parallel: tools.parallel, held: String::new(), in_call: false, at_start: true, bare: false, calls: 0 }
    }

    /// Answer text in; text and calls out, in order.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held.push_str(text);
        match self.family {
            ToolFamily::Llama3Json => self.push_whole_answer(),
            ToolFamily::Hermes | ToolFamily::Generic => self.push_blocks(),
        }
    }

    /// The end of the answer: what is still held, as text or a call.
    pub fn finish(&mut self) -> Vec<Piece> {
        let held = std::mem::take(&mut self.held);
        if self.family == ToolFamily::Llama3Json && self.at_start || self.bare {
            self.bare = false;
            if let Some(call) = self.parse_call(held.trim().trim_start_matches(PYTHON_TAG)) {
                return vec![Piece::Call(call)];
            }
        }
        if self.in_call {
            self.in_call = false;
            return text_piece(format!("{CALL_OPEN}{held}"));
        }
        if self.calls > 0 && held.trim().is_empty() {
            return Vec::new();
        }
        text_piece(held)
    }

    fn push_whole_answer(&mut self) -> Vec<Piece> {
        if !self.at_start {
            return text_piece(std::mem::take(&mut self.held));
        }
        let trimmed = self.held.trim_start();
        let could_be_call = trimmed.is_empty() || trimmed.starts_with('{') || trimmed.starts_with(PYTHON_TAG) || PYTHON_TAG.starts_with(trimmed);
        if could_be_call {
            return Vec::new();
        }
        self.at_start = false;
        text_piece(std::mem::take(&mut self.held))
    }

    fn push_blocks(&mut self) -> Vec<Piece> {
        if self.at_start {
            let trimmed = self.held.trim_start();
            if trimmed.is_empty() {
                return Vec::new();
            }
            self.at_start = false;
            self.bare = trimmed.starts_with('{');
        }
        if self.bare {
            return Vec::new(); // judged whole, at the end
        }
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.held.find(CALL_CLOSE) else { return out };
                let body = self.held[..end].to_string();
                self.held.drain(..end + CALL_CLOSE.len());
                self.in_call = false;
                match self.parse_call(body.trim()) {
                    Some(call) => out.push(Piece::Call(call)),
                    // Not a call after all: the model's text, as it wrote it.
                    None => out.extend(text_piece(format!("{CALL_OPEN}{body}{CALL_CLOSE}"))),
                }
                continue;
            }
            match self.held.find(CALL_OPEN) {
                Some(start) => {
                    let before = self.held[..start].to_string();
                    // Whitespace between calls is not content.
                    if !(self.calls > 0 && before.trim().is_empty()) {
                        out.extend(text_piece(before));
                    }
                    self.held.drain(..start + CALL_OPEN.len());
                    self.in_call = true;
                }
                None => {
                    // Keep back what may be the start of the marker.
                    let keep = (1..CALL_OPEN.len()).rev().find(|&n| self.held.ends_with(&CALL_OPEN[..n])).unwrap_or(0);
                    let cut = self.held.len() - keep;
                    // Whitespace after a call may come before the next one.
                    if self.calls > 0 && self.held[..cut].trim().is_empty() {
                        return out;
                    }
                    let text: String = self.held.drain(..cut).collect();
                    out.extend(text_piece(text));
                    return out;
                }
            }
        }
    }

    /// `{"name": ..., "arguments" | "parameters": {...}}` naming a known function.
    fn parse_call(&mut self, body: &str) -> Option<ParsedCall> {
        if self.calls > 0 && !self.parallel {
            return None;
        }
        let value: Value = serde_json::from_str(body).ok()?;
        let name = value.get("name")?.as_str()?;
        if !self.names.iter().any(|n| n == name) {
            return None;
        }
        let arguments = value.get("arguments").or_else(|| value.get("parameters")).cloned().unwrap_or_else(|| json!({}));
        let arguments = match arguments {
            // Some models write the arguments as a JSON string already.
            Value::String(s) if serde_json::from_str::<Value>(&s).is_ok() => s,
            other => other.to_string(),
        };
        self.calls += 1;
        Some(ParsedCall { name: name.to_string(), arguments })
    }
}

/// A new call's id, as OpenAI's look (`call_` and 24 hex digits).
pub fn call_id() -> String {
    format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

/// The pieces' text, joined, and their calls, in order.
pub fn split_pieces(pieces: Vec<Piece>) -> (String, Vec<ParsedCall>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    (content, calls)
}

fn text_piece(text: String) -> Vec<Piece> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![Piece::Text(text)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> ToolRequest {
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        ToolRequest::parse(Some(&tools), None, None).unwrap().unwrap()
    }

    #[test]
    fn families_come_from_the_template() {
        assert_eq!(ToolFamily::of_template(None).unwrap(), ToolFamily::Generic);
        assert_eq!(ToolFamily::of_template(Some("{{ messages }}")).unwrap(), ToolFamily::Generic);
        assert_eq!(ToolFamily::of_template(Some("{% if tools %}<tool_call>{% endif %}")).unwrap(), ToolFamily::Hermes);
        assert_eq!(ToolFamily::of_template(Some("{% if tools %}{\"name\": ..., \"parameters\": ...}{% endif %}")).unwrap(), ToolFamily::Llama3Json);
        assert!(ToolFamily::of_template(Some("{% if tools %}[TOOL_CALLS]{% endif %}")).is_err());
    }

    #[test]
    fn tool_requests_and_their_errors() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        assert_eq!(ToolRequest::parse(Some(&tools), Some(&json!("none")), None).unwrap(), None);
        assert_eq!(ToolRequest::parse(None, None, None).unwrap(), None);
        let named = ToolRequest::parse(Some(&tools), Some(&json!({"type": "function", "function": {"name": "f"}})), Some(&json!(false))).unwrap().unwrap();
        assert_eq!((named.choice, named.parallel), (ToolChoice::Named("f".into()), false));
        let param = |t: Value, c: Value| match ToolRequest::parse(Some(&t), Some(&c), None) {
            Err(ApiError::InvalidField { param, .. } | ApiError::Unsupported { param, .. }) => param,
            other => panic!("{other:?}"),
        };
        assert_eq!(param(json!([{"type": "function", "function": {"name": "a b"}}]), json!("auto")), "tools[0].function.name");
        assert_eq!(param(json!([{"type": "retrieval"}]), json!("auto")), "tools[0].type");
        assert_eq!(param(tools.clone(), json!("sometimes")), "tool_choice");
        assert_eq!(param(tools.clone(), json!({"type": "function", "function": {"name": "g"}})), "tool_choice");
        assert_eq!(param(json!([]), json!("required")), "tool_choice");
        assert_eq!(param(json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]), json!("auto")), "tools[1].function.name");
    }

    #[test]
    fn hermes_blocks_are_found_in_a_stream_split_anywhere() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>";
        for step in [1, 3, 7, text.len()] {
            let mut p = CallParser::new(ToolFamily::Hermes, &weather());
            let mut pieces = Vec::new();
            let chars: Vec<char> = text.chars().collect();
            for chunk in chars.chunks(step) {
                pieces.extend(p.push(&chunk.iter().collect::<String>()));
            }
            pieces.extend(p.finish());
            let texts: String = pieces.iter().filter_map(|x| if let Piece::Text(t) = x { Some(t.as_str()) } else { None }).collect();
            let calls: Vec<&ParsedCall> = pieces.iter().filter_map(|x| if let Piece::Call(c) = x { Some(c) } else { None }).collect();
            assert_eq!(texts, "Let me look.\n", "step {step}");
            assert_eq!(calls.len(), 2);
            assert_eq!(calls[1].arguments, "{\"city\":\"Rome\"}");
        }
    }

    #[test]
    fn what_is_not_a_call_stays_text() {
        let mut p = CallParser::new(ToolFamily::Hermes, &weather());
        let mut out = p.push("a <tool_call>{\"name\": \"unknown\"}</tool_call> b <tool");
        out.extend(p.finish());
        let text: String = out.iter().map(|x| if let Piece::Text(t) = x { t.clone() } else { panic!("{x:?}") }).collect();
        assert_eq!(text, "a <tool_call>{\"name\": \"unknown\"}</tool_call> b <tool");
        assert_eq!(p.calls, 0);
    }

    #[test]
    fn a_bare_call_of_a_known_function_is_a_call() {
        let mut p = CallParser::new(ToolFamily::Hermes, &weather());
        assert!(p.push(" {\"name\": \"get_weather\", \"arguments\": ").is_empty());
        assert!(p.push("{\"city\": \"Oslo\"}}").is_empty());
        assert_eq!(p.finish(), vec![Piece::Call(ParsedCall { name: "get_weather".into(), arguments: "{\"city\":\"Oslo\"}".into() })]);
        let mut p = CallParser::new(ToolFamily::Hermes, &weather());
        assert!(p.push("{\"a\": 1}").is_empty());
        assert_eq!(p.finish(), vec![Piece::Text("{\"a\": 1}".into())]);
    }

    #[test]
    fn a_llama3_call_is_the_whole_answer() {
        let mut p = CallParser::new(ToolFamily::Llama3Json, &weather());
        assert!(p.push("{\"name\": \"get_weather\", ").is_empty());
        assert!(p.push("\"parameters\": {\"city\": \"Oslo\"}}").is_empty());
        assert_eq!(p.finish(), vec![Piece::Call(ParsedCall { name: "get_weather".into(), arguments: "{\"city\":\"Oslo\"}".into() })]);
        let mut p = CallParser::new(ToolFamily::Llama3Json, &weather());
        assert_eq!(p.push("It is sunny."), vec![Piece::Text("It is sunny.".into())]);
    }

    #[test]
    fn forced_grammars_compile_as_lark() {
        let mut req = weather();
        req.choice = ToolChoice::Required;
        let TopLevelGrammar { grammars, .. } = req.grammar(ToolFamily::Hermes).unwrap();
        let lark = grammars[0].lark_grammar.clone().unwrap();
        assert!(lark.starts_with("start: call (\"\\n\" call){0,7}"), "{lark}");
        assert!(lark.contains("args0: %json {"), "{lark}");
        req.choice = ToolChoice::Auto;
        assert!(req.grammar(ToolFamily::Hermes).is_none());
    }
}

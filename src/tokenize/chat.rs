//! Chat prompts rendered with minijinja from the template the model ships.

use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::reasoning::modes::LevelPlacement;

/// One turn, as chat templates read it (Hugging Face's shape: a call's
/// `arguments` are an object, not OpenAI's JSON text).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The calls an assistant turn made.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub tool_calls: Vec<TemplateToolCall>,
    /// Which call a `tool` turn answers.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tool_call_id: Option<String>,
    /// The function a `tool` turn's result came from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        ChatMessage { role: role.to_string(), content: content.into(), ..Default::default() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: TemplateFunctionCall,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateFunctionCall {
    pub name: String,
    pub arguments: serde_json::Value,
}

/// Put a mode's level prompt (the instruction a length-trained checkpoint was
/// trained with) into the chat, where its preset says.
pub fn apply_level_prompt(messages: &mut Vec<ChatMessage>, prompt: &str, placement: LevelPlacement) {
    if prompt.is_empty() {
        return;
    }
    let append = |m: &mut ChatMessage| {
        if m.content.is_empty() {
            m.content = prompt.to_string();
        } else {
            m.content = format!("{}\n\n{prompt}", m.content.trim_end());
        }
    };
    match placement {
        LevelPlacement::UserSuffix => match messages.iter_mut().rev().find(|m| m.role == "user") {
            Some(last_user) => append(last_user),
            None => messages.push(ChatMessage::new("user", prompt)),
        },
        LevelPlacement::System => match messages.first_mut().filter(|m| m.role == "system" || m.role == "developer") {
            Some(system) => append(system),
            None => messages.insert(0, ChatMessage::new("system", prompt)),
        },
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(pub String);

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

/// Templates call `raise_exception('...')` to reject a conversation (e.g. roles
/// that do not alternate); that is the user's error, not the server's.
fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// Python's `json.dumps` layout, which Hugging Face's `tojson` uses and
/// models were trained on: `", "` and `": "` between items, no other space.
struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// Hugging Face's `tojson`: keys in order, non-ASCII as it is, no HTML
/// escaping (minijinja's own escapes `<`, which changes the prompt), and
/// `indent` as Python's.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = " ".repeat(n);
            let mut ser = serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(spaces.as_bytes()));
            serde::Serialize::serialize(&value, &mut ser)
        }
        None => serde::Serialize::serialize(&value, &mut serde_json::Serializer::with_formatter(&mut out, PythonJson)),
    };
    written.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(String::from_utf8(out).unwrap_or_default()))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: String, eos_token: String) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        // Hugging Face renders templates with these Jinja options.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string methods (`.strip()`, `.startswith()`, ...) used by many templates.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow::anyhow!("the model's chat template does not parse: {e}"))?;
        Ok(ChatTemplate { env, source: source.to_string(), bos_token, eos_token })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TemplateError> {
        self.render_with(messages, add_generation_prompt, None, None)
    }

    /// `enable_thinking`: the switch thinking templates (Qwen3) read; `None`
    /// leaves it undefined, so the template's own default applies. `tools`:
    /// the request's (OpenAI's array, as templates expect it), undefined when `None`.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template("chat").map_err(|e| TemplateError(e.to_string()))?;
        let enable_thinking = enable_thinking.map(Value::from).unwrap_or(Value::UNDEFINED);
        let tools = tools.map(Value::from_serialize).unwrap_or(Value::UNDEFINED);
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
                enable_thinking => enable_thinking,
                tools => tools,
            })
            .map_err(|e| TemplateError(format!("chat template: {}", e.detail().unwrap_or(&e.to_string()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    #[test]
    fn level_prompt_goes_after_the_last_user_turn_or_into_the_system_prompt() {
        let mut chat = vec![msg("user", "a"), msg("assistant", "b"), msg("user", "What is 2+2? ")];
        apply_level_prompt(&mut chat, "Be brief.", LevelPlacement::UserSuffix);
        assert_eq!(chat[2].content, "What is 2+2?\n\nBe brief.");
        assert_eq!(chat[0].content, "a");

        let mut chat = vec![msg("user", "q")];
        apply_level_prompt(&mut chat, "Be brief.", LevelPlacement::System);
        assert_eq!(chat, vec![msg("system", "Be brief."), msg("user", "q")]);
        let mut chat = vec![msg("system", "You help."), msg("user", "q")];
        apply_level_prompt(&mut chat, "Be brief.", LevelPlacement::System);
        assert_eq!(chat[0].content, "You help.\n\nBe brief.");

        let mut chat = vec![msg("user", "q")];
        apply_level_prompt(&mut chat, "", LevelPlacement::UserSuffix);
        assert_eq!(chat, vec![msg("user", "q")]);
    }

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, String::new(), String::new()).unwrap();
        let out = t.render(&[msg("user", " Hi ")], true).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_is_a_template_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, String::new(), String::new()).unwrap();
        let err = t.render(&[msg("assistant", "x")], true).unwrap_err();
        assert!(err.0.contains("first must be user"), "{err}");
        assert_eq!(t.render(&[msg("user", "x")], true).unwrap(), "ok");
    }

    #[test]
    fn tojson_writes_as_python_does() {
        let src = "{{ messages[0] | tojson }}|{{ {'b': [1, 2], 'a': '<é>'} | tojson }}|{{ [1] | tojson(indent=2) }}";
        let t = ChatTemplate::new(src, String::new(), String::new()).unwrap();
        assert_eq!(t.render(&[msg("user", "x")], false).unwrap(), "{\"role\": \"user\", \"content\": \"x\"}|{\"b\": [1, 2], \"a\": \"<é>\"}|[\n  1\n]");
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{% if messages[0]['content'].strip().startswith('a') %}yes{% else %}no{% endif %}";
        let t = ChatTemplate::new(src, String::new(), String::new()).unwrap();
        assert_eq!(t.render(&[msg("user", "  abc ")], false).unwrap(), "yes");
        assert_eq!(t.render(&[msg("user", "  xbc ")], false).unwrap(), "no");
    }
}

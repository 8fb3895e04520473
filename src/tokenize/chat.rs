//! Chat prompts rendered with minijinja from the template the model ships.

use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::reasoning::modes::LevelPlacement;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
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
            None => messages.push(ChatMessage { role: "user".into(), content: prompt.to_string() }),
        },
        LevelPlacement::System => match messages.first_mut().filter(|m| m.role == "system" || m.role == "developer") {
            Some(system) => append(system),
            None => messages.insert(0, ChatMessage { role: "system".into(), content: prompt.to_string() }),
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

impl ChatTemplate {
    pub fn new(source: &str, bos_token: String, eos_token: String) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        // Hugging Face renders templates with these Jinja options.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string methods (`.strip()`, `.startswith()`, ...) used by many templates.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow::anyhow!("the model's chat template does not parse: {e}"))?;
        Ok(ChatTemplate { env, source: source.to_string(), bos_token, eos_token })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TemplateError> {
        self.render_with(messages, add_generation_prompt, None)
    }

    /// `enable_thinking`: the switch thinking templates (Qwen3) read; `None`
    /// leaves it undefined, so the template's own default applies.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template("chat").map_err(|e| TemplateError(e.to_string()))?;
        let enable_thinking = enable_thinking.map(Value::from).unwrap_or(Value::UNDEFINED);
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
                enable_thinking => enable_thinking,
            })
            .map_err(|e| TemplateError(format!("chat template: {}", e.detail().unwrap_or(&e.to_string()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
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
    fn python_string_methods_work() {
        let src = "{% if messages[0]['content'].strip().startswith('a') %}yes{% else %}no{% endif %}";
        let t = ChatTemplate::new(src, String::new(), String::new()).unwrap();
        assert_eq!(t.render(&[msg("user", "  abc ")], false).unwrap(), "yes");
        assert_eq!(t.render(&[msg("user", "  xbc ")], false).unwrap(), "no");
    }
}

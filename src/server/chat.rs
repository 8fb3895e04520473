//! `POST /v1/chat/completions`.

use axum::response::{IntoResponse, Response};
use axum::Json;

use super::endpoint::{Endpoint, Prompted, ReplyContext};
use super::error::ApiError;
use super::generate::{self, Collected};
use super::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs, Completion, Delta, FunctionCallBody,
    FunctionCallDelta, TerseExtension, ToolCallBody, ToolCallDelta, UsageBody,
};
use super::sse::ChunkFormat;
use super::structured;
use super::tool_calls::{call_id, split_pieces, CallParser, ParsedCall, Piece, ToolFamily, ToolRequest};
use super::validate::GenerationParams;
use super::wire::{ChatFields, FieldUse, CHAT_FIELDS};
use crate::engine::{ConstraintKind, EngineHandle};
use crate::reasoning::modes::Mode;
use crate::reasoning::phase::Phase;
use crate::tokenize::{apply_level_prompt, ChatMessage};

pub struct Chat;

impl Endpoint for Chat {
    const NAME: &'static str = "chat_completions";
    const ID_PREFIX: &'static str = "chatcmpl-";
    type Fields = ChatFields;
    const FIELDS: &'static [(&'static str, FieldUse)] = CHAT_FIELDS;
    type Chunks = ChatChunks;
    /// How to find tool calls in the answer, when the model may make them.
    type Shape = Option<CallParser>;

    fn check(fields: &ChatFields) -> Result<(), ApiError> {
        fields.messages().map(|_| ())
    }

    fn refuse_unsupported(fields: &ChatFields) -> Result<(), ApiError> {
        fields.refuse_unsupported()
    }

    fn logprobs(fields: &ChatFields) -> Result<Option<usize>, ApiError> {
        fields.logprobs()
    }

    async fn prompt(engine: &EngineHandle, fields: ChatFields, params: &GenerationParams) -> Result<Prompted<Option<CallParser>>, ApiError> {
        let tools = ToolRequest::parse(fields.tools.as_ref(), fields.tool_choice.as_ref(), fields.parallel_tool_calls.as_ref())?;
        let family = match &tools {
            Some(_) => ToolFamily::of_template(engine.tokenizer().chat_template_source())?,
            None => ToolFamily::Generic,
        };
        let mut messages = fields.messages()?;
        if let Some(preset) = engine.reasoning_profile().modes.get(params.mode) {
            if let Some(level) = &preset.level_prompt {
                apply_level_prompt(&mut messages, level, preset.placement);
            }
        }
        let template_tools = match &tools {
            Some(t) if family.template_takes_tools() => Some(t.wire.clone()),
            Some(t) => {
                show_tools_in_the_conversation(&mut messages, t);
                None
            }
            None => None,
        };
        let thinking_off = params.mode == Mode::None;
        let forced = tools.as_ref().and_then(|t| t.grammar(family));
        let engine = engine.clone();
        let (tokens, grammar) = generate::blocking(move || {
            let tokenizer = engine.tokenizer();
            // Thinking templates (Qwen3) close the thought themselves when told to.
            let enable_thinking = if thinking_off { Some(false) } else { None };
            let text = tokenizer
                .apply_chat_template_with(&messages, true, enable_thinking, template_tools.as_deref())
                .map_err(|e| ApiError::Template(e.to_string()))?;
            let text = engine.reasoning_profile().open_thought(text);
            let mut prompt = tokenizer.encode_prompt(&text).map_err(|e| ApiError::Internal(format!("tokenizing the prompt: {e}")))?;
            if thinking_off {
                generate::close_open_thought(&engine, &mut prompt);
            }
            let grammar = forced.map(|g| structured::compile(&engine, ConstraintKind::Tools, g, "tools")).transpose()?;
            Ok((prompt, grammar))
        })
        .await?;
        let shape = tools.as_ref().map(|t| CallParser::new(family, t));
        Ok(Prompted { tokens, grammar, shape })
    }

    fn reply(reply: ReplyContext, done: Collected, mode: &'static str, shape: Option<CallParser>) -> Response {
        let Collected { text, reasoning, finished, logprobs } = done;
        let (content, tool_calls) = match shape {
            Some(mut parser) => {
                let mut pieces = parser.push(&text);
                pieces.extend(parser.finish());
                let (content, calls) = split_pieces(pieces);
                let calls: Vec<ToolCallBody> = calls.into_iter().map(call_body).collect();
                // A reply of calls alone has no content, as OpenAI's.
                let content = if !calls.is_empty() && content.trim().is_empty() { None } else { Some(content) };
                (content, calls)
            }
            None => (Some(text), Vec::new()),
        };
        reply.tool_calls.inc_by(tool_calls.len() as u64);
        let choice = ChatChoice {
            index: 0,
            finish_reason: finish_reason(finished.reason.as_openai(), !tool_calls.is_empty()),
            message: AssistantMessage { role: "assistant", content, tool_calls, reasoning_content: reasoning },
            logprobs,
        };
        let body: ChatCompletion = Completion {
            usage: Some(UsageBody::new(finished.usage, &finished.reasoning)),
            terse: Some(TerseExtension::new(mode, &finished.reasoning)),
            ..reply.ids.completion("chat.completion", vec![choice])
        };
        Json(body).into_response()
    }

    fn chunks(reply: ReplyContext, shape: Option<CallParser>) -> ChatChunks {
        ChatChunks { reply, calls: shape, sent_calls: 0 }
    }
}

/// For a model whose template does not take `tools`: the tools described in
/// the system message, and the history's calls and results written as the
/// model is asked to write them (results as user turns, which every
/// template accepts).
fn show_tools_in_the_conversation(messages: &mut Vec<ChatMessage>, tools: &ToolRequest) {
    let text = tools.generic_system_text();
    match messages.first_mut().filter(|m| m.role == "system") {
        Some(system) => system.content = format!("{}\n\n{text}", system.content.trim_end()),
        None => messages.insert(0, ChatMessage::new("system", text)),
    }
    for m in messages.iter_mut() {
        for call in std::mem::take(&mut m.tool_calls) {
            let body = serde_json::json!({"name": call.function.name, "arguments": call.function.arguments});
            m.content = format!("{}\n<tool_call>\n{body}\n</tool_call>", m.content).trim_start().to_string();
        }
        if m.role == "tool" {
            m.role = "user".into();
            m.content = format!("<tool_response>\n{}\n</tool_response>", m.content);
        }
    }
}


fn call_body(call: ParsedCall) -> ToolCallBody {
    ToolCallBody { id: call_id(), kind: "function", function: FunctionCallBody { name: call.name, arguments: call.arguments } }
}

/// `tool_calls` when the reply made calls and ended on its own.
fn finish_reason(reason: &'static str, made_calls: bool) -> &'static str {
    if made_calls && reason == "stop" {
        "tool_calls"
    } else {
        reason
    }
}

/// Arguments are streamed in pieces of at most this many bytes.
const ARGUMENT_PIECE: usize = 32;

/// The chunks of a streamed chat completion.
pub struct ChatChunks {
    reply: ReplyContext,
    calls: Option<CallParser>,
    /// Calls streamed so far (the next one's `index`).
    sent_calls: usize,
}

impl ChatChunks {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<UsageBody>, terse: Option<TerseExtension>) -> String {
        let chunk: ChatCompletionChunk = Completion { usage, terse, ..self.reply.ids.completion("chat.completion.chunk", choices) };
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    fn choice(delta: Delta, finish_reason: Option<&'static str>, logprobs: Option<ChatLogprobs>) -> Vec<ChatChunkChoice> {
        vec![ChatChunkChoice { index: 0, delta, finish_reason, logprobs }]
    }

    /// The answer's pieces as a delta: text as content, each call as a
    /// fragment with its id and name, then its arguments in pieces.
    fn answer_delta(&mut self, pieces: Vec<Piece>) -> Delta {
        let (content, calls) = split_pieces(pieces);
        let mut tool_calls = Vec::new();
        for call in calls {
            let index = self.sent_calls;
            self.sent_calls += 1;
            self.reply.tool_calls.inc();
            let name = FunctionCallDelta { name: Some(call.name), arguments: String::new() };
            tool_calls.push(ToolCallDelta { index, id: Some(call_id()), kind: Some("function"), function: name });
            let mut rest = call.arguments.as_str();
            while !rest.is_empty() {
                let mut cut = rest.len().min(ARGUMENT_PIECE);
                while !rest.is_char_boundary(cut) {
                    cut -= 1;
                }
                let (piece, after) = rest.split_at(cut);
                tool_calls.push(ToolCallDelta { index, id: None, kind: None, function: FunctionCallDelta { name: None, arguments: piece.to_string() } });
                rest = after;
            }
        }
        Delta { content: (!content.is_empty()).then_some(content), tool_calls, ..Default::default() }
    }
}

impl ChunkFormat for ChatChunks {
    fn opening(&self) -> Option<String> {
        let delta = Delta { role: Some("assistant"), content: Some(String::new()), ..Default::default() };
        Some(self.chunk(Self::choice(delta, None, None), None, None))
    }

    fn text(&mut self, text: String, phase: Phase, logprobs: Option<ChatLogprobs>) -> Option<String> {
        let delta = match (phase, self.calls.as_mut()) {
            (Phase::Thinking, _) => Delta { reasoning_content: Some(text), ..Default::default() },
            (Phase::Answer, None) => Delta { content: Some(text), ..Default::default() },
            (Phase::Answer, Some(parser)) => {
                let pieces = parser.push(&text);
                self.answer_delta(pieces)
            }
        };
        let empty = delta.content.is_none() && delta.reasoning_content.is_none() && delta.tool_calls.is_empty();
        if empty && logprobs.as_ref().is_none_or(|l| l.content.is_empty() && l.reasoning_content.is_empty()) {
            return None; // held back: it may start a call
        }
        Some(self.chunk(Self::choice(delta, None, logprobs), None, None))
    }

    fn finish(&mut self, reason: &'static str, terse: TerseExtension) -> String {
        let delta = match self.calls.as_mut() {
            Some(parser) => {
                let pieces = parser.finish();
                self.answer_delta(pieces)
            }
            None => Delta::default(),
        };
        let reason = finish_reason(reason, self.sent_calls > 0);
        self.chunk(Self::choice(delta, Some(reason), None), None, Some(terse))
    }

    fn usage(&self, usage: UsageBody) -> String {
        self.chunk(vec![], Some(usage), None)
    }
}

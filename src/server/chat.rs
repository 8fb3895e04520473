//! `POST /v1/chat/completions`.

use axum::response::{IntoResponse, Response};
use axum::Json;

use super::endpoint::{Endpoint, ResponseIds};
use super::error::ApiError;
use super::generate::{self, Collected};
use super::openai::{AssistantMessage, ChatChoice, ChatLogprobs, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, Completion, Delta, TerseExtension, UsageBody};
use super::sse::ChunkFormat;
use super::validate::GenerationParams;
use super::wire::{ChatFields, FieldUse, CHAT_FIELDS};
use crate::engine::EngineHandle;
use crate::reasoning::modes::Mode;
use crate::reasoning::phase::Phase;
use crate::tokenize::apply_level_prompt;

pub struct Chat;

impl Endpoint for Chat {
    const NAME: &'static str = "chat_completions";
    const ID_PREFIX: &'static str = "chatcmpl-";
    type Fields = ChatFields;
    const FIELDS: &'static [(&'static str, FieldUse)] = CHAT_FIELDS;
    type Chunks = ChatChunks;

    fn check(fields: &ChatFields) -> Result<(), ApiError> {
        fields.messages().map(|_| ())
    }

    fn refuse_unsupported(fields: &ChatFields) -> Result<(), ApiError> {
        fields.refuse_unsupported()
    }

    fn logprobs(fields: &ChatFields) -> Result<Option<usize>, ApiError> {
        fields.logprobs()
    }

    async fn prompt(engine: &EngineHandle, fields: ChatFields, params: &GenerationParams) -> Result<Vec<u32>, ApiError> {
        let mut messages = fields.messages()?;
        if let Some(preset) = engine.reasoning_profile().modes.get(params.mode) {
            if let Some(level) = &preset.level_prompt {
                apply_level_prompt(&mut messages, level, preset.placement);
            }
        }
        let thinking_off = params.mode == Mode::None;
        let engine = engine.clone();
        generate::blocking(move || {
            let tokenizer = engine.tokenizer();
            // Thinking templates (Qwen3) close the thought themselves when told to.
            let enable_thinking = if thinking_off { Some(false) } else { None };
            let text = tokenizer
                .apply_chat_template_with(&messages, true, enable_thinking)
                .map_err(|e| ApiError::Template(e.to_string()))?;
            let text = engine.reasoning_profile().open_thought(text);
            let mut prompt = tokenizer.encode_prompt(&text).map_err(|e| ApiError::Internal(format!("tokenizing the prompt: {e}")))?;
            if thinking_off {
                generate::close_open_thought(&engine, &mut prompt);
            }
            Ok(prompt)
        })
        .await
    }

    fn reply(ids: ResponseIds, done: Collected, mode: &'static str) -> Response {
        let Collected { text, reasoning, finished, logprobs } = done;
        let choice = ChatChoice {
            index: 0,
            message: AssistantMessage { role: "assistant", content: text, reasoning_content: reasoning },
            finish_reason: finished.reason.as_openai(),
            logprobs,
        };
        let reply: ChatCompletion = Completion {
            usage: Some(UsageBody::new(finished.usage, &finished.reasoning)),
            terse: Some(TerseExtension::new(mode, &finished.reasoning)),
            ..ids.completion("chat.completion", vec![choice])
        };
        Json(reply).into_response()
    }

    fn chunks(ids: ResponseIds) -> ChatChunks {
        ChatChunks(ids)
    }
}

/// The chunks of a streamed chat completion.
pub struct ChatChunks(ResponseIds);

impl ChatChunks {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<UsageBody>, terse: Option<TerseExtension>) -> String {
        let chunk: ChatCompletionChunk = Completion { usage, terse, ..self.0.completion("chat.completion.chunk", choices) };
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    fn choice(delta: Delta, finish_reason: Option<&'static str>, logprobs: Option<ChatLogprobs>) -> Vec<ChatChunkChoice> {
        vec![ChatChunkChoice { index: 0, delta, finish_reason, logprobs }]
    }
}

impl ChunkFormat for ChatChunks {
    fn opening(&self) -> Option<String> {
        let delta = Delta { role: Some("assistant"), content: Some(String::new()), reasoning_content: None };
        Some(self.chunk(Self::choice(delta, None, None), None, None))
    }

    fn text(&self, text: String, phase: Phase, logprobs: Option<ChatLogprobs>) -> String {
        let delta = match phase {
            Phase::Thinking => Delta { reasoning_content: Some(text), ..Default::default() },
            Phase::Answer => Delta { content: Some(text), ..Default::default() },
        };
        self.chunk(Self::choice(delta, None, logprobs), None, None)
    }

    fn finish(&self, reason: &'static str, terse: TerseExtension) -> String {
        self.chunk(Self::choice(Delta::default(), Some(reason), None), None, Some(terse))
    }

    fn usage(&self, usage: UsageBody) -> String {
        self.chunk(vec![], Some(usage), None)
    }
}

//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::extract::JsonObject;
use super::generate::{self, RequestRecord};
use super::openai::{
    unix_now, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, Delta,
    TerseExtension, UsageBody,
};
use crate::reasoning::modes::{apply_level_prompt, Mode};
use crate::reasoning::phase::Phase;
use super::sse::{self, ChunkFormat};
use super::validate::{self, Fields};
use super::{request_id, AppState};

const ENDPOINT: &str = "chat_completions";

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<JsonObject, ApiError>,
) -> Response {
    let mut record = RequestRecord::new(&state, ENDPOINT, request_id(&headers));
    match handle(&state, body, &mut record).await {
        Ok((events, params)) => {
            let ids = Ids {
                id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
                created: unix_now(),
                model: state.served_name.clone(),
            };
            if params.stream {
                return sse::response(events, record, ids, params.include_usage);
            }
            match generate::collect(events, &mut record).await {
                Ok(done) => Json(ChatCompletion {
                    id: ids.id,
                    object: "chat.completion",
                    created: ids.created,
                    model: ids.model,
                    choices: vec![ChatChoice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content: done.text,
                            reasoning_content: done.reasoning,
                        },
                        finish_reason: done.reason.as_openai(),
                        logprobs: None,
                    }],
                    usage: UsageBody::new(done.usage, &done.reasoning_usage),
                    terse: TerseExtension::new(record.mode_label(), &done.reasoning_usage),
                })
                .into_response(),
                Err(e) => record.reject(e),
            }
        }
        Err(e) => record.reject(e),
    }
}

async fn handle(
    state: &AppState,
    body: Result<JsonObject, ApiError>,
    record: &mut RequestRecord,
) -> Result<(crate::engine::GenerationStream, validate::CommonParams), ApiError> {
    let JsonObject(map) = body?;
    let fields = Fields::new(&map);
    record.set_mode(validate::mode_of(&fields));
    validate::check_model(&fields, &state.served_name)?;
    let mut messages = validate::chat_messages(&fields)?;
    let params = validate::common_params(&fields)?;
    validate::refuse_unsupported(&fields, true)?;
    let engine = generate::engine(state)?;
    if let Some(preset) = engine.reasoning_profile().modes.get(params.mode) {
        apply_level_prompt(&mut messages, preset);
    }
    let thinking_off = params.mode == Mode::None;
    let prompt = {
        let engine = engine.clone();
        generate::blocking(move || {
            let tokenizer = engine.tokenizer();
            // Thinking templates (Qwen3) close the thought themselves when told to.
            let enable_thinking = if thinking_off { Some(false) } else { None };
            let text = tokenizer
                .apply_chat_template_with(&messages, true, enable_thinking)
                .map_err(|e| ApiError::Template(e.to_string()))?;
            let text = engine.reasoning_profile().open_thought(text);
            let mut prompt = tokenizer
                .encode(&text)
                .map_err(|e| ApiError::Internal(format!("tokenizing the prompt: {e}")))?;
            if thinking_off {
                generate::close_open_thought(&engine, &mut prompt);
            }
            Ok(prompt)
        })
        .await?
    };
    let events = generate::submit(&engine, prompt, &params, record)?;
    Ok((events, params))
}

/// What every chunk of one response repeats.
struct Ids {
    id: String,
    created: u64,
    model: String,
}

impl Ids {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<UsageBody>, terse: Option<TerseExtension>) -> String {
        let chunk = ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            terse,
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    fn choice(delta: Delta, finish_reason: Option<&'static str>) -> Vec<ChatChunkChoice> {
        vec![ChatChunkChoice {
            index: 0,
            delta,
            finish_reason,
            logprobs: None,
        }]
    }
}

impl ChunkFormat for Ids {
    fn opening(&self) -> Option<String> {
        Some(self.chunk(
            Ids::choice(
                Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    reasoning_content: None,
                },
                None,
            ),
            None,
            None,
        ))
    }

    fn text(&self, text: String, phase: Phase) -> String {
        let delta = match phase {
            Phase::Thinking => Delta { reasoning_content: Some(text), ..Default::default() },
            Phase::Answer => Delta { content: Some(text), ..Default::default() },
        };
        self.chunk(Ids::choice(delta, None), None, None)
    }

    fn finish(&self, reason: &'static str, terse: TerseExtension) -> String {
        self.chunk(Ids::choice(Delta::default(), Some(reason)), None, Some(terse))
    }

    fn usage(&self, usage: UsageBody) -> String {
        self.chunk(vec![], Some(usage), None)
    }
}

//! `POST /v1/completions` (text completion: the prompt is sent as it is).

use axum::response::{IntoResponse, Response};
use axum::Json;

use super::endpoint::{Endpoint, ResponseIds};
use super::error::ApiError;
use super::generate::{self, Collected};
use super::openai::{TerseExtension, TextChoice, TextCompletion, UsageBody};
use super::sse::ChunkFormat;
use super::validate::{GenerationParams, Prompt};
use super::wire::CompletionFields;
use crate::engine::EngineHandle;
use crate::reasoning::modes::Mode;
use crate::reasoning::phase::Phase;

pub struct Completions;

impl Endpoint for Completions {
    const NAME: &'static str = "completions";
    const ID_PREFIX: &'static str = "cmpl-";
    type Fields = CompletionFields;
    type Chunks = TextChunks;

    fn check(fields: &CompletionFields) -> Result<(), ApiError> {
        // The vocabulary bound of token-id prompts needs the engine; the rest is checked now.
        fields.require_prompt()
    }

    fn refuse_unsupported(fields: &CompletionFields) -> Result<(), ApiError> {
        fields.refuse_unsupported()
    }

    async fn prompt(engine: &EngineHandle, fields: CompletionFields, params: &GenerationParams) -> Result<Vec<u32>, ApiError> {
        let mut prompt = match fields.prompt(engine.tokenizer().vocab_size())? {
            Prompt::Tokens(ids) => ids,
            Prompt::Text(text) => {
                let engine = engine.clone();
                generate::blocking(move || {
                    engine.tokenizer().encode_prompt(&text).map_err(|e| ApiError::Internal(format!("tokenizing the prompt: {e}")))
                })
                .await?
            }
        };
        if params.mode == Mode::None {
            generate::close_open_thought(engine, &mut prompt);
        }
        Ok(prompt)
    }

    fn reply(ids: ResponseIds, done: Collected, mode: &'static str) -> Response {
        let Collected { text, reasoning, finished } = done;
        let chunks = TextChunks(ids);
        let mut body = chunks.completion(text, reasoning, Some(finished.reason.as_openai()));
        body.usage = Some(UsageBody::new(finished.usage, &finished.reasoning));
        body.terse = Some(TerseExtension::new(mode, &finished.reasoning));
        Json(body).into_response()
    }

    fn chunks(ids: ResponseIds) -> TextChunks {
        TextChunks(ids)
    }
}

/// A text completion's body, whole or as stream chunks.
pub struct TextChunks(ResponseIds);

impl TextChunks {
    fn completion(&self, text: String, reasoning_content: Option<String>, finish_reason: Option<&'static str>) -> TextCompletion {
        self.object(vec![TextChoice { index: 0, text, reasoning_content, finish_reason, logprobs: None }])
    }

    fn object(&self, choices: Vec<TextChoice>) -> TextCompletion {
        self.0.completion("text_completion", choices)
    }
}

impl ChunkFormat for TextChunks {
    fn opening(&self) -> Option<String> {
        None
    }

    fn text(&self, text: String, phase: Phase) -> String {
        let body = match phase {
            Phase::Thinking => self.completion(String::new(), Some(text), None),
            Phase::Answer => self.completion(text, None, None),
        };
        serde_json::to_string(&body).unwrap_or_default()
    }

    fn finish(&self, reason: &'static str, terse: TerseExtension) -> String {
        let mut body = self.completion(String::new(), None, Some(reason));
        body.terse = Some(terse);
        serde_json::to_string(&body).unwrap_or_default()
    }

    fn usage(&self, usage: UsageBody) -> String {
        let mut body = self.object(vec![]);
        body.usage = Some(usage);
        serde_json::to_string(&body).unwrap_or_default()
    }
}

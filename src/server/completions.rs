//! `POST /v1/completions` (text completion: the prompt is sent as it is).

use axum::response::{IntoResponse, Response};
use axum::Json;

use super::endpoint::{Endpoint, Prompted, ReplyContext, ResponseIds};
use super::error::ApiError;
use super::generate::{self, Collected};
use super::openai::{ChatLogprobs, CompletionLogprobs, TerseExtension, TextChoice, TextCompletion, UsageBody};
use super::sse::ChunkFormat;
use super::validate::{GenerationParams, Prompt};
use super::wire::{CompletionFields, FieldUse, COMPLETION_FIELDS};
use crate::engine::EngineHandle;
use crate::reasoning::modes::Mode;
use crate::reasoning::phase::Phase;

pub struct Completions;

impl Endpoint for Completions {
    const NAME: &'static str = "completions";
    const ID_PREFIX: &'static str = "cmpl-";
    type Fields = CompletionFields;
    const FIELDS: &'static [(&'static str, FieldUse)] = COMPLETION_FIELDS;
    type Chunks = TextChunks;
    /// The prompt's text, when `echo` asks for it in front of the completion.
    type Shape = Option<String>;

    fn check(fields: &CompletionFields) -> Result<(), ApiError> {
        // The vocabulary bound of token-id prompts needs the engine; the rest is checked now.
        fields.require_prompt()
    }

    fn refuse_unsupported(fields: &CompletionFields) -> Result<(), ApiError> {
        fields.refuse_unsupported()
    }

    fn logprobs(fields: &CompletionFields) -> Result<Option<usize>, ApiError> {
        fields.logprobs()
    }

    async fn prompt(engine: &EngineHandle, fields: CompletionFields, params: &GenerationParams) -> Result<Prompted<Option<String>>, ApiError> {
        let echo = fields.echo.unwrap_or(false);
        let (mut prompt, echoed) = match fields.prompt(engine.tokenizer().vocab_size())? {
            Prompt::Tokens(ids) => {
                let text = echo.then(|| engine.tokenizer().decode(&ids));
                (ids, text)
            }
            Prompt::Text(text) => {
                let engine = engine.clone();
                let echoed = echo.then(|| text.clone());
                let ids = generate::blocking(move || {
                    engine.tokenizer().encode_prompt(&text).map_err(|e| ApiError::Internal(format!("tokenizing the prompt: {e}")))
                })
                .await?;
                (ids, echoed)
            }
        };
        if params.mode == Mode::None {
            generate::close_open_thought(engine, &mut prompt);
        }
        Ok(Prompted { tokens: prompt, grammar: None, shape: echoed })
    }

    fn reply(reply: ReplyContext, done: Collected, mode: &'static str, echo: Option<String>) -> Response {
        let Collected { text, reasoning, finished, logprobs } = done;
        let text = echo.unwrap_or_default() + &text;
        let chunks = TextChunks(reply.ids, None);
        // The legacy shape has one text: the answer's tokens.
        let logprobs = logprobs.map(|l| CompletionLogprobs::new(&l.content, 0));
        let mut body = chunks.completion(text, reasoning, Some(finished.reason.as_openai()), logprobs);
        body.usage = Some(UsageBody::new(finished.usage, &finished.reasoning));
        body.terse = Some(TerseExtension::new(mode, &finished.reasoning));
        Json(body).into_response()
    }

    fn chunks(reply: ReplyContext, echo: Option<String>) -> TextChunks {
        TextChunks(reply.ids, echo)
    }
}

/// A text completion's body, whole or as stream chunks (the echoed prompt first).
pub struct TextChunks(ResponseIds, Option<String>);

impl TextChunks {
    fn completion(
        &self,
        text: String,
        reasoning_content: Option<String>,
        finish_reason: Option<&'static str>,
        logprobs: Option<CompletionLogprobs>,
    ) -> TextCompletion {
        self.object(vec![TextChoice { index: 0, text, reasoning_content, finish_reason, logprobs }])
    }

    fn object(&self, choices: Vec<TextChoice>) -> TextCompletion {
        self.0.completion("text_completion", choices)
    }
}

impl ChunkFormat for TextChunks {
    fn opening(&self) -> Option<String> {
        let echo = self.1.clone().filter(|e| !e.is_empty())?;
        Some(serde_json::to_string(&self.completion(echo, None, None, None)).unwrap_or_default())
    }

    fn text(&mut self, text: String, phase: Phase, logprobs: Option<ChatLogprobs>) -> Option<String> {
        let logprobs = logprobs.map(|l| CompletionLogprobs::new(&l.content, 0));
        let body = match phase {
            Phase::Thinking => self.completion(String::new(), Some(text), None, logprobs),
            Phase::Answer => self.completion(text, None, None, logprobs),
        };
        Some(serde_json::to_string(&body).unwrap_or_default())
    }

    fn finish(&mut self, reason: &'static str, terse: TerseExtension) -> String {
        let mut body = self.completion(String::new(), None, Some(reason), None);
        body.terse = Some(terse);
        serde_json::to_string(&body).unwrap_or_default()
    }

    fn usage(&self, usage: UsageBody) -> String {
        let mut body = self.object(vec![]);
        body.usage = Some(usage);
        serde_json::to_string(&body).unwrap_or_default()
    }
}

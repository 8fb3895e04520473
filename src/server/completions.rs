//! `POST /v1/completions` (text completion: the prompt is sent as it is).

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::extract::JsonObject;
use super::generate::{self, RequestRecord};
use super::openai::{unix_now, TerseExtension, TextChoice, TextCompletion, UsageBody};
use crate::reasoning::modes::Mode;
use crate::reasoning::phase::Phase;
use super::sse::{self, ChunkFormat};
use super::validate::{self, Fields, Prompt};
use super::{request_id, AppState};
use crate::engine::GenerationStream;

const ENDPOINT: &str = "completions";

pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<JsonObject, ApiError>,
) -> Response {
    let mut record = RequestRecord::new(&state, ENDPOINT, request_id(&headers));
    match handle(&state, body, &mut record).await {
        Ok((events, params)) => {
            let ids = Ids {
                id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
                created: unix_now(),
                model: state.served_name.clone(),
            };
            if params.stream {
                return sse::response(events, record, ids, params.include_usage);
            }
            match generate::collect(events, &mut record).await {
                Ok(done) => {
                    let terse = TerseExtension::new(record.mode_label(), &done.reasoning_usage);
                    let mut body = ids.completion(done.text, done.reasoning, Some(done.reason.as_openai()));
                    body.usage = Some(UsageBody::new(done.usage, &done.reasoning_usage));
                    body.terse = Some(terse);
                    Json(body).into_response()
                }
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
) -> Result<(GenerationStream, validate::CommonParams), ApiError> {
    let JsonObject(map) = body?;
    let fields = Fields::new(&map);
    record.set_mode(validate::mode_of(&fields));
    validate::check_model(&fields, &state.served_name)?;
    // The vocabulary bound of token-id prompts needs the engine; check the rest first.
    if fields.get("prompt").is_none() {
        return Err(ApiError::field("prompt", "`prompt` is required"));
    }
    let params = validate::common_params(&fields)?;
    validate::refuse_unsupported(&fields, false)?;
    let engine = generate::engine(state)?;
    let prompt = match validate::completion_prompt(&fields, engine.tokenizer().vocab_size())? {
        Prompt::Tokens(ids) => ids,
        Prompt::Text(text) => {
            let engine = engine.clone();
            generate::blocking(move || {
                engine
                    .tokenizer()
                    .encode(&text)
                    .map_err(|e| ApiError::Internal(format!("tokenizing the prompt: {e}")))
            })
            .await?
        }
    };
    let mut prompt = prompt;
    if params.mode == Mode::None {
        generate::close_open_thought(&engine, &mut prompt);
    }
    let events = generate::submit(&engine, prompt, &params, record)?;
    Ok((events, params))
}

struct Ids {
    id: String,
    created: u64,
    model: String,
}

impl Ids {
    fn completion(&self, text: String, reasoning_content: Option<String>, finish_reason: Option<&'static str>) -> TextCompletion {
        let choices = vec![TextChoice {
            index: 0,
            text,
            reasoning_content,
            finish_reason,
            logprobs: None,
        }];
        self.object(choices)
    }

    fn object(&self, choices: Vec<TextChoice>) -> TextCompletion {
        TextCompletion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: None,
            terse: None,
        }
    }
}

impl ChunkFormat for Ids {
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

//! The one skeleton of the generation endpoints: parse and check the body,
//! build the prompt, submit it, then stream the reply or collect it. Each
//! endpoint (`chat.rs`, `completions.rs`) says only what is its own: its
//! fields, its prompt, and the shape of its reply ([`Endpoint`]).

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::extract::JsonObject;
use super::generate::{self, Collected, Generation};
use super::openai::{unix_now, Completion};
use super::record::RequestRecord;
use super::sse::{self, ChunkFormat};
use super::validate::{mode_of, GenerationParams};
use super::wire::{self, GenerationFields};
use super::{request_id, AppState};
use crate::engine::EngineHandle;

/// What every chunk and reply of one response repeats.
#[derive(Debug, Clone)]
pub struct ResponseIds {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ResponseIds {
    /// `choices` wrapped as an `object`, without usage or extension.
    pub fn completion<C>(&self, object: &'static str, choices: Vec<C>) -> Completion<C> {
        Completion { id: self.id.clone(), object, created: self.created, model: self.model.clone(), choices, usage: None, terse: None }
    }
}

/// What a generation endpoint adds to the skeleton.
pub trait Endpoint: 'static {
    /// The `endpoint` label of the metrics.
    const NAME: &'static str;
    /// Response ids are this prefix and a random hex string.
    const ID_PREFIX: &'static str;
    /// The endpoint's own fields of the body.
    type Fields: DeserializeOwned + Send + 'static;
    type Chunks: ChunkFormat;

    /// Check the endpoint's own fields (before the engine is asked for anything).
    fn check(fields: &Self::Fields) -> Result<(), ApiError>;
    /// Refuse what the endpoint's own fields ask for and terse lacks.
    fn refuse_unsupported(fields: &Self::Fields) -> Result<(), ApiError>;
    /// The prompt's token ids.
    fn prompt(engine: &EngineHandle, fields: Self::Fields, params: &GenerationParams) -> impl Future<Output = Result<Vec<u32>, ApiError>> + Send;
    /// The whole reply of a request that did not ask for a stream.
    fn reply(ids: ResponseIds, done: Collected, mode: &'static str) -> Response;
    fn chunks(ids: ResponseIds) -> Self::Chunks;
}

/// The axum handler of endpoint `E`.
pub async fn handle<E: Endpoint>(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Result<JsonObject, ApiError>) -> Response {
    let mut record = RequestRecord::new(&state, E::NAME, request_id(&headers));
    let prepared = match body {
        Ok(JsonObject(map)) => {
            let body = Value::Object(map);
            record.set_mode(mode_of(&body));
            prepare::<E>(&state, &body).await
        }
        Err(e) => Err(e),
    };
    let (engine, prompt, params) = match prepared {
        Ok(p) => p,
        Err(e) => return record.reject(e),
    };
    let stream = match generate::submit(&engine, prompt, &params, &state.limits, &mut record) {
        Ok(stream) => stream,
        Err(e) => return record.reject(e),
    };
    let mut generation = Generation::new(stream, record, &state.limits);
    let ids = ResponseIds {
        id: format!("{}{}", E::ID_PREFIX, uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: state.served_name.clone(),
    };
    if params.stream {
        return sse::response(generation, E::chunks(ids), params.include_usage);
    }
    match generate::collect(&mut generation).await {
        Ok(done) => E::reply(ids, done, generation.record().mode_label()),
        Err(e) => generation.record().reject(e),
    }
}

/// The checked request and its prompt, in the order a client hears of
/// problems: the body's types, the model, the endpoint's own fields, the
/// shared ones, what terse lacks, then whether the engine can take it.
async fn prepare<E: Endpoint>(state: &AppState, body: &Value) -> Result<(EngineHandle, Vec<u32>, GenerationParams), ApiError> {
    let shared: GenerationFields = wire::parse(body)?;
    let own: E::Fields = wire::parse(body)?;
    shared.check_model(&state.served_name)?;
    E::check(&own)?;
    let params = shared.params()?;
    shared.refuse_unsupported()?;
    E::refuse_unsupported(&own)?;
    let engine = generate::engine(state)?;
    let prompt = E::prompt(&engine, own, &params).await?;
    Ok((engine, prompt, params))
}

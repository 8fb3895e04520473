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
use super::wire::{self, FieldUse, GenerationFields};
use super::{request_id, AppState};
use crate::engine::{Constraint, EngineHandle};
use crate::reasoning::modes::Mode;

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
    /// Their names, and what terse does with each.
    const FIELDS: &'static [(&'static str, FieldUse)];
    type Chunks: ChunkFormat;
    /// What the reply needs to know of the request (chat: how to find tool calls).
    type Shape: Send + 'static;

    /// Check the endpoint's own fields (before the engine is asked for anything).
    fn check(fields: &Self::Fields) -> Result<(), ApiError>;
    /// Refuse what the endpoint's own fields ask for and terse lacks.
    fn refuse_unsupported(fields: &Self::Fields) -> Result<(), ApiError>;
    /// Whether (and with how many alternatives) log-probabilities are asked for.
    fn logprobs(fields: &Self::Fields) -> Result<Option<usize>, ApiError>;
    /// The prompt's token ids, and what else the request makes of the reply.
    fn prompt(
        engine: &EngineHandle,
        fields: Self::Fields,
        params: &GenerationParams,
    ) -> impl Future<Output = Result<Prompted<Self::Shape>, ApiError>> + Send;
    /// The whole reply of a request that did not ask for a stream.
    fn reply(reply: ReplyContext, done: Collected, mode: &'static str, shape: Self::Shape) -> Response;
    fn chunks(reply: ReplyContext, shape: Self::Shape) -> Self::Chunks;
}

/// An endpoint's prompt.
pub struct Prompted<S> {
    pub tokens: Vec<u32>,
    /// The grammar the endpoint's own fields ask for (a forced tool call).
    pub grammar: Option<Constraint>,
    pub shape: S,
}

/// What a reply is written with.
pub struct ReplyContext {
    pub ids: ResponseIds,
    /// `terse_tool_calls_total` of the served model.
    pub tool_calls: prometheus::IntCounter,
}

/// A generation under way, and what its reply needs.
pub struct Started<S> {
    pub generation: Generation,
    pub params: GenerationParams,
    pub shape: S,
    /// `terse_tool_calls_total` of the served model.
    pub tool_calls: prometheus::IntCounter,
}

/// Check `body` as endpoint `E` reads it and submit it; an error is answered
/// (and recorded) at once, its `param` renamed by `rename` first (the
/// Responses API speaks of `input` where chat says `messages`).
pub async fn start<E: Endpoint>(
    state: &AppState,
    body: Result<Value, ApiError>,
    mut record: RequestRecord,
    rename: impl Fn(ApiError) -> ApiError,
) -> Result<Started<E::Shape>, Response> {
    let prepared = match body {
        Ok(body) => {
            record.set_mode(mode_of(&body));
            prepare::<E>(state, &body).await
        }
        Err(e) => Err(e),
    };
    let Prepared { engine, prompt, params, constraint, shape } = match prepared {
        Ok(p) => p,
        Err(e) => return Err(record.reject(rename(e))),
    };
    let kind = constraint.as_ref().map(|c| c.kind);
    let stream = match generate::submit(&engine, prompt, &params, constraint, &state.limits, &mut record) {
        Ok(stream) => stream,
        Err(e) => return Err(record.reject(rename(e))),
    };
    if let Some(kind) = kind {
        state.metrics.constrained_requests_total.with_label_values(&[&state.served_name, kind.as_str()]).inc();
    }
    let generation = Generation::new(&engine, stream, record, &state.limits).with_logprobs(params.logprobs.is_some());
    let tool_calls = state.metrics.tool_calls_total.with_label_values(&[&state.served_name]);
    Ok(Started { generation, params, shape, tool_calls })
}

/// The axum handler of endpoint `E`.
pub async fn handle<E: Endpoint>(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Result<JsonObject, ApiError>) -> Response {
    let record = RequestRecord::new(&state, E::NAME, request_id(&headers));
    let body = body.map(|JsonObject(map)| Value::Object(map));
    let Started { mut generation, params, shape, tool_calls } = match start::<E>(&state, body, record, |e| e).await {
        Ok(started) => started,
        Err(response) => return response,
    };
    let ids = ResponseIds {
        id: format!("{}{}", E::ID_PREFIX, uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: state.served_name.clone(),
    };
    let reply = ReplyContext { ids, tool_calls };
    if params.stream {
        return sse::response(generation, E::chunks(reply, shape), params.include_usage);
    }
    match generate::collect(&mut generation).await {
        Ok(done) => E::reply(reply, done, generation.record().mode_label(), shape),
        Err(e) => generation.record().reject(e),
    }
}

/// A checked request, ready to submit.
struct Prepared<S> {
    engine: EngineHandle,
    prompt: Vec<u32>,
    params: GenerationParams,
    /// The compiled grammar of its answer, if it asked for one.
    constraint: Option<Constraint>,
    shape: S,
}

/// The checked request and its prompt, in the order a client hears of
/// problems: the body's types, the model, the endpoint's own fields, the
/// shared ones, what terse lacks, then whether the engine can take it.
async fn prepare<E: Endpoint>(state: &AppState, body: &Value) -> Result<Prepared<E::Shape>, ApiError> {
    let shared: GenerationFields = wire::parse(body)?;
    let own: E::Fields = wire::parse(body)?;
    wire::refuse_unknown_fields(body, &[wire::SHARED_FIELDS, E::FIELDS])?;
    shared.check_model(&state.served_name)?;
    E::check(&own)?;
    let mut params = shared.params()?;
    params.logprobs = E::logprobs(&own)?;
    E::refuse_unsupported(&own)?;
    let engine = generate::engine(state)?;
    let Prompted { tokens, grammar, shape } = E::prompt(&engine, own, &params).await?;
    if params.logprobs.is_some() {
        // Token texts come from the grammar's vocabulary, built on first use: not on an async worker.
        let engine = engine.clone();
        generate::blocking(move || {
            let _ = engine.grammar_compiler();
            Ok(())
        })
        .await?;
    }
    let constraint = match (params.format.clone(), grammar) {
        (Some(_), Some(_)) => {
            return Err(ApiError::unsupported("response_format", "a `response_format` cannot go with a forced tool call; choose one"))
        }
        (Some(format), None) => {
            let engine = engine.clone();
            Some(generate::blocking(move || format.compile(&engine)).await?)
        }
        (None, grammar) => grammar,
    };
    let constraint = constraint.map(|c| Constraint { may_open_thought: params.mode != Mode::None, ..c });
    Ok(Prepared { engine, prompt: tokens, params, constraint, shape })
}

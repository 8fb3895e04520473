//! Streaming a generation as Server-Sent Events, shared by chat and text
//! completions: each endpoint only says how its chunks look ([`ChunkFormat`]).
//!
//! The SSE body owns the [`Generation`]: when the client disconnects, hyper
//! drops the body, which cancels the sequence in the engine; the request is
//! recorded (status 499) once the engine has answered with its usage.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};

use super::error::ApiError;
use super::generate::{Generation, Output};
use super::openai::{ChatLogprobs, TerseExtension, UsageBody};
use crate::reasoning::phase::Phase;

/// Comment lines sent while no token arrives (e.g. a long queue wait), so that
/// proxies keep the connection open.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// How one endpoint renders its stream chunks, as JSON text.
pub trait ChunkFormat: Send + 'static {
    /// Sent before any token (the chat role chunk), if any.
    fn opening(&self) -> Option<String>;
    /// A piece of the thinking or of the answer, never both, with the
    /// log-probabilities of its tokens when the request asked for them.
    /// `None` when there is nothing to send yet (text held back).
    fn text(&mut self, text: String, phase: Phase, logprobs: Option<ChatLogprobs>) -> Option<String>;
    fn finish(&mut self, reason: &'static str, terse: TerseExtension) -> String;
    /// The usage-only chunk of `stream_options.include_usage`.
    fn usage(&self, usage: UsageBody) -> String;
}

/// Where a stream is.
enum Stage {
    Opening,
    Streaming,
    Done,
}

struct State<F> {
    generation: Generation,
    format: F,
    include_usage: bool,
    stage: Stage,
}

fn data(json: String) -> Event {
    Event::default().data(json)
}

fn done() -> Event {
    Event::default().data("[DONE]")
}

/// The SSE events of one generation, ending in `data: [DONE]`.
fn events<F: ChunkFormat>(state: State<F>) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    stream::unfold(state, |mut st| async move {
        let batch = match st.stage {
            Stage::Done => return None,
            Stage::Opening => {
                st.stage = Stage::Streaming;
                st.format.opening().map(data).into_iter().collect()
            }
            // Past the deadline, or a failure: the stream ends with the error,
            // and the sequence is cancelled when the body is dropped.
            Stage::Streaming => match st.generation.next().await {
                Ok(Output::Text(text, phase)) => {
                    let logprobs = st.generation.wants_logprobs().then(|| st.generation.take_logprobs());
                    st.format.text(text, phase, logprobs).map(data).into_iter().collect()
                }
                Ok(Output::Finished(end)) => {
                    st.stage = Stage::Done;
                    let terse = TerseExtension::new(st.generation.record().mode_label(), &end.reasoning);
                    let mut out = vec![data(st.format.finish(end.reason.as_openai(), terse))];
                    if st.include_usage {
                        out.push(data(st.format.usage(UsageBody::new(end.usage, &end.reasoning))));
                    }
                    out.push(done());
                    out
                }
                Err(e) => fail(&mut st, e),
            },
        };
        Some((batch, st))
    })
    .flat_map(|batch| stream::iter(batch.into_iter().map(Ok)))
}

/// An error after the stream has begun: an SSE event with OpenAI's error body.
fn fail<F>(st: &mut State<F>, error: ApiError) -> Vec<Event> {
    tracing::warn!(error = %error, "stream failed");
    st.generation.record().set_error(&error);
    st.stage = Stage::Done;
    vec![data(error.to_json()), done()]
}

pub fn response<F: ChunkFormat>(generation: Generation, format: F, include_usage: bool) -> Response {
    let state = State { generation, format, include_usage, stage: Stage::Opening };
    Sse::new(events(state)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response()
}

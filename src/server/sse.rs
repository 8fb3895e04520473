//! Streaming a generation as Server-Sent Events, shared by chat and text
//! completions: each endpoint only says how its chunks look ([`ChunkFormat`]).
//!
//! The SSE body owns the [`GenerationStream`] and the [`RequestRecord`]: when
//! the client disconnects, hyper drops the body, which cancels the sequence in
//! the engine and records the request (status 499) at that moment.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};

use super::error::ApiError;
use super::generate::RequestRecord;
use super::openai::{TerseExtension, UsageBody};
use crate::engine::{GenerationEvent, GenerationStream};
use crate::reasoning::phase::Phase as TextPhase;

/// Comment lines sent while no token arrives (e.g. a long queue wait), so that
/// proxies keep the connection open.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// How one endpoint renders its stream chunks, as JSON text.
pub trait ChunkFormat: Send + 'static {
    /// Sent before any token (the chat role chunk), if any.
    fn opening(&self) -> Option<String>;
    /// A piece of the thinking or of the answer, never both.
    fn text(&self, text: String, phase: TextPhase) -> String;
    fn finish(&self, reason: &'static str, terse: TerseExtension) -> String;
    /// The usage-only chunk of `stream_options.include_usage`.
    fn usage(&self, usage: UsageBody) -> String;
}

enum Phase {
    Opening,
    Streaming,
    Done,
}

struct State<F> {
    events: GenerationStream,
    record: RequestRecord,
    format: F,
    include_usage: bool,
    phase: Phase,
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
        let batch = match st.phase {
            Phase::Done => return None,
            Phase::Opening => {
                st.phase = Phase::Streaming;
                match st.format.opening() {
                    Some(json) => vec![data(json)],
                    None => vec![],
                }
            }
            Phase::Streaming => loop {
                let event = match st.record.next_event(&mut st.events).await {
                    Ok(event) => event,
                    // Past the deadline: the stream ends with the error and the
                    // sequence is cancelled when the body is dropped.
                    Err(e) => break fail(&mut st, e),
                };
                match event {
                    Some(GenerationEvent::Token { text, phase, .. }) => {
                        st.record.on_token(phase);
                        if !text.is_empty() {
                            break vec![data(st.format.text(text, phase))];
                        }
                    }
                    Some(GenerationEvent::Finished { reason, usage, reasoning }) => {
                        st.record.on_finished(&usage, &reasoning);
                        st.phase = Phase::Done;
                        let terse = TerseExtension::new(st.record.mode_label(), &reasoning);
                        let mut out = vec![data(st.format.finish(reason.as_openai(), terse))];
                        if st.include_usage {
                            out.push(data(st.format.usage(UsageBody::new(usage, &reasoning))));
                        }
                        out.push(done());
                        break out;
                    }
                    Some(GenerationEvent::Failed { message }) => {
                        break fail(&mut st, ApiError::Internal(format!("generation failed: {message}")));
                    }
                    None => {
                        break fail(
                            &mut st,
                            ApiError::Internal("the engine stopped before finishing the request".into()),
                        );
                    }
                }
            },
        };
        Some((batch, st))
    })
    .flat_map(|batch| stream::iter(batch.into_iter().map(Ok)))
}

/// An error after the stream has begun: an SSE event with OpenAI's error body.
fn fail<F>(st: &mut State<F>, error: ApiError) -> Vec<Event> {
    tracing::warn!(error = %error, "stream failed");
    st.record.set_error(&error);
    st.phase = Phase::Done;
    vec![data(error.to_json()), done()]
}

pub fn response<F: ChunkFormat>(
    events_in: GenerationStream,
    record: RequestRecord,
    format: F,
    include_usage: bool,
) -> Response {
    let state = State {
        events: events_in,
        record,
        format,
        include_usage,
        phase: Phase::Opening,
    };
    Sse::new(events(state))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

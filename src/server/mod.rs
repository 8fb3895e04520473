//! The OpenAI-compatible HTTP API: axum routes, tower layers, wire types, errors.
//!
//! The listener is bound first and the model loads in the background, so
//! `/health` answers at once and `/ready` says 503 until the engine is up.
//! Shutdown (SIGTERM / SIGINT, or [`RunningServer::shutdown`]) makes new
//! generation requests and `/ready` 503, keeps accepting until the requests in
//! flight are done, then closes the listener; [`ServeConfig::shutdown_grace`]
//! bounds the whole drain.
//!
//! One file per endpoint (`chat.rs`, `completions.rs`, `models.rs`, `health.rs`);
//! the generation endpoints' one skeleton in `endpoint.rs`; their requests as
//! types in `wire.rs` and the checks on them in `validate.rs`; the one error
//! type in `error.rs`; submitting and reading a generation in `generate.rs`,
//! streaming it in `sse.rs`; its metrics and log line in `record.rs`.
//!
//! Choices where OpenAI's API is silent or does not apply:
//! - The body is parsed as JSON whatever its `Content-Type` (curl's `-d` sends
//!   a form type). A body over `max_body_bytes` is read and discarded (up to
//!   4x the limit) before the 413, so the client gets the answer, not a reset.
//! - `developer` messages are given to the chat template as `system`.
//! - Every top-level field is in `wire::SHARED_FIELDS` or the endpoint's own
//!   list, with what terse does with it: honoured; accepted and ignored where
//!   it changes nothing terse generates (`user`, `metadata`, `store`, ...);
//!   or refused (400 `unsupported_parameter`, naming it) where terse lacks
//!   the feature (`n` and `best_of` > 1, `suffix`, `echo` with `logprobs`, audio, ...),
//!   rather than a reply that silently ignores it. A field no list names is
//!   a 400, as with OpenAI; terse's own `reasoning` object is strict too.
//! - A request whose client hung up is counted with status `499`.
//! - 429 (queue full) and 503 while loading carry `Retry-After: 1`.
//! - With API keys configured (`auth.rs`), all but the open routes of
//!   [`ROUTES`] (`/health`, `/ready`, `/metrics`, `/openapi.json`) need
//!   `Authorization: Bearer KEY`, else 401 `invalid_api_key`.
//! - [`RequestLimits::timeout`] is a deadline for the whole request, queueing
//!   included: past it the generation is cancelled and the client gets 504
//!   `request_timeout` (or, once a stream has begun, that error as its last
//!   event before `[DONE]`).
//! - [`RequestLimits::max_tokens`] is a ceiling on `max_tokens`: a request
//!   asking for more gets 400 naming the field rather than a silently shorter
//!   answer; a request that sets no `max_tokens` gets the ceiling (or what
//!   the context leaves, if less).

mod access_log;
pub mod auth;
mod chat;
mod completions;
mod endpoint;
pub mod error;
mod extract;
mod generate;
mod health;
mod models;
mod openapi;
pub mod openai;
mod record;
pub mod responses;
mod sse;
pub mod structured;
mod tool_calls;
pub mod validate;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use axum::http::{HeaderMap, HeaderName, Request};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::engine::{start_engine, EngineConfig, EngineHandle};
pub use auth::ApiKeys;
use crate::metrics::Metrics;

pub const CHAT_COMPLETIONS: &str = "/v1/chat/completions";
pub const COMPLETIONS: &str = "/v1/completions";
pub const RESPONSES: &str = "/v1/responses";
pub const MODELS: &str = "/v1/models";
pub const MODEL: &str = "/v1/models/{model}";
pub const HEALTH: &str = "/health";
pub const READY: &str = "/ready";
pub const METRICS: &str = "/metrics";
pub const OPENAPI: &str = "/openapi.json";
pub const PLAYGROUND: &str = "/";

/// One route of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    /// Served without an API key.
    pub open: bool,
}

const fn route(method: &'static str, path: &'static str, open: bool) -> Route {
    Route { method, path, open }
}

/// Every route: the router is built from this table, and `/openapi.json`
/// describes it, so neither can list a route the other lacks.
pub const ROUTES: &[Route] = &[
    route("POST", CHAT_COMPLETIONS, false),
    route("POST", COMPLETIONS, false),
    route("POST", RESPONSES, false),
    route("GET", MODELS, false),
    route("GET", MODEL, false),
    route("GET", HEALTH, true),
    route("GET", READY, true),
    route("GET", METRICS, true),
    route("GET", OPENAPI, true),
    // The page holds no secret; its requests carry the key the user types.
    route("GET", PLAYGROUND, true),
];

/// The handler of a route of [`ROUTES`].
fn handler(route: &Route) -> axum::routing::MethodRouter<Arc<AppState>> {
    match route.path {
        CHAT_COMPLETIONS => post(endpoint::handle::<chat::Chat>),
        COMPLETIONS => post(endpoint::handle::<completions::Completions>),
        RESPONSES => post(responses::handle),
        MODELS => get(models::list),
        MODEL => get(models::retrieve),
        HEALTH => get(health::health),
        READY => get(health::ready),
        METRICS => get(health::metrics),
        OPENAPI => get(|| async { axum::Json(openapi::document()) }),
        PLAYGROUND => get(health::playground),
        other => unreachable!("{other} is in ROUTES without a handler"),
    }
}

const REQUEST_ID: &str = "x-request-id";

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    /// 0 picks a free port (see [`RunningServer::addr`]).
    pub port: u16,
    pub model_path: PathBuf,
    /// The name clients pass as `model`.
    pub served_name: String,
    pub engine: EngineConfig,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long requests in flight may run on after shutdown begins.
    pub shutdown_grace: Duration,
    /// Keys a client must present; empty: no authentication.
    pub api_keys: ApiKeys,
    pub limits: RequestLimits,
}

/// Per-request limits beyond the engine's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestLimits {
    /// Deadline of a whole generation request, from its arrival; `None`: none.
    pub timeout: Option<Duration>,
    /// Most completion tokens one request may ask for; `None`: the context is the limit.
    pub max_tokens: Option<usize>,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits { timeout: Some(Duration::from_secs(DEFAULT_REQUEST_TIMEOUT_SECS)), max_tokens: None }
    }
}

/// The server's defaults, one source for `ServeConfig::new` and the command line's.
pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PORT: u16 = 8080;
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(DEFAULT_SHUTDOWN_GRACE_SECS);
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 600;

impl ServeConfig {
    /// Defaults for everything but the model: 127.0.0.1, port 8080.
    pub fn new(model_path: impl Into<PathBuf>, served_name: impl Into<String>) -> Self {
        ServeConfig {
            host: DEFAULT_HOST.into(),
            port: DEFAULT_PORT,
            model_path: model_path.into(),
            served_name: served_name.into(),
            engine: EngineConfig::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            api_keys: ApiKeys::default(),
            limits: RequestLimits::default(),
        }
    }
}

/// What the handlers share.
pub struct AppState {
    pub served_name: String,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: usize,
    /// Set once the model has loaded.
    pub engine: OnceLock<EngineHandle>,
    /// Unix seconds of the server's start (`created` of `/v1/models`).
    pub started_at: u64,
    pub limits: RequestLimits,
    api_keys: ApiKeys,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Refuse new generation requests (503) and make `/ready` say 503.
    fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        if let Some(engine) = self.engine.get() {
            engine.begin_shutdown();
        }
    }

    fn set_engine(&self, engine: EngineHandle) {
        let _ = self.engine.set(engine);
        // A shutdown that began while loading must reach the engine too.
        if self.is_shutting_down() {
            self.begin_shutdown();
        }
    }
}

/// The request id that `SetRequestIdLayer` put on the request.
pub(crate) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

/// All routes and layers over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let request_id = HeaderName::from_static(REQUEST_ID);
    let layers = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<axum::body::Body>| {
                    let id = req
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
                })
                // The request's own line is the access log's or the generation record's.
                .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        .layer(PropagateRequestIdLayer::new(request_id));
    let app = ROUTES
        .iter()
        .fold(Router::new(), |app, r| app.route(r.path, handler(r)))
        .fallback(health::not_found)
        .method_not_allowed_fallback(health::method_not_allowed)
        .layer(axum::middleware::from_fn(access_log::log_request));
    // Outside the access log (401s log themselves), inside the request id.
    let app = if state.api_keys.is_empty() {
        app
    } else {
        app.layer(axum::middleware::from_fn_with_state(
            state.api_keys.clone(),
            auth::require_api_key,
        ))
    };
    app.layer(layers).with_state(state)
}

#[derive(Debug, Clone, PartialEq)]
enum LoadState {
    Loading,
    Ready,
    Failed(String),
}

/// A server started by [`spawn`]. Dropping it shuts the server down.
pub struct RunningServer {
    addr: SocketAddr,
    state: Arc<AppState>,
    load: watch::Receiver<LoadState>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl RunningServer {
    /// The bound address (the real port when the config asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Wait until the model is loaded; an error if loading failed.
    pub async fn wait_ready(&self) -> Result<()> {
        let mut load = self.load.clone();
        let state = load
            .wait_for(|s| *s != LoadState::Loading)
            .await
            .map_err(|_| anyhow!("the server stopped while loading the model"))?
            .clone();
        match state {
            LoadState::Failed(message) => Err(anyhow!(message)),
            _ => Ok(()),
        }
    }

    /// The engine, once loaded.
    pub fn engine(&self) -> Option<EngineHandle> {
        self.state.engine.get().cloned()
    }

    /// Begin a graceful shutdown (as SIGTERM does); `join` waits for its end.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Wait for the server to stop (after [`RunningServer::shutdown`]).
    pub async fn join(self) -> Result<()> {
        let RunningServer { task, shutdown, .. } = self;
        let result = task.await.context("the server task panicked")?;
        drop(shutdown);
        result
    }
}

/// Bind, start loading the model in the background, and serve until
/// [`RunningServer::shutdown`] (no signal handling: that is [`serve`]'s).
pub async fn spawn(config: ServeConfig, metrics: Arc<Metrics>) -> Result<RunningServer> {
    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        model = %config.served_name,
        api_keys = config.api_keys.len(),
        "listening"
    );

    let state = Arc::new(AppState {
        served_name: config.served_name.clone(),
        metrics: metrics.clone(),
        max_body_bytes: config.max_body_bytes,
        engine: OnceLock::new(),
        started_at: openai::unix_now(),
        limits: config.limits,
        api_keys: config.api_keys.clone(),
        shutting_down: AtomicBool::new(false),
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (load_tx, load_rx) = watch::channel(LoadState::Loading);

    // Load the model off the async workers; on failure, stop the server.
    {
        let state = state.clone();
        let shutdown_tx = shutdown_tx.clone();
        let ServeConfig {
            model_path,
            served_name,
            engine,
            ..
        } = config.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let loaded =
                tokio::task::spawn_blocking(move || start_engine(&model_path, &served_name, engine, metrics)).await;
            match loaded {
                Ok(Ok(handle)) => {
                    tracing::info!(secs = started.elapsed().as_secs_f64(), "model loaded; ready");
                    state.set_engine(handle);
                    let _ = load_tx.send(LoadState::Ready);
                }
                Ok(Err(e)) => {
                    let message = format!("loading the model failed: {e:#}");
                    tracing::error!("{message}");
                    let _ = load_tx.send(LoadState::Failed(message));
                    let _ = shutdown_tx.send(true);
                }
                Err(e) => {
                    let message = format!("loading the model panicked: {e}");
                    tracing::error!("{message}");
                    let _ = load_tx.send(LoadState::Failed(message));
                    let _ = shutdown_tx.send(true);
                }
            }
        });
    }

    let app = router(state.clone());
    let task = tokio::spawn(run(listener, app, state.clone(), shutdown_rx, config.shutdown_grace));
    Ok(RunningServer {
        addr,
        state,
        load: load_rx,
        shutdown: shutdown_tx,
        task,
    })
}

/// Serve until the shutdown flag is raised (or its sender dropped), then give
/// requests in flight `grace` to finish.
async fn run(
    listener: TcpListener,
    app: Router,
    state: Arc<AppState>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> Result<()> {
    let signal = {
        let mut shutdown = shutdown.clone();
        let state = state.clone();
        async move {
            let _ = shutdown.wait_for(|s| *s).await;
            tracing::info!("shutting down: requests in flight finish, new ones get 503");
            state.begin_shutdown();
            // Keep accepting (and answering 503, `/ready` included) until the
            // engine has drained, so clients are told rather than refused; the
            // grace period below bounds the wait.
            while state.engine.get().is_some_and(|e| e.in_flight() > 0) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::info!("drained: no new connections");
        }
    };
    let server = std::future::IntoFuture::into_future(axum::serve(listener, app).with_graceful_shutdown(signal));
    tokio::pin!(server);
    let mut shutdown = shutdown;
    tokio::select! {
        result = &mut server => return result.context("serving HTTP"),
        _ = shutdown.wait_for(|s| *s) => {}
    }
    match tokio::time::timeout(grace, &mut server).await {
        Ok(result) => result.context("serving HTTP")?,
        Err(_) => {
            let in_flight = state.engine.get().map_or(0, |e| e.in_flight());
            tracing::warn!(
                in_flight,
                grace_secs = grace.as_secs_f64(),
                "grace period over; dropping what is left"
            );
        }
    }
    tracing::info!("server stopped");
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn os_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("received SIGINT"),
        _ = terminate => tracing::info!("received SIGTERM"),
    }
}

/// Serve the API until SIGTERM / SIGINT. Fails if the port cannot be bound or
/// the model cannot be loaded.
pub async fn serve(config: ServeConfig, metrics: Arc<Metrics>) -> Result<()> {
    let server = spawn(config, metrics).await?;
    let load = server.load.clone();
    let shutdown = server.shutdown.clone();
    let signals = tokio::spawn(async move {
        os_signal().await;
        let _ = shutdown.send(true);
    });
    let result = server.join().await;
    signals.abort();
    if let LoadState::Failed(message) = &*load.borrow() {
        return Err(anyhow!(message.clone()));
    }
    result
}

//! Shared helpers of the HTTP integration tests: servers on their own runtime
//! threads (so one server can serve every test of the binary), and small HTTP
//! and SSE helpers over reqwest.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::Value;
use terse::engine::EngineConfig;
use terse::metrics::Metrics;
use terse::server::{spawn, ServeConfig};

/// The default model; `./models/fetch smollm2-135m` must have been run.
pub const MODEL: &str = "smollm2-135m";

/// The chat route, as the server defines it.
pub const CHAT: &str = terse::server::CHAT_COMPLETIONS;

/// A greedy one-turn chat request for the default model.
pub fn chat_body(prompt: &str, max_tokens: usize) -> Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// A server running on a runtime of its own; dropping it shuts the server down.
pub struct TestServer {
    pub url: String,
    pub metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub fn start(engine: EngineConfig) -> TestServer {
        // `engine`'s limits, the model's own reasoning profile.
        Self::start_with(|config| config.engine = EngineConfig { reasoning: config.engine.reasoning.clone(), ..engine })
    }

    /// A server on the default model, with `configure` applied to its settings.
    pub fn start_with(configure: impl FnOnce(&mut ServeConfig)) -> TestServer {
        Self::start_model_with(MODEL, configure)
    }

    /// A server on the fetched model `name`.
    pub fn start_model_with(name: &str, configure: impl FnOnce(&mut ServeConfig)) -> TestServer {
        let model = terse::manifest::resolve_model(name)
            .unwrap_or_else(|e| panic!("{e:#} (run `./models/fetch {name}` first)"));
        let mut config = ServeConfig::new(model.path, model.served_name);
        config.port = 0;
        // The model's own reasoning profile and mode presets, as `terse serve` gives it.
        config.engine = EngineConfig { reasoning: model.reasoning, ..EngineConfig::default() };
        config.shutdown_grace = Duration::from_secs(60);
        configure(&mut config);
        let metrics = Arc::new(Metrics::new());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server_metrics = metrics.clone();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let server = match spawn(config, server_metrics).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return Ok(());
                    }
                };
                // `/ready` must say 503 or 200, never fail, while the model loads.
                if let Err(e) = server.wait_ready().await {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return Ok(());
                }
                let _ = ready_tx.send(Ok(server.url()));
                let _ = stop_rx.await;
                server.shutdown();
                server.join().await
            })
        });
        let url = ready_rx
            .recv()
            .expect("server thread died")
            .unwrap_or_else(|e| panic!("server failed: {e}"));
        TestServer {
            url,
            metrics,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Begin a graceful shutdown and wait until the server has stopped.
    pub fn shutdown_and_wait(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.thread.take().unwrap().join().expect("server thread panicked")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The server shared by the tests that only need a default server.
pub fn shared() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start(EngineConfig::default()))
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: Value,
}

pub async fn post_json(url: &str, body: &Value) -> Reply {
    let resp = client().post(url).json(body).send().await.expect("request failed");
    reply(resp).await
}

pub async fn post_raw(url: &str, body: Vec<u8>) -> Reply {
    let resp = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request failed");
    reply(resp).await
}

pub async fn get(url: &str) -> Reply {
    reply(client().get(url).send().await.expect("request failed")).await
}

async fn reply(resp: reqwest::Response) -> Reply {
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("reading the body");
    let json = match serde_json::from_str(&text) {
        Ok(json) => json,
        Err(_) => Value::String(text),
    };
    Reply { status, headers, json }
}

/// The `data:` payloads of an SSE response, in order (`[DONE]` kept as a string).
pub async fn post_sse(url: &str, body: &Value) -> (StatusCode, Vec<Value>) {
    let resp = client().post(url).json(body).send().await.expect("request failed");
    let status = resp.status();
    if status.is_success() {
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(ct.starts_with("text/event-stream"), "content type {ct}");
    }
    let text = resp.text().await.expect("reading the stream");
    (status, parse_sse(&text))
}

pub fn parse_sse(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| {
            let data = data.trim_start();
            serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.to_string()))
        })
        .collect()
}

/// Assert OpenAI's error shape and return `error`.
pub fn assert_openai_error(reply: &Reply, status: u16) -> &Value {
    assert_eq!(reply.status.as_u16(), status, "body: {}", reply.json);
    let error = reply
        .json
        .get("error")
        .unwrap_or_else(|| panic!("no `error` in {}", reply.json));
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
    assert!(error["type"].is_string(), "{error}");
    let obj = error.as_object().unwrap();
    assert!(obj.contains_key("param") && obj.contains_key("code"), "{error}");
    assert!(
        reply.headers.contains_key("x-request-id"),
        "no x-request-id on an error"
    );
    error
}

/// The value of one sample in Prometheus text (`name` with its labels, as written).
/// A reply's usage without `prompt_tokens_details`: how much of a prompt the
/// prefix cache held depends on what ran before, not on the request.
pub fn usage_counts(usage: &Value) -> Value {
    let mut usage = usage.clone();
    if let Some(fields) = usage.as_object_mut() {
        fields.remove("prompt_tokens_details");
    }
    usage
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// The sum of the samples of `name` whose labels include every one of `labels` (e.g. `status="499"`).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

pub async fn metrics_text(server: &TestServer) -> String {
    client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Run a Python script of tests/python; panics (fails the test) when python3,
/// the packages of tests/requirements.txt or the script's checks are missing.
pub fn run_python(script: &str, args: &[&str]) {
    eprintln!("{}", run_python_output(script, args));
}

/// Like [`run_python`], returning what the script printed.
pub fn run_python_output(script: &str, args: &[&str]) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = std::process::Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}); install Python 3 and `pip install -r tests/requirements.txt`")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}\n(packages: `pip install -r tests/requirements.txt`)",
        out.status
    );
    stdout.into_owned()
}

/// A server on a tiny qwen2 checkpoint with random weights and the real
/// DeepSeek-R1-Distill vocabulary and template (written here), with the R1
/// manifest's reasoning profile: it thinks until a control stops it.
/// `configure` as for [`TestServer::start_with`].
pub fn thinking_server(configure: impl Fn(&mut ServeConfig)) -> TestServer {
    let header = terse::manifest::models_dir().join("cache/r1-distill-tokenizer/DeepSeek-R1-Distill-Qwen-7B.header.gguf");
    assert!(header.is_file(), "{} is missing: run ./models/fetch r1-distill-tokenizer", header.display());
    static WRITTEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = WRITTEN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("terse-thinking-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("tiny-r1.gguf");
    terse::model::write_random_gguf(&model, &terse::model::SyntheticSpec::tiny_qwen2(152_064), &header).unwrap();
    let profile = terse::manifest::load_manifest("deepseek-r1-distill-qwen-1.5b").unwrap().reasoning_profile().unwrap();
    let server = TestServer::start_model_with(model.to_str().unwrap(), |c| {
        c.engine.reasoning = profile;
        configure(c);
    });
    let _ = std::fs::remove_dir_all(&dir);
    server
}

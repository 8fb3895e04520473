//! Runs every (problem, setting) pair against a running terse server over its
//! OpenAI chat endpoint, a bounded number at a time (so the server batches
//! them), grades each answer and appends it to the output as it arrives.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use super::data::Problem;
use super::grade::grade;
use super::rows::{fingerprint, Existing, Row, RowWriter};
use super::settings::Setting;

/// The default chain-of-thought prompt; `{question}` is replaced by the problem.
pub const DEFAULT_PROMPT: &str = "{question}\n\nSolve the problem step by step, and put the final answer in \\boxed{}.";

#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The server's base URL, e.g. `http://127.0.0.1:8080`.
    pub server: String,
    pub dataset: String,
    /// The user message; `{question}` is replaced by the problem.
    pub prompt: String,
    pub system: Option<String>,
    pub max_tokens: usize,
    pub temperature: f64,
    /// Sent as the request's `seed` (sampling), when given.
    pub seed: Option<u64>,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub request_timeout: Duration,
    /// Draw the progress bar (on a terminal only).
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunOutcome {
    pub model: String,
    /// Pairs answered and written by this run.
    pub written: usize,
    /// Pairs already in the output, skipped.
    pub skipped: usize,
    /// Pairs that failed after retries (not written; a re-run retries them).
    pub failed: usize,
    /// The first failure, to show the user.
    pub first_error: Option<String>,
}

pub fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder().timeout(timeout).build().context("building the HTTP client")
}

/// The served model's name, from `GET /v1/models`; also checks that a server answers.
pub async fn served_model(client: &reqwest::Client, server: &str) -> Result<String> {
    let url = format!("{server}/v1/models");
    let resp = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("cannot reach a terse server at {server} (start one with `terse serve`)"))?;
    let status = resp.status();
    let body: Value = resp.json().await.with_context(|| format!("{url} did not answer JSON"))?;
    if !status.is_success() {
        bail!("{url} answered {status}: {body}");
    }
    body["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{url} lists no model: {body}"))
}

/// The fingerprint of everything but the question that shapes a request.
pub fn request_fingerprint(config: &RunConfig, model: &str, setting: &Setting) -> String {
    let shape = json!({
        "model": model,
        "dataset": config.dataset,
        "prompt": config.prompt,
        "system": config.system,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "seed": config.seed,
        "setting": Value::Object(setting.request_fields()),
    });
    fingerprint(&shape.to_string())
}

fn request_body(config: &RunConfig, model: &str, problem: &Problem, setting: &Setting) -> Value {
    let mut messages = Vec::new();
    if let Some(system) = &config.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": config.prompt.replace("{question}", &problem.question)}));
    let mut body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
    });
    let obj = body.as_object_mut().unwrap();
    if let Some(seed) = config.seed {
        obj.insert("seed".into(), json!(seed));
    }
    obj.extend(setting.request_fields());
    body
}

/// Why one request did not give a row.
enum Failure {
    /// The server refused the request itself (a 4xx other than 413 and 429):
    /// every other request of the grid would fail the same way, so the run stops.
    Fatal(String),
    /// This request only: still failing after the retries (overload, a dropped
    /// connection), or its prompt is too long for the model (413).
    Skipped(String),
}

const ATTEMPTS: u32 = 4;

async fn post_with_retries(client: &reqwest::Client, url: &str, body: &Value) -> Result<(Value, f64), Failure> {
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
        }
        let started = Instant::now();
        let resp = match client.post(url).json(body).send().await {
            Ok(r) => r,
            Err(e) => {
                last = format!("request failed: {e}");
                continue;
            }
        };
        let status = resp.status();
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => {
                last = format!("reading the answer failed: {e}");
                continue;
            }
        };
        let latency = started.elapsed().as_secs_f64();
        if status.is_success() {
            return serde_json::from_str(&text)
                .map(|v| (v, latency))
                .map_err(|e| Failure::Fatal(format!("the server answered invalid JSON ({e}): {text}")));
        }
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        last = format!("{status}: {message}");
        match status.as_u16() {
            413 => return Err(Failure::Skipped(last)),
            429 => {}
            _ if status.is_client_error() => return Err(Failure::Fatal(last)),
            _ => {}
        }
    }
    Err(Failure::Skipped(last))
}

/// One graded row from the server's answer.
fn to_row(
    answer: &Value,
    latency_s: f64,
    problem: &Problem,
    setting: &Setting,
    config: &RunConfig,
    model: &str,
    fingerprint: &str,
) -> Result<Row> {
    let choice = &answer["choices"][0];
    let content = choice["message"]["content"].as_str().unwrap_or("").to_string();
    let reasoning_content = choice["message"]["reasoning_content"].as_str().map(str::to_string);
    let finish_reason = choice["finish_reason"].as_str().unwrap_or("unknown").to_string();
    let usage = &answer["usage"];
    let completion_tokens = count(&usage["completion_tokens"]).ok_or_else(|| anyhow!("no usage.completion_tokens in {answer}"))?;
    let reasoning_tokens = count(&usage["completion_tokens_details"]["reasoning_tokens"]).unwrap_or(0);
    let terse = &answer["terse"];
    let think_stop_reason = terse["think_stop_reason"].as_str().map(str::to_string);
    let stop_reason = think_stop_reason.clone().unwrap_or_else(|| {
        match finish_reason.as_str() {
            "stop" => "natural",
            other => other,
        }
        .to_string()
    });
    let (extracted, correct) = grade(&content, &problem.answer);
    Ok(Row {
        id: problem.id.clone(),
        setting: setting.name.clone(),
        dataset: config.dataset.clone(),
        model: model.to_string(),
        fingerprint: fingerprint.to_string(),
        reference: problem.answer.clone(),
        extracted_from: extracted.as_ref().map(|e| e.source.as_str().to_string()),
        extracted: extracted.map(|e| e.answer),
        correct,
        completion_tokens,
        reasoning_tokens,
        thinking_tokens: count(&terse["thinking_tokens"]).unwrap_or(reasoning_tokens),
        answer_tokens: count(&terse["answer_tokens"]).unwrap_or(completion_tokens - reasoning_tokens.min(completion_tokens)),
        forced_tokens: count(&terse["forced_tokens"]).unwrap_or(0),
        probe_tokens: count(&terse["probe_tokens"]).unwrap_or(0),
        think_stop_reason,
        finish_reason,
        stop_reason,
        mode: terse["mode"].as_str().map(str::to_string),
        latency_s,
        content,
        reasoning_content,
    })
}

fn count(v: &Value) -> Option<usize> {
    v.as_u64().map(|n| n as usize)
}

/// Running totals for the progress bar.
#[derive(Default)]
struct Tally {
    done: usize,
    correct: usize,
    tokens: usize,
}

impl Tally {
    fn add(&mut self, row: &Row) {
        self.done += 1;
        self.correct += row.correct as usize;
        self.tokens += row.completion_tokens;
    }

    fn message(&self) -> String {
        let acc = if self.done == 0 { 0.0 } else { 100.0 * self.correct as f64 / self.done as f64 };
        format!("acc {acc:.1}% ({}/{}) · {} tokens", self.correct, self.done, self.tokens)
    }
}

/// Run the grid: every problem under every setting, skipping pairs already
/// in `out`, as `model` (which the server must be serving). Rows are appended
/// to `out` as they arrive.
pub async fn run(
    config: &RunConfig,
    model: &str,
    problems: &[Problem],
    settings: &[Setting],
    out: &Path,
) -> Result<RunOutcome> {
    let client = http_client(config.request_timeout)?;
    let url = format!("{}/v1/chat/completions", config.server.trim_end_matches('/'));
    let model = model.to_string();

    let existing = Existing::load(out)?;
    let fingerprints: Vec<String> = settings.iter().map(|s| request_fingerprint(config, &model, s)).collect();
    // Problem-major order: an interrupted run has compared every setting on the same problems.
    let mut tally = Tally::default();
    let mut jobs = Vec::new();
    for problem in problems {
        for (setting, fp) in settings.iter().zip(&fingerprints) {
            match existing.finished(&problem.id, &setting.name, fp)? {
                Some(row) => tally.add(row),
                None => jobs.push((problem, setting, fp.as_str())),
            }
        }
    }
    let mut outcome = RunOutcome { model: model.clone(), skipped: tally.done, ..Default::default() };
    let total = (problems.len() * settings.len()) as u64;
    let bar = if config.progress { ProgressBar::new(total) } else { ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden()) };
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}, eta {eta}]")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_secs(1));
    bar.set_position(tally.done as u64);
    bar.set_message(tally.message());

    let mut writer = RowWriter::open(out)?;
    let mut answers = stream::iter(jobs)
        .map(|(problem, setting, fp)| {
            let (client, url, model) = (&client, &url, &model);
            async move {
                let body = request_body(config, model, problem, setting);
                let result = post_with_retries(client, url, &body).await;
                (problem, setting, fp, result)
            }
        })
        .buffer_unordered(config.concurrency.max(1));
    while let Some((problem, setting, fp, result)) = answers.next().await {
        let row = match result {
            Ok((answer, latency)) => to_row(&answer, latency, problem, setting, config, &model, fp),
            Err(Failure::Fatal(why)) => {
                bar.abandon();
                bail!("the server refused a request of setting `{}`: {why}", setting.name);
            }
            Err(Failure::Skipped(why)) => Err(anyhow!(why)),
        };
        match row {
            Ok(row) => {
                writer.append(&row)?;
                tally.add(&row);
                outcome.written += 1;
                bar.set_message(tally.message());
                bar.inc(1);
            }
            Err(e) => {
                outcome.failed += 1;
                let why = format!("problem `{}`, setting `{}`: {e:#}", problem.id, setting.name);
                bar.println(format!("failed: {why}"));
                outcome.first_error.get_or_insert(why);
            }
        }
    }
    bar.finish();
    Ok(outcome)
}

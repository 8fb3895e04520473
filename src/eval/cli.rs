//! The `terse eval` subcommand: run a grid of settings on a data set against a
//! running server, then write the summary table and the Pareto plot.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::data;
use super::plot::write_plots;
use super::report::{markdown_table, summarize, SettingSummary};
use super::rows::{Existing, Row};
use super::runner::{self, request_fingerprint, RunConfig, DEFAULT_PROMPT};
use super::settings::{parse_grid, read_grid_file, Setting};
use crate::manifest::resolve_model;
use crate::metrics::Metrics;
use crate::server::{spawn, RunningServer, ServeConfig};

const SETTINGS_HELP: &str = "\
Settings (--setting SPEC, repeatable; or --grid FILE):
  A SPEC is a comma-separated list of items:
    baseline              no control (reasoning.strategy = none)
    short|medium|long     the model's mode preset (reasoning_effort); also mode=NAME
    ts=T                  temperature-scaled stopping, stop temperature T >= 1
    ramp                  with ts: tau grows from 1 to T over the thinking budget
    budget=N              budget forcing: end the thinking after N tokens
    max-thinking=N        the thinking budget alone (e.g. the ramp's horizon)
    min-thinking=N        a stop before N thinking tokens becomes the continuation
    probe[=N]             answer probing every N controlled tokens (default 64)
    probe-tokens=N        with probe: most answer tokens a probe decodes
    agree=N               with probe: stop when N probes in a row agree
    confidence=C          with probe: stop when a probe's mean top-1 probability reaches C
    wrap-up               with ts: a stop TS made becomes the wrap-up text and a short answer
    strategy=none|ts|budget|probe
    name=LABEL            the label in the table and plot (default: the spec)
  e.g.  -s baseline -s ts=2 -s ts=4 -s ts=8,ramp,max-thinking=512 -s budget=256 -s medium
  A grid file is TOML:  settings = [\"baseline\", \"ts=4\", \"budget=256\", \"medium\"]

Output (--out, default bench-results/eval/MODEL-DATA/):
  rows.jsonl     one row per (problem, setting): tokens, stop reason, answer, grade,
                 latency; a re-run with the same options skips the finished rows
  summary.md     accuracy with a 95% Wilson interval, mean / median tokens, tokens
                 per correct answer, share of stops by reason; summary.json alike
  pareto.png     accuracy against mean completion tokens, one point per setting,
  pareto.svg     the Pareto front drawn

Examples:
  terse serve --model qwen2.5-0.5b --max-batch 8 &
  terse eval --data gsm8k --limit 200 --seed 1 -s baseline -s ts=4 -s budget=256
  terse eval --model qwen2.5-0.5b --data math500 --limit 100 --grid grid.toml";

#[derive(Args, Debug)]
#[command(after_long_help = SETTINGS_HELP)]
pub struct EvalArgs {
    /// Data set: gsm8k or math500 (fetched with ./data/fetch), or a JSONL file of {id, question, answer}.
    #[arg(long, default_value = "gsm8k")]
    pub data: String,
    /// Base URL of the running terse server to evaluate.
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "TERSE_EVAL_SERVER")]
    pub server: String,
    /// Instead of --server: serve this model inside this process for the run
    /// (a name from models/*.toml or a .gguf path; batch size --concurrency).
    #[arg(long, conflicts_with = "server")]
    pub model: Option<String>,
    /// A setting to compare (repeatable; see below). Without any: baseline.
    #[arg(long = "setting", short = 's', value_name = "SPEC")]
    pub settings: Vec<String>,
    /// A TOML file with `settings = ["SPEC", ...]`, run after the --setting ones.
    #[arg(long, value_name = "FILE")]
    pub grid: Option<PathBuf>,
    /// Run only this many problems (the same ones under every setting).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Shuffle the problems with this seed before --limit (else file order);
    /// also sent as each request's sampling seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Completion token limit of each request.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Sampling temperature (0 is greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Requests in flight at once (match the server's --max-batch).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// The user message; `{question}` is replaced by the problem.
    #[arg(long, default_value = DEFAULT_PROMPT)]
    pub prompt: String,
    /// An optional system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Output folder (default: bench-results/eval/MODEL-DATA).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 1800)]
    pub request_timeout_secs: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Where a finished evaluation put its files.
#[derive(Debug, Clone)]
pub struct EvalOutput {
    pub dir: PathBuf,
    pub summaries: Vec<SettingSummary>,
    pub table: String,
}

/// `terse eval`.
pub async fn eval(args: EvalArgs) -> Result<EvalOutput> {
    let mut specs = args.settings.clone();
    if let Some(grid) = &args.grid {
        specs.extend(read_grid_file(grid)?);
    }
    let settings = parse_grid(&specs)?;
    if !args.prompt.contains("{question}") {
        bail!("--prompt must contain `{{question}}`, where the problem goes");
    }
    if args.max_tokens == 0 || args.concurrency == 0 || args.limit == Some(0) {
        bail!("--max-tokens, --concurrency and --limit must be at least 1");
    }
    if !(0.0..=2.0).contains(&args.temperature) {
        bail!("--temperature must be in [0, 2]");
    }
    let (dataset, path) = data::resolve(&args.data)?;
    let problems = data::select(data::load(&path)?, args.limit, args.seed);

    // Requests still go over HTTP on the loopback: the server under test is the real one.
    let local = match &args.model {
        Some(spec) => Some(start_local_server(spec, args.concurrency).await?),
        None => None,
    };
    let server = match &local {
        Some(s) => s.url(),
        None => args.server.trim_end_matches('/').to_string(),
    };
    let config = RunConfig {
        server,
        dataset: dataset.clone(),
        prompt: args.prompt.clone(),
        system: args.system.clone(),
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
        concurrency: args.concurrency,
        request_timeout: Duration::from_secs(args.request_timeout_secs),
        progress: !args.quiet,
    };
    let model = runner::served_model(&runner::http_client(config.request_timeout)?, &config.server).await?;
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results/eval").join(format!("{}-{dataset}", file_safe(&model))));
    let rows_path = dir.join("rows.jsonl");
    eprintln!(
        "eval: {} problems of {dataset} × {} settings against {model} at {}; rows in {}",
        problems.len(),
        settings.len(),
        config.server,
        rows_path.display()
    );

    let outcome = runner::run(&config, &model, &problems, &settings, &rows_path).await?;
    eprintln!(
        "eval: {} answered, {} already done, {} failed",
        outcome.written, outcome.skipped, outcome.failed
    );

    let summaries = summarize_file(&rows_path, &config, &model, &problems, &settings)?;
    let table = markdown_table(&summaries);
    let title = format!("{model} on {dataset} ({} problems)", problems.len());
    write_summary(&dir, &title, &summaries, &table)?;
    let answered: Vec<SettingSummary> = summaries.iter().filter(|s| s.n > 0).cloned().collect();
    write_plots(&answered, &title, &dir.join("pareto.png"), &dir.join("pareto.svg"))?;
    println!("{title}\n\n{table}");
    eprintln!("eval: wrote {}", dir.display());

    if let Some(server) = local {
        server.shutdown();
        server.join().await?;
    }
    if outcome.failed > 0 {
        bail!(
            "{} requests failed (first: {}); run the same command again to retry them",
            outcome.failed,
            outcome.first_error.unwrap_or_default()
        );
    }
    Ok(EvalOutput { dir, summaries, table })
}

/// One summary per setting, from the rows file (so that rows of earlier runs
/// count too), over the selected problems only.
fn summarize_file(
    rows_path: &Path,
    config: &RunConfig,
    model: &str,
    problems: &[data::Problem],
    settings: &[Setting],
) -> Result<Vec<SettingSummary>> {
    let existing = Existing::load(rows_path)?;
    let mut summaries = Vec::new();
    for setting in settings {
        let fp = request_fingerprint(config, model, setting);
        let mut rows: Vec<&Row> = Vec::new();
        for problem in problems {
            rows.extend(existing.finished(&problem.id, &setting.name, &fp)?);
        }
        summaries.push(summarize(&setting.name, &rows));
    }
    Ok(summaries)
}

/// A server on a free loopback port, its model loaded.
async fn start_local_server(spec: &str, max_batch: usize) -> Result<RunningServer> {
    let model = resolve_model(spec)?;
    let mut config = ServeConfig::new(model.path, model.served_name);
    config.port = 0;
    config.engine.max_batch = max_batch;
    // The manifest's reasoning profile and mode presets, as `terse serve` gives them.
    config.engine.reasoning = model.reasoning;
    let server = spawn(config, Arc::new(Metrics::new())).await?;
    server.wait_ready().await.context("loading the model")?;
    Ok(server)
}

fn write_summary(dir: &Path, title: &str, summaries: &[SettingSummary], table: &str) -> Result<()> {
    // The command that reproduces this summary, as the user typed it (the binary as `terse`).
    let command = std::iter::once("terse".to_string())
        .chain(std::env::args().skip(1))
        .map(|a| if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"\\$`{}".contains(c)) { format!("'{}'", a.replace('\'', "'\\''")) } else { a })
        .collect::<Vec<_>>()
        .join(" ");
    let md = format!("# {title}\n\n{table}\nCommand: `{command}`\n");
    let json = serde_json::json!({ "title": title, "settings": summaries });
    for (name, body) in [("summary.md", md), ("summary.json", serde_json::to_string_pretty(&json)? + "\n")] {
        let path = dir.join(name);
        std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A model name made safe for a folder name.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_are_safe() {
        assert_eq!(file_safe("qwen2.5-0.5b"), "qwen2.5-0.5b");
        assert_eq!(file_safe("a/b c"), "a_b_c");
    }

}

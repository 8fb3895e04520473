//! The `terse` command line: serve, generate.
//!
//! Every `serve` setting comes from, in order of precedence: its flag, its
//! `TERSE_*` environment variable, the TOML file of `--config`, its default
//! (see `terse::config`). `terse serve --print-config` shows the outcome.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use terse::engine::{self as engine, start_engine, EngineConfig, GenerationEvent, GenerationRequest, SamplingParams};
use terse::manifest::{resolve_model, resolve_model_with};
use terse::metrics::Metrics;
use terse::model::KvPrecision;
use terse::server::{self as server, ApiKeys, RequestLimits};
use terse::tokenize::ChatMessage;

mod tools;

#[derive(Parser)]
#[command(name = "terse", version, about = "An inference server for small reasoning language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Answer one prompt in the terminal, streamed as it is generated.
    Generate(GenerateArgs),
    /// Write a GGUF model as a Hugging Face directory (dequantized weights).
    Convert(tools::ConvertArgs),
    /// Prune a Hugging Face directory to the 2:4 pattern by magnitude (a
    /// baseline: it loses quality without a learned mask such as ProxSparse's).
    Prune(tools::PruneArgs),
    /// Print a model's architecture, parameters, weight type and sparsity.
    Inspect(tools::InspectArgs),
    /// Write a GGUF with random weights, real shapes and a real tokenizer.
    Synth(tools::SynthArgs),
    /// Measure accuracy against tokens on GSM8K / MATH-500 over a grid of reasoning settings.
    Eval(terse::eval::cli::EvalArgs),
    /// GET a path of the local server; exit 0 on a 2xx answer (for container health checks).
    Probe(ProbeArgs),
}

#[derive(Args)]
struct ProbeArgs {
    /// The path to ask for, e.g. /health or /ready.
    #[arg(default_value = "/health")]
    path: String,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The server's port (the same variable as `serve --port`).
    #[arg(long, default_value_t = 8080, env = "TERSE_PORT")]
    port: u16,
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
}

#[derive(Args)]
struct ModelArgs {
    /// A model name from models/*.toml (fetched with `./models/fetch NAME`), a
    /// path to a .gguf file, or a Hugging Face directory.
    #[arg(long, default_value = "smollm2-135m", env = "TERSE_MODEL")]
    model: String,
    /// For a model given by path: the manifest (models/NAME.toml) whose think
    /// tokens, injected texts and mode presets it gets, e.g. deepseek-r1-distill-qwen-1.5b.
    #[arg(long, env = "TERSE_MANIFEST")]
    manifest: Option<String>,
    /// Hugging Face directories: run projections that follow the 2:4 pattern
    /// compressed on the sparse kernel (auto), or keep every weight dense (off).
    #[arg(long, value_enum, default_value = "auto", env = "TERSE_SPARSE")]
    sparse: terse::model::SparseMode,
    /// Where the model runs: cpu, cuda or cuda:N (a GPU needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", env = "TERSE_DEVICE")]
    device: terse::model::DeviceSpec,
    /// Choose greedy tokens (temperature-scaled stopping included) on the model's
    /// device, copying a few numbers per sequence instead of its logits: auto = on a GPU.
    #[arg(long, value_enum, default_value = "auto", env = "TERSE_GREEDY_ON_DEVICE")]
    greedy_on_device: terse::engine::PickOnDevice,
    /// Decode steps as captured CUDA graphs (a GPU only). Capture is not
    /// built yet: `on` runs decode steps eagerly at the graphs' fixed
    /// shapes (to measure their padding); `auto` leaves them off.
    #[arg(long, value_enum, default_value = "auto", env = "TERSE_CUDA_GRAPHS")]
    cuda_graphs: terse::model::CudaGraphs,
}

#[derive(Args)]
struct ServeArgs {
    /// A TOML file of settings, keyed by flag name (e.g. `max_batch = 16`); flags and TERSE_* variables override it.
    #[arg(long, env = "TERSE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print each setting's value and where it came from (flag, environment, config file, default), then exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (0.0.0.0 in a container).
    #[arg(long, default_value = server::DEFAULT_HOST, env = "TERSE_HOST")]
    host: String,
    #[arg(long, default_value_t = server::DEFAULT_PORT, env = "TERSE_PORT")]
    port: u16,
    /// Most sequences decoded together in one step.
    #[arg(long, default_value_t = engine::DEFAULT_MAX_BATCH, env = "TERSE_MAX_BATCH")]
    max_batch: usize,
    /// Most requests waiting for a batch slot; beyond it requests get 429.
    #[arg(long, default_value_t = engine::DEFAULT_MAX_QUEUE, env = "TERSE_MAX_QUEUE")]
    max_queue: usize,
    /// KV-cache budget in bytes (default: a full batch of full-context sequences, at most 4 GiB).
    #[arg(long, env = "TERSE_KV_CACHE_BYTES")]
    kv_cache_bytes: Option<u64>,
    /// Most prompt tokens one step takes in (chunked prefill); on the CPU, while other sequences decode, a quarter of it, so that a long prompt does not hold back their next token.
    #[arg(long, default_value_t = engine::DEFAULT_PREFILL_CHUNK, env = "TERSE_PREFILL_CHUNK")]
    prefill_chunk: usize,
    /// What the KV cache keeps keys and values in on the CPU: f16 (the
    /// default) takes half f32's memory, so twice the sequences fit one budget,
    /// and decoding a long context reads half the bytes; f32 keeps every bit.
    #[arg(long, value_enum, default_value_t = KvPrecision::F16, env = "TERSE_KV_CACHE_DTYPE")]
    kv_cache_dtype: KvPrecision,
    /// Keep the KV pages of prompts and reuse them for later requests that
    /// start with the same tokens (a chat's history, a shared system prompt).
    #[arg(long, value_enum, default_value_t = Switch::On, env = "TERSE_PREFIX_CACHE")]
    prefix_cache: Switch,
    /// Speculative decoding: `ngram` proposes the tokens that followed the
    /// latest earlier occurrence of the last few (prompt lookup), `draft:MODEL`
    /// those a small model with the same vocabulary decodes greedily (a
    /// fetched model's name or a path); either is verified in one step, and
    /// the output is token for token the plain engine's.
    #[arg(long, default_value = "off", env = "TERSE_SPECULATE")]
    speculate: engine::Speculation,
    /// Speculate only while at most this many sequences run. Drafts fill a
    /// step up to eight rows, one tile of the kernels, so at eight
    /// sequences none is left.
    #[arg(long, default_value_t = engine::DEFAULT_SPECULATE_MAX_BATCH, env = "TERSE_SPECULATE_MAX_BATCH")]
    speculate_max_batch: usize,
    /// Draft this many tokens a step (at most 7) instead of a length that
    /// adapts to how many drafted tokens the model keeps.
    #[arg(long, env = "TERSE_SPECULATE_DRAFT_TOKENS", value_parser = clap::value_parser!(u64).range(1..=engine::MAX_DRAFT as u64))]
    speculate_draft_tokens: Option<u64>,
    /// The draft model proposes only among the first N token ids (a BPE
    /// vocabulary's most frequent), reading that much less of its output head
    /// per drafted token; the target still verifies every token, so no reply
    /// changes. A GGUF draft only.
    #[arg(long, env = "TERSE_SPECULATE_DRAFT_VOCAB", value_parser = clap::value_parser!(u64).range(16..))]
    speculate_draft_vocab: Option<u64>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = server::DEFAULT_MAX_BODY_BYTES, env = "TERSE_MAX_BODY_BYTES")]
    max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM / SIGINT.
    #[arg(long, default_value_t = server::DEFAULT_SHUTDOWN_GRACE_SECS, env = "TERSE_SHUTDOWN_GRACE_SECS")]
    shutdown_grace_secs: u64,
    /// An API key clients must send as `Authorization: Bearer KEY` (repeatable; the variable takes a comma-separated list). Default: none, no authentication.
    #[arg(long = "api-key", env = "TERSE_API_KEY", value_delimiter = ',', hide_env_values = true, value_name = "KEY")]
    api_key: Vec<String>,
    /// A file of API keys, one a line (`#` comments allowed), added to --api-key.
    #[arg(long, env = "TERSE_API_KEY_FILE", value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Seconds a generation request may take in all, queueing included; then it is cancelled with 504 (0: no limit).
    #[arg(long, default_value_t = server::DEFAULT_REQUEST_TIMEOUT_SECS, env = "TERSE_REQUEST_TIMEOUT_SECS")]
    request_timeout_secs: u64,
    /// Most completion tokens a request may ask for; more is refused with 400, and it is the default for requests that set none. Default: the model's context length.
    #[arg(long, env = "TERSE_MAX_TOKENS_LIMIT", value_parser = clap::value_parser!(u64).range(1..))]
    max_tokens_limit: Option<u64>,
    /// Log lines as human-readable text or as one JSON object a line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "TERSE_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user's message (or the raw prompt with --raw).
    prompt: String,
    /// Send the prompt as it is, without the chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
}

fn main() -> Result<()> {
    let parsed = terse::config::parse::<Cli>("serve")?;
    let mut log_format = LogFormat::Text;
    if let Command::Serve(args) = &parsed.value.command {
        if args.print_config {
            print!("{}", parsed.describe("serve"));
            return Ok(());
        }
        log_format = args.log_format;
    }
    // `terse eval` draws a progress bar, which the in-process server's
    // per-request lines would tear.
    let default_filter = match parsed.value.command {
        Command::Eval(_) => "info,terse::server=warn",
        _ => "info",
    };
    init_logging(log_format, default_filter);
    let cli = parsed.value;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Generate(args) => runtime.block_on(generate(args)),
        Command::Convert(args) => tools::convert(args),
        Command::Prune(args) => tools::prune(args),
        Command::Inspect(args) => tools::inspect(args),
        Command::Synth(args) => tools::synth(args),
        Command::Eval(args) => runtime.block_on(terse::eval::cli::eval(args)).map(|_| ()),
        Command::Probe(args) => probe(args),
    }
}

fn probe(args: ProbeArgs) -> Result<()> {
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let status = terse::probe::http_status(&args.host, args.port, &args.path, timeout)?;
    if !(200..300).contains(&status) {
        bail!("GET {} answered {status}", args.path);
    }
    Ok(())
}

/// Logs go to stderr; `RUST_LOG` filters them, else `default_filter`.
fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // One object a line, the event's fields at the top level.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// `--api-key` values and the keys of `--api-key-file`.
fn api_keys(args: &ServeArgs) -> Result<ApiKeys> {
    let mut keys = args.api_key.clone();
    if let Some(path) = &args.api_key_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the API key file {}", path.display()))?;
        let from_file = ApiKeys::parse_file(&text);
        if from_file.is_empty() {
            bail!("the API key file {} holds no key", path.display());
        }
        keys.extend(from_file);
    }
    ApiKeys::new(keys)
}

async fn serve(args: ServeArgs) -> Result<()> {
    let model = resolve_model_with(&args.model.model, args.model.manifest.as_deref())?;
    let api_keys = api_keys(&args)?;
    // A draft model by name (a fetched one) or by path, as `--model` takes it.
    let speculation = match args.speculate {
        engine::Speculation::Draft(spec) => {
            let spec = spec.to_string_lossy();
            engine::Speculation::Draft(resolve_model(&spec).with_context(|| format!("the draft model `{spec}`"))?.path)
        }
        other => other,
    };
    let config = terse::server::ServeConfig {
        host: args.host,
        port: args.port,
        model_path: model.path,
        served_name: model.served_name,
        engine: EngineConfig {
            max_batch: args.max_batch,
            max_queue: args.max_queue,
            kv_cache_budget_bytes: args.kv_cache_bytes,
            prefill_chunk: args.prefill_chunk,
            kv_cache_dtype: args.kv_cache_dtype,
            prefix_cache: args.prefix_cache == Switch::On,
            reasoning: model.reasoning,
            sparse: args.model.sparse,
            device: args.model.device,
            pick_on_device: args.model.greedy_on_device,
            cuda_graphs: args.model.cuda_graphs,
            speculation,
            speculate_max_batch: args.speculate_max_batch,
            speculate_draft_tokens: args.speculate_draft_tokens.map(|n| n as usize),
            speculate_draft_vocab: args.speculate_draft_vocab.map(|n| n as usize),
        },
        max_body_bytes: args.max_body_bytes,
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        api_keys,
        limits: RequestLimits {
            timeout: (args.request_timeout_secs > 0).then(|| Duration::from_secs(args.request_timeout_secs)),
            max_tokens: args.max_tokens_limit.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        },
    };
    terse::server::serve(config, Arc::new(Metrics::new())).await
}

async fn generate(args: GenerateArgs) -> Result<()> {
    let model = resolve_model_with(&args.model.model, args.model.manifest.as_deref())?;
    let path: PathBuf = model.path.clone();
    let name = model.served_name.clone();
    let reasoning = model.reasoning.clone();
    let (sparse, device, pick_on_device, cuda_graphs) = (args.model.sparse, args.model.device, args.model.greedy_on_device, args.model.cuda_graphs);
    let engine = tokio::task::spawn_blocking(move || {
        let config = EngineConfig { reasoning, sparse, device, pick_on_device, cuda_graphs, ..EngineConfig::default() };
        start_engine(&path, &name, config, Arc::new(Metrics::new()))
    })
    .await??;
    let tokenizer = engine.tokenizer();
    let text = if args.raw {
        args.prompt.clone()
    } else {
        tokenizer.apply_chat_template(&[ChatMessage::new("user", args.prompt.clone())], true)?
    };
    let prompt = tokenizer.encode_prompt(&text)?;
    let max_tokens = args.max_tokens.min(engine.context_length().saturating_sub(prompt.len()));
    let request = GenerationRequest {
        id: "cli".into(),
        prompt,
        max_tokens,
        sampling: SamplingParams { temperature: args.temperature, seed: args.seed, ..Default::default() },
        stop: vec![],
        received_at: Instant::now(),
        reasoning: Default::default(),
        choice: Default::default(),
    };
    let started = Instant::now();
    let mut stream = engine.submit(request)?;
    let mut stdout = std::io::stdout();
    loop {
        match stream.read().await.map_err(anyhow::Error::msg)? {
            GenerationEvent::Token { text, .. } => {
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            GenerationEvent::Finished { reason, usage, .. } => {
                let secs = started.elapsed().as_secs_f64();
                println!();
                eprintln!(
                    "[{} prompt + {} completion tokens, finish: {}, {:.1} tok/s]",
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    reason.as_openai(),
                    usage.completion_tokens as f64 / secs
                );
                return Ok(());
            }
            GenerationEvent::Failed { message } => bail!("generation failed: {message}"),
        }
    }
}

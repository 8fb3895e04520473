//! The `terse` command line: serve, generate.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use terse::engine::{start_engine, EngineConfig, GenerationEvent, GenerationRequest, SamplingParams};
use terse::manifest::resolve_model_with;
use terse::metrics::Metrics;
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
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1", env = "TERSE_HOST")]
    host: String,
    #[arg(long, default_value_t = 8080, env = "TERSE_PORT")]
    port: u16,
    /// Most sequences decoded together in one step.
    #[arg(long, default_value_t = 8, env = "TERSE_MAX_BATCH")]
    max_batch: usize,
    /// Most requests waiting for a batch slot; beyond it requests get 429.
    #[arg(long, default_value_t = 64, env = "TERSE_MAX_QUEUE")]
    max_queue: usize,
    /// KV-cache budget in bytes (default: a full batch of full-context sequences, at most 4 GiB).
    #[arg(long, env = "TERSE_KV_CACHE_BYTES")]
    kv_cache_bytes: Option<u64>,
    /// Prompt tokens a sequence feeds per step while prefilling.
    #[arg(long, default_value_t = 512, env = "TERSE_PREFILL_CHUNK")]
    prefill_chunk: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20, env = "TERSE_MAX_BODY_BYTES")]
    max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM / SIGINT.
    #[arg(long, default_value_t = 30, env = "TERSE_SHUTDOWN_GRACE_SECS")]
    shutdown_grace_secs: u64,
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
    let cli = Cli::parse();
    // `terse eval` draws a progress bar, which per-request logs would tear.
    let default_filter = match cli.command {
        Command::Eval(_) => "info,tower_http=warn",
        _ => "info,tower_http=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Generate(args) => runtime.block_on(generate(args)),
        Command::Convert(args) => tools::convert(args),
        Command::Prune(args) => tools::prune(args),
        Command::Inspect(args) => tools::inspect(args),
        Command::Synth(args) => tools::synth(args),
        Command::Eval(args) => runtime.block_on(terse::eval::cli::eval(args)).map(|_| ()),
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let model = resolve_model_with(&args.model.model, args.model.manifest.as_deref())?;
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
            reasoning: model.reasoning,
            sparse: args.model.sparse,
        },
        max_body_bytes: args.max_body_bytes,
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
    };
    terse::server::serve(config, Arc::new(Metrics::new())).await
}

async fn generate(args: GenerateArgs) -> Result<()> {
    let model = resolve_model_with(&args.model.model, args.model.manifest.as_deref())?;
    let path: PathBuf = model.path.clone();
    let name = model.served_name.clone();
    let reasoning = model.reasoning.clone();
    let sparse = args.model.sparse;
    let engine = tokio::task::spawn_blocking(move || {
        let config = EngineConfig { reasoning, sparse, ..EngineConfig::default() };
        start_engine(&path, &name, config, Arc::new(Metrics::new()))
    })
    .await??;
    let tokenizer = engine.tokenizer();
    let text = if args.raw {
        args.prompt.clone()
    } else {
        tokenizer.apply_chat_template(&[ChatMessage { role: "user".into(), content: args.prompt.clone() }], true)?
    };
    let prompt = tokenizer.encode(&text)?;
    let max_tokens = args.max_tokens.min(engine.context_length().saturating_sub(prompt.len()));
    let request = GenerationRequest {
        id: "cli".into(),
        prompt,
        max_tokens,
        sampling: SamplingParams { temperature: args.temperature, seed: args.seed, ..Default::default() },
        stop: vec![],
        received_at: Instant::now(),
        reasoning: Default::default(),
    };
    let started = Instant::now();
    let mut stream = engine.submit(request)?;
    let mut stdout = std::io::stdout();
    while let Some(event) = stream.next().await {
        match event {
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
    bail!("the engine stopped before finishing")
}

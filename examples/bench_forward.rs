//! In-process, single-stream speed of one engine on one GGUF file: terse's own
//! forward pass or candle-transformers' reference model (`quantized_llama` /
//! `quantized_qwen2`, picked by `general.architecture`).
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release --example bench_forward -- MODEL.gguf \
//!     --engine terse --prompt-tokens 256 --decode-tokens 128 --runs 5 [--device cuda]
//! ```
//!
//! Each run clears the cache, prefills the prompt in one forward call (prefill
//! tok/s = prompt tokens / that call's time), then decodes greedily one token
//! per call, EOS ignored (decode tok/s = decode tokens / the time of those
//! calls). One warm-up run is not counted. Prints one JSON line: the medians,
//! every run's figures, the process's peak RSS (VmHWM), the prompt's token
//! ids (so that other engines can be fed the very same prompt) and the last
//! run's greedy tokens (so that two engines' outputs can be compared). Run one engine
//! per process so that the peak RSS is that engine's alone.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use terse::engine::{argmax, load_model_on};
use terse::model::{load_gguf_on, DeviceSpec, SeqChunk, SeqKvCache, SparseMode, Transformer, TransformerConfig};
use terse::tokenize::TextTokenizer;

/// Ordinary English text, tokenized and repeated to the prompt length.
const PROMPT_TEXT: &str = "The old lighthouse keeper climbed the spiral stairs every evening, \
counting the steps as his father had taught him, and at the top he polished the great lens \
until it shone like a second moon over the harbour. Ships passed in the night, their crews \
never knowing his name, yet every one of them owed him a safe return to the quiet town below. ";

struct Args {
    model: PathBuf,
    engine: String,
    /// Hugging Face directories: 2:4 sparse kernel (auto) or dense (off).
    sparse: SparseMode,
    device: DeviceSpec,
    prompt_tokens: usize,
    decode_tokens: usize,
    runs: usize,
    warmup: usize,
    /// Also decode this many sequences together (terse only): aggregate tok/s.
    batch: usize,
    /// terse's KV cache in f16, the server's default (`--kv-cache-dtype f32` for f32).
    kv_f16: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_forward MODEL(.gguf path, Hugging Face directory or manifest name) \
         [--engine terse|reference] [--sparse auto|off] [--device cpu|cuda[:N]] \
         [--prompt-tokens 256] [--decode-tokens 128] [--runs 5] [--warmup 1] [--batch N] \
         [--kv-cache-dtype f16|f32]"
    );
    std::process::exit(2)
}

fn parse_args() -> Result<Args> {
    let mut model = None;
    let mut args = Args {
        model: PathBuf::new(),
        engine: "terse".into(),
        sparse: SparseMode::Auto,
        device: DeviceSpec::Cpu,
        prompt_tokens: 256,
        decode_tokens: 128,
        runs: 5,
        warmup: 1,
        batch: 0,
        kv_f16: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--engine" => args.engine = value("--engine")?,
            "--sparse" => {
                args.sparse = match value("--sparse")?.as_str() {
                    "auto" => SparseMode::Auto,
                    "off" => SparseMode::Off,
                    other => bail!("--sparse must be auto or off, not {other}"),
                }
            }
            "--device" => args.device = value("--device")?.parse().map_err(anyhow::Error::msg)?,
            "--prompt-tokens" => args.prompt_tokens = value("--prompt-tokens")?.parse()?,
            "--decode-tokens" => args.decode_tokens = value("--decode-tokens")?.parse()?,
            "--runs" => args.runs = value("--runs")?.parse()?,
            "--warmup" => args.warmup = value("--warmup")?.parse()?,
            "--batch" => args.batch = value("--batch")?.parse()?,
            "--kv-cache-dtype" => {
                args.kv_f16 = match value("--kv-cache-dtype")?.as_str() {
                    "f16" => true,
                    "f32" => false,
                    other => bail!("--kv-cache-dtype must be f32 or f16, not {other}"),
                }
            }
            "-h" | "--help" => usage(),
            s if s.starts_with("--") => bail!("unknown flag {s}"),
            s if model.is_none() => model = Some(s.to_string()),
            s => bail!("unexpected argument {s}"),
        }
    }
    let Some(model) = model else { usage() };
    args.model = terse::manifest::resolve_model(&model)?.path;
    if !matches!(args.engine.as_str(), "terse" | "reference") {
        bail!("--engine must be terse or reference, not {}", args.engine);
    }
    if args.prompt_tokens == 0 || args.runs == 0 {
        bail!("--prompt-tokens and --runs must be at least 1");
    }
    Ok(args)
}

/// The engine under test: one sequence, cleared between runs.
trait Engine {
    /// Clear the cache and feed the whole prompt in one call; logits of its last token.
    fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<f32>>;
    /// Feed one token at position `pos`; its logits.
    fn step(&mut self, token: u32, pos: usize) -> Result<Vec<f32>>;
    /// terse's model, for the batched run.
    fn terse_model(&self) -> Option<&Transformer> {
        None
    }
}

struct Terse {
    model: Transformer,
    cache: SeqKvCache,
}

impl Terse {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let logits = self.model.forward(&mut [SeqChunk { tokens, cache: &mut self.cache }])?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }
}

impl Engine for Terse {
    fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<f32>> {
        self.cache = self.model.new_cache();
        self.forward(prompt)
    }

    fn step(&mut self, token: u32, _pos: usize) -> Result<Vec<f32>> {
        self.forward(&[token])
    }

    fn terse_model(&self) -> Option<&Transformer> {
        Some(&self.model)
    }
}

/// Aggregate decode tok/s of `batch` sequences stepped together, each
/// prefilled alone first (its prompt rotated, so that no two are the same).
fn batched_decode(model: &Transformer, prompt: &[u32], decode_tokens: usize, batch: usize) -> Result<f64> {
    let mut caches: Vec<SeqKvCache> = (0..batch).map(|_| model.new_cache()).collect();
    let mut next = Vec::with_capacity(batch);
    for (i, cache) in caches.iter_mut().enumerate() {
        let mut own = prompt.to_vec();
        own.rotate_left(i % prompt.len());
        let logits = model.forward(&mut [SeqChunk { tokens: &own, cache }])?;
        next.push(argmax(&logits.flatten_all()?.to_vec1::<f32>()?));
    }
    let t0 = Instant::now();
    for _ in 0..decode_tokens {
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut chunks: Vec<SeqChunk> =
            caches.iter_mut().zip(&tokens).map(|(cache, t)| SeqChunk { tokens: t, cache }).collect();
        let logits = model.forward(&mut chunks)?.to_vec2::<f32>()?;
        next = logits.iter().map(|row| argmax(row)).collect();
    }
    Ok((batch * decode_tokens) as f64 / t0.elapsed().as_secs_f64())
}

enum Reference {
    Llama(candle_transformers::models::quantized_llama::ModelWeights, Device),
    Qwen2(candle_transformers::models::quantized_qwen2::ModelWeights, Device),
    Qwen3(candle_transformers::models::quantized_qwen3::ModelWeights, Device),
}

impl Reference {
    fn load(path: &Path, device: &Device) -> Result<Reference> {
        let mut file = File::open(path)?;
        let content = gguf_file::Content::read(&mut file)?;
        let arch = match content.metadata.get("general.architecture") {
            Some(v) => v.to_string()?.clone(),
            None => bail!("{}: no general.architecture", path.display()),
        };
        Ok(match arch.as_str() {
            "llama" => Reference::Llama(candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
                content,
                &mut file,
                device,
            )?, device.clone()),
            "qwen2" => Reference::Qwen2(candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
                content,
                &mut file,
                device,
            )?, device.clone()),
            "qwen3" => Reference::Qwen3(candle_transformers::models::quantized_qwen3::ModelWeights::from_gguf(
                content,
                &mut file,
                device,
            )?, device.clone()),
            other => bail!("no reference model for architecture {other}"),
        })
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        let logits = match self {
            Reference::Llama(m, device) => m.forward(&Tensor::new(tokens, device)?.unsqueeze(0)?, pos)?,
            Reference::Qwen2(m, device) => m.forward(&Tensor::new(tokens, device)?.unsqueeze(0)?, pos)?,
            Reference::Qwen3(m, device) => m.forward(&Tensor::new(tokens, device)?.unsqueeze(0)?, pos)?,
        };
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }
}

impl Engine for Reference {
    fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<f32>> {
        match self {
            Reference::Llama(m, _) => m.clear_kv_cache(),
            Reference::Qwen2(m, _) => m.clear_kv_cache(),
            Reference::Qwen3(m, _) => m.clear_kv_cache(),
        }
        self.forward(prompt, 0)
    }

    fn step(&mut self, token: u32, pos: usize) -> Result<Vec<f32>> {
        self.forward(&[token], pos)
    }
}

/// (prefill tok/s, decode tok/s, the greedy tokens) of one run.
fn run_once(engine: &mut dyn Engine, prompt: &[u32], decode_tokens: usize) -> Result<(f64, f64, Vec<u32>)> {
    let t0 = Instant::now();
    let logits = engine.prefill(prompt)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut next = argmax(&logits);
    let mut greedy = vec![next];
    let t1 = Instant::now();
    for i in 0..decode_tokens {
        let logits = engine.step(next, prompt.len() + i)?;
        next = argmax(&logits);
        greedy.push(next);
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let decode = if decode_tokens == 0 { 0.0 } else { decode_tokens as f64 / decode_s };
    Ok((prompt.len() as f64 / prefill_s, decode, greedy))
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A field of /proc/self/status in kB (e.g. VmHWM, the peak resident set).
fn proc_status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // The prompt comes from the GGUF's own tokenizer (terse's reading of it),
    // whatever the engine; only the metadata is read here, no weights.
    let hf_dir = args.model.is_dir();
    if hf_dir && args.engine != "terse" {
        bail!("the reference engine reads GGUF files only");
    }
    let device = args.device.open()?;
    let load_start = Instant::now();
    let mut loaded = hf_dir.then(|| load_model_on(&args.model, "bench", args.sparse, &device)).transpose()?;
    let (prompt, context, arch) = if let Some(m) = &loaded {
        let text_ids = m.tokenizer.encode(PROMPT_TEXT)?;
        let prompt: Vec<u32> = text_ids.iter().copied().cycle().take(args.prompt_tokens).collect();
        (prompt, m.info.context_length, m.info.arch.clone())
    } else {
        let mut file = File::open(&args.model).with_context(|| format!("opening {}", args.model.display()))?;
        let content = gguf_file::Content::read(&mut file)?;
        let config = TransformerConfig::from_gguf(&content)?;
        let text_ids = TextTokenizer::from_gguf(&content)?.encode(PROMPT_TEXT)?;
        if text_ids.is_empty() {
            bail!("the prompt text tokenized to nothing");
        }
        let prompt: Vec<u32> = text_ids.iter().copied().cycle().take(args.prompt_tokens).collect();
        (prompt, config.context_length, config.arch.name().to_string())
    };
    if prompt.len() + args.decode_tokens + 1 > context {
        bail!("{} prompt + {} decode tokens exceed the context of {context}", prompt.len(), args.decode_tokens);
    }

    let mut engine: Box<dyn Engine> = if args.engine == "terse" {
        let mut model = match loaded.take() {
            Some(m) => m.transformer,
            None => load_gguf_on(&args.model, "bench", &device)?.transformer,
        };
        if args.kv_f16 {
            model.set_kv_precision(terse::model::KvPrecision::F16);
        }
        // The forward pass alone: every run computes its whole prompt, and
        // frees its pages (no capacity bounds a cache here).
        model.set_prefix_cache(false)?;
        let cache = model.new_cache();
        Box::new(Terse { model, cache })
    } else {
        Box::new(Reference::load(&args.model, &device)?)
    };
    let load_s = load_start.elapsed().as_secs_f64();

    for _ in 0..args.warmup {
        run_once(engine.as_mut(), &prompt, args.decode_tokens.min(8))?;
    }
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut greedy = Vec::new();
    for run in 0..args.runs {
        let (p, d, g) = run_once(engine.as_mut(), &prompt, args.decode_tokens)?;
        greedy = g;
        eprintln!("{} run {}: prefill {p:.1} tok/s, decode {d:.1} tok/s", args.engine, run + 1);
        prefill.push(p);
        decode.push(d);
    }

    let mut batch_decode = Vec::new();
    if args.batch > 0 {
        let model = engine.terse_model().context("--batch needs --engine terse")?;
        for run in 0..args.runs {
            let d = batched_decode(model, &prompt, args.decode_tokens, args.batch)?;
            eprintln!("batch {} run {}: aggregate decode {d:.1} tok/s", args.batch, run + 1);
            batch_decode.push(d);
        }
    }

    let out = serde_json::json!({
        "engine": args.engine,
        "model": args.model.display().to_string(),
        "arch": arch,
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
        "device": args.device.to_string(),
        "prompt_tokens": prompt.len(),
        "decode_tokens": args.decode_tokens,
        "runs": args.runs,
        "prefill_tok_s": median(&prefill),
        "decode_tok_s": median(&decode),
        "prefill_tok_s_runs": prefill,
        "decode_tok_s_runs": decode,
        "batch": args.batch,
        "kv_cache_dtype": if args.kv_f16 { "f16" } else { "f32" },
        "batch_decode_tok_s": (!batch_decode.is_empty()).then(|| median(&batch_decode)),
        "batch_decode_tok_s_runs": batch_decode,
        "load_s": load_s,
        "peak_rss_kb": proc_status_kb("VmHWM"),
        "prompt_ids": prompt,
        "greedy_ids": greedy,
    });
    println!("{out}");
    Ok(())
}

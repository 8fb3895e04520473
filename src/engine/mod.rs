//! The scheduler: continuous batching over one model on its own thread.
//!
//! The HTTP side submits a [`GenerationRequest`] through an [`EngineHandle`] and
//! reads [`GenerationEvent`]s from the returned [`GenerationStream`].
//! Cancelling the stream (or dropping it) stops the sequence; the engine frees
//! its KV cache at its next step, and answers a cancelled stream with its usage.

mod device_pick;
mod grammar;
mod handle;
mod logits;
mod profile;
mod request;
mod sampling;
mod scheduler;
mod speculate;
mod stop;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use anyhow::{Context, Result};

pub use device_pick::PickOnDevice;
pub use handle::{EngineConfig, EngineHandle, GenerationStream, DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK, DEFAULT_SPECULATE_MAX_BATCH};
pub use grammar::{Constraint, ConstraintKind, GrammarCompiler};
pub use logits::{DeviceEdit, LogitBias, LogitChain, LogitProcessor, Penalties};
pub use profile::{probe_word_ids, resolve_reasoning, unmatched_probe_word, ProfileSource, ReasoningSummary, ResolvedReasoning};
pub use request::*;
pub use crate::reasoning::stopping::argmax;
pub use sampling::Sampler;
pub use speculate::{Speculation, MAX_DRAFT};

use crate::metrics::Metrics;
use candle_core::Device;

use crate::model::{load_gguf_on, load_hf_dir_on, LoadedModel, SparseMode};

/// Default KV-cache budget: room for a full batch of full-context sequences,
/// but no more than this (sequences beyond it wait), and never less than one
/// full-context sequence.
const DEFAULT_KV_BUDGET_CAP: u64 = 4 << 30;

/// Load the model file and start the engine thread (blocking: call it off the async runtime).
pub fn start_engine(model_path: &Path, served_name: &str, config: EngineConfig, metrics: Arc<Metrics>) -> Result<EngineHandle> {
    let device = config.device.open()?;
    let model = load_model_on(model_path, served_name, config.sparse, &device)?;
    start_with_model(model, config, metrics)
}

/// A GGUF file, or a Hugging Face directory, on the CPU.
pub fn load_model(path: &Path, served_name: &str, sparse: SparseMode) -> Result<LoadedModel> {
    load_model_on(path, served_name, sparse, &Device::Cpu)
}

/// A GGUF file, or a Hugging Face directory, on `device`.
pub fn load_model_on(path: &Path, served_name: &str, sparse: SparseMode, device: &Device) -> Result<LoadedModel> {
    if path.is_dir() {
        Ok(load_hf_dir_on(path, served_name, sparse, device)?.0)
    } else {
        load_gguf_on(path, served_name, device)
    }
}

pub fn start_with_model(model: LoadedModel, config: EngineConfig, metrics: Arc<Metrics>) -> Result<EngineHandle> {
    let LoadedModel { mut transformer, tokenizer, info } = model;
    transformer.set_kv_precision(config.kv_cache_dtype);
    transformer.set_prefix_cache(config.prefix_cache)?;
    if let Some(buckets) = config.cuda_graphs.buckets(transformer.device()).map_err(anyhow::Error::msg)? {
        tracing::warn!("--cuda-graphs on: capture is not built yet; decode steps run eagerly at the graphs' fixed shapes");
        transformer.set_static_decode_shapes(Some(buckets))?;
    }
    warm_up(&transformer).context("the warm-up forward pass failed")?;
    let context_length = info.context_length;
    let kv_bytes_per_token = transformer.kv_bytes_per_token();
    let full_sequence = context_length as u64 * kv_bytes_per_token;
    let kv_budget_bytes = config.kv_cache_budget_bytes.unwrap_or_else(|| {
        let cap = gpu_kv_cap(transformer.device()).unwrap_or(DEFAULT_KV_BUDGET_CAP);
        (full_sequence * config.max_batch as u64).min(cap).max(full_sequence)
    });
    transformer.set_kv_capacity(kv_budget_bytes, config.max_batch);
    tracing::info!(device = %info.device, kv_budget_bytes, "model loaded");

    metrics.kv_cache_budget_bytes.set(kv_budget_bytes as i64);
    metrics.model_weight_bytes.set(info.weight_bytes as i64);
    metrics
        .model_info
        .with_label_values(&[&info.id, &info.arch, &info.format, &info.dtype, &format!("{}", info.sparse_fraction), &info.device])
        .set(1);

    let reasoning = resolve_reasoning(&tokenizer, &config.reasoning, config.reasoning.from_manifest)?;
    let summary = &reasoning.summary;
    tracing::info!(
        source = ?summary.source,
        think_open = summary.think_open.as_deref().unwrap_or(""),
        think_close = summary.think_close.as_deref().unwrap_or(""),
        thinking_by_default = summary.thinking_by_default,
        opens_thought_after_prompt = reasoning.profile.start_thinking && reasoning.think.is_some(),
        "reasoning profile"
    );
    let shared = Arc::new(handle::Shared {
        info,
        tokenizer: Arc::new(tokenizer),
        think: reasoning.think,
        injections: reasoning.injections,
        profile: reasoning.profile,
        reasoning_summary: reasoning.summary,
        grammar: std::sync::OnceLock::new(),
        max_queue: config.max_queue,
        context_length,
        kv_bytes_per_token,
        kv_budget_bytes,
        waiting: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
    });
    let (submit_tx, submissions) = std::sync::mpsc::channel();
    let pick_on_device = config.pick_on_device.enabled(transformer.device());
    let transformer_runs_on_host = transformer.runs_on_host();
    let mut speculation = config.speculation.clone();
    if speculation != Speculation::Off && !transformer_runs_on_host {
        tracing::warn!("speculative decoding runs on the CPU's host path only; this model decodes without it");
        speculation = Speculation::Off;
    }
    let draft_model = match &speculation {
        Speculation::Draft(path) => {
            let (draft, weight_bytes) = load_draft_model(path, &shared, &config)?;
            Some((draft, weight_bytes as f32 / shared.info.weight_bytes.max(1) as f32))
        }
        _ => None,
    };
    let scheduler = scheduler::Scheduler {
        model: transformer,
        shared: shared.clone(),
        metrics,
        submissions,
        max_batch: config.max_batch.max(1),
        prefill_chunk: config.prefill_chunk.max(1),
        pick_on_device,
        // Drafts are verified on the host path, whose rows are batch-invariant.
        speculation,
        speculate_max_batch: config.speculate_max_batch,
        draft_model,
        draft_tokens: config.speculate_draft_tokens,
    };
    std::thread::Builder::new()
        .name("terse-engine".into())
        .spawn(move || scheduler.run())
        .context("spawning the engine thread")?;
    Ok(EngineHandle { shared, submit_tx })
}

/// The draft model of `--speculate draft:MODEL`, on the CPU's host path,
/// refused unless its vocabulary is the target's token for token (its
/// proposals are token ids). Its KV cache is kept as the target's is
/// (precision, prefix cache), sized for the sequences that may speculate.
/// Returns the model and its weight bytes.
fn load_draft_model(path: &Path, shared: &handle::Shared, config: &EngineConfig) -> Result<(crate::model::Transformer, u64)> {
    let LoadedModel { mut transformer, tokenizer, info } = load_model_on(path, "draft", config.sparse, &Device::Cpu)
        .with_context(|| format!("loading the draft model {}", path.display()))?;
    let (target_vocab, draft_vocab) = (shared.tokenizer.inner().get_vocab(true), tokenizer.inner().get_vocab(true));
    if let Some(difference) = speculate::vocabulary_difference(&target_vocab, &draft_vocab) {
        anyhow::bail!("the draft model {} has another vocabulary than {} ({difference}): a draft must share the target's tokenizer", path.display(), shared.info.id);
    }
    if !transformer.runs_on_host() {
        anyhow::bail!("the draft model {} ({}) does not run on the CPU's host path, which drafting needs", path.display(), info.dtype);
    }
    let mut weight_bytes = info.weight_bytes;
    if let Some(rows) = config.speculate_draft_vocab {
        if info.format != "gguf" {
            anyhow::bail!("--speculate-draft-vocab needs a GGUF draft model; {} is {}", path.display(), info.format);
        }
        // A draft pass reads only the kept rows of the head. A tied head's
        // table still serves every lookup, a row at a time.
        let (head, whole, kept) = crate::model::read_head_rows(path, rows)?;
        transformer.lm_head = head;
        weight_bytes = weight_bytes.saturating_sub(whole.saturating_sub(kept));
        tracing::info!(rows, head_bytes = kept, "the draft model proposes among the first {rows} token ids");
    }
    transformer.set_kv_precision(config.kv_cache_dtype);
    transformer.set_prefix_cache(config.prefix_cache)?;
    warm_up(&transformer).context("the draft model's warm-up forward pass failed")?;
    // A context for each sequence that may speculate, but never more
    // positions than the target's own pool holds.
    let streams = config.speculate_max_batch.max(1);
    let target_positions = (shared.kv_budget_bytes / shared.kv_bytes_per_token.max(1)).max(shared.context_length as u64);
    let positions = (shared.context_length as u64 * streams as u64).min(target_positions);
    transformer.set_kv_capacity(positions * transformer.kv_bytes_per_token(), streams);
    tracing::info!(draft = %path.display(), arch = %info.arch, dtype = %info.dtype, weight_bytes, "draft model loaded");
    Ok((transformer, weight_bytes))
}

/// One small forward pass (a one-token and a two-token sequence) before the
/// engine exists, so before `/ready`: candle repacks some quantized weights and
/// a GPU loads its kernels on first use, which the first request would wait for.
fn warm_up(model: &crate::model::Transformer) -> Result<()> {
    use crate::model::SeqChunk;
    let started = std::time::Instant::now();
    let (mut one, mut two) = (model.new_cache(), model.new_cache());
    let logits = model.forward(&mut [SeqChunk { tokens: &[0], cache: &mut one }, SeqChunk { tokens: &[0, 0], cache: &mut two }])?;
    // The device path's argmax too; reading the result waits for the GPU.
    logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
    tracing::info!(secs = started.elapsed().as_secs_f64(), "warm-up forward pass done");
    Ok(())
}

/// On a GPU the default KV budget is measured in its own memory: half of what
/// is free once the weights are in (the rest is headroom for activations and
/// cuBLAS workspaces). `None` on the CPU.
#[cfg(feature = "cuda")]
fn gpu_kv_cap(device: &Device) -> Option<u64> {
    let Device::Cuda(cuda) = device else { return None };
    let (free, _total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some(free as u64 / 2)
}

#[cfg(not(feature = "cuda"))]
fn gpu_kv_cap(_device: &Device) -> Option<u64> {
    None
}

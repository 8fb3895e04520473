//! The scheduler: continuous batching over one model on its own thread.
//!
//! The HTTP side submits a [`GenerationRequest`] through an [`EngineHandle`] and
//! reads [`GenerationEvent`]s from the returned [`GenerationStream`]. Dropping
//! the stream cancels the sequence; the engine frees its KV cache at its next step.

mod handle;
mod request;
mod sampling;
mod scheduler;
mod stop;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use anyhow::{Context, Result};

pub use handle::{EngineConfig, EngineHandle, GenerationStream};
pub use request::*;
pub use sampling::{argmax, Sampler};

use crate::metrics::Metrics;
use crate::model::{load_gguf, load_hf_dir, LoadedModel, SparseMode};
use crate::reasoning::control::Injections;
use crate::reasoning::phase::ThinkTokens;
use crate::reasoning::profile::ReasoningProfile;
use crate::tokenize::TextTokenizer;

/// Default KV-cache budget: room for a full batch of full-context sequences,
/// but no more than this (sequences beyond it wait), and never less than one
/// full-context sequence.
const DEFAULT_KV_BUDGET_CAP: u64 = 4 << 30;

/// Load the model file and start the engine thread (blocking: call it off the async runtime).
pub fn start_engine(model_path: &Path, served_name: &str, config: EngineConfig, metrics: Arc<Metrics>) -> Result<EngineHandle> {
    let model = load_model(model_path, served_name, config.sparse)?;
    start_with_model(model, config, metrics)
}

/// A GGUF file, or a Hugging Face directory.
pub fn load_model(path: &Path, served_name: &str, sparse: SparseMode) -> Result<LoadedModel> {
    if path.is_dir() {
        Ok(load_hf_dir(path, served_name, sparse)?.0)
    } else {
        load_gguf(path, served_name)
    }
}

pub fn start_with_model(model: LoadedModel, config: EngineConfig, metrics: Arc<Metrics>) -> Result<EngineHandle> {
    let LoadedModel { transformer, tokenizer, info } = model;
    let context_length = info.context_length;
    let kv_bytes_per_token = transformer.config.kv_bytes_per_token();
    let full_sequence = context_length as u64 * kv_bytes_per_token;
    let kv_budget_bytes = config.kv_cache_budget_bytes.unwrap_or_else(|| {
        (full_sequence * config.max_batch as u64).min(DEFAULT_KV_BUDGET_CAP).max(full_sequence)
    });

    metrics.kv_cache_budget_bytes.set(kv_budget_bytes as i64);
    metrics.model_weight_bytes.set(info.weight_bytes as i64);
    metrics
        .model_info
        .with_label_values(&[&info.id, &info.arch, &info.format, &info.dtype, &format!("{}", info.sparse_fraction)])
        .set(1);

    let (think, injections) = reasoning_profile(&tokenizer, &config.reasoning)?;
    let shared = Arc::new(handle::Shared {
        info,
        tokenizer: Arc::new(tokenizer),
        think,
        injections,
        profile: config.reasoning.clone(),
        max_queue: config.max_queue,
        context_length,
        kv_bytes_per_token,
        kv_budget_bytes,
        waiting: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
    });
    let (submit_tx, submissions) = std::sync::mpsc::channel();
    let scheduler = scheduler::Scheduler {
        model: transformer,
        shared: shared.clone(),
        metrics,
        submissions,
        max_batch: config.max_batch.max(1),
        prefill_chunk: config.prefill_chunk.max(1),
    };
    std::thread::Builder::new()
        .name("terse-engine".into())
        .spawn(move || scheduler.run())
        .context("spawning the engine thread")?;
    Ok(EngineHandle { shared, submit_tx })
}

/// The think delimiters and injected texts of a model, tokenized once. The
/// delimiters count only when the vocabulary holds each as one token.
fn reasoning_profile(tokenizer: &TextTokenizer, profile: &ReasoningProfile) -> Result<(Option<ThinkTokens>, Injections)> {
    let think = match (tokenizer.token_to_id(&profile.think_open), tokenizer.token_to_id(&profile.think_close)) {
        (Some(open), Some(close)) if open != close => Some(ThinkTokens { open, close }),
        _ => None,
    };
    let end_of_thinking = if think.is_some() { &profile.end_of_thinking } else { &profile.wrap_up };
    let injections = Injections {
        end_of_thinking: tokenizer.encode(end_of_thinking)?,
        continuation: tokenizer.encode(&profile.continuation)?,
        answer_tokens_after_wrap_up: Some(profile.answer_tokens_after_wrap_up),
    };
    Ok((think, injections))
}

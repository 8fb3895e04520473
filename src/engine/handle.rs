//! The HTTP side's view of the engine: submit, stream, cancel by dropping.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::request::{GenerationEvent, GenerationRequest, SubmitError};
use crate::model::{DeviceSpec, ModelInfo, SparseMode};
use crate::reasoning::control::Injections;
use crate::reasoning::phase::ThinkTokens;
use crate::reasoning::profile::ReasoningProfile;
use crate::tokenize::TextTokenizer;

/// The scheduler's defaults, one source for `EngineConfig::default` and the
/// command line's.
pub const DEFAULT_MAX_BATCH: usize = 8;
pub const DEFAULT_MAX_QUEUE: usize = 64;
pub const DEFAULT_PREFILL_CHUNK: usize = 512;
/// Above this many running sequences no row of a step's tile is left for
/// drafts (`speculate::DraftRows`; docs/perf.md, "Verifying in one tile").
pub const DEFAULT_SPECULATE_MAX_BATCH: usize = super::speculate::STEP_TILE_ROWS - 1;

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences in one forward step.
    pub max_batch: usize,
    /// Most requests waiting to join the batch; beyond it `submit` answers `QueueFull`.
    pub max_queue: usize,
    /// KV-cache bytes all running sequences may reserve; `None` sizes it from the model.
    pub kv_cache_budget_bytes: Option<u64>,
    /// Prompt tokens a sequence feeds per step while it prefills.
    pub prefill_chunk: usize,
    /// What the CPU's KV cache keeps keys and values in (f16 by default, as
    /// llama.cpp's: half the bytes that decoding a long context reads).
    pub kv_cache_dtype: crate::model::KvPrecision,
    /// Keep full KV pages of prompts and share them with later requests that
    /// start the same way.
    pub prefix_cache: bool,
    /// The model's think delimiters, injected texts and mode presets.
    pub reasoning: ReasoningProfile,
    /// Hugging Face directories: run 2:4-conforming projections on the sparse kernel.
    pub sparse: SparseMode,
    /// Where the model runs.
    pub device: DeviceSpec,
    /// Whether greedy tokens are chosen on the model's device.
    pub pick_on_device: super::PickOnDevice,
    /// `--cuda-graphs`: decode steps at fixed shapes on a GPU.
    pub cuda_graphs: crate::model::CudaGraphs,
    /// Speculative decoding (`--speculate`).
    pub speculation: super::Speculation,
    /// Speculate only while at most this many sequences run.
    pub speculate_max_batch: usize,
    /// Draft this many tokens a step instead of the adaptive length.
    pub speculate_draft_tokens: Option<usize>,
    /// The draft model proposes only among the first this many token ids.
    pub speculate_draft_vocab: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: DEFAULT_MAX_BATCH,
            max_queue: DEFAULT_MAX_QUEUE,
            kv_cache_budget_bytes: None,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            kv_cache_dtype: crate::model::KvPrecision::F16,
            prefix_cache: true,
            reasoning: ReasoningProfile::default(),
            sparse: SparseMode::Auto,
            device: DeviceSpec::Cpu,
            pick_on_device: super::PickOnDevice::Auto,
            cuda_graphs: crate::model::CudaGraphs::Auto,
            speculation: super::Speculation::Off,
            speculate_max_batch: DEFAULT_SPECULATE_MAX_BATCH,
            speculate_draft_tokens: None,
            speculate_draft_vocab: None,
        }
    }
}

/// Events of one sequence. [`GenerationStream::cancel`] stops the sequence,
/// and the engine answers with its last event, `Finished` with reason
/// `Cancelled` and the usage so far; dropping the stream stops it too,
/// unanswered.
pub struct GenerationStream {
    pub(crate) rx: mpsc::UnboundedReceiver<GenerationEvent>,
    pub(crate) cancelled: Arc<AtomicBool>,
}

impl GenerationStream {
    /// The next event; `None` once the engine has sent `Finished` or `Failed`.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        self.rx.recv().await
    }

    /// The next `Token` or `Finished` event; `Failed`, and an engine that
    /// stopped before `Finished`, are errors (their messages say which).
    pub async fn read(&mut self) -> Result<GenerationEvent, String> {
        match self.next().await {
            Some(GenerationEvent::Failed { message }) => Err(format!("generation failed: {message}")),
            Some(event) => Ok(event),
            None => Err("the engine stopped before finishing the request".into()),
        }
    }

    /// Stop generating; the engine answers at its next step.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
}

pub(crate) struct Submission {
    pub request: GenerationRequest,
    pub events: mpsc::UnboundedSender<GenerationEvent>,
    pub cancelled: Arc<AtomicBool>,
    /// Counted in flight until the sequence is dropped.
    pub in_flight: InFlight,
    /// Counted as waiting until admitted (or dropped).
    pub queued: Queued,
}

impl Submission {
    /// The client cancelled or went away.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst) || self.events.is_closed()
    }
}

/// A request counted in `Shared::in_flight` for as long as it lives.
pub(crate) struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request counted in `Shared::waiting` for as long as it lives.
pub(crate) struct Queued(Arc<Shared>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) struct Shared {
    pub info: ModelInfo,
    pub tokenizer: Arc<TextTokenizer>,
    /// The model's think delimiters, if it has them.
    pub think: Option<ThinkTokens>,
    pub injections: Injections,
    pub profile: ReasoningProfile,
    pub reasoning_summary: super::ReasoningSummary,
    /// Compiles answer grammars, built on first use (a second or so for a
    /// 150k vocabulary, which a server that never constrains need not wait
    /// for); `Err` says why this vocabulary cannot have them.
    pub grammar: std::sync::OnceLock<Result<Arc<super::GrammarCompiler>, String>>,
    pub max_queue: usize,
    pub context_length: usize,
    pub kv_bytes_per_token: u64,
    pub kv_budget_bytes: u64,
    /// Submitted but not yet admitted to the running batch.
    pub waiting: AtomicUsize,
    /// Submitted and not yet finished (waiting or running).
    pub in_flight: AtomicUsize,
    pub shutting_down: AtomicBool,
}

/// A cheap, clonable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) submit_tx: std::sync::mpsc::Sender<Submission>,
}

impl EngineHandle {
    /// Check the request against the engine's limits and queue it.
    pub fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, SubmitError> {
        let shared = &self.shared;
        if shared.shutting_down.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if request.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let total = request.prompt.len() + request.max_tokens;
        if total > shared.context_length {
            return Err(SubmitError::TooLong {
                prompt: request.prompt.len(),
                max_tokens: request.max_tokens,
                context: shared.context_length,
            });
        }
        let needed = total as u64 * shared.kv_bytes_per_token;
        if needed > shared.kv_budget_bytes {
            return Err(SubmitError::OverBudget { needed, budget: shared.kv_budget_bytes });
        }
        // Reserve a queue slot atomically so concurrent submits cannot overshoot it.
        let reserved = shared.waiting.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
            (w < shared.max_queue).then_some(w + 1)
        });
        if reserved.is_err() {
            return Err(SubmitError::QueueFull(shared.max_queue));
        }
        // From here the guards keep the books: a submission the engine never
        // takes in is dropped with them.
        let queued = Queued(shared.clone());
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let in_flight = InFlight(shared.clone());
        let (events, rx) = mpsc::unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let submission = Submission { request, events, cancelled: cancelled.clone(), in_flight, queued };
        if self.submit_tx.send(submission).is_err() {
            return Err(SubmitError::ShuttingDown);
        }
        Ok(GenerationStream { rx, cancelled })
    }

    pub fn model_info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// The model's mode presets and injected texts.
    pub fn reasoning_profile(&self) -> &ReasoningProfile {
        &self.shared.profile
    }

    /// Where the model's reasoning profile came from, and what it says.
    pub fn reasoning_summary(&self) -> &super::ReasoningSummary {
        &self.shared.reasoning_summary
    }

    /// The model's think delimiters, if it has them.
    pub fn think_tokens(&self) -> Option<ThinkTokens> {
        self.shared.think
    }

    /// The tokens injected to close a thought at the budget.
    pub fn end_of_thinking_tokens(&self) -> &[u32] {
        &self.shared.injections.end_of_thinking
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.shared.tokenizer
    }

    /// The bytes of token `id` as the model writes them (special tokens as their text).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self.grammar_compiler() {
            Ok(compiler) => compiler.token_bytes(id).to_vec(),
            Err(_) => self.shared.tokenizer.decode(&[id]).into_bytes(),
        }
    }

    /// The compiler of answer grammars (built on the first call: call it off
    /// the async workers), or why the model cannot have one.
    pub fn grammar_compiler(&self) -> Result<&Arc<super::GrammarCompiler>, &str> {
        self.shared
            .grammar
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let built = super::GrammarCompiler::new(&self.shared.tokenizer).map(Arc::new).map_err(|e| {
                    tracing::warn!("structured outputs are off for this model: {e:#}");
                    format!("this model's vocabulary cannot be used for grammars ({e:#})")
                });
                tracing::info!(secs = started.elapsed().as_secs_f64(), "grammar vocabulary built");
                built
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// The longest prompt + completion a sequence may have, in tokens.
    pub fn context_length(&self) -> usize {
        self.shared.context_length
    }

    /// Refuse new requests from now on; those in flight carry on.
    pub fn begin_shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Requests submitted and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }
}

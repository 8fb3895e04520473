//! The engine thread: continuous batching over one model.
//!
//! Each step ([`Scheduler::run`]): take in new submissions, retire cancelled
//! sequences (each answered with its usage so far), admit waiting ones while
//! the batch and the KV-cache budget allow, plan ONE forward pass over every
//! running sequence (prefill chunks and decode tokens together), run it,
//! choose each sequence's next token, stream and retire. A sequence joins or
//! leaves between any two steps.
//!
//! No books are kept by hand: a request's place in the queue and in-flight
//! counters is a guard it holds (`handle.rs`), and the KV budget in use is
//! computed from the running sequences, so dropping a sequence, for whatever
//! reason, releases all it held.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use candle_core::Tensor;

use super::device_pick::{pick_greedy, GreedyRow};
use super::handle::{InFlight, Shared, Submission};
use super::grammar::GrammarMask;
use super::profile::probe_word_ids;
use super::logits::{LogitBias, LogitChain, Penalties};
use super::request::{FinishReason, GenerationEvent, GenerationRequest, ReasoningUsage, TokenLogprob, Usage};
use super::sampling::Sampler;
use super::speculate::{draft_gain, propose, DraftCache, DraftLength, DraftRows, Speculation, MAX_DRAFT, VERIFIED_ROW_COST};
use super::stop::{StopMatcher, StopOutcome};
use crate::metrics::Metrics;
use crate::model::{Rows, SeqChunk, SeqKvCache, StepLogits, Transformer};
use crate::reasoning::control::{Decision, ForcedKind, Held, ReasoningControl, Strategy, ThinkStopReason};
use crate::reasoning::probing::ProbeStep;
use crate::reasoning::stopping::argmax;
use crate::reasoning::phase::PhaseTracker;
use crate::tokenize::PhasedDecoder;

struct Sequence {
    request: GenerationRequest,
    events: UnboundedSender<GenerationEvent>,
    cancelled: Arc<AtomicBool>,
    /// Prompt followed by completion tokens (sampled and injected).
    tokens: Vec<u32>,
    /// Completion tokens so far, the end-of-turn token included.
    completion: usize,
    /// Prompt positions the prefix cache held when the sequence started.
    cached: usize,
    /// Reasoning control, penalties, bias, grammar: the editors of the next token's logits.
    logits: LogitChain,
    /// The log-probability of the token just sampled, when the request asked.
    sampled_logprob: Option<TokenLogprob>,
    sampler: Sampler,
    cache: SeqKvCache,
    decoder: PhasedDecoder,
    stop: StopMatcher,
    /// While an answer probe runs: (tokens, cached positions) to roll back to.
    probe_from: Option<(usize, usize)>,
    /// Tokens proposed this step after the last one, fed with it to be verified.
    draft: Vec<u32>,
    /// Draft lengths for prompt lookup and for the draft model, and which
    /// of the two made this step's draft.
    lookup_length: DraftLength,
    model_length: DraftLength,
    drafted_by_model: bool,
    /// The draft model's cache of this sequence, once it has drafted.
    drafter: Option<DraftCache>,
    _in_flight: InFlight,
}

impl Sequence {
    /// Tokens not yet fed through the model.
    fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }

    fn control(&self) -> &ReasoningControl {
        &self.logits.reasoning
    }

    /// The next token from its logits `row`: every processor, then the
    /// sampler, its log-probability kept when the request asked (the one
    /// choice plain decoding and draft verification share).
    fn choose_from(&mut self, row: &mut [f32]) -> u32 {
        self.logits.apply(row);
        let token = self.sampler.sample(row);
        self.sampled_logprob = self.request.choice.logprobs.map(|top| logprob_of(row, token, top));
        token
    }

    /// This step's draft, fed after the last token.
    fn take_draft(&mut self, draft: Vec<u32>, by_model: bool) {
        self.tokens.extend_from_slice(&draft);
        self.draft = draft;
        self.drafted_by_model = by_model;
    }

    /// The length policy of the kind of draft this step's is.
    fn draft_length(&mut self) -> &mut DraftLength {
        if self.drafted_by_model {
            &mut self.model_length
        } else {
            &mut self.lookup_length
        }
    }

    /// Forget the draft proposed this step (its tokens are not fed) and the
    /// draft model's cache.
    fn drop_draft(&mut self) {
        let draft = std::mem::take(&mut self.draft);
        self.tokens.truncate(self.tokens.len() - draft.len());
        self.drafter = None;
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst) || self.events.is_closed()
    }

    /// The last event: how the sequence ended and what it used.
    fn finish(&self, reason: FinishReason) {
        let usage = Usage { prompt_tokens: self.request.prompt.len(), completion_tokens: self.completion, cached_tokens: self.cached };
        let reasoning = reasoning_usage(self.control(), reason);
        let _ = self.events.send(GenerationEvent::Finished { reason, usage, reasoning });
    }
}

/// How a completion's tokens split, from its reasoning control.
fn reasoning_usage(control: &ReasoningControl, reason: FinishReason) -> ReasoningUsage {
    let ended_by = match reason {
        FinishReason::Stop => ThinkStopReason::Natural,
        FinishReason::Length => ThinkStopReason::Length,
        FinishReason::Cancelled => ThinkStopReason::Cancelled,
    };
    ReasoningUsage {
        thinking_tokens: control.thinking_tokens(),
        answer_tokens: control.answer_tokens(),
        forced_tokens: control.forced_tokens(),
        forced_end_of_thinking: control.forced_tokens_of(ForcedKind::EndOfThinking),
        forced_continuation: control.forced_tokens_of(ForcedKind::Continuation),
        think_stop_reason: control.stop_reason(ended_by),
        probe_tokens: control.probe_tokens(),
        probes: control.probe_outcomes(),
    }
}

/// What a sequence takes in after a step.
enum Next {
    /// Injected text (budget forcing's end of thinking).
    Forced(Vec<u32>),
    /// Answer tokens the grammar leaves no choice about, fed together.
    Grammar(Vec<u32>),
    /// A token chosen from the logits.
    Sampled(u32),
    /// A running probe's greedy token and its probability.
    Probe(u32, f32),
    /// A draft verified, its tokens taken in already; `Some` when the sequence ended.
    Verified(Option<FinishReason>),
}

/// What the engine holds between steps.
#[derive(Default)]
struct Batch {
    waiting: VecDeque<Submission>,
    running: Vec<Sequence>,
    /// Whether new submissions can still arrive.
    closed: bool,
}

impl Batch {
    fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }
}

/// One step's rows: (index among the running sequences, tokens it feeds).
type StepPlan = Vec<(usize, usize)>;

/// A step's rows from what each running sequence has left to feed (1: it
/// decodes). Prompt chunks are at most `chunk` tokens, and together at most
/// `chunk` a step (at least one chunk enters). With `while_decoding`, a step
/// in which some sequence decodes gives each prompt a chunk of at most that
/// many tokens, and all of them together at most that many per prompt, so a
/// long prompt does not hold back the others' next token, while a burst of
/// short prompts still enters in few steps (chunked prefill). A prompt
/// alone is fed in full-size chunks.
fn plan_rows(pending: impl Iterator<Item = usize> + Clone, chunk: usize, while_decoding: Option<usize>) -> StepPlan {
    let decoding = pending.clone().any(|p| p == 1);
    let prompts = pending.clone().filter(|&p| p > 1).count();
    let (chunk, step_budget) = match while_decoding {
        Some(smaller) if decoding => (smaller.min(chunk), (smaller * prompts).min(chunk)),
        _ => (chunk, chunk),
    };
    let mut budget = step_budget;
    let mut plan = Vec::new();
    for (i, pending) in pending.enumerate() {
        if pending == 1 {
            plan.push((i, 1));
        } else {
            let take = pending.min(chunk);
            if take <= budget || budget == step_budget {
                budget = budget.saturating_sub(take);
                plan.push((i, take));
            }
        }
    }
    plan
}

pub(crate) struct Scheduler {
    pub model: Transformer,
    pub shared: Arc<Shared>,
    pub metrics: Arc<Metrics>,
    pub submissions: Receiver<Submission>,
    pub max_batch: usize,
    pub prefill_chunk: usize,
    /// Choose greedy tokens where the logits are (see `device_pick`).
    pub pick_on_device: bool,
    /// Speculative decoding (host path only).
    pub speculation: Speculation,
    pub speculate_max_batch: usize,
    /// With `Speculation::Draft`, the draft model (on the host path) and its
    /// pass's cost in target passes (weight bytes over the target's).
    pub draft_model: Option<(Transformer, f32)>,
    /// A fixed draft length instead of the adaptive one (`--speculate-draft-tokens`).
    pub draft_tokens: Option<usize>,
}

impl Scheduler {
    pub fn run(self) {
        let mut batch = Batch::default();
        // The host path's logits, kept from step to step.
        let mut host_logits: Vec<f32> = Vec::new();
        let phase_seconds = |name: &str| self.metrics.engine_step_seconds.with_label_values(&[name]);
        let (forward_seconds, pick_seconds, deliver_seconds) = (phase_seconds("forward"), phase_seconds("pick"), phase_seconds("deliver"));
        // Only a speculating engine has a draft phase (and its series).
        let draft_seconds = (self.speculation != Speculation::Off).then(|| phase_seconds("draft"));
        let took = |phase: &prometheus::Histogram, since: Instant| phase.observe(since.elapsed().as_secs_f64());
        while self.take_submissions(&mut batch) {
            self.retire_cancelled(&mut batch);
            self.admit(&mut batch);
            self.publish_gauges(&batch);
            if batch.running.is_empty() {
                continue;
            }
            let started = Instant::now();
            if let Err(e) = self.propose_drafts(&mut batch.running) {
                // The draft model failed: the step goes on without drafts.
                tracing::error!("drafting failed: {e}");
                for seq in batch.running.iter_mut() {
                    seq.drop_draft();
                }
            }
            if let Some(draft_seconds) = &draft_seconds {
                took(draft_seconds, started);
            }
            let plan = self.plan(&batch.running);
            self.metrics.batch_size.observe(plan.len() as f64);
            // Logit rows per planned sequence: a drafted one's last token and its draft.
            let tails: Vec<usize> = plan.iter().map(|&(i, _)| 1 + batch.running[i].draft.len()).collect();
            let started = Instant::now();
            let logits = self.forward(&mut batch.running, &plan, &tails, &mut host_logits);
            took(&forward_seconds, started);
            let started = Instant::now();
            match logits.and_then(|logits| self.choose(&mut batch.running, &plan, &tails, logits)) {
                Ok(choices) => {
                    took(&pick_seconds, started);
                    let started = Instant::now();
                    self.deliver(&mut batch.running, choices);
                    took(&deliver_seconds, started);
                }
                Err(e) => {
                    tracing::error!("forward pass failed: {e}");
                    for seq in batch.running.drain(..) {
                        let _ = seq.events.send(GenerationEvent::Failed { message: format!("model error: {e}") });
                    }
                }
            }
        }
        tracing::info!("engine thread stopped");
    }

    /// Take in new submissions, sleeping on the channel while there is
    /// nothing to do; `false` once nothing more can come and nothing is left.
    fn take_submissions(&self, batch: &mut Batch) -> bool {
        if batch.is_idle() {
            // The gauges were last set before the step that retired the last
            // sequences; they must not keep those while we sleep.
            self.publish_gauges(batch);
            if batch.closed {
                return false;
            }
            match self.submissions.recv() {
                Ok(s) => batch.waiting.push_back(s),
                Err(_) => return false,
            }
        }
        loop {
            match self.submissions.try_recv() {
                Ok(s) => batch.waiting.push_back(s),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => {
                    batch.closed = true;
                    return true;
                }
            }
        }
    }

    /// Answer and drop the requests whose client cancelled or went away.
    fn retire_cancelled(&self, batch: &mut Batch) {
        batch.waiting.retain(|s| {
            if !s.is_cancelled() {
                return true;
            }
            let usage = Usage { prompt_tokens: s.request.prompt.len(), completion_tokens: 0, cached_tokens: 0 };
            let reasoning = reasoning_usage(&self.reasoning_control(&s.request), FinishReason::Cancelled);
            let _ = s.events.send(GenerationEvent::Finished { reason: FinishReason::Cancelled, usage, reasoning });
            false
        });
        batch.running.retain(|seq| {
            if !seq.is_cancelled() {
                return true;
            }
            tracing::debug!(id = %seq.request.id, "sequence cancelled");
            seq.finish(FinishReason::Cancelled);
            false
        });
    }

    /// KV-cache bytes a request reserves: its whole length, prompt and
    /// completion, and the positions a probe or a draft holds past them for
    /// a while (never both at once: no draft is made while a probe runs).
    fn kv_need(&self, request: &GenerationRequest) -> u64 {
        let probe = match request.reasoning.strategy {
            Strategy::Probe => self.shared.injections.probe.len() + request.reasoning.probe.tokens,
            _ => 0,
        };
        let speculates = self.speculation != Speculation::Off && !request.choice.no_speculation;
        let draft = if speculates { MAX_DRAFT } else { 0 };
        (request.prompt.len() + request.max_tokens + probe.max(draft)) as u64 * self.shared.kv_bytes_per_token
    }

    fn kv_reserved(&self, batch: &Batch) -> u64 {
        batch.running.iter().map(|seq| self.kv_need(&seq.request)).sum()
    }

    /// Admit waiting requests in arrival order while the batch and the KV budget allow.
    fn admit(&self, batch: &mut Batch) {
        let mut reserved = self.kv_reserved(batch);
        while batch.running.len() < self.max_batch {
            let Some(front) = batch.waiting.front() else { break };
            let need = self.kv_need(&front.request);
            if reserved + need > self.shared.kv_budget_bytes {
                break;
            }
            reserved += need;
            let submission = batch.waiting.pop_front().expect("front exists");
            batch.running.push(self.start(submission));
        }
    }

    fn publish_gauges(&self, batch: &Batch) {
        self.metrics.queue_depth.set(batch.waiting.len() as i64);
        self.metrics.running_sequences.set(batch.running.len() as i64);
        self.metrics.kv_cache_used_bytes.set(self.kv_reserved(batch) as i64);
        if let Some((draft, _)) = &self.draft_model {
            self.metrics.draft_kv_cache_pool_bytes.set(draft.kv_pool_bytes() as i64);
        }
        if let Some(stats) = self.model.prefix_cache_stats() {
            let m = &self.metrics;
            // The pool counts from the start; the counters catch up with it.
            m.prefix_cache_queried_tokens_total.inc_by(stats.queried_tokens.saturating_sub(m.prefix_cache_queried_tokens_total.get()));
            m.prefix_cache_hit_tokens_total.inc_by(stats.hit_tokens.saturating_sub(m.prefix_cache_hit_tokens_total.get()));
            m.prefix_cache_evictions_total.inc_by(stats.evictions.saturating_sub(m.prefix_cache_evictions_total.get()));
            m.prefix_cache_pages.set(stats.cached_pages as i64);
            m.prefix_cache_bytes.set(stats.cached_bytes as i64);
            m.kv_cache_pool_bytes.set(stats.pool_bytes as i64);
            m.kv_cache_held_bytes.set(stats.held_bytes as i64);
        }
    }

    fn reasoning_control(&self, request: &GenerationRequest) -> ReasoningControl {
        let mut injections = self.shared.injections.clone();
        if let Some(words) = &request.reasoning.probe_words {
            injections.probe_words = probe_word_ids(&self.shared.tokenizer, words);
        }
        ReasoningControl::new(
            request.reasoning.clone(),
            injections,
            PhaseTracker::new(self.shared.think, &request.prompt),
            self.shared.tokenizer.end_of_turn_ids().to_vec(),
        )
    }

    /// A submission admitted to the batch: it leaves the queue's count now.
    fn start(&self, submission: Submission) -> Sequence {
        let Submission { request, events, cancelled, in_flight, queued } = submission;
        drop(queued);
        let penalties = Penalties::new(&request.sampling, &request.prompt);
        let grammar = request.choice.constraint.clone().map(|c| {
            let think_open = self.shared.think.map(|t| t.open);
            GrammarMask::new(c, self.shared.tokenizer.end_of_turn_ids().to_vec(), think_open, self.metrics.grammar_mask_seconds.clone())
        });
        let chain = LogitChain::new(self.reasoning_control(&request), penalties).with(LogitBias(request.choice.logit_bias.clone()), grammar);
        // Only what the prefix cache does not hold is prefilled.
        let cache = self.model.new_cache_for(&request.prompt);
        Sequence {
            cached: cache.len(),
            logits: chain,
            sampled_logprob: None,
            sampler: Sampler::new(request.sampling.clone()),
            stop: StopMatcher::new(request.stop.clone()),
            tokens: request.prompt.clone(),
            probe_from: None,
            draft: Vec::new(),
            lookup_length: self.draft_length_policy(false),
            model_length: self.draft_length_policy(true),
            drafted_by_model: false,
            drafter: None,
            completion: 0,
            cache,
            decoder: PhasedDecoder::new(self.shared.think),
            request,
            events,
            cancelled,
            _in_flight: in_flight,
        }
    }

    /// Decoding sequences feed their last token; prefilling ones feed a chunk
    /// of their prompt (`plan_rows`). On the host path, where the bits do not
    /// depend on where chunks end, chunks shrink while others decode.
    fn plan(&self, running: &[Sequence]) -> StepPlan {
        let while_decoding = self.model.runs_on_host().then_some((self.prefill_chunk / 4).max(1));
        // A drafted sequence decodes: it is planned as one row, then fed whole.
        let pending = running.iter().map(|s| if s.draft.is_empty() { s.pending() } else { 1 });
        let mut plan = plan_rows(pending, self.prefill_chunk, while_decoding);
        for (i, len) in plan.iter_mut() {
            if !running[*i].draft.is_empty() {
                *len = running[*i].pending();
            }
        }
        plan
    }

    /// A new sequence's draft length for prompt lookup or the draft model:
    /// fixed, or adaptive to the kind of draft.
    fn draft_length_policy(&self, for_model: bool) -> DraftLength {
        match (self.draft_tokens, &self.draft_model) {
            (Some(n), _) => DraftLength::fixed(n),
            (None, Some((_, pass))) if for_model => DraftLength::for_draft_model(*pass),
            _ => DraftLength::default(),
        }
    }

    /// Proposals for each decoding sequence that may speculate: its draft
    /// is appended to its tokens (fed this step) and kept in `draft`. Not
    /// while a grammar holds the answer (its mask is per position), a probe
    /// runs, or more sequences run than `speculate_max_batch` (then the draft
    /// model's caches are let go too). The drafts share what is left of one
    /// tile of the kernels' rows (`DraftRows`): a step of up to that many
    /// rows costs little more than one row, and a row past it, much more.
    /// Beside a draft model, prompt lookup goes first where it finds a match
    /// and its recent drafts are expected to give more per unit of time than
    /// the model's: copied text costs no draft pass.
    fn propose_drafts(&self, running: &mut [Sequence]) -> candle_core::Result<()> {
        if self.speculation == Speculation::Off {
            return Ok(());
        }
        if running.len() > self.speculate_max_batch {
            running.iter_mut().for_each(|seq| seq.drafter = None);
            return Ok(());
        }
        let may_draft = |seq: &Sequence| {
            let choice = &seq.request.choice;
            seq.pending() == 1 && choice.constraint.is_none() && !choice.no_speculation && seq.probe_from.is_none()
        };
        let mut rows = DraftRows::new(running.len(), running.iter().filter(|seq| may_draft(seq)).count());
        // (sequence, most tokens it may draft)
        let mut wanted: Vec<(&mut Sequence, usize)> = Vec::new();
        for seq in running.iter_mut() {
            if !may_draft(seq) {
                continue;
            }
            let share = rows.next_share();
            // Room for every drafted token and the one after them.
            let room = (self.shared.context_length.saturating_sub(seq.tokens.len() + 1))
                .min(seq.request.max_tokens.saturating_sub(seq.completion + 1))
                .min(share);
            if room == 0 {
                continue;
            }
            let copied = propose(&seq.tokens, seq.lookup_length.get().min(room));
            let Some((model, _)) = &self.draft_model else {
                rows.take(copied.len());
                seq.take_draft(copied, false);
                continue;
            };
            // Lookup goes first while its drafts are expected to beat the model's.
            if !copied.is_empty() && draft_gain(seq.lookup_length.rate(), copied.len(), VERIFIED_ROW_COST) >= seq.model_length.model_gain() {
                rows.take(copied.len());
                seq.take_draft(copied, false);
                continue;
            }
            // The draft model sees no position past its own context.
            let model_room = model.config.context_length.saturating_sub(seq.tokens.len() + 1);
            let len = seq.model_length.get().min(room).min(model_room);
            if len > 0 {
                rows.take(len);
                wanted.push((seq, len));
            }
        }
        let Some((model, _)) = &self.draft_model else { return Ok(()) };
        if wanted.is_empty() {
            return Ok(());
        }
        let drafts = self.draft_with_model(model, &mut wanted)?;
        for ((seq, _), draft) in wanted.into_iter().zip(drafts) {
            seq.take_draft(draft, true);
        }
        Ok(())
    }

    /// Each sequence's next tokens by the draft model, greedily, all the
    /// sequences in one draft step per token. A sequence's first draft
    /// feeds the draft model what it has not seen (the prompt, in chunks);
    /// a draft ends at its length, at an end of turn or at the end of a
    /// thought, since what follows a phase boundary is no guess worth making.
    fn draft_with_model(&self, model: &Transformer, wanted: &mut [(&mut Sequence, usize)]) -> candle_core::Result<Vec<Vec<u32>>> {
        let mut drafts: Vec<Vec<u32>> = vec![Vec::new(); wanted.len()];
        let mut done = vec![false; wanted.len()];
        for (seq, _) in wanted.iter_mut() {
            let drafter = seq.drafter.get_or_insert_with(|| DraftCache::new(model, &seq.tokens));
            drafter.sync(&seq.tokens)?;
        }
        let boundary = |t: u32| self.shared.tokenizer.end_of_turn_ids().contains(&t) || self.shared.think.is_some_and(|th| th.close == t);
        let mut logits = Vec::new();
        loop {
            let active: Vec<usize> = (0..wanted.len()).filter(|&w| !done[w] && drafts[w].len() < wanted[w].1).collect();
            if active.is_empty() {
                return Ok(drafts);
            }
            // What each active sequence feeds, at most a prefill chunk, and
            // whether that is all it has unfed (its logits then draft a token).
            let (feeds, finishes): (Vec<Vec<u32>>, Vec<bool>) = active
                .iter()
                .map(|&w| {
                    let (seq, _) = &wanted[w];
                    let mut unfed = seq.drafter.as_ref().expect("made above").unfed(&seq.tokens, &drafts[w]);
                    let finishes = unfed.len() <= self.prefill_chunk;
                    unfed.truncate(self.prefill_chunk);
                    (unfed, finishes)
                })
                .unzip();
            let mut caches: Vec<&mut DraftCache> = Vec::with_capacity(active.len());
            let mut next = active.iter().peekable();
            for (w, (seq, _)) in wanted.iter_mut().enumerate() {
                if next.peek() == Some(&&w) {
                    next.next();
                    caches.push(seq.drafter.as_mut().expect("made above"));
                }
            }
            let mut chunks: Vec<SeqChunk<'_>> = caches.iter_mut().zip(&feeds).map(|(d, feed)| SeqChunk { tokens: feed, cache: &mut d.cache }).collect();
            let StepLogits::Host(values) = model.step_rows(&mut chunks, Rows::Last, &mut logits)? else {
                candle_core::bail!("the draft model runs on the host path only");
            };
            let vocab = values.len() / active.len();
            // A draft model with more embedding rows than the target could
            // propose an id the target has none for.
            let choosable = vocab.min(self.model.config.vocab_size);
            for (k, (&w, feed)) in active.iter().zip(&feeds).enumerate() {
                wanted[w].0.drafter.as_mut().expect("made above").fed.extend_from_slice(feed);
                if finishes[k] {
                    let token = argmax(&values[k * vocab..k * vocab + choosable]);
                    drafts[w].push(token);
                    done[w] = boundary(token);
                } else {
                    // Still catching up (a long context): one chunk a step, no draft
                    // this step, so the other sequences do not wait for the rest.
                    done[w] = true;
                }
            }
        }
    }

    /// The step's one forward pass over the planned rows. The grammars of the
    /// sequences that choose a token after it work out their next step
    /// (forced run or mask) meanwhile, on a helper thread, off the step's
    /// critical path.
    fn forward<'l>(&self, running: &mut [Sequence], plan: &StepPlan, tails: &[usize], host_logits: &'l mut Vec<f32>) -> candle_core::Result<StepLogits<'l>> {
        let mut chunks: Vec<SeqChunk<'_>> = Vec::with_capacity(plan.len());
        let mut masks: Vec<&mut LogitChain> = Vec::new();
        let mut rest: &mut [Sequence] = running;
        let mut base = 0;
        for &(i, len) in plan {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - base);
            let (seq, after) = tail.split_first_mut().expect("index in range");
            let Sequence { tokens, cache, logits, .. } = seq;
            let start = cache.len();
            if start + len == tokens.len() && logits.needs_mask() {
                masks.push(logits);
            }
            chunks.push(SeqChunk { tokens: &tokens[start..start + len], cache });
            rest = after;
            base = i + 1;
        }
        let rows = if tails.iter().any(|&t| t > 1) { Rows::Tails(tails) } else { Rows::Last };
        if masks.is_empty() {
            return self.model.step_rows(&mut chunks, rows, host_logits);
        }
        std::thread::scope(|scope| {
            let helper = scope.spawn(move || masks.into_iter().for_each(LogitChain::prepare_grammar));
            let logits = self.model.step_rows(&mut chunks, rows, host_logits);
            // A mask that failed to come is computed in `choose` instead.
            let _ = helper.join();
            logits
        })
    }

    /// What each planned sequence whose prompt is fully fed takes in next:
    /// forced tokens, or a token chosen from its row of `logits`. The host
    /// path's rows are edited and sampled in place. Of a device's, greedy rows
    /// whose processors allow it are chosen there when `pick_on_device`; only
    /// the other rows are copied to the host, edited and sampled.
    fn choose(&self, running: &mut [Sequence], plan: &StepPlan, tails: &[usize], logits: StepLogits<'_>) -> candle_core::Result<Vec<(usize, Next)>> {
        let mut choices = Vec::with_capacity(plan.len());
        let mut host_rows: Vec<(usize, usize)> = Vec::new(); // (row, index in choices)
        let mut device_rows: Vec<(usize, usize)> = Vec::new();
        let mut drafted: Vec<(usize, usize)> = Vec::new(); // (row, sequence)
        let on_device = self.pick_on_device && matches!(logits, StepLogits::Device(_));
        for (row, &(i, _)) in plan.iter().enumerate() {
            let seq = &mut running[i];
            if seq.pending() > 0 {
                continue; // still prefilling
            }
            if !seq.draft.is_empty() {
                drafted.push((row, i));
                continue;
            }
            if seq.control().probing() {
                host_rows.push((row, choices.len()));
                choices.push((i, Next::Probe(0, 0.0)));
                continue;
            }
            // An empty injection text (a misconfigured model) would leave nothing to feed.
            if let Some(forced) = seq.logits.reasoning.forced_now().filter(|f| !f.is_empty()) {
                choices.push((i, Next::Forced(forced)));
                continue;
            }
            let jump = seq.logits.grammar_fast_forward();
            if !jump.is_empty() {
                choices.push((i, Next::Grammar(jump)));
                continue;
            }
            let slot = (row, choices.len());
            let wants_logprobs = seq.request.choice.logprobs.is_some();
            if on_device && !wants_logprobs && seq.sampler.is_greedy() && seq.logits.device_plan().is_some() {
                device_rows.push(slot);
            } else {
                host_rows.push(slot);
            }
            choices.push((i, Next::Sampled(0)));
        }
        if !device_rows.is_empty() {
            let rows: Vec<GreedyRow<'_>> = device_rows
                .iter()
                .map(|&(row, slot)| GreedyRow { row, ts: running[choices[slot].0].logits.device_plan().flatten() })
                .collect();
            let StepLogits::Device(on_device) = &logits else { unreachable!("device rows are taken only from a device's logits") };
            let picks = pick_greedy(on_device, &rows)?;
            drop(rows);
            for (&(_, slot), pick) in device_rows.iter().zip(picks) {
                running[choices[slot].0].logits.reasoning.note_top_before_edit(pick.top_was_stop);
                choices[slot].1 = Next::Sampled(pick.token);
            }
        }
        let mut sample = |slot: usize, row: &mut [f32]| {
            let seq = &mut running[choices[slot].0];
            // A probe reads the model's own answer: greedy, on logits nothing edited.
            if let Next::Probe(..) = choices[slot].1 {
                let token = argmax(row);
                choices[slot].1 = Next::Probe(token, top_probability(row, token));
                return;
            }
            choices[slot].1 = Next::Sampled(seq.choose_from(row));
        };
        match logits {
            // The host's logits are edited and sampled where the model wrote them.
            StepLogits::Host(values) => {
                // Row r's logits start at offsets[r] rows in (a drafted sequence has several).
                let offsets: Vec<usize> = tails.iter().scan(0, |at, &t| Some(std::mem::replace(at, *at + t))).collect();
                let vocab = values.len() / tails.iter().sum::<usize>();
                for &(row, slot) in &host_rows {
                    sample(slot, &mut values[offsets[row] * vocab..(offsets[row] + 1) * vocab]);
                }
                for &(row, i) in &drafted {
                    let rows = &mut values[offsets[row] * vocab..(offsets[row] + tails[row]) * vocab];
                    let ended = self.verify(&mut running[i], rows, vocab)?;
                    choices.push((i, Next::Verified(ended)));
                }
            }
            // Copy only the rows the host needs.
            // Drafts are verified on the host path only (`start_engine` turns speculation off elsewhere).
            StepLogits::Device(_) if !drafted.is_empty() => candle_core::bail!("a drafted sequence on the device path: speculation runs on the host path only"),
            StepLogits::Device(logits) if !host_rows.is_empty() => {
                let rows = if host_rows.len() == logits.dim(0)? {
                    logits.to_vec2::<f32>()?
                } else {
                    let index: Vec<u32> = host_rows.iter().map(|&(row, _)| row as u32).collect();
                    logits.index_select(&Tensor::new(index.as_slice(), logits.device())?, 0)?.to_vec2::<f32>()?
                };
                for (&(_, slot), mut row) in host_rows.iter().zip(rows) {
                    sample(slot, &mut row);
                }
            }
            StepLogits::Device(_) => {}
        }
        Ok(choices)
    }

    /// Take in each sequence's next token(s), stream them, and retire the
    /// sequences that ended.
    fn deliver(&self, running: &mut Vec<Sequence>, choices: Vec<(usize, Next)>) {
        let mut finished: Vec<usize> = Vec::new();
        for (i, next) in choices {
            let seq = &mut running[i];
            let ended = match next {
                Next::Forced(tokens) => self.push_tokens(seq, &tokens, Some(ForcedKind::EndOfThinking)),
                Next::Grammar(tokens) => {
                    self.metrics.grammar_jump_tokens_total.inc_by(tokens.len() as u64);
                    self.push_grammar_tokens(seq, &tokens)
                }
                Next::Sampled(token) => {
                    let ended = self.take_token(seq, token);
                    if ended.is_none() {
                        self.maybe_probe(seq);
                    }
                    ended
                }
                Next::Verified(ended) => ended,
                Next::Probe(token, prob) => match self.probe_token(seq, token, prob) {
                    Ok(ended) => ended,
                    Err(e) => {
                        tracing::error!(id = %seq.request.id, "rolling back a probe failed: {e}");
                        let _ = seq.events.send(GenerationEvent::Failed { message: format!("model error: {e}") });
                        finished.push(i);
                        continue;
                    }
                },
            };
            if let Some(reason) = ended {
                seq.finish(reason);
                finished.push(i);
            }
        }
        remove_all(running, finished);
    }

    /// Verify a sequence's draft against `rows`, the logits of its last
    /// token and of each drafted one. Position by position, the token is
    /// chosen exactly as plain decoding would choose it (every processor,
    /// the same sampler draw) and taken in; while it is the drafted token,
    /// the next row's logits are the ones plain decoding would compute next,
    /// so verification goes on. It stops at the first other token, an
    /// injection, a probe due, or the end; the KV positions of drafted tokens
    /// not kept are then cut back. `Some` when the sequence ended.
    fn verify(&self, seq: &mut Sequence, rows: &mut [f32], vocab: usize) -> candle_core::Result<Option<FinishReason>> {
        let draft = std::mem::take(&mut seq.draft);
        let base = seq.tokens.len() - draft.len();
        seq.tokens.truncate(base);
        let mut kept = 0;
        // Whether verification stopped at a token the model chose against the draft
        // (not at an injection, a probe, or the end), which says to draft less.
        let mut refuted = false;
        // A reflection word the model chose, to probe before.
        let mut held = None;
        for j in 0..=draft.len() {
            if let Some(forced) = seq.logits.reasoning.forced_now().filter(|f| !f.is_empty()) {
                if let Some(end) = self.push_tokens(seq, &forced, Some(ForcedKind::EndOfThinking)) {
                    self.count_draft(seq.draft_length(), draft.len(), kept, false);
                    return Ok(Some(end));
                }
                break;
            }
            let token = seq.choose_from(&mut rows[j * vocab..(j + 1) * vocab]);
            let room = self.probe_room(seq);
            if seq.control().probe_due_before(token, room) {
                // Probed before it is taken in, once the cache is cut back.
                held = Some(token);
                break;
            }
            let before = seq.tokens.len();
            // No probe is due before it (just asked): taken in at once.
            if let Some(end) = self.take_sampled(seq, token) {
                self.count_draft(seq.draft_length(), draft.len(), kept, false);
                return Ok(Some(end));
            }
            // Taken plainly (not replaced by an injection), and the drafted token.
            let plain = seq.tokens.len() == before + 1;
            let took_draft = j < draft.len() && plain && seq.tokens[before] == draft[j];
            if !took_draft {
                refuted = j < draft.len() && plain;
                break;
            }
            kept += 1;
            let room = self.probe_room(seq);
            if seq.control().probe_due(room) {
                break;
            }
        }
        self.count_draft(seq.draft_length(), draft.len(), kept, refuted);
        // The cache keeps the last token and the drafted ones kept, less one
        // if nothing else came after them: a step needs a token to feed (a
        // held token's probe text is fed instead).
        let keep = if held.is_some() { base + kept } else { (base + kept).min(seq.tokens.len() - 1) };
        if seq.cache.len() > keep {
            seq.cache.truncate(&seq.tokens[..keep])?;
        }
        match held {
            Some(token) => Ok(self.take_token(seq, token)),
            None => {
                self.maybe_probe(seq);
                Ok(None)
            }
        }
    }

    /// Count a verified draft; its length adapts only to what the model said
    /// of it (`refuted`: a drafted token the model did not choose), not to a
    /// stop the draft had no part in.
    fn count_draft(&self, length: &mut DraftLength, proposed: usize, kept: usize, refuted: bool) {
        if refuted || kept == proposed {
            length.update(proposed, kept, refuted);
        }
        let m = &self.metrics;
        m.speculative_proposed_tokens_total.inc_by(proposed as u64);
        m.speculative_accepted_tokens_total.inc_by(kept as u64);
        m.speculative_steps_total.inc();
    }

    /// Positions a probe may use now: the context left, or none once the
    /// completion has no room for the end of the thought after it (a probe
    /// that settled then would cut the reply inside that text).
    fn probe_room(&self, seq: &Sequence) -> usize {
        let left = seq.request.max_tokens.saturating_sub(seq.completion);
        if left <= self.shared.injections.end_of_thinking.len() {
            return 0;
        }
        self.shared.context_length.saturating_sub(seq.tokens.len())
    }

    /// After a kept token: append the probe text if a probe is due (fed at
    /// the next step, streamed never), noting where to roll back to.
    fn maybe_probe(&self, seq: &mut Sequence) {
        let room = self.probe_room(seq);
        if let Some(text) = seq.logits.reasoning.start_probe(room) {
            seq.probe_from = Some((seq.tokens.len(), seq.cache.len()));
            seq.tokens.extend(text);
        }
    }

    /// A running probe's next token: fed at the next step while the probe
    /// goes on; once it is over, the sequence is rolled back to before it,
    /// tokens and KV cache (whose positions from there are written again).
    /// A reflection probe's held token is then taken in, or, if the answer
    /// settled, the thought is closed in its place. `Some` when the
    /// sequence has ended.
    fn probe_token(&self, seq: &mut Sequence, token: u32, prob: f32) -> candle_core::Result<Option<FinishReason>> {
        let tokenizer = &self.shared.tokenizer;
        let step = seq.logits.reasoning.probe_token(token, prob, |ids| tokenizer.decode(ids));
        let ProbeStep::Done(outcome) = step else {
            seq.tokens.push(token);
            return Ok(None);
        };
        let answer = seq.control().last_probe_answer().and_then(|a| a.answer.clone());
        tracing::debug!(id = %seq.request.id, outcome = outcome.as_str(), answer = ?answer, "probe");
        let (tokens, cached) = seq.probe_from.take().expect("a running probe has a rollback point");
        seq.tokens.truncate(tokens);
        seq.cache.truncate(&seq.tokens[..cached])?;
        match seq.logits.reasoning.take_held() {
            None => Ok(None),
            Some(Held::Take(token)) => Ok(self.take_sampled(seq, token)),
            // Every token is in the cache: the end of the thought is fed
            // now, in the dropped word's place, not at the next choice.
            Some(Held::Dropped) => {
                seq.sampled_logprob = None;
                let forced = seq.logits.reasoning.forced_now().unwrap_or_default();
                if forced.is_empty() {
                    // No text to close it with (a misconfigured model): feed the last token again.
                    let keep = seq.tokens.len() - 1;
                    seq.cache.truncate(&seq.tokens[..keep])?;
                    return Ok(None);
                }
                Ok(self.push_tokens(seq, &forced, Some(ForcedKind::EndOfThinking)))
            }
        }
    }

    /// Judge a chosen token and take it in (or its replacement), unless a
    /// probe comes before it (a reflection word's): then it waits for the
    /// probe. `Some` when the sequence has ended.
    fn take_token(&self, seq: &mut Sequence, token: u32) -> Option<FinishReason> {
        let room = self.probe_room(seq);
        if let Some(text) = seq.logits.reasoning.start_probe_before(token, room) {
            seq.probe_from = Some((seq.tokens.len(), seq.cache.len()));
            seq.tokens.extend(text);
            return None;
        }
        self.take_sampled(seq, token)
    }

    /// Take in a chosen token (see [`Self::take_token`]) with no probe before it.
    fn take_sampled(&self, seq: &mut Sequence, token: u32) -> Option<FinishReason> {
        match seq.logits.reasoning.after_sample(token) {
            Decision::Replace(injected, kind) => {
                seq.sampled_logprob = None;
                self.push_tokens(seq, &injected, Some(kind))
            }
            Decision::Keep if self.shared.tokenizer.end_of_turn_ids().contains(&token) => {
                seq.completion += 1;
                seq.logits.accept(token, None);
                let phase = seq.control().last_token_phase();
                let rest = self.flush_text(seq);
                // The end of turn is not part of the text: no log-probability of its own.
                seq.sampled_logprob = None;
                if !rest.is_empty() {
                    let _ = seq.events.send(GenerationEvent::Token { id: token, text: rest, phase, forced: false, logprob: None });
                }
                Some(FinishReason::Stop)
            }
            Decision::Keep => self.push_tokens(seq, &[token], None),
        }
    }

    /// Add completion tokens to the sequence (fed through the model at its next
    /// step) and stream their text; `Some` when the sequence has ended.
    fn push_tokens(&self, seq: &mut Sequence, tokens: &[u32], forced: Option<ForcedKind>) -> Option<FinishReason> {
        let tokenizer = &self.shared.tokenizer;
        for &token in tokens {
            seq.tokens.push(token);
            seq.completion += 1;
            seq.logits.accept(token, forced);
            let phase = seq.control().last_token_phase();
            let delta = seq.decoder.push(tokenizer, token);
            let (mut text, stopped) = match seq.stop.push(&delta) {
                StopOutcome::Continue(t) => (t, false),
                StopOutcome::Stopped(t) => (t, true),
            };
            let out_of_room = seq.completion >= seq.request.max_tokens
                || seq.tokens.len() >= self.shared.context_length
                || seq.control().answer_allowance_spent();
            if out_of_room && !stopped {
                text += &self.flush_text(seq);
            }
            let logprob = match forced {
                None => seq.sampled_logprob.take(),
                Some(_) => seq.request.choice.logprobs.map(|_| TokenLogprob { logprob: 0.0, top: vec![] }),
            };
            let _ = seq.events.send(GenerationEvent::Token { id: token, text, phase, forced: forced.is_some(), logprob });
            if stopped {
                return Some(FinishReason::Stop);
            }
            if out_of_room {
                return Some(FinishReason::Length);
            }
        }
        None
    }

    /// Tokens the grammar forced: the answer's own (not injections), each
    /// with probability 1 under the mask.
    fn push_grammar_tokens(&self, seq: &mut Sequence, tokens: &[u32]) -> Option<FinishReason> {
        for &token in tokens {
            seq.sampled_logprob = seq.request.choice.logprobs.map(|_| TokenLogprob { logprob: 0.0, top: vec![(token, 0.0)] });
            if let Some(end) = self.push_tokens(seq, &[token], None) {
                return Some(end);
            }
        }
        None
    }

    /// Text still held back by the decoder and the stop matcher, at the end.
    fn flush_text(&self, seq: &mut Sequence) -> String {
        let tail = seq.decoder.flush(&self.shared.tokenizer);
        match seq.stop.push(&tail) {
            StopOutcome::Continue(t) => t + &seq.stop.flush(),
            StopOutcome::Stopped(t) => t,
        }
    }
}

/// Remove the items at `indices` (any order: verified drafts are delivered
/// after the other sequences), highest first, so that each `swap_remove`
/// only moves an item that stays.
fn remove_all<T>(items: &mut Vec<T>, mut indices: Vec<usize>) {
    indices.sort_unstable();
    indices.dedup();
    for &i in indices.iter().rev() {
        items.swap_remove(i);
    }
}

/// `token`'s probability in `row` (at temperature 1).
fn top_probability(row: &[f32], token: u32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = row.iter().map(|&l| (l - max).exp()).sum();
    row.get(token as usize).map_or(0.0, |&l| (l - max).exp() / total)
}

/// `token`'s log-probability in `row` (edited logits, at temperature 1),
/// and the `top` most likely tokens' (those the mask ruled out never among them).
fn logprob_of(row: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = max + row.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let logprob = row.get(token as usize).map_or(f32::NEG_INFINITY, |&l| l - log_total);
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &l) in row.iter().enumerate() {
            if l.is_finite() && (best.len() < top || l > best[best.len() - 1].1) {
                // Highest first; ties keep the lower id first.
                let at = best.partition_point(|&(_, b)| b >= l);
                best.insert(at, (id as u32, l));
                best.truncate(top);
            }
        }
    }
    TokenLogprob { logprob, top: best.into_iter().map(|(id, l)| (id, l - log_total)).collect() }
}

#[cfg(test)]
mod tests {
    use super::{logprob_of, plan_rows, remove_all};

    #[test]
    fn finished_sequences_leave_whatever_order_they_finished_in() {
        // Sequence 1 finished in the first pass, 0 when its draft was verified after it.
        let mut running = vec!['a', 'b'];
        remove_all(&mut running, vec![1, 0]);
        assert!(running.is_empty());
        let mut running = vec!['a', 'b', 'c', 'd', 'e'];
        remove_all(&mut running, vec![3, 0, 4, 0]);
        running.sort_unstable();
        assert_eq!(running, vec!['b', 'c']);
    }

    #[test]
    fn logprobs_are_of_a_normalised_distribution_and_skip_masked_tokens() {
        let row = [1.0f32, 3.0, f32::NEG_INFINITY, 2.0, 3.0];
        let lp = logprob_of(&row, 3, 4);
        let total: f32 = row.iter().map(|&l| (l - (2.0 - lp.logprob)).exp()).sum::<f32>();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4, 3, 0]);
        assert!((lp.top[2].1 - lp.logprob).abs() < 1e-6);
        assert!(logprob_of(&row, 1, 0).top.is_empty());
    }

    #[test]
    fn prompts_share_a_step_budget_and_shrink_while_others_decode() {
        // Alone, a long prompt goes in full chunks.
        assert_eq!(plan_rows([1400].into_iter(), 512, Some(128)), vec![(0, 512)]);
        // Beside a decoding sequence, in the smaller chunk.
        assert_eq!(plan_rows([1, 1400, 1].into_iter(), 512, Some(128)), vec![(0, 1), (1, 128), (2, 1)]);
        // Without the smaller size (the tensor path), chunk bounds are the sequence's own.
        assert_eq!(plan_rows([1, 1400].into_iter(), 512, None), vec![(0, 1), (1, 512)]);
        // With nothing decoding, short prompts share the budget; one that does not fit waits for a later step.
        assert_eq!(plan_rows([100, 300, 200, 50].into_iter(), 512, Some(128)), vec![(0, 100), (1, 300), (3, 50)]);
        // While others decode, each prompt gets up to the smaller chunk, and the step as much per prompt.
        assert_eq!(plan_rows([1, 90, 90, 1400].into_iter(), 512, Some(128)), vec![(0, 1), (1, 90), (2, 90), (3, 128)]);
        assert_eq!(plan_rows([1, 900, 900, 900, 900, 900].into_iter(), 512, Some(128)), vec![(0, 1), (1, 128), (2, 128), (3, 128), (4, 128)]);
        // The smaller chunk caps a short prompt too.
        assert_eq!(plan_rows([1, 90].into_iter(), 512, Some(64)), vec![(0, 1), (1, 64)]);
    }
}

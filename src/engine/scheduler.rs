//! The engine thread: continuous batching over one model.
//!
//! Each step: take in new submissions, drop cancelled sequences, admit waiting
//! ones while the batch and the KV-cache budget allow, run ONE forward pass over
//! every running sequence (prefill chunks and decode tokens together), then
//! sample, stream and retire. A sequence joins or leaves between any two steps.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use candle_core::Tensor;

use super::device_pick::{pick_greedy, GreedyRow};
use super::handle::{Shared, Submission};
use super::request::{FinishReason, GenerationEvent, GenerationRequest, ReasoningUsage, Usage};
use super::sampling::Sampler;
use super::stop::{StopMatcher, StopOutcome};
use crate::metrics::Metrics;
use crate::model::{SeqChunk, SeqKvCache, Transformer};
use crate::reasoning::control::{Decision, ForcedKind, ReasoningControl, ThinkStopReason};
use crate::reasoning::phase::PhaseTracker;
use crate::tokenize::PhasedDecoder;

struct Sequence {
    request: GenerationRequest,
    events: UnboundedSender<GenerationEvent>,
    /// Prompt followed by completion tokens (sampled and injected).
    tokens: Vec<u32>,
    /// Completion tokens so far, the end-of-turn token included.
    completion: usize,
    control: ReasoningControl,
    cache: SeqKvCache,
    sampler: Sampler,
    decoder: PhasedDecoder,
    stop: StopMatcher,
    reserved_bytes: u64,
}

impl Sequence {
    /// Tokens not yet fed through the model.
    fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }
}

/// What a sequence takes in after a step.
enum Next {
    /// Injected text (budget forcing's end of thinking).
    Forced(Vec<u32>),
    /// A token chosen from the logits.
    Sampled(u32),
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
}

/// A step's logits (one row per stepped sequence): in the host path's own
/// buffer, or a tensor on the model's device.
enum StepLogits<'a> {
    Host(&'a mut [f32]),
    Device(Tensor),
}

impl Scheduler {
    pub fn run(self) {
        let mut waiting: VecDeque<Submission> = VecDeque::new();
        let mut running: Vec<Sequence> = Vec::new();
        // The host path's logits, kept from step to step.
        let mut host_logits: Vec<f32> = Vec::new();
        let mut reserved: u64 = 0;
        let mut open = true;
        let phase_seconds = |name: &str| self.metrics.engine_step_seconds.with_label_values(&[name]);
        let (forward_seconds, pick_seconds, deliver_seconds) = (phase_seconds("forward"), phase_seconds("pick"), phase_seconds("deliver"));
        let took = |phase: &prometheus::Histogram, since: Instant| phase.observe(since.elapsed().as_secs_f64());
        loop {
            // 1. Take in submissions; sleep on the channel when there is nothing to do.
            if running.is_empty() && waiting.is_empty() {
                // Idle: the gauges were last set before the step that retired
                // the last sequences; they must not keep those while we sleep.
                self.metrics.queue_depth.set(0);
                self.metrics.running_sequences.set(0);
                self.metrics.kv_cache_used_bytes.set(reserved as i64);
                if !open {
                    break;
                }
                match self.submissions.recv() {
                    Ok(s) => waiting.push_back(s),
                    Err(_) => break,
                }
            }
            loop {
                match self.submissions.try_recv() {
                    Ok(s) => waiting.push_back(s),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }

            // 2. Forget requests whose client went away.
            waiting.retain(|s| {
                let gone = s.events.is_closed();
                if gone {
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                }
                !gone
            });
            running.retain(|seq| {
                let gone = seq.events.is_closed();
                if gone {
                    reserved -= seq.reserved_bytes;
                    self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                    tracing::debug!(id = %seq.request.id, "client gone; sequence cancelled");
                }
                !gone
            });

            // 3. Admit in arrival order while the batch and the KV budget allow.
            while running.len() < self.max_batch {
                let Some(front) = waiting.front() else { break };
                let r = &front.request;
                let need = (r.prompt.len() + r.max_tokens) as u64 * self.shared.kv_bytes_per_token;
                if reserved + need > self.shared.kv_budget_bytes {
                    break;
                }
                let s = waiting.pop_front().expect("front exists");
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                reserved += need;
                running.push(Sequence {
                    sampler: Sampler::new(s.request.sampling.clone(), &s.request.prompt),
                    stop: StopMatcher::new(s.request.stop.clone()),
                    tokens: s.request.prompt.clone(),
                    completion: 0,
                    control: ReasoningControl::new(
                        s.request.reasoning.clone(),
                        self.shared.injections.clone(),
                        PhaseTracker::new(self.shared.think, &s.request.prompt),
                        self.shared.tokenizer.end_of_turn_ids().to_vec(),
                    ),
                    cache: self.model.new_cache(),
                    decoder: PhasedDecoder::new(self.shared.think),
                    reserved_bytes: need,
                    request: s.request,
                    events: s.events,
                });
            }
            self.metrics.queue_depth.set(waiting.len() as i64);
            self.metrics.running_sequences.set(running.len() as i64);
            self.metrics.kv_cache_used_bytes.set(reserved as i64);
            if running.is_empty() {
                continue;
            }

            // 4. One forward pass. Decoding sequences feed their last token; prefilling
            // ones feed a chunk whose bounds depend only on the sequence itself, and at
            // most `prefill_chunk` prompt tokens enter a step (at least one chunk does).
            let mut prefill_budget = self.prefill_chunk;
            let mut stepping: Vec<usize> = Vec::new();
            let mut lens: Vec<usize> = Vec::new();
            for (i, seq) in running.iter().enumerate() {
                let pending = seq.pending();
                if pending == 1 {
                    stepping.push(i);
                    lens.push(1);
                } else {
                    let chunk = pending.min(self.prefill_chunk);
                    if chunk <= prefill_budget || prefill_budget == self.prefill_chunk {
                        prefill_budget = prefill_budget.saturating_sub(chunk);
                        stepping.push(i);
                        lens.push(chunk);
                    }
                }
            }
            self.metrics.batch_size.observe(stepping.len() as f64);
            let forward_started = Instant::now();
            let logits = {
                let mut chunks: Vec<SeqChunk<'_>> = Vec::with_capacity(stepping.len());
                let mut rest: &mut [Sequence] = &mut running;
                let mut base = 0;
                for (&i, &len) in stepping.iter().zip(&lens) {
                    let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - base);
                    let (seq, after) = tail.split_first_mut().expect("index in range");
                    let start = seq.cache.len();
                    chunks.push(SeqChunk { tokens: &seq.tokens[start..start + len], cache: &mut seq.cache });
                    rest = after;
                    base = i + 1;
                }
                if self.model.runs_on_host() {
                    self.model.forward_into(&mut chunks, &mut host_logits).map(|()| StepLogits::Host(&mut host_logits))
                } else {
                    self.model.forward(&mut chunks).map(StepLogits::Device)
                }
            };
            took(&forward_seconds, forward_started);
            let pick_started = Instant::now();
            let choices = match logits.and_then(|logits| self.choose(&mut running, &stepping, logits)) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("forward pass failed: {e}");
                    for seq in running.drain(..) {
                        let _ = seq.events.send(GenerationEvent::Failed { message: format!("model error: {e}") });
                        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                    reserved = 0;
                    continue;
                }
            };

            took(&pick_seconds, pick_started);

            // 5. Take in the next token(s) of every sequence whose prompt is fully fed; stream; retire.
            let deliver_started = Instant::now();
            let mut finished: Vec<usize> = Vec::new();
            for (i, next) in choices {
                let seq = &mut running[i];
                let ended = match next {
                    Next::Forced(tokens) => self.push_tokens(seq, &tokens, Some(ForcedKind::EndOfThinking)),
                    Next::Sampled(token) => self.take_token(seq, token),
                };
                if let Some(reason) = ended {
                    let ended_by = match reason {
                        FinishReason::Stop => ThinkStopReason::Natural,
                        FinishReason::Length => ThinkStopReason::Length,
                        FinishReason::Cancelled => ThinkStopReason::Cancelled,
                    };
                    let usage = Usage { prompt_tokens: seq.request.prompt.len(), completion_tokens: seq.completion };
                    let reasoning = ReasoningUsage {
                        thinking_tokens: seq.control.thinking_tokens(),
                        answer_tokens: seq.control.answer_tokens(),
                        forced_tokens: seq.control.forced_tokens(),
                        forced_end_of_thinking: seq.control.forced_tokens_of(ForcedKind::EndOfThinking),
                        forced_continuation: seq.control.forced_tokens_of(ForcedKind::Continuation),
                        think_stop_reason: seq.control.stop_reason(ended_by),
                    };
                    let _ = seq.events.send(GenerationEvent::Finished { reason, usage, reasoning });
                    finished.push(i);
                }
            }
            for &i in finished.iter().rev() {
                let seq = running.swap_remove(i);
                reserved -= seq.reserved_bytes;
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            took(&deliver_seconds, deliver_started);
        }
        tracing::info!("engine thread stopped");
    }

    /// What each stepped sequence whose prompt is fully fed takes in next:
    /// forced tokens, or a token chosen from its row of `logits`. The host
    /// path's rows are edited (TS) and sampled in place. Of a device's,
    /// greedy rows are chosen there when `pick_on_device`; only the other
    /// rows are copied to the host, edited and sampled.
    fn choose(&self, running: &mut [Sequence], stepping: &[usize], logits: StepLogits<'_>) -> candle_core::Result<Vec<(usize, Next)>> {
        let mut choices = Vec::with_capacity(stepping.len());
        let mut host_rows: Vec<(usize, usize)> = Vec::new(); // (row, index in choices)
        let mut device_rows: Vec<(usize, usize)> = Vec::new();
        for (row, &i) in stepping.iter().enumerate() {
            let seq = &mut running[i];
            if seq.pending() > 0 {
                continue; // still prefilling
            }
            // An empty injection text (a misconfigured model) would leave nothing to feed.
            if let Some(forced) = seq.control.forced_now().filter(|f| !f.is_empty()) {
                choices.push((i, Next::Forced(forced)));
                continue;
            }
            let slot = (row, choices.len());
            if self.pick_on_device && seq.sampler.is_plain_greedy() && matches!(logits, StepLogits::Device(_)) {
                device_rows.push(slot);
            } else {
                host_rows.push(slot);
            }
            choices.push((i, Next::Sampled(0)));
        }
        if !device_rows.is_empty() {
            let rows: Vec<GreedyRow<'_>> = device_rows
                .iter()
                .map(|&(row, slot)| GreedyRow { row, ts: running[choices[slot].0].control.stop_edit() })
                .collect();
            let StepLogits::Device(on_device) = &logits else { unreachable!("device rows are taken only from a device's logits") };
            let picks = pick_greedy(on_device, &rows)?;
            drop(rows);
            for (&(_, slot), pick) in device_rows.iter().zip(picks) {
                running[choices[slot].0].control.note_top_before_edit(pick.top_was_stop);
                choices[slot].1 = Next::Sampled(pick.token);
            }
        }
        let mut sample = |slot: usize, row: &mut [f32]| {
            let seq = &mut running[choices[slot].0];
            seq.control.edit_logits(row);
            choices[slot].1 = Next::Sampled(seq.sampler.sample(row));
        };
        match logits {
            // The host's logits are edited and sampled where the model wrote them.
            StepLogits::Host(values) => {
                let vocab = values.len() / stepping.len();
                for &(row, slot) in &host_rows {
                    sample(slot, &mut values[row * vocab..(row + 1) * vocab]);
                }
            }
            // Copy only the rows the host needs.
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

    /// Judge a chosen token and take it in (or its replacement). `Some` when
    /// the sequence has ended.
    fn take_token(&self, seq: &mut Sequence, token: u32) -> Option<FinishReason> {
        match seq.control.after_sample(token) {
            Decision::Replace(continuation) => self.push_tokens(seq, &continuation, Some(ForcedKind::Continuation)),
            Decision::Keep if self.shared.tokenizer.end_of_turn_ids().contains(&token) => {
                seq.completion += 1;
                let phase = seq.control.observe(token, None);
                let rest = self.flush_text(seq);
                if !rest.is_empty() {
                    let _ = seq.events.send(GenerationEvent::Token { id: token, text: rest, phase, forced: false });
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
            seq.sampler.observe(token);
            let phase = seq.control.observe(token, forced);
            let delta = seq.decoder.push(tokenizer, token);
            let (mut text, stopped) = match seq.stop.push(&delta) {
                StopOutcome::Continue(t) => (t, false),
                StopOutcome::Stopped(t) => (t, true),
            };
            let out_of_room = seq.completion >= seq.request.max_tokens
                || seq.tokens.len() >= self.shared.context_length
                || seq.control.answer_allowance_spent();
            if out_of_room && !stopped {
                text += &self.flush_text(seq);
            }
            let _ = seq.events.send(GenerationEvent::Token { id: token, text, phase, forced: forced.is_some() });
            if stopped {
                return Some(FinishReason::Stop);
            }
            if out_of_room {
                return Some(FinishReason::Length);
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

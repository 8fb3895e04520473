//! The one place where terse's Prometheus series are defined.
//!
//! Every series carries HELP text and follows Prometheus naming rules
//! (`_total` for counters, `_seconds` / `_bytes` for units). A `Metrics` value
//! owns its own registry, so tests can run several servers in one process.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Finished HTTP generation requests, by model, endpoint, mode and status code.
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub time_to_first_token_seconds: HistogramVec,
    pub time_per_output_token_seconds: HistogramVec,
    pub prompt_tokens_total: IntCounterVec,
    pub completion_tokens_total: IntCounterVec,
    /// Thinking tokens (reasoning) and answer tokens, by model and mode.
    pub reasoning_tokens_total: IntCounterVec,
    pub answer_tokens_total: IntCounterVec,
    pub reasoning_tokens_per_request: HistogramVec,
    pub answer_tokens_per_request: HistogramVec,
    /// Why the thinking phase ended, by model, mode and reason.
    pub think_stops_total: IntCounterVec,
    /// Tokens injected by budget forcing or min-thinking.
    pub forced_tokens_total: IntCounterVec,
    /// Requests admitted to the engine but not yet running.
    pub queue_depth: IntGauge,
    /// Sequences in the running batch.
    pub running_sequences: IntGauge,
    /// Sequences per forward step.
    pub batch_size: Histogram,
    /// Where an engine step's time goes, by phase: `forward` (the model's
    /// pass; on a GPU, planning and launching it, since the device runs on
    /// behind), `pick` (choosing each sequence's next token; on a GPU this
    /// waits for the device, unless no row is sampled in the step, when the
    /// wait falls in the next step) and `deliver` (taking tokens in,
    /// streaming, retiring).
    pub engine_step_seconds: HistogramVec,
    pub kv_cache_used_bytes: IntGauge,
    pub kv_cache_budget_bytes: IntGauge,
    /// Prompt tokens looked up in the prefix cache, and those found there.
    pub prefix_cache_queried_tokens_total: IntCounter,
    pub prefix_cache_hit_tokens_total: IntCounter,
    /// Pages (and their bytes) the prefix cache holds, shared or idle.
    pub prefix_cache_pages: IntGauge,
    pub prefix_cache_bytes: IntGauge,
    /// Idle cached pages taken back to make room.
    pub prefix_cache_evictions_total: IntCounter,
    /// Bytes the KV pool has allocated, in use or not.
    pub kv_cache_pool_bytes: IntGauge,
    pub draft_kv_cache_pool_bytes: IntGauge,
    /// Bytes of the KV pages running sequences hold.
    pub kv_cache_held_bytes: IntGauge,
    /// Requests whose answer a grammar held, by model and kind
    /// (`json_object | json_schema | tools`).
    pub constrained_requests_total: IntCounterVec,
    /// Time to compute one grammar mask (one constrained token).
    pub grammar_mask_seconds: Histogram,
    /// Tool calls returned to clients, by model.
    pub tool_calls_total: IntCounterVec,
    /// Answer tokens a grammar forced and the engine fed several at a time
    /// (jump-forward), instead of decoding each.
    pub grammar_jump_tokens_total: IntCounter,
    /// Tokens answer probes fed through the model, never returned.
    pub probe_tokens_total: IntCounterVec,
    /// Answer probes, by outcome.
    pub probes_total: IntCounterVec,
    /// Speculative decoding: drafted tokens fed, those kept, and the steps that verified them.
    pub speculative_proposed_tokens_total: IntCounter,
    pub speculative_accepted_tokens_total: IntCounter,
    pub speculative_steps_total: IntCounter,
    /// Constant 1, labelled with what the model is.
    pub model_info: IntGaugeVec,
    pub model_weight_bytes: IntGauge,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const PER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("terse".to_string()), None)
            .expect("static registry prefix is valid");
        let by_request = &["model", "endpoint", "mode"];
        let requests_total = IntCounterVec::new(
            Opts::new("requests_total", "Generation requests finished, by model, endpoint, reasoning mode and HTTP status"),
            &["model", "endpoint", "mode", "status"],
        )
        .unwrap();
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Time from receiving a generation request to its last byte")
                .buckets(LATENCY_BUCKETS.to_vec()),
            by_request,
        )
        .unwrap();
        let time_to_first_token_seconds = HistogramVec::new(
            HistogramOpts::new("time_to_first_token_seconds", "Time from receiving a generation request to its first generated token")
                .buckets(LATENCY_BUCKETS.to_vec()),
            by_request,
        )
        .unwrap();
        let time_per_output_token_seconds = HistogramVec::new(
            HistogramOpts::new("time_per_output_token_seconds", "Mean time between generated tokens after the first, per request")
                .buckets(PER_TOKEN_BUCKETS.to_vec()),
            by_request,
        )
        .unwrap();
        let prompt_tokens_total = IntCounterVec::new(
            Opts::new("prompt_tokens_total", "Prompt tokens processed"),
            by_request,
        )
        .unwrap();
        let completion_tokens_total = IntCounterVec::new(
            Opts::new("completion_tokens_total", "Completion tokens generated (thinking and answer)"),
            by_request,
        )
        .unwrap();
        let by_mode = &["model", "mode"];
        let token_buckets: Vec<f64> = [0.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0].to_vec();
        let reasoning_tokens_total = IntCounterVec::new(
            Opts::new("reasoning_tokens_total", "Completion tokens spent thinking (inside the think block), forced ones included"),
            by_mode,
        )
        .unwrap();
        let answer_tokens_total = IntCounterVec::new(
            Opts::new("answer_tokens_total", "Completion tokens of the answer (after thinking), forced ones included"),
            by_mode,
        )
        .unwrap();
        let reasoning_tokens_per_request = HistogramVec::new(
            HistogramOpts::new("reasoning_tokens_per_request", "Thinking tokens of each finished request")
                .buckets(token_buckets.clone()),
            by_mode,
        )
        .unwrap();
        let answer_tokens_per_request = HistogramVec::new(
            HistogramOpts::new("answer_tokens_per_request", "Answer tokens of each finished request").buckets(token_buckets),
            by_mode,
        )
        .unwrap();
        let think_stops_total = IntCounterVec::new(
            Opts::new(
                "think_stops_total",
                "Thinking phases ended, by reason: natural, stop_temperature, budget, length, cancelled",
            ),
            &["model", "mode", "reason"],
        )
        .unwrap();
        let forced_tokens_total = IntCounterVec::new(
            Opts::new(
                "forced_tokens_total",
                "Tokens injected into completions, by kind: end_of_thinking (the budget's closing or wrap-up text), continuation (min-thinking's `Wait`)",
            ),
            &["model", "mode", "kind"],
        )
        .unwrap();
        let queue_depth = IntGauge::new("queue_depth", "Requests waiting to join the running batch").unwrap();
        let running_sequences = IntGauge::new("running_sequences", "Sequences in the running batch").unwrap();
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("batch_size", "Sequences in each forward step")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
        )
        .unwrap();
        let engine_step_seconds = HistogramVec::new(
            HistogramOpts::new("engine_step_seconds", "Time of each phase of an engine step: forward, pick, deliver (and draft, when speculating)")
                .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets")),
            &["phase"],
        )
        .unwrap();
        let kv_cache_used_bytes = IntGauge::new("kv_cache_used_bytes", "KV-cache bytes reserved by running sequences").unwrap();
        let kv_cache_budget_bytes = IntGauge::new("kv_cache_budget_bytes", "KV-cache bytes the engine may reserve in all").unwrap();
        let prefix_cache_queried_tokens_total =
            IntCounter::new("prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache").unwrap();
        let prefix_cache_hit_tokens_total =
            IntCounter::new("prefix_cache_hit_tokens_total", "Prompt tokens found in the prefix cache, not computed again").unwrap();
        let prefix_cache_pages = IntGauge::new("prefix_cache_pages", "KV pages kept under a prompt prefix, shared or idle").unwrap();
        let prefix_cache_bytes = IntGauge::new("prefix_cache_bytes", "Bytes of the KV pages kept under a prompt prefix").unwrap();
        let prefix_cache_evictions_total =
            IntCounter::new("prefix_cache_evictions_total", "Idle cached KV pages taken back to make room").unwrap();
        let kv_cache_pool_bytes = IntGauge::new("kv_cache_pool_bytes", "Bytes the KV page pool has allocated, in use or not").unwrap();
        let draft_kv_cache_pool_bytes =
            IntGauge::new("draft_kv_cache_pool_bytes", "Bytes the draft model's KV page pool has allocated (speculation with a draft model; 0 without one)").unwrap();
        let kv_cache_held_bytes = IntGauge::new("kv_cache_held_bytes", "Bytes of the KV pages running sequences hold").unwrap();
        let constrained_requests_total = IntCounterVec::new(
            Opts::new("constrained_requests_total", "Generation requests whose answer a grammar held, by kind: json_object, json_schema, tools"),
            &["model", "kind"],
        )
        .unwrap();
        let grammar_mask_seconds = Histogram::with_opts(
            HistogramOpts::new("grammar_mask_seconds", "Time to compute the grammar's allowed tokens for one constrained token")
                .buckets(prometheus::exponential_buckets(0.00001, 2.0, 16).expect("valid buckets")),
        )
        .unwrap();
        let tool_calls_total = IntCounterVec::new(Opts::new("tool_calls_total", "Tool calls returned in replies"), &["model"]).unwrap();
        let grammar_jump_tokens_total = IntCounter::new(
            "grammar_jump_tokens_total",
            "Answer tokens a grammar forced, fed several in one step instead of decoded one by one",
        )
        .unwrap();
        let probe_tokens_total = IntCounterVec::new(
            Opts::new("probe_tokens_total", "Tokens answer probes fed through the model (probe text and trial answer), rolled back, never returned"),
            by_mode,
        )
        .unwrap();
        let probes_total = IntCounterVec::new(
            Opts::new("probes_total", "Answer probes, by outcome: settled (thinking stopped), unsettled, no_answer"),
            &["model", "mode", "outcome"],
        )
        .unwrap();
        let speculative_proposed_tokens_total =
            IntCounter::new("speculative_proposed_tokens_total", "Drafted tokens fed for verification (speculative decoding)").unwrap();
        let speculative_accepted_tokens_total =
            IntCounter::new("speculative_accepted_tokens_total", "Drafted tokens the model's own choice agreed with, kept").unwrap();
        let speculative_steps_total = IntCounter::new(
            "speculative_steps_total",
            "Sequence steps that verified a draft; (accepted + steps) / steps is about the tokens each such step gave (a step cut short by an injection or a probe gives one fewer)",
        )
        .unwrap();
        let model_info = IntGaugeVec::new(
            Opts::new("model_info", "The served model (value is always 1)"),
            &["model", "arch", "format", "dtype", "sparse_fraction", "device"],
        )
        .unwrap();
        let model_weight_bytes = IntGauge::new("model_weight_bytes", "Bytes taken by the model's weights").unwrap();

        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(requests_total.clone()),
            Box::new(request_duration_seconds.clone()),
            Box::new(time_to_first_token_seconds.clone()),
            Box::new(time_per_output_token_seconds.clone()),
            Box::new(prompt_tokens_total.clone()),
            Box::new(completion_tokens_total.clone()),
            Box::new(reasoning_tokens_total.clone()),
            Box::new(answer_tokens_total.clone()),
            Box::new(reasoning_tokens_per_request.clone()),
            Box::new(answer_tokens_per_request.clone()),
            Box::new(think_stops_total.clone()),
            Box::new(forced_tokens_total.clone()),
            Box::new(queue_depth.clone()),
            Box::new(running_sequences.clone()),
            Box::new(batch_size.clone()),
            Box::new(engine_step_seconds.clone()),
            Box::new(kv_cache_used_bytes.clone()),
            Box::new(kv_cache_budget_bytes.clone()),
            Box::new(prefix_cache_queried_tokens_total.clone()),
            Box::new(prefix_cache_hit_tokens_total.clone()),
            Box::new(prefix_cache_pages.clone()),
            Box::new(prefix_cache_bytes.clone()),
            Box::new(prefix_cache_evictions_total.clone()),
            Box::new(kv_cache_pool_bytes.clone()),
            Box::new(draft_kv_cache_pool_bytes.clone()),
            Box::new(kv_cache_held_bytes.clone()),
            Box::new(constrained_requests_total.clone()),
            Box::new(grammar_mask_seconds.clone()),
            Box::new(tool_calls_total.clone()),
            Box::new(grammar_jump_tokens_total.clone()),
            Box::new(probe_tokens_total.clone()),
            Box::new(probes_total.clone()),
            Box::new(speculative_proposed_tokens_total.clone()),
            Box::new(speculative_accepted_tokens_total.clone()),
            Box::new(speculative_steps_total.clone()),
            Box::new(model_info.clone()),
            Box::new(model_weight_bytes.clone()),
        ];
        for c in collectors {
            registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("process collector registers once");

        Metrics {
            registry,
            requests_total,
            request_duration_seconds,
            time_to_first_token_seconds,
            time_per_output_token_seconds,
            prompt_tokens_total,
            completion_tokens_total,
            reasoning_tokens_total,
            answer_tokens_total,
            reasoning_tokens_per_request,
            answer_tokens_per_request,
            think_stops_total,
            forced_tokens_total,
            queue_depth,
            running_sequences,
            batch_size,
            engine_step_seconds,
            kv_cache_used_bytes,
            kv_cache_budget_bytes,
            prefix_cache_queried_tokens_total,
            prefix_cache_hit_tokens_total,
            prefix_cache_pages,
            prefix_cache_bytes,
            prefix_cache_evictions_total,
            kv_cache_pool_bytes,
            draft_kv_cache_pool_bytes,
            kv_cache_held_bytes,
            constrained_requests_total,
            grammar_mask_seconds,
            tool_calls_total,
            grammar_jump_tokens_total,
            probe_tokens_total,
            probes_total,
            speculative_proposed_tokens_total,
            speculative_accepted_tokens_total,
            speculative_steps_total,
            model_info,
            model_weight_bytes,
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

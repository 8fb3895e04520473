//! Reasoning control on a model: a tiny qwen2 checkpoint with random weights
//! and the real DeepSeek-R1-Distill vocabulary and template, written by the
//! test. Random weights spread the next-token distribution over ~150k tokens,
//! so the model practically never closes its thought by itself: every stop
//! seen here is the control's doing.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use terse::engine::{
    probe_word_ids, start_engine, ChoiceOptions, EngineConfig, EngineHandle, FinishReason, GenerationEvent, GenerationRequest, GenerationStream,
    ReasoningUsage, SamplingParams, TokenLogprob,
};
use terse::server::structured::AnswerFormat;
use terse::metrics::Metrics;
use candle_core::quantized::GgmlDType;
use terse::model::{write_random_gguf, SyntheticSpec};
use terse::reasoning::control::{ReasoningSettings, Strategy, ThinkStopReason};
use terse::reasoning::phase::{Phase, PhaseTracker};
use terse::reasoning::probing::{ProbeAt, ProbeSettings};
use terse::tokenize::ChatMessage;

fn r1_header() -> PathBuf {
    let path = terse::manifest::models_dir()
        .join("cache/r1-distill-tokenizer/DeepSeek-R1-Distill-Qwen-7B.header.gguf");
    assert!(path.is_file(), "{} is missing: run ./models/fetch r1-distill-tokenizer", path.display());
    path
}

/// One engine for the whole file (the engine thread outlives each test's runtime).
fn engine() -> &'static EngineHandle {
    static ENGINE: OnceLock<EngineHandle> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("terse-mechanism-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("tiny-r1-vocab.gguf");
        // 152064 rows: the R1-Distill vocabulary with Qwen's padding.
        // Q8_0, so that the matrices run on terse's own batch-invariant kernels.
        let spec = SyntheticSpec { dtype: GgmlDType::Q8_0, ..SyntheticSpec::tiny_qwen2(152_064) };
        write_random_gguf(&model, &spec, &r1_header()).unwrap();
        let manifest = terse::manifest::load_manifest("deepseek-r1-distill-qwen-1.5b").unwrap();
        let config = EngineConfig { reasoning: manifest.reasoning_profile().unwrap(), ..Default::default() };
        let engine = start_engine(&model, "tiny-r1", config, Arc::new(Metrics::new())).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        engine
    })
}

/// The chat prompt, with the thought opened as the manifest says.
fn prompt(engine: &EngineHandle) -> Vec<u32> {
    let t = engine.tokenizer();
    let chat = [ChatMessage::new("user", "What is 7 times 6?")];
    let text = engine.reasoning_profile().open_thought(t.apply_chat_template(&chat, true).unwrap());
    t.encode(&text).unwrap()
}

struct Token {
    id: u32,
    phase: Phase,
    forced: bool,
    text: String,
    logprob: Option<TokenLogprob>,
}

async fn run(reasoning: ReasoningSettings, max_tokens: usize) -> (Vec<Token>, ReasoningUsage) {
    let (tokens, usage, _) = run_with(reasoning, max_tokens, ChoiceOptions::default()).await;
    (tokens, usage)
}

async fn run_with(reasoning: ReasoningSettings, max_tokens: usize, choice: ChoiceOptions) -> (Vec<Token>, ReasoningUsage, FinishReason) {
    collect(submit(reasoning, max_tokens, choice)).await
}

fn submit(reasoning: ReasoningSettings, max_tokens: usize, choice: ChoiceOptions) -> GenerationStream {
    let engine = engine();
    let prompt = prompt(engine);
    assert_eq!(PhaseTracker::new(engine.think_tokens(), &prompt).phase(), Phase::Thinking);
    let request = GenerationRequest {
        id: "mechanism".into(),
        prompt,
        max_tokens,
        sampling: SamplingParams { temperature: 1.0, seed: Some(7), ..Default::default() },
        stop: vec![],
        received_at: std::time::Instant::now(),
        reasoning,
        choice,
    };
    engine.submit(request).unwrap()
}

async fn collect(mut events: GenerationStream) -> (Vec<Token>, ReasoningUsage, FinishReason) {
    let mut tokens = Vec::new();
    loop {
        match events.next().await.expect("the stream ends with Finished") {
            GenerationEvent::Token { id, phase, forced, text, logprob } => tokens.push(Token { id, phase, forced, text, logprob }),
            GenerationEvent::Finished { reasoning, reason, .. } => return (tokens, reasoning, reason),
            GenerationEvent::Failed { message } => panic!("generation failed: {message}"),
        }
    }
}

fn close_token() -> u32 {
    engine().think_tokens().expect("R1 vocabulary has think tokens").close
}

#[tokio::test]
async fn without_control_the_random_model_keeps_thinking() {
    let (tokens, usage) = run(ReasoningSettings::default(), 24).await;
    assert_eq!(tokens.len(), 24);
    assert!(tokens.iter().all(|t| t.phase == Phase::Thinking && !t.forced));
    assert_eq!(usage.think_stop_reason, Some(ThinkStopReason::Length));
}

#[tokio::test]
async fn a_huge_stop_temperature_ends_thinking_on_the_first_step() {
    let settings = ReasoningSettings { strategy: Strategy::Ts, stop_temperature: 1e6, ..Default::default() };
    let (tokens, usage) = run(settings, 12).await;
    assert_eq!(tokens[0].id, close_token(), "the first sampled token closes the thought");
    assert!(!tokens[0].forced, "sampled, not injected");
    assert!(tokens[1..].iter().all(|t| t.phase == Phase::Answer), "TS leaves the answer alone");
    assert_eq!((usage.thinking_tokens, usage.answer_tokens, usage.forced_tokens), (1, 11, 0));
    assert_eq!(usage.think_stop_reason, Some(ThinkStopReason::StopTemperature));
}

#[tokio::test]
async fn a_budget_of_n_gives_n_thinking_tokens_then_the_delimiter_then_the_answer() {
    const N: usize = 5;
    let settings = ReasoningSettings { strategy: Strategy::Budget, max_thinking_tokens: Some(N), ..Default::default() };
    let (tokens, usage) = run(settings, 20).await;
    let delimiter = engine().end_of_thinking_tokens().to_vec();
    assert!(delimiter.contains(&close_token()), "the injected text closes the thought: {delimiter:?}");

    let (sampled, rest) = tokens.split_at(N);
    assert!(sampled.iter().all(|t| t.phase == Phase::Thinking && !t.forced && t.id != close_token()));
    let (injected, answer) = rest.split_at(delimiter.len());
    assert_eq!(injected.iter().map(|t| t.id).collect::<Vec<_>>(), delimiter);
    assert!(injected.iter().all(|t| t.forced));
    assert!(!answer.is_empty() && answer.iter().all(|t| t.phase == Phase::Answer && !t.forced));

    let close_at = delimiter.iter().position(|&id| id == close_token()).unwrap();
    assert_eq!(usage.thinking_tokens, N + close_at + 1, "the delimiter up to `</think>` belongs to the thought");
    assert_eq!(usage.forced_tokens, delimiter.len());
    assert_eq!(usage.forced_end_of_thinking, delimiter.len());
    assert_eq!(usage.think_stop_reason, Some(ThinkStopReason::Budget));
}

#[tokio::test]
async fn min_thinking_tokens_hold_off_every_stop_before_the_minimum() {
    const MIN: usize = 6;
    // τ huge: the model wants to stop at every step; each early stop becomes "Wait".
    let settings = ReasoningSettings {
        strategy: Strategy::Ts,
        stop_temperature: 1e6,
        min_thinking_tokens: Some(MIN),
        ..Default::default()
    };
    let (tokens, usage) = run(settings, 24).await;
    let close_at = tokens.iter().position(|t| t.id == close_token()).expect("the thought ends once allowed");
    assert!(close_at >= MIN, "no stop before {MIN} thinking tokens (closed after {close_at})");
    assert!(tokens[..close_at].iter().all(|t| t.phase == Phase::Thinking && t.forced), "only continuations before it");
    assert!(!tokens[close_at].forced);
    assert_eq!(usage.forced_continuation, close_at);
    assert_eq!(usage.thinking_tokens, close_at + 1);
    assert_eq!(usage.think_stop_reason, Some(ThinkStopReason::StopTemperature));
}

#[tokio::test]
async fn a_cancelled_sequence_is_answered_with_what_it_used() {
    let engine = engine();
    let request = GenerationRequest {
        id: "cancelled".into(),
        prompt: prompt(engine),
        max_tokens: 4_000,
        sampling: SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() },
        stop: vec![],
        received_at: std::time::Instant::now(),
        reasoning: ReasoningSettings::default(),
        choice: Default::default(),
    };
    let mut events = engine.submit(request).unwrap();
    let mut seen = 0;
    while seen < 5 {
        match events.read().await.unwrap() {
            GenerationEvent::Token { .. } => seen += 1,
            other => panic!("the sequence ended early: {other:?}"),
        }
    }
    events.cancel();
    // Tokens already on their way come first; then the engine's last word.
    loop {
        match events.read().await.unwrap() {
            GenerationEvent::Token { .. } => seen += 1,
            GenerationEvent::Finished { reason, usage, reasoning } => {
                assert_eq!(reason, terse::engine::FinishReason::Cancelled);
                assert_eq!(usage.completion_tokens, seen, "every token it streamed, and no more");
                assert_eq!(reasoning.thinking_tokens, seen, "the random model never stops thinking");
                assert_eq!(reasoning.think_stop_reason, Some(ThinkStopReason::Cancelled));
                break;
            }
            GenerationEvent::Failed { message } => panic!("{message}"),
        }
    }
    assert!(events.next().await.is_none(), "nothing after Finished");
    assert!(seen < 4_000, "cancelled before the end");
}

/// A JSON answer the grammar can finish in a few tokens.
fn short_json_answer() -> ChoiceOptions {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 4}},
        "required": ["answer"],
        "additionalProperties": false,
    });
    let constraint = AnswerFormat::JsonSchema { schema }.compile(engine()).expect("the schema compiles");
    ChoiceOptions { constraint: Some(constraint), ..Default::default() }
}

/// The answer's text, which must be the schema's JSON.
fn answer_json(tokens: &[Token]) -> serde_json::Value {
    let text: String = tokens.iter().filter(|t| t.phase == Phase::Answer).map(|t| t.text.as_str()).collect();
    let value: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("the answer {text:?} is not JSON: {e}"));
    let answer = value.get("answer").and_then(|a| a.as_str()).unwrap_or_else(|| panic!("{value}"));
    assert!(answer.chars().count() <= 4 && value.as_object().unwrap().len() == 1, "{value}");
    value
}

#[tokio::test]
async fn a_grammar_holds_the_answer_and_leaves_the_thinking_alone() {
    // Budget forcing: the same thinking as without the grammar, then JSON.
    const N: usize = 5;
    let budget = ReasoningSettings { strategy: Strategy::Budget, max_thinking_tokens: Some(N), ..Default::default() };
    let (free, free_usage) = run(budget.clone(), 20).await;
    let (held, usage, reason) = run_with(budget, 200, short_json_answer()).await;
    let thought = |tokens: &[Token]| tokens.iter().filter(|t| t.phase == Phase::Thinking).map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(thought(&held), thought(&free), "the same seed thinks the same with or without the grammar");
    assert_eq!((usage.thinking_tokens, usage.forced_tokens), (free_usage.thinking_tokens, free_usage.forced_tokens));
    assert_eq!(usage.think_stop_reason, Some(ThinkStopReason::Budget));
    assert_eq!(reason, FinishReason::Stop, "the end of turn comes once the grammar is complete");
    answer_json(&held);
    assert!(held.iter().filter(|t| t.phase == Phase::Thinking).all(|t| !t.text.contains('{')), "no JSON in the thinking");

    // TS ends the thought at once; min-thinking holds it open first; the answer is JSON either way.
    let ts = ReasoningSettings { strategy: Strategy::Ts, stop_temperature: 1e6, ..Default::default() };
    let (held, usage, reason) = run_with(ts.clone(), 200, short_json_answer()).await;
    assert_eq!((held[0].id, usage.thinking_tokens), (close_token(), 1));
    assert_eq!((usage.think_stop_reason, reason), (Some(ThinkStopReason::StopTemperature), FinishReason::Stop));
    answer_json(&held);
    let min = ReasoningSettings { min_thinking_tokens: Some(4), ..ts };
    let (held, usage, reason) = run_with(min, 200, short_json_answer()).await;
    assert!(usage.forced_continuation >= 4 && reason == FinishReason::Stop, "{usage:?} {reason:?}");
    answer_json(&held);
}

/// Probes every `interval` thinking tokens that never settle (the random
/// model's answers do not agree sixteen times in a row).
fn unsettled_probes(interval: usize) -> ReasoningSettings {
    let probe = ProbeSettings { interval, tokens: 4, agreement: Some(16), confidence: None, at: ProbeAt::Interval };
    ReasoningSettings { strategy: Strategy::Probe, probe, ..Default::default() }
}

fn with_logprobs() -> ChoiceOptions {
    ChoiceOptions { logprobs: Some(3), ..Default::default() }
}

/// A token's id and the bits of its log-probability and top alternatives.
type TokenBits = (u32, u32, Vec<(u32, u32)>);

/// Each token's id and the bits of its log-probability and top alternatives.
fn fingerprint(tokens: &[Token]) -> Vec<TokenBits> {
    tokens
        .iter()
        .map(|t| {
            let lp = t.logprob.as_ref().expect("log-probabilities were asked for");
            (t.id, lp.logprob.to_bits(), lp.top.iter().map(|&(id, l)| (id, l.to_bits())).collect())
        })
        .collect()
}

fn without_probe_counts(mut usage: ReasoningUsage) -> ReasoningUsage {
    usage.probe_tokens = 0;
    usage.probes = [0; 3];
    usage
}

#[tokio::test]
async fn a_rolled_back_probe_leaves_no_trace_and_the_same_logits_bit_for_bit() {
    // 96 tokens after a short prompt: the sequence crosses a KV page (64
    // positions), so some probe fills a page the prefix cache registers and
    // the rollback must copy it rather than write into it.
    let (plain, plain_usage, plain_end) = run_with(ReasoningSettings::default(), 96, with_logprobs()).await;
    let (probed, probed_usage, probed_end) = run_with(unsettled_probes(5), 96, with_logprobs()).await;
    assert_eq!(fingerprint(&probed), fingerprint(&plain), "every next-token distribution is the unprobed run's, to the bit");
    let text = |t: &[Token]| t.iter().map(|t| t.text.as_str()).collect::<String>();
    assert_eq!(text(&probed), text(&plain));
    assert!(probed.iter().all(|t| t.phase == Phase::Thinking && !t.forced), "nothing of a probe is streamed");
    assert_eq!(probed_end, plain_end);
    assert_eq!(without_probe_counts(probed_usage), plain_usage, "the usage counts no probe token");
    let probes: usize = probed_usage.probes.iter().sum();
    // None where fewer tokens are left than the end of the thought needs.
    let last = 96 - engine().end_of_thinking_tokens().len() - 1;
    assert_eq!(probes, last / 5, "one probe every 5 thinking tokens, none near the end");
    let text_len = engine().tokenizer().encode(&engine().reasoning_profile().probe_text(true)).unwrap().len();
    assert!(probed_usage.probe_tokens > probes * text_len, "each probe's text and its answer are counted: {probed_usage:?}");
    assert_eq!(probed_usage.probes[0], 0, "the random model never settles");
}

/// Probes before reflection words that never settle, and how many come in
/// `plain`, a run of `max_tokens`: the random model writes no `Wait`, so
/// words of its own unprobed run stand in for reflection words.
fn unsettled_probes_at_words_of(plain: &[Token], max_tokens: usize) -> (ReasoningSettings, usize) {
    let tokenizer = engine().tokenizer();
    let words: Vec<String> = plain[1..]
        .iter()
        .map(|t| t.text.trim().to_string())
        .filter(|w| !w.is_empty() && w.chars().count() <= ProbeSettings::MAX_WORD_CHARS)
        .filter(|w| plain.iter().any(|t| probe_word_ids(tokenizer, &[w.clone()]).contains(&t.id)))
        .take(4)
        .collect();
    let reflection = probe_word_ids(tokenizer, &words);
    // Not before the first token, nor where the end of the thought would not fit after it.
    let last = max_tokens - engine().end_of_thinking_tokens().len();
    let due = plain[1..last].iter().filter(|t| reflection.contains(&t.id)).count();
    assert!(due >= 4, "words {words:?} begin {due} tokens of the run");
    let mut settings = unsettled_probes(1);
    settings.probe.at = ProbeAt::Reflection;
    settings.probe_words = Some(words);
    (settings, due)
}

#[tokio::test]
async fn a_reflection_probe_holds_its_word_back_and_leaves_the_same_logits_bit_for_bit() {
    let (plain, plain_usage, plain_end) = run_with(ReasoningSettings::default(), 96, with_logprobs()).await;
    let (settings, due) = unsettled_probes_at_words_of(&plain, 96);
    let (probed, probed_usage, probed_end) = run_with(settings, 96, with_logprobs()).await;
    assert_eq!(fingerprint(&probed), fingerprint(&plain), "every next-token distribution is the unprobed run's, to the bit");
    assert!(probed.iter().all(|t| t.phase == Phase::Thinking && !t.forced), "nothing of a probe is streamed");
    assert_eq!(probed_end, plain_end);
    assert_eq!(without_probe_counts(probed_usage), plain_usage, "the usage counts no probe token");
    assert_eq!(probed_usage.probes.iter().sum::<usize>(), due, "one probe before each reflection word but the first token and the last few");
}

#[tokio::test]
async fn a_probe_in_a_batch_leaves_the_other_sequences_alone() {
    let (alone, ..) = run_with(ReasoningSettings::default(), 48, with_logprobs()).await;
    let (probed_alone, ..) = run_with(unsettled_probes(3), 48, with_logprobs()).await;
    // Submitted together, they share every step's forward pass.
    let plain = submit(ReasoningSettings::default(), 48, with_logprobs());
    let probed = submit(unsettled_probes(3), 48, with_logprobs());
    let ((batched, ..), (probed_batched, probed_usage, _)) = tokio::join!(collect(plain), collect(probed));
    assert!(probed_usage.probe_tokens > 0);
    assert_eq!(fingerprint(&batched), fingerprint(&alone), "the plain sequence's logits do not see the probe");
    assert_eq!(fingerprint(&probed_batched), fingerprint(&probed_alone));
    assert_eq!(fingerprint(&probed_batched), fingerprint(&alone));
    // So does a probe before a reflection word, whose word waits a few steps.
    let (at_words, due) = unsettled_probes_at_words_of(&alone, 48);
    let plain = submit(ReasoningSettings::default(), 48, with_logprobs());
    let probed = submit(at_words, 48, with_logprobs());
    let ((batched, ..), (probed_batched, probed_usage, _)) = tokio::join!(collect(plain), collect(probed));
    assert_eq!(probed_usage.probes.iter().sum::<usize>(), due);
    assert_eq!(fingerprint(&batched), fingerprint(&alone));
    assert_eq!(fingerprint(&probed_batched), fingerprint(&alone));
}


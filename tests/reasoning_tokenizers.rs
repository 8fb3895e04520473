//! Phase tracking on real reasoning tokenizers and chat templates: the
//! DeepSeek-R1-Distill GGUF header and the Qwen3 Hugging Face files, both
//! fetched by `models/fetch` (r1-distill-tokenizer, qwen3-tokenizer).

use std::fs::File;
use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use terse::reasoning::phase::{Phase, PhaseTracker, ThinkTokens};
use terse::tokenize::{ChatMessage, PhasedDecoder, TextTokenizer};

fn fixture(name: &str, file: &str) -> PathBuf {
    let path = terse::manifest::models_dir().join("cache").join(name).join(file);
    assert!(path.is_file(), "{} is missing: run ./models/fetch {name}", path.display());
    path
}

fn r1_tokenizer() -> TextTokenizer {
    let path = fixture("r1-distill-tokenizer", "DeepSeek-R1-Distill-Qwen-7B.header.gguf");
    let content = gguf_file::Content::read(&mut File::open(path).unwrap()).unwrap();
    TextTokenizer::from_gguf(&content).unwrap()
}

fn qwen3_tokenizer() -> TextTokenizer {
    TextTokenizer::from_hf_files(
        &fixture("qwen3-tokenizer", "tokenizer.json"),
        &fixture("qwen3-tokenizer", "tokenizer_config.json"),
    )
    .unwrap()
}

fn think_tokens(t: &TextTokenizer) -> ThinkTokens {
    ThinkTokens { open: t.token_to_id("<think>").unwrap(), close: t.token_to_id("</think>").unwrap() }
}

fn user(content: &str) -> ChatMessage {
    ChatMessage::new("user", content)
}

/// Stream `completion` token by token as the engine does; returns the
/// (thinking, answer) texts and the phase after it.
fn stream(t: &TextTokenizer, prompt: &[u32], completion: &[u32]) -> (String, String, Phase) {
    let think = think_tokens(t);
    let mut tracker = PhaseTracker::new(Some(think), prompt);
    let mut decoder = PhasedDecoder::new(Some(think));
    let (mut thinking, mut answer) = (String::new(), String::new());
    for &id in completion {
        let phase = tracker.observe(id);
        let text = decoder.push(t, id);
        match phase {
            Phase::Thinking => thinking += &text,
            Phase::Answer => answer += &text,
        }
    }
    answer += &decoder.flush(t);
    (thinking, answer, tracker.phase())
}

/// A character that byte-level BPE splits over several tokens, so the decoder
/// holds part of it back: the chunk boundary right before the delimiter.
fn split_char(t: &TextTokenizer) -> &'static str {
    ["𓀀", "🯰", "𐍈", "🫠", "𝔸"]
        .into_iter()
        .find(|c| t.encode(c).unwrap().len() >= 2)
        .expect("some rare character spans several tokens")
}

/// The R1-Distill manifest's reasoning profile.
fn r1_profile() -> terse::reasoning::profile::ReasoningProfile {
    terse::manifest::load_manifest("deepseek-r1-distill-qwen-1.5b").unwrap().reasoning_profile().unwrap()
}

#[test]
fn r1_distill_vocabulary_and_template_open_the_thought_in_the_prompt() {
    let t = r1_tokenizer();
    let think = think_tokens(&t);
    assert_eq!((think.open, think.close), (151648, 151649));
    assert!(t.end_of_turn_ids().contains(&151643), "EOS ends the turn: {:?}", t.end_of_turn_ids());
    assert_eq!(t.encode("</think>").unwrap(), vec![151649], "the delimiter is one token");

    let rendered = t.apply_chat_template(&[user("What is 2+2?")], true).unwrap();
    assert!(rendered.ends_with("<｜Assistant｜>"), "this GGUF carries the older template: {rendered:?}");
    let text = r1_profile().open_thought(rendered);
    assert!(text.ends_with("<｜Assistant｜><think>\n"), "the manifest opens the thought: {text:?}");
    let prompt = t.encode(&text).unwrap();
    assert_eq!(PhaseTracker::new(Some(think), &prompt).phase(), Phase::Thinking);
    // Without the generation prompt the conversation is not inside a thought.
    let no_gen = t.encode(&t.apply_chat_template(&[user("What is 2+2?")], false).unwrap()).unwrap();
    assert_eq!(PhaseTracker::new(Some(think), &no_gen).phase(), Phase::Answer);
    // Mode `none` appends the closing text to such a prompt: the model answers at once.
    let mut closed = prompt.clone();
    closed.extend(t.encode("\n</think>\n\n").unwrap());
    assert_eq!(PhaseTracker::new(Some(think), &closed).phase(), Phase::Answer);
}

#[test]
fn r1_distill_stream_splits_thought_and_answer_at_a_chunk_boundary() {
    let t = r1_tokenizer();
    let c = split_char(&t);
    let text = r1_profile().open_thought(t.apply_chat_template(&[user("Name a sign.")], true).unwrap());
    let prompt = t.encode(&text).unwrap();
    let completion = t.encode(&format!("Maybe this one: {c}</think>\n\nThe sign {c}.")).unwrap();
    let (thinking, answer, phase) = stream(&t, &prompt, &completion);
    assert_eq!(thinking, format!("Maybe this one: {c}"), "the held-back character stays in the thought");
    assert_eq!(answer, format!("\n\nThe sign {c}."), "no delimiter text leaks into the answer");
    assert_eq!(phase, Phase::Answer);
}

#[test]
fn qwen3_model_opens_the_thought_itself_and_the_template_can_switch_it_off() {
    let t = qwen3_tokenizer();
    let think = think_tokens(&t);
    assert_ne!(think.open, think.close);
    assert_eq!(t.encode("<think>").unwrap(), vec![think.open]);
    let im_end = t.token_to_id("<|im_end|>").unwrap();
    assert!(t.end_of_turn_ids().contains(&im_end));

    let chat = [user("What is 2+2?")];
    let thinking_on = t.apply_chat_template(&chat, true).unwrap();
    assert!(thinking_on.ends_with("<|im_start|>assistant\n"), "{thinking_on:?}");
    let prompt = t.encode(&thinking_on).unwrap();
    assert_eq!(PhaseTracker::new(Some(think), &prompt).phase(), Phase::Answer, "the model opens the thought");

    let thinking_off = t.apply_chat_template_with(&chat, true, Some(false), None).unwrap();
    assert!(thinking_off.ends_with("<think>\n\n</think>\n\n"), "{thinking_off:?}");
    let off = t.encode(&thinking_off).unwrap();
    assert_eq!(PhaseTracker::new(Some(think), &off).phase(), Phase::Answer);
    assert!(off.contains(&think.close));

    // An earlier turn's thought is dropped by the template; the new prompt is not inside one.
    let history = [
        user("Hi"),
        ChatMessage::new("assistant", "<think>\nGreet back.\n</think>\n\nHello!"),
        user("What is 2+2?"),
    ];
    let text = t.apply_chat_template(&history, true).unwrap();
    assert!(!text.contains("Greet back"), "{text:?}");
    assert_eq!(PhaseTracker::new(Some(think), &t.encode(&text).unwrap()).phase(), Phase::Answer);

    // `/no_think` is the model's own switch: the template passes it through
    // as text and opens nothing, and the model answers with an empty thought,
    // which the stream counts as such.
    let soft = t.apply_chat_template(&[user("What is 2+2? /no_think")], true).unwrap();
    assert!(soft.ends_with("What is 2+2? /no_think<|im_end|>\n<|im_start|>assistant\n"), "{soft:?}");
    let soft = t.encode(&soft).unwrap();
    assert_eq!(PhaseTracker::new(Some(think), &soft).phase(), Phase::Answer);
    let (thinking, answer, phase) = stream(&t, &soft, &t.encode("<think>\n\n</think>\n\n4<|im_end|>").unwrap());
    assert_eq!((thinking.as_str(), answer.as_str(), phase), ("\n\n", "\n\n4", Phase::Answer));
}

#[test]
fn qwen3_stream_enters_and_leaves_the_thought_across_chunk_boundaries() {
    let t = qwen3_tokenizer();
    let c = split_char(&t);
    let prompt = t.encode(&t.apply_chat_template(&[user("Name a sign.")], true).unwrap()).unwrap();
    let completion = t.encode(&format!("<think>\nMaybe {c}</think>\n\n{c}<|im_end|>")).unwrap();
    let (thinking, answer, phase) = stream(&t, &prompt, &completion);
    assert_eq!(thinking, format!("\nMaybe {c}"));
    assert_eq!(answer, format!("\n\n{c}"));
    assert_eq!(phase, Phase::Answer);
}

/// A file given without a manifest: what its vocabulary and template say.
fn detected(t: &TextTokenizer) -> terse::engine::ResolvedReasoning {
    terse::engine::resolve_reasoning(t, &terse::reasoning::profile::ReasoningProfile::default(), false).unwrap()
}

#[test]
fn reasoning_is_detected_from_the_vocabulary_and_the_template() {
    use terse::engine::ProfileSource;
    // R1-Distill's older template stops at `<｜Assistant｜>`: detected, and the
    // thought is opened after the generation prompt, as the model was trained.
    let r1 = detected(&r1_tokenizer());
    assert_eq!(r1.summary.source, ProfileSource::Detected);
    assert_eq!((r1.summary.think_open.as_deref(), r1.summary.think_close.as_deref()), (Some("<think>"), Some("</think>")));
    assert!(r1.profile.start_thinking && r1.summary.thinking_by_default);
    assert_eq!(r1.think.map(|t| (t.open, t.close)), Some((151648, 151649)));
    let t = r1_tokenizer();
    assert_eq!(r1.injections.end_of_thinking, t.encode("\n</think>\n\n").unwrap());

    // Qwen3's template has the `enable_thinking` switch: the model opens the thought.
    let qwen3 = detected(&qwen3_tokenizer());
    assert_eq!(qwen3.summary.source, ProfileSource::Detected);
    assert!(!qwen3.profile.start_thinking && qwen3.summary.thinking_by_default);

    // SmolLM2 has no think tokens: no thinking phase, the wrap-up text at a budget.
    let smol_path = terse::manifest::resolve_model("smollm2-135m").expect("run ./models/fetch smollm2-135m").path;
    let smol = TextTokenizer::from_gguf(&gguf_file::Content::read(&mut File::open(smol_path).unwrap()).unwrap()).unwrap();
    let none = detected(&smol);
    assert_eq!(none.summary.source, ProfileSource::None);
    assert!(none.think.is_none() && !none.summary.thinking_by_default && none.summary.think_open.is_none());
    assert_eq!(none.injections.end_of_thinking, smol.encode("\nFinal answer:").unwrap());

    // A manifest wins: R1's keeps its own texts and says so.
    let manifest = terse::engine::resolve_reasoning(&r1_tokenizer(), &r1_profile(), true).unwrap();
    assert_eq!(manifest.summary.source, ProfileSource::Manifest);
}

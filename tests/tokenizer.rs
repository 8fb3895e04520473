//! The tokenizer and chat template built from each real GGUF file's metadata.

use std::fs::File;

use candle_core::quantized::gguf_file;
use terse::tokenize::{ChatMessage, IncrementalDecoder, TextTokenizer};

fn tokenizer(name: &str) -> TextTokenizer {
    let path = terse::manifest::resolve_model(name).expect("model fetched").path;
    let content = gguf_file::Content::read(&mut File::open(path).unwrap()).unwrap();
    TextTokenizer::from_gguf(&content).unwrap()
}

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", text)]
}

#[test]
fn smollm2_recognises_special_tokens_and_splits_digits() {
    let t = tokenizer("smollm2-135m");
    let ids = t.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&1), "<|im_start|> is one special token: {ids:?}");
    assert_eq!(ids.last(), Some(&2), "<|im_end|> is one special token: {ids:?}");
    // SmolLM2 was trained with every digit a token of its own.
    let digits = t.encode("2024").unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");
    assert_eq!(t.end_of_turn_ids()[0], 2);
}

#[test]
fn round_trips_unicode_text() {
    for name in ["smollm2-135m", "qwen2.5-0.5b"] {
        let t = tokenizer(name);
        let text = "Crème brûlée costs 4.50€ — 猫 🐈 okay?\n  indented";
        assert_eq!(t.decode(&t.encode(text).unwrap()), text, "{name}");
    }
}

#[test]
fn incremental_deltas_are_valid_utf8_and_add_up() {
    let t = tokenizer("smollm2-135m");
    let text = "Cats 🐈🐈 and 猫猫, naïve café.";
    let ids = t.encode(text).unwrap();
    let mut decoder = IncrementalDecoder::new();
    let mut out = String::new();
    let mut empty = 0;
    for &id in &ids {
        let delta = decoder.push(&t, id);
        empty += delta.is_empty() as usize;
        out.push_str(&delta);
    }
    out.push_str(&decoder.flush(&t));
    assert_eq!(out, text);
    assert!(empty > 0, "an emoji spans several byte tokens, so some deltas wait");
}

#[test]
fn chat_templates_render_from_the_gguf() {
    let smol = tokenizer("smollm2-135m");
    let prompt = smol.apply_chat_template(&user("Hello"), true).unwrap();
    assert!(prompt.starts_with("<|im_start|>system\n"), "{prompt}");
    assert!(prompt.ends_with("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"), "{prompt}");

    let qwen = tokenizer("qwen2.5-0.5b");
    let prompt = qwen.apply_chat_template(&user("Hello"), true).unwrap();
    assert!(prompt.contains("You are Qwen"), "Qwen's default system prompt: {prompt}");
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    let eot = qwen.end_of_turn_ids();
    assert!(eot.contains(&151645) && eot.contains(&151643), "<|im_end|> and <|endoftext|> end a turn: {eot:?}");
}

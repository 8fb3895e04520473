//! terse against llama.cpp on the same files, through llama.cpp's own tokens
//! and logits recorded in `tests/fixtures/llama_cpp/` by
//! `tests/python/record_llama_cpp.py` (llama-cpp-python 0.3.36; llama.cpp
//! takes too long to build for CI, and nothing it records changes unless the
//! files do):
//! - Gemma-3-270m (the real file): the SentencePiece tokenizer gives
//!   llama.cpp's tokens, and the logits agree on a short prompt and on one
//!   longer than the 512-position sliding window (candle-transformers'
//!   reference ignores the window when decoding; see `tests/reference.rs`);
//! - Llama 3 rope scaling: random weights in Llama-3.2-1B's shapes (two of
//!   its layers) with the `rope_freqs` factors llama.cpp reads, at positions
//!   where the scaled frequencies have turned far from the plain ones;
//!   candle-transformers' quantized llama ignores `rope_freqs`;
//! - Phi-4-mini's LongRoPE and partial rotation: random weights in its
//!   shapes (two layers), q/k/v and gate/up fused, 96 of each head's 128
//!   values rotating, the long factor set and the attention factor;
//!   candle-transformers' Phi-3 models multiply by the factors where
//!   Hugging Face and llama.cpp divide, and leave the attention factor out.

use std::path::PathBuf;

use serde::Deserialize;
use terse::engine::argmax;
use terse::model::{load_gguf, write_random_gguf, LoadedModel, SeqChunk, SyntheticSpec};

#[derive(Deserialize)]
struct Top {
    ids: Vec<u32>,
    logits: Vec<f32>,
}

/// What `record_llama_cpp.py` wrote.
#[derive(Deserialize)]
struct Recorded {
    text: String,
    prompt: Vec<u32>,
    /// llama.cpp's greedy tokens after the prompt.
    inputs: Vec<u32>,
    /// The 64 largest logits at the last prompt position, then after each input.
    top: Vec<Top>,
}

fn recorded(name: &str) -> Recorded {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_cpp").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Feed llama.cpp's prompt and greedy tokens to `model` as one sequence;
/// returns the largest |ours − llama.cpp| over the recorded logits. Where
/// llama.cpp's top two are further apart than `tolerance`, the greedy
/// tokens must agree.
fn worst_difference(model: &LoadedModel, r: &Recorded, tolerance: f32) -> (f32, usize) {
    let mut cache = model.transformer.new_cache();
    let (mut worst, mut decisive) = (0f32, 0);
    let mut feed = r.prompt.clone();
    for (step, top) in r.top.iter().enumerate() {
        let logits = model.transformer.forward(&mut [SeqChunk { tokens: &feed, cache: &mut cache }]).unwrap();
        let ours = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (&id, &theirs) in top.ids.iter().zip(&top.logits) {
            worst = worst.max((ours[id as usize] - theirs).abs());
        }
        if top.logits[0] - top.logits[1] > tolerance {
            decisive += 1;
            assert_eq!(argmax(&ours), top.ids[0], "step {step}: greedy tokens differ");
        }
        if let Some(&next) = r.inputs.get(step) {
            feed = vec![next];
        }
    }
    (worst, decisive)
}

#[test]
fn gemma3_tokenizes_and_computes_as_llama_cpp_does() {
    let path = terse::manifest::resolve_model("gemma-3-270m").expect("run ./models/fetch gemma-3-270m").path;
    let model = load_gguf(&path, "gemma-3-270m").unwrap();
    // The quantized kernels' sums differ from llama.cpp's in order and in how
    // activations round: measured worst 0.65 (short) and 0.91 (past the window).
    const TOLERANCE: f32 = 1.5;
    for name in ["gemma-short.json", "gemma-long.json"] {
        let r = recorded(name);
        assert_eq!(model.tokenizer.encode_prompt(&r.text).unwrap(), r.prompt, "{name}: llama.cpp's tokens");
        let (worst, decisive) = worst_difference(&model, &r, TOLERANCE);
        eprintln!("{name}: {} prompt tokens, logits within {worst:e} of llama.cpp's; greedy compared at {decisive} steps", r.prompt.len());
        assert!(worst <= TOLERANCE, "{name}: logits differ from llama.cpp's by {worst}");
        assert!(decisive >= 2, "{name}: too few decisive steps ({decisive})");
    }
    assert!(recorded("gemma-long.json").prompt.len() > 700, "the long prompt outgrows the window");
}

#[test]
fn llama3_rope_scaling_computes_as_llama_cpp_does() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("terse-llama3-rope");
    std::fs::create_dir_all(&dir).unwrap();
    let tokenizer = terse::manifest::models_dir().join("cache/qwen3-tokenizer/tokenizer.json");
    assert!(tokenizer.is_file(), "run ./models/fetch qwen3-tokenizer");
    // The file record_llama_cpp.py was given: `terse synth --shape llama-3.2-1b
    // --dtype q4_k --layers 2 --seed 1`; and the same weights without the factors.
    let spec = SyntheticSpec { dtype: candle_core::quantized::GgmlDType::Q4K, seed: 1, ..SyntheticSpec::llama_3_2_1b(2) };
    let (scaled, plain) = (dir.join("scaled.gguf"), dir.join("plain.gguf"));
    write_random_gguf(&scaled, &spec, &tokenizer).unwrap();
    write_random_gguf(&plain, &SyntheticSpec { llama3_rope: None, ..spec }, &tokenizer).unwrap();
    let r = recorded("llama3-rope.json");
    let model = load_gguf(&scaled, "llama3-rope").unwrap();
    assert!(model.transformer.config.rope_freq_factors.as_ref().is_some_and(|f| f.iter().any(|&x| x > 1.0)), "the file's factors are read");
    assert_eq!(model.tokenizer.encode_prompt(&r.text).unwrap(), r.prompt, "llama.cpp's tokens");
    // Measured worst 0.38; without the factors 1.48.
    const TOLERANCE: f32 = 0.5;
    let (worst, decisive) = worst_difference(&model, &r, TOLERANCE);
    eprintln!("llama3 rope: {} prompt tokens, logits within {worst:e} of llama.cpp's; greedy compared at {decisive} steps", r.prompt.len());
    assert!(worst <= TOLERANCE, "logits differ from llama.cpp's by {worst}");
    // Without the factors the same weights miss by far more: the positions
    // do exercise the scaling.
    let unscaled = load_gguf(&plain, "llama3-plain").unwrap();
    let (miss, _) = worst_difference(&unscaled, &Recorded { top: r.top.iter().take(1).map(|t| Top { ids: t.ids.clone(), logits: t.logits.clone() }).collect(), ..r }, f32::INFINITY);
    eprintln!("without the factors: within {miss:e}");
    assert!(miss > 3.0 * worst, "the scaling made too little difference: {miss} without it, {worst} with it");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn phi4_mini_longrope_computes_as_llama_cpp_does() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("terse-phi4-longrope");
    std::fs::create_dir_all(&dir).unwrap();
    let tokenizer = terse::manifest::models_dir().join("cache/qwen3-tokenizer/tokenizer.json");
    assert!(tokenizer.is_file(), "run ./models/fetch qwen3-tokenizer");
    // The file record_llama_cpp.py was given (with --n-ctx 8192, so that
    // llama.cpp takes the long factors): `terse synth --shape phi-4-mini
    // --dtype q4_k --layers 2 --seed 1 --context 8192 --vocab 151936`.
    let spec = SyntheticSpec {
        dtype: candle_core::quantized::GgmlDType::Q4K,
        seed: 1,
        context_length: 8192,
        vocab_size: 151_936,
        ..SyntheticSpec::phi4_mini(2)
    };
    let path = dir.join("phi4.gguf");
    write_random_gguf(&path, &spec, &tokenizer).unwrap();
    let r = recorded("phi4-longrope.json");
    let model = load_gguf(&path, "phi4-longrope").unwrap();
    let config = &model.transformer.config;
    assert_eq!((config.head_dim, config.rotary_dim), (128, 96), "head size from hidden / heads, rotation from rope.dimension_count");
    assert!(config.rope_freq_factors.as_ref().is_some_and(|f| f.iter().any(|&x| x > 4.0)), "the long factors are read");
    assert!(config.rope_attn_factor > 1.0, "the attention factor is read");
    assert_eq!(model.tokenizer.encode_prompt(&r.text).unwrap(), r.prompt, "llama.cpp's tokens");
    const TOLERANCE: f32 = 0.5;
    let (worst, decisive) = worst_difference(&model, &r, TOLERANCE);
    eprintln!("phi4 longrope: {} prompt tokens, logits within {worst:e} of llama.cpp's; greedy compared at {decisive} steps", r.prompt.len());
    assert!(worst <= TOLERANCE, "logits differ from llama.cpp's by {worst}");
    // The same file served at the trained context takes the short factors
    // and no attention factor, and misses llama.cpp's long-context logits by far more.
    let short_path = dir.join("phi4-short.gguf");
    write_random_gguf(&short_path, &SyntheticSpec { context_length: 4096, ..spec }, &tokenizer).unwrap();
    let short = load_gguf(&short_path, "phi4-short").unwrap();
    assert_eq!(short.transformer.config.rope_attn_factor, 1.0);
    let first = Recorded { top: r.top.iter().take(1).map(|t| Top { ids: t.ids.clone(), logits: t.logits.clone() }).collect(), ..r };
    let (miss, _) = worst_difference(&short, &first, f32::INFINITY);
    eprintln!("with the short factors: within {miss:e}");
    assert!(miss > 3.0 * worst, "the factor sets made too little difference: {miss} with the short one, {worst} with the long one");
    let _ = std::fs::remove_dir_all(&dir);
}

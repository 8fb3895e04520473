//! Our forward pass against candle-transformers' reference models on the same
//! GGUF file, and batching's bit-for-bit invariance.
//!
//! Qwen2.5-0.5B runs when its file is fetched (`./models/fetch qwen2.5-0.5b`);
//! set TERSE_REQUIRE_QWEN=1 to make a missing file a failure.

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use terse::engine::argmax;
use terse::model::{load_gguf, Activation, Arch, KvPrecision, LoadedModel, Rows, SeqChunk, SeqKvCache};
use terse::tokenize::ChatMessage;

/// Largest |ours - reference| allowed on any logit, per model. Both sides
/// quantize every activation row to 8 bits before each quantized matmul, so a
/// last-bit difference upstream (our attention sums in its own order on the
/// CPU, `model::host_attention`; Q6_K rows that we always run on candle's tiled
/// kernel, see `model::Linear`) can flip one rounding step and move logits by
/// far more than float noise. The reference disagrees with ITSELF by that much
/// between its one-token decode and a full prefill of the same tokens (printed
/// below: up to 1.10 on SmolLM2, ~0.4 on Qwen2.5-0.5B). Our Q8_0 kernel sums
/// each block in candle's scalar expression, not in candle's AVX2 lanes
/// (`model::quant`). Measured worst: 1.60 on SmolLM2, 0.58 on Qwen.
const SMOLLM2_TOLERANCE: f32 = 2.0;
const QWEN_TOLERANCE: f32 = 1.0;
/// Qwen3 on random weights (`qwen3_matches_candle_transformers`), logits of
/// magnitude ~15. With f16 weights both sides run candle's own products, and
/// differ only in float rounding (attention's and the norms' sums, then f16
/// inputs to the products): measured worst 0.058 (0.016 with f32 weights).
/// Quantized, each side rounds every activation row to 8 bits, and a
/// last-bit difference upstream flips such a rounding: measured worst 0.61
/// (Q8_0), 0.39 (Q4_0, on Q4_1's kernels) and 0.56 (Q4_K_M, where the
/// reference differs from its own prefill by 0.33). A wrong step (a missing per-head norm, the wrong head size or
/// rope base) moves logits by whole units.
const QWEN3_F16_TOLERANCE: f32 = 0.15;
const QWEN3_TOLERANCE: f32 = 1.0;
/// Gemma-3-270m (`gemma3_matches_candle_transformers`): measured worst 2.02
/// over 4 prompts × 33 steps (the reference differs from its own prefill by
/// up to 1.34), and 1.64 for prefills past the 512-position window.
const GEMMA3_TOLERANCE: f32 = 2.5;
const STEPS: usize = 32;
const PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "If I have 3 apples and eat one, how many are left? Explain step by step.",
];

fn model_path(name: &str) -> PathBuf {
    terse::manifest::resolve_model(name).expect("model fetched").path
}

enum Reference {
    Llama(candle_transformers::models::quantized_llama::ModelWeights),
    Qwen2(candle_transformers::models::quantized_qwen2::ModelWeights),
    Qwen3(candle_transformers::models::quantized_qwen3::ModelWeights),
    Gemma3(candle_transformers::models::quantized_gemma3::ModelWeights),
    Phi3(candle_transformers::models::quantized_phi3::ModelWeights),
    /// Its dense models, on a Hugging Face directory.
    Gemma3Dense(candle_transformers::models::gemma3::Model),
    Phi3Dense(candle_transformers::models::phi3::Model),
}

impl Reference {
    fn load(path: &Path, arch: Arch) -> Reference {
        let mut file = File::open(path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        match arch {
            Arch::Llama => Reference::Llama(
                candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap(),
            ),
            Arch::Qwen2 => Reference::Qwen2(
                candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap(),
            ),
            Arch::Qwen3 => Reference::Qwen3(
                candle_transformers::models::quantized_qwen3::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap(),
            ),
            Arch::Gemma3 => Reference::Gemma3(
                candle_transformers::models::quantized_gemma3::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap(),
            ),
            Arch::Phi3 => Reference::Phi3(
                candle_transformers::models::quantized_phi3::ModelWeights::from_gguf(false, content, &mut file, &Device::Cpu).unwrap(),
            ),
        }
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Vec<f32> {
        let x = Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = match self {
            Reference::Llama(m) => m.forward(&x, pos),
            Reference::Qwen2(m) => m.forward(&x, pos),
            // Its logits are of the last position only, like the others'.
            Reference::Qwen3(m) => m.forward(&x, pos),
            Reference::Gemma3(m) => m.forward(&x, pos),
            Reference::Phi3(m) => m.forward(&x, pos),
            Reference::Gemma3Dense(m) => m.forward(&x, pos),
            Reference::Phi3Dense(m) => m.forward(&x, pos),
        }
        .unwrap();
        logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn clear(&mut self) {
        match self {
            Reference::Llama(m) => m.clear_kv_cache(),
            Reference::Qwen2(m) => m.clear_kv_cache(),
            Reference::Qwen3(m) => m.clear_kv_cache(),
            // Its caches start again at position 0.
            Reference::Gemma3(_) | Reference::Phi3(_) => {}
            Reference::Gemma3Dense(m) => m.clear_kv_cache(),
            Reference::Phi3Dense(m) => m.clear_kv_cache(),
        }
    }
}

fn prompt_tokens(model: &LoadedModel, text: &str) -> Vec<u32> {
    let rendered = model
        .tokenizer
        .apply_chat_template(&[ChatMessage::new("user", text)], true)
        .unwrap();
    model.tokenizer.encode(&rendered).unwrap()
}

/// Logits of our model for one sequence fed alone: the prompt, then `inputs` one at a time.
fn ours_alone(model: &LoadedModel, prompt: &[u32], inputs: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.transformer.new_cache();
    let mut out = Vec::new();
    let mut feed = prompt.to_vec();
    for step in 0..=inputs.len() {
        let logits = model.transformer.forward(&mut [SeqChunk { tokens: &feed, cache: &mut cache }]).unwrap();
        out.push(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        if step < inputs.len() {
            feed = vec![inputs[step]];
        }
    }
    out
}

fn top_two_gap(logits: &[f32]) -> f32 {
    let best = argmax(logits) as usize;
    let second = logits.iter().enumerate().filter(|(i, _)| *i != best).map(|(_, &l)| l).fold(f32::NEG_INFINITY, f32::max);
    logits[best] - second
}

fn compare_with_reference(name: &str, tolerance: f32) {
    compare_file_with_reference(&model_path(name), name, tolerance);
}

fn compare_file_with_reference(path: &Path, name: &str, tolerance: f32) {
    let ours = load_gguf(path, name).unwrap();
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|text| prompt_tokens(&ours, text)).collect();
    compare_prompts_with_reference(path, &ours, name, &prompts, tolerance);
}

fn compare_prompts_with_reference(path: &Path, ours: &LoadedModel, name: &str, prompts: &[Vec<u32>], tolerance: f32) {
    let reference = Reference::load(path, ours.transformer.config.arch);
    compare_prompts_with(reference, ours, name, prompts, tolerance);
}

fn compare_prompts_with(mut reference: Reference, ours: &LoadedModel, name: &str, prompts: &[Vec<u32>], tolerance: f32) {
    let mut worst = 0f32;
    let mut greedy_checked = 0;
    for prompt in prompts {
        let prompt = prompt.clone();
        let text = format!("{} prompt tokens", prompt.len());
        reference.clear();
        // The reference chooses the tokens (greedy); both models are fed the same ones.
        let mut ref_logits = vec![reference.forward(&prompt, 0)];
        let mut inputs = Vec::new();
        for step in 0..STEPS {
            let next = argmax(ref_logits.last().unwrap());
            inputs.push(next);
            ref_logits.push(reference.forward(&[next], prompt.len() + step));
        }
        let our_logits = ours_alone(ours, &prompt, &inputs);
        // How far the reference is from itself: the last step recomputed as one prefill.
        reference.clear();
        let mut all = prompt.clone();
        all.extend(&inputs[..STEPS - 1]);
        let again = reference.forward(&all, 0);
        let self_diff = again.iter().zip(&ref_logits[STEPS - 1]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        eprintln!("{name} {text:?}: reference decode vs its own prefill differ by up to {self_diff:e}");
        for (step, (a, b)) in our_logits.iter().zip(&ref_logits).enumerate() {
            assert_eq!(a.len(), b.len());
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            worst = worst.max(diff);
            assert!(diff <= tolerance, "{name} {text:?} step {step}: max logit difference {diff} > {tolerance}");
            if top_two_gap(b) > tolerance {
                greedy_checked += 1;
                assert_eq!(argmax(a), argmax(b), "{name} {text:?} step {step}: greedy tokens differ");
            }
        }
    }
    eprintln!("{name}: max logit difference {worst:e} over {} prompts x {} steps; greedy compared at {greedy_checked} steps", prompts.len(), STEPS + 1);
    // A third of the steps at least, so the greedy comparison means something.
    assert!(greedy_checked >= prompts.len() * STEPS / 3, "too few decisive steps to compare greedy tokens");
}

#[test]
fn smollm2_matches_candle_transformers() {
    compare_with_reference("smollm2-135m", SMOLLM2_TOLERANCE);
}

/// Qwen3 (no public weights here): random weights in Qwen3-0.6B's exact
/// per-layer shapes (16 / 8 heads of 128 on a hidden size of 1024, per-head
/// q/k norms, a tied head) with the real Qwen3 tokenizer and chat template,
/// in Q8_0, Q4_0 and in a Q4_K_M-like mix (Q4_K, with Q6_K for every other
/// layer's `attn_v` and `ffn_down`), against candle-transformers'
/// `quantized_qwen3`; and in f16 and bf16, where nothing but float rounding separates
/// the two, so a wrong step shows far above the tolerance. Eight of its 28
/// layers (four in f16), to keep the test's files and time small; every layer
/// is the same computation.
#[test]
fn qwen3_matches_candle_transformers() {
    use candle_core::quantized::GgmlDType;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("terse-qwen3");
    std::fs::create_dir_all(&dir).unwrap();
    let tokenizer = terse::manifest::models_dir().join("cache/qwen3-tokenizer/tokenizer.json");
    assert!(tokenizer.is_file(), "run ./models/fetch qwen3-tokenizer");
    let cases = [
        // F16 and BF16 run on our own dense kernel (float_matrix.rs).
        (GgmlDType::F16, None, "f16", 4, QWEN3_F16_TOLERANCE),
        (GgmlDType::BF16, None, "bf16", 4, QWEN3_F16_TOLERANCE),
        (GgmlDType::Q8_0, None, "q8_0", 8, QWEN3_TOLERANCE),
        // Run on Q4_1's kernels (quant.rs).
        (GgmlDType::Q4_0, None, "q4_0", 4, QWEN3_TOLERANCE),
        (GgmlDType::Q4K, Some(GgmlDType::Q6K), "q4_k_m", 8, QWEN3_TOLERANCE),
        (GgmlDType::Q5K, Some(GgmlDType::Q6K), "q5_k_m", 4, QWEN3_TOLERANCE),
    ];
    for (dtype, sensitive, label, layers, tolerance) in cases {
        let path = dir.join(format!("qwen3-0.6b-shapes.{label}.gguf"));
        let spec = terse::model::SyntheticSpec { dtype, sensitive_dtype: sensitive, seed: 7, ..terse::model::SyntheticSpec::qwen3_0_6b(layers) };
        terse::model::write_random_gguf(&path, &spec, &tokenizer).unwrap();
        compare_file_with_reference(&path, &format!("qwen3-synthetic-{label}"), tolerance);
        std::fs::remove_file(&path).unwrap();
    }
}

/// Phi-3 (no public weights here): random weights in Phi-3-mini-4k's
/// exact per-layer shapes (32 heads of 96 on a hidden size of 3072, q/k/v
/// in one matrix and the MLP's gate and up in another, an output head of
/// its own), two of its 32 layers, in Q8_0 and Q4_K, against
/// candle-transformers' `quantized_phi3`. That reference rotates every
/// value of a head at base 10,000 and reads no LongRoPE factors, so this
/// file has neither: Phi-4-mini's partial rotation and LongRoPE are checked
/// against llama.cpp (`tests/llama_cpp.rs`). SmolLM2's tokenizer (49,152
/// tokens, near Phi-3's 32,064) keeps the file small.
#[test]
fn phi3_matches_candle_transformers() {
    use candle_core::quantized::GgmlDType;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("terse-phi3");
    std::fs::create_dir_all(&dir).unwrap();
    let tokenizer = model_path("smollm2-135m");
    for (dtype, label) in [(GgmlDType::Q8_0, "q8_0"), (GgmlDType::Q4K, "q4_k")] {
        let path = dir.join(format!("phi3-mini-shapes.{label}.gguf"));
        let spec = terse::model::SyntheticSpec { dtype, vocab_size: 49_152, seed: 5, ..terse::model::SyntheticSpec::phi3_mini_4k(2) };
        terse::model::write_random_gguf(&path, &spec, &tokenizer).unwrap();
        compare_file_with_reference(&path, &format!("phi3-synthetic-{label}"), QWEN3_TOLERANCE);
        std::fs::remove_file(&path).unwrap();
    }
}

/// Gemma 3 (the real 270m file) against candle-transformers'
/// `quantized_gemma3`: raw prompts (the pretrained model has no chat
/// template), 32 decode steps; and a prompt longer than the 512-position
/// sliding window, its prefill only.
///
/// The reference departs from Gemma in three places, so the comparison
/// takes them into account: its MLP applies SiLU where Gemma (and llama.cpp,
/// and terse) apply GELU-tanh, so for this comparison our layers are switched
/// to SiLU (`tests/gemma3.rs` checks the real one against llama.cpp);
/// its one-token decode masks nothing, ignoring the window, so past the
/// window only its prefill is compared; and that prefill lets a windowed
/// layer's query see 513 positions where Hugging Face and llama.cpp (and
/// terse) let it see 512.
#[test]
fn gemma3_matches_candle_transformers() {
    let path = model_path("gemma-3-270m");
    let mut ours = load_gguf(&path, "gemma-3-270m").unwrap();
    for block in &mut ours.transformer.blocks {
        assert_eq!(block.spec.activation, Activation::GeluTanh);
        block.spec.activation = Activation::Silu;
    }
    let prompts: Vec<Vec<u32>> = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fibonacci(n):", "The three primary colors are"]
        .iter()
        .map(|text| ours.tokenizer.encode_prompt(text).unwrap())
        .collect();
    compare_prompts_with_reference(&path, &ours, "gemma-3-270m", &prompts, GEMMA3_TOLERANCE);

    // Past the window: prefills of 520, 640 and ~760 positions.
    let long = "The history of the city goes back to the Romans, who built a bridge over the river.".repeat(40);
    let prompt = ours.tokenizer.encode_prompt(&long).unwrap();
    assert!(prompt.len() > 700, "the long prompt outgrows the window: {} tokens", prompt.len());
    let mut worst = 0f32;
    let mut reference = Reference::load(&path, Arch::Gemma3);
    for end in [520, 640, prompt.len()] {
        let theirs = reference.forward(&prompt[..end], 0);
        let mine = ours_alone(&ours, &prompt[..end], &[]).remove(0);
        let diff = mine.iter().zip(&theirs).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        worst = worst.max(diff);
        assert!(diff <= GEMMA3_TOLERANCE, "{end} positions: max logit difference {diff}");
        if top_two_gap(&theirs) > GEMMA3_TOLERANCE {
            assert_eq!(argmax(&mine), argmax(&theirs), "{end} positions: greedy tokens differ");
        }
    }
    eprintln!("gemma-3-270m past the window: prefill logits differ by up to {worst:e}");
}

/// The real Gemma-3-270m as a Hugging Face directory (`terse convert`, f32:
/// its norms written as Gemma's checkpoints keep them, less one), read by
/// terse and by candle-transformers' dense `gemma3` model, which computes
/// GELU-tanh and windows its decode as Gemma does. Both sides run f32
/// without quantized activations, so the logits agree far closer than the
/// GGUF comparison's: measured worst 4.6e-5 over 3 prompts × 33 steps.
const GEMMA3_DIR_TOLERANCE: f32 = 1e-3;

#[test]
fn a_gemma3_directory_matches_candle_transformers() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("terse-gemma3-hf");
    let _ = std::fs::remove_dir_all(&dir);
    terse::model::convert_gguf_to_hf(&model_path("gemma-3-270m"), &dir, candle_core::DType::F32).unwrap();
    let ours = terse::model::load_hf_dir(&dir, "gemma-3-270m", terse::model::SparseMode::Off).unwrap().0;
    assert_eq!(ours.transformer.config.arch, Arch::Gemma3);
    assert_eq!(ours.transformer.config.sliding_pattern, 6);
    let config: candle_transformers::models::gemma3::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let weights = [dir.join("model.safetensors")];
    // SAFETY: the file was just written and nothing changes it while mapped.
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&weights, candle_core::DType::F32, &Device::Cpu).unwrap() };
    let reference = Reference::Gemma3Dense(candle_transformers::models::gemma3::Model::new(false, &config, vb).unwrap());
    let prompts: Vec<Vec<u32>> = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fibonacci(n):"]
        .iter()
        .map(|text| ours.tokenizer.encode_prompt(text).unwrap())
        .collect();
    // BOS first, as the file asks (tokenizer_config's add_bos_token).
    assert_eq!(prompts[0][0], ours.tokenizer.token_to_id("<bos>").unwrap());
    compare_prompts_with(reference, &ours, "gemma-3-270m directory", &prompts, GEMMA3_DIR_TOLERANCE);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Phi-4-mini's layout as Hugging Face directories (`terse convert`, f32),
/// on a small model of it (hidden 256, 4 / 2 heads of 64 of which 48
/// rotate, q/k/v and gate/up fused, a tied head):
/// - without LongRoPE, read by terse and by candle-transformers' dense
///   `phi3`, which rotates part of each head as Phi does (its LongRoPE
///   multiplies by the factors where Hugging Face divides, so it is not used);
/// - with LongRoPE, the directory computes what its GGUF computes: the long
///   factors and the attention factor go through `config.json`.
#[test]
fn a_phi3_directory_matches_candle_transformers() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("terse-phi3-hf");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let small = small_phi4(4);
    let tokenizer = model_path("smollm2-135m");
    let texts = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fibonacci(n):"];
    for longrope in [false, true] {
        let spec = terse::model::SyntheticSpec { longrope_original: small.longrope_original.filter(|_| longrope), ..small.clone() };
        let (gguf, hf) = (dir.join(format!("phi3-{longrope}.gguf")), dir.join(format!("phi3-{longrope}")));
        terse::model::write_random_gguf(&gguf, &spec, &tokenizer).unwrap();
        terse::model::convert_gguf_to_hf(&gguf, &hf, candle_core::DType::F32).unwrap();
        let ours = terse::model::load_hf_dir(&hf, "phi3-small", terse::model::SparseMode::Off).unwrap().0;
        let config = &ours.transformer.config;
        assert_eq!((config.arch, config.rotary_dim), (Arch::Phi3, 48));
        let prompts: Vec<Vec<u32>> = texts.iter().map(|text| ours.tokenizer.encode_prompt(text).unwrap()).collect();
        if longrope {
            assert!(config.rope_attn_factor > 1.0 && config.rope_freq_factors.is_some(), "LongRoPE read from config.json");
            let from_gguf = terse::model::load_gguf_dequantized(&gguf, "phi3-small").unwrap();
            assert_eq!(from_gguf.transformer.config.rope_freq_factors, config.rope_freq_factors);
            for prompt in &prompts {
                let inputs: Vec<u32> = (0..16).map(|i| 100 + i * 37).collect();
                for (a, b) in ours_alone(&ours, prompt, &inputs).iter().zip(ours_alone(&from_gguf, prompt, &inputs)) {
                    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                    assert!(diff < 1e-3, "the directory's logits differ from its GGUF's by {diff}");
                }
            }
        } else {
            let config: candle_transformers::models::phi3::Config = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
            let weights = [hf.join("model.safetensors")];
            // SAFETY: the file was just written and nothing changes it while mapped.
            let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&weights, candle_core::DType::F32, &Device::Cpu).unwrap() };
            let reference = Reference::Phi3Dense(candle_transformers::models::phi3::Model::new(&config, vb).unwrap());
            compare_prompts_with(reference, &ours, "phi3 directory", &prompts, GEMMA3_DIR_TOLERANCE);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Gemma 3's 4B and larger scale their global layers' rope linearly (×8):
/// the real 270m's file given that metadata converts to a directory whose
/// `rope_scaling` says so, and which computes what the file computes.
#[test]
fn a_linearly_scaled_gemma3_converts_with_its_scaling() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("terse-gemma3-linear");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (scaled, hf) = (dir.join("gemma3-linear.gguf"), dir.join("hf"));
    {
        let mut source = File::open(model_path("gemma-3-270m")).unwrap();
        let content = gguf_file::Content::read(&mut source).unwrap();
        let mut metadata: Vec<(String, gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        metadata.push(("gemma3.rope.scaling.type".into(), gguf_file::Value::String("linear".into())));
        metadata.push(("gemma3.rope.scaling.factor".into(), gguf_file::Value::F32(8.0)));
        let tensors: Vec<(String, candle_core::quantized::QTensor)> =
            content.tensor_infos.keys().map(|name| (name.clone(), content.tensor(&mut source, name, &Device::Cpu).unwrap())).collect();
        let mut out = std::io::BufWriter::new(File::create(&scaled).unwrap());
        let meta: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tens: Vec<(&str, &candle_core::quantized::QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut out, &meta, &tens).unwrap();
    }
    terse::model::convert_gguf_to_hf(&scaled, &hf, candle_core::DType::F32).unwrap();
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["rope_scaling"], serde_json::json!({"rope_type": "linear", "factor": 8.0}));
    let ours = terse::model::load_hf_dir(&hf, "gemma3-linear", terse::model::SparseMode::Off).unwrap().0;
    let file = terse::model::load_gguf_dequantized(&scaled, "gemma3-linear").unwrap();
    let plain = terse::model::load_gguf_dequantized(&model_path("gemma-3-270m"), "gemma-3-270m").unwrap();
    let prompt = ours.tokenizer.encode_prompt(&"The lighthouse keeper climbed the stairs each evening. ".repeat(12)).unwrap();
    let inputs: Vec<u32> = (0..4).map(|i| 1000 + 77 * i).collect();
    let (mut same, mut moved) = (0f32, 0f32);
    for ((a, b), c) in ours_alone(&ours, &prompt, &inputs).iter().zip(ours_alone(&file, &prompt, &inputs)).zip(ours_alone(&plain, &prompt, &inputs)) {
        same = same.max(a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max));
        moved = moved.max(a.iter().zip(&c).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max));
    }
    eprintln!("scaled gemma3: directory vs file within {same:e}; vs the unscaled file {moved:e}");
    assert!(same < 1e-3, "the directory differs from its file by {same}");
    assert!(moved > 100.0 * same.max(1e-4), "the scaling made too little difference ({moved})");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn qwen2_5_0_5b_matches_candle_transformers() {
    if terse::manifest::resolve_model("qwen2.5-0.5b").is_err() && std::env::var("TERSE_REQUIRE_QWEN").is_err() {
        eprintln!("qwen2.5-0.5b not fetched: comparison not run (set TERSE_REQUIRE_QWEN=1 to require it)");
        return;
    }
    compare_with_reference("qwen2.5-0.5b", QWEN_TOLERANCE);
}

/// Three sequences at different positions in one batch give the same bits as
/// alone, with the KV cache in f32 and in f16.
fn check_batch_invariance(name: &str) {
    let path = model_path(name);
    let mut model = load_gguf(&path, name).unwrap();
    for precision in [KvPrecision::F32, KvPrecision::F16] {
        model.transformer.set_kv_precision(precision);
        check_batch_invariance_of(name, &model);
    }
}

fn check_batch_invariance_of(name: &str, model: &LoadedModel) {
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|t| prompt_tokens(model, t)).collect();
    // Fixed continuation tokens (taken from the prompt itself) so no sampling is involved.
    let inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.iter().rev().take(12).copied().collect()).collect();
    let alone: Vec<Vec<Vec<f32>>> = prompts.iter().zip(&inputs).map(|(p, i)| ours_alone(model, p, i)).collect();

    // Sequence s joins at step 3 * s, so the batch mixes prefill and decode at
    // different positions; record each sequence's logits step by step.
    let mut caches: Vec<SeqKvCache> = (0..prompts.len()).map(|_| model.transformer.new_cache()).collect();
    let mut fed = vec![0usize; prompts.len()]; // steps taken per sequence
    let mut batched: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
    let mut max_batch = 0;
    for step in 0.. {
        let active: Vec<usize> = (0..prompts.len()).filter(|&s| step >= 3 * s && fed[s] <= inputs[s].len()).collect();
        if active.is_empty() {
            break;
        }
        max_batch = max_batch.max(active.len());
        let feeds: Vec<Vec<u32>> = active
            .iter()
            .map(|&s| if fed[s] == 0 { prompts[s].clone() } else { vec![inputs[s][fed[s] - 1]] })
            .collect();
        let mut chunks: Vec<SeqChunk> = Vec::new();
        for (cache_idx, cache) in caches.iter_mut().enumerate() {
            if let Some(k) = active.iter().position(|&s| s == cache_idx) {
                chunks.push(SeqChunk { tokens: &feeds[k], cache });
            }
        }
        let logits = model.transformer.forward(&mut chunks).unwrap().to_vec2::<f32>().unwrap();
        for (row, &s) in active.iter().enumerate() {
            batched[s].push(logits[row].clone());
            fed[s] += 1;
        }
    }
    assert_eq!(max_batch, prompts.len(), "the batch never held every sequence");
    for s in 0..prompts.len() {
        assert_eq!(alone[s].len(), batched[s].len());
        for (step, (a, b)) in alone[s].iter().zip(&batched[s]).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{name}: sequence {s} step {step}: batched logits differ from alone");
        }
    }
}

#[test]
fn smollm2_batching_keeps_bits() {
    check_batch_invariance("smollm2-135m");
}

/// An all-f32 file (as `convert_hf_to_gguf --outtype f32` writes them), on
/// terse's dense kernel: candle's f32 product blocks its sums by the batch,
/// which would change a sequence's logits with its neighbours. SmolLM2's
/// vocabulary, a small Llama of two layers.
#[test]
fn an_f32_file_keeps_batch_bits() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("terse-f32-batch");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-llama-f32.gguf");
    let spec = terse::model::SyntheticSpec {
        arch: terse::model::Arch::Llama,
        n_layer: 2,
        dtype: candle_core::quantized::GgmlDType::F32,
        seed: 11,
        ..terse::model::SyntheticSpec::tiny_qwen2(49_152)
    };
    terse::model::write_random_gguf(&path, &spec, &model_path("smollm2-135m")).unwrap();
    let model = load_gguf(&path, "tiny-llama-f32").unwrap();
    assert_eq!(model.info.dtype, "f32");
    check_batch_invariance_of("tiny-llama-f32", &model);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qwen2_5_0_5b_batching_keeps_bits() {
    if terse::manifest::resolve_model("qwen2.5-0.5b").is_err() && std::env::var("TERSE_REQUIRE_QWEN").is_err() {
        eprintln!("qwen2.5-0.5b not fetched: batching check not run");
        return;
    }
    check_batch_invariance("qwen2.5-0.5b");
}

/// The f16 KV cache: half the bytes, and logits close to the f32 cache's on
/// the same tokens (the f32 run's own greedy continuation), the greedy token
/// the same wherever the f32 run's top two are apart. Keys and values rounded
/// to f16 move the attention outputs by float noise, but the next matmul
/// quantizes its input to 8 bits, where noise can flip a rounding step: the
/// effect that makes candle-transformers disagree with itself by 1.1 above.
/// Measured worst here: 2.55, on logits that span 40–50; the greedy token
/// agreed at all 17 steps whose top two were more than 3 apart.
#[test]
fn smollm2_f16_kv_cache_halves_the_cache_and_keeps_the_logits_close() {
    const TOLERANCE: f32 = 3.0;
    let path = model_path("smollm2-135m");
    let mut model = load_gguf(&path, "smollm2-135m").unwrap();
    let (mut worst, mut greedy_checked) = (0f32, 0);
    for text in PROMPTS {
        let prompt = prompt_tokens(&model, text);
        model.transformer.set_kv_precision(KvPrecision::F32);
        let mut inputs = Vec::new();
        for _ in 0..24 {
            let logits = ours_alone(&model, &prompt, &inputs);
            inputs.push(argmax(logits.last().unwrap()));
        }
        let full = ours_alone(&model, &prompt, &inputs);
        model.transformer.set_kv_precision(KvPrecision::F16);
        let half = ours_alone(&model, &prompt, &inputs);
        for (step, (a, b)) in half.iter().zip(&full).enumerate() {
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            worst = worst.max(diff);
            assert!(diff <= TOLERANCE, "{text:?} step {step}: f16 cache moves a logit by {diff}");
            if top_two_gap(b) > TOLERANCE {
                greedy_checked += 1;
                assert_eq!(argmax(a), argmax(b), "{text:?} step {step}: greedy tokens differ");
            }
        }
    }
    eprintln!("f16 KV cache: max logit difference {worst:e}; greedy compared at {greedy_checked} steps");
    assert!(greedy_checked >= 12, "too few decisive steps to compare greedy tokens");

    let prompt = prompt_tokens(&model, PROMPTS[0]);
    let mut bytes = Vec::new();
    for precision in [KvPrecision::F32, KvPrecision::F16] {
        model.transformer.set_kv_precision(precision);
        let mut cache = model.transformer.new_cache();
        model.transformer.forward(&mut [SeqChunk { tokens: &prompt, cache: &mut cache }]).unwrap();
        bytes.push(cache.allocated_bytes());
    }
    let (f32_bytes, f16_bytes) = (bytes[0], bytes[1]);
    assert!(f16_bytes > 0 && f16_bytes * 2 == f32_bytes, "f16 cache {f16_bytes} bytes, f32 {f32_bytes}");
}

/// The logits of every position of a prompt's chunk (`Rows::All`, for
/// verifying drafted or probed tokens) have the bits of each prefix's own
/// last position on the quantized kernels: a row depends on nothing beside it.
#[test]
fn every_position_of_a_chunk_has_its_prefixs_bits() {
    let model = load_gguf(&model_path("smollm2-135m"), "smollm2-135m").unwrap();
    let prompt = prompt_tokens(&model, PROMPTS[0]);
    let mut cache = model.transformer.new_cache();
    let all = model.transformer.forward_rows(&mut [SeqChunk { tokens: &prompt, cache: &mut cache }], Rows::All).unwrap();
    let all = all.to_vec2::<f32>().unwrap();
    assert_eq!(all.len(), prompt.len());
    for end in 1..=prompt.len() {
        let mut cache = model.transformer.new_cache();
        let last = model.transformer.forward(&mut [SeqChunk { tokens: &prompt[..end], cache: &mut cache }]).unwrap();
        assert_eq!(all[end - 1], last.to_vec2::<f32>().unwrap()[0], "position {}", end - 1);
    }
}

/// Gemma 3 on the tensor path (every model on a GPU) computes what the host
/// path computes, windows included: the file's weights dequantized to f32 on
/// both, so only the attention code differs; two sequences in one batch,
/// one prefilled in chunks past the 512-position window, then decoding.
#[test]
fn gemma3_on_the_tensor_path_computes_what_the_host_path_computes() {
    let path = model_path("gemma-3-270m");
    let host = terse::model::load_gguf_dequantized(&path, "gemma-3-270m").unwrap();
    let long = "The history of the city goes back to the Romans, who built a bridge over the river.".repeat(36);
    let prompts = [host.tokenizer.encode_prompt(&long).unwrap(), host.tokenizer.encode_prompt("The capital of France is").unwrap()];
    assert!(prompts[0].len() > 640);
    tensor_path_computes_what_the_host_path_computes(host, &prompts);
}

/// Phi-4-mini's layout at a small size, in f32, for SmolLM2's vocabulary:
/// hidden 256, 4 / 2 heads of 64 of which 48 rotate, LongRoPE from 4,096
/// to 8,192 positions.
fn small_phi4(seed: u64) -> terse::model::SyntheticSpec {
    terse::model::SyntheticSpec {
        n_layer: 2,
        hidden: 256,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 64,
        rotary_dim: Some(48),
        ffn_hidden: 512,
        vocab_size: 49_152,
        context_length: 8192,
        dtype: candle_core::quantized::GgmlDType::F32,
        seed,
        ..terse::model::SyntheticSpec::phi4_mini(2)
    }
}

/// The same for Phi-4-mini's rotation of part of each head, with LongRoPE's
/// long factors and attention factor, on a small model of its layout.
#[test]
fn phi4_rotation_on_the_tensor_path_computes_what_the_host_path_computes() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("terse-phi4-small");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("phi4-small.gguf");
    let spec = small_phi4(3);
    terse::model::write_random_gguf(&path, &spec, &model_path("smollm2-135m")).unwrap();
    let host = terse::model::load_gguf_dequantized(&path, "phi4-small").unwrap();
    assert_eq!(host.transformer.config.rotary_dim, 48);
    assert!(host.transformer.config.rope_attn_factor > 1.0);
    let long = "The history of the city goes back to the Romans, who built a bridge over the river.".repeat(20);
    let prompts = [host.tokenizer.encode_prompt(&long).unwrap(), host.tokenizer.encode_prompt("The capital of France is").unwrap()];
    tensor_path_computes_what_the_host_path_computes(host, &prompts);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The file's weights dequantized to f32 on both paths, so only the
/// attention code differs; two sequences in one batch, the first prefilled
/// in chunks of 256, then both decoding.
fn tensor_path_computes_what_the_host_path_computes(host: LoadedModel, prompts: &[Vec<u32>; 2]) {
    assert!(host.transformer.runs_on_host());
    let run = |model: &terse::model::Transformer| -> Vec<Vec<f32>> {
        let mut caches: Vec<SeqKvCache> = prompts.iter().map(|_| model.new_cache()).collect();
        // The long prompt in chunks of 256 beside the short one's whole prompt, then both decode.
        let mut fed = [0usize, 0];
        let mut out = Vec::new();
        let mut next = [0u32; 2];
        for _ in 0..8 {
            let feeds: Vec<Vec<u32>> = (0..2)
                .map(|s| if fed[s] < prompts[s].len() { prompts[s][fed[s]..(fed[s] + 256).min(prompts[s].len())].to_vec() } else { vec![next[s]] })
                .collect();
            let (a, b) = caches.split_at_mut(1);
            let mut chunks = [SeqChunk { tokens: &feeds[0], cache: &mut a[0] }, SeqChunk { tokens: &feeds[1], cache: &mut b[0] }];
            let logits = model.forward(&mut chunks).unwrap().to_vec2::<f32>().unwrap();
            for s in 0..2 {
                fed[s] += feeds[s].len();
                next[s] = argmax(&logits[s]);
            }
            out.extend(logits);
        }
        out
    };
    let on_host = run(&host.transformer);
    let tensor = host.transformer.into_tensor_path().unwrap();
    let on_tensors = run(&tensor);
    for (i, (a, b)) in on_host.iter().zip(&on_tensors).enumerate() {
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-2, "row {i}: logits differ by {diff}");
    }
}

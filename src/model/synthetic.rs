//! Checkpoints with random weights and real shapes: GGUF files a test (or a
//! benchmark on a machine no model can reach) writes itself. The tokenizer and
//! chat template are copied from a real GGUF's header, or made from a real
//! Hugging Face `tokenizer.json` (byte-level BPE, as Qwen's), so prompts,
//! think tokens and templates are the real model's; only the weights are noise.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Arch;

/// The shapes and storage type of a synthetic checkpoint.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    pub arch: Arch,
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    /// Per head; `hidden / n_head` unless the family says otherwise (Qwen3).
    pub head_dim: usize,
    pub ffn_hidden: usize,
    /// Embedding rows; at least the tokenizer's vocabulary.
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    /// The embedding table doubles as the output head (no `output.weight`).
    pub tied_head: bool,
    /// Llama 3's rope scaling (factor, low and high frequency factors, the
    /// original context), written as the `rope_freqs` tensor llama.cpp reads.
    pub llama3_rope: Option<[f32; 4]>,
    /// How many of each head's values rotate, where not all (Phi-4-mini's 96 of 128).
    pub rotary_dim: Option<usize>,
    /// LongRoPE: the context the model was trained at before its rope was
    /// stretched to `context_length`. The file gets random short and long
    /// factor sets (`rope_factors_short` / `_long`, as llama.cpp reads them),
    /// growing towards the low frequencies as real ones do.
    pub longrope_original: Option<usize>,
    /// Storage type of the projection matrices (the embedding is stored the same way).
    pub dtype: GgmlDType,
    /// Where given, the type of `attn_v`, `ffn_down` and the head instead (every
    /// other layer's), as llama.cpp's Q4_K_M keeps some matrices in Q6_K.
    pub sensitive_dtype: Option<GgmlDType>,
    pub seed: u64,
}

impl SyntheticSpec {
    /// A tiny qwen2 model: fast enough for mechanism tests on any vocabulary.
    pub fn tiny_qwen2(vocab_size: usize) -> Self {
        SyntheticSpec {
            arch: Arch::Qwen2,
            n_layer: 2,
            hidden: 64,
            n_head: 4,
            n_kv_head: 2,
            head_dim: 16,
            ffn_hidden: 128,
            vocab_size,
            context_length: 4096,
            rope_theta: 10_000.0,
            tied_head: true,
            llama3_rope: None,
            rotary_dim: None,
            longrope_original: None,
            dtype: GgmlDType::F32,
            sensitive_dtype: None,
            seed: 0,
        }
    }

    /// The exact shapes of DeepSeek-R1-Distill-Qwen-1.5B: Qwen2.5-1.5B's, but
    /// with an output head of its own (1.78 B parameters).
    pub fn r1_distill_qwen_1_5b() -> Self {
        SyntheticSpec {
            arch: Arch::Qwen2,
            n_layer: 28,
            hidden: 1536,
            n_head: 12,
            n_kv_head: 2,
            head_dim: 128,
            ffn_hidden: 8960,
            vocab_size: 151_936,
            context_length: 131_072,
            rope_theta: 10_000.0,
            tied_head: false,
            llama3_rope: None,
            rotary_dim: None,
            longrope_original: None,
            dtype: GgmlDType::Q4K,
            sensitive_dtype: None,
            seed: 0,
        }
    }

    /// Qwen3's shapes at `n_layer` layers (0.6B: 28): hidden 1024, 16 / 8
    /// heads of 128 (not hidden / heads), FFN 3072, a tied head, rope θ 1e6.
    pub fn qwen3_0_6b(n_layer: usize) -> Self {
        SyntheticSpec {
            arch: Arch::Qwen3,
            n_layer,
            hidden: 1024,
            n_head: 16,
            n_kv_head: 8,
            head_dim: 128,
            ffn_hidden: 3072,
            vocab_size: 151_936,
            context_length: 40_960,
            rope_theta: 1_000_000.0,
            tied_head: true,
            llama3_rope: None,
            rotary_dim: None,
            longrope_original: None,
            dtype: GgmlDType::Q8_0,
            sensitive_dtype: None,
            seed: 0,
        }
    }

    /// Llama-3.2-1B's shapes at `n_layer` layers (its own: 16): hidden 2048,
    /// 32 / 8 heads of 64, FFN 8192, a tied head, rope θ 500,000 with Llama 3
    /// scaling (factor 32, low 1, high 4, original context 8,192).
    pub fn llama_3_2_1b(n_layer: usize) -> Self {
        SyntheticSpec {
            arch: Arch::Llama,
            n_layer,
            hidden: 2048,
            n_head: 32,
            n_kv_head: 8,
            head_dim: 64,
            ffn_hidden: 8192,
            // Llama 3's own is 128,256; the rows fit the tokenizer a test
            // gives it (Qwen3's, 151,669 tokens).
            vocab_size: 151_936,
            context_length: 131_072,
            rope_theta: 500_000.0,
            tied_head: true,
            llama3_rope: Some([32.0, 1.0, 4.0, 8192.0]),
            rotary_dim: None,
            longrope_original: None,
            dtype: GgmlDType::Q8_0,
            sensitive_dtype: None,
            seed: 0,
        }
    }

    /// Qwen3-1.7B's shapes: hidden 2048, 16 / 8 heads of 128, FFN 6144, 28 layers, a tied head.
    pub fn qwen3_1_7b() -> Self {
        SyntheticSpec { hidden: 2048, ffn_hidden: 6144, ..Self::qwen3_0_6b(28) }
    }

    /// Phi-3-mini-4k's shapes at `n_layer` layers (its own: 32): hidden
    /// 3072, 32 heads of 96 (no grouping), FFN 8192, every value of a head
    /// rotating at base 10,000, an output head of its own, 4,096 positions.
    pub fn phi3_mini_4k(n_layer: usize) -> Self {
        SyntheticSpec {
            arch: Arch::Phi3,
            n_layer,
            hidden: 3072,
            n_head: 32,
            n_kv_head: 32,
            head_dim: 96,
            ffn_hidden: 8192,
            // Phi-3's own is 32,064; the rows fit the tokenizer a test gives
            // it (Qwen3's, 151,669 tokens).
            vocab_size: 151_936,
            context_length: 4096,
            rope_theta: 10_000.0,
            tied_head: false,
            llama3_rope: None,
            rotary_dim: None,
            longrope_original: None,
            dtype: GgmlDType::Q8_0,
            sensitive_dtype: None,
            seed: 0,
        }
    }

    /// Phi-4-mini's shapes at `n_layer` layers (its own: 32): hidden 3072,
    /// 24 / 8 heads of 128 of which 96 rotate, FFN 8192, a tied head, and
    /// LongRoPE stretching 4,096 positions to 131,072.
    pub fn phi4_mini(n_layer: usize) -> Self {
        SyntheticSpec {
            n_head: 24,
            n_kv_head: 8,
            head_dim: 128,
            vocab_size: 200_064,
            context_length: 131_072,
            tied_head: true,
            rotary_dim: Some(96),
            longrope_original: Some(4096),
            ..Self::phi3_mini_4k(n_layer)
        }
    }
}

/// Uniform noise with standard deviation `std` (uniform on ±std·√3), reproducible from the seed.
fn noise(rng: &mut ChaCha8Rng, shape: (usize, usize), std: f32) -> Result<Tensor> {
    let half_width = std * 3f32.sqrt();
    let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-half_width..half_width)).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// The `tokenizer.*` keys of the GGUF at `path`.
fn gguf_tokenizer_metadata(path: &Path) -> Result<Vec<(String, gguf_file::Value)>> {
    let mut source = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let header = gguf_file::Content::read(&mut source).map_err(|e| anyhow::anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
    let mut keys: Vec<(String, gguf_file::Value)> = header.metadata.into_iter().filter(|(k, _)| k.starts_with("tokenizer.")).collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys)
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// GGUF `tokenizer.*` keys made from a Hugging Face byte-level BPE tokenizer
/// (`tokenizer.json`, with `tokenizer_config.json` beside it for the special
/// tokens and the chat template), its token list padded to `rows` entries as
/// llama.cpp pads it to the embedding's rows. `pre` names llama.cpp's
/// pre-tokenizer (`qwen2`, `llama-bpe`, ...).
pub fn hf_tokenizer_metadata(tokenizer_json: &Path, rows: usize, pre: &str) -> Result<Vec<(String, gguf_file::Value)>> {
    use gguf_file::Value;
    let read = |path: &Path| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    };
    let tokenizer = read(tokenizer_json)?;
    let config = read(&tokenizer_json.with_file_name("tokenizer_config.json"))?;
    let model = &tokenizer["model"];
    if model["type"] != "BPE" {
        anyhow::bail!("{}: only BPE tokenizers can be written as GGUF metadata here, not {}", tokenizer_json.display(), model["type"]);
    }
    let vocab = model["vocab"].as_object().context("tokenizer.json has no model.vocab")?;
    let added = tokenizer["added_tokens"].as_array().cloned().unwrap_or_default();
    let highest = vocab.values().chain(added.iter().map(|t| &t["id"])).filter_map(|v| v.as_u64()).max().unwrap_or(0) as usize;
    let size = rows.max(highest + 1);
    let mut tokens: Vec<Option<String>> = vec![None; size];
    let mut types = vec![NORMAL; size];
    for (text, id) in vocab {
        tokens[id.as_u64().context("a vocabulary id is not a number")? as usize] = Some(text.clone());
    }
    for t in &added {
        let id = t["id"].as_u64().context("an added token has no id")? as usize;
        tokens[id] = t["content"].as_str().map(str::to_string);
        types[id] = if t["special"].as_bool().unwrap_or(false) { CONTROL } else { USER_DEFINED };
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[id] = UNUSED;
                format!("[PAD{id}]")
            }))
        })
        .collect();
    // Merges are "a b" strings (older files) or [a, b] pairs.
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .context("tokenizer.json has no model.merges")?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::String(s.clone())),
            serde_json::Value::Array(pair) if pair.len() == 2 => Ok(Value::String(format!("{} {}", pair[0].as_str().unwrap_or(""), pair[1].as_str().unwrap_or("")))),
            other => anyhow::bail!("a merge of tokenizer.json is neither a string nor a pair: {other}"),
        })
        .collect::<Result<_>>()?;
    let id_of = |key: &str| -> Option<u32> {
        let text = match &config[key] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
            _ => return None,
        };
        added.iter().find(|t| t["content"] == text.as_str()).and_then(|t| t["id"].as_u64()).or_else(|| vocab.get(&text)?.as_u64()).map(|id| id as u32)
    };
    let mut metadata = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(config["add_bos_token"].as_bool().unwrap_or(false))),
    ];
    for (key, name) in [("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding")] {
        if let Some(id) = id_of(key) {
            metadata.push((format!("tokenizer.ggml.{name}_token_id"), Value::U32(id)));
        }
    }
    if let Some(template) = config["chat_template"].as_str() {
        metadata.push(("tokenizer.chat_template".to_string(), Value::String(template.to_string())));
    }
    Ok(metadata)
}

/// The tokenizer a synthetic checkpoint gets: a GGUF's, or a Hugging Face
/// `tokenizer.json`'s (the file, or a directory holding it).
fn tokenizer_metadata(from: &Path, spec: &SyntheticSpec) -> Result<Vec<(String, gguf_file::Value)>> {
    let json = if from.is_dir() { from.join("tokenizer.json") } else { from.to_path_buf() };
    if json.extension().is_some_and(|e| e == "json") {
        let pre = match spec.arch {
            Arch::Qwen2 | Arch::Qwen3 => "qwen2",
            // Phi-4's (o200k) split, which its GGUFs name so.
            Arch::Phi3 => "gpt-4o",
            _ => "llama-bpe",
        };
        hf_tokenizer_metadata(&json, spec.vocab_size, pre)
    } else {
        gguf_tokenizer_metadata(from)
    }
}

/// Write a random-weight checkpoint with `spec`'s shapes to `out`, with the
/// tokenizer and chat template of `tokenizer_from`: a GGUF (every
/// `tokenizer.*` key is copied) or a Hugging Face `tokenizer.json`.
pub fn write_random_gguf(out: &Path, spec: &SyntheticSpec, tokenizer_from: &Path) -> Result<()> {
    if spec.arch == Arch::Gemma3 {
        anyhow::bail!("synthetic gemma3 checkpoints are not written yet (its real 270m file is fetched instead)");
    }
    let arch = spec.arch.name();
    let key = |k: &str| format!("{arch}.{k}");
    let mut metadata: Vec<(String, gguf_file::Value)> = vec![
        ("general.architecture".into(), gguf_file::Value::String(arch.into())),
        ("general.name".into(), gguf_file::Value::String("terse synthetic (random weights)".into())),
        (key("block_count"), gguf_file::Value::U32(spec.n_layer as u32)),
        (key("context_length"), gguf_file::Value::U32(spec.context_length as u32)),
        (key("embedding_length"), gguf_file::Value::U32(spec.hidden as u32)),
        (key("feed_forward_length"), gguf_file::Value::U32(spec.ffn_hidden as u32)),
        (key("attention.head_count"), gguf_file::Value::U32(spec.n_head as u32)),
        (key("attention.head_count_kv"), gguf_file::Value::U32(spec.n_kv_head as u32)),
        (key("attention.layer_norm_rms_epsilon"), gguf_file::Value::F32(1e-6)),
        (key("rope.freq_base"), gguf_file::Value::F32(spec.rope_theta)),
        (key("vocab_size"), gguf_file::Value::U32(spec.vocab_size as u32)),
    ];
    let rotary_dim = spec.rotary_dim.unwrap_or(spec.head_dim);
    if spec.arch == Arch::Phi3 {
        // As llama.cpp writes Phi-3: the rotated share of a head, no head size
        // (a reader takes hidden / heads).
        if spec.head_dim * spec.n_head != spec.hidden {
            anyhow::bail!("a phi3 head is hidden / heads ({} / {}), not {}", spec.hidden, spec.n_head, spec.head_dim);
        }
    } else {
        metadata.push((key("attention.key_length"), gguf_file::Value::U32(spec.head_dim as u32)));
        metadata.push((key("attention.value_length"), gguf_file::Value::U32(spec.head_dim as u32)));
    }
    if spec.arch == Arch::Phi3 || spec.rotary_dim.is_some() {
        metadata.push((key("rope.dimension_count"), gguf_file::Value::U32(rotary_dim as u32)));
    }
    if let Some(original) = spec.longrope_original {
        // As llama.cpp's converter writes it.
        let (_, attn_factor) = super::config::longrope(spec.context_length, original);
        metadata.push((key("rope.scaling.original_context_length"), gguf_file::Value::U32(original as u32)));
        metadata.push((key("rope.scaling.attn_factor"), gguf_file::Value::F32(attn_factor as f32)));
    }
    metadata.extend(tokenizer_metadata(tokenizer_from, spec)?);

    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let (q_width, kv_width) = (spec.n_head * spec.head_dim, spec.n_kv_head * spec.head_dim);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let typed = |rng: &mut ChaCha8Rng, rows: usize, cols: usize, dtype: GgmlDType| -> Result<QTensor> {
        // Scaled so activations keep their size through the layers.
        let t = noise(rng, (rows, cols), 1.0 / (cols as f32).sqrt())?;
        Ok(QTensor::quantize(&t, dtype)?)
    };
    let matrix = |rng: &mut ChaCha8Rng, rows: usize, cols: usize| typed(rng, rows, cols, spec.dtype);
    // Every other layer's sensitive matrices in the other type, where the spec names one.
    let sensitive = |layer: usize| spec.sensitive_dtype.filter(|_| layer.is_multiple_of(2)).unwrap_or(spec.dtype);
    let vector = |values: Tensor| -> Result<QTensor> { Ok(QTensor::quantize(&values, GgmlDType::F32)?) };
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu);

    // Small enough that the tied head gives a nearly flat next-token distribution.
    let embedding = noise(&mut rng, (spec.vocab_size, spec.hidden), 0.1)?;
    tensors.push(("token_embd.weight".into(), QTensor::quantize(&embedding, spec.dtype)?));
    for i in 0..spec.n_layer {
        let p = format!("blk.{i}");
        tensors.push((format!("{p}.attn_norm.weight"), vector(ones(spec.hidden)?)?));
        if spec.arch == Arch::Phi3 {
            // q, k and v in one matrix, as Phi-3 keeps them.
            tensors.push((format!("{p}.attn_qkv.weight"), matrix(&mut rng, q_width + 2 * kv_width, spec.hidden)?));
        } else {
            tensors.push((format!("{p}.attn_q.weight"), matrix(&mut rng, q_width, spec.hidden)?));
            tensors.push((format!("{p}.attn_k.weight"), matrix(&mut rng, kv_width, spec.hidden)?));
            tensors.push((format!("{p}.attn_v.weight"), typed(&mut rng, kv_width, spec.hidden, sensitive(i))?));
        }
        if spec.arch == Arch::Qwen2 {
            for (name, width) in [("attn_q", q_width), ("attn_k", kv_width), ("attn_v", kv_width)] {
                let bias = noise(&mut rng, (1, width), 0.1)?.flatten_all()?;
                tensors.push((format!("{p}.{name}.bias"), vector(bias)?));
            }
        }
        if spec.arch.norms_q_and_k() {
            // Around 1, so each head's norm matters.
            for name in ["attn_q_norm", "attn_k_norm"] {
                let weight = (noise(&mut rng, (1, spec.head_dim), 0.2)?.flatten_all()? + 1.0)?;
                tensors.push((format!("{p}.{name}.weight"), vector(weight)?));
            }
        }
        tensors.push((format!("{p}.attn_output.weight"), matrix(&mut rng, spec.hidden, q_width)?));
        tensors.push((format!("{p}.ffn_norm.weight"), vector(ones(spec.hidden)?)?));
        if spec.arch == Arch::Phi3 {
            // Gate rows first, then up rows, in one matrix.
            tensors.push((format!("{p}.ffn_up.weight"), matrix(&mut rng, 2 * spec.ffn_hidden, spec.hidden)?));
        } else {
            tensors.push((format!("{p}.ffn_gate.weight"), matrix(&mut rng, spec.ffn_hidden, spec.hidden)?));
            tensors.push((format!("{p}.ffn_up.weight"), matrix(&mut rng, spec.ffn_hidden, spec.hidden)?));
        }
        tensors.push((format!("{p}.ffn_down.weight"), typed(&mut rng, spec.hidden, spec.ffn_hidden, sensitive(i))?));
    }
    if let Some([factor, low, high, original]) = spec.llama3_rope {
        let factors = super::config::llama3_freq_factors(spec.rope_theta, rotary_dim, [factor, low, high, original]);
        tensors.push(("rope_freqs.weight".into(), vector(Tensor::new(factors.as_slice(), &Device::Cpu)?)?));
    }
    if spec.longrope_original.is_some() {
        // Factor i divides frequency i: 1 at the highest frequency, growing
        // towards the lowest (to about 1.5 short, 12 long), with noise.
        let half = rotary_dim / 2;
        for (name, top) in [("rope_factors_short.weight", 1.5f32), ("rope_factors_long.weight", 12.0)] {
            let factors: Vec<f32> = (0..half)
                .map(|i| {
                    let at = i as f32 / (half - 1).max(1) as f32;
                    1.0 + (top - 1.0) * at * at * rng.random_range(0.8..1.0)
                })
                .collect();
            tensors.push((name.into(), vector(Tensor::new(factors.as_slice(), &Device::Cpu)?)?));
        }
    }
    tensors.push(("output_norm.weight".into(), vector(ones(spec.hidden)?)?));
    if !spec.tied_head {
        // The embedding's scale, so that an untied head's logits spread as a
        // tied one's do (at 1/√hidden the top two are rarely a unit apart).
        let head = noise(&mut rng, (spec.vocab_size, spec.hidden), 0.1)?;
        tensors.push(("output.weight".into(), QTensor::quantize(&head, spec.sensitive_dtype.unwrap_or(spec.dtype))?));
    }
    write_atomically(out, &metadata, &tensors)
}

/// A GGUF with no tensors: only the tokenizer and chat template of the GGUF at
/// `tokenizer_from` (a few MB). It carries a real tokenizer to a machine that
/// has no model, where `write_random_gguf` can then take it from.
pub fn write_tokenizer_gguf(out: &Path, tokenizer_from: &Path) -> Result<()> {
    let mut source = File::open(tokenizer_from).with_context(|| format!("opening {}", tokenizer_from.display()))?;
    let header = gguf_file::Content::read(&mut source)
        .map_err(|e| anyhow::anyhow!("{} is not a readable GGUF file: {e}", tokenizer_from.display()))?;
    let mut metadata: Vec<(String, gguf_file::Value)> =
        header.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.") || *k == "general.architecture").map(|(k, v)| (k.clone(), v.clone())).collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    write_atomically(out, &metadata, &[])
}

/// Write under a temporary name, so a failed run leaves nothing that looks finished.
fn write_atomically(out: &Path, metadata: &[(String, gguf_file::Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    let partial = out.with_extension("partial");
    {
        let mut writer = BufWriter::new(File::create(&partial).with_context(|| format!("creating {}", partial.display()))?);
        let meta: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tens: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut writer, &meta, &tens).with_context(|| format!("writing {}", partial.display()))?;
        std::io::Write::flush(&mut writer)?;
    }
    std::fs::rename(&partial, out).with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    Ok(())
}

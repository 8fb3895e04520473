//! Checkpoints with random weights and real shapes: GGUF files a test (or a
//! benchmark on a machine no model can reach) writes itself. The tokenizer and
//! chat template are copied from a real GGUF's header, so prompts, think
//! tokens and templates are the real model's; only the weights are noise.

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
    pub ffn_hidden: usize,
    /// Embedding rows; at least the tokenizer's vocabulary.
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    /// The embedding table doubles as the output head (no `output.weight`).
    pub tied_head: bool,
    /// Storage type of the projection matrices (the embedding is stored the same way).
    pub dtype: GgmlDType,
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
            ffn_hidden: 128,
            vocab_size,
            context_length: 4096,
            rope_theta: 10_000.0,
            tied_head: true,
            dtype: GgmlDType::F32,
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
            ffn_hidden: 8960,
            vocab_size: 151_936,
            context_length: 131_072,
            rope_theta: 10_000.0,
            tied_head: false,
            dtype: GgmlDType::Q4K,
            seed: 0,
        }
    }
}

/// Uniform noise with standard deviation `std` (uniform on ±std·√3), reproducible from the seed.
fn noise(rng: &mut ChaCha8Rng, shape: (usize, usize), std: f32) -> Result<Tensor> {
    let half_width = std * 3f32.sqrt();
    let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-half_width..half_width)).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Write a random-weight checkpoint with `spec`'s shapes to `out`, with the
/// tokenizer and chat template (every `tokenizer.*` key) of the GGUF at `tokenizer_from`.
pub fn write_random_gguf(out: &Path, spec: &SyntheticSpec, tokenizer_from: &Path) -> Result<()> {
    let mut source = File::open(tokenizer_from).with_context(|| format!("opening {}", tokenizer_from.display()))?;
    let header = gguf_file::Content::read(&mut source)
        .map_err(|e| anyhow::anyhow!("{} is not a readable GGUF file: {e}", tokenizer_from.display()))?;
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
    let mut tokenizer_keys: Vec<_> = header.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")).collect();
    tokenizer_keys.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in tokenizer_keys {
        metadata.push((k.clone(), v.clone()));
    }

    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let head_dim = spec.hidden / spec.n_head;
    let kv_width = spec.n_kv_head * head_dim;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let matrix = |rng: &mut ChaCha8Rng, rows: usize, cols: usize| -> Result<QTensor> {
        // Scaled so activations keep their size through the layers.
        let t = noise(rng, (rows, cols), 1.0 / (cols as f32).sqrt())?;
        Ok(QTensor::quantize(&t, spec.dtype)?)
    };
    let vector = |values: Tensor| -> Result<QTensor> { Ok(QTensor::quantize(&values, GgmlDType::F32)?) };
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu);

    // Small enough that the tied head gives a nearly flat next-token distribution.
    let embedding = noise(&mut rng, (spec.vocab_size, spec.hidden), 0.1)?;
    tensors.push(("token_embd.weight".into(), QTensor::quantize(&embedding, spec.dtype)?));
    for i in 0..spec.n_layer {
        let p = format!("blk.{i}");
        tensors.push((format!("{p}.attn_norm.weight"), vector(ones(spec.hidden)?)?));
        tensors.push((format!("{p}.attn_q.weight"), matrix(&mut rng, spec.hidden, spec.hidden)?));
        tensors.push((format!("{p}.attn_k.weight"), matrix(&mut rng, kv_width, spec.hidden)?));
        tensors.push((format!("{p}.attn_v.weight"), matrix(&mut rng, kv_width, spec.hidden)?));
        if spec.arch == Arch::Qwen2 {
            for (name, width) in [("attn_q", spec.hidden), ("attn_k", kv_width), ("attn_v", kv_width)] {
                let bias = noise(&mut rng, (1, width), 0.1)?.flatten_all()?;
                tensors.push((format!("{p}.{name}.bias"), vector(bias)?));
            }
        }
        tensors.push((format!("{p}.attn_output.weight"), matrix(&mut rng, spec.hidden, spec.hidden)?));
        tensors.push((format!("{p}.ffn_norm.weight"), vector(ones(spec.hidden)?)?));
        tensors.push((format!("{p}.ffn_gate.weight"), matrix(&mut rng, spec.ffn_hidden, spec.hidden)?));
        tensors.push((format!("{p}.ffn_up.weight"), matrix(&mut rng, spec.ffn_hidden, spec.hidden)?));
        tensors.push((format!("{p}.ffn_down.weight"), matrix(&mut rng, spec.hidden, spec.ffn_hidden)?));
    }
    tensors.push(("output_norm.weight".into(), vector(ones(spec.hidden)?)?));
    if !spec.tied_head {
        tensors.push(("output.weight".into(), matrix(&mut rng, spec.vocab_size, spec.hidden)?));
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

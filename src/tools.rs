//! Model tools of the `terse` command line: convert, prune, inspect.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::{Args, ValueEnum};
use terse::manifest::resolve_model;
use terse::model::{convert_gguf_to_hf, load_gguf, load_hf_dir, prune_hf_dir, SparseMode};

#[derive(Clone, Copy, ValueEnum)]
pub enum WeightType {
    F32,
    Bf16,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// The GGUF file (or a manifest name) to convert.
    model: String,
    /// The Hugging Face directory to write.
    #[arg(long)]
    out: PathBuf,
    /// The type the dequantized weights are stored in.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightType,
}

/// One-shot magnitude pruning to the 2:4 pattern. Magnitude pruning is a
/// baseline: without a learned mask (such as ProxSparse's) it loses quality.
/// The server runs any 2:4 checkpoint, learned or not.
#[derive(Args)]
pub struct PruneArgs {
    /// The Hugging Face directory to prune.
    model: PathBuf,
    /// The directory to write.
    #[arg(long)]
    out: PathBuf,
    /// The sparsity pattern; only 2:4 (two non-zeros in every four inputs).
    #[arg(long, default_value = "2:4")]
    pattern: String,
}

#[derive(Args)]
pub struct InspectArgs {
    /// A manifest name, a GGUF file or a Hugging Face directory.
    model: String,
}

pub fn convert(args: ConvertArgs) -> Result<()> {
    let model = resolve_model(&args.model)?;
    if model.path.is_dir() {
        bail!("{} is already a Hugging Face directory", model.path.display());
    }
    let dtype = match args.dtype {
        WeightType::F32 => DType::F32,
        WeightType::Bf16 => DType::BF16,
    };
    convert_gguf_to_hf(&model.path, &args.out, dtype)?;
    println!("{}", args.out.display());
    Ok(())
}

pub fn prune(args: PruneArgs) -> Result<()> {
    if args.pattern != "2:4" {
        bail!("unsupported pattern `{}`: terse prunes to 2:4", args.pattern);
    }
    let pruned = prune_hf_dir(&args.model, &args.out)?;
    eprintln!("pruned {pruned} projection matrices to 2:4 by magnitude");
    println!("{}", args.out.display());
    Ok(())
}

pub fn inspect(args: InspectArgs) -> Result<()> {
    let model = resolve_model(&args.model)?;
    let name = model.served_name.clone();
    if model.path.is_dir() {
        let (loaded, report) = load_hf_dir(&model.path, &name, SparseMode::Auto)?;
        print_common(&loaded.info, &loaded.transformer.config);
        println!("projections: {} of {} stored 2:4-compressed", report.projections.iter().filter(|p| p.2).count(), report.projections.len());
        println!("projection bytes: {} dense, {} as stored", report.dense_bytes, report.stored_bytes);
        if report.sparse_fraction() > 0.0 {
            println!("on a GPU (--device cuda) every projection runs dense, in bf16: the 2:4 kernels are CPU-only for now");
        }
        println!("{:<52} {:>8}  stored", "tensor", "zeros");
        for (tensor, zeros, sparse) in &report.projections {
            println!("{tensor:<52} {:>7.1}%  {}", zeros * 100.0, if *sparse { "2:4" } else { "dense" });
        }
    } else {
        let loaded = load_gguf(&model.path, &name)?;
        print_common(&loaded.info, &loaded.transformer.config);
        println!("sparsity: GGUF weights are quantized and run dense");
    }
    Ok(())
}

fn print_common(info: &terse::model::ModelInfo, config: &terse::model::TransformerConfig) {
    let params = config.n_layer
        * (config.hidden * config.n_head * config.head_dim * 2
            + config.hidden * config.n_kv_head * config.head_dim * 2
            + 3 * config.hidden * config.ffn_hidden)
        + config.vocab_size * config.hidden;
    println!("model: {} ({}, {})", info.id, info.arch, info.format);
    println!("layers: {}, hidden: {}, heads: {} / {} kv, ffn: {}", config.n_layer, config.hidden, config.n_head, config.n_kv_head, config.ffn_hidden);
    println!("parameters: {:.1} M (without norms and biases)", params as f64 / 1e6);
    println!("weight type: {}, weights in memory: {} bytes", info.dtype, info.weight_bytes);
    println!("context: {} tokens, vocabulary: {}", info.context_length, info.vocab_size);
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SynthShape {
    /// 2 layers, hidden 64: for mechanism tests.
    Tiny,
    /// DeepSeek-R1-Distill-Qwen-1.5B's exact shapes (28 layers, hidden 1536, 12 / 2 heads).
    #[value(name = "r1-distill-qwen-1.5b")]
    R1DistillQwen1_5b,
    /// Qwen3-0.6B's exact shapes (28 layers, hidden 1024, 16 / 8 heads of 128, tied head).
    #[value(name = "qwen3-0.6b")]
    Qwen3_0_6b,
    /// Qwen3-1.7B's exact shapes (28 layers, hidden 2048, 16 / 8 heads of 128, tied head).
    #[value(name = "qwen3-1.7b")]
    Qwen3_1_7b,
    /// Llama-3.2-1B's exact shapes (16 layers, hidden 2048, 32 / 8 heads of
    /// 64, tied head) with Llama 3 rope scaling (`rope_freqs`).
    #[value(name = "llama-3.2-1b")]
    Llama3_2_1b,
    /// Phi-3-mini-4k's exact shapes (32 layers, hidden 3072, 32 heads of 96,
    /// q/k/v and gate/up fused, untied head).
    #[value(name = "phi-3-mini-4k")]
    Phi3Mini4k,
    /// Phi-4-mini's exact shapes (32 layers, hidden 3072, 24 / 8 heads of 128
    /// with 96 rotating, tied head) with LongRoPE (4,096 → 131,072 positions).
    #[value(name = "phi-4-mini")]
    Phi4Mini,
    /// No tensors: only the tokenizer and chat template (a few MB), to carry to
    /// a machine without models and pass there as --tokenizer-from.
    TokenizerOnly,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SynthType {
    F32,
    F16,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4k,
    /// Q4_K, with `attn_v`, `ffn_down` (every other layer) and the head in
    /// Q6_K, as llama.cpp's Q4_K_M mixes them.
    #[value(name = "q4_k_m")]
    Q4kM,
    /// Q5_K, with the same tensors in Q6_K, as llama.cpp's Q5_K_M mixes them.
    #[value(name = "q5_k_m")]
    Q5kM,
}

/// A GGUF with random weights, real shapes and a real tokenizer: for
/// benchmarks on machines no model can reach, and for mechanism tests.
#[derive(Args)]
pub struct SynthArgs {
    #[arg(long, value_enum, default_value = "r1-distill-qwen-1.5b")]
    shape: SynthShape,
    /// The GGUF, Hugging Face `tokenizer.json` (or its directory), or manifest
    /// name whose tokenizer and chat template to copy; default: the shape's
    /// family's (r1-distill-tokenizer, qwen3-tokenizer).
    #[arg(long)]
    tokenizer_from: Option<String>,
    #[arg(long, value_enum, default_value = "q4_k")]
    dtype: SynthType,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fewer (or more) layers than the shape's own, each of its shapes.
    #[arg(long)]
    layers: Option<usize>,
    /// Another context length than the shape's own (a LongRoPE file picks
    /// its factor set by it).
    #[arg(long)]
    context: Option<usize>,
    /// Another number of embedding rows than the shape's own (at least the
    /// tokenizer's vocabulary).
    #[arg(long)]
    vocab: Option<usize>,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
}

pub fn synth(args: SynthArgs) -> Result<()> {
    use candle_core::quantized::GgmlDType;
    use terse::model::{write_random_gguf, write_tokenizer_gguf, SyntheticSpec};
    let family_tokenizer = match args.shape {
        SynthShape::Qwen3_0_6b | SynthShape::Qwen3_1_7b | SynthShape::Llama3_2_1b | SynthShape::Phi3Mini4k | SynthShape::Phi4Mini => "qwen3-tokenizer",
        _ => "r1-distill-tokenizer",
    };
    let tokenizer_name = args.tokenizer_from.as_deref().unwrap_or(family_tokenizer);
    let tokenizer_from = match terse::manifest::load_manifest(tokenizer_name) {
        Ok(m) => terse::manifest::models_dir().join("cache").join(&m.name).join(&m.file),
        Err(_) => PathBuf::from(tokenizer_name),
    };
    let mut spec = match args.shape {
        SynthShape::Tiny => SyntheticSpec::tiny_qwen2(152_064),
        SynthShape::R1DistillQwen1_5b => SyntheticSpec::r1_distill_qwen_1_5b(),
        SynthShape::Qwen3_0_6b => SyntheticSpec::qwen3_0_6b(28),
        SynthShape::Qwen3_1_7b => SyntheticSpec::qwen3_1_7b(),
        SynthShape::Llama3_2_1b => SyntheticSpec::llama_3_2_1b(16),
        SynthShape::Phi3Mini4k => SyntheticSpec::phi3_mini_4k(32),
        SynthShape::Phi4Mini => SyntheticSpec::phi4_mini(32),
        SynthShape::TokenizerOnly => {
            write_tokenizer_gguf(&args.out, &tokenizer_from)?;
            println!("{}", args.out.display());
            return Ok(());
        }
    };
    (spec.dtype, spec.sensitive_dtype) = match args.dtype {
        SynthType::F32 => (GgmlDType::F32, None),
        SynthType::F16 => (GgmlDType::F16, None),
        SynthType::Q4_0 => (GgmlDType::Q4_0, None),
        SynthType::Q8_0 => (GgmlDType::Q8_0, None),
        SynthType::Q4k => (GgmlDType::Q4K, None),
        SynthType::Q4kM => (GgmlDType::Q4K, Some(GgmlDType::Q6K)),
        SynthType::Q5kM => (GgmlDType::Q5K, Some(GgmlDType::Q6K)),
    };
    spec.seed = args.seed;
    if let Some(layers) = args.layers {
        spec.n_layer = layers;
    }
    spec.context_length = args.context.unwrap_or(spec.context_length);
    spec.vocab_size = args.vocab.unwrap_or(spec.vocab_size);
    write_random_gguf(&args.out, &spec, &tokenizer_from)?;
    println!("{}", args.out.display());
    Ok(())
}

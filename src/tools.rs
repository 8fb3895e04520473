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

//! Loading a llama / qwen2 GGUF file: weights stay in their quantized blocks.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::Device;
use candle_nn::{Embedding, RmsNorm};

use super::config::TransformerConfig;
use super::linear::Linear;
use super::quant::{BlockFormat, QuantMatrix};
use super::transformer::{Attention, Block, Mlp, TokenEmbedding, Transformer};
use super::ModelInfo;
use crate::tokenize::TextTokenizer;

/// A model ready to run: weights, tokenizer and what the server says about it.
pub struct LoadedModel {
    pub transformer: Transformer,
    pub tokenizer: TextTokenizer,
    pub info: ModelInfo,
}

pub fn load_gguf(path: &Path, served_name: &str) -> Result<LoadedModel> {
    load_gguf_as(path, served_name, false, &Device::Cpu)
}

/// The GGUF's quantized weights on `device` (candle's quantized matmuls run
/// there too: CUDA kernels on a GPU).
pub fn load_gguf_on(path: &Path, served_name: &str, device: &Device) -> Result<LoadedModel> {
    load_gguf_as(path, served_name, false, device)
}

/// The GGUF's weights dequantized to f32 and multiplied densely: the same
/// numbers a converted Hugging Face directory holds, for exact comparisons.
pub fn load_gguf_dequantized(path: &Path, served_name: &str) -> Result<LoadedModel> {
    load_gguf_as(path, served_name, true, &Device::Cpu)
}

fn load_gguf_as(path: &Path, served_name: &str, dequantize: bool, device: &Device) -> Result<LoadedModel> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| anyhow::anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
    let config = TransformerConfig::from_gguf(&content)?;
    let tokenizer = TextTokenizer::from_gguf(&content)?;
    let device = device.clone();

    let mut weight_bytes = 0u64;
    let mut type_counts: std::collections::BTreeMap<String, u64> = Default::default();
    let mut load = |name: &str| -> Result<candle_core::quantized::QTensor> {
        let t = content
            .tensor(&mut file, name, &device)
            .with_context(|| format!("{}: tensor {name}", path.display()))?;
        weight_bytes += t.storage_size_in_bytes() as u64;
        if t.shape().rank() == 2 {
            *type_counts.entry(format!("{:?}", t.dtype()).to_lowercase()).or_default() += t.shape().elem_count() as u64;
        }
        Ok(t)
    };
    let has = |name: &str| content.tensor_infos.contains_key(name);

    let linear = |load: &mut dyn FnMut(&str) -> Result<candle_core::quantized::QTensor>, prefix: &str| -> Result<Linear> {
        let weight = load(&format!("{prefix}.weight"))?;
        let bias_name = format!("{prefix}.bias");
        let bias = if has(&bias_name) { Some(load(&bias_name)?.dequantize(&device)?) } else { None };
        if dequantize {
            return Ok(Linear::dense(weight.dequantize(&device)?, bias)?);
        }
        Ok(Linear::from_qtensor(weight, bias)?)
    };
    let norm = |load: &mut dyn FnMut(&str) -> Result<candle_core::quantized::QTensor>, name: &str| -> Result<RmsNorm> {
        Ok(RmsNorm::new(load(name)?.dequantize(&device)?, config.rms_eps))
    };

    let embedding_q = load("token_embd.weight")?;
    // On the CPU, in a format our kernels read, the table stays quantized and
    // a tied head multiplies with the very same matrix.
    let shared = match (dequantize || !device.is_cpu(), BlockFormat::from_ggml(embedding_q.dtype())) {
        (false, Some(format)) => {
            let (rows, cols) = embedding_q.shape().dims2()?;
            Some(Arc::new(QuantMatrix::new(format, rows, cols, &embedding_q.data()?)?))
        }
        _ => None,
    };
    let embedding = match &shared {
        Some(m) => TokenEmbedding::Quantized(m.clone()),
        None => TokenEmbedding::Dense(Embedding::new(embedding_q.dequantize(&device)?, config.hidden)),
    };
    let mut blocks = Vec::with_capacity(config.n_layer);
    for i in 0..config.n_layer {
        let p = format!("blk.{i}");
        blocks.push(Block {
            attn_norm: norm(&mut load, &format!("{p}.attn_norm.weight"))?,
            attn: Attention {
                q: linear(&mut load, &format!("{p}.attn_q"))?,
                k: linear(&mut load, &format!("{p}.attn_k"))?,
                v: linear(&mut load, &format!("{p}.attn_v"))?,
                o: linear(&mut load, &format!("{p}.attn_output"))?,
            },
            ffn_norm: norm(&mut load, &format!("{p}.ffn_norm.weight"))?,
            mlp: Mlp {
                gate: linear(&mut load, &format!("{p}.ffn_gate"))?,
                up: linear(&mut load, &format!("{p}.ffn_up"))?,
                down: linear(&mut load, &format!("{p}.ffn_down"))?,
            },
        });
    }
    let final_norm = norm(&mut load, "output_norm.weight")?;
    // Tied embeddings: without an output matrix the embedding table is the head.
    let lm_head = if has("output.weight") {
        linear(&mut load, "output")?
    } else if let Some(m) = shared {
        Linear::shared_quant(m)
    } else {
        if dequantize {
            Linear::dense(embedding_q.dequantize(&device)?, None)?
        } else {
            Linear::from_qtensor(embedding_q, None)?
        }
    };
    drop(load);

    let dtype = type_counts
        .iter()
        .filter(|(name, _)| *name != &format!("{:?}", GgmlDType::F32).to_lowercase())
        .max_by_key(|(_, n)| **n)
        .map(|(name, _)| name.clone())
        .unwrap_or_else(|| "f32".into());
    let info = ModelInfo {
        id: served_name.to_string(),
        arch: config.arch.name().to_string(),
        format: "gguf".into(),
        dtype,
        context_length: config.context_length,
        vocab_size: config.vocab_size,
        weight_bytes,
        sparse_fraction: 0.0,
        device: super::describe_device(&device),
    };
    let transformer = Transformer::new(config, embedding, blocks, final_norm, lm_head, device)?;
    Ok(LoadedModel { transformer, tokenizer, info })
}

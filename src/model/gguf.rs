//! Loading a llama / qwen2 GGUF file: weights stay in their quantized blocks.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::Device;
use candle_nn::{Embedding, RmsNorm};

use super::config::TransformerConfig;
use super::linear::Linear;
use super::quant::{BlockFormat, QuantMatrix};
use super::layer::{Attention, Block, Mlp};
use super::transformer::{TokenEmbedding, Transformer};
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
    let mut file = BufReader::new(File::open(path).with_context(|| format!("opening {}", path.display()))?);
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| anyhow::anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
    let mut config = TransformerConfig::from_gguf(&content)?;
    let tokenizer = TextTokenizer::from_gguf(&content)?;

    let mut weights = Weights { file, content: &content, path, device: device.clone(), bytes: 0, type_counts: Default::default() };
    // Llama 3's rope scaling, as the file's per-frequency factors.
    if weights.has("rope_freqs.weight") {
        config.rope_freq_factors = Some(weights.tensor("rope_freqs.weight")?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
    }
    // On the CPU, matrices in a format our kernels read are repacked straight
    // from the file (see `Weights::matrix`); the rest go through candle.
    let ours = !dequantize && device.is_cpu();
    let linear = |w: &mut Weights, prefix: &str| -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let bias_name = format!("{prefix}.bias");
        let bias = if w.has(&bias_name) { Some(w.tensor(&bias_name)?.dequantize(device)?) } else { None };
        if ours {
            if let Some(matrix) = w.matrix(&name)? {
                return Ok(Linear::quant(Arc::new(matrix), bias));
            }
        }
        let weight = w.tensor(&name)?;
        if dequantize {
            return Ok(Linear::dense(weight.dequantize(device)?, bias)?);
        }
        Ok(Linear::from_qtensor(weight, bias)?)
    };
    let norm = |w: &mut Weights, name: &str| -> Result<RmsNorm> { Ok(RmsNorm::new(w.tensor(name)?.dequantize(device)?, config.rms_eps)) };

    // The table stays quantized where our kernels read its format, and a tied
    // head multiplies with the very same matrix.
    let shared = if ours { weights.matrix("token_embd.weight")?.map(Arc::new) } else { None };
    let embedding = match &shared {
        Some(m) => TokenEmbedding::Quantized(m.clone()),
        None => TokenEmbedding::Dense(Embedding::new(weights.tensor("token_embd.weight")?.dequantize(device)?, config.hidden)),
    };
    let qk_norms = config.arch.norms_q_and_k();
    let outputs_normed = config.arch.norms_outputs();
    let mut blocks = Vec::with_capacity(config.n_layer);
    for i in 0..config.n_layer {
        let p = format!("blk.{i}");
        let w = &mut weights;
        blocks.push(Block {
            spec: config.layer_spec(i),
            post_attn_norm: outputs_normed.then(|| norm(w, &format!("{p}.post_attention_norm.weight"))).transpose()?,
            post_ffn_norm: outputs_normed.then(|| norm(w, &format!("{p}.post_ffw_norm.weight"))).transpose()?,
            attn_norm: norm(w, &format!("{p}.attn_norm.weight"))?,
            attn: Attention {
                q: linear(w, &format!("{p}.attn_q"))?,
                k: linear(w, &format!("{p}.attn_k"))?,
                v: linear(w, &format!("{p}.attn_v"))?,
                o: linear(w, &format!("{p}.attn_output"))?,
                q_norm: qk_norms.then(|| norm(w, &format!("{p}.attn_q_norm.weight"))).transpose()?,
                k_norm: qk_norms.then(|| norm(w, &format!("{p}.attn_k_norm.weight"))).transpose()?,
            },
            ffn_norm: norm(w, &format!("{p}.ffn_norm.weight"))?,
            mlp: Mlp {
                gate: linear(w, &format!("{p}.ffn_gate"))?,
                up: linear(w, &format!("{p}.ffn_up"))?,
                down: linear(w, &format!("{p}.ffn_down"))?,
            },
        });
    }
    let final_norm = norm(&mut weights, "output_norm.weight")?;
    // Tied embeddings: without an output matrix the embedding table is the head.
    let lm_head = if weights.has("output.weight") {
        linear(&mut weights, "output")?
    } else if let Some(m) = shared {
        Linear::shared_quant(m)
    } else if dequantize {
        Linear::dense(weights.tensor("token_embd.weight")?.dequantize(device)?, None)?
    } else {
        Linear::from_qtensor(weights.tensor("token_embd.weight")?, None)?
    };
    let Weights { bytes: weight_bytes, type_counts, .. } = weights;

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
        device: super::describe_device(device),
    };
    let transformer = Transformer::new(config, embedding, blocks, final_norm, lm_head, device.clone())?;
    Ok(LoadedModel { transformer, tokenizer, info })
}

/// The GGUF file's tensors, read one at a time, with a tally of their bytes
/// and types for `ModelInfo`.
struct Weights<'a> {
    file: BufReader<File>,
    content: &'a gguf_file::Content,
    path: &'a Path,
    device: Device,
    bytes: u64,
    /// Elements per type, over the matrices.
    type_counts: std::collections::BTreeMap<String, u64>,
}

impl Weights<'_> {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn count(&mut self, dtype: GgmlDType, shape: &candle_core::Shape, bytes: usize) {
        self.bytes += bytes as u64;
        if shape.rank() == 2 {
            *self.type_counts.entry(format!("{dtype:?}").to_lowercase()).or_default() += shape.elem_count() as u64;
        }
    }

    /// A tensor through candle (read whole, on the model's device).
    fn tensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let t = self.content.tensor(&mut self.file, name, &self.device).with_context(|| format!("{}: tensor {name}", self.path.display()))?;
        self.count(t.dtype(), t.shape(), t.storage_size_in_bytes());
        Ok(t)
    }

    /// A matrix in a format our kernels read, repacked as it is read from the
    /// file: no second copy of it is ever held (candle's reader would hold the
    /// file's bytes and the repacked ones at once; for Qwen2.5-0.5B's
    /// 145 MB head that was the load's peak). None for other formats.
    fn matrix(&mut self, name: &str) -> Result<Option<QuantMatrix>> {
        let info = self.content.tensor_infos.get(name).with_context(|| format!("{}: no tensor {name}", self.path.display()))?;
        let (Some(format), Ok((rows, cols))) = (BlockFormat::from_ggml(info.ggml_dtype), info.shape.dims2()) else {
            return Ok(None);
        };
        let (dtype, shape) = (info.ggml_dtype, info.shape.clone());
        self.file.seek(SeekFrom::Start(self.content.tensor_data_offset + info.offset))?;
        let matrix = QuantMatrix::read(format, rows, cols, &mut self.file).with_context(|| format!("{}: tensor {name}", self.path.display()))?;
        self.count(dtype, &shape, QuantMatrix::gguf_bytes(format, rows, cols)?);
        Ok(Some(matrix))
    }
}

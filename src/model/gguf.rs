//! Loading a GGUF file (llama, qwen2, qwen3, gemma3, phi3): weights stay in their quantized blocks.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::Device;
use candle_nn::{Embedding, RmsNorm};

use super::config::{Arch, TransformerConfig};
use super::linear::Linear;
use super::float_matrix::{FloatFormat, FloatMatrix};
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
    let mut content = gguf_file::Content::read(&mut file).map_err(|e| match unreadable_tensor(path) {
        Some((tensor, format)) => anyhow::anyhow!("{}: tensor {tensor} is {format}, which terse cannot read (use a Q4_K_M, Q5_K_M, Q8_0 or F16 file)", path.display()),
        None => anyhow::anyhow!("{} is not a readable GGUF file: {e}", path.display()),
    })?;
    let mut config = TransformerConfig::from_gguf(&content)?;
    let tokenizer = TextTokenizer::from_gguf(&content)?;
    // The vocabulary's arrays (32 MB for Gemma's 262k tokens) are in the
    // tokenizer now; only the tensor index is read from here on.
    content.metadata = Default::default();
    super::heap::release_free_heap();

    let mut weights = Weights {
        file,
        content: &content,
        path,
        device: device.clone(),
        bytes: 0,
        type_counts: Default::default(),
        on_candle: Default::default(),
    };
    // Llama 3's rope scaling, as the file's per-frequency factors.
    if weights.has("rope_freqs.weight") {
        config.rope_freq_factors = Some(weights.tensor("rope_freqs.weight")?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
    }
    // LongRoPE (Phi-3's long-context models) holds two sets of factors, one
    // of which rotates the whole cache (`config::longrope`).
    if weights.has("rope_factors_long.weight") {
        let Some(original) = config.rope_original_context else {
            anyhow::bail!("{}: LongRoPE factors without {}.rope.scaling.original_context_length", path.display(), config.arch.name());
        };
        let set = if super::config::longrope(config.context_length, original).0 { "long" } else { "short" };
        let factors = weights.tensor(&format!("rope_factors_{set}.weight"))?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        tracing::info!("LongRoPE: the {set} factors, for a context of {} (trained at {original})", config.context_length);
        config.rope_freq_factors = Some(factors);
    }
    // On the CPU, matrices in a format our kernels read are repacked straight
    // from the file (see `Weights::matrix`); the rest go through candle.
    let ours = !dequantize && device.is_cpu();
    // Rows `rows` of matrix `prefix` (all of them where None): Phi-3 keeps
    // q, k and v in one matrix, and the MLP's gate and up in another.
    let linear_rows = |w: &mut Weights, prefix: &str, rows: Option<Range<usize>>| -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let bias_name = format!("{prefix}.bias");
        if rows.is_some() && w.has(&bias_name) {
            anyhow::bail!("{}: tensor {bias_name} is a bias of a fused matrix, which terse does not split", path.display());
        }
        let bias = if w.has(&bias_name) { Some(w.tensor(&bias_name)?.dequantize(device)?) } else { None };
        if ours {
            if let Some(matrix) = w.matrix(&name, rows.clone())? {
                return Ok(Linear::quant(Arc::new(matrix), bias));
            }
            if let Some(matrix) = w.float(&name, rows.clone())? {
                return Ok(Linear::float(Arc::new(matrix), bias));
            }
            w.note_candle_matrix(&name);
        }
        let weight = w.tensor_rows(&name, rows)?;
        if dequantize {
            return Ok(Linear::dense(weight.dequantize(device)?, bias)?);
        }
        Ok(Linear::from_qtensor(weight, bias)?)
    };
    let linear = |w: &mut Weights, prefix: &str| linear_rows(w, prefix, None);
    let norm = |w: &mut Weights, name: &str| -> Result<RmsNorm> { Ok(RmsNorm::new(w.tensor(name)?.dequantize(device)?, config.rms_eps)) };
    // A per-head norm must hold one weight per value of a head.
    let head_norm = |w: &mut Weights, name: &str| -> Result<RmsNorm> {
        let t = w.tensor(name)?;
        if t.shape().dims() != [config.head_dim] {
            anyhow::bail!("{}: tensor {name} has shape {:?}, expected [{}] (the head size)", path.display(), t.shape().dims(), config.head_dim);
        }
        Ok(RmsNorm::new(t.dequantize(device)?, config.rms_eps))
    };

    // The table stays quantized where our kernels read its format, and a tied
    // head multiplies with the very same matrix.
    let shared = if ours { weights.matrix("token_embd.weight", None)?.map(Arc::new) } else { None };
    let shared_float = if ours && shared.is_none() { weights.float("token_embd.weight", None)?.map(Arc::new) } else { None };
    let embedding = match (&shared, &shared_float) {
        (Some(m), _) => TokenEmbedding::Quantized(m.clone()),
        (None, Some(h)) => TokenEmbedding::Float(h.clone()),
        (None, None) => TokenEmbedding::Dense(Embedding::new(weights.tensor("token_embd.weight")?.dequantize(device)?, config.hidden)),
    };
    let qk_norms = config.arch.norms_q_and_k();
    let outputs_normed = config.arch.norms_outputs();
    let (q_width, kv_width, ffn) = (config.n_head * config.head_dim, config.n_kv_head * config.head_dim, config.ffn_hidden);
    let mut blocks = Vec::with_capacity(config.n_layer);
    for i in 0..config.n_layer {
        let p = format!("blk.{i}");
        let w = &mut weights;
        // Phi-3's fused matrices, split by rows: q, k, v; then gate, up.
        let (q, k, v) = if w.has(&format!("{p}.attn_qkv.weight")) {
            let qkv = format!("{p}.attn_qkv");
            w.expect_rows(&qkv, q_width + 2 * kv_width)?;
            let q = linear_rows(w, &qkv, Some(0..q_width))?;
            let k = linear_rows(w, &qkv, Some(q_width..q_width + kv_width))?;
            (q, k, linear_rows(w, &qkv, Some(q_width + kv_width..q_width + 2 * kv_width))?)
        } else {
            (linear(w, &format!("{p}.attn_q"))?, linear(w, &format!("{p}.attn_k"))?, linear(w, &format!("{p}.attn_v"))?)
        };
        let (gate, up) = if config.arch == Arch::Phi3 && !w.has(&format!("{p}.ffn_gate.weight")) {
            let gate_up = format!("{p}.ffn_up");
            w.expect_rows(&gate_up, 2 * ffn)?;
            (linear_rows(w, &gate_up, Some(0..ffn))?, linear_rows(w, &gate_up, Some(ffn..2 * ffn))?)
        } else {
            (linear(w, &format!("{p}.ffn_gate"))?, linear(w, &format!("{p}.ffn_up"))?)
        };
        blocks.push(Block {
            spec: config.layer_spec(i),
            post_attn_norm: outputs_normed.then(|| norm(w, &format!("{p}.post_attention_norm.weight"))).transpose()?,
            post_ffn_norm: outputs_normed.then(|| norm(w, &format!("{p}.post_ffw_norm.weight"))).transpose()?,
            attn_norm: norm(w, &format!("{p}.attn_norm.weight"))?,
            attn: Attention {
                q,
                k,
                v,
                o: linear(w, &format!("{p}.attn_output"))?,
                q_norm: qk_norms.then(|| head_norm(w, &format!("{p}.attn_q_norm.weight"))).transpose()?,
                k_norm: qk_norms.then(|| head_norm(w, &format!("{p}.attn_k_norm.weight"))).transpose()?,
            },
            ffn_norm: norm(w, &format!("{p}.ffn_norm.weight"))?,
            mlp: Mlp { gate, up, down: linear(w, &format!("{p}.ffn_down"))? },
        });
    }
    let final_norm = norm(&mut weights, "output_norm.weight")?;
    // Tied embeddings: without an output matrix the embedding table is the head.
    let lm_head = if weights.has("output.weight") {
        linear(&mut weights, "output")?
    } else if let Some(m) = shared {
        Linear::shared_quant(m)
    } else if let Some(h) = shared_float {
        Linear::float(h, None)
    } else if dequantize {
        Linear::dense(weights.tensor("token_embd.weight")?.dequantize(device)?, None)?
    } else {
        Linear::from_qtensor(weights.tensor("token_embd.weight")?, None)?
    };
    let Weights { bytes: weight_bytes, type_counts, on_candle, .. } = weights;
    for (format, (count, first)) in on_candle {
        tracing::warn!("{count} matrices in {format} (the first: {first}) run on candle's kernels, slower than terse's own (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, f16, bf16, f32)");
    }

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

/// The first `rows` rows of a GGUF's output head (its embedding table where
/// the head is tied), on the CPU, in our kernels' layout where the format
/// has one: for a draft model that proposes only among the first token ids
/// (a BPE vocabulary's most frequent), reading that much less of its head
/// per drafted token. Returns the head, and the bytes of the whole head and
/// of the rows kept.
pub fn read_head_rows(path: &Path, rows: usize) -> Result<(Linear, u64, u64)> {
    let mut file = BufReader::new(File::open(path).with_context(|| format!("opening {}", path.display()))?);
    let content = gguf_file::Content::read(&mut file).map_err(|e| anyhow::anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
    let name = if content.tensor_infos.contains_key("output.weight") { "output.weight" } else { "token_embd.weight" };
    let info = content.tensor_infos.get(name).with_context(|| format!("{}: no tensor {name}", path.display()))?;
    let (all, cols) = info.shape.dims2()?;
    let dtype = info.ggml_dtype;
    let whole = (all * cols / dtype.block_size() * dtype.type_size()) as u64;
    let rows = rows.clamp(1, all);
    let mut w = Weights { file, content: &content, path, device: Device::Cpu, bytes: 0, type_counts: Default::default(), on_candle: Default::default() };
    let head = if let Some(matrix) = w.matrix(name, Some(0..rows))? {
        Linear::quant(Arc::new(matrix), None)
    } else if let Some(matrix) = w.float(name, Some(0..rows))? {
        Linear::float(Arc::new(matrix), None)
    } else {
        Linear::from_qtensor(w.tensor_rows(name, Some(0..rows))?, None)?
    };
    Ok((head, whole, w.bytes))
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
    /// Per format our kernels do not read: how many matrices run on candle's, and the first.
    on_candle: std::collections::BTreeMap<String, (usize, String)>,
}

impl Weights<'_> {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Matrix `name` goes to candle's kernels (its format is not one of ours).
    fn note_candle_matrix(&mut self, name: &str) {
        if let Some(info) = self.content.tensor_infos.get(name) {
            let format = format!("{:?}", info.ggml_dtype).to_lowercase();
            self.on_candle.entry(format).or_insert_with(|| (0, name.to_string())).0 += 1;
        }
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

    /// Rows `rows` of matrix `name` through candle (all of it where None).
    /// Each row of a GGUF matrix is whole blocks, so rows are a byte range.
    fn tensor_rows(&mut self, name: &str, rows: Option<Range<usize>>) -> Result<candle_core::quantized::QTensor> {
        let Some(rows) = rows else { return self.tensor(name) };
        let (path, device) = (self.path, self.device.clone());
        let row_bytes = move |dtype: GgmlDType, cols: usize| -> Result<usize> {
            if !cols.is_multiple_of(dtype.block_size()) {
                anyhow::bail!("{}: tensor {name} has {cols} columns, not whole {dtype:?} blocks of {}", path.display(), dtype.block_size());
            }
            Ok(cols / dtype.block_size() * dtype.type_size())
        };
        let read = |dtype: GgmlDType, rows: usize, cols: usize, file: &mut BufReader<File>| -> Result<_> {
            let mut bytes = vec![0u8; rows * row_bytes(dtype, cols)?];
            std::io::Read::read_exact(file, &mut bytes).context("truncated")?;
            let t = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &device)?;
            Ok((t, bytes.len()))
        };
        let t = self.read_matrix(name, Some(rows), Some, row_bytes, read)?;
        t.with_context(|| format!("{}: tensor {name} is not a matrix", self.path.display()))
    }

    /// Matrix `name` has `rows` rows (a fused matrix must, to be split).
    fn expect_rows(&self, name: &str, rows: usize) -> Result<()> {
        let full = format!("{name}.weight");
        let info = self.content.tensor_infos.get(&full).with_context(|| format!("{}: no tensor {full}", self.path.display()))?;
        match info.shape.dims2() {
            Ok((r, _)) if r == rows => Ok(()),
            _ => anyhow::bail!("{}: tensor {full} has shape {:?}, expected {rows} rows", self.path.display(), info.shape.dims()),
        }
    }

    /// A matrix in a format our kernels read, repacked as it is read from the
    /// file: no second copy of it is ever held (candle's reader would hold the
    /// file's bytes and the repacked ones at once; for Qwen2.5-0.5B's
    /// 145 MB head that was the load's peak). None for other formats.
    fn matrix(&mut self, name: &str, rows: Option<Range<usize>>) -> Result<Option<QuantMatrix>> {
        self.read_matrix(
            name,
            rows,
            BlockFormat::from_ggml,
            |format, cols| Ok(QuantMatrix::gguf_bytes(format, 1, cols)?),
            |format, rows, cols, file| Ok((QuantMatrix::read(format, rows, cols, file)?, QuantMatrix::gguf_bytes(format, rows, cols)?)),
        )
    }

    /// An F16, BF16 or F32 matrix, kept in its own precision. None for other formats.
    fn float(&mut self, name: &str, rows: Option<Range<usize>>) -> Result<Option<FloatMatrix>> {
        self.read_matrix(name, rows, FloatFormat::from_ggml, |format, cols| Ok(cols * format.width()), |format, rows, cols, file| {
            Ok((FloatMatrix::read(format, rows, cols, file)?, rows * cols * format.width()))
        })
    }

    /// Rows `rows` (all where None) of a 2-D tensor whose type `format_of`
    /// knows, read by `read` (the matrix and the bytes it took in the file)
    /// straight from their place in the file; `row_bytes` is a row's size.
    fn read_matrix<F: Copy, M>(
        &mut self,
        name: &str,
        rows: Option<Range<usize>>,
        format_of: impl Fn(GgmlDType) -> Option<F>,
        row_bytes: impl Fn(F, usize) -> Result<usize>,
        read: impl FnOnce(F, usize, usize, &mut BufReader<File>) -> Result<(M, usize)>,
    ) -> Result<Option<M>> {
        let info = self.content.tensor_infos.get(name).with_context(|| format!("{}: no tensor {name}", self.path.display()))?;
        let (Some(format), Ok((all_rows, cols))) = (format_of(info.ggml_dtype), info.shape.dims2()) else {
            return Ok(None);
        };
        let rows = rows.unwrap_or(0..all_rows);
        let (dtype, shape) = (info.ggml_dtype, candle_core::Shape::from((rows.len(), cols)));
        let skip = (rows.start * row_bytes(format, cols)?) as u64;
        self.file.seek(SeekFrom::Start(self.content.tensor_data_offset + info.offset + skip))?;
        let (matrix, bytes) = read(format, rows.len(), cols, &mut self.file).with_context(|| format!("{}: tensor {name}", self.path.display()))?;
        self.count(dtype, &shape, bytes);
        Ok(Some(matrix))
    }
}

/// GGUF's names of the tensor types candle cannot read (the IQ family and later ones).
fn unreadable_format(type_id: u32) -> Option<&'static str> {
    Some(match type_id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// The first tensor of the GGUF at `path` in a format candle cannot read,
/// with that format's name: read from the header alone, to say what candle's
/// reader only gives as a type number.
fn unreadable_tensor(path: &Path) -> Option<(String, &'static str)> {
    use std::io::Read;
    let mut r = BufReader::new(File::open(path).ok()?);
    fn u32_at(r: &mut BufReader<File>) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_of(r: &mut BufReader<File>) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn string(r: &mut BufReader<File>) -> Option<String> {
        let len = u64_of(r)?;
        let mut b = vec![0u8; usize::try_from(len).ok().filter(|&n| n < 1 << 20)?];
        r.read_exact(&mut b).ok()?;
        String::from_utf8(b).ok()
    }
    /// Bytes of one value of fixed-size type `t`.
    fn fixed_size(t: u32) -> Option<i64> {
        match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }
    /// Skip one metadata value of type `t` (an array holds no arrays of
    /// arrays in any file llama.cpp writes: one level is enough); `None` on
    /// anything a truncated or corrupt file could make of it.
    fn skip(r: &mut BufReader<File>, t: u32, end: u64, nested: bool) -> Option<()> {
        if let Some(size) = fixed_size(t) {
            return r.seek_relative(size).ok();
        }
        match t {
            8 => string(r).map(|_| ()),
            9 if !nested => {
                let (inner, n) = (u32_at(r)?, u64_of(r)?);
                match fixed_size(inner) {
                    Some(size) => {
                        let bytes = i64::try_from(n).ok()?.checked_mul(size)?;
                        let at = r.stream_position().ok()?;
                        (at.checked_add(bytes as u64)? <= end).then_some(())?;
                        r.seek_relative(bytes).ok()
                    }
                    None => {
                        for _ in 0..n {
                            skip(r, inner, end, true)?;
                            (r.stream_position().ok()? <= end).then_some(())?;
                        }
                        Some(())
                    }
                }
            }
            _ => None,
        }
    }
    let end = std::fs::metadata(path).ok()?.len();
    if u32_at(&mut r)? != u32::from_le_bytes(*b"GGUF") {
        return None;
    }
    let _version = u32_at(&mut r)?;
    let (tensors, entries) = (u64_of(&mut r)?, u64_of(&mut r)?);
    for _ in 0..entries {
        string(&mut r)?;
        let t = u32_at(&mut r)?;
        skip(&mut r, t, end, false)?;
    }
    for _ in 0..tensors {
        let name = string(&mut r)?;
        let dims = u32_at(&mut r)?;
        for _ in 0..dims {
            u64_of(&mut r)?;
        }
        let type_id = u32_at(&mut r)?;
        u64_of(&mut r)?;
        if let Some(format) = unreadable_format(type_id) {
            return Some((name, format));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header with one metadata array whose count claims far more values
    /// than the file holds: the scan gives up instead of seeking on.
    #[test]
    fn a_corrupt_array_count_ends_the_header_scan() {
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        b.extend(b"huge");
        b.extend(9u32.to_le_bytes()); // an array
        b.extend(4u32.to_le_bytes()); // of u32
        b.extend((1u64 << 60).to_le_bytes());
        let path = std::env::temp_dir().join(format!("terse-corrupt-{}.gguf", std::process::id()));
        std::fs::write(&path, &b).unwrap();
        // Before the bound it seeked 2^60 times; now it returns.
        assert_eq!(unreadable_tensor(&path), None);
        let _ = std::fs::remove_file(&path);
    }
}

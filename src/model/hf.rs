//! Hugging Face model directories: `config.json`, `model.safetensors` or
//! shards named by `model.safetensors.index.json`, `tokenizer.json`,
//! `tokenizer_config.json` and, when present, `generation_config.json`.
//! Weights in f32, f16 or bf16 are computed in f32 on the CPU (bf16 on a GPU);
//! on the CPU, projection weights that follow the 2:4 pattern are stored
//! compressed and run on the sparse kernel. A GPU runs them dense for now.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, RmsNorm};
use serde::Deserialize;

use super::sparse::{Precision, Sparse24};
use super::layer::{Attention, Block, Mlp};
use super::transformer::TokenEmbedding;
use super::{Arch, Linear, LoadedModel, ModelInfo, Transformer, TransformerConfig};
use crate::tokenize::TextTokenizer;

/// Whether conforming projection weights run on the sparse kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SparseMode {
    /// Compress every projection that follows the 2:4 pattern.
    #[default]
    Auto,
    /// Keep every weight dense.
    Off,
}

/// The fields of `config.json` terse reads.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub torch_dtype: Option<String>,
    /// Llama 3's `{"rope_type": "llama3", "factor", "low_freq_factor",
    /// "high_freq_factor", "original_max_position_embeddings"}`, or linear
    /// (Gemma 3's 4B and larger: `{"rope_type": "linear", "factor": 8}`).
    pub rope_scaling: Option<serde_json::Value>,
    /// Gemma 3: the windowed layers' window and rope base, which layers are
    /// windowed (every `sliding_window_pattern`-th is global, or as
    /// `layer_types` lists), the attention scale's √ operand, softcaps.
    pub sliding_window: Option<usize>,
    pub sliding_window_pattern: Option<usize>,
    #[serde(default)]
    pub layer_types: Vec<String>,
    pub rope_local_base_freq: Option<f32>,
    pub query_pre_attn_scalar: Option<usize>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    /// Phi-3's family: the share of each head that rotates, and the context
    /// it was trained at before LongRoPE stretched it.
    pub partial_rotary_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}

impl HfConfig {
    /// `config.json`'s text; a model class terse does not read is named
    /// before any field is missed (Gemma 3's vision model keeps its text
    /// model's fields under `text_config`).
    pub fn parse(text: &str) -> Result<HfConfig> {
        let value: serde_json::Value = serde_json::from_str(text)?;
        let classes = value.get("architectures").and_then(|a| a.as_array()).into_iter().flatten();
        if classes.filter_map(|c| c.as_str()).any(|c| c == "Gemma3ForConditionalGeneration") {
            bail!("Gemma3ForConditionalGeneration (Gemma 3 with its vision tower) directories are not read; its text model's GGUF file is");
        }
        Ok(serde_json::from_value(value)?)
    }

    pub fn arch(&self) -> Result<Arch> {
        let from_class = self.architectures.iter().find_map(|a| match a.as_str() {
            "LlamaForCausalLM" => Some(Arch::Llama),
            "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            "Qwen3ForCausalLM" => Some(Arch::Qwen3),
            "Gemma3ForCausalLM" => Some(Arch::Gemma3),
            "Phi3ForCausalLM" => Some(Arch::Phi3),
            _ => None,
        });
        match (from_class, self.model_type.as_deref()) {
            (Some(arch), _) => Ok(arch),
            (None, Some("gemma3_text")) => Ok(Arch::Gemma3),
            (None, Some(t)) => Arch::parse(t),
            (None, None) => bail!("config.json names no architecture (architectures / model_type)"),
        }
    }

    pub fn transformer_config(&self) -> Result<TransformerConfig> {
        let mut config = self.plain_config()?;
        if let Some(scaling) = &self.rope_scaling {
            let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|v| v.as_str()).unwrap_or("");
            let number = |key: &str| scaling.get(key).and_then(|v| v.as_f64()).map(|v| v as f32).with_context(|| format!("rope_scaling lacks {key}"));
            match kind {
                "llama3" => {
                    let scaling = [number("factor")?, number("low_freq_factor")?, number("high_freq_factor")?, number("original_max_position_embeddings")?];
                    let factors = super::config::llama3_freq_factors(config.rope_theta, config.rotary_dim, scaling);
                    config.rope_freq_factors = Some(factors);
                }
                // Every frequency of the global table divided by the factor.
                "linear" => config.rope_freq_factors = Some(vec![number("factor")?; config.rotary_dim / 2]),
                "longrope" | "su" => self.longrope(scaling, &mut config)?,
                "default" | "" => {}
                other => bail!("rope_scaling of type `{other}` is not supported (llama3, linear and longrope are)"),
            }
        }
        Ok(config)
    }

    /// LongRoPE: one of its two factor sets for the whole cache, the long
    /// one where the context outgrows the one the model was trained at (as
    /// a GGUF of it is read), and the attention factor: the checkpoint's, or
    /// √(1 + ln(s) / ln(original)) for a context stretched s times.
    fn longrope(&self, scaling: &serde_json::Value, config: &mut TransformerConfig) -> Result<()> {
        let original = self
            .original_max_position_embeddings
            .or_else(|| scaling.get("original_max_position_embeddings").and_then(|v| v.as_u64()).map(|v| v as usize))
            .context("longrope rope_scaling without original_max_position_embeddings")?;
        if original < 2 {
            bail!("original_max_position_embeddings is {original}; LongRoPE stretches a context of at least 2 positions");
        }
        let (long, computed) = super::config::longrope(config.context_length, original);
        let set = if long { "long_factor" } else { "short_factor" };
        let factors: Vec<f32> = scaling
            .get(set)
            .and_then(|v| v.as_array())
            .with_context(|| format!("longrope rope_scaling lacks {set}"))?
            .iter()
            .map(|v| v.as_f64().map(|f| f as f32).with_context(|| format!("rope_scaling.{set} holds a value that is not a number")))
            .collect::<Result<_>>()?;
        if factors.len() != config.rotary_dim / 2 {
            bail!("rope_scaling.{set} holds {} factors but the heads rotate {} frequencies", factors.len(), config.rotary_dim / 2);
        }
        config.rope_attn_factor = scaling.get("attention_factor").and_then(|v| v.as_f64()).unwrap_or(computed) as f32;
        if !(config.rope_attn_factor.is_finite() && config.rope_attn_factor > 0.0) {
            bail!("rope_scaling.attention_factor is {}; it must be a positive number", config.rope_attn_factor);
        }
        config.rope_freq_factors = Some(factors);
        config.rope_original_context = Some(original);
        Ok(())
    }

    fn plain_config(&self) -> Result<TransformerConfig> {
        let arch = self.arch()?;
        let n_kv_head = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if self.num_attention_heads == 0 || n_kv_head == 0 || !self.num_attention_heads.is_multiple_of(n_kv_head) {
            bail!("config.json: head counts {} / {n_kv_head} are inconsistent", self.num_attention_heads);
        }
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads);
        let config = TransformerConfig {
            arch,
            n_layer: self.num_hidden_layers,
            hidden: self.hidden_size,
            n_head: self.num_attention_heads,
            n_kv_head,
            head_dim,
            ffn_hidden: self.intermediate_size,
            rope_theta: self.rope_theta,
            rms_eps: self.rms_norm_eps,
            context_length: self.max_position_embeddings,
            vocab_size: self.vocab_size,
            rope_halves: true,
            sliding_window: None,
            sliding_pattern: 0,
            rope_local_theta: None,
            rope_freq_factors: None,
            rotary_dim: match self.partial_rotary_factor {
                // Rounded: a share written as rotary / head reads back whole.
                Some(share) => (head_dim as f64 * share).round() as usize,
                None => head_dim,
            },
            rope_attn_factor: 1.0,
            rope_original_context: None,
        };
        if config.rotary_dim == 0 || config.rotary_dim > head_dim || config.rotary_dim % 2 == 1 {
            bail!("config.json: partial_rotary_factor gives {} rotated values of a head of {head_dim}; they must be even and at most the head", config.rotary_dim);
        }
        if arch == Arch::Gemma3 {
            return self.gemma3_config(config);
        }
        Ok(config)
    }

    /// Gemma 3's windowed layers, refused where terse would compute
    /// something else than the checkpoint asks (softcapped logits, an
    /// attention scale other than 1/√head_dim, windowed layers in another
    /// pattern than "every n-th global").
    fn gemma3_config(&self, config: TransformerConfig) -> Result<TransformerConfig> {
        if let Some(cap) = self.final_logit_softcapping.or(self.attn_logit_softcapping) {
            bail!("gemma3: logit softcapping ({cap}) is not computed by terse");
        }
        if let Some(scalar) = self.query_pre_attn_scalar.filter(|&s| s != config.head_dim) {
            bail!("gemma3: query_pre_attn_scalar {scalar} differs from head_dim {}; terse scales attention by 1/√head_dim", config.head_dim);
        }
        let window = self.sliding_window.context("gemma3: config.json lacks sliding_window")?;
        if window == 0 {
            bail!("gemma3: sliding_window is 0; a window holds at least one position");
        }
        let pattern = match (self.sliding_window_pattern, self.layer_types.is_empty()) {
            (Some(pattern), _) => pattern,
            (None, false) => self.layer_types.iter().position(|t| t == "full_attention").map_or(self.num_hidden_layers + 1, |i| i + 1),
            // Gemma 3's published value.
            (None, true) => 6,
        }
        .max(1);
        let config = TransformerConfig {
            sliding_window: Some(window),
            sliding_pattern: pattern,
            rope_local_theta: Some(self.rope_local_base_freq.unwrap_or(10_000.0)),
            ..config
        };
        for (i, kind) in self.layer_types.iter().enumerate() {
            let windowed = config.layer_spec(i).window.is_some();
            if windowed != (kind == "sliding_attention") {
                bail!("gemma3: layer_types[{i}] is `{kind}`, outside the pattern of one global layer in {pattern}");
            }
        }
        Ok(config)
    }
}

/// The safetensors files of a directory and which file holds each tensor.
struct Weights {
    dir: PathBuf,
    files: MmapedSafetensors,
    /// Tensor name → file name, for error messages.
    owner: BTreeMap<String, String>,
}

impl Weights {
    fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index.is_file() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
            let parsed: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
            let map = parsed
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
            let shards: BTreeSet<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
            shards.into_iter().collect()
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut paths = Vec::new();
        for name in &names {
            let path = dir.join(name);
            if !path.is_file() {
                bail!("{} is missing (named by {})", path.display(), if index.is_file() { "model.safetensors.index.json" } else { "the Hugging Face layout" });
            }
            paths.push(path);
        }
        let mut owner = BTreeMap::new();
        for (name, path) in names.iter().zip(&paths) {
            // Each file alone first, so a truncated or corrupt one is named.
            let single = unsafe { MmapedSafetensors::new(path) }.map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
            for (tensor, _) in single.tensors() {
                owner.insert(tensor, name.clone());
            }
        }
        let files = unsafe { MmapedSafetensors::multi(&paths) }.map_err(|e| anyhow!("{}: {e}", dir.display()))?;
        Ok(Weights { dir: dir.to_path_buf(), files, owner })
    }

    fn has(&self, name: &str) -> bool {
        self.owner.contains_key(name)
    }

    /// The tensor `name`, checked against `shape`, in f32.
    fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some(file) = self.owner.get(name) else {
            bail!("{}: no tensor {name} in any safetensors file", self.dir.display());
        };
        let t = self
            .files
            .load(name, &Device::Cpu)
            .map_err(|e| anyhow!("{}: tensor {name}: {e}", self.dir.join(file).display()))?;
        if t.dims() != shape {
            bail!("{}: tensor {name} has shape {:?}, expected {shape:?}", self.dir.join(file).display(), t.dims());
        }
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => Ok(t.to_dtype(DType::F32)?),
            other => bail!("{}: tensor {name} is {other:?}; terse reads f32, f16 and bf16", self.dir.join(file).display()),
        }
    }

    fn dtype_of(&self, name: &str) -> Option<String> {
        let view = self.files.get(name).ok()?;
        Some(format!("{:?}", view.dtype()).to_lowercase())
    }
}

/// Per-projection sparsity, for `terse inspect` and the model info.
#[derive(Debug, Clone, Default)]
pub struct SparsityReport {
    /// (tensor name, share of zero weights, stored compressed).
    pub projections: Vec<(String, f64, bool)>,
    pub dense_bytes: u64,
    pub stored_bytes: u64,
}

impl SparsityReport {
    /// Share of projection weights stored 2:4-compressed.
    pub fn sparse_fraction(&self) -> f64 {
        let n = self.projections.len();
        if n == 0 {
            return 0.0;
        }
        self.projections.iter().filter(|p| p.2).count() as f64 / n as f64
    }
}

/// Where and in what dtype the weights go.
struct Placement {
    device: Device,
    dtype: DType,
}

impl Placement {
    fn put(&self, t: Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }
}

/// A projection as `Linear`: compressed when it follows 2:4, `sparse` allows
/// and the model runs on the CPU (the sparse kernel is CPU code).
fn projection(
    w: &Weights,
    name: &str,
    shape: [usize; 2],
    bias: Option<Tensor>,
    sparse: SparseMode,
    at: &Placement,
    report: &mut SparsityReport,
) -> Result<Linear> {
    let weight = w.load(&format!("{name}.weight"), &shape)?;
    projection_of(w, name, weight, bias, sparse, at, report)
}

/// A fused projection of `shape`, read once and split by rows into `parts`
/// (Phi-3 keeps q, k and v in one matrix, and the MLP's gate and up in another).
fn fused_projections(
    w: &Weights,
    name: &str,
    shape: [usize; 2],
    parts: &[std::ops::Range<usize>],
    sparse: SparseMode,
    at: &Placement,
    report: &mut SparsityReport,
) -> Result<Vec<Linear>> {
    if w.has(&format!("{name}.bias")) {
        bail!("{}: {name}.bias is a bias of a fused matrix, which terse does not split", w.dir.display());
    }
    let weight = w.load(&format!("{name}.weight"), &shape)?;
    parts.iter().map(|rows| projection_of(w, name, weight.narrow(0, rows.start, rows.len())?.contiguous()?, None, sparse, at, report)).collect()
}

/// The projection `name` (the tensor `weight`, already loaded) as `Linear`.
fn projection_of(
    w: &Weights,
    name: &str,
    weight: Tensor,
    bias: Option<Tensor>,
    sparse: SparseMode,
    at: &Placement,
    report: &mut SparsityReport,
) -> Result<Linear> {
    let (rows, cols) = weight.dims2()?;
    let shape = [rows, cols];
    let values = weight.flatten_all()?.to_vec1::<f32>()?;
    let zeros = values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len().max(1) as f64;
    let dense_bytes = (values.len() * at.dtype.size_in_bytes()) as u64;
    report.dense_bytes += dense_bytes;
    if sparse == SparseMode::Auto && at.device.is_cpu() {
        match Sparse24::compress(&values, shape[0], shape[1]) {
            Ok(s) => {
                // Kept in the checkpoint's half type when it has one (exact:
                // the values came from it), so decode reads 5 bytes a group, not 9.
                let s = match w.dtype_of(&format!("{name}.weight")).as_deref() {
                    Some("bf16") => s.narrowed(Precision::Bf16).unwrap_or_else(|s| s),
                    Some("f16") => s.narrowed(Precision::F16).unwrap_or_else(|s| s),
                    _ => s,
                };
                report.stored_bytes += s.storage_bytes() as u64;
                report.projections.push((format!("{name}.weight"), zeros, true));
                return Ok(Linear::sparse(s, bias));
            }
            // Only worth a warning when the weight looks pruned but breaks the pattern.
            Err(why) if zeros >= 0.25 => {
                tracing::warn!("{name}.weight stays dense: it breaks the 2:4 pattern at {why}");
            }
            Err(_) => {}
        }
    }
    report.stored_bytes += dense_bytes;
    report.projections.push((format!("{name}.weight"), zeros, false));
    let bias = bias.map(|b| at.put(b)).transpose()?;
    Ok(Linear::dense_as(at.put(weight)?, bias, at.dtype)?)
}

/// Load a Hugging Face directory as a servable model, on the CPU.
pub fn load_hf_dir(dir: &Path, served_name: &str, sparse: SparseMode) -> Result<(LoadedModel, SparsityReport)> {
    load_hf_dir_on(dir, served_name, sparse, &Device::Cpu)
}

/// Load a Hugging Face directory onto `device`, dense weights in the
/// device's compute dtype (f32 on the CPU, bf16 on a GPU).
pub fn load_hf_dir_on(dir: &Path, served_name: &str, sparse: SparseMode, device: &Device) -> Result<(LoadedModel, SparsityReport)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let hf = HfConfig::parse(&text).with_context(|| format!("parsing {}", config_path.display()))?;
    let config = hf.transformer_config().with_context(|| format!("{}", config_path.display()))?;
    let mut tokenizer = TextTokenizer::from_hf_files(&dir.join("tokenizer.json"), &dir.join("tokenizer_config.json"))?;
    let generation_config = dir.join("generation_config.json");
    if generation_config.is_file() {
        tokenizer.add_end_of_turn_from_generation_config(&generation_config)?;
    }
    super::heap::release_free_heap();
    let weights = Weights::open(dir)?;
    let at = Placement { device: device.clone(), dtype: super::dense_compute_dtype(device) };
    if device.is_cuda() && sparse == SparseMode::Auto {
        tracing::info!("on a GPU every weight runs dense: 2:4 sparse kernels are CPU-only for now");
    }

    let (h, kv, ffn) = (config.hidden, config.n_kv_head * config.head_dim, config.ffn_hidden);
    let q_width = config.n_head * config.head_dim;
    let mut report = SparsityReport::default();
    let embedding_table = weights.load("model.embed_tokens.weight", &[config.vocab_size, h])?;
    let norm_offset = config.arch.hf_norm_offset();
    let scale = |name: &str, width: usize| -> Result<RmsNorm> { Ok(RmsNorm::new(at.put((weights.load(name, &[width])? + norm_offset)?)?, config.rms_eps)) };
    let norm = |name: &str| scale(name, h);
    let bias = |name: &str, width: usize| -> Result<Option<Tensor>> {
        let full = format!("{name}.bias");
        if weights.has(&full) {
            Ok(Some(weights.load(&full, &[width])?))
        } else {
            Ok(None)
        }
    };
    let qk_norms = config.arch.norms_q_and_k();
    let head_norm = |name: &str| scale(name, config.head_dim);
    // Gemma 3 norms attention's and the MLP's outputs too; its norm before
    // the MLP has a name of its own.
    let outputs_normed = config.arch.norms_outputs();
    let mut blocks = Vec::with_capacity(config.n_layer);
    for i in 0..config.n_layer {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        let m = format!("{p}.mlp");
        // Phi-3's fused matrices, split by rows: q, k, v; then gate, up.
        let (q, k, v) = if weights.has(&format!("{a}.qkv_proj.weight")) {
            let parts = [0..q_width, q_width..q_width + kv, q_width + kv..q_width + 2 * kv];
            let [q, k, v]: [Linear; 3] = fused_projections(&weights, &format!("{a}.qkv_proj"), [q_width + 2 * kv, h], &parts, sparse, &at, &mut report)?
                .try_into()
                .map_err(|_| anyhow!("three parts"))?;
            (q, k, v)
        } else {
            (
                projection(&weights, &format!("{a}.q_proj"), [q_width, h], bias(&format!("{a}.q_proj"), q_width)?, sparse, &at, &mut report)?,
                projection(&weights, &format!("{a}.k_proj"), [kv, h], bias(&format!("{a}.k_proj"), kv)?, sparse, &at, &mut report)?,
                projection(&weights, &format!("{a}.v_proj"), [kv, h], bias(&format!("{a}.v_proj"), kv)?, sparse, &at, &mut report)?,
            )
        };
        let (gate, up) = if weights.has(&format!("{m}.gate_up_proj.weight")) {
            let [gate, up]: [Linear; 2] = fused_projections(&weights, &format!("{m}.gate_up_proj"), [2 * ffn, h], &[0..ffn, ffn..2 * ffn], sparse, &at, &mut report)?
                .try_into()
                .map_err(|_| anyhow!("two parts"))?;
            (gate, up)
        } else {
            (
                projection(&weights, &format!("{m}.gate_proj"), [ffn, h], None, sparse, &at, &mut report)?,
                projection(&weights, &format!("{m}.up_proj"), [ffn, h], None, sparse, &at, &mut report)?,
            )
        };
        blocks.push(Block {
            spec: config.layer_spec(i),
            post_attn_norm: outputs_normed.then(|| norm(&format!("{p}.post_attention_layernorm.weight"))).transpose()?,
            post_ffn_norm: outputs_normed.then(|| norm(&format!("{p}.post_feedforward_layernorm.weight"))).transpose()?,
            attn_norm: norm(&format!("{p}.input_layernorm.weight"))?,
            attn: Attention {
                q,
                k,
                v,
                o: projection(&weights, &format!("{a}.o_proj"), [h, q_width], None, sparse, &at, &mut report)?,
                q_norm: qk_norms.then(|| head_norm(&format!("{a}.q_norm.weight"))).transpose()?,
                k_norm: qk_norms.then(|| head_norm(&format!("{a}.k_norm.weight"))).transpose()?,
            },
            ffn_norm: norm(&format!("{p}.{}.weight", if outputs_normed { "pre_feedforward_layernorm" } else { "post_attention_layernorm" }))?,
            mlp: Mlp { gate, up, down: projection(&weights, &format!("{m}.down_proj"), [h, ffn], None, sparse, &at, &mut report)? },
        });
    }
    let final_norm = norm("model.norm.weight")?;
    // The head stays dense (like the embedding) whatever its zeros.
    let embedding_table = at.put(embedding_table)?;
    let lm_head = if weights.has("lm_head.weight") && !hf.tie_word_embeddings {
        Linear::dense_as(at.put(weights.load("lm_head.weight", &[config.vocab_size, h])?)?, None, at.dtype)?
    } else {
        Linear::dense_as(embedding_table.clone(), None, at.dtype)?
    };
    let untied_head = weights.has("lm_head.weight") && !hf.tie_word_embeddings;
    let head_elems = if untied_head { config.vocab_size * h } else { 0 };
    let other_bytes = ((embedding_table.elem_count() + head_elems) * at.dtype.size_in_bytes()) as u64;
    let dtype = weights
        .dtype_of("model.layers.0.self_attn.q_proj.weight")
        .or(hf.torch_dtype.clone())
        .unwrap_or_else(|| "f32".into());
    if report.sparse_fraction() > 0.0 {
        tracing::info!(
            "2:4 sparse: {} of {} projections compressed ({} → {} bytes)",
            report.projections.iter().filter(|p| p.2).count(),
            report.projections.len(),
            report.dense_bytes,
            report.stored_bytes
        );
    }
    let info = ModelInfo {
        id: served_name.to_string(),
        arch: config.arch.name().to_string(),
        format: "safetensors".into(),
        dtype,
        context_length: config.context_length,
        vocab_size: config.vocab_size,
        weight_bytes: report.stored_bytes + other_bytes,
        sparse_fraction: report.sparse_fraction(),
        device: super::describe_device(device),
    };
    let embedding = TokenEmbedding::Dense(Embedding::new(embedding_table, h));
    let transformer = Transformer::new(config, embedding, blocks, final_norm, lm_head, device.clone())?;
    Ok((LoadedModel { transformer, tokenizer, info }, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemma-3-270m's config.json, as published (the fields terse reads).
    fn gemma3(extra: serde_json::Value) -> Result<TransformerConfig> {
        let mut config = serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
            "max_position_embeddings": 32768, "vocab_size": 262144, "sliding_window": 512,
            "query_pre_attn_scalar": 256, "final_logit_softcapping": null, "attn_logit_softcapping": null,
            "layer_types": (0..18).map(|i| if (i + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" }).collect::<Vec<_>>(),
        });
        config.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value::<HfConfig>(config).unwrap().transformer_config()
    }

    #[test]
    fn gemma3_configs_are_read_or_refused_by_name() {
        let config = gemma3(serde_json::json!({})).unwrap();
        assert_eq!((config.arch, config.sliding_window, config.sliding_pattern, config.rope_local_theta), (Arch::Gemma3, Some(512), 6, Some(10_000.0)));
        assert!(config.layer_spec(4).window.is_some() && config.layer_spec(5).window.is_none());
        // The pattern from `sliding_window_pattern` alone; linear rope scaling on the global table.
        let scaled = gemma3(serde_json::json!({"layer_types": [], "sliding_window_pattern": 6, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})).unwrap();
        assert_eq!(scaled.sliding_pattern, 6);
        assert_eq!(scaled.rope_freq_factors, Some(vec![8.0; 128]));
        let refused = |extra: serde_json::Value| format!("{:#}", gemma3(extra).unwrap_err());
        assert!(refused(serde_json::json!({"final_logit_softcapping": 30.0})).contains("softcapping"));
        assert!(refused(serde_json::json!({"query_pre_attn_scalar": 168})).contains("query_pre_attn_scalar 168"));
        assert!(refused(serde_json::json!({"layer_types": ["sliding_attention", "full_attention", "full_attention"]})).contains("layer_types[2]"));
        // The vision model, as published: its text model's fields one level down.
        let multimodal = r#"{"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": {"hidden_size": 2560}}"#;
        assert!(format!("{:#}", HfConfig::parse(multimodal).unwrap_err()).contains("vision tower"));
    }

    /// Phi-4-mini's config.json, as published (the fields terse reads; 48
    /// made-up factors per set).
    fn phi4_mini(extra: serde_json::Value) -> Result<TransformerConfig> {
        let short: Vec<f64> = (0..48).map(|i| 1.0 + i as f64 / 100.0).collect();
        let long: Vec<f64> = (0..48).map(|i| 1.0 + i as f64).collect();
        let mut config = serde_json::json!({
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
            "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
            "num_attention_heads": 24, "num_key_value_heads": 8, "partial_rotary_factor": 0.75,
            "rms_norm_eps": 1e-5, "rope_theta": 10_000.0, "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "vocab_size": 200064, "tie_word_embeddings": true,
            "sliding_window": 262144,
            "rope_scaling": {"type": "longrope", "short_factor": short, "long_factor": long},
        });
        config.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value::<HfConfig>(config).unwrap().transformer_config()
    }

    #[test]
    fn phi3_configs_rotate_part_of_each_head_with_one_longrope_set() {
        let config = phi4_mini(serde_json::json!({})).unwrap();
        assert_eq!((config.arch, config.head_dim, config.rotary_dim, config.rope_original_context), (Arch::Phi3, 128, 96, Some(4096)));
        // 131,072 positions outgrow the trained 4,096: the long set, and √(1 + ln 32 / ln 4096).
        assert_eq!(config.rope_freq_factors.as_ref().unwrap()[47], 48.0);
        assert!((config.rope_attn_factor - (1.0 + 32f32.ln() / 4096f32.ln()).sqrt()).abs() < 1e-6);
        // Served at the trained context: the short set, no attention factor.
        let short = phi4_mini(serde_json::json!({"max_position_embeddings": 4096})).unwrap();
        assert_eq!((short.rope_freq_factors.as_ref().unwrap()[47], short.rope_attn_factor), (1.47, 1.0));
        // The checkpoint's own attention factor wins.
        let given = phi4_mini(serde_json::json!({"rope_scaling": {"type": "longrope", "short_factor": vec![1.0; 48], "long_factor": vec![2.0; 48], "attention_factor": 1.5}})).unwrap();
        assert_eq!(given.rope_attn_factor, 1.5);
        let refused = |extra: serde_json::Value| format!("{:#}", phi4_mini(extra).unwrap_err());
        assert!(refused(serde_json::json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}})).contains("holds 1 factors"));
        assert!(refused(serde_json::json!({"partial_rotary_factor": 0.195})).contains("partial_rotary_factor"));
    }
}

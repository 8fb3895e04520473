//! The hyper-parameters of a llama-family transformer, read from GGUF metadata.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;

use super::layer::{Activation, LayerSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    /// Qwen2's layout without q/k/v biases, with an RMS norm of each query and
    /// key head before rotation, and a head size of its own.
    Qwen3,
    /// Embeddings scaled by √hidden; norms before and after attention and the
    /// MLP; q/k norms; a GELU-tanh MLP; sliding-window layers between global
    /// ones, each kind with its own rope base.
    Gemma3,
    /// Llama's block with q, k and v in one matrix and the MLP's gate and up
    /// in another (split at load), rotary embedding on the first part of
    /// each head only, and LongRoPE's two sets of frequency factors (Phi-3,
    /// Phi-4-mini).
    Phi3,
}

impl Arch {
    pub const ALL: [Arch; 5] = [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Gemma3, Arch::Phi3];

    pub fn parse(name: &str) -> Result<Self> {
        match Arch::ALL.into_iter().find(|a| a.name() == name) {
            Some(arch) => Ok(arch),
            None => {
                let known: Vec<&str> = Arch::ALL.iter().map(Arch::name).collect();
                bail!("unsupported architecture `{name}` (terse runs {})", known.join(", "))
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }

    /// Qwen rotates the two halves of each head (NEOX style); GGUF llama weights
    /// rotate adjacent pairs (llama.cpp's NORM style).
    pub fn rope_is_neox(&self) -> bool {
        matches!(self, Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 | Arch::Phi3)
    }

    /// Each query and key head goes through an RMS norm of its own before rotation.
    pub fn norms_q_and_k(&self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }

    /// Attention's and the MLP's outputs go through a norm of their own before
    /// joining the residual stream.
    pub fn norms_outputs(&self) -> bool {
        matches!(self, Arch::Gemma3)
    }

    /// What a Hugging Face checkpoint's RMS norm weights lack of the scale
    /// (Gemma keeps w and computes x · (1 + w); GGUF files keep 1 + w).
    pub fn hf_norm_offset(&self) -> f64 {
        if matches!(self, Arch::Gemma3) {
            1.0
        } else {
            0.0
        }
    }

    /// The embeddings are scaled by √hidden.
    pub fn scales_embeddings(&self) -> bool {
        matches!(self, Arch::Gemma3)
    }

    pub fn activation(&self) -> Activation {
        match self {
            Arch::Gemma3 => Activation::GeluTanh,
            _ => Activation::Silu,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TransformerConfig {
    pub arch: Arch,
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn_hidden: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    pub context_length: usize,
    pub vocab_size: usize,
    /// Rotary embedding on the two halves of each head (Hugging Face layout,
    /// and every qwen2 file); otherwise on adjacent pairs (llama GGUFs, whose
    /// q/k rows llama.cpp permuted).
    pub rope_halves: bool,
    /// Layers that attend only to the last `sliding_window` positions: all
    /// but every `sliding_pattern`-th (Gemma 3: 512 and 6).
    pub sliding_window: Option<usize>,
    pub sliding_pattern: usize,
    /// The rope base of the windowed layers (Gemma 3's 10,000; the global
    /// layers keep `rope_theta`).
    pub rope_local_theta: Option<f32>,
    /// Per rotary frequency (rotary_dim / 2 of them), the factor it is divided
    /// by: Llama 3's rope scaling (a GGUF's `rope_freqs` tensor, or a
    /// `config.json`'s `rope_scaling`), applied to the global rope table.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// How many of each head's first values rotate (`head_dim` but where a
    /// family rotates part of the head: Phi-4-mini's 96 of 128).
    pub rotary_dim: usize,
    /// Every rotary cosine and sine is multiplied by this (LongRoPE's
    /// attention factor, √(1 + ln(s) / ln(original context)) for a context
    /// stretched s times; 1 elsewhere).
    pub rope_attn_factor: f32,
    /// The context a model was trained at before its rope was stretched
    /// (LongRoPE picks its factor set by it).
    pub rope_original_context: Option<usize>,
}

impl TransformerConfig {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let arch_name = content
            .metadata
            .get("general.architecture")
            .context("GGUF metadata lacks general.architecture")?
            .to_string()?
            .clone();
        let arch = Arch::parse(&arch_name)?;
        let get = |key: &str| {
            let full = format!("{arch_name}.{key}");
            content.metadata.get(&full).with_context(|| format!("GGUF metadata lacks {full}"))
        };
        let hidden = get("embedding_length")?.to_u32()? as usize;
        let n_head = get("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = get("attention.head_count_kv")?.to_u32()? as usize;
        // Qwen3's head size is its own (`key_length`), not hidden / heads.
        // Phi-3's `rope.dimension_count` is the rotated part of a head, not its size.
        let head_size = if arch == Arch::Phi3 { get("attention.key_length") } else { get("attention.key_length").or_else(|_| get("rope.dimension_count")) };
        let head_dim = match head_size {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => hidden / n_head,
        };
        let rotary_dim = match get("rope.dimension_count") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => head_dim,
        };
        if rotary_dim == 0 || rotary_dim > head_dim || rotary_dim % 2 == 1 {
            bail!("{arch_name}.rope.dimension_count is {rotary_dim}; it must be even and at most the head size {head_dim}");
        }
        let vocab_size = match get("vocab_size") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => content
                .metadata
                .get("tokenizer.ggml.tokens")
                .context("GGUF metadata lacks a vocabulary")?
                .to_vec()?
                .len(),
        };
        let cfg = TransformerConfig {
            arch,
            n_layer: get("block_count")?.to_u32()? as usize,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            ffn_hidden: get("feed_forward_length")?.to_u32()? as usize,
            rope_theta: get("rope.freq_base").and_then(|v| Ok(v.to_f32()?)).unwrap_or(10_000.0),
            rms_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            context_length: get("context_length")?.to_u32()? as usize,
            vocab_size,
            rope_halves: arch.rope_is_neox(),
            sliding_window: None,
            sliding_pattern: 0,
            rope_local_theta: None,
            rope_freq_factors: None,
            rotary_dim,
            rope_attn_factor: get("rope.scaling.attn_factor").and_then(|v| Ok(v.to_f32()?)).unwrap_or(1.0),
            rope_original_context: get("rope.scaling.original_context_length").ok().and_then(|v| v.to_u32().ok()).map(|v| v as usize),
        };
        // Linear rope scaling (Gemma 3's 4B and larger: ×8 on the global
        // layers) divides every frequency of the global table by the factor.
        let linear = get("rope.scaling.type").ok().and_then(|v| v.to_string().ok().cloned()).filter(|t| t == "linear");
        let factor = get("rope.scaling.factor").ok().and_then(|v| v.to_f32().ok()).filter(|&f| f > 0.0 && f != 1.0);
        let cfg = match (linear, factor) {
            (Some(_), Some(factor)) => TransformerConfig { rope_freq_factors: Some(vec![factor; rotary_dim / 2]), ..cfg },
            _ => cfg,
        };
        let cfg = if arch == Arch::Gemma3 {
            let window = get("attention.sliding_window")?.to_u32()? as usize;
            if window == 0 {
                bail!("{arch_name}.attention.sliding_window is 0; a window holds at least one position");
            }
            // llama.cpp's default: every sixth layer global.
            let pattern = get("attention.sliding_window_pattern").map(|v| v.to_u32().unwrap_or(6) as usize).unwrap_or(6);
            let local = get("rope.local_freq_base").and_then(|v| Ok(v.to_f32()?)).unwrap_or(10_000.0);
            TransformerConfig { sliding_window: Some(window), sliding_pattern: pattern.max(1), rope_local_theta: Some(local), ..cfg }
        } else {
            cfg
        };
        if !(cfg.rope_attn_factor.is_finite() && cfg.rope_attn_factor > 0.0) {
            bail!("{arch_name}.rope.scaling.attn_factor is {}; it must be a positive number", cfg.rope_attn_factor);
        }
        if cfg.n_head == 0 || cfg.n_kv_head == 0 || cfg.n_head % cfg.n_kv_head != 0 {
            bail!("head counts {} / {} are inconsistent", cfg.n_head, cfg.n_kv_head);
        }
        Ok(cfg)
    }

    /// What layer `layer` computes: its activation, window and rope table
    /// (0, the global base; 1, the windowed layers' own).
    pub fn layer_spec(&self, layer: usize) -> LayerSpec {
        let windowed = self.sliding_window.filter(|_| self.sliding_pattern > 0 && !(layer + 1).is_multiple_of(self.sliding_pattern));
        let rope = usize::from(windowed.is_some() && self.rope_local_theta.is_some());
        LayerSpec { activation: self.arch.activation(), window: windowed, rope }
    }

    /// The rope bases the layers' specs name, in table order.
    pub fn rope_bases(&self) -> Vec<f32> {
        let mut bases = vec![self.rope_theta];
        if let (Some(local), Some(_)) = (self.rope_local_theta, self.sliding_window) {
            bases.push(local);
        }
        bases
    }

    /// Bytes of KV cache one token takes in every layer, keys and values in `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: candle_core::DType) -> u64 {
        (self.n_layer * 2 * self.n_kv_head * self.head_dim * dtype.size_in_bytes()) as u64
    }
}

/// LongRoPE's choice for a model served at `context` positions, trained at
/// `original`: one factor set rotates the whole cache, so that every key
/// turns alike, the long one where the context outgrows the trained one (as
/// llama.cpp chooses by its context size); and the attention factor
/// √(1 + ln(s) / ln(original)) for a context stretched s times.
pub fn longrope(context: usize, original: usize) -> (bool, f64) {
    let stretch = context as f64 / original as f64;
    let attn_factor = if stretch > 1.0 { (1.0 + stretch.ln() / (original as f64).ln()).sqrt() } else { 1.0 };
    (context > original, attn_factor)
}

/// Llama 3's rope scaling as per-frequency factors, for a head of `head_dim`
/// rotating with base `theta`: frequencies whose wavelength is below
/// `original / high` keep theirs, those above `original / low` are divided
/// by `factor`, and those between are blended smoothly (the published Llama
/// 3.1 rule; `scaling` is [factor, low, high, original]).
pub fn llama3_freq_factors(theta: f32, head_dim: usize, scaling: [f32; 4]) -> Vec<f32> {
    let [factor, low, high, original] = scaling;
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..head_dim)
        .step_by(2)
        .map(|i| {
            let freq = 1f32 / theta.powf(i as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                let scaled = (1.0 - smooth) * freq / factor + smooth * freq;
                freq / scaled
            }
        })
        .collect()
}

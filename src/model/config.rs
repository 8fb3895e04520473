//! The hyper-parameters of a llama-family transformer, read from GGUF metadata.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            other => bail!("unsupported architecture `{other}` (terse runs llama and qwen2)"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// Qwen rotates the two halves of each head (NEOX style); GGUF llama weights
    /// rotate adjacent pairs (llama.cpp's NORM style).
    pub fn rope_is_neox(&self) -> bool {
        matches!(self, Arch::Qwen2)
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
        let head_dim = match get("rope.dimension_count") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => hidden / n_head,
        };
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
        };
        if cfg.n_head == 0 || cfg.n_kv_head == 0 || cfg.n_head % cfg.n_kv_head != 0 {
            bail!("head counts {} / {} are inconsistent", cfg.n_head, cfg.n_kv_head);
        }
        Ok(cfg)
    }

    /// Bytes of KV cache one token takes in every layer, keys and values in `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: candle_core::DType) -> u64 {
        (self.n_layer * 2 * self.n_kv_head * self.head_dim * dtype.size_in_bytes()) as u64
    }
}

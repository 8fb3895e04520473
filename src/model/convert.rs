//! `terse convert`: a GGUF file to a Hugging Face directory, dequantized, with
//! `config.json`, `tokenizer.json`, `tokenizer_config.json` and
//! `generation_config.json` built from the GGUF's own metadata. This gives the
//! project real dense weights to test safetensors loading and 2:4 pruning with.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::{Arch, TransformerConfig};
use crate::tokenize::TextTokenizer;

/// The Hugging Face name of a GGUF tensor of `arch`'s layout.
fn hf_name(gguf: &str, arch: Arch) -> Option<String> {
    if let Some(rest) = gguf.strip_prefix("blk.") {
        let (layer, part) = rest.split_once('.')?;
        let (module, kind) = part.rsplit_once('.')?;
        let hf = match module {
            "attn_norm" => "input_layernorm",
            // Gemma 3 norms attention's output with its `post_attention_layernorm`.
            "ffn_norm" if arch == Arch::Gemma3 => "pre_feedforward_layernorm",
            "post_attention_norm" if arch == Arch::Gemma3 => "post_attention_layernorm",
            "post_ffw_norm" if arch == Arch::Gemma3 => "post_feedforward_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            "ffn_gate" => "mlp.gate_proj",
            // Phi-3 keeps q, k and v in one matrix, and gate and up in another.
            "attn_qkv" => "self_attn.qkv_proj",
            "ffn_up" if arch == Arch::Phi3 => "mlp.gate_up_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            _ => return None,
        };
        return Some(format!("model.layers.{layer}.{hf}.{kind}"));
    }
    Some(
        match gguf {
            "token_embd.weight" => "model.embed_tokens.weight",
            "output_norm.weight" => "model.norm.weight",
            "output.weight" => "lm_head.weight",
            _ => return None,
        }
        .to_string(),
    )
}

/// llama.cpp stores llama q/k rows permuted so that rotary pairs are adjacent;
/// Hugging Face keeps each head's two halves apart. Undo it per head.
fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let half = rows / heads / 2;
    Ok(t.reshape((heads, half, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

/// Convert the GGUF at `gguf` into the directory `out` (created), weights in `dtype` (f32 or bf16).
pub fn convert_gguf_to_hf(gguf: &Path, out: &Path, dtype: DType) -> Result<()> {
    let mut file = File::open(gguf).with_context(|| format!("opening {}", gguf.display()))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| anyhow!("{} is not a readable GGUF file: {e}", gguf.display()))?;
    let config = TransformerConfig::from_gguf(&content)?;
    // Linear scaling (one factor for every frequency: Gemma 3's 4B and up)
    // and LongRoPE's two factor sets are written to config.json below;
    // Llama 3's per-frequency `rope_freqs` keep no record of the four
    // numbers config.json gives them by.
    let linear = match config.rope_freq_factors.as_deref() {
        Some([first, rest @ ..]) if rest.iter().all(|f| f == first) => Some(*first),
        _ => None,
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") || (config.rope_freq_factors.is_some() && linear.is_none()) {
        anyhow::bail!("{}: its rope scaling (rope_freqs) has no config.json form here; the directory would run unscaled", gguf.display());
    }
    let tokenizer = TextTokenizer::from_gguf(&content)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        if name.starts_with("rope_factors_") {
            continue; // LongRoPE's factors go to config.json
        }
        let Some(hf) = hf_name(name, config.arch) else {
            tracing::warn!("{}: tensor {name} has no Hugging Face counterpart; left out", gguf.display());
            continue;
        };
        let q = content.tensor(&mut file, name, &Device::Cpu).with_context(|| format!("{}: tensor {name}", gguf.display()))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if config.arch == Arch::Llama && !config.rope_halves {
            if name.ends_with("attn_q.weight") {
                t = unpermute_rows(&t, config.n_head)?;
            } else if name.ends_with("attn_k.weight") {
                t = unpermute_rows(&t, config.n_kv_head)?;
            }
        }
        if hf.ends_with("norm.weight") {
            t = (t - config.arch.hf_norm_offset())?;
        }
        tensors.insert(hf, t.to_dtype(dtype)?);
    }
    let tied = !tensors.contains_key("lm_head.weight");
    let vocab_rows = tensors
        .get("model.embed_tokens.weight")
        .ok_or_else(|| anyhow!("{} has no token_embd.weight", gguf.display()))?
        .dim(0)?;
    let weights = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights).with_context(|| format!("writing {}", weights.display()))?;

    let (class, model_type) = match config.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Arch::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
        Arch::Phi3 => ("Phi3ForCausalLM", "phi3"),
    };
    let torch_dtype = if dtype == DType::BF16 { "bfloat16" } else { "float32" };
    let mut hf_config = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": config.hidden,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.context_length,
        "vocab_size": vocab_rows,
        "tie_word_embeddings": tied,
        "torch_dtype": torch_dtype,
        "hidden_act": "silu",
    });
    if config.arch == Arch::Gemma3 {
        let window = config.sliding_window.context("a gemma3 file without its window")?;
        let layer_types: Vec<&str> = (0..config.n_layer)
            .map(|i| if config.layer_spec(i).window.is_some() { "sliding_attention" } else { "full_attention" })
            .collect();
        let extra = json!({
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": false,
            "sliding_window": window,
            "sliding_window_pattern": config.sliding_pattern,
            "layer_types": layer_types,
            "rope_local_base_freq": config.rope_local_theta.unwrap_or(10_000.0),
            "query_pre_attn_scalar": config.head_dim,
            "final_logit_softcapping": null,
            "attn_logit_softcapping": null,
        });
        hf_config.as_object_mut().expect("an object").extend(extra.as_object().expect("an object").clone());
    }
    if let Some(factor) = linear {
        hf_config["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
    }
    if config.arch == Arch::Phi3 {
        let mut extra = json!({"partial_rotary_factor": config.rotary_dim as f64 / config.head_dim as f64});
        if content.tensor_infos.contains_key("rope_factors_long.weight") {
            let mut factors = |name: &str| -> Result<Vec<f32>> {
                let t = content.tensor(&mut file, name, &Device::Cpu).with_context(|| format!("{}: tensor {name}", gguf.display()))?;
                Ok(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
            };
            let original = config.rope_original_context.with_context(|| format!("{}: LongRoPE factors without rope.scaling.original_context_length", gguf.display()))?;
            extra["rope_scaling"] = json!({
                "type": "longrope",
                "short_factor": factors("rope_factors_short.weight")?,
                "long_factor": factors("rope_factors_long.weight")?,
                "attention_factor": config.rope_attn_factor,
            });
            extra["original_max_position_embeddings"] = json!(original);
        }
        hf_config.as_object_mut().expect("an object").extend(extra.as_object().expect("an object").clone());
    }
    write_json(&out.join("config.json"), &hf_config)?;

    let tokenizer_json = out.join("tokenizer.json");
    tokenizer
        .inner()
        .save(&tokenizer_json, false)
        .map_err(|e| anyhow!("writing {}: {e}", tokenizer_json.display()))?;
    let token_text = |key: &str| -> Option<String> {
        let id = content.metadata.get(key)?.to_u32().ok()?;
        tokenizer.inner().id_to_token(id)
    };
    let mut tokenizer_config = json!({"tokenizer_class": "PreTrainedTokenizerFast"});
    if let Some(template) = tokenizer.chat_template_source() {
        tokenizer_config["chat_template"] = json!(template);
    }
    if let Some(bos) = token_text("tokenizer.ggml.bos_token_id") {
        tokenizer_config["bos_token"] = json!(bos);
    }
    if let Some(eos) = token_text("tokenizer.ggml.eos_token_id") {
        tokenizer_config["eos_token"] = json!(eos);
    }
    if let Some(add_bos) = content.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()) {
        tokenizer_config["add_bos_token"] = json!(add_bos);
    }
    write_json(&out.join("tokenizer_config.json"), &tokenizer_config)?;
    write_json(&out.join("generation_config.json"), &json!({"eos_token_id": tokenizer.end_of_turn_ids()}))?;
    Ok(())
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

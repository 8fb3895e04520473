//! `terse prune --pattern 2:4`: one-shot magnitude pruning of a Hugging Face
//! directory. Every q/k/v/o/gate/up/down projection keeps the two largest |w|
//! of each group of four input weights; embeddings, norms and the head stay
//! dense. Everything else in the directory is copied as it is.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::sparse::prune_2_4;

const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Whether `name` is a projection weight the 2:4 pattern applies to.
pub fn is_projection_weight(name: &str) -> bool {
    name.strip_suffix(".weight")
        .and_then(|n| n.rsplit('.').next())
        .is_some_and(|last| PROJECTIONS.contains(&last))
}

/// Prune the directory `src` into `dst` (created); returns how many matrices were pruned.
pub fn prune_hf_dir(src: &Path, dst: &Path) -> Result<usize> {
    if src == dst {
        bail!("prune writes a new directory; --out must differ from the input");
    }
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut pruned = 0;
    let mut saw_weights = false;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let path = entry?.path();
        let Some(file_name) = path.file_name() else { continue };
        let target = dst.join(file_name);
        if path.extension().is_some_and(|e| e == "safetensors") {
            saw_weights = true;
            pruned += prune_file(&path, &target)?;
        } else if path.is_file() {
            std::fs::copy(&path, &target).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    if !saw_weights {
        bail!("{} holds no .safetensors file", src.display());
    }
    Ok(pruned)
}

fn prune_file(src: &Path, dst: &Path) -> Result<usize> {
    let file = unsafe { MmapedSafetensors::new(src) }.map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", src.display()))?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut pruned = 0;
    for (name, _) in file.tensors() {
        let t = file.load(&name, &Device::Cpu).map_err(|e| anyhow!("{}: tensor {name}: {e}", src.display()))?;
        if is_projection_weight(&name) {
            let (rows, cols) = t.dims2().with_context(|| format!("{}: tensor {name} is not a matrix", src.display()))?;
            let dtype = t.dtype();
            let mut values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            prune_2_4(&mut values, cols).map_err(|e| anyhow!("{}: tensor {name}: {e}", src.display()))?;
            out.insert(name, Tensor::from_vec(values, (rows, cols), &Device::Cpu)?.to_dtype(dtype)?);
            pruned += 1;
        } else {
            out.insert(name, t);
        }
    }
    candle_core::safetensors::save(&out, dst).with_context(|| format!("writing {}", dst.display()))?;
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projections_are_told_from_other_weights() {
        assert!(is_projection_weight("model.layers.3.self_attn.q_proj.weight"));
        assert!(is_projection_weight("model.layers.0.mlp.down_proj.weight"));
        assert!(!is_projection_weight("model.layers.0.self_attn.q_proj.bias"));
        assert!(!is_projection_weight("model.embed_tokens.weight"));
        assert!(!is_projection_weight("lm_head.weight"));
        assert!(!is_projection_weight("model.layers.0.input_layernorm.weight"));
    }
}

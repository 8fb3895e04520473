//! Weights to logits: GGUF loading and our own batched transformer forward pass.

mod config;
mod convert;
mod gguf;
mod hf;
mod kv_cache;
mod linear;
mod prune;
pub mod sparse;
mod synthetic;
mod transformer;

pub use config::{Arch, TransformerConfig};
pub use convert::convert_gguf_to_hf;
pub use prune::{is_projection_weight, prune_hf_dir};
pub use gguf::{load_gguf, load_gguf_dequantized, LoadedModel};
pub use hf::{load_hf_dir, HfConfig, SparseMode, SparsityReport};
pub use kv_cache::SeqKvCache;
pub use linear::Linear;
pub use synthetic::{write_random_gguf, SyntheticSpec};
pub use transformer::{SeqChunk, Transformer};

/// What the server says about the model it serves.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The name clients pass as `model`.
    pub id: String,
    pub arch: String,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// The dominant weight type, e.g. `q4_1`.
    pub dtype: String,
    pub context_length: usize,
    pub vocab_size: usize,
    pub weight_bytes: u64,
    /// Share of projection weights stored 2:4-sparse (0 until sparse loading lands).
    pub sparse_fraction: f64,
}

//! Weights to logits: GGUF loading and our own batched transformer forward pass.

mod config;
mod convert;
mod decode_graph;
mod device;
mod gguf;
mod float_matrix;
mod heap;
mod hf;
mod host_attention;
mod host_pages;
mod host_path;
mod kernel;
mod kv_cache;
mod kv_pages;
mod layer;
mod linear;
mod page_book;
mod paged_attention;
mod prune;
mod row_ops;
pub mod quant;
pub mod sparse;
mod synthetic;
mod tensor_path;
mod threads;
mod transformer;

pub use config::{llama3_freq_factors, Arch, TransformerConfig};
pub use convert::convert_gguf_to_hf;
pub use decode_graph::{CudaGraphs, DecodingRow, GraphBuckets, StaticDecodeInputs};
pub use device::{dense_compute_dtype, describe as describe_device, DeviceSpec};
pub use prune::{is_projection_weight, prune_hf_dir};
pub use gguf::{load_gguf, load_gguf_dequantized, load_gguf_on, read_head_rows, LoadedModel};
pub use hf::{load_hf_dir, load_hf_dir_on, HfConfig, SparseMode, SparsityReport};
pub use host_attention::KvPrecision;
pub use page_book::PrefixCacheStats;
pub use kv_cache::{SeqChunk, SeqKvCache};
pub use linear::Linear;
pub use synthetic::{write_random_gguf, write_tokenizer_gguf, SyntheticSpec};
pub use layer::{Activation, Attention, Block, LayerSpec, Mlp};
pub use transformer::{BackendKind, Rows, StepLogits, TokenEmbedding, Transformer};

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
    /// Share of projection weights stored 2:4-sparse.
    pub sparse_fraction: f64,
    /// Where it runs: `cpu` or `cuda:N`.
    pub device: String,
}

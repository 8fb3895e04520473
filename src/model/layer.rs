//! One transformer layer: its weights, and what it computes as data
//! ([`LayerSpec`]), so that each backend has ONE block function that reads
//! the spec instead of a copy of the block per family.

use candle_nn::RmsNorm;

use super::linear::Linear;

pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// RMS norms of each query and key head (head_dim weights), before rotation (Qwen3).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
}

pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// The gated MLP's activation: `act(gate) · up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// SiLU (llama, qwen2, qwen3).
    #[default]
    Silu,
    /// GELU, tanh approximation (gemma3).
    GeluTanh,
}

/// How one layer computes, beyond its weights. Norms sit before attention
/// and before the MLP (and after each, where the block has those norms),
/// each output adding back into the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerSpec {
    pub activation: Activation,
    /// Attend only to the last this many positions (Gemma 3's local layers).
    pub window: Option<usize>,
    /// Which of the model's rotary tables the layer's attention rotates with.
    pub rope: usize,
}

pub struct Block {
    pub spec: LayerSpec,
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    /// On attention's output, before it joins the residual stream (gemma3).
    pub post_attn_norm: Option<RmsNorm>,
    pub ffn_norm: RmsNorm,
    pub mlp: Mlp,
    /// On the MLP's output, before it joins the residual stream (gemma3).
    pub post_ffn_norm: Option<RmsNorm>,
}

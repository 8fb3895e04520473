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
}

pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// The gated MLP's activation: `act(gate) · up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// SiLU (llama, qwen2).
    #[default]
    Silu,
}

/// How one layer computes, beyond its weights' shapes. Norms sit before
/// attention and before the MLP, each adding back into the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerSpec {
    pub activation: Activation,
    /// Which of the model's rotary tables the layer's attention rotates with.
    pub rope: usize,
}

pub struct Block {
    pub spec: LayerSpec,
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub ffn_norm: RmsNorm,
    pub mlp: Mlp,
}

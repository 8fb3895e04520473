//! One linear layer behind one interface, whatever its weights' format.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

pub struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
    /// candle multiplies a single row of Q6_K with a compact GEMV kernel and two
    /// or more rows with repacked tiles, whose results differ in the last bits.
    /// Running a lone row as two keeps every row on the tiled kernel, so a
    /// sequence's logits do not depend on how many others share its step.
    pad_single_row: bool,
}

impl Linear {
    pub fn from_qtensor(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let pad_single_row = weight.dtype() == GgmlDType::Q6K;
        Ok(Linear { weight: QMatMul::from_qtensor(weight)?, bias, pad_single_row })
    }

    /// `xs` is (rows, in); every row's result is computed independently of
    /// the other rows, so a sequence gets the same bits alone or in a batch.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = if self.pad_single_row && xs.dim(0)? == 1 {
            let two = Tensor::cat(&[xs, xs], 0)?;
            self.weight.forward(&two)?.narrow(0, 0, 1)?
        } else {
            self.weight.forward(xs)?
        };
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

//! One linear layer behind one interface, whatever its weights' format:
//! quantized (GGUF: our kernels for Q4_1 / Q5_0 / Q8_0 / Q4_K / Q6_K, and
//! F16 / BF16 in their own precision, on the CPU; candle's for the rest and
//! on a GPU), dense, or 2:4 sparse.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};

use super::float_matrix::FloatMatrix;
use super::quant::{QuantMatrix, QuantizedRows};
use super::sparse::Sparse24;

enum Weight {
    /// candle's quantized or dense matmul.
    Candle(QMatMul),
    /// Our kernels for Q4_1, Q5_0, Q8_0, Q4_K and Q6_K blocks (CPU only).
    Quant(Arc<QuantMatrix>),
    /// Our 2:4 sparse kernel.
    Sparse(Sparse24),
    /// Our dense f16 / bf16 kernel (GGUF's F16 and BF16 tensors, CPU only).
    Float(Arc<FloatMatrix>),
}

pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// The bias as plain f32 (when it is f32 on the CPU), for `forward_rows_into`.
    host_bias: Option<Vec<f32>>,
    /// candle multiplies a single row of Q6_K with a compact GEMV kernel and two
    /// or more rows with repacked tiles, whose results differ in the last bits
    /// (seen on the CPU, where our kernels now take Q6_K; kept for candle's
    /// other devices).
    /// Running a lone row as two keeps every row on the tiled kernel, so a
    /// sequence's logits do not depend on how many others share its step.
    pad_single_row: bool,
}

impl Linear {
    fn with(weight: Weight, bias: Option<Tensor>, pad_single_row: bool) -> Self {
        let host_bias = bias
            .as_ref()
            .filter(|b| b.device().is_cpu() && b.dtype() == DType::F32)
            .and_then(|b| b.flatten_all().and_then(|b| b.to_vec1::<f32>()).ok());
        Linear { weight, bias, host_bias, pad_single_row }
    }

    /// candle's quantized matmul (formats our kernels do not read, and other
    /// devices; on the CPU the loader repacks the others straight from the file).
    pub fn from_qtensor(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let pad_single_row = weight.dtype() == GgmlDType::Q6K;
        Ok(Self::with(Weight::Candle(QMatMul::from_qtensor(weight)?), bias, pad_single_row))
    }

    /// A dense (out × in) weight, computed in f32.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::dense_as(weight, bias, DType::F32)
    }

    /// A dense (out × in) weight, computed in `dtype` (bf16 on a GPU).
    pub fn dense_as(weight: Tensor, bias: Option<Tensor>, dtype: DType) -> Result<Self> {
        let weight = weight.to_dtype(dtype)?.contiguous()?;
        let bias = bias.map(|b| b.to_dtype(dtype)).transpose()?;
        Ok(Self::with(Weight::Candle(QMatMul::Tensor(weight)), bias, false))
    }

    /// A matrix of ours, repacked at load.
    pub fn quant(matrix: Arc<QuantMatrix>, bias: Option<Tensor>) -> Self {
        Self::with(Weight::Quant(matrix), bias, false)
    }

    /// A quantized matrix that something else (a tied embedding) shares.
    pub fn shared_quant(matrix: Arc<QuantMatrix>) -> Self {
        Self::with(Weight::Quant(matrix), None, false)
    }

    /// An f16 or bf16 matrix, multiplied in its own precision.
    pub fn float(matrix: Arc<FloatMatrix>, bias: Option<Tensor>) -> Self {
        Self::with(Weight::Float(matrix), bias, false)
    }

    pub fn sparse(weight: Sparse24, bias: Option<Tensor>) -> Self {
        Self::with(Weight::Sparse(weight), bias, false)
    }

    pub fn is_sparse(&self) -> bool {
        matches!(self.weight, Weight::Sparse(_))
    }

    /// Each layer applied to the same `xs`, as `forward` would. When all run on
    /// our quantized kernels, `xs` is quantized once and one hand-out of work
    /// to the threads covers every layer's rows: the same bits, fewer steps.
    pub fn forward_many(layers: &[&Linear], xs: &Tensor) -> Result<Vec<Tensor>> {
        let Some(matrices) = Self::our_matrices(layers) else {
            return layers.iter().map(|l| l.forward(xs)).collect();
        };
        let n = xs.dim(0)?;
        let input = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        QuantMatrix::matmul_t_many(&matrices, &input, n)
            .into_iter()
            .zip(layers)
            .map(|(ys, layer)| layer.add_bias(Tensor::from_vec(ys, (n, layer.out_features()), xs.device())?))
            .collect()
    }

    /// The layers' matrices, when our quantized kernels run every one.
    fn our_matrices<'a>(layers: &[&'a Linear]) -> Option<Vec<&'a QuantMatrix>> {
        layers.iter().map(|l| l.our_matrix()).collect()
    }

    /// The layer's matrix, when our quantized kernels run it.
    fn our_matrix(&self) -> Option<&QuantMatrix> {
        match &self.weight {
            Weight::Quant(q) => Some(q),
            _ => None,
        }
    }

    /// `forward` on plain f32 rows (`xs` is n × in), into `out`: our kernels
    /// read and write the rows as they are, quantizing `xs` into `acts`, and
    /// reuse both buffers (no allocation once they are large enough); the
    /// sparse kernel and candle's matmuls (through a tensor) allocate.
    pub fn forward_rows_into(&self, xs: &[f32], n: usize, acts: &mut QuantizedRows, out: &mut Vec<f32>) -> Result<()> {
        Self::forward_many_rows_into([self], xs, n, acts, [out])
    }

    /// `forward_many` on plain f32 rows, into `outs`, as `forward_rows_into`.
    pub fn forward_many_rows_into<const M: usize>(layers: [&Linear; M], xs: &[f32], n: usize, acts: &mut QuantizedRows, mut outs: [&mut Vec<f32>; M]) -> Result<()> {
        let ours = layers.map(Linear::our_matrix);
        if ours.iter().all(Option::is_some) {
            let matrices = ours.map(|m| m.expect("checked: every layer runs on our kernels"));
            QuantMatrix::matmul_t_into(matrices, xs, n, acts, outs.each_mut().map(|o| &mut **o));
            for (layer, out) in layers.iter().zip(outs) {
                layer.add_host_bias(out)?;
            }
            return Ok(());
        }
        for (layer, out) in layers.iter().zip(outs) {
            match &layer.weight {
                // candle's forward adds the bias itself.
                Weight::Candle(_) => {
                    let t = Tensor::from_vec(xs.to_vec(), (n, xs.len() / n.max(1)), &candle_core::Device::Cpu)?;
                    *out = layer.forward(&t)?.flatten_all()?.to_vec1::<f32>()?;
                }
                Weight::Sparse(s) => {
                    *out = s.matmul_t(xs, n);
                    layer.add_host_bias(out)?;
                }
                Weight::Quant(q) => {
                    *out = q.matmul_t(xs, n);
                    layer.add_host_bias(out)?;
                }
                Weight::Float(h) => {
                    *out = h.matmul_t(xs, n);
                    layer.add_host_bias(out)?;
                }
            }
        }
        Ok(())
    }

    /// The bias added to every row, as `broadcast_add` adds it.
    fn add_host_bias(&self, ys: &mut [f32]) -> Result<()> {
        match (&self.bias, &self.host_bias) {
            (None, _) => {}
            (Some(_), Some(b)) if !b.is_empty() && ys.len().is_multiple_of(b.len()) => {
                for row in ys.chunks_exact_mut(b.len()) {
                    super::row_ops::add_assign(row, b);
                }
            }
            (Some(_), _) => candle_core::bail!("a bias that is not f32 on the CPU, or of the wrong width, on the CPU's f32 path"),
        }
        Ok(())
    }

    fn out_features(&self) -> usize {
        match &self.weight {
            Weight::Candle(w) => match w {
                QMatMul::QTensor(t) => t.shape().dims()[0],
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims()[0],
            },
            Weight::Quant(q) => q.rows(),
            Weight::Sparse(s) => s.rows(),
            Weight::Float(h) => h.rows(),
        }
    }

    fn add_bias(&self, ys: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }

    /// `xs` is (rows, in); every row's result is computed independently of
    /// the other rows, so a sequence gets the same bits alone or in a batch.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = match &self.weight {
            Weight::Candle(w) if self.pad_single_row && xs.dim(0)? == 1 => {
                let two = Tensor::cat(&[xs, xs], 0)?;
                w.forward(&two)?.narrow(0, 0, 1)?
            }
            Weight::Candle(w) => w.forward(xs)?,
            Weight::Quant(q) => {
                let n = xs.dim(0)?;
                let input = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(q.matmul_t(&input, n), (n, q.rows()), xs.device())?
            }
            Weight::Sparse(s) => {
                let n = xs.dim(0)?;
                let input = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(s.matmul_t(&input, n), (n, s.rows()), xs.device())?
            }
            Weight::Float(h) => {
                let n = xs.dim(0)?;
                let input = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(h.matmul_t(&input, n), (n, h.rows()), xs.device())?
            }
        };
        self.add_bias(ys)
    }
}

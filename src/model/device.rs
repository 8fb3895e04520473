//! Where the model runs: `--device cpu|cuda[:N]`.
//!
//! The CPU build knows the `cuda` spelling too, so that asking a CPU-only
//! binary for a GPU is one clear error at start instead of "unknown value".

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => return Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => return Ok(DeviceSpec::Cuda(0)),
            _ => {}
        }
        if let Some(n) = s.strip_prefix("cuda:") {
            return n.parse().map(DeviceSpec::Cuda).map_err(|_| format!("`{s}`: the GPU ordinal after `cuda:` must be a number, e.g. cuda:0"));
        }
        Err(format!("`{s}` is no device: use cpu, cuda or cuda:N"))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Open the device, or say in one line why it cannot be used.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => open_cuda(ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    // cudarc can panic (not return) when the driver library is a stub or the
    // driver is too old; a start-up error must still be one line.
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    match opened {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => bail!("cannot use GPU cuda:{ordinal}: {}", first_line(&e.to_string())),
        Err(_) => bail!("cannot use GPU cuda:{ordinal}: the CUDA driver could not be initialised (is there a GPU and an NVIDIA driver?)"),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    bail!("cannot use GPU cuda:{ordinal}: this terse was built without CUDA; build it with `--features cuda` (see docs/gpu.md)")
}

#[cfg(feature = "cuda")]
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// The dtype activations, dense weights and the KV cache take on `device`:
/// f32 on the CPU (our kernels and candle's CPU matmuls are f32), bf16 on a GPU
/// for dense weights (half the bytes each decode step reads). Quantized GGUF
/// weights run in f32 everywhere: candle's quantized matmuls take f32 input.
pub fn dense_compute_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// A device's name for logs and `/v1/models`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("CUDA".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert!("cuda:x".parse::<DeviceSpec>().unwrap_err().contains("ordinal"));
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("cpu, cuda or cuda:N"));
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
    }

    #[test]
    fn cpu_opens() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_one_clear_line() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("built without CUDA") && e.contains("--features cuda"), "{e}");
        assert!(!e.contains('\n'));
    }
}

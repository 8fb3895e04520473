//! Which instruction set the CPU kernels (quantized, 2:4 sparse, attention)
//! run with, chosen at run time: one binary is fast where AVX2 exists and
//! still correct where it does not. Each kernel module adds its own methods.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        // F16C (half-precision loads) comes with every AVX2 CPU.
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
            return Kernel::Avx2;
        }
        Kernel::Scalar
    }
}

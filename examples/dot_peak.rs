//! The ceiling our quantized kernels work under: how many 8-bit
//! multiply-adds per second this CPU's `vpdpbusd` can issue, beside the
//! clock: on one core with 256- and 512-bit vectors, and on every core at
//! once with 512-bit ones. Twelve
//! independent accumulators, so the figure is the instruction's throughput,
//! not its latency. A kernel's GMAC/s (`kernel_hot`) over this figure is the
//! share of the arithmetic ceiling it reaches.
//!
//!     cargo run --release --example dot_peak
//!
//! x86-64 with AVX-512 VNNI only (it says so and stops elsewhere).

#[cfg(target_arch = "x86_64")]
mod probe {
    use std::arch::asm;
    use std::time::Instant;

    const ROUNDS: u64 = 20_000_000;

    /// Cycles per second, from a chain of dependent adds (one a cycle).
    pub fn clock_hz() -> f64 {
        let n: u64 = 400_000_000;
        let start = Instant::now();
        // SAFETY: registers only.
        unsafe {
            asm!("2:", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "sub {n}, 4", "jnz 2b",
                 x = inout(reg) 0u64 => _, n = inout(reg) n => _);
        }
        n as f64 / start.elapsed().as_secs_f64()
    }

    /// Twelve `vpdpbusd` on registers of one width ("ymm" or "zmm"), each
    /// into its own sum.
    macro_rules! twelve {
        ($w:literal) => {
            concat!(
                "vpdpbusd ", $w, "0, ", $w, "14, ", $w, "15\n", "vpdpbusd ", $w, "1, ", $w, "14, ", $w, "15\n",
                "vpdpbusd ", $w, "2, ", $w, "14, ", $w, "15\n", "vpdpbusd ", $w, "3, ", $w, "14, ", $w, "15\n",
                "vpdpbusd ", $w, "4, ", $w, "14, ", $w, "15\n", "vpdpbusd ", $w, "5, ", $w, "14, ", $w, "15\n",
                "vpdpbusd ", $w, "6, ", $w, "14, ", $w, "15\n", "vpdpbusd ", $w, "7, ", $w, "14, ", $w, "15\n",
                "vpdpbusd ", $w, "8, ", $w, "14, ", $w, "15\n", "vpdpbusd ", $w, "9, ", $w, "14, ", $w, "15\n",
                "vpdpbusd ", $w, "10, ", $w, "14, ", $w, "15\n", "vpdpbusd ", $w, "11, ", $w, "14, ", $w, "15\n",
            )
        };
    }

    /// Multiply-adds per second of `vpdpbusd` on 512-bit vectors (`wide`,
    /// 64 a call) or 256-bit ones (32 a call).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, VL and VNNI.
    pub unsafe fn macs(wide: bool) -> f64 {
        let start = Instant::now();
        // SAFETY: registers only, every one written declared (the operands
        // zeroed first); the caller promised the features.
        unsafe {
            macro_rules! run {
                ($w:literal) => {
                    asm!("vpxord zmm14, zmm14, zmm14", "vpxord zmm15, zmm15, zmm15", "2:", twelve!($w), "dec {i}", "jnz 2b",
                         i = inout(reg) ROUNDS => _,
                         out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                         out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                         out("zmm14") _, out("zmm15") _)
                };
            }
            if wide {
                run!("zmm")
            } else {
                run!("ymm")
            }
        }
        (ROUNDS * 12 * if wide { 64 } else { 32 }) as f64 / start.elapsed().as_secs_f64()
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    if !(std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") && std::is_x86_feature_detected!("avx512vnni")) {
        println!("this CPU has no AVX-512 VNNI: nothing to measure");
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for run in 1..=3 {
        // SAFETY: the features were checked above.
        let (clock, ymm, zmm) = unsafe { (probe::clock_hz(), probe::macs(false), probe::macs(true)) };
        // Every core at once: the sum of their rates.
        let all: f64 = std::thread::scope(|s| {
            // SAFETY: the features were checked above.
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(|| unsafe { probe::macs(true) })).collect();
            handles.into_iter().map(|h| h.join().expect("probe thread")).sum()
        });
        println!(
            "run {run}: clock {:.2} GHz; vpdpbusd on one core: 256-bit {:.0} GMAC/s ({:.0} multiply-adds a cycle), 512-bit {:.0} GMAC/s; on all {threads} cores: {:.0} GMAC/s",
            clock / 1e9,
            ymm / 1e9,
            ymm / clock,
            zmm / 1e9,
            all / 1e9
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("x86-64 only: nothing to measure");
}

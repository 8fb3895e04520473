//! One of our quantized kernels alone, on weights that stay hot in the caches
//! after the first call: the median time of a product and its multiply-adds
//! per second. Small and quick to build, for comparing two builds of a kernel
//! side by side (run their binaries alternately); `benches/quant_kernel.rs`
//! is the full comparison with candle.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release --example kernel_hot -- q4_1 8 1536 576
//!
//! Arguments: format (q4_1, q5_0, q8_0, q4k, q6k), input rows, output rows, columns.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use terse::model::quant::{BlockFormat, QuantMatrix};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [format, n, rows, cols] = args.as_slice() else {
        anyhow::bail!("usage: kernel_hot FORMAT(q4_1|q5_0|q8_0|q4k|q6k) INPUT_ROWS OUTPUT_ROWS COLUMNS");
    };
    let dtype = match format.as_str() {
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q8_0" => GgmlDType::Q8_0,
        "q4k" => GgmlDType::Q4K,
        "q6k" => GgmlDType::Q6K,
        other => anyhow::bail!("unknown format {other}"),
    };
    let (n, rows, cols): (usize, usize, usize) = (n.parse()?, rows.parse()?, cols.parse()?);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
    let q = QTensor::quantize(&Tensor::from_vec(w, (rows, cols), &Device::Cpu)?, dtype)?;
    let ours = QuantMatrix::new(BlockFormat::from_ggml(dtype).expect("a format of ours"), rows, cols, &q.data()?)?;
    let xs: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
    // Fifteen samples of fifty calls each; the median sample.
    let mut micros: Vec<f64> = (0..15)
        .map(|_| {
            let start = std::time::Instant::now();
            for _ in 0..50 {
                std::hint::black_box(ours.matmul_t(&xs, n));
            }
            start.elapsed().as_secs_f64() * 1e6 / 50.0
        })
        .collect();
    micros.sort_by(f64::total_cmp);
    let median = micros[micros.len() / 2];
    let gmacs = (rows * cols * n) as f64 / median / 1e3;
    println!("{format} n={n} {rows}x{cols}: {median:.1} us ({gmacs:.1} GMAC/s)");
    Ok(())
}

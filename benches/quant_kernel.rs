//! Our quantized kernels alone (`model::quant`) against candle's `QMatMul` on
//! the same blocks, on SmolLM2-135M's and the Qwen2.5 models' shapes and formats,
//! for one input row (decode), 8 (batched decode) and 128 (prefill). A shape
//! that fits the caches ("mlp up") next to one that does not ("head") shows
//! whether a kernel is bound by arithmetic or by memory.
//!
//!     RAYON_NUM_THREADS=2 cargo bench --bench quant_kernel

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use terse::model::quant::{BlockFormat, QuantMatrix};

fn kernels(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // (name, format, out rows, in cols)
    let shapes = [
        ("smollm2 mlp up q4_1", GgmlDType::Q4_1, 1536, 576),
        ("smollm2 head q8_0", GgmlDType::Q8_0, 49152, 576),
        ("qwen0.5b mlp up q5_0", GgmlDType::Q5_0, 4864, 896),
        ("qwen0.5b mlp down q4_k", GgmlDType::Q4K, 896, 4864),
        ("qwen0.5b mlp down q6_k", GgmlDType::Q6K, 896, 4864),
        ("qwen1.5b mlp up q4_k", GgmlDType::Q4K, 8960, 1536),
    ];
    for (name, dtype, rows, cols) in shapes {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let ours = QuantMatrix::new(BlockFormat::from_ggml(dtype).unwrap(), rows, cols, &q.data().unwrap()).unwrap();
        let bytes = q.storage_size_in_bytes();
        let candle = QMatMul::from_qtensor(q).unwrap();
        let mut group = c.benchmark_group(name);
        group.sample_size(20);
        // Weight bytes read per call: what bounds decode.
        group.throughput(Throughput::Bytes(bytes as u64));
        for n in [1usize, 8, 128] {
            let xs: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x = Tensor::from_vec(xs.clone(), (n, cols), &Device::Cpu).unwrap();
            group.bench_with_input(BenchmarkId::new("candle", n), &n, |b, _| b.iter(|| candle.forward(&x).unwrap()));
            group.bench_with_input(BenchmarkId::new("terse", n), &n, |b, &n| b.iter(|| ours.matmul_t(&xs, n)));
        }
        group.finish();
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);

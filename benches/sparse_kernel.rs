//! The 2:4 sparse kernel alone against candle's dense f32 matmul on the same
//! shapes (SmolLM2-135M's and Qwen2.5-0.5B's projections), for one input row
//! (decode), 8 (batched decode) and 128 (prefill).
//!
//!     RAYON_NUM_THREADS=2 cargo bench --bench sparse_kernel

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use terse::model::sparse::{prune_2_4, Sparse24};

fn kernels(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // (name, out rows, in cols)
    let shapes = [("smollm2 up", 1536, 576), ("smollm2 down", 576, 1536), ("qwen0.5b up", 4864, 896)];
    for (name, rows, cols) in shapes {
        let mut w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        prune_2_4(&mut w, cols).unwrap();
        let sparse = Sparse24::compress(&w, rows, cols).unwrap();
        let dense = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let dense_t = dense.t().unwrap();
        let mut group = c.benchmark_group(name);
        group.sample_size(20);
        for n in [1usize, 8, 128] {
            let xs: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x = Tensor::from_vec(xs.clone(), (n, cols), &Device::Cpu).unwrap();
            // Weight bytes read per call: what bounds decode.
            group.throughput(Throughput::Bytes((rows * cols * 4) as u64));
            group.bench_with_input(BenchmarkId::new("dense candle", n), &n, |b, _| b.iter(|| x.matmul(&dense_t).unwrap()));
            group.bench_with_input(BenchmarkId::new("sparse 2:4", n), &n, |b, &n| b.iter(|| sparse.matmul_t(&xs, n)));
        }
        group.finish();
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);

//! Matrix–vector products per weight type and kernel level, reported as GB/s
//! of weights read (criterion's throughput): a regression shows up as a
//! drop. Run with `cargo bench -p moeflux-bench`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moeflux::backend::cpu::kernels::{matmul_at, Acts, Level};
use moeflux::backend::cpu::pool::ThreadPool;
use moeflux::backend::cpu::Matrix;
use moeflux::quant::GgmlType;
use moeflux::synth::{fill_blocks, Rng};

fn bench(c: &mut Criterion) {
    // One expert's gate projection of Qwen3-30B-A3B (768 × 2048) and an
    // attention projection (4096 × 2048), decode (1 token) and prefill (64).
    let shapes = [
        (768usize, 2048usize, 1usize),
        (4096, 2048, 1),
        (4096, 2048, 64),
    ];
    let levels: Vec<Level> = [Level::Scalar, Level::Avx2, Level::Avx512]
        .into_iter()
        .filter(|l| l.supported())
        .collect();
    let threads = std::env::var("MOEFLUX_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let pool = ThreadPool::new(threads);
    for ty in [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q5_K,
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::F16,
        GgmlType::BF16,
    ] {
        let mut group = c.benchmark_group(format!("{ty}"));
        for &(rows, cols, n) in &shapes {
            let bytes_len = ty.row_bytes(cols as u64).unwrap() as usize * rows;
            let mut bytes = vec![0u8; bytes_len];
            fill_blocks(ty, &mut Rng::new(1), 0.05, &mut bytes).unwrap();
            let m = Matrix::ggml(ty, rows, cols, &bytes).unwrap();
            let mut r = Rng::new(2);
            let x: Vec<f32> = (0..n * cols).map(|_| r.normal() as f32).collect();
            let mut y = vec![0f32; n * rows];
            let mut acts = Acts::default();
            group.throughput(Throughput::Bytes(bytes_len as u64));
            for &level in &levels {
                let id = BenchmarkId::new(format!("{}x{}x{}", rows, cols, n), level.name());
                group.bench_function(id, |b| {
                    b.iter(|| matmul_at(&pool, &m, &x, n, &mut y, &mut acts, level))
                });
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = kernels;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = bench
}
criterion_main!(kernels);

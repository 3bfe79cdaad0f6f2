//! Matrix–vector products per weight type and kernel level, reported as GB/s
//! of weights read (criterion's throughput): a regression shows up as a
//! drop. Run with `cargo bench -p moeflux-bench` (`MOEFLUX_BENCH_THREADS`
//! sets the threads, 1 by default). `stream/*` is decode from DRAM; the
//! others are products over matrices that fit in cache. `attention/*` is
//! decode attention over an f16 KV cache, as GiB/s of cache rows read.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moeflux::backend::cpu::interleave;
use moeflux::backend::cpu::kernels::{matmul_at, prepare, run_jobs, Acts, Level, MatJob, OutPtr};
use moeflux::backend::cpu::pool::ThreadPool;
use moeflux::backend::cpu::Matrix;
use moeflux::quant::GgmlType;
use moeflux::synth::{fill_blocks, Rng};

/// Threads of the benchmarks' pools: `MOEFLUX_BENCH_THREADS`, 1 by default.
fn bench_threads() -> usize {
    std::env::var("MOEFLUX_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn bench(c: &mut Criterion) {
    // One expert's gate projection of Qwen3-30B-A3B (768 × 2048) and an
    // attention projection (4096 × 2048), decode (1 token) and prefill (64).
    let shapes = [
        (768usize, 2048usize, 1usize),
        (4096, 2048, 1),
        (4096, 2048, 64),
    ];
    let levels: Vec<Level> = [Level::Scalar, Level::Neon, Level::Avx2, Level::Avx512]
        .into_iter()
        .filter(|l| l.supported())
        .collect();
    let threads = bench_threads();
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

/// Decode as the engine runs it: one token through many expert-sized
/// matrices (768 × 2048, 256 of them: ten times the L3 of the machines
/// measured), sixteen matrices per parallel job, so the weights come from
/// DRAM as in a real decode step. GB/s of weights, plain rows against rows
/// interleaved by eight (`interleave`), at the detected level.
fn stream(c: &mut Criterion) {
    let threads = bench_threads();
    let pool = ThreadPool::new(threads);
    let level = moeflux::backend::cpu::kernels::level();
    let (rows, cols, n_mats, per_job) = (768usize, 2048usize, 256usize, 16usize);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_K] {
        let mut group = c.benchmark_group(format!("stream/{ty}"));
        let rb = ty.row_bytes(cols as u64).unwrap() as usize;
        let mut bytes = vec![0u8; rb * rows * n_mats];
        fill_blocks(ty, &mut Rng::new(1), 0.05, &mut bytes).unwrap();
        let mut r = Rng::new(2);
        let x: Vec<f32> = (0..cols).map(|_| r.normal() as f32).collect();
        let mut ys = vec![0f32; rows * n_mats];
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        for layout in ["plain", "interleaved"] {
            if layout == "interleaved" {
                for m in bytes.chunks_exact_mut(rb * rows) {
                    interleave::interleave(ty, cols, m, &mut Vec::new());
                }
            }
            let mats: Vec<Matrix> = bytes
                .chunks_exact(rb * rows)
                .map(|b| match layout {
                    "plain" => Matrix::ggml(ty, rows, cols, b).unwrap(),
                    _ => Matrix::interleaved(ty, rows, cols, b).unwrap(),
                })
                .collect();
            let mut acts = Acts::default();
            let input = prepare(&x, cols, &[&mats[0]], &mut acts, level);
            let id = BenchmarkId::new(format!("{rows}x{cols}x{n_mats}"), layout);
            group.bench_function(id, |b| {
                b.iter(|| {
                    for (mc, yc) in mats.chunks(per_job).zip(ys.chunks_mut(rows * per_job)) {
                        let jobs: Vec<MatJob> = mc
                            .iter()
                            .zip(yc.chunks_mut(rows))
                            .map(|(m, y)| MatJob {
                                w: *m,
                                input,
                                y: OutPtr::new(y),
                            })
                            .collect();
                        run_jobs(&pool, &jobs, level);
                    }
                })
            });
        }
        group.finish();
    }
}

/// Decode attention as the engine runs it: one query per head over the KV
/// caches of 48 layers (Qwen3-30B-A3B: 32 heads, 4 KV heads, head_dim
/// 128) at a 640-position context, in f16 (63 MB of cache rows) and q8_0
/// (33 MB): more than the L3 of the machines measured, so the rows come
/// from DRAM. Throughput is bytes of cache read (criterion prints GiB/s).
fn attention(c: &mut Criterion) {
    use moeflux::backend::cpu::Cpu;
    use moeflux::model::attention::attend;
    use moeflux::state::kv::{KvCache, KvType};
    let threads = bench_threads();
    let cpu = Cpu::new(threads, None).expect("the detected level");
    let (nh, nkv, hd, ctx, layers) = (32usize, 4usize, 128usize, 640usize, 48usize);
    let dim = nkv * hd;
    let q: Vec<f32> = {
        let mut r = Rng::new(4);
        (0..nh * hd).map(|_| r.normal() as f32).collect()
    };
    let mut out = vec![0f32; nh * hd];
    let scratch: Vec<_> = (0..threads)
        .map(|_| std::sync::Mutex::new(Vec::new()))
        .collect();
    let mut group = c.benchmark_group("attention");
    for ty in [KvType::F16, KvType::Q8_0] {
        let mut cache = KvCache::new(&vec![Some((dim, dim)); layers], ctx, ty);
        let mut r = Rng::new(3);
        for l in &mut cache.layers {
            let k: Vec<f32> = (0..ctx * dim).map(|_| r.normal() as f32).collect();
            let v: Vec<f32> = (0..ctx * dim).map(|_| r.normal() as f32).collect();
            l.push(&k, &v);
        }
        group.throughput(Throughput::Bytes(cache.bytes() as u64));
        let id = BenchmarkId::new(
            format!("decode {nh}/{nkv}x{hd} ctx {ctx} x{layers}"),
            ty.name(),
        );
        group.bench_function(id, |b| {
            b.iter(|| {
                for kv in &cache.layers {
                    attend(&cpu, &scratch, &q, kv, &mut out, [nh, nkv, hd], 1, ctx - 1);
                }
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = kernels;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = bench, stream, attention
}
criterion_main!(kernels);

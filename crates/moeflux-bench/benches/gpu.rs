//! GPU kernels on the first adapter wgpu finds, reported as GB/s of weights
//! read (criterion's throughput), the cost of a dependent dispatch by
//! product size, whether independent dispatches run side by side, the
//! cost of a dispatch, and a Gated DeltaNet layer's step. Run with
//! `cargo bench -p moeflux-bench --features gpu --bench gpu`.
//!
//! Each iteration records several products into one pass, submits it and
//! waits, so the ~75 µs of a submit-and-wait round trip is spread over
//! them; the matrices are larger than a data-centre GPU's L2 cache (50 MB
//! on an H100), so every pass reads them from memory.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moeflux::backend::cpu::Matrix;
use moeflux::backend::gpu::pass::ParamArena;
use moeflux::backend::gpu::{DeltaShape, Gpu, GpuMatrix, Pass};
use moeflux::quant::GgmlType;
use moeflux::synth::{fill_blocks, Rng};

/// Products recorded per pass.
const REPEAT: usize = 8;

fn bench(c: &mut Criterion) {
    let gpu = match Gpu::new() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no GPU adapter: {e}");
            return;
        }
    };
    eprintln!("adapter: {}", gpu.info.name);
    // Parameters and bind groups as the model's passes get them.
    let mut arena = ParamArena::new(&gpu).unwrap();
    // 32768 × 4096: 72 MiB at Q4_0. Decode (one token) and a prompt chunk.
    let (rows, cols) = (32768usize, 4096usize);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
    ] {
        let mut group = c.benchmark_group(format!("gpu/{ty}"));
        group.sample_size(20);
        let len = ty.row_bytes(cols as u64).unwrap() as usize * rows;
        let mut bytes = vec![0u8; len];
        fill_blocks(ty, &mut Rng::new(1), 0.05, &mut bytes).unwrap();
        let m = Matrix::ggml(ty, rows, cols, &bytes).unwrap();
        let w = GpuMatrix::upload(&gpu, &m).unwrap();
        for n in [1usize, 16] {
            let mut r = Rng::new(2);
            let x: Vec<f32> = (0..n * cols).map(|_| r.normal() as f32).collect();
            let xb = gpu.upload_f32("x", &x).unwrap();
            let yb = gpu.zeros_f32("y", n * rows).unwrap();
            group.throughput(Throughput::Bytes((len * REPEAT) as u64));
            group.bench_function(BenchmarkId::new(format!("{rows}x{cols}"), n), |b| {
                b.iter(|| {
                    let mut pass = Pass::with_arena(&gpu, &mut arena);
                    for _ in 0..REPEAT {
                        pass.matmul(&w, &xb, &yb, n).unwrap();
                    }
                    pass.submit().unwrap();
                    gpu.wait().unwrap();
                })
            });
        }
        group.finish();
    }
    // Dependent one-token products, 32 a pass, by rows (2048 columns,
    // Q4_0): each writes the same y, so each waits for the one before, as
    // a decode step's dispatches do. Criterion's time less a one-dispatch
    // pass's (the submit-and-wait round trip), ÷ 32, is one dispatch's
    // cost at that size: `plain` adds into y, `normed` RMS-normalises x
    // first (what a layer's first product does). Enough copies of the
    // matrix that the pass reads ≥ 160 MB (from memory, not the L2 cache)
    // where 32 copies allow it.
    let mut group = c.benchmark_group("gpu/chain");
    group.sample_size(10);
    let ty = GgmlType::Q4_0;
    let cols = 2048usize;
    let mut r = Rng::new(3);
    let x: Vec<f32> = (0..cols).map(|_| r.normal() as f32).collect();
    let xb = gpu.upload_f32("x", &x).unwrap();
    let norm_w = gpu.upload_f32("norm", &vec![1.0f32; cols]).unwrap();
    let normed = gpu.zeros_f32("normed", cols).unwrap();
    for rows in [4usize, 128, 512, 1024, 2048, 4096, 5120, 8192, 16384] {
        let len = ty.row_bytes(cols as u64).unwrap() as usize * rows;
        let copies = (160usize << 20).div_ceil(len).clamp(1, 32);
        let mut bytes = vec![0u8; len];
        fill_blocks(ty, &mut Rng::new(1), 0.05, &mut bytes).unwrap();
        let m = Matrix::ggml(ty, rows, cols, &bytes).unwrap();
        let ws: Vec<GpuMatrix> = (0..copies)
            .map(|_| GpuMatrix::upload(&gpu, &m).unwrap())
            .collect();
        let yb = gpu.zeros_f32("y", rows).unwrap();
        for normed_x in [false, true] {
            let name = if normed_x { "normed" } else { "plain" };
            group.bench_function(BenchmarkId::new(name, rows), |b| {
                b.iter(|| {
                    let mut pass = Pass::with_arena(&gpu, &mut arena);
                    for i in 0..32 {
                        let w = &ws[i % copies];
                        if normed_x {
                            pass.matmul_normed(w, &xb, (&norm_w, 1e-6), &normed, &yb, 1, (0, rows))
                                .unwrap();
                        } else {
                            pass.matmul_add(w, &xb, &yb, 1).unwrap();
                        }
                    }
                    pass.submit().unwrap();
                    gpu.wait().unwrap();
                })
            });
        }
    }
    group.finish();
    // Independent dispatches side by side: 32 dependent stages, each an
    // output projection's product (2048 × 4096 Q4_0, adding into y, so
    // each stage waits for the one before), alone or followed by a small
    // product that reads the same input and writes a buffer of its own
    // stage (an F32 128 × 4096 router-sized matrix). wgpu puts a barrier
    // before a dispatch that writes (or reads) a buffer written earlier in
    // the pass, so the small products write 32 distinct buffers: nothing
    // orders a small product after the projection beside it. If the GPU
    // runs the two side by side, a stage with both costs about what one
    // alone does; if not, the two costs add. `small alone` is the small
    // product by itself, a buffer a stage as well (no barriers at all).
    let mut group = c.benchmark_group("gpu/overlap");
    group.sample_size(10);
    let (rows, cols) = (2048usize, 4096usize);
    let len = GgmlType::Q4_0.row_bytes(cols as u64).unwrap() as usize * rows;
    let mut bytes = vec![0u8; len];
    fill_blocks(GgmlType::Q4_0, &mut Rng::new(4), 0.05, &mut bytes).unwrap();
    let m = Matrix::ggml(GgmlType::Q4_0, rows, cols, &bytes).unwrap();
    let copies = (160usize << 20).div_ceil(len).clamp(1, 32);
    let big: Vec<GpuMatrix> = (0..copies)
        .map(|_| GpuMatrix::upload(&gpu, &m).unwrap())
        .collect();
    let small_rows = 128usize;
    let f32_bytes: Vec<u8> = (0..small_rows * cols)
        .flat_map(|i| (((i * 37) % 101) as f32 * 1e-3).to_le_bytes())
        .collect();
    let sm = Matrix::ggml(GgmlType::F32, small_rows, cols, &f32_bytes).unwrap();
    let small = GpuMatrix::upload(&gpu, &sm).unwrap();
    let mut r = Rng::new(5);
    let x: Vec<f32> = (0..cols).map(|_| r.normal() as f32).collect();
    let xb = gpu.upload_f32("x", &x).unwrap();
    let yb = gpu.zeros_f32("y", rows).unwrap();
    let zb: Vec<_> = (0..32)
        .map(|_| gpu.zeros_f32("z", small_rows).unwrap())
        .collect();
    for (name, with_big, with_small) in [
        ("projection alone", true, false),
        ("projection + small beside", true, true),
        ("small alone (no barriers)", false, true),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut pass = Pass::with_arena(&gpu, &mut arena);
                for i in 0..32 {
                    if with_big {
                        pass.matmul_add(&big[i % copies], &xb, &yb, 1).unwrap();
                    }
                    if with_small {
                        pass.matmul_add(&small, &xb, &zb[i], 1).unwrap();
                    }
                }
                pass.submit().unwrap();
                gpu.wait().unwrap();
            })
        });
    }
    group.finish();
    // Dispatch cost: 256 one-row products in one pass (criterion's time
    // divided by 256 is the cost of one dispatch inside a pass).
    let mut group = c.benchmark_group("gpu/dispatch");
    let ty = GgmlType::Q4_0;
    let bytes = vec![0u8; ty.row_bytes(32).unwrap() as usize];
    let m = Matrix::ggml(ty, 1, 32, &bytes).unwrap();
    let w = GpuMatrix::upload(&gpu, &m).unwrap();
    let xb = gpu.zeros_f32("x", 32).unwrap();
    let yb = gpu.zeros_f32("y", 1).unwrap();
    for count in [1usize, 256] {
        group.bench_function(BenchmarkId::new("one-row products per pass", count), |b| {
            b.iter(|| {
                let mut pass = Pass::with_arena(&gpu, &mut arena);
                for _ in 0..count {
                    pass.matmul(&w, &xb, &yb, 1).unwrap();
                }
                pass.submit().unwrap();
                gpu.wait().unwrap();
            })
        });
    }
    group.finish();
    // Gated DeltaNet (delta_net.wgsl) at a Qwen3.5-35B-A3B linear layer's
    // shape (16 key heads, 32 value heads of 128, 4 taps, a GGUF's tiled
    // heads): `decode` is 30 dependent one-token steps, each a layer of
    // its own (its own 4 MiB state and window, as a model's 30 linear
    // layers: 120 MiB, more than the L2 cache), writing the same output,
    // so each waits for the one before; criterion's time less a
    // one-dispatch pass's, ÷ 30, is one layer's step. `prompt` is one
    // layer's 512-token chunk (÷ 512: a prompt token's share). `decode,
    // 1 tap` leaves out the conv window (what the window's reads and
    // writes cost).
    let mut group = c.benchmark_group("gpu/delta_net");
    group.sample_size(10);
    for (name, taps, n, layers) in [
        ("decode", 4usize, 1usize, 30usize),
        ("decode, 1 tap", 1, 1, 30),
        ("one decode step", 4, 1, 1),
        ("prompt 512", 4, 512, 1),
    ] {
        let mut shape = DeltaShape {
            n_k: 16,
            n_v: 32,
            k_dim: 128,
            v_dim: 128,
            taps,
            layout: 0,
            tiled: true,
            stride: 0,
            eps: 1e-6,
        };
        shape.stride = shape.channels() + shape.n_v * shape.v_dim + 2 * shape.n_v;
        let mut r = Rng::new(4);
        let mut normals =
            |len: usize, f: f32| -> Vec<f32> { (0..len).map(|_| r.normal() as f32 * f).collect() };
        let proj = gpu
            .upload_f32("proj", &normals(n * shape.stride, 1.0))
            .unwrap();
        let conv_w = gpu
            .upload_f32("conv", &normals(shape.channels() * taps, 0.5))
            .unwrap();
        let mut head: Vec<f32> = normals(shape.n_v, 0.5).iter().map(|v| -v.exp()).collect();
        head.extend(normals(shape.n_v + shape.v_dim, 1.0));
        let head_w = gpu.upload_f32("heads", &head).unwrap();
        let window = (taps - 1) * shape.channels();
        let states: Vec<_> = (0..layers)
            .map(|_| {
                let w = gpu.zeros_f32("window", 2 * window).unwrap();
                let st = gpu
                    .zeros_f32("state", shape.n_v * shape.k_dim * shape.v_dim)
                    .unwrap();
                (w, st)
            })
            .collect();
        let out = gpu.zeros_f32("out", n * shape.n_v * shape.v_dim).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut pass = Pass::with_arena(&gpu, &mut arena);
                for (w, st) in &states {
                    pass.delta_net(
                        (&proj, None),
                        (&conv_w, &head_w),
                        (w, st),
                        &out,
                        shape,
                        n,
                        false,
                    )
                    .unwrap();
                }
                pass.submit().unwrap();
                gpu.wait().unwrap();
            })
        });
    }
    group.finish();
    // Uploads as a streamed model makes them: writes of an expert's size
    // (10 MiB, a qwen3-235b-a22b Q4_0 expert) into a device buffer,
    // submitted and waited for; beside it, one thread's host memcpy of the
    // same bytes.
    let mut group = c.benchmark_group("gpu/upload");
    group.sample_size(10);
    let (piece, count) = (10usize << 20, 12usize);
    let src: Vec<u8> = (0..piece).map(|i| (i * 7 + 3) as u8).collect();
    let dst = gpu.storage("upload", &[], (piece * count) as u64).unwrap();
    group.throughput(Throughput::Bytes((piece * count) as u64));
    group.bench_function("10 MiB writes", |b| {
        b.iter(|| {
            for i in 0..count {
                gpu.write_padded_at(&dst, (i * piece) as u64, &src).unwrap();
            }
            gpu.queue.submit([]);
            gpu.wait().unwrap();
        })
    });
    let mut host = vec![0u8; piece * count];
    group.bench_function("host memcpy, one thread", |b| {
        b.iter(|| {
            for chunk in host.chunks_mut(piece) {
                chunk.copy_from_slice(&src);
            }
            std::hint::black_box(&host);
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Every GPU kernel against the CPU reference, on random inputs, with each
//! reduction variant the adapter supports; and every WGSL module translated
//! to MSL and SPIR-V with naga (the Metal path's check; needs no adapter).
//!
//! The adapter is opened once and shared by all tests. Without one the
//! tests fail, naming the cause, unless `MOEFLUX_GPU_TESTS=skip` is set
//! (so a CI run without a GPU driver cannot pass silently).

use std::sync::{Arc, OnceLock};

use half::f16;
use moeflux::backend::cpu::matrix::dot;
use moeflux::backend::cpu::ops::{rms_norm, rope_inv_freq, rope_neox, sigmoid, silu, softmax};
use moeflux::backend::cpu::Matrix;
use moeflux::backend::gpu::host_memory::HostMemory;
use moeflux::backend::gpu::kernels::JOB_WORDS;
use moeflux::backend::gpu::pass::ParamArena;
use moeflux::backend::gpu::{
    rope_table, AttentionShape, DeltaShape, Gpu, GpuError, GpuExperts, GpuMatrix, Kernel, MatShape,
    Pass, Reduce, SwigluGate, Variant, WeightKind,
};
use moeflux::experts::arena::Arena;
use moeflux::quant::mlx::ScaleType;
use moeflux::quant::{GgmlType, MlxAffine};
use moeflux::state::kv::{KvCache, KvType, LayerKv, Rows};
use moeflux::synth::Rng;

/// The shared device, or `None` when tests are told to skip without one.
fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
    let skip = std::env::var("MOEFLUX_GPU_TESTS").is_ok_and(|v| v == "skip");
    match GPU.get_or_init(|| Gpu::new().map_err(|e| e.to_string())) {
        Ok(g) => {
            static SAID: OnceLock<()> = OnceLock::new();
            SAID.get_or_init(|| eprintln!("GPU tests on {}", g.describe()));
            Some(g)
        }
        Err(e) if skip => {
            eprintln!("skipping a GPU test (MOEFLUX_GPU_TESTS=skip): {e}");
            None
        }
        Err(e) => panic!("{e}\n(set MOEFLUX_GPU_TESTS=skip to skip the GPU tests deliberately)"),
    }
}

fn normals(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

/// A random finite f16 in `[lo, hi)`.
fn f16_in(r: &mut Rng, lo: f32, hi: f32) -> [u8; 2] {
    f16::from_f32(lo + (hi - lo) * r.unit() as f32).to_le_bytes()
}

/// Random blocks of `ty` for a `rows × cols` matrix: every bit of the
/// quants random, every scale field a random finite value (so each block
/// decodes with its own scales and the 6-bit scale packing is exercised).
fn random_ggml(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let len = ty.row_bytes(cols as u64).unwrap() as usize * rows;
    let mut b: Vec<u8> = (0..len).map(|_| r.next_u64() as u8).collect();
    let ts = ty.type_size();
    match ty {
        GgmlType::F32 => {
            for c in b.chunks_exact_mut(4) {
                c.copy_from_slice(&(r.normal() as f32 * 0.05).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in b.chunks_exact_mut(2) {
                c.copy_from_slice(&f16::from_f32(r.normal() as f32 * 0.05).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for c in b.chunks_exact_mut(2) {
                let bits = ((r.normal() as f32 * 0.05).to_bits() >> 16) as u16;
                c.copy_from_slice(&bits.to_le_bytes());
            }
        }
        GgmlType::Q8_0 | GgmlType::Q4_0 => {
            for blk in b.chunks_exact_mut(ts) {
                blk[0..2].copy_from_slice(&f16_in(&mut r, 0.001, 0.01));
            }
        }
        GgmlType::Q4_K => {
            for blk in b.chunks_exact_mut(ts) {
                blk[0..2].copy_from_slice(&f16_in(&mut r, 0.0005, 0.002));
                blk[2..4].copy_from_slice(&f16_in(&mut r, 0.0005, 0.002));
            }
        }
        GgmlType::Q6_K => {
            for blk in b.chunks_exact_mut(ts) {
                blk[208..210].copy_from_slice(&f16_in(&mut r, 0.0005, 0.002));
            }
        }
        other => panic!("no random blocks for {other}"),
    }
    b
}

/// Runs `y = x Wᵀ` on the GPU.
fn gpu_matmul(gpu: &Gpu, w: &GpuMatrix, x: &[f32], n: usize, variant: Variant) -> Vec<f32> {
    let xb = gpu.upload_f32("x", x).unwrap();
    let yb = gpu.zeros_f32("y", n * w.shape.rows).unwrap();
    let mut pass = Pass::with_variant(gpu, variant);
    pass.matmul(w, &xb, &yb, n).unwrap();
    pass.submit().unwrap();
    gpu.read_f32(&yb, n * w.shape.rows).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += *x as f64 * *y as f64;
        aa += (*x as f64).powi(2);
        bb += (*y as f64).powi(2);
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Checks the GPU product against the reference (each row decoded with
/// `Matrix::row`, an f32 dot with each token): every output within f32
/// rounding of the sum's size (1e-5 · Σ|w·x|, the CPU kernels' slack) and a
/// cosine of at least 0.9999 overall. Runs whole and split into parts of
/// `split_rows` rows, with every reduction the adapter has.
fn check_matmul(m: &Matrix<'_>, name: &str, split_rows: usize) {
    let Some(gpu) = gpu() else { return };
    let mut wrow = vec![0f32; m.cols];
    let rows_bytes = |rows: usize| match m.data {
        moeflux::backend::cpu::MatrixData::Ggml { bytes, .. }
        | moeflux::backend::cpu::MatrixData::Interleaved { bytes, .. } => {
            (bytes.len() / m.rows * rows) as u64
        }
        moeflux::backend::cpu::MatrixData::Mlx { weight, .. } => {
            (weight.len() / m.rows * rows) as u64
        }
    };
    let whole = GpuMatrix::upload(gpu, m).unwrap();
    assert_eq!(whole.n_parts(), 1, "{name}: a small matrix is one part");
    let split = GpuMatrix::upload_split(gpu, m, rows_bytes(split_rows)).unwrap();
    assert_eq!(
        split.n_parts(),
        m.rows.div_ceil(split_rows),
        "{name}: parts"
    );
    for n in [1, 6] {
        let x = normals(n * m.cols, 11 + n as u64);
        let mut want = vec![0f32; n * m.rows];
        let mut slack = vec![0f32; n * m.rows];
        for r in 0..m.rows {
            m.row(r, &mut wrow);
            for t in 0..n {
                let xt = &x[t * m.cols..(t + 1) * m.cols];
                want[t * m.rows + r] = dot(&wrow, xt);
                slack[t * m.rows + r] =
                    1e-5 * wrow.iter().zip(xt).map(|(w, x)| (w * x).abs()).sum::<f32>() + 1e-6;
            }
        }
        for variant in gpu.variants() {
            for (w, how) in [(&whole, "whole"), (&split, "split")] {
                let got = gpu_matmul(gpu, w, &x, n, variant);
                for i in 0..n * m.rows {
                    assert!(
                        (got[i] - want[i]).abs() <= slack[i],
                        "{name} ({how}, {variant:?}, n={n}): row {} token {}: {} vs reference {} (slack {})",
                        i % m.rows,
                        i / m.rows,
                        got[i],
                        want[i],
                        slack[i]
                    );
                }
                let cos = cosine(&got, &want);
                assert!(
                    cos >= 0.9999,
                    "{name} ({how}, {variant:?}, n={n}): cosine {cos}"
                );
            }
        }
    }
}

fn check_ggml(ty: GgmlType, rows: usize, cols: usize) {
    check_ggml_split(ty, rows, cols, 4);
}

fn check_ggml_split(ty: GgmlType, rows: usize, cols: usize, split_rows: usize) {
    let bytes = random_ggml(ty, rows, cols, ty.id() as u64 + 100);
    let m = Matrix::ggml(ty, rows, cols, &bytes).unwrap();
    check_matmul(&m, ty.name(), split_rows);
}

#[test]
fn matmul_q8_0() {
    check_ggml(GgmlType::Q8_0, 37, 32 * 9);
}

#[test]
fn matmul_q4_0() {
    check_ggml(GgmlType::Q4_0, 37, 32 * 9);
    // More blocks a row than a one-token product's threads; blocks on a
    // word and halfway alternate (an odd number of 18-byte blocks a row).
    check_ggml(GgmlType::Q4_0, 6, 32 * 133);
}

#[test]
fn matmul_q4_k() {
    // One-token products read Q4_K in 16-byte chunks, one row a thread
    // (WIDE in matmul.wgsl): fewer chunks a row than a row's threads, and
    // (72 chunks, 32 threads a row on a 128-thread workgroup) rounds of
    // them that leave threads idle.
    check_ggml(GgmlType::Q4_K, 21, 256 * 3);
    check_ggml(GgmlType::Q4_K, 7, 256 * 9);
}

#[test]
fn matmul_q6_k() {
    check_ggml(GgmlType::Q6_K, 21, 256 * 3);
}

#[test]
fn matmul_floats() {
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        check_ggml(ty, 19, 224);
    }
    // More columns than a one-token product's 128 threads take at once.
    check_ggml(GgmlType::F32, 9, 1056);
}

fn check_mlx(bits: u8, group: u32, cols: usize, scale_type: ScaleType) {
    let rows = 13;
    let mut r = Rng::new(bits as u64 * 1000 + group as u64);
    let weight: Vec<u8> = (0..rows * cols * bits as usize / 8)
        .map(|_| r.next_u64() as u8)
        .collect();
    let n_groups = rows * cols / group as usize;
    let enc = |v: f32| match scale_type {
        ScaleType::BF16 => ((v.to_bits() >> 16) as u16).to_le_bytes(),
        _ => f16::from_f32(v).to_le_bytes(),
    };
    let scales: Vec<u8> = (0..n_groups)
        .flat_map(|_| enc(0.01 + 0.01 * r.unit() as f32))
        .collect();
    let biases: Vec<u8> = (0..n_groups)
        .flat_map(|_| enc(-0.05 * r.unit() as f32))
        .collect();
    let q = MlxAffine {
        bits,
        group_size: group,
        scale_type,
    };
    let m = Matrix::mlx(q, rows, cols, &weight, &scales, &biases).unwrap();
    check_matmul(&m, &format!("{q} {scale_type:?}"), 3);
}

#[test]
fn matmul_mlx_affine() {
    check_mlx(4, 64, 64 * 5, ScaleType::BF16);
    check_mlx(8, 64, 64 * 5, ScaleType::BF16);
    check_mlx(4, 32, 32 * 7, ScaleType::BF16);
    check_mlx(8, 32, 32 * 7, ScaleType::F16);
    check_mlx(4, 128, 128 * 3, ScaleType::F16);
    check_mlx(8, 128, 128 * 3, ScaleType::BF16);
}

#[test]
fn matmul_rows_beyond_one_dispatch_dimension() {
    // 270 000 rows: more workgroups than one dimension must hold (65 535)
    // for one token (four rows a workgroup), so on most adapters rows are
    // numbered over a 2-D grid (prompts take 64 rows a workgroup).
    check_ggml_split(GgmlType::F16, 270_000, 32, 100_000);
}

/// Prompt products over several tiles of rows and of tokens match the
/// reference, and give every token the same bits whether a prompt computes
/// it in one product or in chunks (of one token and of more than a tile):
/// the property `prefill_chunking_changes_nothing` rests on.
#[test]
fn prompt_products_are_the_same_in_any_chunks() {
    let Some(gpu) = gpu() else { return };
    let (rows, cols, n) = (150, 256, 70);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_K] {
        let bytes = random_ggml(ty, rows, cols, 77);
        let m = Matrix::ggml(ty, rows, cols, &bytes).unwrap();
        let w = GpuMatrix::upload(gpu, &m).unwrap();
        let x = normals(n * cols, 78);
        let mut wrow = vec![0f32; cols];
        let mut want = vec![0f32; n * rows];
        for r in 0..rows {
            m.row(r, &mut wrow);
            for t in 0..n {
                want[t * rows + r] = dot(&wrow, &x[t * cols..(t + 1) * cols]);
            }
        }
        let run = |x: &[f32], n: usize| {
            let xb = gpu.upload_f32("x", x).unwrap();
            let yb = gpu.zeros_f32("y", n * rows).unwrap();
            let mut pass = Pass::new(gpu);
            pass.set_prompt(true);
            pass.matmul(&w, &xb, &yb, n).unwrap();
            pass.submit().unwrap();
            gpu.read_f32(&yb, n * rows).unwrap()
        };
        let whole = run(&x, n);
        let cos = cosine(&whole, &want);
        assert!(cos >= 0.9999, "{ty}: cosine {cos}");
        for (i, (g, e)) in whole.iter().zip(&want).enumerate() {
            assert!(
                (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                "{ty} [{i}]: {g} vs {e}"
            );
        }
        let mut chunked = Vec::new();
        for (t0, t1) in [(0, 1), (1, 34), (34, 70)] {
            chunked.extend(run(&x[t0 * cols..t1 * cols], t1 - t0));
        }
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&chunked),
            bits(&whole),
            "{ty}: chunks differ from one product"
        );
    }
}

#[test]
fn unsupported_and_mismatched_inputs_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let bytes = vec![0u8; GgmlType::Q5_K.type_size() * 2];
    let m = Matrix::ggml(GgmlType::Q5_K, 2, 256, &bytes).unwrap();
    assert!(matches!(
        GpuMatrix::upload(gpu, &m),
        Err(GpuError::Unsupported(_))
    ));
    // Rows that are not whole 32-column units.
    let bytes = random_ggml(GgmlType::F16, 2, 203, 1);
    let m = Matrix::ggml(GgmlType::F16, 2, 203, &bytes).unwrap();
    assert!(matches!(
        GpuMatrix::upload(gpu, &m),
        Err(GpuError::Unsupported(_))
    ));
    let bytes = random_ggml(GgmlType::Q8_0, 4, 64, 1);
    let m = Matrix::ggml(GgmlType::Q8_0, 4, 64, &bytes).unwrap();
    let w = GpuMatrix::upload(gpu, &m).unwrap();
    // A part smaller than one row.
    assert!(matches!(
        GpuMatrix::upload_split(gpu, &m, 10),
        Err(GpuError::TooLarge { .. })
    ));
    // x too short for 2 tokens.
    let x = gpu.zeros_f32("x", 64).unwrap();
    let y = gpu.zeros_f32("y", 8).unwrap();
    let mut pass = Pass::new(gpu);
    assert!(matches!(
        pass.matmul(&w, &x, &y, 2),
        Err(GpuError::Shape { .. })
    ));
    let shape = AttentionShape {
        n_heads: 6,
        n_kv_heads: 4,
        head_dim: 64,
        len: 1,
        k_stride: 256,
        v_stride: 256,
        kv_f16: false,
        gated: false,
    };
    let q = gpu.zeros_f32("q", 6 * 64).unwrap();
    let kv = gpu.zeros_f32("kv", 256).unwrap();
    assert!(matches!(
        pass.attention(&q, &kv, &kv, &kv, &q, shape),
        Err(GpuError::Shape { .. })
    ));
}

#[test]
fn rms_norm_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    // Rows of a hidden state and per-head rows; dims not multiples of 64.
    for (rows, dim) in [(5, 300), (16, 128), (1, 7)] {
        let x: Vec<f32> = normals(rows * dim, dim as u64)
            .iter()
            .enumerate()
            .map(|(i, v)| if i % 41 == 3 { v * 30.0 } else { *v })
            .collect();
        let w: Vec<f32> = normals(dim, 5).iter().map(|v| 1.0 + 0.1 * v).collect();
        let eps = 1e-6;
        let mut want = vec![0f32; rows * dim];
        for r in 0..rows {
            rms_norm(
                &x[r * dim..(r + 1) * dim],
                &w,
                eps,
                &mut want[r * dim..(r + 1) * dim],
            );
        }
        let (xb, wb) = (
            gpu.upload_f32("x", &x).unwrap(),
            gpu.upload_f32("w", &w).unwrap(),
        );
        for variant in gpu.variants() {
            let out = gpu.zeros_f32("out", rows * dim).unwrap();
            let mut pass = Pass::with_variant(gpu, variant);
            pass.rms_norm(&xb, &wb, &out, rows, dim, eps).unwrap();
            pass.submit().unwrap();
            let got = gpu.read_f32(&out, rows * dim).unwrap();
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                // Only the sum of squares' order differs: a few ulps.
                assert!(
                    (g - e).abs() <= 4e-6 * e.abs() + 1e-7,
                    "rms_norm {rows}×{dim} {variant:?} [{i}]: {g} vs {e}"
                );
            }
        }
    }
}

/// A product whose input is RMS-normalised inside it: the normalised rows
/// it stores match the CPU's rms_norm, the product matches the reference
/// product of those rows, in a decode step's shape and a prompt's, and a
/// token's normalised row and outputs have the same bits whether a prompt
/// computes it alone (a one-token chunk) or among several.
#[test]
fn normalising_product_matches_cpu() {
    // Fewer parts a row than threads, and (2048 columns, Q4_0's column
    // order) two parts a thread.
    check_normalising(GgmlType::Q8_0, 40, 320, 6);
    check_normalising(GgmlType::Q4_0, 12, 2048, 5);
    // WIDE: the squares are summed by one row's threads only.
    check_normalising(GgmlType::Q4_K, 9, 4096, 3);
    // An F32 router's format.
    check_normalising(GgmlType::F32, 6, 320, 2);
}

fn check_normalising(ty: GgmlType, rows: usize, cols: usize, n: usize) {
    let Some(gpu) = gpu() else { return };
    let x: Vec<f32> = normals(n * cols, 31)
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 37 == 5 { v * 20.0 } else { *v })
        .collect();
    let nw: Vec<f32> = normals(cols, 32).iter().map(|v| 1.0 + 0.2 * v).collect();
    let eps = 1e-6;
    let bytes = random_ggml(ty, rows, cols, 33);
    let m = Matrix::ggml(ty, rows, cols, &bytes).unwrap();
    let w = GpuMatrix::upload(gpu, &m).unwrap();
    let mut h = vec![0f32; n * cols];
    for t in 0..n {
        let r = t * cols..(t + 1) * cols;
        rms_norm(&x[r.clone()], &nw, eps, &mut h[r]);
    }
    let mut wrow = vec![0f32; cols];
    let want: Vec<f32> = (0..n)
        .flat_map(|t| {
            (0..rows)
                .map(|r| {
                    m.row(r, &mut wrow);
                    let hr = &h[t * cols..(t + 1) * cols];
                    wrow.iter().zip(hr).map(|(a, b)| a * b).sum::<f32>()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let nwb = gpu.upload_f32("norm", &nw).unwrap();
    for variant in gpu.variants() {
        let run = |xs: &[f32], n: usize, prompt: bool| {
            let xb = gpu.upload_f32("x", xs).unwrap();
            let hb = gpu.zeros_f32("normed", n * cols).unwrap();
            let yb = gpu.zeros_f32("y", n * rows).unwrap();
            let mut pass = Pass::with_variant(gpu, variant);
            pass.set_prompt(prompt);
            pass.matmul_normed(&w, &xb, (&nwb, eps), &hb, &yb, n, (0, rows))
                .unwrap();
            pass.submit().unwrap();
            (
                gpu.read_f32(&hb, n * cols).unwrap(),
                gpu.read_f32(&yb, n * rows).unwrap(),
            )
        };
        let close = |what: &str, got_h: &[f32], got_y: &[f32], h: &[f32], want: &[f32]| {
            for (i, (g, e)) in got_h.iter().zip(h).enumerate() {
                assert!(
                    (g - e).abs() <= 4e-6 * e.abs() + 1e-7,
                    "{ty} {what} normed {variant:?} [{i}]: {g} vs {e}"
                );
            }
            let cos = cosine(got_y, want);
            assert!(
                cos >= 0.9999,
                "{ty} {what} normed product {variant:?}: cosine {cos}"
            );
            for (i, (g, e)) in got_y.iter().zip(want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-3 * (1.0 + e.abs()),
                    "{ty} {what} y {variant:?} [{i}]: {g} vs {e}"
                );
            }
        };
        let (got_h, got_y) = run(&x, n, false);
        close("prompt", &got_h, &got_y, &h, &want);
        for t in [0, n - 1] {
            let (ht, yt) = (t * cols..(t + 1) * cols, t * rows..(t + 1) * rows);
            // A decode step's kernel (one token, its own order of sums).
            let (one_h, one_y) = run(&x[ht.clone()], 1, false);
            close(
                "one token",
                &one_h,
                &one_y,
                &h[ht.clone()],
                &want[yt.clone()],
            );
            // A one-token chunk of a prompt: the prompt's bits.
            let (one_h, one_y) = run(&x[ht.clone()], 1, true);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one_h), bits(&got_h[ht]), "token {t} normed alone");
            assert_eq!(bits(&one_y), bits(&got_y[yt]), "token {t} product alone");
        }
    }
}

/// Large writes (expert uploads, copied into staging memory by several
/// threads) land intact at an offset, an odd tail included, and leave
/// the bytes around them alone.
#[test]
fn large_writes_land_intact() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(5);
    let data: Vec<u8> = (0..(3 << 20) + 7).map(|_| r.next_u64() as u8).collect();
    let buf = gpu.storage("big", &[], 4 << 20).unwrap();
    let off = 4096u64;
    gpu.write_padded_at(&buf, off, &data).unwrap();
    let words = gpu.read_f32(&buf, (4 << 20) / 4).unwrap();
    let bytes: Vec<u8> = words
        .iter()
        .flat_map(|w| w.to_bits().to_le_bytes())
        .collect();
    let at = off as usize;
    assert!(
        bytes[..at].iter().all(|&b| b == 0),
        "bytes before the write changed"
    );
    assert!(
        bytes[at..at + data.len()] == data[..],
        "the written bytes differ"
    );
    assert!(
        bytes[at + data.len()..].iter().all(|&b| b == 0),
        "bytes after the write changed"
    );
}

/// The expert store's arena imported into the device (where the adapter
/// can: Vulkan's `VK_EXT_external_memory_host`, lavapipe included): a slice
/// of it is found in its buffer, and a copy command from there lands the
/// slice's bytes; bytes outside the arena are not found. Imported as
/// storage too (on an adapter sharing host memory), the slice is where a
/// kernel would read it in place, and a slice off a word is not.
#[test]
fn host_arena_copies_land_intact() {
    for storage in [false, true] {
        host_arena_copies(storage);
    }
}

fn host_arena_copies(storage: bool) {
    let Some(gpu) = gpu() else { return };
    let slot = 64 << 10;
    let arena = Arc::new(Arena::new(5, slot).unwrap());
    let mut r = Rng::new(7);
    let (_, len) = arena.region();
    let data: Vec<u8> = (0..len).map(|_| r.next_u64() as u8).collect();
    // SAFETY: the arena's own bytes, written before anything reads them.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), arena.slot_ptr(0), len) };
    let Some(host) = HostMemory::import(gpu, arena.clone(), storage) else {
        assert!(
            !gpu.host_import,
            "the device imports host memory, but not this arena"
        );
        eprintln!("{}: no host memory import; skipped", gpu.info.name);
        return;
    };
    // Slot 3 from byte 36: whole words at a word offset.
    let (at, n) = (3 * slot + 36, 40_000);
    // SAFETY: inside the arena (5 slots), which nothing writes now.
    let bytes = unsafe { arena.bytes(3, 36, n) };
    let (src, off) = host.locate(bytes).expect("a slice of the arena is found");
    let shares = gpu.shares_host_memory();
    assert_eq!(host.storage(), storage && shares, "storage import");
    match host.in_place(&[bytes]) {
        Some((chunk, offs)) => {
            assert!(host.storage());
            assert_eq!(offs, vec![off]);
            assert_eq!(host.chunk(chunk).size(), src.size());
            // SAFETY: as above.
            let odd = unsafe { arena.bytes(3, 37, 100) };
            assert!(host.in_place(&[bytes, odd]).is_none(), "a slice off a word");
        }
        None => assert!(!host.storage(), "not found in place in a storage import"),
    }
    let outside = vec![0u8; 64];
    assert!(
        host.locate(&outside).is_none(),
        "memory outside the arena was found"
    );
    let dst = gpu.storage("copy target", &[], 64 << 10).unwrap();
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(src, off, &dst, 256, n as u64);
    gpu.queue.submit([enc.finish()]);
    gpu.wait().unwrap();
    let words = gpu.read_f32(&dst, (64 << 10) / 4).unwrap();
    let got: Vec<u8> = words
        .iter()
        .flat_map(|w| w.to_bits().to_le_bytes())
        .collect();
    assert!(
        got[..256].iter().all(|&b| b == 0),
        "bytes before the copy changed"
    );
    assert!(
        got[256..256 + n] == data[at..at + n],
        "the copied bytes differ"
    );
    assert!(
        got[256 + n..].iter().all(|&b| b == 0),
        "bytes after the copy changed"
    );
}

/// Expert batches: three experts' matrices in one pool buffer at offsets,
/// one dispatch over a job table computing each expert's rows of tokens —
/// plain (`y = x Aᵀ`) and gate/up with SwiGLU — against the CPU reference,
/// for one token per expert (the decode kernel) and for several.
#[test]
fn expert_batches_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let (ff, hidden) = (40, 512);
    let mut r = Rng::new(9);
    let mut mlx = |rows: usize, cols: usize| {
        let group = 64;
        let weight: Vec<u8> = (0..rows * cols / 2).map(|_| r.next_u64() as u8).collect();
        let ng = rows * cols / group;
        let enc = |v: f32| ((v.to_bits() >> 16) as u16).to_le_bytes();
        let scales: Vec<u8> = (0..ng)
            .flat_map(|_| enc(0.01 + 0.01 * r.unit() as f32))
            .collect();
        let biases: Vec<u8> = (0..ng).flat_map(|_| enc(-0.05 * r.unit() as f32)).collect();
        (weight, scales, biases)
    };
    let mlx_q = MlxAffine {
        bits: 4,
        group_size: 64,
        scale_type: ScaleType::BF16,
    };
    // (gate, up) of three experts, each three arrays (GGML: one).
    let mut cases: Vec<(String, Vec<[Vec<u8>; 3]>)> = Vec::new();
    for ty in [GgmlType::Q4_K, GgmlType::Q4_0, GgmlType::Q6_K] {
        let mats = (0..6)
            .map(|i| [random_ggml(ty, ff, hidden, 50 + i), Vec::new(), Vec::new()])
            .collect();
        cases.push((ty.name().to_string(), mats));
    }
    let mats = (0..6)
        .map(|_| {
            let (w, s, b) = mlx(ff, hidden);
            [w, s, b]
        })
        .collect();
    cases.push(("MLX-Q4".into(), mats));
    for (name, mats) in &cases {
        let ggml = [GgmlType::Q4_K, GgmlType::Q4_0, GgmlType::Q6_K]
            .into_iter()
            .find(|t| t.name() == name);
        let ms: Vec<Matrix<'_>> = mats
            .iter()
            .map(|a| match ggml {
                Some(ty) => Matrix::ggml(ty, ff, hidden, &a[0]).unwrap(),
                None => Matrix::mlx(mlx_q, ff, hidden, &a[0], &a[1], &a[2]).unwrap(),
            })
            .collect();
        // Each matrix's arrays at 256-byte steps in one pool.
        let mut at = Vec::new();
        let mut room = Vec::new();
        let mut end = 0u64;
        for m in &ms {
            let sizes = GpuMatrix::array_bytes(m);
            let offs: Vec<u64> = sizes
                .iter()
                .map(|b| {
                    let o = end;
                    end = (end + b).next_multiple_of(256);
                    o
                })
                .collect();
            at.push(offs);
            room.push(sizes);
        }
        let pool = gpu.storage("pool", &[], end).unwrap();
        let shapes: Vec<MatShape> = ms
            .iter()
            .enumerate()
            .map(|(i, m)| GpuMatrix::write_at(gpu, m, &pool, &at[i], &room[i], None).unwrap())
            .collect();
        for counts in [[1usize, 1, 1], [2, 1, 3]] {
            let rows: usize = counts.iter().sum();
            let x = normals(rows * hidden, 70 + rows as u64);
            let xb = gpu.upload_f32("x", &x).unwrap();
            // Jobs: expert e has gate ms[2e], up ms[2e + 1].
            let mut jobs: Vec<u32> = Vec::new();
            let mut t0 = 0;
            for (e, &c) in counts.iter().enumerate() {
                for m in [2 * e, 2 * e + 1] {
                    let o = &at[m];
                    let w = |a: usize| o.get(a).map_or(0, |&v| if a == 0 { v } else { v / 4 });
                    jobs.extend([w(0) as u32, w(1) as u32, w(2) as u32]);
                }
                jobs.extend([t0 as u32, c as u32, t0 as u32, 0, 0, 0]);
                t0 += c;
            }
            let jb = gpu.storage("jobs", bytemuck::cast_slice(&jobs), 0).unwrap();
            let most = *counts.iter().max().unwrap();
            let mut want_plain = vec![0f32; rows * ff];
            let mut want_glu = vec![0f32; rows * ff];
            let mut wrow = vec![0f32; hidden];
            let mut urow = vec![0f32; hidden];
            let mut t0 = 0;
            for (e, &c) in counts.iter().enumerate() {
                for rr in 0..ff {
                    ms[2 * e].row(rr, &mut wrow);
                    ms[2 * e + 1].row(rr, &mut urow);
                    for t in t0..t0 + c {
                        let xt = &x[t * hidden..(t + 1) * hidden];
                        let g = dot(&wrow, xt);
                        want_plain[t * ff + rr] = g;
                        want_glu[t * ff + rr] = silu(g) * dot(&urow, xt);
                    }
                }
                t0 += c;
            }
            for variant in gpu.variants() {
                for (glu, want) in [(false, &want_plain), (true, &want_glu)] {
                    let yb = gpu.zeros_f32("y", rows * ff).unwrap();
                    let mut pass = Pass::with_variant(gpu, variant);
                    pass.expert_matmul(
                        &shapes[0],
                        glu,
                        &pool,
                        &xb,
                        &yb,
                        &jb,
                        (0, 3),
                        (rows, rows),
                        most,
                    )
                    .unwrap();
                    pass.submit().unwrap();
                    let got = gpu.read_f32(&yb, rows * ff).unwrap();
                    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for i in 0..rows * ff {
                        assert!(
                            (got[i] - want[i]).abs() <= 1e-5 * scale + 1e-6,
                            "{name} {counts:?} glu={glu} {variant:?} [{i}]: {} vs {}",
                            got[i],
                            want[i]
                        );
                    }
                    assert!(cosine(&got, want) >= 0.9999, "{name} {counts:?} glu={glu}");
                }
                if most > 1 {
                    continue;
                }
                // One token's three experts (ranks 0, 1, 2) with the
                // combine in the product's dispatch: the same bits as the
                // product and moe_combine apart, and the CPU's sum.
                let resid = normals(ff, 80);
                let w = [0.5f32, 0.3, 0.2];
                let wb = gpu.upload_f32("weights", &w).unwrap();
                let rowb = gpu
                    .storage("rows", bytemuck::cast_slice(&[0u32, 1, 2]), 0)
                    .unwrap();
                let fused = gpu.upload_f32("resid", &resid).unwrap();
                let apart = gpu.upload_f32("resid", &resid).unwrap();
                let yb = gpu.zeros_f32("y", rows * ff).unwrap();
                let mut pass = Pass::with_variant(gpu, variant);
                pass.expert_matmul_combine(&shapes[0], &pool, &xb, &fused, &jb, (0, 3), &wb)
                    .unwrap();
                pass.expert_matmul(&shapes[0], false, &pool, &xb, &yb, &jb, (0, 3), (3, 3), 1)
                    .unwrap();
                pass.moe_combine(&apart, &yb, &rowb, &wb, 1, ff, 3).unwrap();
                pass.submit().unwrap();
                let fused = gpu.read_f32(&fused, ff).unwrap();
                let apart = gpu.read_f32(&apart, ff).unwrap();
                for c in 0..ff {
                    assert_eq!(
                        fused[c].to_bits(),
                        apart[c].to_bits(),
                        "{name} {variant:?} combine [{c}]: {} vs {}",
                        fused[c],
                        apart[c]
                    );
                    let want =
                        resid[c] + (0..3).map(|r| w[r] * want_plain[r * ff + c]).sum::<f32>();
                    assert!(
                        (fused[c] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{name} combine [{c}]"
                    );
                }
            }
        }
    }
}

/// The buffers `moe_route` writes, for `n` tokens' top `k`.
struct RouteBufs {
    choice: moeflux::backend::gpu::wgpu::Buffer,
    jobs: moeflux::backend::gpu::wgpu::Buffer,
    rows: moeflux::backend::gpu::wgpu::Buffer,
    weights: moeflux::backend::gpu::wgpu::Buffer,
}

impl RouteBufs {
    fn new(gpu: &Gpu, n: usize, k: usize) -> RouteBufs {
        RouteBufs {
            choice: gpu.zeros_f32("choice", 2 * n * k).unwrap(),
            jobs: gpu.zeros_f32("jobs", 2 * k * JOB_WORDS).unwrap(),
            rows: gpu.zeros_f32("rows", k).unwrap(),
            weights: gpu.zeros_f32("weights", k).unwrap(),
        }
    }

    fn out(&self) -> moeflux::backend::gpu::pass::RouteOut<'_> {
        moeflux::backend::gpu::pass::RouteOut {
            choice: &self.choice,
            jobs: &self.jobs,
            rows: &self.rows,
            weights: &self.weights,
        }
    }
}

/// Routing of `n` tokens over `ne` experts (token `n − 1`: all logits
/// equal; token `n − 2`: logits on a coarse grid, so that ties fall
/// around the k-th expert) against the CPU's softmax and a stable top-k.
fn route_shape_matches_cpu(gpu: &moeflux::backend::gpu::Gpu, n: usize, ne: usize, k: usize) {
    let mut logits = normals(n * ne, 31 + ne as u64);
    logits[(n - 1) * ne..].iter_mut().for_each(|v| *v = 0.5);
    logits[(n - 2) * ne..(n - 1) * ne]
        .iter_mut()
        .for_each(|v| *v = (*v * 2.0).round() / 2.0);
    let lb = gpu.upload_f32("logits", &logits).unwrap();
    let bufs = RouteBufs::new(gpu, n, k);
    let (out, choice) = (bufs.out(), &bufs.choice);
    for norm in [false, true] {
        let mut want = Vec::new();
        for t in 0..n {
            let mut p = logits[t * ne..(t + 1) * ne].to_vec();
            softmax(&mut p);
            let mut order: Vec<usize> = (0..ne).collect();
            // Stable: equal probabilities keep the lower id first.
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let top: Vec<(u32, f32)> = order[..k].iter().map(|&e| (e as u32, p[e])).collect();
            let sum: f32 = top.iter().map(|c| c.1).sum();
            want.extend(
                top.iter()
                    .map(|&(e, w)| (e, if norm { w / sum } else { w })),
            );
        }
        // The last token's logits in a buffer of their own (a streamed
        // layer's guess) give the same choice.
        let last = gpu.upload_f32("guess", &logits[(n - 1) * ne..]).unwrap();
        let runs = gpu
            .variants()
            .into_iter()
            .flat_map(|v| [(v, false), (v, true)]);
        for (variant, split) in runs {
            let mut pass = Pass::with_variant(gpu, variant);
            let dims = (n, ne, k, norm);
            if split {
                pass.moe_route_with_guess((&lb, &last), out, dims).unwrap();
            } else {
                pass.moe_route(&lb, out, dims, None).unwrap();
            }
            pass.submit().unwrap();
            let got = gpu.read_f32(choice, 2 * n * k).unwrap();
            for (i, (&(e, w), c)) in want.iter().zip(got.chunks_exact(2)).enumerate() {
                let (ge, gw) = (c[0].to_bits(), c[1]);
                assert_eq!(
                    ge,
                    e,
                    "{ne} experts, token {} rank {} ({variant:?}, norm {norm}, split {split})",
                    i / k,
                    i % k
                );
                // The grid token is there for its ties: its logits reach
                // further from their maximum, where lavapipe's exp was
                // seen ~20 ulp from the CPU's.
                let tol = if i / k == n - 2 { 1e-5 } else { 1e-6 };
                assert!(
                    (gw - w).abs() <= tol * w.abs().max(1e-3),
                    "token {} rank {}: weight {gw} vs {w}",
                    i / k,
                    i % k
                );
            }
        }
    }
}

/// GPU routing against the CPU's softmax and a plain top-k: the same
/// experts in the same order (lower id first on ties) and weights within
/// f32 rounding, with and without renormalisation; and the expert jobs and
/// combine tables it writes for one token.
#[test]
fn moe_route_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let (n, ne, k) = (5, 128, 8);
    let mut logits = normals(n * ne, 31);
    // Token 4: all equal (ties everywhere: experts 0..k in order).
    logits[4 * ne..].iter_mut().for_each(|v| *v = 0.5);
    // Expert counts of one expert a thread or several (the kernel has
    // 128 threads), one not a multiple of four, with their models' k.
    for (ne, k) in [(128, 8), (60, 4), (256, 8), (512, 10), (1024, 64)] {
        route_shape_matches_cpu(gpu, n, ne, k);
    }
    let lb = gpu.upload_f32("logits", &logits).unwrap();
    let bufs = RouteBufs::new(gpu, n, k);
    let (out, choice) = (bufs.out(), &bufs.choice);
    // A NaN logit makes every probability NaN: the choice is still
    // deterministic and valid — experts 0..k in order, equal weights —
    // in every variant, run after run.
    let mut bad = logits[..ne].to_vec();
    bad[17] = f32::NAN;
    let bb = gpu.upload_f32("logits", &bad).unwrap();
    for variant in gpu.variants() {
        for _ in 0..2 {
            let mut pass = Pass::with_variant(gpu, variant);
            pass.moe_route(&bb, out, (1, ne, k, true), None).unwrap();
            pass.submit().unwrap();
            let got = gpu.read_f32(choice, 2 * k).unwrap();
            let ids: Vec<u32> = got.chunks_exact(2).map(|c| c[0].to_bits()).collect();
            assert_eq!(ids, (0..k as u32).collect::<Vec<_>>(), "{variant:?}");
            for c in got.chunks_exact(2) {
                assert_eq!(c[1], 1.0 / k as f32, "{variant:?}: weight {}", c[1]);
            }
        }
    }
    // One token with jobs: expert e at slot 3 + e, slots 1024 bytes apart.
    let place = moeflux::backend::gpu::pass::ExpertPlace {
        first: 3,
        stride: 1024,
        offsets: [[0, 0, 0], [256, 0, 0], [512, 0, 0]],
    };
    let mut pass = Pass::new(gpu);
    pass.moe_route(&lb, out, (1, ne, k, true), Some(place))
        .unwrap();
    pass.submit().unwrap();
    let got = gpu.read_f32(choice, 2 * k).unwrap();
    let j: Vec<u32> = gpu
        .read_f32(&bufs.jobs, 2 * k * JOB_WORDS)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let w = gpu.read_f32(&bufs.weights, k).unwrap();
    let r: Vec<u32> = gpu
        .read_f32(&bufs.rows, k)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    for rank in 0..k {
        let e = got[2 * rank].to_bits();
        let base = (3 + e) * 1024;
        let g = &j[rank * JOB_WORDS..rank * JOB_WORDS + 9];
        assert_eq!(
            g,
            &[
                base,
                base / 4,
                base / 4,
                base + 256,
                base / 4,
                base / 4,
                rank as u32,
                1,
                0
            ]
        );
        let d = &j[(k + rank) * JOB_WORDS..(k + rank) * JOB_WORDS + 9];
        assert_eq!(d[0], base + 512);
        assert_eq!(&d[6..9], &[rank as u32, 1, rank as u32]);
        assert_eq!(w[rank], got[2 * rank + 1]);
        assert_eq!(r[rank], rank as u32);
    }
}

/// The router product whose last workgroup routes (`router_route`) gives
/// the bits of the router product followed by `moe_route`: the logits,
/// the normalised row, the choice, the expert jobs and the combine's rows
/// and weights. Router formats F32, Q8_0 and MLX-Q4 (scales and biases
/// bound too); 60, 128 and 300 experts; with and without renormalisation;
/// every variant; twice in one pass (the arrival count is left at zero
/// for the second); and routers whose logits are all equal or hold a NaN.
#[test]
fn router_route_is_router_then_route() {
    let Some(gpu) = gpu() else { return };
    let cols = 256;
    let x = normals(cols, 41);
    let nw: Vec<f32> = normals(cols, 42).iter().map(|v| 1.0 + 0.2 * v).collect();
    let (xb, nwb) = (
        gpu.upload_f32("x", &x).unwrap(),
        gpu.upload_f32("norm", &nw).unwrap(),
    );
    let place = moeflux::backend::gpu::pass::ExpertPlace {
        first: 3,
        stride: 1024,
        offsets: [[0, 64, 128], [256, 320, 384], [512, 576, 640]],
    };
    let f32_bytes = |v: Vec<f32>| -> Vec<u8> { v.iter().flat_map(|f| f.to_le_bytes()).collect() };
    let mut cases: Vec<(String, Vec<u8>, usize, usize)> = vec![
        ("F32".into(), f32_bytes(normals(128 * cols, 43)), 128, 8),
        (
            "Q8_0".into(),
            random_ggml(GgmlType::Q8_0, 60, cols, 44),
            60,
            4,
        ),
        (
            "F32, 300".into(),
            f32_bytes(normals(300 * cols, 45)),
            300,
            10,
        ),
        (
            "F32, equal logits".into(),
            f32_bytes(vec![0.0; 128 * cols]),
            128,
            8,
        ),
    ];
    let mut nan = normals(128 * cols, 46);
    nan[17 * cols + 5] = f32::NAN;
    cases.push(("F32, a NaN logit".into(), f32_bytes(nan), 128, 8));
    let mut r = Rng::new(47);
    let ne = 64;
    let weight: Vec<u8> = (0..ne * cols / 2).map(|_| r.next_u64() as u8).collect();
    let groups = ne * cols / 64;
    let scales: Vec<u8> = (0..groups)
        .flat_map(|_| f16::from_f32(0.01 + 0.01 * r.unit() as f32).to_le_bytes())
        .collect();
    let biases: Vec<u8> = (0..groups)
        .flat_map(|_| f16::from_f32(-0.05 * r.unit() as f32).to_le_bytes())
        .collect();
    let q = MlxAffine {
        bits: 4,
        group_size: 64,
        scale_type: ScaleType::F16,
    };
    let mlx = Matrix::mlx(q, ne, cols, &weight, &scales, &biases).unwrap();
    let mut matrices: Vec<(String, GpuMatrix, usize, usize)> = vec![(
        "MLX-Q4".into(),
        GpuMatrix::upload(gpu, &mlx).unwrap(),
        ne,
        6,
    )];
    for (name, bytes, ne, k) in &cases {
        let ty = if name.starts_with("Q8_0") {
            GgmlType::Q8_0
        } else {
            GgmlType::F32
        };
        let m = Matrix::ggml(ty, *ne, cols, bytes).unwrap();
        matrices.push((name.clone(), GpuMatrix::upload(gpu, &m).unwrap(), *ne, *k));
    }
    let bits = |b: &moeflux::backend::gpu::wgpu::Buffer, n: usize| -> Vec<u32> {
        gpu.read_f32(b, n)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    for (name, w, ne, k) in &matrices {
        let (ne, k) = (*ne, *k);
        for variant in gpu.variants() {
            for norm_topk in [true, false] {
                let run = |fused: bool| {
                    let hb = gpu.zeros_f32("normed", cols).unwrap();
                    let lb = gpu.zeros_f32("logits", ne).unwrap();
                    let outs = [0, 1].map(|_| RouteBufs::new(gpu, 1, k));
                    let mut pass = Pass::with_variant(gpu, variant);
                    pass.set_last_group_finishes(fused);
                    for o in &outs {
                        pass.router_route(
                            w,
                            &xb,
                            (&nwb, 1e-6),
                            &hb,
                            &lb,
                            o.out(),
                            (k, norm_topk),
                            place,
                        )
                        .unwrap();
                    }
                    pass.submit().unwrap();
                    let mut got = vec![bits(&hb, cols), bits(&lb, ne)];
                    for o in &outs {
                        got.extend([
                            bits(&o.choice, 2 * k),
                            bits(&o.jobs, 2 * k * JOB_WORDS),
                            bits(&o.rows, k),
                            bits(&o.weights, k),
                        ]);
                    }
                    got
                };
                let (want, got) = (run(false), run(true));
                let what = ["normed row", "logits", "choice", "jobs", "rows", "weights"];
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    let part = what[if i < 2 { i } else { 2 + (i - 2) % 4 }];
                    assert!(
                        w == g,
                        "{name} ({ne} experts, top {k}, renormalised {norm_topk}, {variant:?}): \
                         {part} of call {} differs",
                        i.saturating_sub(2) / 4
                    );
                }
                // The choice is a real top-k: distinct experts, in range.
                let ids: Vec<u32> = got[2].chunks_exact(2).map(|c| c[0]).collect();
                let mut sorted = ids.clone();
                sorted.sort();
                sorted.dedup();
                assert_eq!(sorted.len(), k, "{name}: experts {ids:?}");
                assert!(ids.iter().all(|&e| (e as usize) < ne), "{name}: {ids:?}");
            }
        }
    }
}

/// A SwiGLU FFN block — RMSNorm, gate and up projections with SwiGLU,
/// down projection — recorded as one pass and one submission: the kernels'
/// results must chain through their buffers with no host step between
/// them (the layer plan rests on this), and match the CPU chain.
#[test]
fn one_pass_chains_an_ffn_block() {
    let Some(gpu) = gpu() else { return };
    let (hidden, ffn, n) = (256, 96, 3);
    let ty = GgmlType::Q8_0;
    let wg = random_ggml(ty, ffn, hidden, 1);
    let wu = random_ggml(ty, ffn, hidden, 2);
    let wd = random_ggml(ty, hidden, ffn, 3);
    let gate_m = Matrix::ggml(ty, ffn, hidden, &wg).unwrap();
    let up_m = Matrix::ggml(ty, ffn, hidden, &wu).unwrap();
    let down_m = Matrix::ggml(ty, hidden, ffn, &wd).unwrap();
    let x = normals(n * hidden, 4);
    let norm: Vec<f32> = normals(hidden, 5).iter().map(|v| 1.0 + 0.1 * v).collect();
    let eps = 1e-6;

    // CPU chain.
    let project = |m: &Matrix<'_>, input: &[f32]| -> Vec<f32> {
        let mut row = vec![0f32; m.cols];
        let mut out = vec![0f32; n * m.rows];
        for r in 0..m.rows {
            m.row(r, &mut row);
            for t in 0..n {
                out[t * m.rows + r] = dot(&row, &input[t * m.cols..(t + 1) * m.cols]);
            }
        }
        out
    };
    let mut h = vec![0f32; n * hidden];
    for t in 0..n {
        let at = t * hidden..(t + 1) * hidden;
        rms_norm(&x[at.clone()], &norm, eps, &mut h[at]);
    }
    let (g, u) = (project(&gate_m, &h), project(&up_m, &h));
    let a: Vec<f32> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
    let want = project(&down_m, &a);

    // GPU chain: one pass; gate and up (with SwiGLU) as a one-expert
    // batch from a pool holding both.
    let down_w = GpuMatrix::upload(gpu, &down_m).unwrap();
    let up_at = (GpuMatrix::array_bytes(&gate_m)[0]).next_multiple_of(256);
    let pool = gpu
        .storage("pool", &[], up_at + GpuMatrix::array_bytes(&up_m)[0])
        .unwrap();
    let room = [up_at];
    let gate_shape = GpuMatrix::write_at(gpu, &gate_m, &pool, &[0], &room, None).unwrap();
    GpuMatrix::write_at(gpu, &up_m, &pool, &[up_at], &room, None).unwrap();
    let job: Vec<u32> = vec![0, 0, 0, up_at as u32, 0, 0, 0, n as u32, 0, 0, 0, 0];
    let jb = gpu.storage("jobs", bytemuck::cast_slice(&job), 0).unwrap();
    let xb = gpu.upload_f32("x", &x).unwrap();
    let nb = gpu.upload_f32("norm", &norm).unwrap();
    let hb = gpu.zeros_f32("h", n * hidden).unwrap();
    let ab = gpu.zeros_f32("act", n * ffn).unwrap();
    let ob = gpu.zeros_f32("out", n * hidden).unwrap();
    let mut pass = Pass::new(gpu);
    pass.rms_norm(&xb, &nb, &hb, n, hidden, eps).unwrap();
    pass.expert_matmul(&gate_shape, true, &pool, &hb, &ab, &jb, (0, 1), (n, n), n)
        .unwrap();
    pass.matmul(&down_w, &ab, &ob, n).unwrap();
    pass.submit().unwrap();
    let got = gpu.read_f32(&ob, n * hidden).unwrap();
    // Four kernels' f32 roundings compound, each far below this bound
    // (outputs are O(0.01–0.1)).
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - e).abs() <= 1e-4 * scale,
            "FFN block [{i}]: {g} vs {e} (largest output {scale})"
        );
    }
    let cos = cosine(&got, &want);
    assert!(cos >= 0.9999, "FFN block: cosine {cos}");
}

/// One head's attention over positions `0..len`, the plain way (as the CPU
/// backend's own reference test): scores, softmax, values in order.
fn naive_attention(q: &[f32], kv: &LayerKv, g: usize, hd: usize, len: usize) -> Vec<f32> {
    let scale = 1.0 / (hd as f32).sqrt();
    let mut row = vec![0.0; hd];
    let mut scores: Vec<f32> = (0..len)
        .map(|j| {
            kv.k.read(j * kv.k_dim + g * hd, &mut row);
            dot(q, &row) * scale
        })
        .collect();
    softmax(&mut scores);
    let mut o = vec![0.0; hd];
    for (j, &s) in scores.iter().enumerate() {
        kv.v.read(j * kv.v_dim + g * hd, &mut row);
        for (a, &b) in o.iter_mut().zip(&row) {
            *a += s * b;
        }
    }
    o
}

/// The cache's rows as the GPU holds them (f16 bits packed, or f32).
fn upload_rows(gpu: &Gpu, rows: &Rows) -> moeflux::backend::gpu::wgpu::Buffer {
    match rows {
        Rows::F32(v) => gpu.upload_f32("kv", v).unwrap(),
        Rows::F16(v) => {
            let bytes: Vec<u8> = v.iter().flat_map(|h| h.to_le_bytes()).collect();
            gpu.storage("kv", &bytes, 0).unwrap()
        }
        Rows::Q8_0(_) => panic!("the GPU has no q8_0 KV cache"),
    }
}

#[test]
fn decode_attention_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    // (heads, kv heads, head_dim, positions): GQA and MHA, head dims that
    // are 3 to 128 16-byte loads a row (24 and 96: loads that do not divide
    // the workgroup; 512 f32: chunks of 8 positions), contexts below,
    // across and well past one 64-position span.
    for (nh, nkv, hd, len) in [
        (8, 2, 64, 1),
        (8, 2, 128, 300),
        (4, 4, 256, 37),
        (16, 4, 128, 700),
        // More spans than the merge loads at once (16).
        (8, 2, 128, 1100),
        (6, 1, 24, 257),
        (4, 2, 96, 130),
        (2, 1, 512, 90),
    ] {
        let mut rng = Rng::new(len as u64 * 7 + hd as u64);
        let mut rand = |n: usize, s: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.unit() as f32 * 2.0 - 1.0) * s)
                .collect()
        };
        // Large keys make peaked softmaxes, as real attention has.
        let q = rand(nh * hd, 1.0);
        let k = rand(len * nkv * hd, 3.0);
        let v = rand(len * nkv * hd, 1.0);
        for kv_type in [KvType::F16, KvType::F32] {
            let mut cache = KvCache::new(&[Some((nkv * hd, nkv * hd))], len, kv_type);
            cache.layers[0].push(&k, &v);
            let kv = &cache.layers[0];
            let want: Vec<f32> = (0..nh)
                .flat_map(|h| {
                    naive_attention(&q[h * hd..(h + 1) * hd], kv, h / (nh / nkv), hd, len)
                })
                .collect();
            let (kb, vb) = (upload_rows(gpu, &kv.k), upload_rows(gpu, &kv.v));
            let qb = gpu.upload_f32("q", &q).unwrap();
            let shape = AttentionShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                len,
                k_stride: kv.k_dim,
                v_stride: kv.v_dim,
                kv_f16: kv_type == KvType::F16,
                gated: false,
            };
            // Scratch for one span (one workgroup reads the whole context),
            // two, and as many as the context has (one per 64 positions);
            // the spans merged by the attention workgroups or by a merge
            // dispatch.
            for (variant, spans, merge) in gpu.variants().into_iter().flat_map(|v| {
                [(v, 1), (v, 2), (v, len.div_ceil(64))]
                    .into_iter()
                    .flat_map(|(v, s)| [(v, s, true), (v, s, false)])
            }) {
                let scratch = gpu.zeros_f32("spans", spans * nh * (hd + 2)).unwrap();
                // Twice in one pass, into two outputs: the second call
                // finds the merge counts as the first left them.
                let outs = [0, 1].map(|_| gpu.zeros_f32("out", nh * hd).unwrap());
                let mut pass = Pass::with_variant(gpu, variant);
                pass.set_last_group_finishes(merge);
                for out in &outs {
                    pass.attention(&qb, &kb, &vb, &scratch, out, shape).unwrap();
                }
                pass.submit().unwrap();
                for (call, out) in outs.iter().enumerate() {
                    let got = gpu.read_f32(out, nh * hd).unwrap();
                    let what = format!(
                        "{nh}/{nkv} heads, hd {hd}, {len} positions, {kv_type:?}, {variant:?}, \
                         {spans} spans, merge in attention {merge}, call {call}"
                    );
                    // Outputs are convex combinations of values in [-1, 1]:
                    // f32 rounding of the scores and sums stays far below
                    // 1e-5.
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!((g - e).abs() <= 1e-5, "attention {what} [{i}]: {g} vs {e}");
                    }
                    let cos = cosine(&got, &want);
                    assert!(cos >= 0.9999, "attention {what}: cosine {cos}");
                }
            }
        }
    }
}

/// Every kernel, in every variant, parses and validates with naga, and
/// translates to MSL (what wgpu does on a Mac; MSL 2.3, the oldest on
/// Apple silicon), to SPIR-V 1.3 (Vulkan) and to HLSL (what wgpu does for
/// DX12, at the shader model each variant needs: 5.1 with nothing
/// optional, 6.0 for subgroup reductions, which are wave intrinsics, 6.2
/// for native f16). No adapter needed. Compiling the HLSL (DXC or FXC)
/// needs Windows, so whether a shader model allows everything the output
/// uses is not checked here: naga checks only some of it.
#[test]
fn every_kernel_translates_to_msl_spirv_and_hlsl() {
    use naga::back::{hlsl, msl, spv};
    use naga::valid::{Capabilities, ValidationFlags, Validator};
    let mut checked = 0;
    for kernel in Kernel::all() {
        let mut variants: Vec<Variant> = Variant::all().map(|v| kernel.normalize(v)).to_vec();
        variants.sort_by_key(|v| (v.reduce == Reduce::Subgroup, v.f16_native));
        variants.dedup();
        for variant in variants {
            let what = format!("{} ({variant:?})", kernel.name());
            let src = kernel.source(variant).unwrap();
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{what}: WGSL:\n{}", e.emit_to_string(&src)));
            // Only the variant's own choices may need optional capabilities:
            // the shared-memory, integer-f16 variant runs everywhere.
            let mut caps = Capabilities::empty();
            if variant.reduce == Reduce::Subgroup {
                caps |= Capabilities::SUBGROUP;
            }
            if variant.f16_native {
                caps |= Capabilities::SHADER_FLOAT16_IN_FLOAT32;
            }
            let info = Validator::new(ValidationFlags::all(), caps)
                .validate(&module)
                .unwrap_or_else(|e| panic!("{what}: validation:\n{}", e.emit_to_string(&src)));
            let restrict = naga::proc::BoundsCheckPolicies {
                index: naga::proc::BoundsCheckPolicy::Restrict,
                buffer: naga::proc::BoundsCheckPolicy::Restrict,
                image_load: naga::proc::BoundsCheckPolicy::Restrict,
                binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
            };
            let options = msl::Options {
                lang_version: (2, 3),
                bounds_check_policies: restrict,
                ..Default::default()
            };
            let pipeline = msl::PipelineOptions::default();
            let (msl_src, _) = msl::write_string(&module, &info, &options, &pipeline)
                .unwrap_or_else(|e| panic!("{what}: MSL: {e:?}"));
            assert!(msl_src.contains("kernel void"), "{what}: no MSL kernel");
            let spv_opts = spv::Options {
                lang_version: (1, 3),
                bounds_check_policies: restrict,
                ..Default::default()
            };
            let words = spv::write_vec(&module, &info, &spv_opts, None)
                .unwrap_or_else(|e| panic!("{what}: SPIR-V: {e:?}"));
            assert_eq!(words.first(), Some(&0x0723_0203), "{what}: SPIR-V magic");
            let shader_model = if variant.f16_native {
                hlsl::ShaderModel::V6_2
            } else if variant.reduce == Reduce::Subgroup {
                hlsl::ShaderModel::V6_0
            } else {
                hlsl::ShaderModel::V5_1
            };
            let hlsl_opts = hlsl::Options {
                shader_model,
                // As the kernels are compiled (see RUNTIME_CHECKS in
                // backend/gpu/kernels.rs): our loops are counted.
                force_loop_bounding: false,
                ..Default::default()
            };
            let mut hlsl_src = String::new();
            hlsl::Writer::new(&mut hlsl_src, &hlsl_opts, &hlsl::PipelineOptions::default())
                .write(&module, &info, None)
                .unwrap_or_else(|e| panic!("{what}: HLSL: {e:?}"));
            assert!(
                hlsl_src.contains("[numthreads("),
                "{what}: no HLSL compute entry point"
            );
            checked += 1;
        }
    }
    // One-token products (9 formats × alone, alone with the input
    // normalised, expert batch, expert batch with SwiGLU, expert batch
    // with the combine, the router product that routes) and attention (2
    // caches × with or without the decode prep × merging or not): four
    // variants each (reduction × f16 widening); prompt products (9 formats
    // × alone, expert batch, expert batch with SwiGLU) two (f16 widening:
    // they do not reduce); attention_prep (2 caches), the norm and the MoE
    // routing two (reduction); the attention merge, gather and the MoE
    // combine one; the Gated DeltaNet (two head sizes) and the dense
    // SwiGLU two (reduction), the output gate one.
    let formats = WeightKind::all().len();
    assert_eq!(
        checked,
        4 * (6 * formats + 8) + 2 * 3 * formats + 2 * 2 + 2 + 2 + 3 + 2 * 2 + 2 + 1
    );
}

/// One dispatch decodes an expert's gate and up projections (SwiGLU), so
/// both must share a format: an expert whose gate and up differ cannot be
/// put in a GPU slot. Filling the slot is a typed error naming both, the
/// slot is not left owned by the expert (a later lookup misses instead of
/// reading half-written weights), and a well-formed expert then fills it.
#[test]
fn expert_with_mixed_gate_and_up_formats_is_a_typed_error() {
    use moeflux::backend::gpu::experts::SlotCount;
    use moeflux::experts::store::ExpertView;
    let Some(gpu) = gpu() else { return };
    const HIDDEN: usize = 64;
    const FF: usize = 32;
    let q8 = GgmlType::Q8_0;
    let q4 = GgmlType::Q4_0;
    let gate8 = random_ggml(q8, FF, HIDDEN, 1);
    let up4 = random_ggml(q4, FF, HIDDEN, 2);
    let up8 = random_ggml(q8, FF, HIDDEN, 3);
    let down8 = random_ggml(q8, HIDDEN, FF, 4);
    let array = gate8.len().max(down8.len()) as u64;
    let mut arena = GpuExperts::new(gpu, 1, vec![array; 3], SlotCount::Exactly(1), &[1]).unwrap();
    fn view<'a>(gate: &'a [u8], up: (&'a [u8], GgmlType), down: &'a [u8]) -> ExpertView<'a> {
        ExpertView {
            gate: Matrix::ggml(GgmlType::Q8_0, FF, HIDDEN, gate).unwrap(),
            up: Matrix::ggml(up.1, FF, HIDDEN, up.0).unwrap(),
            down: Matrix::ggml(GgmlType::Q8_0, HIDDEN, FF, down).unwrap(),
        }
    }
    let slot = arena.claim(0, 0).expect("a slot");
    match arena.fill(gpu, slot, &view(&gate8, (&up4, q4), &down8)) {
        Err(GpuError::Unsupported(m)) => assert!(
            m.contains("Q8_0") && m.contains("Q4_0") && m.contains("differ"),
            "{m}"
        ),
        other => panic!("mixed gate/up formats: {other:?}"),
    }
    assert!(
        arena.hit(0, 0).is_none(),
        "a failed fill left the expert resident"
    );
    assert!(arena.shapes(slot).is_err());
    let slot = arena.claim(0, 0).expect("a slot");
    arena
        .fill(gpu, slot, &view(&gate8, (&up8, q8), &down8))
        .unwrap();
    assert_eq!(arena.hit(0, 0), Some(slot));
    assert!(arena.shapes(slot).is_ok());
}

/// The GPU arena takes empty slots first (lowest first), then the least
/// recently used (lowest slot on ties), never one pinned by the current
/// wave: the eviction order it keeps beside the slots gives what a scan
/// of every slot gave.
#[test]
fn arena_evicts_the_least_recently_used_unpinned_slot() {
    use moeflux::backend::gpu::experts::SlotCount;
    let Some(gpu) = gpu() else { return };
    let mut arena = GpuExperts::new(gpu, 1, vec![256; 3], SlotCount::Exactly(4), &[16]).unwrap();
    assert_eq!(arena.n_slots(), 4);
    arena.tick();
    let first: Vec<u32> = (0..4)
        .map(|e| arena.claim(0, e).expect("an empty slot"))
        .collect();
    assert_eq!(first, [0, 1, 2, 3], "empty slots first, lowest first");
    // All four pinned by this wave: nothing to evict.
    assert_eq!(arena.claim(0, 4), None);
    arena.unpin_all();
    arena.tick();
    // Experts 2 and 0 used again: 1 and 3 are the least recent, 1's slot
    // the lower.
    assert_eq!(arena.hit(0, 2), Some(2));
    assert_eq!(arena.hit(0, 0), Some(0));
    arena.unpin_all();
    arena.tick();
    assert_eq!(arena.claim(0, 5), Some(1));
    assert_eq!(arena.hit(0, 1), None, "expert 1 was evicted");
    assert_eq!(arena.claim(0, 6), Some(3));
    // 0 and 2 were used at the same step, 0's slot the lower; both pinned
    // by a hit in this wave are passed over.
    assert_eq!(arena.hit(0, 0), Some(0));
    assert_eq!(arena.claim(0, 7), Some(2));
    assert_eq!(arena.claim(0, 8), None, "every slot pinned");
    arena.unpin_all();
    arena.tick();
    assert_eq!(arena.claim(0, 9), Some(0));
}

/// Every loop of every kernel ends by construction, which is what lets
/// the pipelines leave out naga's loop bounding (see `RUNTIME_CHECKS` in
/// `backend/gpu/kernels.rs`): no `loop` or `while`, and each `for` is
/// `for (var i = a; i < bound; step)` with `step` one of `i++`, `i += s`
/// for a positive module constant of at most twice a workgroup (or, in the attention
/// kernels, the chunk, which the host makes a power of two), or
/// `for (var i = a; i > 0u; i = i >> 1u)`; the bound is a plain
/// expression (no `||`, `&&`, calls or `select`); and no statement in the
/// body assigns the counter or a variable of the bound.
#[test]
fn every_loop_is_counted() {
    const STEPS: [&str; 7] = ["WG", "PWG", "2u * WG", "LOADS", "ROW_THREADS", "1u", "2u"];
    let mut loops = 0;
    for kernel in Kernel::all() {
        for variant in Variant::all() {
            let src = kernel.source(variant).unwrap();
            let what = kernel.name();
            let code = strip_comments(&src);
            let words: Vec<&str> = code
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .collect();
            assert!(
                !words.contains(&"loop") && !words.contains(&"while"),
                "{what}: an unbounded loop form"
            );
            let fors = words.iter().filter(|w| **w == "for").count();
            let mut headers = 0;
            let mut rest = code.as_str();
            while let Some(at) = rest.find("for (") {
                let from = &rest[at + 5..];
                let close = from.find(") {").expect("a for header");
                let text = &from[..close];
                let header: Vec<&str> = text.split(';').map(str::trim).collect();
                assert_eq!(header.len(), 3, "{what}: for ({text})");
                let var = header[0]
                    .strip_prefix("var ")
                    .and_then(|h| h.split(" = ").next())
                    .unwrap_or_else(|| panic!("{what}: counter in {:?}", header[0]));
                let (cond, step) = (header[1], header[2]);
                let chunk = what.starts_with("attention") && step == format!("{var} += p.chunk");
                let bound = cond.strip_prefix(&format!("{var} < "));
                let counted = bound.is_some()
                    && (step == format!("{var}++")
                        || chunk
                        || STEPS.iter().any(|s| step == format!("{var} += {s}")));
                let halving =
                    cond == format!("{var} > 0u") && step == format!("{var} = {var} >> 1u");
                assert!(counted || halving, "{what}: for ({text})");
                let bound = bound.unwrap_or("");
                assert!(
                    !["||", "&&", "(", "?"].iter().any(|t| bound.contains(t)),
                    "{what}: for ({text}): the bound must be a plain expression"
                );
                // The body, by matching braces.
                let body_at = close + 3;
                let mut depth = 1;
                let mut end = from.len();
                for (i, c) in from[body_at..].char_indices() {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    if depth == 0 {
                        end = body_at + i;
                        break;
                    }
                }
                let body = &from[body_at..end];
                let names = bound
                    .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                    .filter(|w| w.starts_with(|c: char| c.is_alphabetic() || c == '_'))
                    .chain([var]);
                for name in names {
                    assert!(
                        !assigns(body, name),
                        "{what}: the body of for ({text}) assigns {name}"
                    );
                }
                headers += 1;
                rest = &from[close..];
            }
            assert_eq!(headers, fors, "{what}: a `for` in another form");
            loops += headers;
        }
    }
    assert!(loops > 100, "only {loops} loops found");
}

/// WGSL without its `//` and `/* */` comments.
fn strip_comments(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while !rest.is_empty() {
        let line = rest.find("//");
        let block = rest.find("/*");
        match (line, block) {
            (Some(l), b) if b.is_none_or(|b| l < b) => {
                out.push_str(&rest[..l]);
                rest = rest[l..].find('\n').map_or("", |e| &rest[l + e..]);
            }
            (_, Some(b)) => {
                out.push_str(&rest[..b]);
                rest = rest[b..].find("*/").map_or("", |e| &rest[b + e + 2..]);
            }
            _ => {
                out.push_str(rest);
                rest = "";
            }
        }
    }
    out
}

/// Whether WGSL `body` may change variable `name`: an assignment or an
/// increment of it, or its address taken (a write through a pointer).
fn assigns(body: &str, name: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == '.';
    let mut from = 0;
    while let Some(i) = body[from..].find(name) {
        let at = from + i;
        from = at + name.len();
        let before = body[..at].chars().next_back();
        let after = body[from..].chars().next();
        if before.is_some_and(ident) || after.is_some_and(ident) {
            continue;
        }
        if before == Some('&') {
            return true;
        }
        let mut next = body[from..].trim_start();
        // `(i) = ...` assigns i too.
        if before == Some('(') {
            match next.strip_prefix(')') {
                Some(n) => next = n.trim_start(),
                None => continue,
            }
        }
        let compound = [
            "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "<<=", ">>=", "++", "--",
        ];
        if compound.iter().any(|op| next.starts_with(op))
            || (next.starts_with('=') && !next.starts_with("=="))
        {
            return true;
        }
    }
    false
}

/// The steps between the projections and the attention in one kernel,
/// against the CPU: q and k rows normalised per head (with, without, or
/// only q's norm) and rotated (full and partial RoPE, at positions far
/// from zero); k and v written into an f16 cache rounded exactly as the
/// CPU's cache rounds (v rows carry the hard cases: subnormals, ties,
/// overflow, infinities) or an f32 cache bit for bit; positions before
/// pos0 untouched.
#[test]
fn attention_prep_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let eps = 1e-6;
    let special = [
        0.0,
        -0.0,
        1.0e-7,  // subnormal in f16
        -3.0e-8, // rounds to the smallest subnormal or zero
        65504.0, // largest f16
        65520.0, // ties up to infinity
        1.0e6,   // overflow
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + 1.0 / 2048.0, // a tie, rounds to even
        1.0 + 3.0 / 2048.0, // a tie, rounds up to even
        6.1035156e-5,       // smallest normal f16
    ];
    for (nh, nkv, hd, n_rot, pos0, norm) in [
        (4, 2, 64, 64, 0, (true, true)),
        (3, 1, 128, 32, 5000, (true, false)),
        (2, 2, 16, 8, 40_000, (false, false)),
    ] {
        let n = 3;
        let width = (nh + 2 * nkv) * hd;
        let inv = rope_inv_freq(n_rot, 1e6);
        let mut qkv = normals(n * width, hd as u64);
        // The first v row of token 0 starts with the hard cases.
        let v0 = (nh + nkv) * hd;
        let m = special.len().min(hd);
        qkv[v0..v0 + m].copy_from_slice(&special[..m]);
        let norms: Vec<f32> = normals(2 * hd, 7).iter().map(|v| 1.0 + 0.2 * v).collect();
        // CPU: every head row normalised and rotated as the model does.
        let mut want = qkv.clone();
        for t in 0..n {
            for slot in 0..nh + nkv {
                let at = t * width + slot * hd;
                let is_q = slot < nh;
                let row = &mut want[at..at + hd];
                if (is_q && norm.0) || (!is_q && norm.1) {
                    let w = if is_q { &norms[..hd] } else { &norms[hd..] };
                    let x = row.to_vec();
                    rms_norm(&x, w, eps, row);
                }
                rope_neox(row, hd, pos0 + t, &inv);
            }
        }
        let qb = gpu.upload_f32("qkv", &qkv).unwrap();
        let nb = gpu.upload_f32("norms", &norms).unwrap();
        let table = gpu.upload_f32("rope", &rope_table(pos0, n, &inv)).unwrap();
        let stride = nkv * hd;
        for kv_f16 in [true, false] {
            let words = ((pos0 + n) * stride).div_ceil(if kv_f16 { 2 } else { 1 });
            let (kc, vc) = (
                gpu.zeros_f32("k", words).unwrap(),
                gpu.zeros_f32("v", words).unwrap(),
            );
            let qn = gpu.zeros_f32("qn", n * nh * hd).unwrap();
            let shape = AttentionShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                len: pos0 + n,
                k_stride: stride,
                v_stride: stride,
                kv_f16,
                gated: false,
            };
            for variant in gpu.variants() {
                let mut pass = Pass::with_variant(gpu, variant);
                pass.attention_prep(
                    &qb,
                    &nb,
                    &table,
                    &qn,
                    (&kc, &vc),
                    shape,
                    (n, pos0, inv.len()),
                    (norm, eps),
                )
                .unwrap();
                pass.submit().unwrap();
                let what =
                    format!("{nh}/{nkv}/{hd} rot {n_rot} at {pos0}, f16 {kv_f16}, {variant:?}");
                let got_q = gpu.read_f32(&qn, n * nh * hd).unwrap();
                let bits = |b: &moeflux::backend::gpu::wgpu::Buffer| -> Vec<u32> {
                    gpu.read_f32(b, words)
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                let (got_k, got_v) = (bits(&kc), bits(&vc));
                let cached = |w: &[u32], at: usize| -> u32 {
                    if kv_f16 {
                        (w[at / 2] >> (16 * (at % 2))) & 0xffff
                    } else {
                        w[at]
                    }
                };
                for t in 0..n {
                    for h in 0..nh {
                        for d in 0..hd {
                            let (g, e) =
                                (got_q[(t * nh + h) * hd + d], want[t * width + h * hd + d]);
                            // A norm's sum in another order, then the same
                            // rotation: a few ulps.
                            assert!(
                                (g - e).abs() <= 1e-5 * (e.abs() + 1.0),
                                "q {what} t {t} h {h} d {d}: {g} vs {e}"
                            );
                        }
                    }
                    for h in 0..nkv {
                        for d in 0..hd {
                            let at = (pos0 + t) * stride + h * hd + d;
                            let e = want[t * width + (nh + h) * hd + d];
                            let g = cached(&got_k, at);
                            let g = if kv_f16 {
                                f16::from_bits(g as u16).to_f32()
                            } else {
                                f32::from_bits(g)
                            };
                            let tol = if kv_f16 { 1e-3 } else { 1e-5 };
                            assert!(
                                (g - e).abs() <= tol * (e.abs() + 1.0),
                                "k {what} t {t} h {h} d {d}: {g} vs {e}"
                            );
                            // v: no norm, no rotation, rounded exactly.
                            let v = qkv[t * width + (nh + nkv + h) * hd + d];
                            let want_v = if kv_f16 {
                                f16::from_f32(v).to_bits() as u32
                            } else {
                                v.to_bits()
                            };
                            assert_eq!(
                                cached(&got_v, at),
                                want_v,
                                "v {what} t {t} h {h} d {d}: value {v}"
                            );
                        }
                    }
                }
                let before = pos0 * stride / if kv_f16 { 2 } else { 1 };
                assert!(
                    got_v[..before].iter().all(|&w| w == 0),
                    "{what}: positions before pos0 written"
                );
            }
        }
    }
    // Bad shapes are typed errors.
    let b = gpu.zeros_f32("b", 16).unwrap();
    let shape = AttentionShape {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
        len: 1,
        k_stride: 8,
        v_stride: 8,
        kv_f16: false,
        gated: false,
    };
    let mut pass = Pass::new(gpu);
    assert!(matches!(
        pass.attention_prep(
            &b,
            &b,
            &b,
            &b,
            (&b, &b),
            shape,
            (1, 0, 4),
            ((false, false), eps)
        ),
        Err(GpuError::Shape { .. })
    ));
}

/// The residual add (a projection added to the stream in the product's
/// own dispatch), the expert-grouped gather and the rank-ordered MoE
/// combine against the CPU's arithmetic.
#[test]
fn add_gather_and_combine_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let (n, dim, k) = (3, 70, 2);
    let x = normals(n * dim, 21);
    let bytes = random_ggml(GgmlType::Q8_0, dim, 64, 22);
    let w =
        GpuMatrix::upload(gpu, &Matrix::ggml(GgmlType::Q8_0, dim, 64, &bytes).unwrap()).unwrap();
    for n in [1, n] {
        let z = normals(n * 64, 23);
        let zb = gpu.upload_f32("z", &z).unwrap();
        let xb = gpu.upload_f32("x", &x[..n * dim]).unwrap();
        let mut pass = Pass::new(gpu);
        pass.matmul_add(&w, &zb, &xb, n).unwrap();
        pass.submit().unwrap();
        let got = gpu.read_f32(&xb, n * dim).unwrap();
        let o = gpu_matmul(gpu, &w, &z, n, gpu.variant);
        for i in 0..n * dim {
            assert_eq!(
                got[i].to_bits(),
                (x[i] + o[i]).to_bits(),
                "add, {n} tokens [{i}]"
            );
        }
    }

    // Gather: rows of x by index (repeats allowed).
    let idx: [u32; 5] = [2, 0, 2, 1, 0];
    let ib = gpu.storage("idx", bytemuck::cast_slice(&idx), 0).unwrap();
    let xb = gpu.upload_f32("x", &x).unwrap();
    let gb = gpu.zeros_f32("gathered", idx.len() * dim).unwrap();
    let mut pass = Pass::new(gpu);
    pass.gather(&xb, &ib, &gb, idx.len(), dim).unwrap();
    pass.submit().unwrap();
    let got = gpu.read_f32(&gb, idx.len() * dim).unwrap();
    for (i, &r) in idx.iter().enumerate() {
        let r = r as usize;
        assert_eq!(
            &got[i * dim..(i + 1) * dim],
            &x[r * dim..(r + 1) * dim],
            "row {i}"
        );
    }

    // Combine: (token, rank) → row of y, weighted, rank order, plus x.
    let y = normals(n * k * dim, 23);
    let row: [u32; 6] = [4, 1, 0, 5, 3, 2];
    let w: [f32; 6] = [0.7, 0.3, 0.55, 0.45, 0.9, 0.1];
    let yb = gpu.upload_f32("y", &y).unwrap();
    let rb = gpu.storage("row", bytemuck::cast_slice(&row), 0).unwrap();
    let wb = gpu.upload_f32("w", &w).unwrap();
    let xb = gpu.upload_f32("x", &x).unwrap();
    let mut pass = Pass::new(gpu);
    pass.moe_combine(&xb, &yb, &rb, &wb, n, dim, k).unwrap();
    pass.submit().unwrap();
    let got = gpu.read_f32(&xb, n * dim).unwrap();
    for t in 0..n {
        for c in 0..dim {
            let mut acc = 0f32;
            for r in 0..k {
                let i = t * k + r;
                acc += w[i] * y[row[i] as usize * dim + c];
            }
            let want = x[t * dim + c] + acc;
            let g = got[t * dim + c];
            // A GPU may fuse the multiply-adds: one rounding apart at most.
            assert!(
                (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "combine [{t}][{c}]: {g} vs {want}"
            );
        }
    }
}

/// Two projections of the same input written side by side into one
/// buffer (the attention block's q, k and v) give the bits each gives
/// alone, and nothing else of the rows is written.
#[test]
fn matmul_into_columns() {
    let Some(gpu) = gpu() else { return };
    let (cols, n) = (64, 5);
    let rows = [40, 24];
    let width = 70;
    let mats: Vec<Vec<u8>> = rows
        .iter()
        .enumerate()
        .map(|(i, &r)| random_ggml(GgmlType::Q8_0, r, cols, 31 + i as u64))
        .collect();
    let ws: Vec<GpuMatrix> = mats
        .iter()
        .zip(rows)
        .map(|(b, r)| {
            GpuMatrix::upload(gpu, &Matrix::ggml(GgmlType::Q8_0, r, cols, b).unwrap()).unwrap()
        })
        .collect();
    let x = normals(n * cols, 32);
    let xb = gpu.upload_f32("x", &x).unwrap();
    let both = gpu.zeros_f32("both", n * width).unwrap();
    let mut pass = Pass::new(gpu);
    pass.matmul_into(&ws[0], &xb, &both, n, (0, width)).unwrap();
    pass.matmul_into(&ws[1], &xb, &both, n, (rows[0] + 3, width))
        .unwrap();
    assert!(matches!(
        pass.matmul_into(&ws[1], &xb, &both, n, (width - 1, width)),
        Err(GpuError::Shape { .. })
    ));
    pass.submit().unwrap();
    let both = gpu.read_f32(&both, n * width).unwrap();
    for (w, col0) in [(&ws[0], 0), (&ws[1], rows[0] + 3)] {
        for (t, alone) in gpu_matmul(gpu, w, &x, n, gpu.variant)
            .chunks(w.shape.rows)
            .enumerate()
        {
            for (r, a) in alone.iter().enumerate() {
                assert_eq!(
                    a.to_bits(),
                    both[t * width + col0 + r].to_bits(),
                    "token {t}, row {r}"
                );
            }
        }
    }
    for t in 0..n {
        for c in (rows[0]..rows[0] + 3).chain(rows[0] + 3 + rows[1]..width) {
            assert_eq!(
                both[t * width + c],
                0.0,
                "token {t}, column {c} was written"
            );
        }
    }
}

/// Causal attention of a chunk of queries (prefill): query t sees the
/// first len − n + 1 + t positions, as the CPU's per-position softmax.
#[test]
fn causal_attention_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    // The last two: spans past an early query's causal end (they add nothing).
    for (nh, nkv, hd, len, nq) in [
        (4, 2, 64, 9, 4),
        (8, 2, 128, 300, 7),
        (2, 1, 32, 5, 5),
        (2, 1, 64, 258, 8),
        (2, 2, 32, 130, 70),
    ] {
        let mut rng = Rng::new(len as u64 + 3);
        let mut rand = |n: usize, s: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.unit() as f32 * 2.0 - 1.0) * s)
                .collect()
        };
        let q = rand(nq * nh * hd, 1.0);
        let k = rand(len * nkv * hd, 3.0);
        let v = rand(len * nkv * hd, 1.0);
        for kv_type in [KvType::F16, KvType::F32] {
            let mut cache = KvCache::new(&[Some((nkv * hd, nkv * hd))], len, kv_type);
            cache.layers[0].push(&k, &v);
            let kv = &cache.layers[0];
            let mut want = Vec::new();
            for t in 0..nq {
                for h in 0..nh {
                    let at = (t * nh + h) * hd;
                    want.extend(naive_attention(
                        &q[at..at + hd],
                        kv,
                        h / (nh / nkv),
                        hd,
                        len - nq + 1 + t,
                    ));
                }
            }
            let (kb, vb) = (upload_rows(gpu, &kv.k), upload_rows(gpu, &kv.v));
            let qb = gpu.upload_f32("q", &q).unwrap();
            let scratch = gpu.zeros_f32("spans", 3 * nq * nh * (hd + 2)).unwrap();
            let shape = AttentionShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                len,
                k_stride: kv.k_dim,
                v_stride: kv.v_dim,
                kv_f16: kv_type == KvType::F16,
                gated: false,
            };
            for merge in [true, false] {
                let out = gpu.zeros_f32("out", nq * nh * hd).unwrap();
                let mut pass = Pass::new(gpu);
                pass.set_last_group_finishes(merge);
                pass.attention_causal(&qb, &kb, &vb, &scratch, &out, shape, nq)
                    .unwrap();
                pass.submit().unwrap();
                let got = gpu.read_f32(&out, nq * nh * hd).unwrap();
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5,
                        "causal attention {nh}/{nkv}/{hd}, {len} positions, {nq} queries, \
                         {kv_type:?}, merge in attention {merge} [{i}]: {g} vs {e}"
                    );
                }
            }
            let out = gpu.zeros_f32("out", nq * nh * hd).unwrap();
            let mut pass = Pass::new(gpu);
            assert!(pass
                .attention_causal(&qb, &kb, &vb, &scratch, &out, shape, len + 1)
                .is_err());
        }
    }
}

/// A pass on a parameter arena: parameters of every dispatch in one
/// buffer at dynamic offsets, one cached bind group per (kernel, buffers),
/// and more dispatches than the arena holds (the pass flushes and goes
/// on) — the result is the same chain of work.
#[test]
fn parameter_arena_chains_and_flushes() {
    let Some(gpu) = gpu() else { return };
    let len = 100;
    let steps = 4100; // more than one arena's worth of dispatches
    let x = gpu.zeros_f32("x", len).unwrap();
    // x += W e₀ with W's first column all ones: every row gains 1; the
    // second matrix has one row less.
    let e0: Vec<f32> = (0..32).map(|c| if c == 0 { 1.0 } else { 0.0 }).collect();
    let z = gpu.upload_f32("e0", &e0).unwrap();
    let ws: Vec<GpuMatrix> = [len, len - 1]
        .iter()
        .map(|&rows| {
            let w: Vec<u8> = (0..rows * 32)
                .flat_map(|i| if i % 32 == 0 { 1f32 } else { 0.0 }.to_le_bytes())
                .collect();
            GpuMatrix::upload(gpu, &Matrix::ggml(GgmlType::F32, rows, 32, &w).unwrap()).unwrap()
        })
        .collect();
    let mut arena = ParamArena::new(gpu).unwrap();
    let mut pass = Pass::with_arena(gpu, &mut arena);
    for i in 0..steps {
        // Alternating shapes: each dispatch reads its own parameters.
        pass.matmul_add(&ws[i % 2], &z, &x, 1).unwrap();
    }
    let got = pass
        .flush_and_read(&x, len, &gpu.readback_buffer(4 * len as u64).unwrap())
        .unwrap();
    drop(pass);
    assert_eq!(got[0], steps as f32);
    assert_eq!(
        got[len - 1],
        (steps / 2) as f32,
        "the odd dispatches skip the last value"
    );
    assert_eq!(
        arena.bind_groups(),
        2,
        "one bind group for each kernel and set of buffers"
    );

    // A buffer its owner drops (a finished session's KV cache) leaves the
    // cache with the bind groups that bind it, and only those.
    let y = gpu.zeros_f32("y", len).unwrap();
    let mut pass = Pass::with_arena(gpu, &mut arena);
    pass.matmul_add(&ws[0], &z, &y, 1).unwrap();
    pass.flush().unwrap();
    drop(pass);
    assert_eq!(arena.bind_groups(), 3);
    arena.forget(&[&y]);
    assert_eq!(arena.bind_groups(), 2, "only y's bind group goes");
    arena.forget(&[&x]);
    assert_eq!(arena.bind_groups(), 0);
}

/// A decode step's attention with the prep folded in (`attention_decode`)
/// and its spans merged in the same dispatch gives the bits of
/// `attention_prep` followed by `attention` and a merge dispatch: the same
/// output and the same cache (the new position written once, the rest
/// untouched), for every variant and cache type, one span or several,
/// with and without q/k norms, partly rotated heads, a cache padded past
/// its heads, and f16 hard cases in the new k and v rows; and typed errors
/// for shapes it cannot take.
#[test]
fn decode_attention_with_prep_is_prep_then_attention() {
    let Some(gpu) = gpu() else { return };
    let eps = 1e-6;
    for (nh, nkv, hd, n_rot, len, norm, pad) in [
        (8, 2, 128, 64, 300, (true, true), 0),
        (4, 4, 64, 64, 1, (true, false), 0),
        (6, 1, 24, 24, 130, (false, true), 16),
        (2, 1, 256, 256, 70, (true, true), 0),
        (4, 2, 64, 32, 90, (false, false), 8),
    ] {
        let width = (nh + 2 * nkv) * hd;
        let inv = rope_inv_freq(n_rot, 1e6);
        let stride = nkv * hd + pad;
        // Positions 0..len - 1 come from a prep of len - 1 earlier tokens;
        // the new token is at len - 1.
        let mut qkv = normals(len * width, (hd + len) as u64);
        let hard = [65520.0, 1.0e6, -3.0e-8, 1.0 + 1.0 / 2048.0];
        for row in [nh, nh + nkv] {
            let at = (len - 1) * width + row * hd;
            qkv[at..at + hard.len()].copy_from_slice(&hard);
        }
        let norms: Vec<f32> = normals(2 * hd, 9).iter().map(|v| 1.0 + 0.2 * v).collect();
        let nb = gpu.upload_f32("norms", &norms).unwrap();
        let table = rope_table(0, len, &inv);
        let half = inv.len();
        let early = gpu
            .upload_f32("qkv", &qkv[..(len - 1).max(1) * width])
            .unwrap();
        let new = gpu.upload_f32("qkv", &qkv[(len - 1) * width..]).unwrap();
        let early_cs = gpu
            .upload_f32("rope", &table[..(len - 1).max(1) * 2 * half])
            .unwrap();
        let new_cs = gpu
            .upload_f32("rope", &table[(len - 1) * 2 * half..])
            .unwrap();
        for kv_f16 in [true, false] {
            let words = (len * stride).div_ceil(if kv_f16 { 2 } else { 1 });
            let shape = AttentionShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                len,
                k_stride: stride,
                v_stride: stride,
                kv_f16,
                gated: false,
            };
            for variant in gpu.variants() {
                let mut counts = vec![1, len.div_ceil(64)];
                counts.dedup();
                for spans in counts {
                    let what = format!(
                        "{nh}/{nkv}/{hd} rot {n_rot}, {len} positions, f16 {kv_f16}, {spans} spans, {variant:?}"
                    );
                    let scratch = gpu.zeros_f32("spans", spans * nh * (hd + 2)).unwrap();
                    // Each path on its own cache, filled the same way.
                    let run = |fold: bool| {
                        let (kc, vc) = (
                            gpu.zeros_f32("k", words).unwrap(),
                            gpu.zeros_f32("v", words).unwrap(),
                        );
                        let qn = gpu.zeros_f32("qn", len.max(2) * nh * hd).unwrap();
                        let out = gpu.zeros_f32("out", nh * hd).unwrap();
                        // The folded path merges its spans in the
                        // attention dispatch, the other in a dispatch of
                        // its own: the same bits.
                        let mut pass = Pass::with_variant(gpu, variant);
                        pass.set_last_group_finishes(fold);
                        if len > 1 {
                            let early_shape = AttentionShape {
                                len: len - 1,
                                ..shape
                            };
                            pass.attention_prep(
                                &early,
                                &nb,
                                &early_cs,
                                &qn,
                                (&kc, &vc),
                                early_shape,
                                (len - 1, 0, half),
                                (norm, eps),
                            )
                            .unwrap();
                        }
                        if fold {
                            pass.attention_decode(
                                &new,
                                &nb,
                                &new_cs,
                                (&kc, &vc),
                                &scratch,
                                &out,
                                shape,
                                half,
                                (norm, eps),
                            )
                            .unwrap();
                        } else {
                            pass.attention_prep(
                                &new,
                                &nb,
                                &new_cs,
                                &qn,
                                (&kc, &vc),
                                shape,
                                (1, len - 1, half),
                                (norm, eps),
                            )
                            .unwrap();
                            pass.attention(&qn, &kc, &vc, &scratch, &out, shape)
                                .unwrap();
                        }
                        pass.submit().unwrap();
                        let bits =
                            |b: &moeflux::backend::gpu::wgpu::Buffer, n: usize| -> Vec<u32> {
                                gpu.read_f32(b, n)
                                    .unwrap()
                                    .iter()
                                    .map(|v| v.to_bits())
                                    .collect()
                            };
                        (bits(&out, nh * hd), bits(&kc, words), bits(&vc, words))
                    };
                    let (want, got) = (run(false), run(true));
                    assert!(want.0 == got.0, "output differs: {what}");
                    assert!(want.1 == got.1, "K cache differs: {what}");
                    assert!(want.2 == got.2, "V cache differs: {what}");
                    // The new position was written (not left zero).
                    let at = (len - 1) * stride / if kv_f16 { 2 } else { 1 };
                    assert!(got.1[at..].iter().any(|&w| w != 0), "no new K: {what}");
                }
            }
        }
    }
    // Shapes the decode prep cannot take are typed errors, not panics.
    let buf = gpu.zeros_f32("any", 1 << 16).unwrap();
    let small = gpu.zeros_f32("small", 8).unwrap();
    let shape = |head_dim: usize| AttentionShape {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim,
        len: 4,
        k_stride: head_dim,
        v_stride: head_dim,
        kv_f16: false,
        gated: false,
    };
    let mut pass = Pass::new(gpu);
    for (what, qkv, hd, half) in [
        ("head_dim past the prep's rows", &buf, 264, 8),
        ("more rotated pairs than the head has", &buf, 64, 40),
        ("a q|k|v row shorter than the heads", &small, 64, 32),
    ] {
        let r = pass.attention_decode(
            qkv,
            &buf,
            &buf,
            (&buf, &buf),
            &buf,
            &buf,
            shape(hd),
            half,
            ((true, true), eps),
        );
        assert!(matches!(r, Err(GpuError::Shape { .. })), "{what}: {r:?}");
    }
}

/// One Gated DeltaNet test case: its shape and a chunk's inputs in the
/// logical form the formulas use (per token: q and k per key head, v, z,
/// b and a per value head), plus the conv taps, the per-head weights and
/// a starting state.
struct DeltaCase {
    shape: DeltaShape,
    n: usize,
    /// `n × channels`: the conv inputs, `[q (all key heads) | k | v]`.
    x: Vec<f32>,
    z: Vec<f32>,
    b: Vec<f32>,
    a: Vec<f32>,
    conv_w: Vec<f32>,
    head_w: Vec<f32>,
    window: Vec<f32>,
    state: Vec<f32>,
}

impl DeltaCase {
    fn new(shape: DeltaShape, n: usize, seed: u64) -> DeltaCase {
        let s = shape;
        let ch = s.channels();
        let scaled = |len: usize, k: u64, f: f32| -> Vec<f32> {
            normals(len, seed * 16 + k).iter().map(|v| v * f).collect()
        };
        let mut head_w: Vec<f32> = scaled(s.n_v, 6, 0.5).iter().map(|v| -v.exp()).collect();
        head_w.extend(scaled(s.n_v, 7, 1.0));
        head_w.extend(
            normals(s.v_dim, seed * 16 + 8)
                .iter()
                .map(|v| 1.0 + 0.2 * v),
        );
        DeltaCase {
            shape,
            n,
            x: scaled(n * ch, 1, 1.0),
            z: scaled(n * s.n_v * s.v_dim, 2, 1.0),
            b: scaled(n * s.n_v, 3, 1.0),
            // Some a + dt_bias far below zero, where softplus is tiny.
            a: scaled(n * s.n_v, 4, 8.0),
            conv_w: scaled(ch * s.taps, 5, 0.5),
            head_w,
            window: scaled((s.taps - 1) * ch, 9, 1.0),
            state: scaled(s.n_v * s.k_dim * s.v_dim, 10, 0.1),
        }
    }

    fn key_head(&self, j: usize) -> usize {
        let s = self.shape;
        if s.tiled {
            j % s.n_k
        } else {
            j / (s.n_v / s.n_k)
        }
    }

    /// The projection rows in the shape's layout (the inverse of the
    /// CPU loader's regrouping: `LinearInput` in model/linear_attention.rs).
    fn rows(&self) -> Vec<f32> {
        let s = self.shape;
        let (nk, nv, dk, dv) = (s.n_k, s.n_v, s.k_dim, s.v_dim);
        let r = nv / nk;
        let ch = s.channels();
        let mut out = Vec::with_capacity(self.n * s.stride);
        for t in 0..self.n {
            let x = &self.x[t * ch..(t + 1) * ch];
            let z = &self.z[t * nv * dv..(t + 1) * nv * dv];
            let (b, a) = (&self.b[t * nv..(t + 1) * nv], &self.a[t * nv..(t + 1) * nv]);
            let row0 = out.len();
            if s.layout == 2 {
                for g in 0..nk {
                    out.extend_from_slice(&x[g * dk..(g + 1) * dk]);
                    out.extend_from_slice(&x[(nk + g) * dk..(nk + g + 1) * dk]);
                    let v0 = 2 * nk * dk + g * r * dv;
                    out.extend_from_slice(&x[v0..v0 + r * dv]);
                    out.extend_from_slice(&z[g * r * dv..(g + 1) * r * dv]);
                }
            } else {
                out.extend_from_slice(x);
                out.extend_from_slice(z);
            }
            if s.layout == 0 {
                out.extend_from_slice(b);
                out.extend_from_slice(a);
            } else {
                for g in 0..nk {
                    out.extend_from_slice(&b[g * r..(g + 1) * r]);
                    out.extend_from_slice(&a[g * r..(g + 1) * r]);
                }
            }
            out.resize(row0 + s.stride, 0.0);
        }
        out
    }

    /// The formulas, token by token: the outputs, and the window and
    /// state after the chunk.
    fn reference(&self) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = self.shape;
        let (nk, nv, dk, dv, kk) = (s.n_k, s.n_v, s.k_dim, s.v_dim, s.taps);
        let ch = s.channels();
        let (mut window, mut state) = (self.window.clone(), self.state.clone());
        let mut out = vec![0f32; self.n * nv * dv];
        let softplus = |x: f32| if x > 20.0 { x } else { x.exp().ln_1p() };
        for t in 0..self.n {
            let x = &self.x[t * ch..(t + 1) * ch];
            let mut y = vec![0f32; ch];
            for c in 0..ch {
                let w = &self.conv_w[c * kk..(c + 1) * kk];
                let mut acc = 0f32;
                for tap in 0..kk - 1 {
                    acc += w[tap] * window[tap * ch + c];
                }
                y[c] = silu(acc + w[kk - 1] * x[c]);
            }
            if kk > 1 {
                window.copy_within(ch.., 0);
                window[(kk - 2) * ch..].copy_from_slice(x);
            }
            for (h, head) in y[..2 * nk * dk].chunks_exact_mut(dk).enumerate() {
                let inv = 1.0 / (head.iter().map(|v| v * v).sum::<f32>() + s.eps).sqrt();
                let f = if h < nk {
                    inv / (dk as f32).sqrt()
                } else {
                    inv
                };
                head.iter_mut().for_each(|v| *v *= f);
            }
            for j in 0..nv {
                let kh = self.key_head(j);
                let q = &y[kh * dk..(kh + 1) * dk];
                let k = &y[(nk + kh) * dk..(nk + kh + 1) * dk];
                let v = &y[2 * nk * dk + j * dv..2 * nk * dk + (j + 1) * dv];
                let g = (self.head_w[j] * softplus(self.a[t * nv + j] + self.head_w[nv + j])).exp();
                let beta = sigmoid(self.b[t * nv + j]);
                let st = &mut state[j * dk * dv..(j + 1) * dk * dv];
                st.iter_mut().for_each(|e| *e *= g);
                let o = &mut out[(t * nv + j) * dv..(t * nv + j + 1) * dv];
                for c in 0..dv {
                    let mem: f32 = (0..dk).map(|i| st[i * dv + c] * k[i]).sum();
                    let d = (v[c] - mem) * beta;
                    for i in 0..dk {
                        st[i * dv + c] += k[i] * d;
                    }
                    o[c] = (0..dk).map(|i| st[i * dv + c] * q[i]).sum();
                }
                let ms = o.iter().map(|e| e * e).sum::<f32>() / dv as f32;
                let inv = 1.0 / (ms + s.eps).sqrt();
                let z = &self.z[(t * nv + j) * dv..(t * nv + j + 1) * dv];
                for c in 0..dv {
                    o[c] = o[c] * inv * self.head_w[2 * nv + c] * silu(z[c]);
                }
            }
        }
        (out, window, state)
    }
}

/// The Gated DeltaNet kernel against the formulas written out above, for
/// each layout of the input projections (Qwen3.5's split, Qwen3-Next's
/// grouped b|a and its fused q|k|v|z), value heads tiled over the key
/// heads (Qwen3.5 GGUFs) or grouped, heads of different sizes and conv
/// kernels of 4 and 2 taps: the outputs, the state and the conv window
/// after the chunk; and a chunk cut into 1 + 2 + 5 tokens (each reading
/// the window the one before wrote) gives the same bits as one chunk.
#[test]
fn delta_net_matches_the_formulas() {
    let Some(gpu) = gpu() else { return };
    let shape = |n_k, n_v, k_dim, v_dim, taps, layout, tiled| {
        let mut s = DeltaShape {
            n_k,
            n_v,
            k_dim,
            v_dim,
            taps,
            layout,
            tiled,
            stride: 0,
            eps: 1e-6,
        };
        // A row wider than its inputs, as in a buffer shared with others.
        s.stride = s.channels() + n_v * v_dim + 2 * n_v + 3;
        s
    };
    let cases = [
        shape(2, 4, 16, 16, 4, 0, false),
        shape(2, 4, 16, 16, 4, 0, true),
        shape(2, 4, 16, 16, 4, 1, false),
        shape(2, 4, 16, 16, 4, 2, false),
        shape(1, 3, 32, 24, 2, 0, false),
        shape(1, 2, 16, 16, 1, 0, true),
        shape(2, 2, 128, 128, 4, 2, false),
        // Rows split over two threads a column, and not split.
        shape(1, 2, 18, 20, 3, 0, false),
        shape(2, 2, 15, 12, 4, 1, false),
    ];
    let n = 8;
    for (i, s) in cases.into_iter().enumerate() {
        let case = DeltaCase::new(s, n, i as u64 + 1);
        let (want, want_window, want_state) = case.reference();
        let rows = case.rows();
        let conv_w = gpu.upload_f32("conv_w", &case.conv_w).unwrap();
        let head_w = gpu.upload_f32("head_w", &case.head_w).unwrap();
        let window_len = (s.taps - 1) * s.channels();
        for variant in gpu.variants() {
            let what = format!("{s:?} {variant:?}");
            let mut got_bits: Vec<Vec<u32>> = Vec::new();
            // One chunk reads b|a from the projection rows; three read
            // them from a buffer of their own (as a decode step does where
            // b|a is a product of its own), with the same bits.
            for chunks in [&[8][..], &[1, 2, 5]] {
                let own_ba = chunks.len() > 1;
                let mut window = case.window.clone();
                window.extend(vec![0.0; window_len]);
                let window = gpu.upload_f32("window", &window).unwrap();
                let state = gpu.upload_f32("state", &case.state).unwrap();
                let out = gpu.zeros_f32("out", n * s.n_v * s.v_dim).unwrap();
                let mut cur = false;
                let mut t0 = 0;
                let mut outs = Vec::new();
                for &len in chunks {
                    let part = gpu
                        .upload_f32("part", &rows[t0 * s.stride..(t0 + len) * s.stride])
                        .unwrap();
                    let ba_at = s.channels() + s.n_v * s.v_dim;
                    let ba: Vec<f32> = (t0..t0 + len)
                        .flat_map(|t| &rows[t * s.stride + ba_at..t * s.stride + ba_at + 2 * s.n_v])
                        .copied()
                        .collect();
                    let ba = gpu.upload_f32("b|a", &ba).unwrap();
                    let mut pass = Pass::with_variant(gpu, variant);
                    pass.delta_net(
                        (&part, own_ba.then_some(&ba)),
                        (&conv_w, &head_w),
                        (&window, &state),
                        &out,
                        s,
                        len,
                        cur,
                    )
                    .unwrap();
                    pass.submit().unwrap();
                    outs.extend(gpu.read_f32(&out, len * s.n_v * s.v_dim).unwrap());
                    cur = !cur;
                    t0 += len;
                }
                let both = gpu.read_f32(&window, 2 * window_len).unwrap();
                let at = if cur { window_len } else { 0 };
                let got_window = &both[at..at + window_len];
                let got_state = gpu.read_f32(&state, case.state.len()).unwrap();
                assert_eq!(
                    got_window,
                    &want_window[..],
                    "{what}: window after {chunks:?}"
                );
                let c = cosine(&outs, &want);
                assert!(c >= 0.9999, "{what} {chunks:?}: cosine {c}");
                for (k, (g, e)) in outs.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-3 * (1.0 + e.abs()),
                        "{what} out[{k}]: {g} vs {e}"
                    );
                }
                for (k, (g, e)) in got_state.iter().zip(&want_state).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{what} state[{k}]: {g} vs {e}"
                    );
                }
                got_bits.push(outs.iter().chain(&got_state).map(|v| v.to_bits()).collect());
            }
            assert!(got_bits[0] == got_bits[1], "{what}: chunks change the bits");
        }
    }
    // Shapes the kernel does not take are typed errors, not garbage.
    let s = shape(2, 4, 16, 16, 4, 0, false);
    let b = gpu.zeros_f32("b", 1 << 16).unwrap();
    for bad in [
        DeltaShape { taps: 5, ..s },
        DeltaShape { k_dim: 256, ..s },
        DeltaShape { n_v: 3, ..s },
        DeltaShape {
            layout: 1,
            tiled: true,
            ..s
        },
        DeltaShape { stride: 10, ..s },
    ] {
        let mut pass = Pass::new(gpu);
        let r = pass.delta_net((&b, None), (&b, &b), (&b, &b), &b, bad, 1, false);
        assert!(matches!(r, Err(GpuError::Shape { .. })), "{bad:?}: {r:?}");
    }
}

/// The shared expert's SwiGLU (scaled by σ of a logit in the same row, of
/// a dot product it takes itself, or not) and the gated attention's output
/// gate, against the CPU's silu and sigmoid.
#[test]
fn swiglu_and_output_gate_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let (n, width, hidden) = (5, 300, 520);
    let stride = 2 * width + 3;
    let a = normals(n * stride, 21);
    let hs = normals(n * hidden, 24);
    let gw: Vec<f32> = normals(hidden, 25).iter().map(|v| v * 0.05).collect();
    let buf = gpu.upload_f32("a", &a).unwrap();
    let (hb, wb) = (
        gpu.upload_f32("h", &hs).unwrap(),
        gpu.upload_f32("gw", &gw).unwrap(),
    );
    for mode in 0..3 {
        for variant in gpu.variants() {
            let gate = match mode {
                0 => SwigluGate::None,
                1 => SwigluGate::InRow,
                _ => SwigluGate::Dot {
                    h: &hb,
                    w: &wb,
                    hidden,
                },
            };
            let out = gpu.zeros_f32("out", n * width).unwrap();
            let mut pass = Pass::with_variant(gpu, variant);
            pass.swiglu(&buf, &out, n, width, (stride, gate)).unwrap();
            pass.submit().unwrap();
            let got = gpu.read_f32(&out, n * width).unwrap();
            for t in 0..n {
                let row = &a[t * stride..(t + 1) * stride];
                let s = match mode {
                    0 => 1.0,
                    1 => sigmoid(row[2 * width]),
                    _ => sigmoid(dot(&hs[t * hidden..(t + 1) * hidden], &gw)),
                };
                for i in 0..width {
                    let e = silu(row[i]) * row[width + i] * s;
                    let g = got[t * width + i];
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "swiglu mode {mode} {variant:?} [{t}, {i}]: {g} vs {e}"
                    );
                }
            }
        }
    }
    let (stride, at) = (3 * width, 2 * width - 4);
    let g = normals(n * stride, 22);
    let y = normals(n * width, 23);
    let (gb, yb) = (
        gpu.upload_f32("g", &g).unwrap(),
        gpu.upload_f32("y", &y).unwrap(),
    );
    let mut pass = Pass::new(gpu);
    pass.output_gate(&gb, &yb, n, width, (stride, at)).unwrap();
    pass.submit().unwrap();
    let got = gpu.read_f32(&yb, n * width).unwrap();
    for t in 0..n {
        for i in 0..width {
            let e = y[t * width + i] * sigmoid(g[t * stride + at + i]);
            let v = got[t * width + i];
            assert!(
                (v - e).abs() <= 1e-5 * (1.0 + e.abs()),
                "output gate [{t}, {i}]: {v} vs {e}"
            );
        }
    }
    // Rows too short for what they must hold are typed errors.
    let mut pass = Pass::new(gpu);
    let short = gpu.zeros_f32("short", 10).unwrap();
    assert!(pass
        .swiglu(&short, &yb, 1, 5, (10, SwigluGate::InRow))
        .is_err());
    let odd = SwigluGate::Dot {
        h: &hb,
        w: &wb,
        hidden: 6,
    };
    assert!(pass.swiglu(&buf, &yb, 1, 5, (stride, odd)).is_err());
    assert!(pass.output_gate(&gb, &yb, 1, width, (width, 1)).is_err());
}

//! Every kernel at every level this CPU supports against the reference
//! (dequantized weights, f32 activations), within the bound the activation
//! quantization implies.

use super::*;
use crate::backend::cpu::matrix::Matrix;
use crate::quant::dequant::dequantize;
use crate::quant::mlx::ScaleType;
use crate::quant::MlxAffine;
use crate::synth::{fill_blocks, Rng};

fn levels() -> Vec<Level> {
    [Level::Scalar, Level::Neon, Level::Avx2, Level::Avx512]
        .into_iter()
        .filter(|l| l.supported())
        .collect()
}

/// Random activations, with a few outliers (as real hidden states have)
/// when `outliers`.
fn activations(n: usize, seed: u64, outliers: bool) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|i| {
            let v = r.normal() as f32;
            if outliers && i % 97 == 5 {
                v * 20.0
            } else {
                v
            }
        })
        .collect()
}

/// The error bound of the 8-bit activation quantization for `w · x`:
/// Σ over activation blocks of (Σ|w| in the block) · d/2, where d is the
/// block's step.
fn bound(wrow: &[f32], x: &[f32], block: usize) -> f32 {
    wrow.chunks(block)
        .zip(x.chunks(block))
        .map(|(w, x)| {
            let d = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            w.iter().map(|v| v.abs()).sum::<f32>() * d / 2.0
        })
        .sum()
}

fn check(m: &Matrix<'_>, name: &str) {
    check_with(m, name, true)
}

/// Checks every level against the reference: each output within the bound
/// of the activation quantization, and a cosine similarity of at least
/// 0.9999 overall.
fn check_with(m: &Matrix<'_>, name: &str, outliers: bool) {
    // 21 tokens: five groups of four (the multi-row kernels) and one left
    // over (the one-row kernels); 3 tokens: the decode path (interleaved
    // weights go through their eight-row kernels below four tokens).
    for n in [21, 3] {
        check_tokens(m, name, outliers, n);
    }
}

fn check_tokens(m: &Matrix<'_>, name: &str, outliers: bool, n: usize) {
    let pool = ThreadPool::new(2);
    let x = activations(n * m.cols, 11, outliers);
    let mut want = vec![0f32; n * m.rows];
    let mut acts = Acts::default();
    matmul_at(&pool, m, &x, n, &mut want, &mut acts, Level::Reference);
    let block = match act_kind(m, Level::Scalar) {
        ActKind::Q8 => 32,
        _ => 0,
    };
    let mut wrow = vec![0f32; m.cols];
    for level in levels() {
        let mut got = vec![0f32; n * m.rows];
        matmul_at(&pool, m, &x, n, &mut got, &mut acts, level);
        for t in 0..n {
            for r in 0..m.rows {
                m.row(r, &mut wrow);
                let xt = &x[t * m.cols..(t + 1) * m.cols];
                let b = if block > 0 {
                    bound(&wrow, xt, block)
                } else {
                    0.0
                };
                // f32 rounding of sums of this size: far below the bound.
                let slack =
                    1e-5 * wrow.iter().zip(xt).map(|(w, x)| (w * x).abs()).sum::<f32>() + 1e-6;
                let (g, e) = (got[t * m.rows + r], want[t * m.rows + r]);
                assert!(
                    (g - e).abs() <= b * 1.001 + slack,
                    "{name} at {}: row {r} token {t}: {g} vs reference {e} (bound {b})",
                    level.name()
                );
            }
        }
        let cos = {
            let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
            for (a, b) in got.iter().zip(&want) {
                ab += (*a as f64) * (*b as f64);
                aa += (*a as f64).powi(2);
                bb += (*b as f64).powi(2);
            }
            ab / (aa.sqrt() * bb.sqrt())
        };
        assert!(cos >= 0.9999, "{name} at {}: cosine {cos}", level.name());
    }
}

fn check_ggml(ty: GgmlType, rows: usize, cols: usize) {
    let seed = if ty == GgmlType::MXFP4 {
        4
    } else {
        ty.id() as u64
    };
    let bytes = random_ggml(ty, rows, cols, seed);
    let m = Matrix::ggml(ty, rows, cols, &bytes).unwrap();
    check(&m, ty.name());
}

/// Random blocks of `ty` (MXFP4: scales that keep the values in range).
fn random_ggml(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let bytes_len = ty.row_bytes(cols as u64).unwrap() as usize * rows;
    let mut bytes = vec![0u8; bytes_len];
    if ty == GgmlType::MXFP4 {
        let mut r = Rng::new(seed);
        for blk in bytes.chunks_exact_mut(17) {
            for b in blk.iter_mut() {
                *b = r.next_u64() as u8;
            }
            blk[0] = 118 + (r.next_u64() % 8) as u8;
        }
    } else {
        fill_blocks(ty, &mut Rng::new(seed), 0.05, &mut bytes).unwrap();
    }
    bytes
}

/// [`check_ggml`] with the rows interleaved by eight.
fn check_interleaved(ty: GgmlType, rows: usize, cols: usize) {
    let bytes_len = ty.row_bytes(cols as u64).unwrap() as usize * rows;
    let mut bytes = vec![0u8; bytes_len];
    fill_blocks(ty, &mut Rng::new(ty.id() as u64 + 1), 0.05, &mut bytes).unwrap();
    crate::backend::cpu::interleave::interleave(ty, cols, &mut bytes, &mut Vec::new());
    let m = Matrix::interleaved(ty, rows, cols, &bytes).unwrap();
    check(&m, &format!("{ty} interleaved"));
}

#[test]
fn q4_k_interleaved() {
    check_interleaved(GgmlType::Q4_K, 24, 256 * 3);
    check_interleaved(GgmlType::Q4_K, 8, 256);
}

#[test]
fn q4_0_interleaved() {
    // Five groups of eight rows (tasks end inside none of them), an odd
    // number of block columns; then a longer row.
    check_interleaved(GgmlType::Q4_0, 40, 32 * 9);
    check_interleaved(GgmlType::Q4_0, 16, 32 * 24);
    // Not interleavable: a type without the layout.
    assert!(Matrix::interleaved(GgmlType::Q8_0, 8, 32, &[0u8; 8 * 34]).is_err());
    // Nor rows that are not a multiple of eight.
    assert!(Matrix::interleaved(GgmlType::Q4_0, 12, 32, &[0u8; 12 * 18]).is_err());
}

/// The NEON kernels give the portable kernels' bits: the same exact
/// integer sums, the same f32 steps in the same order.
#[cfg(target_arch = "aarch64")]
fn assert_neon_bits(m: &Matrix<'_>, name: &str) {
    let pool = ThreadPool::new(2);
    for n in [1, 5] {
        let x = activations(n * m.cols, 12, true);
        let mut acts = Acts::default();
        let mut want = vec![0f32; n * m.rows];
        let mut got = vec![0f32; n * m.rows];
        matmul_at(&pool, m, &x, n, &mut want, &mut acts, Level::Scalar);
        matmul_at(&pool, m, &x, n, &mut got, &mut acts, Level::Neon);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{name} with {n} tokens");
    }
}

#[cfg(target_arch = "aarch64")]
#[test]
fn neon_rows_equal_the_portable_rows() {
    for (ty, cols) in [
        (GgmlType::Q4_0, 32 * 9),
        (GgmlType::Q8_0, 32 * 9),
        (GgmlType::MXFP4, 32 * 9),
        (GgmlType::Q4_K, 256 * 3),
        (GgmlType::Q5_K, 256 * 3),
        (GgmlType::Q6_K, 256 * 3),
    ] {
        let rows = 13;
        let bytes = random_ggml(ty, rows, cols, 7);
        let m = Matrix::ggml(ty, rows, cols, &bytes).unwrap();
        assert_neon_bits(&m, ty.name());
    }
}

#[test]
fn q4_0() {
    // Nine blocks: one group of eight and a tail; then groups only.
    check_ggml(GgmlType::Q4_0, 37, 32 * 9);
    check_ggml(GgmlType::Q4_0, 5, 32 * 24);
}

#[test]
fn q8_0() {
    check_ggml(GgmlType::Q8_0, 37, 32 * 9);
}

#[test]
fn mxfp4() {
    check_ggml(GgmlType::MXFP4, 37, 32 * 9);
}

#[test]
fn q4_k() {
    check_ggml(GgmlType::Q4_K, 21, 256 * 3);
}

#[test]
fn q5_k() {
    check_ggml(GgmlType::Q5_K, 21, 256 * 3);
}

#[test]
fn q6_k() {
    check_ggml(GgmlType::Q6_K, 21, 256 * 3);
}

#[test]
fn f16_bf16_f32() {
    for ty in [GgmlType::F16, GgmlType::BF16, GgmlType::F32] {
        check_ggml(ty, 19, 200);
    }
}

#[test]
fn q4_k_random_scales_and_mins() {
    // Fully random scale bytes exercise every 6-bit scale/min combination
    // (the bound checks each output); such large random mins make every
    // dot product a cancellation, so the cosine check uses activations
    // without outliers here.
    let (rows, cols) = (16, 512);
    let mut r = Rng::new(77);
    let mut bytes = vec![0u8; rows * cols / 256 * 144];
    for blk in bytes.chunks_exact_mut(144) {
        for b in blk.iter_mut() {
            *b = r.next_u64() as u8;
        }
        blk[0..2].copy_from_slice(&half::f16::from_f32(0.001).to_le_bytes());
        blk[2..4].copy_from_slice(&half::f16::from_f32(0.002).to_le_bytes());
    }
    let m = Matrix::ggml(GgmlType::Q4_K, rows, cols, &bytes).unwrap();
    check_with(&m, "Q4_K random scales", false);
    #[cfg(target_arch = "aarch64")]
    assert_neon_bits(&m, "Q4_K random scales");
    // The same through the eight-row kernel (all scale bits re-encoded).
    let mut x = bytes.clone();
    crate::backend::cpu::interleave::interleave(GgmlType::Q4_K, cols, &mut x, &mut Vec::new());
    check_with(
        &Matrix::interleaved(GgmlType::Q4_K, rows, cols, &x).unwrap(),
        "Q4_K random scales, interleaved",
        false,
    );
    let mut b5 = vec![0u8; rows * cols / 256 * 176];
    for blk in b5.chunks_exact_mut(176) {
        for b in blk.iter_mut() {
            *b = r.next_u64() as u8;
        }
        blk[0..2].copy_from_slice(&half::f16::from_f32(0.001).to_le_bytes());
        blk[2..4].copy_from_slice(&half::f16::from_f32(0.002).to_le_bytes());
    }
    let m = Matrix::ggml(GgmlType::Q5_K, rows, cols, &b5).unwrap();
    check_with(&m, "Q5_K random scales", false);
    #[cfg(target_arch = "aarch64")]
    assert_neon_bits(&m, "Q5_K random scales");
}

fn check_mlx(bits: u8, group: u32, cols: usize) {
    let rows = 13;
    let mut r = Rng::new(bits as u64 * 100 + group as u64);
    let weight: Vec<u8> = (0..rows * cols * bits as usize / 8)
        .map(|_| r.next_u64() as u8)
        .collect();
    let n_groups = rows * cols / group as usize;
    let bf = |v: f32| ((v.to_bits() >> 16) as u16).to_le_bytes();
    let scales: Vec<u8> = (0..n_groups)
        .flat_map(|_| bf(0.01 + 0.01 * r.unit() as f32))
        .collect();
    let biases: Vec<u8> = (0..n_groups)
        .flat_map(|_| bf(-0.05 * r.unit() as f32))
        .collect();
    let q = MlxAffine {
        bits,
        group_size: group,
        scale_type: ScaleType::BF16,
    };
    let m = Matrix::mlx(q, rows, cols, &weight, &scales, &biases).unwrap();
    check(&m, &q.to_string());
    #[cfg(target_arch = "aarch64")]
    assert_neon_bits(&m, &q.to_string());
}

#[test]
fn mlx_affine() {
    check_mlx(4, 64, 64 * 5);
    check_mlx(8, 64, 64 * 5);
    check_mlx(4, 32, 32 * 7);
    check_mlx(8, 32, 32 * 7);
    check_mlx(4, 128, 128 * 3);
    check_mlx(8, 128, 128 * 3);
}

#[test]
fn reference_level_is_the_dequantized_product() {
    let ty = GgmlType::Q4_K;
    let (rows, cols) = (5, 512);
    let mut bytes = vec![0u8; rows * cols / 256 * 144];
    fill_blocks(ty, &mut Rng::new(1), 0.05, &mut bytes).unwrap();
    let m = Matrix::ggml(ty, rows, cols, &bytes).unwrap();
    let x = activations(cols, 3, true);
    let mut y = vec![0f32; rows];
    matmul_at(
        &ThreadPool::new(1),
        &m,
        &x,
        1,
        &mut y,
        &mut Acts::default(),
        Level::Reference,
    );
    let mut w = vec![0f32; rows * cols];
    dequantize(ty, &bytes, &mut w).unwrap();
    for r in 0..rows {
        let e: f64 = (0..cols)
            .map(|c| w[r * cols + c] as f64 * x[c] as f64)
            .sum();
        assert!((y[r] as f64 - e).abs() < 1e-4 * e.abs().max(1.0));
    }
}

#[test]
fn f16_rows_convert_exactly() {
    // Every f16 bit pattern (normals, subnormals, infinities, NaNs), in a
    // length with an 8-lane tail.
    let src: Vec<half::f16> = (0..=u16::MAX)
        .map(half::f16::from_bits)
        .chain([half::f16::ONE; 5])
        .collect();
    let mut got = vec![0f32; src.len()];
    super::f16_to_f32(&src, &mut got);
    for (h, g) in src.iter().zip(&got) {
        let want = h.to_f32();
        assert!(
            g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
            "{:#06x}: {g} vs {want}",
            h.to_bits()
        );
    }
}

/// Strided rows (a KV group's slice of each position) convert exactly at
/// every level, each into its own place, with widths that have an 8-lane
/// tail and prefetches reaching past the end of the cache.
#[test]
fn strided_f16_rows_convert_exactly() {
    let src: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
    for level in levels() {
        for (at, stride, width, rows) in [
            (0, 512, 128, 32),
            (3, 100, 37, 9),
            (7, 8, 8, 1),
            (1, 9, 5, 4),
            (0, 8, 8, 0),
        ] {
            let s = Strided {
                at,
                stride,
                width,
                rows,
            };
            // Prefetching 64 rows past the last would reach past `src`.
            let start = src.len() - s.span().unwrap();
            let s = Strided { at: start, ..s };
            let mut got = vec![-1f32; rows * width + 3];
            f16_rows_to_f32(level, &src, s, 64, &mut got);
            for r in 0..rows {
                for i in 0..width {
                    let h = src[start + r * stride + i];
                    let (g, want) = (got[r * width + i], h.to_f32());
                    assert!(
                        g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                        "{level:?} row {r} value {i}: {g} vs {want}"
                    );
                }
            }
            assert!(
                got[rows * width..].iter().all(|&v| v == -1.0),
                "{level:?}: wrote past the rows"
            );
        }
    }
}

/// Rows reaching past the cache, or a shape whose extent overflows, are
/// refused before any row is read.
#[test]
fn strided_rows_outside_the_cache_are_refused() {
    let src = vec![half::f16::ONE; 100];
    let mut dst = vec![0f32; 64];
    for s in [
        Strided {
            at: 90,
            stride: 8,
            width: 8,
            rows: 2,
        },
        Strided {
            at: 0,
            stride: 1 << 63,
            width: 1 << 63,
            rows: 2,
        },
    ] {
        for level in levels() {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                f16_rows_to_f32(level, &src, s, 0, &mut dst)
            }));
            assert!(r.is_err(), "{level:?}: {s:?} was accepted");
        }
    }
}

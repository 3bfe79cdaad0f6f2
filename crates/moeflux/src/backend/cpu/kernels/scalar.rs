//! Portable integer kernels: the fallback on every CPU and the model the
//! SIMD versions follow. Per block, the integer sum of weight code ×
//! activation code is exact; scales are applied once per block (or
//! sub-block) in f32.

use half::f16;

use crate::backend::cpu::quantize::Q8Row;
use crate::quant::dequant::{bf16_to_f32, e8m0_to_f32_half, MXFP4_VALUES};
use crate::quant::QK_K;

#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_0 (18-byte blocks) · Q8: Σ d_w·d_a·(Σ q_w·q_a − 8·Σ q_a).
pub fn dot_q4_0(w: &[u8], a: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(18).enumerate() {
        let qa = &a.qs[b * 32..(b + 1) * 32];
        let mut s = 0i32;
        for j in 0..16 {
            s += (blk[2 + j] & 15) as i32 * qa[j] as i32
                + (blk[2 + j] >> 4) as i32 * qa[j + 16] as i32;
        }
        s -= 8 * a.sum[b];
        acc += f16_at(blk, 0) * a.d[b] * s as f32;
    }
    acc
}

/// Q8_0 (34-byte blocks) · Q8.
pub fn dot_q8_0(w: &[u8], a: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(34).enumerate() {
        let qa = &a.qs[b * 32..(b + 1) * 32];
        let s: i32 = blk[2..]
            .iter()
            .zip(qa)
            .map(|(&q, &x)| (q as i8) as i32 * x as i32)
            .sum();
        acc += f16_at(blk, 0) * a.d[b] * s as f32;
    }
    acc
}

/// MXFP4 (17-byte blocks) · Q8: codes through the doubled E2M1 table, scale
/// halved to compensate.
pub fn dot_mxfp4(w: &[u8], a: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(17).enumerate() {
        let qa = &a.qs[b * 32..(b + 1) * 32];
        let mut s = 0i32;
        for j in 0..16 {
            s += MXFP4_VALUES[(blk[1 + j] & 15) as usize] as i32 * qa[j] as i32
                + MXFP4_VALUES[(blk[1 + j] >> 4) as usize] as i32 * qa[j + 16] as i32;
        }
        acc += e8m0_to_f32_half(blk[0]) * a.d[b] * s as f32;
    }
    acc
}

/// The 6-bit scales and mins of a Q4_K/Q5_K block.
#[inline]
pub(crate) fn k_scales(sc: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut s = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..4 {
        s[j] = sc[j] & 63;
        m[j] = sc[j + 4] & 63;
        s[j + 4] = (sc[j + 8] & 15) | ((sc[j] >> 6) << 4);
        m[j + 4] = (sc[j + 8] >> 4) | ((sc[j + 4] >> 6) << 4);
    }
    (s, m)
}

/// Q4_K (144-byte super-blocks) · Q8 with power-of-two block scales: per
/// super-block, `base·(d·Σ (sc << shift)·Σ q·x − dmin·Σ (m << shift)·Σ x)`.
pub fn dot_q4_k(w: &[u8], a: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(144).enumerate() {
        let (sc, m) = k_scales(&blk[4..16]);
        let qs = &blk[16..144];
        let (mut isum, mut imin) = (0i64, 0i64);
        for s in 0..8 {
            let shift = 4 * (s % 2);
            let q = &qs[32 * (s / 2)..32 * (s / 2) + 32];
            let i = 8 * b + s;
            let x = &a.qs[32 * i..32 * i + 32];
            let dot: i32 = q
                .iter()
                .zip(x)
                .map(|(&q, &x)| ((q >> shift) & 15) as i32 * x as i32)
                .sum();
            let sh = a.shift[i];
            isum += ((sc[s] as i64) << sh) * dot as i64;
            imin += ((m[s] as i64) << sh) * a.sum[i] as i64;
        }
        acc += a.base[b] * (f16_at(blk, 0) * isum as f32 - f16_at(blk, 2) * imin as f32);
    }
    acc
}

/// Q5_K (176-byte super-blocks) · Q8 with power-of-two block scales.
pub fn dot_q5_k(w: &[u8], a: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(176).enumerate() {
        let (sc, m) = k_scales(&blk[4..16]);
        let qh = &blk[16..48];
        let qs = &blk[48..176];
        let (mut isum, mut imin) = (0i64, 0i64);
        for s in 0..8 {
            let shift = 4 * (s % 2);
            let q = &qs[32 * (s / 2)..32 * (s / 2) + 32];
            let i = 8 * b + s;
            let x = &a.qs[32 * i..32 * i + 32];
            let mut dot = 0i32;
            for l in 0..32 {
                let v = ((q[l] >> shift) & 15) | (((qh[l] >> s) & 1) << 4);
                dot += v as i32 * x[l] as i32;
            }
            let sh = a.shift[i];
            isum += ((sc[s] as i64) << sh) * dot as i64;
            imin += ((m[s] as i64) << sh) * a.sum[i] as i64;
        }
        acc += a.base[b] * (f16_at(blk, 0) * isum as f32 - f16_at(blk, 2) * imin as f32);
    }
    acc
}

/// Q6_K (210-byte super-blocks) · Q8 with power-of-two block scales: per
/// 16-group `g`, `(scale << shift)·(Σ q·x − 32·Σ x)`, times `base·d`.
pub fn dot_q6_k(w: &[u8], a: Q8Row<'_>) -> f32 {
    q6_k_with(w, a, |ql, qh, g, x| {
        let mut dot = 0i32;
        for (k, &xv) in x.iter().enumerate() {
            let i = 16 * g + k;
            let h = i / 128;
            let (sa, m) = ((i % 128) / 64, i % 64);
            let (j, l) = ((i % 128) / 32, i % 32);
            let lo = (ql[64 * h + m] >> (4 * sa)) & 15;
            let hi = (qh[32 * h + l] >> (2 * j)) & 3;
            dot += (lo | (hi << 4)) as i32 * xv as i32;
        }
        dot
    })
}

/// The Q6_K super-block loop, with the integer dot of 16-group `g`'s codes
/// and its 16 activations from `group_dot(ql, qh, g, x)` (`ql`, `qh`: the
/// block's low and high code bits): the portable and the SIMD kernels
/// share the scaling.
#[inline(always)]
pub(crate) fn q6_k_with(
    w: &[u8],
    a: Q8Row<'_>,
    group_dot: impl Fn(&[u8], &[u8], usize, &[i8]) -> i32,
) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(210).enumerate() {
        let ql = &blk[0..128];
        let qh = &blk[128..192];
        let scales = &blk[192..208];
        let mut isum = 0i64;
        for (g, &scale) in scales.iter().enumerate() {
            let x = &a.qs[b * QK_K + 16 * g..b * QK_K + 16 * g + 16];
            let dot = group_dot(ql, qh, g, x) - 32 * a.sum16[16 * b + g] as i32;
            let sh = a.shift[8 * b + g / 2];
            isum += (((scale as i8) as i64) << sh) * dot as i64;
        }
        acc += a.base[b] * f16_at(blk, 208) * isum as f32;
    }
    acc
}

/// MLX affine (`bits` 4 or 8, `group` a multiple of 32, bf16 scales and
/// biases) · Q8: per 32-block, `s·d_a·Σ q·x + b·d_a·Σ x`.
pub fn dot_mlx(
    bits: u32,
    group: usize,
    weight: &[u8],
    scales: &[u8],
    biases: &[u8],
    a: Q8Row<'_>,
) -> f32 {
    let per_word = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    mlx_with(group, scales, biases, a, |b, x| {
        let mut dot = 0i32;
        for (k, &xv) in x.iter().enumerate() {
            let i = b * 32 + k;
            let wi = i / per_word;
            let word = u32::from_le_bytes([
                weight[4 * wi],
                weight[4 * wi + 1],
                weight[4 * wi + 2],
                weight[4 * wi + 3],
            ]);
            dot += ((word >> ((i % per_word) as u32 * bits)) & mask) as i32 * xv as i32;
        }
        dot
    })
}

/// The MLX affine block loop, with the integer dot of 32-block `b`'s codes
/// and its activations `x` from `block_dot(b, x)`: the portable and the
/// SIMD kernels share the scale and bias step.
#[inline(always)]
pub(crate) fn mlx_with(
    group: usize,
    scales: &[u8],
    biases: &[u8],
    a: Q8Row<'_>,
    block_dot: impl Fn(usize, &[i8]) -> i32,
) -> f32 {
    let mut acc = 0f32;
    for (b, x) in a.qs.chunks_exact(32).enumerate() {
        let g = b * 32 / group;
        let s = bf16_to_f32(u16::from_le_bytes([scales[2 * g], scales[2 * g + 1]]));
        let bias = bf16_to_f32(u16::from_le_bytes([biases[2 * g], biases[2 * g + 1]]));
        let dot = block_dot(b, x);
        acc += a.d[b] * (s * dot as f32 + bias * a.sum[b] as f32);
    }
    acc
}

/// f32 dot with eight partial sums.
#[inline]
fn dot8(n: usize, w: impl Fn(usize) -> f32, x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        for k in 0..8 {
            acc[k] += w(i + k) * x[i + k];
        }
    }
    let mut tail = 0f32;
    for (i, &xi) in x.iter().enumerate().take(n).skip(full) {
        tail += w(i) * xi;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

pub fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
    dot8(
        x.len(),
        |i| f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]),
        x,
    )
}

pub fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    dot8(x.len(), |i| f16_at(w, 2 * i), x)
}

pub fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
    dot8(
        x.len(),
        |i| bf16_to_f32(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])),
        x,
    )
}

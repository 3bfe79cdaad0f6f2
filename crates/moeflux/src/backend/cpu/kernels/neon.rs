//! AArch64 NEON kernels (NEON is part of every AArch64 CPU): the row
//! kernels with 8-bit activations of every type that has them — Q4_0,
//! Q8_0, MXFP4, Q4_K, Q5_K, Q6_K and MLX affine (4 and 8 bits).
//!
//! Each block's integer sum is exact (i8 × i8 products widened to i16,
//! then pairs added into i32; MLX's 8-bit codes, 0..=255, are widened to
//! i16 and multiplied into i32), and the scales are applied in the order
//! of [`super::scalar`], so a row gives the same bits as the portable
//! kernel (tested). The 32 products of a block are formed by `vmull_s8`
//! rather than the `sdot` instruction, which not every AArch64 CPU has.
//! The kernels are safe functions: every load is bounds-checked.

use std::arch::aarch64::*;

use super::scalar::{self, f16_at, k_scales};
use super::Q8Kernel;
use crate::backend::cpu::quantize::Q8Row;
use crate::quant::dequant::{e8m0_to_f32_half, MXFP4_VALUES};
use crate::quant::GgmlType;

/// The row kernel of `ty` at the NEON level.
pub fn q8_kernel(ty: GgmlType) -> Q8Kernel {
    match ty {
        GgmlType::Q4_0 => dot_q4_0,
        GgmlType::Q8_0 => dot_q8_0,
        GgmlType::Q4_K => dot_q4_k,
        GgmlType::Q5_K => dot_q5_k,
        GgmlType::Q6_K => dot_q6_k,
        GgmlType::MXFP4 => dot_mxfp4,
        _ => unreachable!("not an 8-bit-activation type"),
    }
}

/// Sixteen bytes from the start of `b` (at least 16 long).
#[inline(always)]
fn load_u8(b: &[u8]) -> uint8x16_t {
    assert!(b.len() >= 16);
    // SAFETY: 16 bytes are readable at the start of `b` (asserted); NEON
    // loads need no alignment.
    unsafe { vld1q_u8(b.as_ptr()) }
}

/// Sixteen i8 from the start of `b` (at least 16 long).
#[inline(always)]
fn load_i8(b: &[i8]) -> int8x16_t {
    assert!(b.len() >= 16);
    // SAFETY: as in `load_u8`.
    unsafe { vld1q_s8(b.as_ptr()) }
}

/// `Σ a_i · b_i` over sixteen lanes, exact: each product of two i8 fits
/// an i16 (|−128 · −128| = 2^14), and pairs of them an i32.
#[inline(always)]
fn dot16(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: NEON is present on every AArch64 CPU; the intrinsics only
    // compute on registers.
    unsafe {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi))
    }
}

/// The 32 codes × activations of a block, summed: `lo` pairs with
/// `x[..16]`, `hi` with `x[16..32]`.
#[inline(always)]
fn dot32(lo: int8x16_t, hi: int8x16_t, x: &[i8]) -> i32 {
    let (a, b) = (dot16(lo, load_i8(x)), dot16(hi, load_i8(&x[16..])));
    // SAFETY: as in `dot16`.
    unsafe { vaddvq_s32(vaddq_s32(a, b)) }
}

/// Sixteen bytes shifted right by `n` bits (0..=7) and masked with `mask`.
#[inline(always)]
fn shr_mask(v: uint8x16_t, n: u32, mask: u8) -> uint8x16_t {
    // SAFETY: as in `dot16` (a negative left shift is a right shift).
    unsafe { vandq_u8(vshlq_u8(v, vdupq_n_s8(-(n as i8))), vdupq_n_u8(mask)) }
}

/// `lo | hi << 4` as i8 (codes of up to six bits: at most 63).
#[inline(always)]
fn join(lo: uint8x16_t, hi: uint8x16_t) -> int8x16_t {
    // SAFETY: as in `dot16`.
    unsafe { vreinterpretq_s8_u8(vorrq_u8(lo, vshlq_n_u8(hi, 4))) }
}

/// The low and high nibbles of sixteen bytes, as i8 codes 0..=15.
#[inline(always)]
fn nibbles(v: uint8x16_t) -> (int8x16_t, int8x16_t) {
    // SAFETY: as in `dot16`.
    unsafe {
        (
            vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15))),
            vreinterpretq_s8_u8(vshrq_n_u8(v, 4)),
        )
    }
}

/// Q4_0 (18-byte blocks) · Q8, as [`scalar::dot_q4_0`].
pub fn dot_q4_0(w: &[u8], a: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(18).enumerate() {
        let (lo, hi) = nibbles(load_u8(&blk[2..]));
        let s = dot32(lo, hi, &a.qs[b * 32..b * 32 + 32]) - 8 * a.sum[b];
        acc += f16_at(blk, 0) * a.d[b] * s as f32;
    }
    acc
}

/// Q8_0 (34-byte blocks) · Q8, as [`scalar::dot_q8_0`].
pub fn dot_q8_0(w: &[u8], a: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(34).enumerate() {
        // SAFETY: as in `dot16` (a reinterpretation of lanes).
        let (lo, hi) = unsafe {
            (
                vreinterpretq_s8_u8(load_u8(&blk[2..])),
                vreinterpretq_s8_u8(load_u8(&blk[18..])),
            )
        };
        let s = dot32(lo, hi, &a.qs[b * 32..b * 32 + 32]);
        acc += f16_at(blk, 0) * a.d[b] * s as f32;
    }
    acc
}

/// Q4_K and Q5_K super-blocks (`bytes` long) · Q8 with power-of-two
/// block scales, as [`scalar::dot_q4_k`] and [`scalar::dot_q5_k`]:
/// `codes(block, s)` gives sub-block s's 32 codes, its first and last 16.
#[inline(always)]
fn dot_k(
    w: &[u8],
    a: Q8Row<'_>,
    bytes: usize,
    codes: impl Fn(&[u8], usize) -> [int8x16_t; 2],
) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(bytes).enumerate() {
        let (sc, m) = k_scales(&blk[4..16]);
        let (mut isum, mut imin) = (0i64, 0i64);
        for s in 0..8 {
            let [c0, c1] = codes(blk, s);
            let i = 8 * b + s;
            let dot = dot32(c0, c1, &a.qs[32 * i..32 * i + 32]);
            let sh = a.shift[i];
            isum += ((sc[s] as i64) << sh) * dot as i64;
            imin += ((m[s] as i64) << sh) * a.sum[i] as i64;
        }
        acc += a.base[b] * (f16_at(blk, 0) * isum as f32 - f16_at(blk, 2) * imin as f32);
    }
    acc
}

/// The four-bit codes of sub-block s of a Q4_K/Q5_K block whose code
/// bytes start at `qs`: sub-blocks 2j and 2j + 1 are the low and high
/// nibbles of the same 32 bytes.
#[inline(always)]
fn nibble_codes(qs: &[u8], s: usize, h: usize) -> uint8x16_t {
    shr_mask(
        load_u8(&qs[32 * (s / 2) + 16 * h..]),
        4 * (s % 2) as u32,
        15,
    )
}

/// Q4_K (144-byte super-blocks) · Q8 with power-of-two block scales.
pub fn dot_q4_k(w: &[u8], a: Q8Row<'_>) -> f32 {
    dot_k(w, a, 144, |blk, s| {
        // SAFETY: as in `dot16` (a reinterpretation of lanes).
        [0, 1].map(|h| unsafe { vreinterpretq_s8_u8(nibble_codes(&blk[16..], s, h)) })
    })
}

/// Q5_K (176-byte super-blocks) · Q8 with power-of-two block scales:
/// Q4_K's codes with bit s of each of the 32 high-bit bytes as the fifth.
pub fn dot_q5_k(w: &[u8], a: Q8Row<'_>) -> f32 {
    dot_k(w, a, 176, |blk, s| {
        [0, 1].map(|h| {
            let high = shr_mask(load_u8(&blk[16 + 16 * h..]), s as u32, 1);
            join(nibble_codes(&blk[48..], s, h), high)
        })
    })
}

/// Q6_K (210-byte super-blocks) · Q8 with power-of-two block scales, as
/// [`scalar::dot_q6_k`]: value i of a half h (128 values) takes its low
/// four bits from `ql[64h + i % 64]` (low nibble for i < 64) and its high
/// two from `qh[32h + i % 32]` (bits 2·(i / 32)); sixteen values share a
/// scale.
pub fn dot_q6_k(w: &[u8], a: Q8Row<'_>) -> f32 {
    scalar::q6_k_with(w, a, |ql, qh, g, x| {
        let (h, i) = (g / 8, (16 * g) % 128);
        let lo = shr_mask(load_u8(&ql[64 * h + i % 64..]), 4 * (i / 64) as u32, 15);
        let hi = shr_mask(load_u8(&qh[32 * h + i % 32..]), 2 * (i / 32) as u32, 3);
        // SAFETY: as in `dot16`.
        unsafe { vaddvq_s32(dot16(join(lo, hi), load_i8(x))) }
    })
}

/// MLX affine (`bits` 4 or 8, `group` a multiple of 32, bf16 scales and
/// biases) · Q8, as [`scalar::dot_mlx`]. A 4-bit block is 16 bytes, value
/// 2k in the low nibble of byte k and 2k + 1 in the high one, so the
/// activations are loaded deinterleaved (even, odd); an 8-bit block is 32
/// codes of 0..=255, widened to i16 before multiplying.
pub fn dot_mlx(
    bits: u32,
    group: usize,
    weight: &[u8],
    scales: &[u8],
    biases: &[u8],
    a: Q8Row<'_>,
) -> f32 {
    // `MlxAffine::validate` admits only these; anything else would be
    // the portable kernel's to refuse.
    if bits != 4 && bits != 8 {
        return scalar::dot_mlx(bits, group, weight, scales, biases, a);
    }
    let block = 4 * bits as usize; // bytes of 32 codes
    scalar::mlx_with(group, scales, biases, a, |b, x| {
        let w = &weight[block * b..block * b + block];
        if bits == 4 {
            let (lo, hi) = nibbles(load_u8(w));
            assert!(x.len() >= 32);
            // SAFETY: 32 i8 are readable at `x` (asserted); `dot16` as
            // above.
            return unsafe {
                let xs = vld2q_s8(x.as_ptr());
                vaddvq_s32(vaddq_s32(dot16(lo, xs.0), dot16(hi, xs.1)))
            };
        }
        let (w0, w1) = (load_u8(w), load_u8(&w[16..]));
        let (x0, x1) = (load_i8(x), load_i8(&x[16..]));
        // SAFETY: as in `dot16`. Codes (≤ 255) and activations (|x| ≤
        // 127) are exact in i16, their products in i32.
        unsafe {
            let mut s32 = vdupq_n_s32(0);
            for (wv, xv) in [(w0, x0), (w1, x1)] {
                let wl = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(wv)));
                let wh = vreinterpretq_s16_u16(vmovl_high_u8(wv));
                let (xl, xh) = (vmovl_s8(vget_low_s8(xv)), vmovl_high_s8(xv));
                s32 = vmlal_s16(s32, vget_low_s16(wl), vget_low_s16(xl));
                s32 = vmlal_high_s16(s32, wl, xl);
                s32 = vmlal_s16(s32, vget_low_s16(wh), vget_low_s16(xh));
                s32 = vmlal_high_s16(s32, wh, xh);
            }
            vaddvq_s32(s32)
        }
    })
}

/// MXFP4 (17-byte blocks) · Q8, as [`scalar::dot_mxfp4`]: the codes
/// through the doubled E2M1 table (a 16-entry byte lookup), the scale
/// halved to compensate.
pub fn dot_mxfp4(w: &[u8], a: Q8Row<'_>) -> f32 {
    let table = load_i8(&MXFP4_VALUES);
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(17).enumerate() {
        let (lo, hi) = nibbles(load_u8(&blk[1..]));
        // SAFETY: as in `dot16`; the indices are nibbles (< 16).
        let (lo, hi) = unsafe {
            (
                vqtbl1q_s8(table, vreinterpretq_u8_s8(lo)),
                vqtbl1q_s8(table, vreinterpretq_u8_s8(hi)),
            )
        };
        let s = dot32(lo, hi, &a.qs[b * 32..b * 32 + 32]);
        acc += e8m0_to_f32_half(blk[0]) * a.d[b] * s as f32;
    }
    acc
}

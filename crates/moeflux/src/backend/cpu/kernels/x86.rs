//! x86-64 kernels: AVX2 + FMA (`maddubs`/`madd` integer dots) and AVX-512
//! with VNNI (`vpdpbusd`, two blocks of 32 per register).
//!
//! Every function follows the math of its [`super::scalar`] twin: exact
//! integer sums per block, scales applied in f32 once per block. Unsigned ×
//! signed products are what both instruction sets multiply natively; signed
//! weights are made unsigned with an offset that is subtracted again through
//! the activation block sums (`Σ (w + c)·a = Σ w·a + c·Σ a`).
//!
//! # Safety
//! Every function here requires the CPU features of its level; callers
//! check [`super::Level`] first.

#![allow(clippy::missing_safety_doc)]

use std::arch::x86_64::*;

use super::scalar::f16_at;
use super::Level;
use crate::backend::cpu::quantize::Q8Row;
use crate::quant::dequant::{bf16_to_f32, e8m0_to_f32_half, MXFP4_VALUES};
use crate::quant::{GgmlType, QK_K};

// ---------------------------------------------------------------- helpers

/// An f16 stored at `p` (unaligned), converted with F16C.
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn h2f(p: &[u8]) -> f32 {
    let bits = u16::from_le_bytes([p[0], p[1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// `2^shift` for shifts 0..=4, as bytes (a `pshufb` table).
const POW2: [u8; 16] = [1, 2, 4, 8, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Unpacks the 12 scale bytes of a Q4_K/Q5_K block at `sc` into 8 scales
/// and 8 mins as bytes `[scales | mins]`, in registers (no trip through
/// memory, which would stall on store forwarding). Reads 16 bytes; the
/// caller guarantees 4 readable bytes past the 12 (the codes follow).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn k_unpack(sc: *const u8) -> __m128i {
    // As u32 words u0, u1, u2 (u3 unused), the layout wants:
    //   scales 0..4 = u0 & 0x3f..      scales 4..8 = (u2 & 0x0f..) | ((u0 >> 6) & 3..) << 4
    //   mins   0..4 = u1 & 0x3f..      mins   4..8 = ((u2 >> 4) & 0x0f..) | ((u1 >> 6) & 3..) << 4
    let u = _mm_loadu_si128(sc as *const __m128i);
    let a = _mm_shuffle_epi32::<0b10_01_10_00>(u); // [u0, u2, u1, u2]
    let b = _mm_shuffle_epi32::<0b01_01_00_00>(u); // [u0, u0, u1, u1]
    let low = _mm_and_si128(
        _mm_srlv_epi32(a, _mm_setr_epi32(0, 0, 0, 4)),
        _mm_setr_epi32(0x3f3f_3f3f, 0x0f0f_0f0f, 0x3f3f_3f3f, 0x0f0f_0f0f),
    );
    let high = _mm_slli_epi32::<4>(_mm_and_si128(
        _mm_srli_epi32::<6>(b),
        _mm_set1_epi32(0x0303_0303),
    ));
    _mm_or_si128(low, _mm_and_si128(high, _mm_setr_epi32(0, -1, 0, -1)))
}

/// `2^shift` of the 8 activation blocks at `shift`, as 16 i16 lanes
/// repeated for `[scales | mins]`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pow2_16(shift: *const u8) -> __m256i {
    let pw = _mm_shuffle_epi8(
        _mm_loadu_si128(POW2.as_ptr() as *const __m128i),
        _mm_loadl_epi64(shift as *const __m128i),
    );
    _mm256_cvtepu8_epi16(_mm_unpacklo_epi64(pw, pw))
}

/// The scales and mins of a Q4_K/Q5_K block as 16 i16 lanes
/// (`[scales | mins]`), each multiplied by `2^shift` of its activation
/// block (so integer sums come out in units of the super-block's base
/// activation scale). At most 63·16: fits i16.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn k_scales_mins(sc: *const u8, shift: *const u8) -> __m256i {
    _mm256_mullo_epi16(_mm256_cvtepu8_epi16(k_unpack(sc)), pow2_16(shift))
}

/// `pshufb` masks broadcasting i16 lane `s` (0..8) of a 128-bit register.
const BCAST16: [[u8; 32]; 8] = {
    let mut m = [[0u8; 32]; 8];
    let mut s = 0;
    while s < 8 {
        let mut i = 0;
        while i < 32 {
            m[s][i] = (2 * s + (i % 2)) as u8;
            i += 1;
        }
        s += 1;
    }
    m
};

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bcast16(v: __m256i, s: usize) -> __m256i {
    _mm256_shuffle_epi8(v, _mm256_loadu_si256(BCAST16[s].as_ptr() as *const __m256i))
}

/// Σ mins·sums for one super-block: the mins are lanes 8..16 of
/// `scales_mins`, the activation code sums of its 8 blocks are at `sum`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn k_mins(scales_mins: __m256i, sum: *const i32) -> __m128i {
    let sums = _mm_packs_epi32(
        _mm_loadu_si128(sum as *const __m128i),
        _mm_loadu_si128(sum.add(4) as *const __m128i),
    );
    _mm_madd_epi16(_mm256_extracti128_si256::<1>(scales_mins), sums)
}

/// `d` and `dmin` of a k-quant block (two f16 at `p`) as lanes 0 and 1.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn d_dmin(p: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)))
}

/// How far ahead of the current weight block a row kernel asks for
/// weights: decode streams every weight once, and tasks are short (about
/// 16 KiB) so the hardware prefetcher alone ramps up too late.
const PREFETCH_BYTES: usize = 1024;

/// Prefetches the cache lines `PREFETCH_BYTES` past the `len` bytes of
/// weights at `p`. Only an address is formed (`wrapping_add`): it may lie
/// past the end of the matrix, which a prefetch ignores.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn prefetch_ahead(p: *const u8, len: usize) {
    let mut off = 0;
    while off < len {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES + off) as *const i8);
        off += 64;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0x55>(s, s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load256(p: &[u8]) -> __m256i {
    debug_assert!(p.len() >= 32);
    _mm256_loadu_si256(p.as_ptr() as *const __m256i)
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load256i8(p: &[i8]) -> __m256i {
    debug_assert!(p.len() >= 32);
    _mm256_loadu_si256(p.as_ptr() as *const __m256i)
}

/// 16 bytes of packed nibbles → 32 codes: the low nibbles, then the high.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles_split(p: &[u8]) -> __m256i {
    let v = _mm_loadu_si128(p.as_ptr() as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(v), v);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Σ of 8 i32 lanes of `u8 × i8` products, summed in pairs of 16 bits then
/// pairs of 32 (no overflow while `u ≤ 127` or the pair sums stay in i16).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn mul_u8_i8(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// `i8 × i8` products in i32 lanes (llama.cpp's sign trick: |a| · sign(b, a)).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn mul_i8_i8(a: __m256i, b: __m256i) -> __m256i {
    mul_u8_i8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
}

// ------------------------------------------------------------------- AVX2

/// The weight scales of eight consecutive Q4_0 blocks (f16 at a stride of
/// 18 bytes from `p`) as f32 lanes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn q4_0_scales8(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees eight whole blocks at p.
    let h = |k: usize| std::ptr::read_unaligned(p.add(18 * k) as *const i16);
    _mm256_cvtph_ps(_mm_setr_epi16(
        h(0),
        h(1),
        h(2),
        h(3),
        h(4),
        h(5),
        h(6),
        h(7),
    ))
}

/// One Q4_0 block (codes 0..15 standing for -8..7) times a block of
/// activation codes: `Σ code · a`, the `- 8 · Σ a` is the caller's.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_0_block(blk: *const u8, qa: *const i8) -> __m256 {
    // SAFETY: the caller guarantees a whole block at blk and 32 codes at qa.
    let q = nibbles_split(std::slice::from_raw_parts(blk.add(2), 16));
    _mm256_cvtepi32_ps(mul_u8_i8(q, _mm256_loadu_si256(qa as *const __m256i)))
}

/// Q4_0 against one activation row. Eight blocks at a time: their eight
/// combined scales (weight × activation) are one vector, the `-8 · Σ a`
/// offsets one fused multiply-add, and each block's scale is a lane
/// permute — not a scalar f16 conversion and multiply per block.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_avx2(w: &[u8], a: Q8Row<'_>) -> f32 {
    let nb = w.len() / 18;
    assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb && a.sum.len() >= nb);
    let (wp, qp) = (w.as_ptr(), a.qs.as_ptr());
    // Two accumulators: consecutive blocks do not wait on each other's FMA.
    let mut acc = [_mm256_setzero_ps(); 2];
    let minus8 = _mm256_set1_ps(-8.0);
    let mut b = 0;
    while b + 8 <= nb {
        // SAFETY: blocks b..b + 8 ≤ nb: inside both buffers (checked above).
        let blk = wp.add(18 * b);
        prefetch_ahead(blk, 144);
        let s = _mm256_mul_ps(q4_0_scales8(blk), _mm256_loadu_ps(a.d.as_ptr().add(b)));
        let sums = _mm256_cvtepi32_ps(_mm256_loadu_si256(a.sum.as_ptr().add(b) as *const __m256i));
        acc[0] = _mm256_fmadd_ps(_mm256_mul_ps(s, minus8), sums, acc[0]);
        for k in 0..8 {
            let sk = _mm256_permutevar8x32_ps(s, _mm256_set1_epi32(k as i32));
            let p = q4_0_block(blk.add(18 * k), qp.add(32 * (b + k)));
            acc[k % 2] = _mm256_fmadd_ps(sk, p, acc[k % 2]);
        }
        b += 8;
    }
    let mut tail = 0.0;
    for b in b..nb {
        // SAFETY: block b < nb.
        let blk = wp.add(18 * b);
        let s = h2f(std::slice::from_raw_parts(blk, 2)) * a.d[b];
        tail += s * (hsum256(q4_0_block(blk, qp.add(32 * b))) - 8.0 * a.sum[b] as f32);
    }
    hsum256(_mm256_add_ps(acc[0], acc[1])) + tail
}

/// Eight interleaved Q4_0 rows (one group of [`interleave`]) against one
/// activation row: the eight dots, one per lane.
///
/// Per block column, four 32-byte loads hold the eight rows' codes with
/// row `j` in 32-bit lane `j`; each activation quad is broadcast once for
/// all eight rows, the `u8 × i8` pair sums are added in 16 bits (eight
/// products of at most 2·15·127 each: below 2^15) and widened once, the
/// `-8 · Σ a` offset is subtracted in integers, and the eight rows' scales
/// are one f16 vector. No horizontal sums until the end, and none there.
///
/// [`interleave`]: super::super::interleave
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_avx2_x8(g: &[u8], a: Q8Row<'_>) -> [f32; 8] {
    const TILE: usize = 8 * 18;
    let nb = g.len() / TILE;
    assert!(g.len() == nb * TILE && a.qs.len() >= 32 * nb && a.d.len() >= nb && a.sum.len() >= nb);
    let (gp, qp) = (g.as_ptr(), a.qs.as_ptr());
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // One block column: the eight rows' integer sums, offset removed.
    let column = |b: usize| {
        // SAFETY: b < nb: tile b and activation block b are inside the
        // buffers (checked above).
        let tile = gp.add(TILE * b);
        prefetch_ahead(tile, TILE);
        let qa = qp.add(32 * b);
        let quad =
            |at: usize| _mm256_set1_epi32(std::ptr::read_unaligned(qa.add(at) as *const i32));
        let mut s16 = _mm256_setzero_si256();
        for k in 0..4 {
            let v = _mm256_loadu_si256(tile.add(16 + 32 * k) as *const __m256i);
            let lo = _mm256_and_si256(v, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo, quad(4 * k)));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi, quad(16 + 4 * k)));
        }
        let s32 = _mm256_sub_epi32(
            _mm256_madd_epi16(s16, ones),
            _mm256_set1_epi32(8 * a.sum[b]),
        );
        let d = _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_loadu_si128(tile as *const __m128i)),
            _mm256_set1_ps(a.d[b]),
        );
        (d, _mm256_cvtepi32_ps(s32))
    };
    // Two accumulators: consecutive columns do not wait on each other.
    let mut acc = [_mm256_setzero_ps(); 2];
    for b in 0..nb {
        let (d, s) = column(b);
        acc[b % 2] = _mm256_fmadd_ps(d, s, acc[b % 2]);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(acc[0], acc[1]));
    out
}

/// 64 six-bit values stored by `interleave::put6` (48 bytes at `p`) as
/// bytes: values 0..32 and 32..64.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn get6(p: *const u8) -> (__m256i, __m256i) {
    // SAFETY: the caller guarantees 48 bytes at p.
    let v = _mm256_loadu_si256(p as *const __m256i);
    let m4 = _mm256_set1_epi8(0x0F);
    let lo = _mm256_and_si256(v, m4);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
    // Top bits: values i, 16 + i (first vector) and 32 + i, 48 + i
    // (second) sit at bits 0, 2 and 4, 6 of byte i.
    let top = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(32) as *const __m128i));
    let m2 = _mm256_set1_epi8(3);
    let t0 = _mm256_and_si256(_mm256_srlv_epi64(top, _mm256_setr_epi64x(0, 0, 2, 2)), m2);
    let t1 = _mm256_and_si256(_mm256_srlv_epi64(top, _mm256_setr_epi64x(4, 4, 6, 6)), m2);
    (
        _mm256_or_si256(lo, _mm256_slli_epi16::<4>(t0)),
        _mm256_or_si256(hi, _mm256_slli_epi16::<4>(t1)),
    )
}

/// Eight interleaved Q4_K rows (one group of [`interleave`]) against one
/// activation row (power-of-two block scales): the eight dots.
///
/// As [`q4_0_avx2_x8`]: row `j` in 32-bit lane `j`, each activation quad
/// broadcast once for the eight rows, a sub-block's products added in 16
/// bits. A sub-block's sums are then multiplied by the eight rows' scales
/// (duplicated to the two 16-bit halves of each lane, one `madd`) and
/// shifted by the activation block's power of two; the mins term is four
/// `madd`s of (min · 2^shift) pairs with the activation sums.
///
/// [`interleave`]: super::super::interleave
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_avx2_x8(g: &[u8], a: Q8Row<'_>) -> [f32; 8] {
    const TILE: usize = 8 * 144;
    let nb = g.len() / TILE;
    assert!(
        g.len() == nb * TILE
            && a.qs.len() >= nb * QK_K
            && a.shift.len() >= 8 * nb
            && a.shift32.len() >= 8 * nb
            && a.base.len() >= nb
            && a.sum.len() >= 8 * nb
    );
    let (gp, qp) = (g.as_ptr(), a.qs.as_ptr());
    let m4 = _mm256_set1_epi8(0x0F);
    let (mut acc, mut accm) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for b in 0..nb {
        // SAFETY (pointer arithmetic below): the lengths were checked
        // above; tile b spans g[TILE·b..][..TILE], its activations
        // qs[256b..][..256], shift/shift32/sum [8b..][..8].
        let tile = gp.add(TILE * b);
        prefetch_ahead(tile, TILE);
        let qa = qp.add(QK_K * b);
        // Scales as bytes [sub-block][row]; sub-block s's eight scales,
        // each twice, as 16 i16 lanes.
        let (s03, s47) = get6(tile.add(32));
        let half = |v: __m256i, s: usize| {
            let x = if s % 4 < 2 {
                _mm256_castsi256_si128(v)
            } else {
                _mm256_extracti128_si256::<1>(v)
            };
            let d = if s.is_multiple_of(2) {
                _mm_unpacklo_epi8(x, x)
            } else {
                _mm_unpackhi_epi8(x, x)
            };
            _mm256_cvtepu8_epi16(d)
        };
        let scale = |s: usize| half(if s < 4 { s03 } else { s47 }, s);
        let shift = |s: usize| _mm256_set1_epi32(*a.shift32.get_unchecked(8 * b + s));
        let quad =
            |at: usize| _mm256_set1_epi32(std::ptr::read_unaligned(qa.add(at) as *const i32));
        let mut isum = _mm256_setzero_si256();
        for c in 0..4 {
            let mut s_lo = _mm256_setzero_si256();
            let mut s_hi = _mm256_setzero_si256();
            for k in 0..8 {
                let v = _mm256_loadu_si256(tile.add(128 + 256 * c + 32 * k) as *const __m256i);
                let lo = _mm256_and_si256(v, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                s_lo = _mm256_add_epi16(s_lo, _mm256_maddubs_epi16(lo, quad(64 * c + 4 * k)));
                s_hi = _mm256_add_epi16(s_hi, _mm256_maddubs_epi16(hi, quad(64 * c + 32 + 4 * k)));
            }
            let p_lo = _mm256_sllv_epi32(_mm256_madd_epi16(s_lo, scale(2 * c)), shift(2 * c));
            let p_hi =
                _mm256_sllv_epi32(_mm256_madd_epi16(s_hi, scale(2 * c + 1)), shift(2 * c + 1));
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(p_lo, p_hi));
        }
        // Mins as bytes [pair p][row][s % 2]: pair p's 16 bytes widened are
        // (min of sub-block 2p, min of 2p + 1) per row.
        let (m01, m23) = get6(tile.add(80));
        let pow = pow2_16(a.shift.as_ptr().add(8 * b));
        let sums = {
            let sum = a.sum.as_ptr().add(8 * b);
            let s8 = _mm_packs_epi32(
                _mm_loadu_si128(sum as *const __m128i),
                _mm_loadu_si128(sum.add(4) as *const __m128i),
            );
            _mm256_broadcastsi128_si256(s8)
        };
        let pair = |m: __m128i, pw: __m256i, sp: __m256i| {
            _mm256_madd_epi16(_mm256_mullo_epi16(_mm256_cvtepu8_epi16(m), pw), sp)
        };
        let imin = _mm256_add_epi32(
            _mm256_add_epi32(
                pair(
                    _mm256_castsi256_si128(m01),
                    _mm256_shuffle_epi32::<0x00>(pow),
                    _mm256_shuffle_epi32::<0x00>(sums),
                ),
                pair(
                    _mm256_extracti128_si256::<1>(m01),
                    _mm256_shuffle_epi32::<0x55>(pow),
                    _mm256_shuffle_epi32::<0x55>(sums),
                ),
            ),
            _mm256_add_epi32(
                pair(
                    _mm256_castsi256_si128(m23),
                    _mm256_shuffle_epi32::<0xAA>(pow),
                    _mm256_shuffle_epi32::<0xAA>(sums),
                ),
                pair(
                    _mm256_extracti128_si256::<1>(m23),
                    _mm256_shuffle_epi32::<0xFF>(pow),
                    _mm256_shuffle_epi32::<0xFF>(sums),
                ),
            ),
        );
        let base = _mm256_set1_ps(a.base[b]);
        let d = _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_loadu_si128(tile as *const __m128i)),
            base,
        );
        let dmin = _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_loadu_si128(tile.add(16) as *const __m128i)),
            base,
        );
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), acc);
        accm = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(imin), accm);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(acc, accm));
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_avx2(w: &[u8], a: Q8Row<'_>) -> f32 {
    let nb = w.len() / 34;
    assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb);
    let (wp, qp) = (w.as_ptr(), a.qs.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut b = 0;
    while b < nb {
        let two = (b + 1 < nb) as usize + 1;
        prefetch_ahead(wp.wrapping_add(34 * b), 68);
        for (k, acc) in acc.iter_mut().enumerate().take(two) {
            // SAFETY: block b + k < nb: inside both buffers (checked above).
            let blk = wp.add(34 * (b + k));
            let s = h2f(std::slice::from_raw_parts(blk, 2)) * a.d[b + k];
            let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let p = mul_i8_i8(
                q,
                _mm256_loadu_si256(qp.add(32 * (b + k)) as *const __m256i),
            );
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(p), *acc);
        }
        b += two;
    }
    hsum256(_mm256_add_ps(acc[0], acc[1]))
}

/// [`q4_0_avx2`] for `T` activation rows at once (the prompt path): each
/// block's scale and nibbles are unpacked once for all rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_avx2_rows<const T: usize>(w: &[u8], a: &[Q8Row<'_>; T]) -> [f32; T] {
    let nb = w.len() / 18;
    for a in a {
        assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb && a.sum.len() >= nb);
    }
    let wp = w.as_ptr();
    let mut acc = [_mm256_setzero_ps(); T];
    let minus8 = _mm256_set1_ps(-8.0);
    let mut b = 0;
    while b + 8 <= nb {
        // SAFETY: blocks b..b + 8 ≤ nb: inside both buffers (checked above).
        let blk = wp.add(18 * b);
        let dw = q4_0_scales8(blk);
        let s: [__m256; T] = std::array::from_fn(|t| {
            let s = _mm256_mul_ps(dw, _mm256_loadu_ps(a[t].d.as_ptr().add(b)));
            let sums = _mm256_cvtepi32_ps(_mm256_loadu_si256(
                a[t].sum.as_ptr().add(b) as *const __m256i
            ));
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(s, minus8), sums, acc[t]);
            s
        });
        for k in 0..8 {
            let q = nibbles_split(std::slice::from_raw_parts(blk.add(18 * k + 2), 16));
            let lane = _mm256_set1_epi32(k as i32);
            for t in 0..T {
                let qa = a[t].qs.as_ptr().add(32 * (b + k));
                let p = mul_u8_i8(q, _mm256_loadu_si256(qa as *const __m256i));
                let sk = _mm256_permutevar8x32_ps(s[t], lane);
                acc[t] = _mm256_fmadd_ps(sk, _mm256_cvtepi32_ps(p), acc[t]);
            }
        }
        b += 8;
    }
    let mut tail = [0f32; T];
    for b in b..nb {
        // SAFETY: block b < nb.
        let blk = wp.add(18 * b);
        let dw = h2f(std::slice::from_raw_parts(blk, 2));
        for t in 0..T {
            let p = hsum256(q4_0_block(blk, a[t].qs.as_ptr().add(32 * b)));
            tail[t] += dw * a[t].d[b] * (p - 8.0 * a[t].sum[b] as f32);
        }
    }
    std::array::from_fn(|t| hsum256(acc[t]) + tail[t])
}

/// [`q8_0_avx2`] for `T` activation rows at once (the prompt path): each
/// block's scale and code magnitudes are unpacked once for all rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_avx2_rows<const T: usize>(w: &[u8], a: &[Q8Row<'_>; T]) -> [f32; T] {
    let nb = w.len() / 34;
    for a in a {
        assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb);
    }
    let wp = w.as_ptr();
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        // SAFETY: block b < nb: inside both buffers (checked above).
        let blk = wp.add(34 * b);
        let dw = h2f(std::slice::from_raw_parts(blk, 2));
        let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        // |q| once; each row's codes take q's signs (see `mul_i8_i8`).
        let abs = _mm256_sign_epi8(q, q);
        for t in 0..T {
            let x = _mm256_loadu_si256(a[t].qs.as_ptr().add(32 * b) as *const __m256i);
            let p = mul_u8_i8(abs, _mm256_sign_epi8(x, q));
            let s = _mm256_set1_ps(dw * a[t].d[b]);
            acc[t] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[t]);
        }
    }
    std::array::from_fn(|t| hsum256(acc[t]))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mxfp4_avx2(w: &[u8], a: Q8Row<'_>) -> f32 {
    let table =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(MXFP4_VALUES.as_ptr() as *const __m128i));
    let mut acc = _mm256_setzero_ps();
    for (b, blk) in w.chunks_exact(17).enumerate() {
        let s = e8m0_to_f32_half(blk[0]) * a.d[b];
        let v = _mm256_shuffle_epi8(table, nibbles_split(&blk[1..]));
        let p = mul_i8_i8(v, load256i8(&a.qs[b * 32..]));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(p), acc);
    }
    hsum256(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_avx2(w: &[u8], a: Q8Row<'_>) -> f32 {
    let nb = w.len() / 144;
    assert!(
        a.qs.len() >= nb * QK_K
            && a.shift.len() >= 8 * nb
            && a.base.len() >= nb
            && a.sum.len() >= 8 * nb
    );
    let mask = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut mins = _mm_setzero_ps();
    let (wp, qp) = (w.as_ptr(), a.qs.as_ptr());
    for b in 0..nb {
        // SAFETY (pointer arithmetic below): the lengths were checked above;
        // block b spans w[144b..144b+144] and activations [256b..256b+256].
        let blk = wp.add(144 * b);
        prefetch_ahead(blk, 144);
        let qa = qp.add(QK_K * b);
        let sm = k_scales_mins(blk.add(4), a.shift.as_ptr().add(8 * b));
        let scales = _mm256_permute2x128_si256::<0x00>(sm, sm);
        let mut isum = _mm256_setzero_si256();
        for c in 0..4 {
            let q = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
            let lo = _mm256_and_si256(q, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask);
            let plo =
                _mm256_maddubs_epi16(lo, _mm256_loadu_si256(qa.add(64 * c) as *const __m256i));
            let phi = _mm256_maddubs_epi16(
                hi,
                _mm256_loadu_si256(qa.add(64 * c + 32) as *const __m256i),
            );
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(plo, bcast16(scales, 2 * c)));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(phi, bcast16(scales, 2 * c + 1)));
        }
        let dd = _mm_mul_ps(d_dmin(blk), _mm_set1_ps(a.base[b]));
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(isum), acc);
        let imin = _mm_cvtepi32_ps(k_mins(sm, a.sum.as_ptr().add(8 * b)));
        mins = _mm_fmadd_ps(_mm_shuffle_ps::<0x55>(dd, dd), imin, mins);
    }
    let m = _mm_add_ps(mins, _mm_movehl_ps(mins, mins));
    let m = _mm_add_ss(m, _mm_shuffle_ps::<0x55>(m, m));
    hsum256(acc) - _mm_cvtss_f32(m)
}

/// [`q4_k_avx2`] for `T` activation rows at once (the prompt path).
///
/// Each 64-code chunk of the weights is loaded, split into nibbles and its
/// two sub-block scales broadcast once, then multiplied with all `T` rows,
/// so prompt processing unpacks a weight block once per `T` tokens. The
/// activations' power-of-two block scales (see `quantize`) are applied as
/// a left shift of each sub-block's i32 products, which keeps the weight
/// scales independent of the token. Bounds: codes ≤ 15, activation codes
/// ≤ 127, scales ≤ 63, shifts ≤ 4: a super-block's sum stays below
/// 8 · 32 · 15 · 127 · 63 · 16 < 2^31.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_avx2_rows<const T: usize>(w: &[u8], a: &[Q8Row<'_>; T]) -> [f32; T] {
    let nb = w.len() / 144;
    for a in a {
        assert!(
            a.qs.len() >= nb * QK_K
                && a.shift32.len() >= 8 * nb
                && a.base.len() >= nb
                && a.d.len() >= 8 * nb
                && a.sum.len() >= 8 * nb
        );
    }
    let mask = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); T];
    let wp = w.as_ptr();
    for b in 0..nb {
        // SAFETY (pointer arithmetic below): the lengths were checked above;
        // block b spans w[144b..144b+144] and activations [256b..256b+256].
        let blk = wp.add(144 * b);
        // [scales | mins] as i16; the scales repeated in both 128-bit lanes
        // for the in-lane broadcasts.
        let raw = _mm256_cvtepu8_epi16(k_unpack(blk.add(4)));
        let scales = _mm256_permute2x128_si256::<0x00>(raw, raw);
        let dd = d_dmin(blk);
        let d = _mm256_broadcastss_ps(dd);
        // dmin · min of each sub-block, as f32.
        let mins = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(raw))),
            _mm256_broadcastss_ps(_mm_movehdup_ps(dd)),
        );
        let mut isum = [_mm256_setzero_si256(); T];
        for c in 0..4 {
            let q = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
            let lo = _mm256_and_si256(q, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask);
            let (slo, shi) = (bcast16(scales, 2 * c), bcast16(scales, 2 * c + 1));
            for t in 0..T {
                let qa = a[t].qs.as_ptr().add(QK_K * b + 64 * c);
                let sh = a[t].shift32.as_ptr().add(8 * b + 2 * c);
                let plo = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(lo, _mm256_loadu_si256(qa as *const __m256i)),
                    slo,
                );
                let phi = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(hi, _mm256_loadu_si256(qa.add(32) as *const __m256i)),
                    shi,
                );
                let plo = _mm256_sllv_epi32(plo, _mm256_set1_epi32(*sh));
                let phi = _mm256_sllv_epi32(phi, _mm256_set1_epi32(*sh.add(1)));
                isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(plo, phi));
            }
        }
        for t in 0..T {
            let db = _mm256_mul_ps(d, _mm256_set1_ps(a[t].base[b]));
            acc[t] = _mm256_fmadd_ps(db, _mm256_cvtepi32_ps(isum[t]), acc[t]);
            // Σ dmin · min_j · d_j · sum_j: the mins' share of the products.
            let dsum = _mm256_mul_ps(
                _mm256_loadu_ps(a[t].d.as_ptr().add(8 * b)),
                _mm256_cvtepi32_ps(_mm256_loadu_si256(
                    a[t].sum.as_ptr().add(8 * b) as *const __m256i
                )),
            );
            acc[t] = _mm256_fnmadd_ps(mins, dsum, acc[t]);
        }
    }
    std::array::from_fn(|t| hsum256(acc[t]))
}

/// Bit `k` of every byte of `qh`, moved to bit 4.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn fifth_bit(qh: __m256i, one: __m256i, k: i32) -> __m256i {
    let bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(k)), one);
    _mm256_slli_epi16::<4>(bit)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_avx2(w: &[u8], a: Q8Row<'_>) -> f32 {
    let nb = w.len() / 176;
    assert!(
        a.qs.len() >= nb * QK_K
            && a.shift.len() >= 8 * nb
            && a.base.len() >= nb
            && a.sum.len() >= 8 * nb
    );
    let mask = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    let mut mins = _mm_setzero_ps();
    let (wp, qp) = (w.as_ptr(), a.qs.as_ptr());
    for b in 0..nb {
        // SAFETY: as in q4_k_avx2 (176-byte blocks).
        let blk = wp.add(176 * b);
        prefetch_ahead(blk, 176);
        let qa = qp.add(QK_K * b);
        let sm = k_scales_mins(blk.add(4), a.shift.as_ptr().add(8 * b));
        let scales = _mm256_permute2x128_si256::<0x00>(sm, sm);
        let qh = _mm256_loadu_si256(blk.add(16) as *const __m256i);
        let mut isum = _mm256_setzero_si256();
        for c in 0..4 {
            let q = _mm256_loadu_si256(blk.add(48 + 32 * c) as *const __m256i);
            let lo = _mm256_or_si256(_mm256_and_si256(q, mask), fifth_bit(qh, one, 2 * c as i32));
            let hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask),
                fifth_bit(qh, one, 2 * c as i32 + 1),
            );
            let plo =
                _mm256_maddubs_epi16(lo, _mm256_loadu_si256(qa.add(64 * c) as *const __m256i));
            let phi = _mm256_maddubs_epi16(
                hi,
                _mm256_loadu_si256(qa.add(64 * c + 32) as *const __m256i),
            );
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(plo, bcast16(scales, 2 * c)));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(phi, bcast16(scales, 2 * c + 1)));
        }
        let dd = _mm_mul_ps(d_dmin(blk), _mm_set1_ps(a.base[b]));
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(isum), acc);
        let imin = _mm_cvtepi32_ps(k_mins(sm, a.sum.as_ptr().add(8 * b)));
        mins = _mm_fmadd_ps(_mm_shuffle_ps::<0x55>(dd, dd), imin, mins);
    }
    let m = _mm_add_ps(mins, _mm_movehl_ps(mins, mins));
    let m = _mm_add_ss(m, _mm_shuffle_ps::<0x55>(m, m));
    hsum256(acc) - _mm_cvtss_f32(m)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_avx2(w: &[u8], a: Q8Row<'_>) -> f32 {
    let nb = w.len() / 210;
    assert!(
        a.qs.len() >= nb * QK_K
            && a.shift.len() >= 8 * nb
            && a.base.len() >= nb
            && a.sum16.len() >= 16 * nb
    );
    let mask = _mm256_set1_epi8(0x0F);
    let three = _mm256_set1_epi8(3);
    let pow2 = _mm_loadu_si128(POW2.as_ptr() as *const __m128i);
    // Group g of 16 values lies in activation block g / 2.
    let pairs = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let mut acc = _mm256_setzero_ps();
    let (wp, qp) = (w.as_ptr(), a.qs.as_ptr());
    for b in 0..nb {
        // SAFETY: as in q4_k_avx2 (210-byte blocks).
        let blk = wp.add(210 * b);
        prefetch_ahead(blk, 210);
        let qa = qp.add(QK_K * b);
        // The 16 group scales times 2^shift of their activation block.
        let pw = _mm_shuffle_epi8(
            pow2,
            _mm_loadl_epi64(a.shift.as_ptr().add(8 * b) as *const __m128i),
        );
        let pw16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(pw, pairs));
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192) as *const __m128i));
        let scl = _mm256_mullo_epi16(sc16, pw16);
        let mut isum = _mm256_setzero_si256();
        for h in 0..2 {
            let qh = _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
            // Groups 8h..8h+8 in both 128-bit halves, for the broadcasts.
            let sh = if h == 0 {
                _mm256_permute2x128_si256::<0x00>(scl, scl)
            } else {
                _mm256_permute2x128_si256::<0x11>(scl, scl)
            };
            for j in 0..4 {
                let ql = _mm256_loadu_si256(blk.add(64 * h + 32 * (j % 2)) as *const __m256i);
                let lo = if j < 2 {
                    _mm256_and_si256(ql, mask)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql), mask)
                };
                let hi =
                    _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32)), three);
                let q = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi));
                let p = _mm256_maddubs_epi16(
                    q,
                    _mm256_loadu_si256(qa.add(128 * h + 32 * j) as *const __m256i),
                );
                // Low half: group 2j, high half: group 2j + 1 (of this 128).
                let sv = _mm256_blend_epi32::<0xF0>(bcast16(sh, 2 * j), bcast16(sh, 2 * j + 1));
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, sv));
            }
        }
        // The −32 offset of the codes: 32 · Σ scale·(Σ x per group).
        let sums = _mm256_loadu_si256(a.sum16.as_ptr().add(16 * b) as *const __m256i);
        let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(scl, sums));
        let f = a.base[b] * h2f(std::slice::from_raw_parts(blk.add(208), 2));
        acc = _mm256_fmadd_ps(
            _mm256_set1_ps(f),
            _mm256_cvtepi32_ps(_mm256_sub_epi32(isum, off)),
            acc,
        );
    }
    hsum256(acc)
}

/// MLX 4-bit: 16 bytes of words → 32 codes in element order (nibble j of a
/// word is element j, low nibble first), as unsigned bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn mlx4_codes(p: &[u8]) -> __m256i {
    let v = _mm_loadu_si128(p.as_ptr() as *const __m128i);
    let m = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(v, m);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), m);
    _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mlx_avx2(bits: u32, group: usize, w: &[u8], s: &[u8], bi: &[u8], a: Q8Row<'_>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut bias_acc = 0f32;
    let bytes_per_block = 4 * bits as usize; // 32 codes
    for b in 0..a.d.len() {
        let g = b * 32 / group;
        let scale = bf16_to_f32(u16::from_le_bytes([s[2 * g], s[2 * g + 1]]));
        let bias = bf16_to_f32(u16::from_le_bytes([bi[2 * g], bi[2 * g + 1]]));
        let wb = &w[b * bytes_per_block..];
        let x = load256i8(&a.qs[b * 32..]);
        let p = if bits == 4 {
            mul_u8_i8(mlx4_codes(wb), x)
        } else {
            // 8-bit codes reach 255: multiply in 16 bits to avoid the
            // saturation of maddubs.
            let q = load256(wb);
            let ql = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q));
            let qh = _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(q));
            let xl = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(x));
            let xh = _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(x));
            _mm256_add_epi32(_mm256_madd_epi16(ql, xl), _mm256_madd_epi16(qh, xh))
        };
        let d = a.d[b];
        acc = _mm256_fmadd_ps(_mm256_set1_ps(scale * d), _mm256_cvtepi32_ps(p), acc);
        bias_acc += bias * d * a.sum[b] as f32;
    }
    hsum256(acc) + bias_acc
}

/// Eight 16-bit float weights (F16, else BF16) from element `i` as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8(ty: GgmlType, w: &[u8], i: usize) -> __m256 {
    let h = _mm_loadu_si128(w.as_ptr().add(2 * i) as *const __m128i);
    if ty == GgmlType::F16 {
        _mm256_cvtph_ps(h)
    } else {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// `Σ w_i · x_i` for `x.len()` little-endian f32 weights at `w` (any
/// alignment): four 8-lane accumulators over 32-value chunks, then a scalar
/// tail. The one f32 dot of the AVX2 level: weight rows, attention scores.
///
/// # Safety
/// `w` must point to `4 · x.len()` readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_raw(w: *const u8, x: &[f32]) -> f32 {
    let n = x.len();
    let mut acc = [_mm256_setzero_ps(); 4];
    let full = n / 32 * 32;
    for i in (0..full).step_by(32) {
        for (k, a) in acc.iter_mut().enumerate() {
            let wv = _mm256_loadu_ps(w.add(4 * (i + 8 * k)) as *const f32);
            *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(i + 8 * k)), *a);
        }
    }
    let mut tail = 0f32;
    for (i, &xi) in x.iter().enumerate().skip(full) {
        tail += std::ptr::read_unaligned(w.add(4 * i) as *const f32) * xi;
    }
    hsum256(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    )) + tail
}

/// `Σ a_i b_i` as `dot_f32_raw` sums it: the dot of attention's scores
/// at both x86 levels.
///
/// # Safety
/// `a` must hold at least `b.len()` values (callers check the lengths
/// once, not per row), and the CPU must have AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert!(a.len() >= b.len());
    // SAFETY: `a` holds 4 · b.len() bytes (the caller's contract).
    dot_f32_raw(a.as_ptr() as *const u8, b)
}

/// Attention scores of one query against consecutive rows of a tile:
/// `out[j] = (q · row j) · scale`, each dot exactly as `f_avx2` computes
/// it for f32 weights `q`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn scores_avx2(q: &[f32], tile: &[f32], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    assert!(tile.len() >= out.len() * hd);
    for (j, o) in out.iter_mut().enumerate() {
        // SAFETY: q holds hd values, the row's length.
        *o = dot_f32(q, &tile[j * hd..(j + 1) * hd]) * scale;
    }
}

/// `o += Σ_j s_j · row j` over consecutive rows of a tile, 32 lanes of `o`
/// kept in registers across all rows. Every lane sees the same operations
/// in the same row order as repeated [`axpy_avx2`] calls (fused below the
/// last multiple of 8, unfused in the tail), so the result is identical.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn weighted_rows_avx2(s: &[f32], tile: &[f32], o: &mut [f32]) {
    let hd = o.len();
    assert!(tile.len() >= s.len() * hd);
    let full = hd / 8 * 8;
    let (op, tp) = (o.as_mut_ptr(), tile.as_ptr());
    let mut c = 0;
    while c < full {
        // Up to four 8-lane chunks at a time.
        let k_n = ((full - c) / 8).min(4);
        let mut acc = [_mm256_setzero_ps(); 4];
        for (k, a) in acc.iter_mut().enumerate().take(k_n) {
            // SAFETY (here and below): c + 8k + 8 ≤ full ≤ hd, and row j
            // of the tile spans tile[j·hd..(j + 1)·hd] (checked above).
            *a = _mm256_loadu_ps(op.add(c + 8 * k));
        }
        for (j, &sj) in s.iter().enumerate() {
            let sv = _mm256_set1_ps(sj);
            let row = tp.add(j * hd + c);
            for (k, a) in acc.iter_mut().enumerate().take(k_n) {
                *a = _mm256_fmadd_ps(sv, _mm256_loadu_ps(row.add(8 * k)), *a);
            }
        }
        for (k, a) in acc.iter().enumerate().take(k_n) {
            _mm256_storeu_ps(op.add(c + 8 * k), *a);
        }
        c += 8 * k_n;
    }
    for i in full..hd {
        for (j, &sj) in s.iter().enumerate() {
            o[i] += sj * tile[j * hd + i];
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f_avx2(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    if ty == GgmlType::F32 {
        assert!(w.len() >= 4 * x.len());
        // SAFETY: checked just above.
        return dot_f32_raw(w.as_ptr(), x);
    }
    // F16 or BF16 from here on.
    assert!(w.len() >= 2 * x.len());
    let n = x.len();
    let mut acc = [_mm256_setzero_ps(); 4];
    let full = n / 32 * 32;
    for i in (0..full).step_by(32) {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(
                load8(ty, w, i + 8 * k),
                _mm256_loadu_ps(x.as_ptr().add(i + 8 * k)),
                *a,
            );
        }
    }
    let mut tail = 0f32;
    for i in full..n {
        let wv = if ty == GgmlType::F16 {
            f16_at(w, 2 * i)
        } else {
            bf16_to_f32(u16::from_le_bytes([w[2 * i], w[2 * i + 1]]))
        };
        tail += wv * x[i];
    }
    hsum256(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    )) + tail
}

/// f16 bits → f32, eight at a time with F16C (exact, like any conversion).
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn f16_to_f32_f16c(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        // SAFETY: i + 8 ≤ n, inside both slices.
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    for i in full..n {
        dst[i] = half::f16::from_bits(src[i]).to_f32();
    }
}

/// [`super::f16_rows_to_f32`] with F16C: each row eight values at a time
/// (the tail one by one; the loop of [`f16_to_f32_f16c`], written out
/// here because calling that function per row, even `#[inline]`,
/// measured slower: attention bench, 2 threads, 22–26 ms against
/// 16–20), then a prefetch of the next `ahead` rows (`prefetch_rows`).
///
/// # Safety
/// AVX2 and F16C present; `s.rows == 0`, or `s.at + (s.rows − 1) ·
/// s.stride + s.width ≤ src.len()` without overflow; `s.rows · s.width ≤
/// dst.len()`.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn f16_rows_f16c(src: &[u16], s: super::Strided, ahead: usize, dst: &mut [f32]) {
    let full = s.width / 8 * 8;
    for r in 0..s.rows {
        let from = src.as_ptr().add(s.at + r * s.stride);
        let to = dst.as_mut_ptr().add(r * s.width);
        for i in (0..full).step_by(8) {
            // SAFETY: i + 8 ≤ width: inside row r of both (the contract).
            let h = _mm_loadu_si128(from.add(i) as *const __m128i);
            _mm256_storeu_ps(to.add(i), _mm256_cvtph_ps(h));
        }
        for i in full..s.width {
            *to.add(i) = half::f16::from_bits(*from.add(i)).to_f32();
        }
    }
    prefetch_rows(src.as_ptr() as *const u8, 2, s, ahead);
}

/// Prefetches the `ahead` rows after tile `s` of a cache of `elem`-byte
/// values at `base`, for the KV loaders. Only addresses are formed
/// (`wrapping_add`): rows past the cache's end are ignored by the
/// prefetch.
///
/// One prefetch per 64 bytes from each row's start. A row need not start
/// on a line, so its last partial line may go unrequested; asking for
/// every line it touches (five, not four, for a 256-byte row) measured
/// slower (attention bench, 2 threads: 19–24 ms against 17–20), more
/// requests competing for the same fill buffers.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn prefetch_rows(base: *const u8, elem: usize, s: super::Strided, ahead: usize) {
    for r in s.rows..s.rows + ahead {
        let row = base.wrapping_add(elem * (s.at + r * s.stride));
        let mut off = 0;
        while off < elem * s.width {
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(off) as *const i8);
            off += 64;
        }
    }
}

/// `super::q8_0_rows` with AVX2: where every tile row is whole blocks
/// (a head of 32·n values starting on a block), eight codes at a time
/// (i8 → i32 → f32, times the block's scale); otherwise the portable body
/// compiled for AVX2. Then a prefetch of the codes of the `ahead` rows
/// after the tile, one per 64 bytes from each row's start.
///
/// # Safety
/// AVX2 and F16C present; `s.rows == 0`, or `s.at + (s.rows − 1) ·
/// s.stride + s.width ≤ src.q.len()` without overflow; `s.rows · s.width ≤
/// dst.len()`. (The prefetches may point anywhere, they never fault.)
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn q8_0_rows_avx2(
    src: &crate::state::kv::Q8Rows,
    s: super::Strided,
    ahead: usize,
    dst: &mut [f32],
) {
    use crate::state::kv::Q8_BLOCK;
    let (dim, bpr) = (src.dim, src.blocks_per_row());
    // Whole blocks in every row, and their scales inside `src.d` (its
    // fields are public: checked, not assumed).
    let whole = dim > 0
        && s.rows > 0
        && s.stride == dim
        && s.width.is_multiple_of(Q8_BLOCK)
        && (s.at % dim).is_multiple_of(Q8_BLOCK)
        && s.at % dim + s.width <= dim
        && (s.at / dim + s.rows - 1) * bpr + s.at % dim / Q8_BLOCK + s.width / Q8_BLOCK
            <= src.d.len();
    if whole {
        let (row0, b0) = (s.at / dim, s.at % dim / Q8_BLOCK);
        for r in 0..s.rows {
            let q = src.q.as_ptr().add(s.at + r * s.stride);
            let d = src.d.as_ptr().add((row0 + r) * bpr + b0) as *const u16;
            let out = dst.as_mut_ptr().add(r * s.width);
            for b in 0..s.width / Q8_BLOCK {
                // SAFETY: block b of row r is inside the codes and the
                // tile (the contract) and its scale inside `src.d` (`whole`).
                let h = _mm_cvtsi32_si128(*d.add(b) as i32);
                let scale = _mm256_broadcastss_ps(_mm_cvtph_ps(h));
                for i in (0..Q8_BLOCK).step_by(8) {
                    let at = b * Q8_BLOCK + i;
                    let c = _mm_loadl_epi64(q.add(at) as *const __m128i);
                    let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
                    _mm256_storeu_ps(out.add(at), _mm256_mul_ps(v, scale));
                }
            }
        }
    } else {
        super::q8_0_rows(src, s, dst);
    }
    prefetch_rows(src.q.as_ptr() as *const u8, 1, s, ahead);
}

/// `y += s · x`, eight lanes at a time with FMA (the tail without).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn axpy_avx2(s: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let sv = _mm256_set1_ps(s);
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        // SAFETY: i + 8 ≤ n, inside both slices.
        let p = y.as_mut_ptr().add(i);
        let v = _mm256_fmadd_ps(sv, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(p));
        _mm256_storeu_ps(p, v);
    }
    for i in full..n {
        y[i] += s * x[i];
    }
}

// ----------------------------------------------------------------- AVX-512

/// `[lo; 8] ++ [hi; 8]` as 16 f32 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn halves(lo: f32, hi: f32) -> __m512 {
    _mm512_insertf32x8::<1>(_mm512_set1_ps(lo), _mm256_set1_ps(hi))
}

/// Two 256-bit halves as one 512-bit register.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn load512i8(p: &[i8]) -> __m512i {
    debug_assert!(p.len() >= 64);
    _mm512_loadu_si512(p.as_ptr() as *const __m512i)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_0_avx512(w: &[u8], a: Q8Row<'_>) -> f32 {
    let nb = a.d.len();
    let mut acc = _mm512_setzero_ps();
    let mut off = 0f32;
    let mut b = 0;
    while b + 2 <= nb {
        let (b0, b1) = (&w[18 * b..], &w[18 * (b + 1)..]);
        let q = join(nibbles_split(&b0[2..]), nibbles_split(&b1[2..]));
        let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, load512i8(&a.qs[32 * b..]));
        let (s0, s1) = (h2f(b0) * a.d[b], h2f(b1) * a.d[b + 1]);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), halves(s0, s1), acc);
        off += s0 * a.sum[b] as f32 + s1 * a.sum[b + 1] as f32;
        b += 2;
    }
    let mut tail = 0f32;
    if b < nb {
        let rest = a.from_block(b);
        tail = q4_0_avx2(&w[18 * b..], rest);
    }
    _mm512_reduce_add_ps(acc) - 8.0 * off + tail
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_avx512(w: &[u8], a: Q8Row<'_>) -> f32 {
    let nb = a.d.len();
    let flip = _mm512_set1_epi8(-128);
    let mut acc = _mm512_setzero_ps();
    let mut off = 0f32;
    let mut b = 0;
    while b + 2 <= nb {
        let (b0, b1) = (&w[34 * b..], &w[34 * (b + 1)..]);
        // w + 128 is unsigned; the extra 128·Σa is subtracted below.
        let q = _mm512_xor_si512(join(load256(&b0[2..]), load256(&b1[2..])), flip);
        let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, load512i8(&a.qs[32 * b..]));
        let (s0, s1) = (h2f(b0) * a.d[b], h2f(b1) * a.d[b + 1]);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), halves(s0, s1), acc);
        off += s0 * a.sum[b] as f32 + s1 * a.sum[b + 1] as f32;
        b += 2;
    }
    let mut tail = 0f32;
    if b < nb {
        let rest = a.from_block(b);
        tail = q8_0_avx2(&w[34 * b..], rest);
    }
    _mm512_reduce_add_ps(acc) - 128.0 * off + tail
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn mxfp4_avx512(w: &[u8], a: Q8Row<'_>) -> f32 {
    // Table of code + 12 (unsigned); 12·Σa is subtracted after.
    let mut shifted = [0u8; 16];
    for (s, &v) in shifted.iter_mut().zip(&MXFP4_VALUES) {
        *s = (v + 12) as u8;
    }
    let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(shifted.as_ptr() as *const __m128i));
    let nb = a.d.len();
    let mut acc = _mm512_setzero_ps();
    let mut off = 0f32;
    let mut b = 0;
    while b + 2 <= nb {
        let (b0, b1) = (&w[17 * b..], &w[17 * (b + 1)..]);
        let v0 = _mm256_shuffle_epi8(table, nibbles_split(&b0[1..]));
        let v1 = _mm256_shuffle_epi8(table, nibbles_split(&b1[1..]));
        let p = _mm512_dpbusd_epi32(
            _mm512_setzero_si512(),
            join(v0, v1),
            load512i8(&a.qs[32 * b..]),
        );
        let s0 = e8m0_to_f32_half(b0[0]) * a.d[b];
        let s1 = e8m0_to_f32_half(b1[0]) * a.d[b + 1];
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), halves(s0, s1), acc);
        off += s0 * a.sum[b] as f32 + s1 * a.sum[b + 1] as f32;
        b += 2;
    }
    let mut tail = 0f32;
    if b < nb {
        let rest = a.from_block(b);
        tail = mxfp4_avx2(&w[17 * b..], rest);
    }
    _mm512_reduce_add_ps(acc) - 12.0 * off + tail
}

/// Σ code · activation over one block of 32 MLX codes.
fn mlx_block_isum(bits: u32, w: &[u8], qa: &[i8]) -> i32 {
    let per_word = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    qa.iter()
        .enumerate()
        .map(|(k, &x)| {
            let wi = k / per_word;
            let word = u32::from_le_bytes([w[4 * wi], w[4 * wi + 1], w[4 * wi + 2], w[4 * wi + 3]]);
            ((word >> ((k % per_word) as u32 * bits)) & mask) as i32 * x as i32
        })
        .sum()
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn mlx_avx512(bits: u32, group: usize, w: &[u8], s: &[u8], bi: &[u8], a: Q8Row<'_>) -> f32 {
    let nb = a.d.len();
    let mut acc = _mm512_setzero_ps();
    let mut bias_acc = 0f32;
    let bytes_per_block = 4 * bits as usize;
    let scale_of = |b: usize| {
        let g = b * 32 / group;
        (
            bf16_to_f32(u16::from_le_bytes([s[2 * g], s[2 * g + 1]])),
            bf16_to_f32(u16::from_le_bytes([bi[2 * g], bi[2 * g + 1]])),
        )
    };
    let mut b = 0;
    while b + 2 <= nb {
        let wb = &w[b * bytes_per_block..];
        let q = if bits == 4 {
            // 32 bytes → 64 codes: as 16-bit lanes, byte k becomes
            // (low nibble, high nibble) = elements 2k, 2k+1.
            let x16 = _mm512_cvtepu8_epi16(load256(wb));
            _mm512_or_si512(
                _mm512_and_si512(x16, _mm512_set1_epi16(0x0F)),
                _mm512_and_si512(_mm512_slli_epi16::<4>(x16), _mm512_set1_epi16(0x0F00)),
            )
        } else {
            _mm512_loadu_si512(wb.as_ptr() as *const __m512i)
        };
        let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, load512i8(&a.qs[32 * b..]));
        let ((s0, b0), (s1, b1)) = (scale_of(b), scale_of(b + 1));
        acc = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(p),
            halves(s0 * a.d[b], s1 * a.d[b + 1]),
            acc,
        );
        bias_acc += b0 * a.d[b] * a.sum[b] as f32 + b1 * a.d[b + 1] * a.sum[b + 1] as f32;
        b += 2;
    }
    let mut tail = 0f32;
    if b < nb {
        // An odd trailing block, in scalar code.
        let (scale, bias) = scale_of(b);
        let isum = mlx_block_isum(bits, &w[b * bytes_per_block..], &a.qs[32 * b..32 * b + 32]);
        tail = a.d[b] * (scale * isum as f32 + bias * a.sum[b] as f32);
    }
    _mm512_reduce_add_ps(acc) + bias_acc + tail
}

/// Sixteen weights from element `i` as f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn load16(ty: GgmlType, w: &[u8], i: usize) -> __m512 {
    match ty {
        GgmlType::F32 => _mm512_loadu_ps(w.as_ptr().add(4 * i) as *const f32),
        GgmlType::F16 => {
            _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(2 * i) as *const __m256i))
        }
        _ => {
            let h = _mm256_loadu_si256(w.as_ptr().add(2 * i) as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn f_avx512(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let mut acc = [_mm512_setzero_ps(); 4];
    let full = n / 64 * 64;
    for i in (0..full).step_by(64) {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(
                load16(ty, w, i + 16 * k),
                _mm512_loadu_ps(x.as_ptr().add(i + 16 * k)),
                *a,
            );
        }
    }
    let rest = if full < n {
        let bytes = match ty {
            GgmlType::F32 => 4,
            _ => 2,
        };
        f_avx2(ty, &w[bytes * full..], &x[full..])
    } else {
        0.0
    };
    _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(acc[0], acc[1]),
        _mm512_add_ps(acc[2], acc[3]),
    )) + rest
}

// --------------------------------------------------------------- dispatch

/// The kernel for 8-bit activations of a type at a level. The k-quants use
/// their AVX2 kernels at the AVX-512 level too: measured on a Xeon with
/// AVX-512 (VNNI), 512-bit versions of the same scheme ran at a third of
/// the AVX2 throughput (the 16-bit scale broadcasts and 512-bit shuffles
/// cost more than the wider multiplies save).
pub fn q8_kernel(ty: GgmlType, level: Level) -> super::Q8Kernel {
    match (ty, level) {
        (GgmlType::Q4_0, Level::Avx512) => q4_0_avx512,
        (GgmlType::Q8_0, Level::Avx512) => q8_0_avx512,
        (GgmlType::MXFP4, Level::Avx512) => mxfp4_avx512,
        (GgmlType::Q4_0, _) => q4_0_avx2,
        (GgmlType::Q8_0, _) => q8_0_avx2,
        (GgmlType::MXFP4, _) => mxfp4_avx2,
        (GgmlType::Q4_K, _) => q4_k_avx2,
        (GgmlType::Q5_K, _) => q5_k_avx2,
        (GgmlType::Q6_K, _) => q6_k_avx2,
        _ => unreachable!("not an 8-bit-activation type"),
    }
}

/// The kernel for four activation rows at once, where one exists (the
/// prompt path: a weight block is unpacked once for four tokens).
pub fn q8_kernel4(ty: GgmlType, _level: Level) -> Option<super::Q8Kernel4> {
    match ty {
        GgmlType::Q4_K => Some(q4_k_avx2_rows::<4>),
        GgmlType::Q4_0 => Some(q4_0_avx2_rows::<4>),
        GgmlType::Q8_0 => Some(q8_0_avx2_rows::<4>),
        _ => None,
    }
}

/// The kernel over eight interleaved rows, where one exists (the decode
/// path: see `interleave`). The AVX2 kernel serves the AVX-512 level too.
pub fn q8_kernel_x8(ty: GgmlType, _level: Level) -> Option<super::Q8KernelX8> {
    match ty {
        GgmlType::Q4_0 => Some(q4_0_avx2_x8),
        GgmlType::Q4_K => Some(q4_k_avx2_x8),
        _ => None,
    }
}

/// The MLX affine kernel at a level.
pub fn mlx_kernel(level: Level) -> super::MlxKernel {
    match level {
        Level::Avx512 => mlx_avx512,
        _ => mlx_avx2,
    }
}

/// The float-weight kernel at a level.
pub fn f_kernel(level: Level) -> super::FKernel {
    match level {
        Level::Avx512 => f_avx512,
        _ => f_avx2,
    }
}

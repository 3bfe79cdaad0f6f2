//! Scalar reference dequantizers.
//!
//! One function per block format, written for clarity and for *bit-exact*
//! agreement with gguf-py's numpy dequantizers (f32 arithmetic, the same
//! order of operations, no fused multiply-add). Fast kernels are tested
//! against these; these are tested against gguf-py.
//!
//! Within a block, element `i` of the output is the `i`-th weight of the row
//! segment the block covers. The bit layouts are described next to each
//! decoder; they are ggml's.

use half::f16;

use super::{GgmlType, QK_K};

/// Why a buffer could not be dequantized.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DequantError {
    #[error("no reference dequantizer for tensor type {0} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, MXFP4)")]
    Unsupported(GgmlType),
    #[error("{ty}: {src_bytes} bytes is not a whole number of {type_size}-byte blocks, or does not match {dst_len} output elements")]
    Length {
        ty: GgmlType,
        src_bytes: usize,
        type_size: usize,
        dst_len: usize,
    },
}

/// Decodes whole blocks of `ty` from `src` into `dst`.
///
/// `src.len()` must be a multiple of the type size and `dst.len()` the
/// matching number of elements.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    let (bs, ts) = ty.block_layout();
    if !src.len().is_multiple_of(ts) || src.len() / ts * bs != dst.len() {
        return Err(DequantError::Length {
            ty,
            src_bytes: src.len(),
            type_size: ts,
            dst_len: dst.len(),
        });
    }
    let decode: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => f32_block,
        GgmlType::F16 => f16_block,
        GgmlType::BF16 => bf16_block,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        GgmlType::MXFP4 => mxfp4,
        other => return Err(DequantError::Unsupported(other)),
    };
    for (block, out) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(bs)) {
        decode(block, out);
    }
    Ok(())
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn f32_block(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn f16_block(b: &[u8], y: &mut [f32]) {
    y[0] = f16_at(b, 0);
}

fn bf16_block(b: &[u8], y: &mut [f32]) {
    y[0] = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
}

/// bfloat16 is the top half of an f32; widening is exact.
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Q8_0: `d: f16, q: [i8; 32]`; `y = q * d`.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yi, &q) in y.iter_mut().zip(&b[2..34]) {
        *yi = (q as i8) as f32 * d;
    }
}

/// Q4_0: `d: f16, qs: [u8; 16]`; element `j < 16` is the low nibble of
/// `qs[j]`, element `j + 16` its high nibble; `y = d * (q - 8)`.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = d * ((q & 0x0F) as i32 - 8) as f32;
        y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1: `d: f16, m: f16, qs: [u8; 16]` (nibbles as Q4_0); `y = d * q + m`.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = d * (q & 0x0F) as f32 + m;
        y[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// Q5_0: `d: f16, qh: u32, qs: [u8; 16]`; the fifth bit of element `j` is bit
/// `j` of `qh`; `y = d * (q - 16)`.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let hi0 = ((qh >> j) & 1) << 4;
        let hi1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (((q & 0x0F) as u32 | hi0) as i32 - 16) as f32;
        y[j + 16] = d * (((q >> 4) as u32 | hi1) as i32 - 16) as f32;
    }
}

/// Q5_1: `d: f16, m: f16, qh: u32, qs: [u8; 16]`; `y = d * q + m`.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, &q) in b[8..24].iter().enumerate() {
        let hi0 = ((qh >> j) & 1) << 4;
        let hi1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = d * ((q & 0x0F) as u32 | hi0) as f32 + m;
        y[j + 16] = d * ((q >> 4) as u32 | hi1) as f32 + m;
    }
}

/// Q2_K: `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`.
/// Element `i = 128h + 32j + l` is bits `2j..2j+2` of `qs[32h + l]`; sub-block
/// `i / 16` has scale `d * (s & 15)` and min `dmin * (s >> 4)`.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for (i, yi) in y.iter_mut().enumerate().take(QK_K) {
        let (h, j, l) = (i / 128, (i / 32) % 4, i % 32);
        let q = (qs[32 * h + l] >> (2 * j)) & 3;
        let s = scales[i / 16];
        let dl = d * (s & 0x0F) as f32;
        let ml = dmin * (s >> 4) as f32;
        *yi = dl * q as f32 - ml;
    }
}

/// Q3_K: `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`.
/// Element `i = 128h + 32j + l` has low bits `2j..2j+2` of `qs[32h + l]` and
/// high bit `i / 32` of `hmask[l]`; the value is `low - 4` when that bit is
/// clear. Sixteen 6-bit signed scales (offset 32) are split over `scales`:
/// low nibbles from bytes 0..8, high pairs from bytes 8..12.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let sc = &b[96..108];
    let d = f16_at(b, 108);
    for (i, yi) in y.iter_mut().enumerate().take(QK_K) {
        let s = i / 16;
        let low = (sc[s % 8] >> (4 * (s / 8))) & 0x0F;
        let high = (sc[8 + s % 4] >> (2 * (s / 4))) & 0x03;
        let scale = (low | (high << 4)) as i32 - 32;
        let dl = d * scale as f32;
        let (h, j, l) = (i / 128, (i / 32) % 4, i % 32);
        let ql = ((qs[32 * h + l] >> (2 * j)) & 3) as i32;
        let hbit = ((hmask[l] >> (i / 32)) & 1) ^ 1;
        let q = ql - ((hbit as i32) << 2);
        *yi = dl * q as f32;
    }
}

/// The 6-bit scale and min of sub-block `s` (0..8) of a Q4_K/Q5_K block,
/// packed in 12 bytes: sub-blocks 0..4 in the low 6 bits of bytes `s` and
/// `s + 4`; sub-blocks 4..8 in the nibbles of bytes 8..12 plus the top two
/// bits of bytes 0..8.
#[inline]
pub(crate) fn k_scale_min(sc: &[u8], s: usize) -> (u8, u8) {
    if s < 4 {
        (sc[s] & 63, sc[s + 4] & 63)
    } else {
        let scale = (sc[s + 4] & 0x0F) | ((sc[s - 4] >> 2) & 0x30);
        let min = (sc[s + 4] >> 4) | ((sc[s] >> 2) & 0x30);
        (scale, min)
    }
}

/// Q4_K: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`.
/// Element `i = 32s + l` (sub-block `s`) is nibble `s % 2` of
/// `qs[32(s / 2) + l]`; `y = (d * sc) * q - (dmin * m)`.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let sc = &b[4..16];
    let qs = &b[16..144];
    for s in 0..8 {
        let (scale, min) = k_scale_min(sc, s);
        let d1 = d * scale as f32;
        let m1 = dmin * min as f32;
        for l in 0..32 {
            let q = (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0F;
            y[32 * s + l] = d1 * q as f32 - m1;
        }
    }
}

/// Q5_K: as Q4_K with `qh: [u8; 32]` before `qs`; the fifth bit of element
/// `32s + l` is bit `s` of `qh[l]`.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let sc = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for s in 0..8 {
        let (scale, min) = k_scale_min(sc, s);
        let d1 = d * scale as f32;
        let m1 = dmin * min as f32;
        for l in 0..32 {
            let lo = (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0F;
            let hi = (qh[l] >> s) & 1;
            y[32 * s + l] = d1 * (lo | (hi << 4)) as f32 - m1;
        }
    }
}

/// Q6_K: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.
/// Element `i = 128h + 64a + m` takes nibble `a` of `ql[64h + m]`; writing
/// the same `i = 128h + 32j + l`, its two high bits are bits `2j..2j+2` of
/// `qh[32h + l]`. `y = (d * scale[i / 16]) * (q - 32)`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for (i, yi) in y.iter_mut().enumerate().take(QK_K) {
        let h = i / 128;
        let (a, m) = ((i % 128) / 64, i % 64);
        let (j, l) = ((i % 128) / 32, i % 32);
        let lo = (ql[64 * h + m] >> (4 * a)) & 0x0F;
        let hi = (qh[32 * h + l] >> (2 * j)) & 0x03;
        let q = (lo | (hi << 4)) as i32 - 32;
        let dl = d * (scales[i / 16] as i8) as f32;
        *yi = dl * q as f32;
    }
}

/// The E2M1 code points of MXFP4, doubled so they are integers; the block
/// scale is halved to compensate ([`e8m0_to_f32_half`]).
pub const MXFP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half of the E8M0 scale `2^(e - 127)`, as ggml computes it (exact, including
/// the subnormal results for `e < 2`).
#[inline]
pub fn e8m0_to_f32_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        ((e as u32) - 1) << 23
    };
    f32::from_bits(bits)
}

/// MXFP4: `e: u8, qs: [u8; 16]`; element `j < 16` is the low nibble of
/// `qs[j]`, `j + 16` the high one; `y = half_scale(e) * VALUES[q]`.
fn mxfp4(b: &[u8], y: &mut [f32]) {
    let d = e8m0_to_f32_half(b[0]);
    for (j, &q) in b[1..17].iter().enumerate() {
        y[j] = d * MXFP4_VALUES[(q & 0x0F) as usize] as f32;
        y[j + 16] = d * MXFP4_VALUES[(q >> 4) as usize] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_mismatch_is_an_error() {
        let mut out = vec![0.0; 32];
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out),
            Err(DequantError::Length { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0u8; 34], &mut out[..31]),
            Err(DequantError::Length { .. })
        ));
        assert_eq!(
            dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut vec![0.0; 256]),
            Err(DequantError::Unsupported(GgmlType::IQ2_XXS))
        );
    }

    #[test]
    fn q8_0_hand_block() {
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 4;
        b[3] = (-6i8) as u8;
        let mut y = vec![0.0; 32];
        dequantize(GgmlType::Q8_0, &b, &mut y).unwrap();
        assert_eq!(&y[..3], &[2.0, -3.0, 0.0]);
    }

    #[test]
    fn e8m0_half_scale() {
        assert_eq!(e8m0_to_f32_half(127), 0.5);
        assert_eq!(e8m0_to_f32_half(128), 1.0);
        assert_eq!(e8m0_to_f32_half(1), 2f32.powi(-127));
        assert_eq!(e8m0_to_f32_half(0), 2f32.powi(-128));
    }
}

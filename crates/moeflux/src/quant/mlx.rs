//! MLX affine quantization (the mlx-community checkpoint format).
//!
//! A quantized `[out, in]` matrix is stored as three arrays:
//! - `weight`: `u32[out, in * bits / 32]`, element `j` of a little-endian word
//!   in bits `[j * bits, (j + 1) * bits)` (4-bit: nibble `j` of word `w` is
//!   column `8w + j`);
//! - `scales`, `biases`: `[out, in / group_size]`, usually bf16;
//!
//! and decodes as `w = q * scale + bias` per group of `group_size` columns.

use std::fmt;

use super::dequant::bf16_to_f32;

/// Element type of the `scales` and `biases` arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleType {
    BF16,
    F16,
    F32,
}

impl ScaleType {
    pub fn size(self) -> usize {
        match self {
            ScaleType::BF16 | ScaleType::F16 => 2,
            ScaleType::F32 => 4,
        }
    }

    #[inline]
    fn read(self, bytes: &[u8], index: usize) -> f32 {
        match self {
            ScaleType::BF16 => {
                bf16_to_f32(u16::from_le_bytes([bytes[2 * index], bytes[2 * index + 1]]))
            }
            ScaleType::F16 => {
                half::f16::from_le_bytes([bytes[2 * index], bytes[2 * index + 1]]).to_f32()
            }
            ScaleType::F32 => {
                let at = 4 * index;
                f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
            }
        }
    }
}

/// Parameters of one MLX affine-quantized tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MlxAffine {
    /// Bits per weight: 4 or 8 are supported.
    pub bits: u8,
    /// Columns sharing one scale and bias.
    pub group_size: u32,
    pub scale_type: ScaleType,
}

/// Why an MLX tensor could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MlxError {
    #[error("MLX affine quantization with {0} bits is not supported (supported: 4, 8)")]
    UnsupportedBits(u8),
    #[error("MLX group size {0} is not supported (must be a positive multiple of 32)")]
    UnsupportedGroupSize(u32),
    #[error("MLX buffers do not match {elements} elements: {weight_bytes} weight bytes, {scale_bytes} scale bytes, {bias_bytes} bias bytes")]
    Length {
        elements: usize,
        weight_bytes: usize,
        scale_bytes: usize,
        bias_bytes: usize,
    },
}

impl MlxAffine {
    /// Checks that the parameters are ones moeflux can decode.
    pub fn validate(&self) -> Result<(), MlxError> {
        if !matches!(self.bits, 4 | 8) {
            return Err(MlxError::UnsupportedBits(self.bits));
        }
        if self.group_size == 0 || !self.group_size.is_multiple_of(32) {
            return Err(MlxError::UnsupportedGroupSize(self.group_size));
        }
        Ok(())
    }

    /// Bytes of packed weights for `n` elements.
    pub fn weight_bytes(&self, n: u64) -> u64 {
        n * self.bits as u64 / 8
    }

    /// Bytes of the scales (and, equally, of the biases) for `n` elements.
    pub fn scale_bytes(&self, n: u64) -> u64 {
        n / self.group_size as u64 * self.scale_type.size() as u64
    }

    /// Decodes `dst.len()` elements (whole groups, row-major) from the three
    /// arrays, which must hold exactly those elements.
    pub fn dequantize(
        &self,
        weight: &[u8],
        scales: &[u8],
        biases: &[u8],
        dst: &mut [f32],
    ) -> Result<(), MlxError> {
        self.validate()?;
        let n = dst.len();
        let gs = self.group_size as usize;
        if !n.is_multiple_of(gs)
            || weight.len() as u64 != self.weight_bytes(n as u64)
            || scales.len() as u64 != self.scale_bytes(n as u64)
            || biases.len() != scales.len()
        {
            return Err(MlxError::Length {
                elements: n,
                weight_bytes: weight.len(),
                scale_bytes: scales.len(),
                bias_bytes: biases.len(),
            });
        }
        let bits = self.bits as usize;
        let per_word = 32 / bits;
        let mask = (1u32 << bits) - 1;
        for (g, group) in dst.chunks_exact_mut(gs).enumerate() {
            let s = self.scale_type.read(scales, g);
            let b = self.scale_type.read(biases, g);
            for (k, y) in group.iter_mut().enumerate() {
                let i = g * gs + k;
                let w = i / per_word;
                let word = u32::from_le_bytes([
                    weight[4 * w],
                    weight[4 * w + 1],
                    weight[4 * w + 2],
                    weight[4 * w + 3],
                ]);
                let q = (word >> ((i % per_word) * bits)) & mask;
                *y = q as f32 * s + b;
            }
        }
        Ok(())
    }
}

impl fmt::Display for MlxAffine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MLX-Q{}/g{}", self.bits, self.group_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_bit_nibble_order() {
        let m = MlxAffine {
            bits: 4,
            group_size: 32,
            scale_type: ScaleType::F32,
        };
        // 32 elements = 4 words; word 0 holds columns 0..8, nibble j = column j.
        let mut weight = vec![0u8; 16];
        weight[0..4].copy_from_slice(&0x8765_4321u32.to_le_bytes());
        let scales = 2.0f32.to_le_bytes();
        let biases = (-1.0f32).to_le_bytes();
        let mut y = vec![0.0; 32];
        m.dequantize(&weight, &scales, &biases, &mut y).unwrap();
        assert_eq!(&y[..8], &[1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0]);
        assert_eq!(y[8], -1.0);
    }

    #[test]
    fn rejects_bad_parameters_and_lengths() {
        let bad = MlxAffine {
            bits: 3,
            group_size: 64,
            scale_type: ScaleType::BF16,
        };
        assert_eq!(bad.validate(), Err(MlxError::UnsupportedBits(3)));
        let m = MlxAffine {
            bits: 8,
            group_size: 64,
            scale_type: ScaleType::BF16,
        };
        let mut y = vec![0.0; 64];
        assert!(matches!(
            m.dequantize(&[0; 63], &[0; 2], &[0; 2], &mut y),
            Err(MlxError::Length { .. })
        ));
    }
}

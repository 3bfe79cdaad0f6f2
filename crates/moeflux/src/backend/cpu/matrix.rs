//! Weight matrices in their storage format, and products with activations.
//!
//! A [`Matrix`] is a borrowed view of a `rows × cols` weight, row-major, in
//! one of the formats of [`crate::quant`]; [`Matrix::row`] decodes a row with
//! the reference decoders. Products are in [`super::kernels`].

use crate::quant::dequant::dequantize;
use crate::quant::{GgmlType, MlxAffine};

/// The bytes of a matrix.
#[derive(Clone, Copy, Debug)]
pub enum MatrixData<'a> {
    /// `rows` rows of ggml blocks.
    Ggml { ty: GgmlType, bytes: &'a [u8] },
    /// The same blocks with rows interleaved in groups of eight
    /// ([`super::interleave`]); same size.
    Interleaved { ty: GgmlType, bytes: &'a [u8] },
    /// MLX affine: packed weights, scales and biases, each `rows` rows.
    Mlx {
        q: MlxAffine,
        weight: &'a [u8],
        scales: &'a [u8],
        biases: &'a [u8],
    },
}

/// A `rows × cols` weight matrix (`y = W x` maps `cols` inputs to `rows`
/// outputs).
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    pub rows: usize,
    pub cols: usize,
    pub data: MatrixData<'a>,
}

/// Why bytes cannot be viewed as a matrix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MatrixError {
    #[error("tensor type {0} cannot be computed with (no kernel)")]
    Unsupported(String),
    #[error("{rows} × {cols} {ty} needs {expected} bytes, found {found}")]
    Size {
        rows: usize,
        cols: usize,
        ty: String,
        expected: u64,
        found: u64,
    },
}

impl<'a> Matrix<'a> {
    /// A ggml-typed matrix, checked for size and a supported type.
    pub fn ggml(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &'a [u8],
    ) -> Result<Matrix<'a>, MatrixError> {
        if !ty.has_reference_dequant() {
            return Err(MatrixError::Unsupported(ty.name().into()));
        }
        let row = ty.row_bytes(cols as u64).unwrap_or(u64::MAX);
        let expected = row.saturating_mul(rows as u64);
        if expected != bytes.len() as u64 {
            return Err(MatrixError::Size {
                rows,
                cols,
                ty: ty.name().into(),
                expected,
                found: bytes.len() as u64,
            });
        }
        Ok(Matrix {
            rows,
            cols,
            data: MatrixData::Ggml { ty, bytes },
        })
    }

    /// A matrix whose bytes were rewritten by [`super::interleave::interleave`]:
    /// checked as [`Matrix::ggml`] and for a type and shape that have the
    /// interleaved layout.
    pub fn interleaved(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &'a [u8],
    ) -> Result<Matrix<'a>, MatrixError> {
        let m = Matrix::ggml(ty, rows, cols, bytes)?;
        if !super::interleave::supports(ty, rows, cols) {
            return Err(MatrixError::Unsupported(format!(
                "{ty} {rows} × {cols} interleaved by eight rows"
            )));
        }
        Ok(Matrix {
            data: MatrixData::Interleaved { ty, bytes },
            ..m
        })
    }

    /// An MLX affine matrix, checked for size and supported parameters.
    pub fn mlx(
        q: MlxAffine,
        rows: usize,
        cols: usize,
        weight: &'a [u8],
        scales: &'a [u8],
        biases: &'a [u8],
    ) -> Result<Matrix<'a>, MatrixError> {
        q.validate()
            .map_err(|e| MatrixError::Unsupported(e.to_string()))?;
        let n = (rows * cols) as u64;
        let ok = cols.is_multiple_of(q.group_size as usize)
            && weight.len() as u64 == q.weight_bytes(n)
            && scales.len() as u64 == q.scale_bytes(n)
            && biases.len() == scales.len();
        if !ok {
            return Err(MatrixError::Size {
                rows,
                cols,
                ty: q.to_string(),
                expected: q.weight_bytes(n) + 2 * q.scale_bytes(n),
                found: (weight.len() + scales.len() + biases.len()) as u64,
            });
        }
        Ok(Matrix {
            rows,
            cols,
            data: MatrixData::Mlx {
                q,
                weight,
                scales,
                biases,
            },
        })
    }

    /// Rows `r0..r0 + n` as a matrix of their own (`None` past the end, or
    /// for rows interleaved by eight, which cannot be cut anywhere). Every
    /// array holds whole rows of equal size, so a row range is a byte range
    /// of each.
    pub fn row_range(&self, r0: usize, n: usize) -> Option<Matrix<'a>> {
        if r0.checked_add(n)? > self.rows || self.rows == 0 {
            return None;
        }
        let cut = |b: &'a [u8]| {
            let row = b.len() / self.rows;
            &b[r0 * row..(r0 + n) * row]
        };
        let data = match self.data {
            MatrixData::Ggml { ty, bytes } => MatrixData::Ggml {
                ty,
                bytes: cut(bytes),
            },
            MatrixData::Mlx {
                q,
                weight,
                scales,
                biases,
            } => MatrixData::Mlx {
                q,
                weight: cut(weight),
                scales: cut(scales),
                biases: cut(biases),
            },
            MatrixData::Interleaved { .. } => return None,
        };
        Some(Matrix {
            rows: n,
            cols: self.cols,
            data,
        })
    }

    /// Decodes row `r` into `out` (`cols` values).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match self.data {
            MatrixData::Ggml { ty, bytes } => {
                let rb = bytes.len() / self.rows;
                // Sizes were checked when the matrix was made.
                let _ = dequantize(ty, &bytes[r * rb..(r + 1) * rb], &mut out[..c]);
            }
            MatrixData::Interleaved { ty, bytes } => {
                let rb = bytes.len() / self.rows;
                let mut plain = [0u8; super::interleave::MAX_ROW_BYTES];
                super::interleave::row_of(ty, bytes, rb, r, &mut plain[..rb]);
                let _ = dequantize(ty, &plain[..rb], &mut out[..c]);
            }
            MatrixData::Mlx {
                q,
                weight,
                scales,
                biases,
            } => {
                let wb = weight.len() / self.rows;
                let sb = scales.len() / self.rows;
                let _ = q.dequantize(
                    &weight[r * wb..(r + 1) * wb],
                    &scales[r * sb..(r + 1) * sb],
                    &biases[r * sb..(r + 1) * sb],
                    &mut out[..c],
                );
            }
        }
    }
}

/// Dot product in f32 with eight partial sums (the order is fixed, so the
/// result is deterministic).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

//! Resolving a family's tensor names to weights, with the checks that turn
//! a wrong or incomplete file into a clear error at load time (never a
//! panic or garbage at compute time).

use crate::backend::cpu::Matrix;
use crate::format::{Container, ModelFiles, Span, TensorEntry};
use crate::quant::dequant::dequantize;
use crate::quant::TensorType;

/// Why a model's tensors cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WeightError {
    #[error("tensor {0:?} is missing from the model file")]
    Missing(String),
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("tensor {name:?}: {message}")]
    Unsupported { name: String, message: String },
}

/// A weight matrix located in the model's files: `rows × cols` in `ty`.
/// Cheap to keep; [`WeightRef::view`] gives the bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightRef {
    pub ty: TensorType,
    pub rows: usize,
    pub cols: usize,
    /// One span (ggml) or three (MLX weight, scales, biases).
    pub parts: Vec<Span>,
}

impl WeightRef {
    /// Makes a matrix view over the given part bytes (in `parts` order),
    /// whose rows are interleaved by eight if `interleaved` (a copy the
    /// caller rewrote with [`crate::backend::cpu::interleave`]). Sizes and
    /// types were checked when the reference was made.
    pub fn matrix<'a>(&self, bytes: &[&'a [u8]], interleaved: bool) -> Matrix<'a> {
        let m = match self.ty {
            TensorType::Ggml(t) if interleaved => {
                Matrix::interleaved(t, self.rows, self.cols, bytes[0])
            }
            TensorType::Ggml(t) => Matrix::ggml(t, self.rows, self.cols, bytes[0]),
            TensorType::Mlx(q) => {
                Matrix::mlx(q, self.rows, self.cols, bytes[0], bytes[1], bytes[2])
            }
            TensorType::Raw(_) => {
                unreachable!("raw dtypes are rejected when the reference is made")
            }
        };
        match m {
            Ok(m) => m,
            Err(e) => unreachable!("weight checked at load: {e}"),
        }
    }

    /// The matrix, read zero-copy from its resident copy or the memory map.
    pub fn view<'a>(&self, files: &'a ModelFiles) -> Matrix<'a> {
        match self.parts.as_slice() {
            [one] => self.matrix(&[files.bytes(one)], files.is_interleaved(one)),
            [w, s, b] => self.matrix(&[files.bytes(w), files.bytes(s), files.bytes(b)], false),
            _ => unreachable!("a weight has one or three parts"),
        }
    }

    /// Bytes of storage.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.len).sum()
    }
}

/// Interleaves the resident copies of the `weights` whose type and shape
/// have a faster kernel at `level` over rows interleaved by eight
/// ([`crate::backend::cpu::interleave`]); [`WeightRef::view`] reads them
/// that way afterwards. A span is rewritten only when every weight over
/// it wants it (a tied embedding is one span for two weights) and no other
/// span overlaps it. Returns the bytes rewritten.
pub fn interleave_resident(
    files: &mut ModelFiles,
    weights: &[&WeightRef],
    level: crate::backend::cpu::kernels::Level,
) -> u64 {
    use crate::backend::cpu::kernels::wants_interleaved;
    let wanted = |w: &WeightRef| match (w.ty, w.parts.as_slice()) {
        (TensorType::Ggml(t), [_]) => wants_interleaved(t, w.rows, w.cols, level),
        _ => false,
    };
    let mut chosen: Vec<(Span, crate::quant::GgmlType, usize)> = Vec::new();
    for w in weights {
        let (TensorType::Ggml(ty), [span]) = (w.ty, w.parts.as_slice()) else {
            continue;
        };
        let touching = |o: &&&WeightRef| {
            o.parts.iter().any(|p| {
                p.file == span.file
                    && p.offset < span.offset + span.len
                    && span.offset < p.offset + p.len
            })
        };
        let all_want = weights
            .iter()
            .filter(touching)
            .all(|o| wanted(o) && o.parts[0] == *span && o.ty == w.ty && o.cols == w.cols);
        if all_want && !chosen.iter().any(|c| c.0 == *span) {
            chosen.push((*span, ty, w.cols));
        }
    }
    let (mut scratch, mut bytes) = (Vec::new(), 0);
    for (span, ty, cols) in chosen {
        if files.interleave_resident(&span, ty, cols, &mut scratch) {
            bytes += span.len;
        }
    }
    bytes
}

/// Checks that `ty` can be computed with, building a throwaway view over
/// the real bytes.
fn check_matrix(files: &ModelFiles, name: &str, w: &WeightRef) -> Result<(), WeightError> {
    let unsupported = |message: String| WeightError::Unsupported {
        name: name.to_string(),
        message,
    };
    let parts: Vec<&[u8]> = w.parts.iter().map(|p| files.bytes(p)).collect();
    let r = match w.ty {
        TensorType::Ggml(t) => Matrix::ggml(t, w.rows, w.cols, parts[0]).map(|_| ()),
        TensorType::Mlx(q) if parts.len() == 3 => {
            Matrix::mlx(q, w.rows, w.cols, parts[0], parts[1], parts[2]).map(|_| ())
        }
        other => {
            return Err(unsupported(format!(
                "tensor type {other} cannot be used as a weight"
            )))
        }
    };
    r.map_err(|e| unsupported(e.to_string()))
}

/// Looks tensors up by name for one model, with its naming prefix.
pub struct Loader<'a> {
    pub files: &'a ModelFiles,
}

impl<'a> Loader<'a> {
    pub fn new(files: &'a ModelFiles) -> Loader<'a> {
        Loader { files }
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.files.container, Container::Gguf { .. })
    }

    pub fn entry(&self, name: &str) -> Result<&'a TensorEntry, WeightError> {
        self.files
            .tensor(name)
            .ok_or_else(|| WeightError::Missing(name.to_string()))
    }

    pub fn has(&self, name: &str) -> bool {
        self.files.tensor(name).is_some()
    }

    /// A 2-D weight of shape `[rows, cols]`.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightRef, WeightError> {
        let e = self.entry(name)?;
        let expected = vec![rows as u64, cols as u64];
        if e.shape != expected {
            return Err(WeightError::Shape {
                name: name.into(),
                expected,
                found: e.shape.clone(),
            });
        }
        let w = WeightRef {
            ty: e.ty,
            rows,
            cols,
            parts: e.parts.clone(),
        };
        check_matrix(self.files, name, &w)?;
        Ok(w)
    }

    /// A `[1, cols]` weight that may be stored 1-D (`[cols]`), as llama.cpp
    /// writes the Qwen hybrids' shared-expert gate.
    pub fn row_matrix(&self, name: &str, cols: usize) -> Result<WeightRef, WeightError> {
        let e = self.entry(name)?;
        if e.shape == [cols as u64] {
            let w = WeightRef {
                ty: e.ty,
                rows: 1,
                cols,
                parts: e.parts.clone(),
            };
            check_matrix(self.files, name, &w)?;
            return Ok(w);
        }
        self.matrix(name, 1, cols)
    }

    /// Expert `index` of a stacked `[n, rows, cols]` tensor.
    pub fn stacked_matrix(
        &self,
        name: &str,
        index: usize,
        n: usize,
        rows: usize,
        cols: usize,
    ) -> Result<WeightRef, WeightError> {
        let e = self.entry(name)?;
        let expected = vec![n as u64, rows as u64, cols as u64];
        if e.shape != expected {
            return Err(WeightError::Shape {
                name: name.into(),
                expected,
                found: e.shape.clone(),
            });
        }
        let parts = e
            .outer_slice(index as u64)
            .ok_or_else(|| WeightError::Unsupported {
                name: name.into(),
                message: "its parts do not split evenly by expert".into(),
            })?;
        let w = WeightRef {
            ty: e.ty,
            rows,
            cols,
            parts,
        };
        check_matrix(self.files, name, &w)?;
        Ok(w)
    }

    /// Rows `row0..row0 + rows` of expert `index` of a stacked
    /// `[n, total_rows, cols]` tensor (one half of a fused gate/up tensor).
    #[allow(clippy::too_many_arguments)]
    pub fn stacked_rows(
        &self,
        name: &str,
        index: usize,
        n: usize,
        total_rows: usize,
        cols: usize,
        row0: usize,
        rows: usize,
    ) -> Result<WeightRef, WeightError> {
        let whole = self.stacked_matrix(name, index, n, total_rows, cols)?;
        let uneven = || WeightError::Unsupported {
            name: name.into(),
            message: "its parts do not split evenly by row".into(),
        };
        if row0 + rows > total_rows {
            return Err(uneven());
        }
        let parts = whole
            .parts
            .iter()
            .map(|p| {
                let t = total_rows as u64;
                (p.len % t == 0)
                    .then(|| {
                        let stride = p.len / t;
                        Span {
                            file: p.file,
                            offset: p.offset + row0 as u64 * stride,
                            len: rows as u64 * stride,
                        }
                    })
                    .ok_or_else(uneven)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let w = WeightRef {
            ty: whole.ty,
            rows,
            cols,
            parts,
        };
        check_matrix(self.files, name, &w)?;
        Ok(w)
    }

    /// A 1-D tensor of `len` values, decoded to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, WeightError> {
        let e = self.entry(name)?;
        if e.shape.len() > 2 {
            return Err(WeightError::Shape {
                name: name.into(),
                expected: vec![len as u64],
                found: e.shape.clone(),
            });
        }
        self.values(name, len)
    }

    /// A tensor of any shape holding `len` values (a conv kernel stored as
    /// `[C, 1, K]` or `[C, K, 1]`), decoded to f32 in storage order.
    pub fn values(&self, name: &str, len: usize) -> Result<Vec<f32>, WeightError> {
        let e = self.entry(name)?;
        if e.n_elements() != len as u64 {
            return Err(WeightError::Shape {
                name: name.into(),
                expected: vec![len as u64],
                found: e.shape.clone(),
            });
        }
        let mut out = vec![0f32; len];
        match e.ty {
            TensorType::Ggml(t) => {
                dequantize(t, self.files.bytes(&e.parts[0]), &mut out).map_err(|err| {
                    WeightError::Unsupported {
                        name: name.into(),
                        message: err.to_string(),
                    }
                })?
            }
            other => {
                return Err(WeightError::Unsupported {
                    name: name.into(),
                    message: format!("a 1-D tensor of type {other} cannot be read"),
                })
            }
        }
        Ok(out)
    }
}

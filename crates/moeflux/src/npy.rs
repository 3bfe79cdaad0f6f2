//! Reading and writing numpy `.npy` arrays (format versions 1–3).
//!
//! Reference outputs (from transformers, llama.cpp and gguf-py) are stored as
//! `.npy` files, and `moeflux logits` writes one, so any tool can diff
//! moeflux against another engine. Only little-endian, C-ordered arrays of
//! plain numeric types are supported.

use std::io::Write;
use std::path::Path;

/// Element types moeflux reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    U8,
    I8,
    U16,
    I16,
    F16,
    U32,
    I32,
    F32,
    U64,
    I64,
    F64,
}

impl NpyDtype {
    fn descr(self) -> &'static str {
        match self {
            NpyDtype::U8 => "|u1",
            NpyDtype::I8 => "|i1",
            NpyDtype::U16 => "<u2",
            NpyDtype::I16 => "<i2",
            NpyDtype::F16 => "<f2",
            NpyDtype::U32 => "<u4",
            NpyDtype::I32 => "<i4",
            NpyDtype::F32 => "<f4",
            NpyDtype::U64 => "<u8",
            NpyDtype::I64 => "<i8",
            NpyDtype::F64 => "<f8",
        }
    }

    fn from_descr(d: &str) -> Option<NpyDtype> {
        Some(match d {
            "|u1" | "<u1" => NpyDtype::U8,
            "|i1" | "<i1" => NpyDtype::I8,
            "<u2" => NpyDtype::U16,
            "<i2" => NpyDtype::I16,
            "<f2" => NpyDtype::F16,
            "<u4" => NpyDtype::U32,
            "<i4" => NpyDtype::I32,
            "<f4" => NpyDtype::F32,
            "<u8" => NpyDtype::U64,
            "<i8" => NpyDtype::I64,
            "<f8" => NpyDtype::F64,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            NpyDtype::U8 | NpyDtype::I8 => 1,
            NpyDtype::U16 | NpyDtype::I16 | NpyDtype::F16 => 2,
            NpyDtype::U32 | NpyDtype::I32 | NpyDtype::F32 => 4,
            NpyDtype::U64 | NpyDtype::I64 | NpyDtype::F64 => 8,
        }
    }
}

/// An array read from a `.npy` file: raw little-endian bytes plus shape.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub dtype: NpyDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a .npy array: {0}")]
    Format(String),
    #[error("array has dtype {found:?}, expected {expected:?}")]
    Dtype { found: NpyDtype, expected: NpyDtype },
}

impl NpyArray {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn expect(&self, dtype: NpyDtype) -> Result<(), NpyError> {
        if self.dtype != dtype {
            return Err(NpyError::Dtype {
                found: self.dtype,
                expected: dtype,
            });
        }
        Ok(())
    }

    pub fn to_f32(&self) -> Result<Vec<f32>, NpyError> {
        self.expect(NpyDtype::F32)?;
        Ok(self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Integer arrays of any width, widened to `i64`.
    pub fn to_i64(&self) -> Result<Vec<i64>, NpyError> {
        let d = &self.data;
        Ok(match self.dtype {
            NpyDtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            NpyDtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            NpyDtype::U32 => d
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            NpyDtype::U8 => d.iter().map(|&b| b as i64).collect(),
            other => {
                return Err(NpyError::Dtype {
                    found: other,
                    expected: NpyDtype::I64,
                })
            }
        })
    }

    /// Parses the bytes of a `.npy` file.
    pub fn parse(bytes: &[u8]) -> Result<NpyArray, NpyError> {
        let bad = |m: &str| NpyError::Format(m.to_string());
        if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
            return Err(bad("missing \\x93NUMPY magic"));
        }
        let (header_len, start): (usize, usize) = match bytes[6] {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
            2 | 3 => {
                if bytes.len() < 12 {
                    return Err(bad("truncated header"));
                }
                (
                    u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                    12,
                )
            }
            v => return Err(NpyError::Format(format!("unsupported version {v}"))),
        };
        let header = bytes
            .get(start..start.saturating_add(header_len))
            .ok_or_else(|| bad("truncated header"))?;
        let header = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
        let field = |name: &str| -> Result<&str, NpyError> {
            let key = format!("'{name}':");
            let at = header
                .find(&key)
                .ok_or_else(|| NpyError::Format(format!("no {name} in header")))?;
            Ok(header[at + key.len()..].trim_start())
        };
        let descr = field("descr")?;
        let descr = descr
            .strip_prefix('\'')
            .and_then(|d| d.split('\'').next())
            .ok_or_else(|| bad("bad descr"))?;
        let dtype = NpyDtype::from_descr(descr)
            .ok_or_else(|| NpyError::Format(format!("unsupported dtype {descr}")))?;
        if field("fortran_order")?.starts_with("True") {
            return Err(bad("Fortran-ordered arrays are not supported"));
        }
        let shape_text = field("shape")?;
        let shape_text = shape_text
            .strip_prefix('(')
            .and_then(|s| s.split(')').next())
            .ok_or_else(|| bad("bad shape"))?;
        let shape = shape_text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>().map_err(|_| bad("bad shape")))
            .collect::<Result<Vec<_>, _>>()?;
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| bad("shape overflows"))?;
        let data = bytes
            .get(start + header_len..)
            .filter(|d| d.len() == n)
            .ok_or_else(|| NpyError::Format(format!("expected {n} data bytes")))?;
        Ok(NpyArray {
            dtype,
            shape,
            data: data.to_vec(),
        })
    }

    pub fn read(path: &Path) -> Result<NpyArray, NpyError> {
        let bytes = std::fs::read(path).map_err(|source| NpyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&bytes)
    }
}

/// Serializes an array in `.npy` version 1.0 format.
pub fn encode(dtype: NpyDtype, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape_text = match shape {
        [one] => format!("({one},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_text}, }}",
        dtype.descr()
    );
    // Pad so the data starts on a 64-byte boundary, ending with a newline.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat(total.div_ceil(64) * 64 - total));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Writes an `f32` array.
pub fn write_f32(path: &Path, shape: &[usize], values: &[f32]) -> std::io::Result<()> {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut f = std::fs::File::create(path)?;
    f.write_all(&encode(NpyDtype::F32, shape, &data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let vals = [1.0f32, -2.5, 3.25, 0.0, 7.0, 8.0];
        let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = encode(NpyDtype::F32, &[2, 3], &data);
        assert_eq!((bytes.len() - data.len()) % 64, 0);
        let a = NpyArray::parse(&bytes).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.to_f32().unwrap(), vals);
        let one = NpyArray::parse(&encode(NpyDtype::U8, &[3], &[1, 2, 3])).unwrap();
        assert_eq!(one.shape, vec![3]);
        assert!(NpyArray::parse(&bytes[..bytes.len() - 1]).is_err());
    }
}

//! Parsing a GGUF header from the bytes of a whole file.

use std::collections::HashSet;

use super::metadata::{MetaArray, MetaType, MetaValue, Metadata, StringArray};
use super::{GgufError, DEFAULT_ALIGNMENT, MAX_DIMS};
use crate::quant::GgmlType;

/// How deep arrays of arrays may nest. Real files nest at most once; the
/// bound keeps a hostile file from exhausting the stack.
const MAX_ARRAY_NESTING: usize = 8;

/// One tensor's entry in the header, resolved against the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub ty: GgmlType,
    /// Outermost dimension first (numpy order; ggml's `ne` reversed).
    pub shape: Vec<u64>,
    /// Absolute byte offset of the tensor's data in its file.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

impl GgufTensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A parsed GGUF header.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    pub alignment: u64,
    pub metadata: Metadata,
    /// In file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n,
                file_len: self.buf.len() as u64,
            });
        }
        let start = self.pos;
        // n <= remaining <= usize::MAX, so the cast is lossless.
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A `u64` count of items of at least `min_size` bytes each, checked
    /// against the bytes left so that it can size an allocation.
    fn count(&mut self, min_size: u64, what: impl Fn() -> String) -> Result<u64, GgufError> {
        let offset = self.pos as u64;
        let count = self.u64(&what)?;
        let remaining = self.remaining();
        if count
            .checked_mul(min_size)
            .is_none_or(|need| need > remaining)
        {
            return Err(GgufError::CountExceedsFile {
                what: what(),
                count,
                offset,
                remaining,
            });
        }
        Ok(count)
    }

    fn string(&mut self, what: impl Fn() -> String) -> Result<String, GgufError> {
        let len = self.count(1, &what)?;
        let bytes = self.take(len, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
}

fn read_value(
    cur: &mut Cursor<'_>,
    key: &str,
    ty: MetaType,
    depth: usize,
) -> Result<MetaValue, GgufError> {
    let what = || format!("value of {key:?}");
    Ok(match ty {
        MetaType::U8 => MetaValue::U8(cur.array::<1>(what)?[0]),
        MetaType::I8 => MetaValue::I8(cur.array::<1>(what)?[0] as i8),
        MetaType::U16 => MetaValue::U16(u16::from_le_bytes(cur.array(what)?)),
        MetaType::I16 => MetaValue::I16(i16::from_le_bytes(cur.array(what)?)),
        MetaType::U32 => MetaValue::U32(u32::from_le_bytes(cur.array(what)?)),
        MetaType::I32 => MetaValue::I32(i32::from_le_bytes(cur.array(what)?)),
        MetaType::F32 => MetaValue::F32(f32::from_le_bytes(cur.array(what)?)),
        MetaType::Bool => MetaValue::Bool(cur.array::<1>(what)?[0] != 0),
        MetaType::String => MetaValue::String(cur.string(what)?),
        MetaType::U64 => MetaValue::U64(u64::from_le_bytes(cur.array(what)?)),
        MetaType::I64 => MetaValue::I64(i64::from_le_bytes(cur.array(what)?)),
        MetaType::F64 => MetaValue::F64(f64::from_le_bytes(cur.array(what)?)),
        MetaType::Array => MetaValue::Array(read_array(cur, key, depth)?),
    })
}

/// Reads a fixed-size element array: `count` values decoded by `f` from
/// `N` bytes each. The count was checked against the bytes left, so the
/// allocation is bounded by the file size.
fn fixed<T, const N: usize>(
    cur: &mut Cursor<'_>,
    count: u64,
    key: &str,
    f: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, GgufError> {
    let bytes = cur.take(count * N as u64, || format!("array {key:?}"))?;
    Ok(bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect())
}

fn read_array(cur: &mut Cursor<'_>, key: &str, depth: usize) -> Result<MetaArray, GgufError> {
    if depth >= MAX_ARRAY_NESTING {
        return Err(GgufError::NestingTooDeep {
            key: key.to_string(),
            max: MAX_ARRAY_NESTING,
        });
    }
    let type_id = cur.u32(|| format!("element type of {key:?}"))?;
    let elem = MetaType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
        key: key.to_string(),
        type_id,
    })?;
    let count = cur.count(elem.min_encoded_size(), || format!("array {key:?}"))?;
    Ok(match elem {
        MetaType::U8 => MetaArray::U8(fixed(cur, count, key, |[b]: [u8; 1]| b)?),
        MetaType::I8 => MetaArray::I8(fixed(cur, count, key, |[b]: [u8; 1]| b as i8)?),
        MetaType::Bool => MetaArray::Bool(fixed(cur, count, key, |[b]: [u8; 1]| b != 0)?),
        MetaType::U16 => MetaArray::U16(fixed(cur, count, key, u16::from_le_bytes)?),
        MetaType::I16 => MetaArray::I16(fixed(cur, count, key, i16::from_le_bytes)?),
        MetaType::U32 => MetaArray::U32(fixed(cur, count, key, u32::from_le_bytes)?),
        MetaType::I32 => MetaArray::I32(fixed(cur, count, key, i32::from_le_bytes)?),
        MetaType::F32 => MetaArray::F32(fixed(cur, count, key, f32::from_le_bytes)?),
        MetaType::U64 => MetaArray::U64(fixed(cur, count, key, u64::from_le_bytes)?),
        MetaType::I64 => MetaArray::I64(fixed(cur, count, key, i64::from_le_bytes)?),
        MetaType::F64 => MetaArray::F64(fixed(cur, count, key, f64::from_le_bytes)?),
        MetaType::String => {
            // Two passes: sum the lengths first (each checked against the
            // file), so the text buffer is allocated once at its exact size.
            let start = cur.pos;
            let mut total = 0u64;
            for _ in 0..count {
                let len = cur.count(1, || format!("string in array {key:?}"))?;
                cur.take(len, || format!("string in array {key:?}"))?;
                total += len;
            }
            cur.pos = start;
            let mut strings = StringArray::with_capacity(count as usize, total as usize);
            for _ in 0..count {
                let len = cur.u64(|| format!("string in array {key:?}"))?;
                let bytes = cur.take(len, || format!("string in array {key:?}"))?;
                strings.push(&String::from_utf8_lossy(bytes));
            }
            MetaArray::String(strings)
        }
        MetaType::Array => {
            let mut items = Vec::with_capacity(count as usize);
            for _ in 0..count {
                items.push(Box::new(read_array(cur, key, depth + 1)?));
            }
            MetaArray::Array(items)
        }
    })
}

/// Parses the header of a GGUF file whose complete contents are `file`, and
/// checks every tensor against the data section.
pub fn parse_header(file: &[u8]) -> Result<GgufHeader, GgufError> {
    let mut cur = Cursor { buf: file, pos: 0 };
    let magic: [u8; 4] = cur.array(|| "magic".into())?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic(magic));
    }
    let version = cur.u32(|| "version".into())?;
    match version {
        2 | 3 => {}
        v if matches!(v.swap_bytes(), 1..=3) => return Err(GgufError::BigEndian(v)),
        v => return Err(GgufError::UnsupportedVersion(v)),
    }
    // A tensor info is at least 8 (name length) + 4 (n_dims) + 4 (type) +
    // 8 (offset) bytes; a key/value at least 8 + 4 + 1.
    let n_tensors = cur.count(24, || "tensor count".into())?;
    let n_kv = cur.count(13, || "metadata count".into())?;

    let mut metadata = Metadata::default();
    for i in 0..n_kv {
        let key = cur.string(|| format!("metadata key #{i}"))?;
        let type_id = cur.u32(|| format!("type of {key:?}"))?;
        let ty = MetaType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.clone(),
            type_id,
        })?;
        let value = read_value(&mut cur, &key, ty, 0)?;
        if !metadata.insert(key.clone(), value) {
            return Err(GgufError::DuplicateKey(key));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = v.as_u64().ok_or_else(|| GgufError::WrongValueType {
                key: "general.alignment".into(),
                expected: "an unsigned integer",
                found: v.meta_type(),
            })?;
            if a == 0 || !a.is_power_of_two() {
                return Err(GgufError::BadAlignment(a));
            }
            a
        }
    };

    struct Raw {
        name: String,
        ty: GgmlType,
        shape: Vec<u64>,
        rel_offset: u64,
        size: u64,
    }
    let mut raw = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = cur.string(|| format!("tensor #{i} name"))?;
        let n_dims = cur.u32(|| format!("rank of tensor {name:?}"))?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                tensor: name,
                n_dims,
            });
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            ne.push(cur.u64(|| format!("dimension {d} of tensor {name:?}"))?);
        }
        let type_id = cur.u32(|| format!("type of tensor {name:?}"))?;
        let rel_offset = cur.u64(|| format!("offset of tensor {name:?}"))?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            tensor: name.clone(),
            type_id,
        })?;
        // ggml keeps element counts in int64_t.
        let n_elements = ne
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64);
        let Some(n_elements) = n_elements else {
            return Err(GgufError::DimensionOverflow { tensor: name, ne });
        };
        let row = ne.first().copied().unwrap_or(1);
        let block = ty.block_size();
        if row % block as u64 != 0 {
            return Err(GgufError::PartialBlock {
                tensor: name,
                ty,
                row,
                block,
            });
        }
        let size = match (n_elements / block as u64).checked_mul(ty.type_size() as u64) {
            Some(s) => s,
            None => return Err(GgufError::DimensionOverflow { tensor: name, ne }),
        };
        if rel_offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                tensor: name,
                offset: rel_offset,
                alignment,
            });
        }
        if !names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor(name));
        }
        ne.reverse();
        raw.push(Raw {
            name,
            ty,
            shape: ne,
            rel_offset,
            size,
        });
    }

    let header_end = cur.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let file_len = file.len() as u64;
    let data_len = file_len.saturating_sub(data_offset);
    if data_offset > file_len && !raw.is_empty() {
        return Err(GgufError::Truncated {
            what: "padding before tensor data".into(),
            offset: header_end,
            needed: data_offset - header_end,
            file_len,
        });
    }

    for t in &raw {
        if t.rel_offset
            .checked_add(t.size)
            .is_none_or(|end| end > data_len)
        {
            return Err(GgufError::TensorOutOfBounds {
                tensor: t.name.clone(),
                offset: t.rel_offset,
                size: t.size,
                data_len,
            });
        }
    }
    let mut order: Vec<usize> = (0..raw.len()).filter(|&i| raw[i].size > 0).collect();
    order.sort_by_key(|&i| raw[i].rel_offset);
    // Zero-sized tensors occupy nothing and cannot overlap; the others, in
    // offset order, must each end before the next begins.
    for pair in order.windows(2) {
        let (a, b) = (&raw[pair[0]], &raw[pair[1]]);
        if a.rel_offset + a.size > b.rel_offset {
            return Err(GgufError::OverlappingTensors {
                first: a.name.clone(),
                second: b.name.clone(),
            });
        }
    }

    let tensors = raw
        .into_iter()
        .map(|t| GgufTensorInfo {
            name: t.name,
            ty: t.ty,
            shape: t.shape,
            offset: data_offset + t.rel_offset,
            size: t.size,
        })
        .collect();
    Ok(GgufHeader {
        version,
        alignment,
        metadata,
        tensors,
        data_offset,
    })
}

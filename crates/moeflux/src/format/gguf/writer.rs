//! Writing GGUF files (for `moeflux synth` and for tests).

use std::io::{self, Write};

use super::metadata::{MetaArray, MetaValue};
use super::DEFAULT_ALIGNMENT;
use crate::quant::GgmlType;

/// A tensor to be written: its name, type and shape (outermost first).
#[derive(Clone, Debug)]
pub struct TensorPlan {
    pub name: String,
    pub ty: GgmlType,
    pub shape: Vec<u64>,
}

impl TensorPlan {
    /// Bytes of data, or `None` if the row is not whole blocks.
    pub fn size(&self) -> Option<u64> {
        let row = self.shape.last().copied().unwrap_or(1);
        let rows: u64 = self.shape.iter().rev().skip(1).product();
        self.ty.row_bytes(row)?.checked_mul(rows)
    }
}

/// Builds a GGUF (version 3) file: metadata and tensor list first, then the
/// tensor data, streamed in order.
#[derive(Debug)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorPlan>,
    alignment: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts bytes so a data callback can be checked to write exactly its tensor.
struct Counting<'a, W: Write + ?Sized> {
    inner: &'a mut W,
    written: u64,
}

impl<W: Write + ?Sized> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(a) => put_array(out, a),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    out.extend_from_slice(&a.elem_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    match a {
        MetaArray::U8(v) => out.extend_from_slice(v),
        MetaArray::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        MetaArray::Bool(v) => out.extend(v.iter().map(|&x| x as u8)),
        MetaArray::U16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::I16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::U32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::I32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::U64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::I64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::F64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::String(v) => v.iter().for_each(|s| put_string(out, s)),
        MetaArray::Array(v) => {
            // The element type of an array of arrays is Array; each inner
            // array carries its own type and count.
            v.iter().for_each(|inner| put_array(out, inner))
        }
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            metadata: Vec::new(),
            tensors: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
        }
    }

    /// Sets `general.alignment` (a power of two).
    pub fn set_alignment(&mut self, alignment: u64) {
        assert!(
            alignment.is_power_of_two(),
            "alignment must be a power of two"
        );
        self.alignment = alignment;
        self.add("general.alignment", MetaValue::U32(alignment as u32));
    }

    /// Adds a metadata key (later values of the same key replace earlier ones).
    pub fn add(&mut self, key: impl Into<String>, value: MetaValue) {
        let key = key.into();
        if let Some(slot) = self.metadata.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            self.metadata.push((key, value));
        }
    }

    /// Adds a tensor; its data is supplied to [`GgufWriter::write`] in the
    /// order tensors were added.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        shape: &[u64],
    ) -> io::Result<()> {
        let plan = TensorPlan {
            name: name.into(),
            ty,
            shape: shape.to_vec(),
        };
        if plan.size().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "tensor {}: shape {:?} is not whole {} blocks",
                    plan.name, plan.shape, ty
                ),
            ));
        }
        self.tensors.push(plan);
        Ok(())
    }

    pub fn tensors(&self) -> &[TensorPlan] {
        &self.tensors
    }

    fn pad(&self, n: u64) -> u64 {
        n.div_ceil(self.alignment) * self.alignment - n
    }

    /// The serialized header, padded to the alignment.
    pub fn header_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&v.meta_type().id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            let size = t.size().unwrap_or(0);
            offset += size + self.pad(size);
        }
        let pad = self.pad(out.len() as u64);
        out.resize(out.len() + pad as usize, 0);
        out
    }

    /// Total file size once written.
    pub fn file_size(&self) -> u64 {
        let data: u64 = self
            .tensors
            .iter()
            .map(|t| {
                let s = t.size().unwrap_or(0);
                s + self.pad(s)
            })
            .sum();
        self.header_bytes().len() as u64 + data
    }

    /// Writes the file. `fill(i, tensor, w)` must write exactly the bytes of
    /// tensor `i`; padding between tensors is added here.
    pub fn write<W: Write + ?Sized>(
        &self,
        w: &mut W,
        mut fill: impl FnMut(usize, &TensorPlan, &mut dyn Write) -> io::Result<()>,
    ) -> io::Result<()> {
        w.write_all(&self.header_bytes())?;
        let zeros = vec![0u8; self.alignment as usize];
        for (i, t) in self.tensors.iter().enumerate() {
            let size = t.size().unwrap_or(0);
            let mut c = Counting {
                inner: w,
                written: 0,
            };
            fill(i, t, &mut c)?;
            if c.written != size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "tensor {}: wrote {} bytes, expected {}",
                        t.name, c.written, size
                    ),
                ));
            }
            w.write_all(&zeros[..self.pad(size) as usize])?;
        }
        Ok(())
    }
}

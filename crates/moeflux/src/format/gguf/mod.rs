//! GGUF: the single-file (or split) container llama.cpp defines.
//!
//! Layout (all little-endian):
//! ```text
//! "GGUF" u32:version u64:n_tensors u64:n_kv
//! n_kv × (string:key u32:type value)
//! n_tensors × (string:name u32:n_dims u64[n_dims]:ne u32:ggml_type u64:offset)
//! padding to general.alignment (default 32)
//! tensor data; each tensor at data_offset + offset
//! ```
//! A string is `u64:len` + bytes; an array `u32:elem_type u64:count` + items.
//! ggml lists dimensions innermost first (`ne[0]` is the row length); moeflux
//! stores shapes outermost first, like numpy, so `ne {cols, rows}` becomes
//! `[rows, cols]`.
//!
//! Parsing works on the whole file as a byte slice (a memory map), so every
//! read is bounds-checked against the real file length, and no count read
//! from the header is used to allocate before it has been checked against
//! the bytes that remain.

mod metadata;
mod reader;
mod writer;

pub use metadata::{MetaArray, MetaType, MetaValue, Metadata, StringArray};
pub use reader::{parse_header, GgufHeader, GgufTensorInfo};
pub use writer::{GgufWriter, TensorPlan};

use std::path::PathBuf;

use crate::quant::GgmlType;

/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml's limit on tensor rank.
pub const MAX_DIMS: u32 = 4;

/// Everything that can be wrong with a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file: magic bytes are {0:02x?}, expected \"GGUF\"")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} is not supported (supported: 2, 3); re-convert the model with a current llama.cpp")]
    UnsupportedVersion(u32),
    #[error("this GGUF file is big-endian (version field reads {0:#x}); only little-endian files are supported")]
    BigEndian(u32),
    #[error("file is truncated: reading {what} at byte {offset} needs {needed} bytes, but the file has {file_len}")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    #[error("{what} claims {count} entries at byte {offset}, more than the {remaining} bytes left in the file could hold")]
    CountExceedsFile {
        what: String,
        count: u64,
        offset: u64,
        remaining: u64,
    },
    #[error("metadata key {key:?} has unknown value type {type_id}")]
    UnknownValueType { key: String, type_id: u32 },
    #[error("metadata key {key:?} nests arrays deeper than {max} levels")]
    NestingTooDeep { key: String, max: usize },
    #[error("metadata key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("metadata key {key:?} should be {expected}, found {found:?}")]
    WrongValueType {
        key: String,
        expected: &'static str,
        found: MetaType,
    },
    #[error("general.alignment = {0} is not a power of two")]
    BadAlignment(u64),
    #[error("tensor {tensor:?} has unknown ggml type id {type_id} (this moeflux knows ids 0..=41; the file may need a newer version)")]
    UnknownTensorType { tensor: String, type_id: u32 },
    #[error("tensor {tensor:?} has {n_dims} dimensions; ggml allows at most {MAX_DIMS}")]
    TooManyDims { tensor: String, n_dims: u32 },
    #[error("tensor {tensor:?}: dimensions {ne:?} overflow")]
    DimensionOverflow { tensor: String, ne: Vec<u64> },
    #[error(
        "tensor {tensor:?}: row length {row} is not a multiple of the {ty} block size {block}"
    )]
    PartialBlock {
        tensor: String,
        ty: GgmlType,
        row: u64,
        block: usize,
    },
    #[error("tensor {0:?} appears twice")]
    DuplicateTensor(String),
    #[error("tensor {tensor:?} starts at data offset {offset}, which is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor {tensor:?} ({size} bytes at data offset {offset}) extends past the end of the data section ({data_len} bytes)")]
    TensorOutOfBounds {
        tensor: String,
        offset: u64,
        size: u64,
        data_len: u64,
    },
    #[error("tensors {first:?} and {second:?} overlap")]
    OverlappingTensors { first: String, second: String },
    #[error("split GGUF: {0}")]
    Split(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

//! Model containers: GGUF files and safetensors checkpoints, behind one view.
//!
//! [`ModelFiles::open`] accepts a GGUF file (or the first shard of a split
//! GGUF), a Hugging Face / MLX checkpoint directory, or a single
//! `.safetensors` file, and presents every tensor as a [`TensorEntry`]: a
//! name, a [`TensorType`], a logical shape and the byte [`Span`]s that hold
//! it. Dense tensors are read zero-copy from a memory map
//! ([`ModelFiles::bytes`]); routed experts are located as spans
//! ([`TensorEntry::outer_slice`]) and read with positioned I/O by the
//! expert store, never through the map.

pub mod gguf;
pub mod safetensors;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

pub use self::safetensors::SafetensorsError;
use crate::quant::TensorType;
use gguf::{GgufError, GgufHeader, Metadata};

/// Any failure to open or understand a model's files.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a model: expected a .gguf file, a .safetensors file, or a directory with config.json and *.safetensors")]
    NotAModel(PathBuf),
}

/// A contiguous byte range of one of a model's files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span {
    /// Index into [`ModelFiles::files`].
    pub file: u32,
    /// Absolute offset in that file.
    pub offset: u64,
    pub len: u64,
}

/// One logical tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub ty: TensorType,
    /// Logical shape, outermost first (for MLX: the unpacked `[.., out, in]`).
    pub shape: Vec<u64>,
    /// Where the bytes are: one span for GGUF and plain safetensors; for MLX
    /// `[weight, scales, biases]`.
    pub parts: Vec<Span>,
}

impl TensorEntry {
    /// Bytes of storage, all parts together.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.len).sum()
    }

    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The spans of entry `index` along the outermost dimension: for a
    /// stacked `[n_expert, rows, cols]` tensor, one expert's rows. `None` if
    /// the index is out of range or a part does not divide evenly.
    pub fn outer_slice(&self, index: u64) -> Option<Vec<Span>> {
        let &n = self.shape.first()?;
        if index >= n || self.shape.len() < 2 {
            return None;
        }
        self.parts
            .iter()
            .map(|p| {
                (p.len % n == 0).then(|| {
                    let stride = p.len / n;
                    Span {
                        file: p.file,
                        offset: p.offset + index * stride,
                        len: stride,
                    }
                })
            })
            .collect()
    }
}

/// A read-only memory map of one model file.
pub struct MappedFile {
    pub path: PathBuf,
    file: File,
    map: Mmap,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<MappedFile, FormatError> {
        let io = |source| FormatError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and lives as long as `self`. Model
        // files must not be modified or truncated while moeflux has them
        // open (the same contract llama.cpp has); if they are, reads through
        // the map may fault. That is the one risk mmap carries and the reason
        // expert streaming uses positioned reads instead.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Ok(MappedFile {
            path: path.to_path_buf(),
            file,
            map,
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The open file, for positioned reads.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Which container a model came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Container {
    Gguf { version: u32, alignment: u64 },
    Safetensors { mlx: bool },
}

/// The model-level description that came with the weights.
#[derive(Clone, Debug)]
pub enum ModelMetadata {
    /// GGUF key/values (of the first shard).
    Gguf(Metadata),
    /// A checkpoint's `config.json`.
    Hf(Value),
}

/// All files of one model and the tensors in them.
pub struct ModelFiles {
    /// The path the user gave.
    pub path: PathBuf,
    pub container: Container,
    pub files: Vec<MappedFile>,
    pub tensors: Vec<TensorEntry>,
    pub metadata: ModelMetadata,
    by_name: HashMap<String, usize>,
    resident: Resident,
}

/// Byte ranges of the model files copied into memory (the dense weights),
/// so they stay resident whatever the page cache does.
#[derive(Default)]
struct Resident {
    /// `(file, start, end, at)`, sorted: file bytes `start..end` are at
    /// `data[at..]`.
    ranges: Vec<(u32, u64, u64, usize)>,
    data: Vec<u8>,
    /// Spans whose copy in `data` has rows interleaved by eight, sorted.
    interleaved: Vec<Span>,
}

impl ModelFiles {
    /// Opens a model: a GGUF file (the first shard of a split one), a
    /// checkpoint directory, or a `.safetensors` file.
    pub fn open(path: &Path) -> Result<ModelFiles, FormatError> {
        if path.is_dir() {
            let ck = safetensors::open(path)?;
            return Ok(Self::new(
                path,
                Container::Safetensors { mlx: ck.mlx },
                ck.files,
                ck.tensors,
                ModelMetadata::Hf(ck.config),
            ));
        }
        if !path.exists() {
            return Err(FormatError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        let first = MappedFile::open(path)?;
        if first.bytes().starts_with(b"GGUF") {
            return open_gguf(path, first);
        }
        if path.extension().is_some_and(|e| e == "safetensors") {
            drop(first);
            let ck = safetensors::open(path)?;
            return Ok(Self::new(
                path,
                Container::Safetensors { mlx: ck.mlx },
                ck.files,
                ck.tensors,
                ModelMetadata::Hf(ck.config),
            ));
        }
        if path.extension().is_some_and(|e| e == "gguf") {
            // Let the GGUF parser name what is wrong with the magic.
            gguf::parse_header(first.bytes())?;
        }
        Err(FormatError::NotAModel(path.to_path_buf()))
    }

    fn new(
        path: &Path,
        container: Container,
        files: Vec<MappedFile>,
        tensors: Vec<TensorEntry>,
        metadata: ModelMetadata,
    ) -> ModelFiles {
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        ModelFiles {
            path: path.to_path_buf(),
            container,
            files,
            tensors,
            metadata,
            by_name,
            resident: Resident::default(),
        }
    }

    /// Copies the bytes of `spans` into memory (merging neighbours) with
    /// positioned reads; [`ModelFiles::bytes`] serves them from there
    /// afterwards. `progress(done, total)` is called as bytes are read.
    pub fn make_resident(
        &mut self,
        spans: &[Span],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, FormatError> {
        let mut sorted: Vec<Span> = spans.iter().filter(|s| s.len > 0).copied().collect();
        sorted.sort_by_key(|s| (s.file, s.offset));
        let mut merged: Vec<(u32, u64, u64)> = Vec::new();
        for s in sorted {
            match merged.last_mut() {
                Some((f, _, end)) if *f == s.file && s.offset <= *end => {
                    *end = (*end).max(s.offset + s.len)
                }
                _ => merged.push((s.file, s.offset, s.offset + s.len)),
            }
        }
        let total: u64 = merged.iter().map(|(_, a, b)| b - a).sum();
        let mut data = Vec::new();
        data.try_reserve_exact(total as usize)
            .map_err(|_| FormatError::Io {
                path: self.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::OutOfMemory,
                    format!("cannot allocate {total} bytes for the dense weights"),
                ),
            })?;
        crate::huge_pages::advise(data.as_mut_ptr(), data.capacity());
        let mut ranges = Vec::with_capacity(merged.len());
        for (file, start, end) in merged {
            let at = data.len();
            let f = &self.files[file as usize];
            data.resize(at + (end - start) as usize, 0);
            let mut done = 0usize;
            // Read in pieces so the progress callback moves.
            while done < (end - start) as usize {
                let piece = ((end - start) as usize - done).min(64 << 20);
                read_exact_at(
                    f.file(),
                    &mut data[at + done..at + done + piece],
                    start + done as u64,
                )
                .map_err(|source| FormatError::Io {
                    path: f.path.clone(),
                    source,
                })?;
                done += piece;
                progress(
                    data.len() as u64 - ((end - start) as usize - done) as u64,
                    total,
                );
            }
            ranges.push((file, start, end, at));
        }
        self.resident = Resident {
            ranges,
            data,
            interleaved: Vec::new(),
        };
        Ok(total)
    }

    /// Bytes held in memory by [`ModelFiles::make_resident`].
    pub fn resident_bytes(&self) -> u64 {
        self.resident.data.len() as u64
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a span, zero-copy from the memory map.
    ///
    /// Spans come from this model's own tensor entries, which were checked
    /// against the file sizes when the files were opened.
    pub fn bytes(&self, span: &Span) -> &[u8] {
        if let Some(from) = self.resident_at(span) {
            return &self.resident.data[from..from + span.len as usize];
        }
        let start = span.offset as usize;
        &self.files[span.file as usize].bytes()[start..start + span.len as usize]
    }

    /// The resident copy of a span, for rewriting in place (None when the
    /// span is not resident: the memory map is read-only).
    pub fn resident_mut(&mut self, span: &Span) -> Option<&mut [u8]> {
        let r = &self.resident.ranges;
        let i = r.partition_point(|&(f, start, _, _)| (f, start) <= (span.file, span.offset));
        let (f, start, end, at) = *r.get(i.checked_sub(1)?)?;
        if f != span.file || span.offset < start || span.offset + span.len > end {
            return None;
        }
        let from = at + (span.offset - start) as usize;
        self.resident.data.get_mut(from..from + span.len as usize)
    }

    /// Rewrites the resident copy of `span` (`ty` rows of `cols` values)
    /// with its rows interleaved by eight, and remembers it for
    /// [`ModelFiles::is_interleaved`]. False (nothing done) when the span
    /// is not resident: the memory map is read-only.
    pub fn interleave_resident(
        &mut self,
        span: &Span,
        ty: crate::quant::GgmlType,
        cols: usize,
        scratch: &mut Vec<u8>,
    ) -> bool {
        let Some(at) = self.resident_at(span) else {
            return false;
        };
        let data = &mut self.resident.data[at..at + span.len as usize];
        crate::backend::cpu::interleave::interleave(ty, cols, data, scratch);
        let i = self.resident.interleaved.partition_point(|s| s < span);
        self.resident.interleaved.insert(i, *span);
        true
    }

    /// Whether the resident copy of `span` was interleaved.
    pub fn is_interleaved(&self, span: &Span) -> bool {
        self.resident.interleaved.binary_search(span).is_ok()
    }

    /// Where a span's bytes are in the resident copy, if they are there.
    fn resident_at(&self, span: &Span) -> Option<usize> {
        let r = &self.resident.ranges;
        let i = r.partition_point(|&(f, start, _, _)| (f, start) <= (span.file, span.offset));
        let (f, start, end, at) = *r.get(i.checked_sub(1)?)?;
        (f == span.file && span.offset >= start && span.offset + span.len <= end)
            .then(|| at + (span.offset - start) as usize)
    }

    /// Total size of all files.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(MappedFile::len).sum()
    }
}

/// Reads exactly `buf.len()` bytes at `offset`.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(buf, offset)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            let n = file.seek_read(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

/// The path of shard `no` (1-based) of `count`, given the first shard's
/// path `<prefix>-00001-of-<count>.gguf` (llama.cpp's `gguf-split` naming).
fn split_shard_path(first: &Path, no: u64, count: u64) -> Option<PathBuf> {
    let name = first.file_name()?.to_str()?;
    let suffix = format!("-00001-of-{count:05}.gguf");
    let prefix = name.strip_suffix(&suffix)?;
    Some(first.with_file_name(format!("{prefix}-{no:05}-of-{count:05}.gguf")))
}

fn open_gguf(path: &Path, first: MappedFile) -> Result<ModelFiles, FormatError> {
    let header = gguf::parse_header(first.bytes())?;
    let count = header.metadata.get_u64("split.count").unwrap_or(1);
    let mut files = vec![first];
    let mut headers = vec![header];
    if count > 1 {
        if headers[0].metadata.get_u64("split.no").unwrap_or(0) != 0 {
            return Err(GgufError::Split(format!(
                "{} is not the first shard (split.no = {}); pass the file ending in -00001-of-{count:05}.gguf",
                path.display(),
                headers[0].metadata.get_u64("split.no").unwrap_or(0)
            ))
            .into());
        }
        if count > 10_000 {
            return Err(GgufError::Split(format!("split.count = {count} is not plausible")).into());
        }
        for no in 1..count {
            let shard = split_shard_path(path, no + 1, count).ok_or_else(|| {
                GgufError::Split(format!(
                    "{} has split.count = {count}, but its name does not end in -00001-of-{count:05}.gguf, so the other shards cannot be found",
                    path.display()
                ))
            })?;
            if !shard.is_file() {
                return Err(
                    GgufError::Split(format!("shard {} is missing", shard.display())).into(),
                );
            }
            let f = MappedFile::open(&shard)?;
            let h = gguf::parse_header(f.bytes())?;
            if h.metadata.get_u64("split.no") != Some(no)
                || h.metadata.get_u64("split.count") != Some(count)
            {
                return Err(GgufError::Split(format!(
                    "{} does not say it is shard {} of {count}",
                    shard.display(),
                    no + 1
                ))
                .into());
            }
            files.push(f);
            headers.push(h);
        }
    }
    let mut tensors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, h) in headers.iter().enumerate() {
        for t in &h.tensors {
            if !seen.insert(t.name.clone()) {
                return Err(GgufError::DuplicateTensor(t.name.clone()).into());
            }
            tensors.push(TensorEntry {
                name: t.name.clone(),
                ty: TensorType::Ggml(t.ty),
                shape: t.shape.clone(),
                parts: vec![Span {
                    file: i as u32,
                    offset: t.offset,
                    len: t.size,
                }],
            });
        }
    }
    if let Some(expected) = headers[0].metadata.get_u64("split.tensors.count") {
        if expected != tensors.len() as u64 {
            return Err(GgufError::Split(format!(
                "split.tensors.count = {expected}, but the shards hold {} tensors",
                tensors.len()
            ))
            .into());
        }
    }
    let GgufHeader {
        version,
        alignment,
        metadata,
        ..
    } = headers.swap_remove(0);
    Ok(ModelFiles::new(
        path,
        Container::Gguf { version, alignment },
        files,
        tensors,
        ModelMetadata::Gguf(metadata),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_follow_gguf_split() {
        let p = Path::new("/m/Qwen3-235B-Q4_K-00001-of-00003.gguf");
        assert_eq!(
            split_shard_path(p, 3, 3).unwrap(),
            Path::new("/m/Qwen3-235B-Q4_K-00003-of-00003.gguf")
        );
        assert!(split_shard_path(Path::new("/m/model.gguf"), 2, 3).is_none());
    }

    #[test]
    fn outer_slice_of_stacked_tensor() {
        let t = TensorEntry {
            name: "blk.0.ffn_up_exps.weight".into(),
            ty: TensorType::Ggml(crate::quant::GgmlType::Q8_0),
            shape: vec![4, 8, 32],
            parts: vec![Span {
                file: 0,
                offset: 1024,
                len: 4 * 8 * 34,
            }],
        };
        let s = t.outer_slice(2).unwrap();
        assert_eq!(
            s,
            vec![Span {
                file: 0,
                offset: 1024 + 2 * 272,
                len: 272
            }]
        );
        assert!(t.outer_slice(4).is_none());
    }
}

//! Hugging Face safetensors checkpoints, single-file or sharded, including
//! MLX affine-quantized ones.
//!
//! A safetensors file is `u64:header_len`, a JSON header mapping names to
//! `{dtype, shape, data_offsets}`, then the data. Offsets are relative to the
//! end of the header and are *not* aligned, which matters for direct I/O
//! (a read must cover an aligned window around the payload).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::Value;

use super::{FormatError, MappedFile, Span, TensorEntry};
use crate::quant::mlx::ScaleType;
use crate::quant::{GgmlType, MlxAffine, RawDtype, TensorType};

/// What can be wrong with a safetensors checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("{path}: invalid safetensors file: {source}")]
    Header {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("{path}: invalid config.json: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{dir}: no config.json; a Hugging Face model directory needs one")]
    MissingConfig { dir: PathBuf },
    #[error("{dir}: no *.safetensors files found")]
    NoWeights { dir: PathBuf },
    #[error("tensor {0:?} appears in more than one shard")]
    DuplicateTensor(String),
    #[error("MLX tensor {tensor:?}: {message}")]
    Mlx { tensor: String, message: String },
}

/// One tensor as a safetensors header describes it.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub len: u64,
}

/// Parses and validates the header of a safetensors file whose complete
/// contents are `file`. Tensors are returned in data order.
pub fn parse_header(file: &[u8]) -> Result<Vec<RawTensor>, safetensors::SafeTensorError> {
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(file)?;
    let base = 8 + header_len as u64;
    let infos = meta.tensors();
    let mut out: Vec<RawTensor> = meta
        .offset_keys()
        .into_iter()
        .filter_map(|name| {
            let info = infos.get(&name)?;
            let (start, end) = info.data_offsets;
            Some(RawTensor {
                dtype: info.dtype,
                shape: info.shape.iter().map(|&d| d as u64).collect(),
                offset: base + start as u64,
                len: (end - start) as u64,
                name,
            })
        })
        .collect();
    out.sort_by_key(|t| t.offset);
    Ok(out)
}

/// Maps a plain (unquantized) safetensors dtype onto a tensor type.
fn plain_type(d: Dtype) -> TensorType {
    match d {
        Dtype::F32 => TensorType::Ggml(GgmlType::F32),
        Dtype::F16 => TensorType::Ggml(GgmlType::F16),
        Dtype::BF16 => TensorType::Ggml(GgmlType::BF16),
        Dtype::F64 => TensorType::Ggml(GgmlType::F64),
        Dtype::I8 => TensorType::Ggml(GgmlType::I8),
        Dtype::I16 => TensorType::Ggml(GgmlType::I16),
        Dtype::I32 => TensorType::Ggml(GgmlType::I32),
        Dtype::I64 => TensorType::Ggml(GgmlType::I64),
        Dtype::BOOL => TensorType::Raw(RawDtype::Bool),
        Dtype::U8 => TensorType::Raw(RawDtype::U8),
        Dtype::U16 => TensorType::Raw(RawDtype::U16),
        Dtype::U32 => TensorType::Raw(RawDtype::U32),
        Dtype::U64 => TensorType::Raw(RawDtype::U64),
        Dtype::F8_E4M3 => TensorType::Raw(RawDtype::F8_E4M3),
        Dtype::F8_E5M2 => TensorType::Raw(RawDtype::F8_E5M2),
        Dtype::F8_E8M0 => TensorType::Raw(RawDtype::F8_E8M0),
        Dtype::F4 => TensorType::Raw(RawDtype::F4),
        Dtype::F6_E2M3 => TensorType::Raw(RawDtype::F6_E2M3),
        Dtype::F6_E3M2 => TensorType::Raw(RawDtype::F6_E3M2),
        Dtype::C64 => TensorType::Raw(RawDtype::C64),
        _ => TensorType::Raw(RawDtype::Unknown),
    }
}

fn read_json(path: &Path) -> Result<Value, FormatError> {
    let text = std::fs::read_to_string(path).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| {
        SafetensorsError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
        .into()
    })
}

/// The shard files of a checkpoint directory, in a stable order.
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>, FormatError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let index = read_json(&index_path)?;
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| SafetensorsError::Index {
                path: index_path.clone(),
                message: "no \"weight_map\" object".into(),
            })?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| SafetensorsError::Index {
                path: index_path.clone(),
                message: format!("weight_map entry for {tensor:?} is not a file name"),
            })?;
            // Shards live next to the index; refuse anything that would
            // escape the directory.
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(SafetensorsError::Index {
                    path: index_path.clone(),
                    message: format!("shard name {file:?} is not a plain file name"),
                }
                .into());
            }
            files.insert(file.to_string());
        }
        let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.is_file() {
                return Err(SafetensorsError::Index {
                    path: index_path.clone(),
                    message: format!("shard {} is missing", p.display()),
                }
                .into());
            }
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| FormatError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(SafetensorsError::NoWeights {
            dir: dir.to_path_buf(),
        }
        .into());
    }
    Ok(paths)
}

/// A Hugging Face / MLX checkpoint: its config and every tensor.
pub struct Checkpoint {
    pub config: Value,
    pub files: Vec<MappedFile>,
    pub tensors: Vec<TensorEntry>,
    /// Whether any tensor is MLX affine-quantized.
    pub mlx: bool,
}

/// Opens a checkpoint directory, or a single `.safetensors` file (whose
/// directory must still hold `config.json`).
pub fn open(path: &Path) -> Result<Checkpoint, FormatError> {
    let (dir, paths) = if path.is_dir() {
        (path.to_path_buf(), shard_paths(path)?)
    } else {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        (dir, vec![path.to_path_buf()])
    };
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(SafetensorsError::MissingConfig { dir }.into());
    }
    let config = read_json(&config_path)?;

    let mut files = Vec::with_capacity(paths.len());
    let mut raw = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let file = MappedFile::open(p)?;
        let tensors = parse_header(file.bytes()).map_err(|source| SafetensorsError::Header {
            path: p.clone(),
            source,
        })?;
        raw.extend(tensors.into_iter().map(|t| (i as u32, t)));
        files.push(file);
    }
    let (tensors, mlx) = group_tensors(raw, &config)?;
    Ok(Checkpoint {
        config,
        files,
        tensors,
        mlx,
    })
}

/// Parses one safetensors file held in memory and groups its tensors the
/// way [`open`] does, with `config` as its `config.json`. (The entry point
/// for fuzzing and for tests that build files in memory.)
pub fn tensors_from_bytes(file: &[u8], config: &Value) -> Result<Vec<TensorEntry>, FormatError> {
    let raw = parse_header(file).map_err(|source| SafetensorsError::Header {
        path: PathBuf::from("<memory>"),
        source,
    })?;
    Ok(group_tensors(raw.into_iter().map(|t| (0, t)).collect(), config)?.0)
}

/// The MLX quantization settings in `config.json`, if any.
struct MlxConfig<'a> {
    entry: &'a serde_json::Map<String, Value>,
    bits: Option<u64>,
    group_size: Option<u64>,
}

impl<'a> MlxConfig<'a> {
    fn from_config(config: &'a Value) -> Option<Self> {
        let entry = config
            .get("quantization")
            .or_else(|| config.get("quantization_config"))?
            .as_object()?;
        Some(MlxConfig {
            entry,
            bits: entry.get("bits").and_then(Value::as_u64),
            group_size: entry.get("group_size").and_then(Value::as_u64),
        })
    }

    /// `(bits, group_size)` for the module `base` (the tensor name without
    /// `.weight`): a per-module override if present, else the global values.
    fn params_for(&self, base: &str) -> Option<(u64, u64)> {
        let over = self.entry.get(base).and_then(Value::as_object);
        let bits = over
            .and_then(|o| o.get("bits"))
            .and_then(Value::as_u64)
            .or(self.bits)?;
        let gs = over
            .and_then(|o| o.get("group_size"))
            .and_then(Value::as_u64)
            .or(self.group_size)?;
        Some((bits, gs))
    }

    fn mode(&self) -> Option<&str> {
        self.entry.get("mode").and_then(Value::as_str)
    }
}

fn mlx_err(tensor: &str, message: String) -> FormatError {
    SafetensorsError::Mlx {
        tensor: tensor.to_string(),
        message,
    }
    .into()
}

/// Turns raw safetensors entries into logical tensors, merging each MLX
/// `weight`/`scales`/`biases` triple into one quantized tensor.
fn group_tensors(
    raw: Vec<(u32, RawTensor)>,
    config: &Value,
) -> Result<(Vec<TensorEntry>, bool), FormatError> {
    let mut by_name: HashMap<&str, usize> = HashMap::with_capacity(raw.len());
    for (i, (_, t)) in raw.iter().enumerate() {
        if by_name.insert(t.name.as_str(), i).is_some() {
            return Err(SafetensorsError::DuplicateTensor(t.name.clone()).into());
        }
    }
    // First find the MLX triples: a u32 `X.weight` with `X.scales` and
    // `X.biases` beside it. Their scales and biases are folded into the
    // weight's entry rather than listed on their own.
    let mut triples: HashMap<usize, (usize, usize)> = HashMap::new();
    for (i, (_, t)) in raw.iter().enumerate() {
        let Some(base) = t
            .name
            .strip_suffix(".weight")
            .filter(|_| t.dtype == Dtype::U32)
        else {
            continue;
        };
        let s = by_name.get(format!("{base}.scales").as_str());
        let b = by_name.get(format!("{base}.biases").as_str());
        if let (Some(&s), Some(&b)) = (s, b) {
            triples.insert(i, (s, b));
        }
    }
    let folded: std::collections::HashSet<usize> =
        triples.values().flat_map(|&(s, b)| [s, b]).collect();

    let mlx_cfg = MlxConfig::from_config(config);
    let span = |file: u32, t: &RawTensor| Span {
        file,
        offset: t.offset,
        len: t.len,
    };
    let mut out = Vec::with_capacity(raw.len());
    for (i, (file, t)) in raw.iter().enumerate() {
        if folded.contains(&i) {
            continue;
        }
        let Some(&(si, bi)) = triples.get(&i) else {
            out.push(TensorEntry {
                name: t.name.clone(),
                ty: plain_type(t.dtype),
                shape: t.shape.clone(),
                parts: vec![span(*file, t)],
            });
            continue;
        };
        let base = &t.name[..t.name.len() - ".weight".len()];
        let cfg = mlx_cfg.as_ref().ok_or_else(|| {
            mlx_err(
                &t.name,
                "packed weight with scales and biases, but config.json has no \"quantization\" entry".into(),
            )
        })?;
        if let Some(mode) = cfg.mode().filter(|m| *m != "affine") {
            return Err(mlx_err(
                &t.name,
                format!("quantization mode {mode:?} is not supported (supported: affine)"),
            ));
        }
        let (bits, gs) = cfg.params_for(base).ok_or_else(|| {
            mlx_err(
                &t.name,
                "config.json \"quantization\" gives no bits/group_size".into(),
            )
        })?;
        let (sf, s) = &raw[si];
        let (bf, b) = &raw[bi];
        let scale_type = match s.dtype {
            Dtype::BF16 => ScaleType::BF16,
            Dtype::F16 => ScaleType::F16,
            Dtype::F32 => ScaleType::F32,
            other => {
                return Err(mlx_err(
                    &t.name,
                    format!("scales have unsupported dtype {other:?}"),
                ))
            }
        };
        if b.dtype != s.dtype || b.shape != s.shape {
            return Err(mlx_err(
                &t.name,
                "biases do not match scales in dtype or shape".into(),
            ));
        }
        let affine = MlxAffine {
            bits: u8::try_from(bits).unwrap_or(0),
            group_size: u32::try_from(gs).unwrap_or(0),
            scale_type,
        };
        affine
            .validate()
            .map_err(|e| mlx_err(&t.name, e.to_string()))?;
        let Some((&packed, outer)) = t.shape.split_last() else {
            return Err(mlx_err(&t.name, "packed weight is a scalar".into()));
        };
        let cols = packed * 32 / bits;
        let expect_scales: Vec<u64> = outer.iter().copied().chain([cols / gs]).collect();
        if cols % gs != 0 || s.shape != expect_scales {
            return Err(mlx_err(
                &t.name,
                format!(
                    "weight shape {:?} at {bits} bits gives {cols} columns; scales should be {:?} but are {:?}",
                    t.shape, expect_scales, s.shape
                ),
            ));
        }
        out.push(TensorEntry {
            name: t.name.clone(),
            ty: TensorType::Mlx(affine),
            shape: outer.iter().copied().chain([cols]).collect(),
            parts: vec![span(*file, t), span(*sf, s), span(*bf, b)],
        });
    }
    let any_mlx = !triples.is_empty();
    Ok((out, any_mlx))
}

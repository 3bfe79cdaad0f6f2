//! The GGUF reader: round trips, a file written by gguf-py, split files,
//! expert slices for positioned reads, and one test per malformed-file error.

mod common;

use std::os::unix::fs::FileExt;

use moeflux::format::gguf::{
    parse_header, GgufError, GgufWriter, MetaArray, MetaValue, StringArray,
};
use moeflux::format::{ModelFiles, ModelMetadata};
use moeflux::inspect::{inspect, PlanRequest};
use moeflux::quant::{GgmlType, TensorType};

/// Hand-assembled GGUF bytes, for files no correct writer would produce.
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }
    /// `ne` in ggml order (innermost first).
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(ne.len() as u32);
        for &d in ne {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads to 32 and appends `data_len` zero bytes of tensor data.
    fn data(&mut self, data_len: usize) -> &[u8] {
        let pad = self.0.len().div_ceil(32) * 32 - self.0.len();
        self.0.resize(self.0.len() + pad + data_len, 0);
        &self.0
    }
}

fn err(bytes: &[u8]) -> GgufError {
    match parse_header(bytes) {
        Ok(_) => panic!("malformed file was accepted"),
        Err(e) => e,
    }
}

fn valid_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", MetaValue::String("qwen3moe".into()));
    w.add("a.u8", MetaValue::U8(7));
    w.add("a.i8", MetaValue::I8(-7));
    w.add("a.u16", MetaValue::U16(700));
    w.add("a.i16", MetaValue::I16(-700));
    w.add("a.u32", MetaValue::U32(70_000));
    w.add("a.i32", MetaValue::I32(-70_000));
    w.add("a.f32", MetaValue::F32(0.5));
    w.add("a.bool", MetaValue::Bool(true));
    w.add("a.u64", MetaValue::U64(1 << 40));
    w.add("a.i64", MetaValue::I64(-(1 << 40)));
    w.add("a.f64", MetaValue::F64(-0.25));
    w.add("a.str", MetaValue::String("héllo ✓".into()));
    w.add(
        "a.strings",
        MetaValue::Array(MetaArray::String(StringArray::from_iter(["a", "", "ü"]))),
    );
    w.add("a.ints", MetaValue::Array(MetaArray::I32(vec![1, -2, 3])));
    w.add(
        "a.nested",
        MetaValue::Array(MetaArray::Array(vec![
            Box::new(MetaArray::U8(vec![1, 2])),
            Box::new(MetaArray::F32(vec![])),
        ])),
    );
    w.add_tensor("x", GgmlType::F32, &[2, 3]).unwrap();
    w.add_tensor("blk.0.ffn_up_exps.weight", GgmlType::Q8_0, &[4, 2, 64])
        .unwrap();
    let mut out = Vec::new();
    w.write(&mut out, |i, t, dst| {
        let n = t.size().unwrap() as usize;
        dst.write_all(&vec![i as u8 + 1; n])
    })
    .unwrap();
    out
}

#[test]
fn round_trips_every_value_type() {
    let bytes = valid_file();
    let h = parse_header(&bytes).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.alignment, 32);
    let m = &h.metadata;
    assert_eq!(m.get("a.u8"), Some(&MetaValue::U8(7)));
    assert_eq!(m.get("a.i16"), Some(&MetaValue::I16(-700)));
    assert_eq!(m.get_u64("a.u64"), Some(1 << 40));
    assert_eq!(m.get("a.i64").and_then(MetaValue::as_i64), Some(-(1 << 40)));
    assert_eq!(m.get_f64("a.f64"), Some(-0.25));
    assert_eq!(m.get_bool("a.bool"), Some(true));
    assert_eq!(m.get_str("a.str"), Some("héllo ✓"));
    let strings = m.get_array("a.strings").unwrap().as_strings().unwrap();
    assert_eq!(strings.iter().collect::<Vec<_>>(), ["a", "", "ü"]);
    assert_eq!(
        m.get_array("a.ints").unwrap().to_i64s(),
        Some(vec![1, -2, 3])
    );
    match m.get_array("a.nested").unwrap() {
        MetaArray::Array(inner) => {
            assert_eq!(*inner[0], MetaArray::U8(vec![1, 2]));
            assert!(inner[1].is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.tensors.len(), 2);
    let t = &h.tensors[1];
    assert_eq!(
        (t.shape.clone(), t.ty, t.size),
        (vec![4, 2, 64], GgmlType::Q8_0, 4 * 2 * 2 * 34)
    );
    assert_eq!(t.offset % 32, 0);
    assert!(bytes[t.offset as usize..(t.offset + t.size) as usize]
        .iter()
        .all(|&b| b == 2));
}

#[test]
fn version_2_files_parse() {
    let mut bytes = valid_file();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(parse_header(&bytes).unwrap().version, 2);
}

#[test]
fn bad_magic() {
    let mut bytes = valid_file();
    bytes[3] = b'X';
    assert!(matches!(err(&bytes), GgufError::BadMagic(m) if &m == b"GGUX"));
}

#[test]
fn unsupported_versions() {
    for v in [1u32, 4, 1000] {
        let mut bytes = valid_file();
        bytes[4..8].copy_from_slice(&v.to_le_bytes());
        assert!(
            matches!(err(&bytes), GgufError::UnsupportedVersion(x) if x == v),
            "v{v}"
        );
    }
    let mut bytes = valid_file();
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(matches!(err(&bytes), GgufError::BigEndian(_)));
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = valid_file();
    for cut in 0..bytes.len() {
        let e = err(&bytes[..cut]);
        assert!(
            matches!(
                e,
                GgufError::Truncated { .. }
                    | GgufError::CountExceedsFile { .. }
                    | GgufError::TensorOutOfBounds { .. }
            ),
            "cut at {cut}: {e}"
        );
    }
    assert!(matches!(err(&bytes[..6]), GgufError::Truncated { .. }));
}

#[test]
fn lengths_beyond_the_file() {
    // A key whose length claims a terabyte.
    let mut r = Raw::header(3, 0, 1);
    r.u64(1 << 40);
    r.0.extend_from_slice(&[0; 64]);
    assert!(matches!(err(&r.0), GgufError::CountExceedsFile { count, .. } if count == 1 << 40));
    // An array claiming 2^40 u32s.
    let mut r = Raw::header(3, 0, 1);
    r.str("a").u32(9).u32(4).u64(1 << 40);
    r.0.extend_from_slice(&[0; 64]);
    assert!(matches!(err(&r.0), GgufError::CountExceedsFile { .. }));
    // A string array whose element length exceeds the file.
    let mut r = Raw::header(3, 0, 1);
    r.str("a").u32(9).u32(8).u64(1).u64(u64::MAX);
    r.0.extend_from_slice(&[0; 64]);
    assert!(matches!(err(&r.0), GgufError::CountExceedsFile { .. }));
    // Tensor and key counts no file could hold.
    assert!(matches!(
        err(&Raw::header(3, 1 << 50, 0).0),
        GgufError::CountExceedsFile { .. }
    ));
    assert!(matches!(
        err(&Raw::header(3, 0, u64::MAX).0),
        GgufError::CountExceedsFile { .. }
    ));
}

#[test]
fn unknown_value_types_are_named() {
    let mut r = Raw::header(3, 0, 1);
    r.str("odd.key").u32(13).u32(0);
    assert!(
        matches!(err(&r.0), GgufError::UnknownValueType { ref key, type_id: 13 } if key == "odd.key")
    );
    let mut r = Raw::header(3, 0, 1);
    r.str("odd.array").u32(9).u32(77).u64(0);
    assert!(matches!(
        err(&r.0),
        GgufError::UnknownValueType { type_id: 77, .. }
    ));
}

#[test]
fn unknown_tensor_types_are_named() {
    for id in [4u32, 31, 99] {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[32], id, 0);
        let e = err(r.data(64));
        assert!(
            matches!(e, GgufError::UnknownTensorType { ref tensor, type_id } if tensor == "w" && type_id == id)
        );
        assert!(e.to_string().contains(&format!("type id {id}")));
    }
}

#[test]
fn bad_dimensions() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[1, 1, 1, 1, 1], 0, 0);
    assert!(matches!(
        err(r.data(4)),
        GgufError::TooManyDims { n_dims: 5, .. }
    ));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[1 << 33, 1 << 33], 0, 0);
    assert!(matches!(
        err(r.data(4)),
        GgufError::DimensionOverflow { .. }
    ));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[33, 2], GgmlType::Q4_0.id(), 0);
    assert!(matches!(
        err(r.data(64)),
        GgufError::PartialBlock { row: 33, .. }
    ));
}

#[test]
fn bad_placement() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[4], 0, 16);
    assert!(matches!(
        err(r.data(64)),
        GgufError::MisalignedTensor { offset: 16, .. }
    ));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[64], 0, 0);
    assert!(matches!(
        err(r.data(255)),
        GgufError::TensorOutOfBounds {
            size: 256,
            data_len: 255,
            ..
        }
    ));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[4], 0, u64::MAX - 31);
    assert!(matches!(
        err(r.data(64)),
        GgufError::TensorOutOfBounds { .. }
    ));
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[16], 0, 0).tensor("b", &[16], 0, 32);
    assert!(matches!(
        err(r.data(96)),
        GgufError::OverlappingTensors { .. }
    ));
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[8], 0, 0).tensor("a", &[8], 0, 32);
    assert!(matches!(err(r.data(64)), GgufError::DuplicateTensor(ref n) if n == "a"));
}

#[test]
fn bad_metadata() {
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("k", 1).kv_u32("k", 2);
    assert!(matches!(err(&r.0), GgufError::DuplicateKey(ref k) if k == "k"));
    let mut r = Raw::header(3, 0, 1);
    r.kv_u32("general.alignment", 48);
    assert!(matches!(err(&r.0), GgufError::BadAlignment(48)));
    let mut r = Raw::header(3, 0, 1);
    r.str("general.alignment").u32(8).str("32");
    assert!(matches!(err(&r.0), GgufError::WrongValueType { .. }));
    let mut r = Raw::header(3, 0, 1);
    r.str("deep").u32(9);
    for _ in 0..12 {
        r.u32(9).u64(1);
    }
    assert!(matches!(err(&r.0), GgufError::NestingTooDeep { .. }));
}

/// Totals written by gguf-py's own reader (`scripts/make_tiny_gguf.py`).
fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(common::data("tiny-qwen3moe.expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check_report(files: &ModelFiles) {
    let e = expected();
    let r = inspect(files, &PlanRequest::default());
    assert_eq!(r.architecture, "qwen3moe");
    assert!(r.supported, "{:?}", r.unsupported);
    assert_eq!(r.tensor_count as u64, e["tensor_count"].as_u64().unwrap());
    assert_eq!(r.dense_bytes, e["dense_bytes"].as_u64().unwrap());
    assert_eq!(r.expert_bytes, e["expert_bytes"].as_u64().unwrap());
    let per_layer: Vec<u64> = r.expert_layers.iter().map(|l| l.one_expert_bytes).collect();
    let want: Vec<u64> = e["one_expert_bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(per_layer, want);
    let c = r.config.as_ref().unwrap();
    assert_eq!(c.n_layers as u64, e["n_layers"].as_u64().unwrap());
    assert_eq!(c.n_experts as u64, e["n_experts"].as_u64().unwrap());
    assert_eq!(c.n_experts_used as u64, e["top_k"].as_u64().unwrap());
    assert_eq!(c.vocab as u64, e["vocab"].as_u64().unwrap());
    let by_type_total: u64 = r.by_type.iter().map(|t| t.bytes).sum();
    assert_eq!(by_type_total, r.dense_bytes + r.expert_bytes);
}

#[test]
fn gguf_py_file_totals_match_gguf_py() {
    let files = ModelFiles::open(&common::data("tiny-qwen3moe.gguf")).unwrap();
    assert_eq!(files.files.len(), 1);
    check_report(&files);
}

#[test]
fn split_gguf_opens_from_first_shard() {
    let shards = expected()["split_shards"].as_array().unwrap().clone();
    let first = common::data(&format!("split/{}", shards[0].as_str().unwrap()));
    let files = ModelFiles::open(&first).unwrap();
    assert_eq!(files.files.len(), shards.len());
    assert!(matches!(files.metadata, ModelMetadata::Gguf(_)));
    check_report(&files);
    let second = common::data(&format!("split/{}", shards[1].as_str().unwrap()));
    let e = ModelFiles::open(&second).err().unwrap();
    assert!(e.to_string().contains("not the first shard"), "{e}");
}

#[test]
fn missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let shards = expected()["split_shards"].as_array().unwrap().clone();
    let first = shards[0].as_str().unwrap();
    std::fs::copy(
        common::data(&format!("split/{first}")),
        dir.path().join(first),
    )
    .unwrap();
    let e = ModelFiles::open(&dir.path().join(first)).err().unwrap();
    assert!(
        e.to_string().contains("00002-of-00003.gguf is missing"),
        "{e}"
    );
}

#[test]
fn dense_is_zero_copy_and_experts_are_positioned_reads() {
    let files = ModelFiles::open(&common::data("tiny-qwen3moe.gguf")).unwrap();
    let map = files.files[0].bytes();
    let embd = files.tensor("token_embd.weight").unwrap();
    let dense = files.bytes(&embd.parts[0]);
    let map_range = map.as_ptr_range();
    assert!(
        map_range.contains(&dense.as_ptr()),
        "dense tensor must be a view into the map"
    );

    let down = files.tensor("blk.0.ffn_down_exps.weight").unwrap();
    assert_eq!(down.ty, TensorType::Ggml(GgmlType::Q6_K));
    assert_eq!(down.shape, vec![8, 256, 256]);
    let e5 = down.outer_slice(5).unwrap();
    assert_eq!(e5.len(), 1);
    assert_eq!(e5[0].len, 256 * 210);
    let mut buf = vec![0u8; e5[0].len as usize];
    files.files[e5[0].file as usize]
        .file()
        .read_exact_at(&mut buf, e5[0].offset)
        .unwrap();
    assert_eq!(buf, files.bytes(&e5[0]));
    let whole = files.bytes(&down.parts[0]);
    assert_eq!(&whole[5 * 256 * 210..6 * 256 * 210], &buf[..]);
}

//! Helpers shared by the integration tests: locating test data and
//! fixtures, reading `.npy` references, comparing with tolerances.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use moeflux::npy::NpyArray;

/// The repository's `tests/` directory (`MOEFLUX_TESTS_DIR` overrides it,
/// for test binaries run on another machine).
pub fn tests_dir() -> PathBuf {
    match std::env::var_os("MOEFLUX_TESTS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests"),
    }
}

/// A file under `tests/data/`.
pub fn data(rel: &str) -> PathBuf {
    tests_dir().join("data").join(rel)
}

/// A file or directory under `tests/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    tests_dir().join("fixtures").join(rel)
}

/// Reads a `.npy` file, panicking with the path on failure (test code).
pub fn npy(path: &Path) -> NpyArray {
    NpyArray::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Cosine similarity of two vectors (in f64).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(f64::MIN_POSITIVE)
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// One tensor to write with [`safetensors_bytes`]: name, dtype string,
/// shape, raw little-endian data.
pub type StTensor<'a> = (&'a str, &'a str, Vec<u64>, Vec<u8>);

/// Serializes a safetensors file (header JSON, then the data in order).
pub fn safetensors_bytes(tensors: &[StTensor<'_>]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    out
}

/// A deterministic byte pattern of length `n` seeded by `seed`.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A fixture's `fixture.json`.
pub fn fixture_json(family: &str) -> serde_json::Value {
    let p = fixture(&format!("{family}/fixture.json"));
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

/// A reference array of a fixture: `tests/fixtures/<family>/ref/<name>.npy`.
pub fn fixture_ref(family: &str, name: &str) -> NpyArray {
    npy(&fixture(&format!("{family}/ref/{name}.npy")))
}

/// The fixed prompt token ids of a fixture.
pub fn fixture_tokens(family: &str) -> Vec<u32> {
    fixture_ref(family, "tokens")
        .to_i64()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// How two `[n, vocab]` logit arrays compare.
#[derive(Debug)]
pub struct LogitDiff {
    pub max_abs: f32,
    pub ref_max_abs: f32,
    /// `max_abs / ref_max_abs`.
    pub rel: f32,
    /// Fraction of positions whose argmax agrees.
    pub argmax_agree: f64,
    pub n_positions: usize,
}

pub fn logit_diff(ours: &[f32], reference: &[f32], vocab: usize) -> LogitDiff {
    assert_eq!(ours.len(), reference.len(), "logit arrays differ in size");
    let max_abs = max_abs_diff(ours, reference);
    let ref_max_abs = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let n = ours.len() / vocab;
    let agree = (0..n)
        .filter(|&t| {
            argmax(&ours[t * vocab..(t + 1) * vocab])
                == argmax(&reference[t * vocab..(t + 1) * vocab])
        })
        .count();
    LogitDiff {
        max_abs,
        ref_max_abs,
        rel: max_abs / ref_max_abs,
        argmax_agree: agree as f64 / n as f64,
        n_positions: n,
    }
}

/// Asserts `ours` matches `reference` within `rel` (of the reference's
/// largest magnitude) with at least `min_agree` of positions' argmax equal.
pub fn assert_logits(
    what: &str,
    ours: &[f32],
    reference: &[f32],
    vocab: usize,
    rel: f32,
    min_agree: f64,
) -> LogitDiff {
    let d = logit_diff(ours, reference, vocab);
    assert!(
        d.rel <= rel && d.argmax_agree >= min_agree,
        "{what}: max|Δ| = {} ({:.2e} of max|ref| {}; allowed {rel:.1e}), argmax agreement {:.3} (need {min_agree})",
        d.max_abs,
        d.rel,
        d.ref_max_abs,
        d.argmax_agree
    );
    d
}

/// Every CPU kernel level this machine can run, the reference first.
pub fn levels() -> Vec<moeflux::backend::cpu::kernels::Level> {
    use moeflux::backend::cpu::kernels::Level;
    [Level::Reference, Level::Scalar, Level::Avx2, Level::Avx512]
        .into_iter()
        .filter(|l| l.supported())
        .collect()
}

/// Opens a fixture model at a kernel level.
pub fn open_at(rel: &str, level: moeflux::backend::cpu::kernels::Level) -> moeflux::Engine {
    let opts = moeflux::EngineOptions {
        cpu_level: Some(level),
        threads: 2,
        kv_type: moeflux::state::KvType::F32,
        ..Default::default()
    };
    moeflux::Engine::open(&fixture(rel), opts).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The greedy continuation of `tokens`, `n` tokens long (EOS included, as
/// the references were made by argmax loops).
pub fn greedy(engine: &moeflux::Engine, tokens: &[u32], n: usize) -> Vec<u32> {
    let mut s = engine.new_session();
    let mut last = s.eval(tokens).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = moeflux::sampling::argmax(&last);
        out.push(t);
        last = s.eval(&[t]).unwrap();
    }
    out
}

/// Token ids stored as a reference `.npy`.
pub fn ref_ids(family: &str, name: &str) -> Vec<u32> {
    fixture_ref(family, name)
        .to_i64()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

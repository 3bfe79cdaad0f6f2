//! The safetensors reader: single and sharded checkpoints, dtypes, MLX
//! affine triples, and the errors a broken checkpoint gets.

mod common;

use std::path::Path;

use common::{pattern, safetensors_bytes};
use moeflux::format::{FormatError, ModelFiles, SafetensorsError};
use moeflux::inspect::{inspect, PlanRequest};
use moeflux::quant::mlx::ScaleType;
use moeflux::quant::{GgmlType, MlxAffine, RawDtype, TensorType};
use serde_json::json;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn qwen3_config() -> serde_json::Value {
    json!({
        "model_type": "qwen3_moe", "num_hidden_layers": 1, "hidden_size": 8,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "vocab_size": 16, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "num_experts": 2, "num_experts_per_tok": 1,
        "moe_intermediate_size": 4
    })
}

#[test]
fn single_file_with_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "config.json",
        qwen3_config().to_string().as_bytes(),
    );
    let tensors = vec![
        ("a.f32", "F32", vec![2, 2], pattern(16, 1)),
        ("a.f16", "F16", vec![4], pattern(8, 2)),
        ("a.bf16", "BF16", vec![3], pattern(6, 3)),
        ("a.u8", "U8", vec![5], pattern(5, 4)),
        ("a.i8", "I8", vec![5], pattern(5, 5)),
        ("a.u32", "U32", vec![2], pattern(8, 6)),
        ("a.fp8", "F8_E4M3", vec![7], pattern(7, 7)),
    ];
    write(
        dir.path(),
        "model.safetensors",
        &safetensors_bytes(&tensors),
    );
    let files = ModelFiles::open(dir.path()).unwrap();
    let ty = |n: &str| files.tensor(n).unwrap().ty;
    assert_eq!(ty("a.f32"), TensorType::Ggml(GgmlType::F32));
    assert_eq!(ty("a.f16"), TensorType::Ggml(GgmlType::F16));
    assert_eq!(ty("a.bf16"), TensorType::Ggml(GgmlType::BF16));
    assert_eq!(ty("a.i8"), TensorType::Ggml(GgmlType::I8));
    assert_eq!(ty("a.u8"), TensorType::Raw(RawDtype::U8));
    assert_eq!(ty("a.u32"), TensorType::Raw(RawDtype::U32));
    assert_eq!(ty("a.fp8"), TensorType::Raw(RawDtype::F8_E4M3));
    assert_eq!(ty("a.fp8").name(), "F8_E4M3");
    for (name, _, shape, data) in &tensors {
        let t = files.tensor(name).unwrap();
        assert_eq!(&t.shape, shape);
        assert_eq!(files.bytes(&t.parts[0]), &data[..], "{name}");
    }
    // A single .safetensors path works too, with config.json beside it.
    let one = ModelFiles::open(&dir.path().join("model.safetensors")).unwrap();
    assert_eq!(one.tensors.len(), tensors.len());
}

#[test]
fn sharded_checkpoint_and_expert_accounting() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "config.json",
        qwen3_config().to_string().as_bytes(),
    );
    let f32s = |n: usize, seed| ("F32", pattern(4 * n, seed));
    let mut shard1 = Vec::new();
    let mut shard2 = Vec::new();
    let (d, b) = f32s(16 * 8, 1);
    shard1.push(("model.embed_tokens.weight", d, vec![16, 8], b));
    let (d, b) = f32s(2 * 8, 2);
    shard1.push(("model.layers.0.mlp.gate.weight", d, vec![2, 8], b));
    let names: Vec<String> = (0..2)
        .flat_map(|e| {
            ["gate_proj", "up_proj", "down_proj"]
                .map(|p| format!("model.layers.0.mlp.experts.{e}.{p}.weight"))
        })
        .collect();
    for (i, n) in names.iter().enumerate() {
        let (d, b) = f32s(32, 10 + i as u8);
        let shape = if n.contains("down") {
            vec![8, 4]
        } else {
            vec![4, 8]
        };
        shard2.push((n.as_str(), d, shape, b));
    }
    write(
        dir.path(),
        "model-00001-of-00002.safetensors",
        &safetensors_bytes(&shard1),
    );
    write(
        dir.path(),
        "model-00002-of-00002.safetensors",
        &safetensors_bytes(&shard2),
    );
    let mut map = serde_json::Map::new();
    for (n, ..) in &shard1 {
        map.insert(n.to_string(), json!("model-00001-of-00002.safetensors"));
    }
    for (n, ..) in &shard2 {
        map.insert(n.to_string(), json!("model-00002-of-00002.safetensors"));
    }
    let index = json!({"metadata": {}, "weight_map": map});
    write(
        dir.path(),
        "model.safetensors.index.json",
        index.to_string().as_bytes(),
    );

    let files = ModelFiles::open(dir.path()).unwrap();
    assert_eq!(files.files.len(), 2);
    assert_eq!(
        files
            .tensor("model.layers.0.mlp.experts.1.up_proj.weight")
            .unwrap()
            .parts[0]
            .file,
        1
    );
    let r = inspect(&files, &PlanRequest::default());
    assert!(r.supported, "{:?}", r.unsupported);
    assert_eq!(r.dense_bytes, 4 * (16 * 8 + 2 * 8));
    assert_eq!(r.expert_bytes, 4 * 32 * 6);
    assert_eq!(r.expert_layers.len(), 1);
    assert_eq!(r.expert_layers[0].n_experts, 2);
    assert_eq!(r.expert_layers[0].one_expert_bytes, 4 * 32 * 3);

    // A shard the index names must exist.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = ModelFiles::open(dir.path()).err().unwrap();
    assert!(
        e.to_string()
            .contains("model-00002-of-00002.safetensors is missing"),
        "{e}"
    );
}

#[test]
fn index_may_not_escape_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.json", b"{}");
    let index = json!({"weight_map": {"w": "../secret.safetensors"}});
    write(
        dir.path(),
        "model.safetensors.index.json",
        index.to_string().as_bytes(),
    );
    let e = ModelFiles::open(dir.path()).err().unwrap();
    assert!(e.to_string().contains("not a plain file name"), "{e}");
}

#[test]
fn missing_config_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "model.safetensors",
        &safetensors_bytes(&[("w", "F32", vec![1], vec![0; 4])]),
    );
    assert!(matches!(
        ModelFiles::open(dir.path()),
        Err(FormatError::Safetensors(
            SafetensorsError::MissingConfig { .. }
        ))
    ));
    let empty = tempfile::tempdir().unwrap();
    write(empty.path(), "config.json", b"{}");
    assert!(matches!(
        ModelFiles::open(empty.path()),
        Err(FormatError::Safetensors(SafetensorsError::NoWeights { .. }))
    ));
    write(empty.path(), "model.safetensors", b"not json");
    assert!(matches!(
        ModelFiles::open(empty.path()),
        Err(FormatError::Safetensors(SafetensorsError::Header { .. }))
    ));
}

#[test]
fn truncated_and_lying_headers() {
    let cfg = json!({});
    let good = safetensors_bytes(&[("w", "F32", vec![4], pattern(16, 1))]);
    assert!(moeflux::format::safetensors::tensors_from_bytes(&good, &cfg).is_ok());
    for cut in 0..good.len() {
        assert!(
            moeflux::format::safetensors::tensors_from_bytes(&good[..cut], &cfg).is_err(),
            "cut {cut}"
        );
    }
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(moeflux::format::safetensors::tensors_from_bytes(&huge, &cfg).is_err());
    // Offsets that disagree with the shape.
    let lying = safetensors_bytes(&[("w", "F32", vec![5], pattern(16, 1))]);
    assert!(moeflux::format::safetensors::tensors_from_bytes(&lying, &cfg).is_err());
}

/// An mlx-community style MoE layer: stacked 4-bit experts, an 8-bit router.
fn mlx_tensors() -> Vec<common::StTensor<'static>> {
    let p = "model.layers.0.mlp.";
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let mut t = Vec::new();
    // Experts: [2 experts, 4 rows, 64 cols] at 4 bits = 8 u32 words per row.
    for proj in ["gate_proj", "up_proj", "down_proj"] {
        let base = format!("{p}switch_mlp.{proj}");
        t.push((
            leak(format!("{base}.weight")),
            "U32",
            vec![2, 4, 8],
            pattern(2 * 4 * 8 * 4, 1),
        ));
        t.push((
            leak(format!("{base}.scales")),
            "BF16",
            vec![2, 4, 1],
            pattern(2 * 4 * 2, 2),
        ));
        t.push((
            leak(format!("{base}.biases")),
            "BF16",
            vec![2, 4, 1],
            pattern(2 * 4 * 2, 3),
        ));
    }
    // Router: [2, 64] at 8 bits = 16 words per row.
    t.push((
        leak(format!("{p}gate.weight")),
        "U32",
        vec![2, 16],
        pattern(2 * 16 * 4, 4),
    ));
    t.push((
        leak(format!("{p}gate.scales")),
        "BF16",
        vec![2, 1],
        pattern(4, 5),
    ));
    t.push((
        leak(format!("{p}gate.biases")),
        "BF16",
        vec![2, 1],
        pattern(4, 6),
    ));
    t.push(("model.norm.weight", "BF16", vec![64], pattern(128, 7)));
    t
}

fn mlx_config(quant: serde_json::Value) -> serde_json::Value {
    let mut c = qwen3_config();
    c["quantization"] = quant;
    c
}

#[test]
fn mlx_affine_triples_are_one_tensor() {
    let cfg = mlx_config(json!({
        "group_size": 64, "bits": 4,
        "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8}
    }));
    let tensors = mlx_tensors();
    let bytes = safetensors_bytes(&tensors);
    let entries = moeflux::format::safetensors::tensors_from_bytes(&bytes, &cfg).unwrap();
    assert_eq!(entries.len(), 5, "scales and biases fold into their weight");
    let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
    let up = get("model.layers.0.mlp.switch_mlp.up_proj.weight");
    let four = MlxAffine {
        bits: 4,
        group_size: 64,
        scale_type: ScaleType::BF16,
    };
    assert_eq!(up.ty, TensorType::Mlx(four));
    assert_eq!(up.shape, vec![2, 4, 64]);
    assert_eq!(up.parts.len(), 3);
    let gate = get("model.layers.0.mlp.gate.weight");
    assert_eq!(gate.ty, TensorType::Mlx(MlxAffine { bits: 8, ..four }));
    assert_eq!(gate.shape, vec![2, 64]);
    assert_eq!(
        get("model.norm.weight").ty,
        TensorType::Ggml(GgmlType::BF16)
    );

    // One expert of the stacked tensor is three slices: its rows of the
    // weight, scales and biases.
    let e1 = up.outer_slice(1).unwrap();
    assert_eq!(
        e1.iter().map(|s| s.len).collect::<Vec<_>>(),
        vec![4 * 8 * 4, 4 * 2, 4 * 2]
    );
    let (_, _, _, w) = tensors
        .iter()
        .find(|t| t.0 == "model.layers.0.mlp.switch_mlp.up_proj.weight")
        .unwrap();
    let span = e1[0];
    assert_eq!(
        &bytes[span.offset as usize..(span.offset + span.len) as usize],
        &w[128..256]
    );
}

#[test]
fn mlx_errors_are_explained() {
    let bytes = safetensors_bytes(&mlx_tensors());
    let e = moeflux::format::safetensors::tensors_from_bytes(&bytes, &qwen3_config()).unwrap_err();
    assert!(e.to_string().contains("no \"quantization\" entry"), "{e}");
    let e = moeflux::format::safetensors::tensors_from_bytes(
        &bytes,
        &mlx_config(json!({"group_size": 64, "bits": 4, "mode": "mxfp4"})),
    )
    .unwrap_err();
    assert!(e.to_string().contains("\"mxfp4\" is not supported"), "{e}");
    let e = moeflux::format::safetensors::tensors_from_bytes(
        &bytes,
        &mlx_config(json!({"group_size": 64, "bits": 3})),
    )
    .unwrap_err();
    assert!(e.to_string().contains("3 bits"), "{e}");
    // Scales that do not match the weight's group count.
    let e = moeflux::format::safetensors::tensors_from_bytes(
        &bytes,
        &mlx_config(json!({"group_size": 32, "bits": 4})),
    )
    .unwrap_err();
    assert!(e.to_string().contains("scales should be"), "{e}");
}

//! `moeflux inspect` as a user runs it.

mod common;

use std::process::Command;

use moeflux::format::gguf::{GgufWriter, MetaValue};
use moeflux::quant::GgmlType;

fn moeflux(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moeflux"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn json_report_matches_gguf_py_totals() {
    let path = common::data("tiny-qwen3moe.gguf");
    let (ok, stdout, stderr) =
        moeflux(&["inspect", path.to_str().unwrap(), "--json", "--mem", "1G"]);
    assert!(ok, "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let e: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::data("tiny-qwen3moe.expected.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(r["dense_bytes"], e["dense_bytes"]);
    assert_eq!(r["expert_bytes"], e["expert_bytes"]);
    assert_eq!(r["tensor_count"], e["tensor_count"]);
    assert_eq!(r["config"]["arch"], "qwen3_moe");
    assert_eq!(r["plan"]["slots"], 16, "1 GiB holds all 16 tiny experts");

    // The KV cache the plan sizes: 4096 positions × 2 layers × keys and
    // values × 2 KV heads × head_dim 64, at 2 bytes (f16) or 34 per 32.
    let kv = |ty: &str| {
        let (ok, stdout, stderr) =
            moeflux(&["inspect", path.to_str().unwrap(), "--json", "--kv-type", ty]);
        assert!(ok, "{stderr}");
        let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(r["plan_kv_type"], ty);
        r["plan"]["input"]["kv_bytes"].as_u64().unwrap()
    };
    assert_eq!(kv("f16"), 4096 * 2 * 2 * 128 * 2);
    assert_eq!(kv("q8_0"), 4096 * 2 * 2 * 128 * 34 / 32);
}

#[test]
fn human_report_and_refused_plan() {
    let path = common::data("tiny-qwen3moe.gguf");
    let (ok, stdout, _) = moeflux(&["inspect", path.to_str().unwrap(), "--mem", "1M"]);
    assert!(ok);
    assert!(stdout.contains("arch        qwen3moe"), "{stdout}");
    assert!(stdout.contains("routed experts"), "{stdout}");
    assert!(stdout.contains("plan        refused"), "{stdout}");
    let (ok, stdout, _) = moeflux(&["inspect", path.to_str().unwrap(), "--expert-cache", "min"]);
    assert!(ok);
    assert!(stdout.contains("2 expert slots"), "{stdout}");
}

#[test]
fn unknown_architecture_still_gets_a_container_report() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dense.gguf");
    let mut w = GgufWriter::new();
    w.add("general.architecture", MetaValue::String("mamba".into()));
    w.add_tensor("token_embd.weight", GgmlType::F16, &[8, 4])
        .unwrap();
    let mut f = std::fs::File::create(&path).unwrap();
    w.write(&mut f, |_, t, dst| {
        dst.write_all(&vec![0; t.size().unwrap() as usize])
    })
    .unwrap();
    let (ok, stdout, stderr) = moeflux(&["inspect", path.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("mamba — not supported yet"), "{stdout}");
    assert!(stdout.contains("tensors     1: F16 1 (64 B)"), "{stdout}");
}

#[test]
fn broken_files_get_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(common::data("tiny-qwen3moe.gguf")).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let (ok, _, stderr) = moeflux(&["inspect", cut.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("error: cannot open"), "{stderr}");
    assert!(stderr.contains("extends past the end"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let (ok, _, stderr) = moeflux(&["inspect", "/nonexistent/model.gguf"]);
    assert!(!ok);
    assert!(
        stderr.contains("No such file") || stderr.contains("no such file"),
        "{stderr}"
    );
    let (ok, _, stderr) = moeflux(&["inspect", common::data("quant/VERSION").to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("not a model"), "{stderr}");
}

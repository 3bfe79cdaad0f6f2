//! Streaming under a memory budget, as a user runs it: `moeflux synth`
//! writes a model whose routed experts are several times the budget, and
//! `moeflux bench` must run it with its peak resident memory within the
//! plan.

use std::process::Command;

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

/// What the process needs beyond the plan: its code and libraries, thread
/// stacks, the tokenizer, the allocator's slack.
const RSS_TOLERANCE: u64 = 24 << 20;

#[test]
fn peak_memory_stays_within_the_plan_while_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("stream.gguf");
    let m = model.to_str().unwrap();
    let (ok, _, err) = moeflux(&[
        "synth",
        "--preset",
        "test-stream",
        "--quant",
        "q4_k",
        "-o",
        m,
    ]);
    assert!(ok, "{err}");

    // The CPU backend: with the `gpu` feature, `auto` would load a Vulkan
    // driver to look for an adapter, whose own memory (LLVM, for Mesa's
    // software driver) is not the engine's and not in the plan.
    let (ok, out, err) = moeflux(&[
        "bench",
        "-m",
        m,
        "--mem",
        "48M",
        "--ubatch",
        "64",
        "-p",
        "48",
        "-n",
        "24",
        "--io",
        "buffered",
        "--backend",
        "cpu",
        "-r",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let plan_total = r["plan_total_bytes"].as_u64().unwrap();
    let expert_bytes = r["plan"]["input"]["total_experts"].as_u64().unwrap()
        * r["plan"]["input"]["slot_bytes"].as_u64().unwrap();
    assert!(plan_total <= 48 << 20, "plan over budget: {plan_total}");
    assert!(
        expert_bytes > 4 * plan_total,
        "experts ({expert_bytes}) must exceed the budget several times over"
    );
    // Two repetitions, the reported rate their median.
    for (key, runs) in [
        ("prompt_tok_s", "prompt_tok_s_runs"),
        ("decode_tok_s", "decode_tok_s_runs"),
    ] {
        let v: Vec<f64> = r[runs]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(v.len(), 2, "{runs}");
        let (lo, hi) = (v[0].min(v[1]), v[0].max(v[1]));
        let m = r[key].as_f64().unwrap();
        assert!(
            lo > 0.0 && m >= lo * 0.999 && m <= hi * 1.001,
            "{key} {m} outside {v:?}"
        );
    }
    let peak = r["peak_rss_bytes"].as_u64().unwrap();
    assert!(
        peak <= plan_total + RSS_TOLERANCE,
        "peak RSS {peak} exceeds the plan {plan_total} + {RSS_TOLERANCE}"
    );
    // It really streamed: decode read experts and missed.
    assert!(r["store_decode"]["total"]["misses"].as_u64().unwrap() > 0);
    assert!(r["decode_bytes_read_per_token"].as_f64().unwrap() > 0.0);

    // The plan line is printed on start.
    assert!(err.contains("plan: --mem 48.0 MiB"), "{err}");
}

#[test]
fn too_small_a_budget_is_refused_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("stream.gguf");
    let m = model.to_str().unwrap();
    let (ok, _, err) = moeflux(&["synth", "--preset", "tiny-qwen3moe", "-o", m]);
    assert!(ok, "{err}");
    let (ok, _, err) = moeflux(&["run", "-m", m, "-p", "hi", "--mem", "8M"]);
    assert!(!ok);
    assert!(
        err.contains("cannot hold the dense weights") && err.contains("at least"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}

//! `moeflux run`, `chat` and `logits` as a user runs them, on the
//! qwen3_moe fixture.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{assert_logits, fixture, fixture_ref, fixture_tokens};

fn moeflux(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moeflux"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn model() -> String {
    fixture("qwen3_moe/hf").to_str().unwrap().to_string()
}

/// The number after `label` in a stats line.
fn stat(stderr: &str, label: &str) -> Vec<usize> {
    stderr
        .match_indices(label)
        .filter_map(|(i, _)| {
            stderr[i + label.len()..]
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

#[test]
fn run_streams_text_and_prints_stats() {
    let m = model();
    let (ok, stdout, stderr) = moeflux(
        &[
            "run",
            "-m",
            &m,
            "-p",
            "Hello world",
            "-n",
            "12",
            "--temp",
            "0",
        ],
        None,
    );
    assert!(ok, "{stderr}");
    assert!(!stdout.trim().is_empty(), "no text generated");
    assert!(stderr.contains("tok/s"), "{stderr}");
    let prompt = stat(&stderr, "prompt: ");
    let generated = stat(&stderr, "generated: ");
    assert!(prompt[0] > 3, "{stderr}");
    assert!(generated[0] >= 1 && generated[0] <= 12, "{stderr}");
    // Greedy output is deterministic.
    let (_, again, _) = moeflux(
        &[
            "run",
            "-m",
            &m,
            "-p",
            "Hello world",
            "-n",
            "12",
            "--temp",
            "0",
        ],
        None,
    );
    assert_eq!(stdout, again);
    // Seeded sampling is reproducible too.
    let args = [
        "run", "-m", &m, "-p", "Hello", "-n", "12", "--temp", "1.0", "--seed", "7",
    ];
    assert_eq!(moeflux(&args, None).1, moeflux(&args, None).1);
}

#[test]
fn chat_keeps_the_conversation_between_turns() {
    let m = model();
    let input = "Hello there\nHi\n/reset\nHello there\n/exit\nnever read\n";
    let (ok, stdout, stderr) = moeflux(
        &["chat", "-m", &m, "-n", "6", "--temp", "0", "-v"],
        Some(input),
    );
    assert!(ok, "{stderr}");
    let prompts = stat(&stderr, "prompt: ");
    assert_eq!(prompts.len(), 3, "three answers expected: {stderr}");
    // The second turn only evaluates what the cache does not hold (its own
    // short message), fewer tokens than the first turn's whole prompt; a
    // re-evaluation would be more than the first prompt plus its answer.
    assert!(
        prompts[1] < prompts[0],
        "second turn re-evaluated the conversation: {stderr}"
    );
    // After /reset the first turn is evaluated from scratch, and greedy
    // decoding answers it the same way.
    assert_eq!(prompts[2], prompts[0], "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), lines.get(2).or(lines.last()), "{stdout}");
    assert!(stderr.contains("(conversation reset)"));
}

#[test]
fn logits_without_a_tokenizer_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ] {
        std::fs::copy(fixture("qwen3_moe/hf").join(f), dir.path().join(f)).unwrap();
    }
    let tokens = fixture_tokens("qwen3_moe");
    let list: Vec<String> = tokens.iter().map(u32::to_string).collect();
    let out = dir.path().join("logits.npy");
    let (ok, _, stderr) = moeflux(
        &[
            "logits",
            "-m",
            dir.path().to_str().unwrap(),
            "--tokens",
            &list.join(","),
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{stderr}");
    let ours = moeflux::npy::NpyArray::read(&out).unwrap();
    assert_eq!(ours.shape, vec![tokens.len(), 320]);
    let reference = fixture_ref("qwen3_moe", "hf_logits").to_f32().unwrap();
    assert_logits(
        "logits command",
        &ours.to_f32().unwrap(),
        &reference,
        320,
        1e-3,
        1.0,
    );

    // Text needs the tokenizer, and the error says so.
    let (ok, _, stderr) = moeflux(
        &["run", "-m", dir.path().to_str().unwrap(), "-p", "hi"],
        None,
    );
    assert!(!ok);
    assert!(stderr.contains("tokenizer.json does not exist"), "{stderr}");
}

#[test]
fn bad_requests_get_clear_errors() {
    let m = model();
    let long = "word ".repeat(100);
    let (ok, _, stderr) = moeflux(&["run", "-m", &m, "-c", "16", "--raw", "-p", &long], None);
    assert!(!ok);
    assert!(
        stderr.contains("context is full") && stderr.contains("context size 16"),
        "{stderr}"
    );
    let (ok, _, stderr) = moeflux(
        &[
            "logits",
            "-m",
            &m,
            "--tokens",
            "1,2,999999",
            "-o",
            "/tmp/never.npy",
        ],
        None,
    );
    assert!(!ok);
    assert!(
        stderr.contains("token id 999999 is out of range"),
        "{stderr}"
    );
    let (ok, _, stderr) = moeflux(
        &[
            "logits",
            "-m",
            &m,
            "--tokens",
            "1,x",
            "-o",
            "/tmp/never.npy",
        ],
        None,
    );
    assert!(!ok);
    assert!(stderr.contains("\"x\" is not a token id"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}

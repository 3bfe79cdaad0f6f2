//! The Qwen hybrids (Qwen3.5 MoE and Qwen3-Next: Gated DeltaNet + gated
//! full attention + shared expert) end to end on the CPU, at every kernel
//! level this machine supports, against transformers, llama.cpp and the
//! dequantized MLX reference (`tests/fixtures/qwen3_5_moe`,
//! `tests/fixtures/qwen3_next`); and the session state of a recurrent
//! model: snapshot/restore, save/load, truncate with checkpoints.

mod common;

use common::{
    all_logits as logits, check_gguf, fixture, fixture_tokens, gguf_f32_matches,
    hf_matches_transformers,
};
use moeflux::{Engine, EngineOptions};

#[test]
fn qwen3_5_hf_matches_transformers() {
    hf_matches_transformers("qwen3_5_moe");
}

#[test]
fn qwen3_next_hf_matches_transformers() {
    hf_matches_transformers("qwen3_next");
}

#[test]
fn qwen3_5_gguf_f32_matches_llama_cpp_and_transformers() {
    gguf_f32_matches("qwen3_5_moe");
}

#[test]
fn qwen3_next_gguf_f32_matches_llama_cpp_and_transformers() {
    gguf_f32_matches("qwen3_next");
}

#[test]
fn qwen3_5_gguf_quantized() {
    for ty in ["F16", "Q8_0", "Q4_0"] {
        check_gguf("qwen3_5_moe", ty);
    }
}

#[test]
fn qwen3_next_gguf_quantized() {
    for ty in ["F16", "Q8_0", "Q4_0"] {
        check_gguf("qwen3_next", ty);
    }
}

/// The mlx-community layout (4-bit affine, 8-bit router and shared-expert
/// gate, norms pre-shifted, conv kernel `[C, K, 1]`, `language_model.`
/// prefix): tight at the reference level, within the error of 8-bit
/// activations (measured by llama.cpp on the Q4_0 file) elsewhere.
#[test]
fn qwen3_5_mlx_matches_its_dequantized_reference() {
    common::mlx_matches_dequantized("qwen3_5_moe");
}

fn engine(rel: &str, ubatch: usize) -> Engine {
    let opts = EngineOptions {
        threads: 2,
        ubatch,
        kv_type: moeflux::state::KvType::F32,
        ..Default::default()
    };
    Engine::open(&fixture(rel), opts).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Prefill in chunks of any size gives the numbers of one long chunk.
#[test]
fn chunked_prefill_equals_one_chunk() {
    let tokens = fixture_tokens("qwen3_5_moe");
    let whole = logits(&engine("qwen3_5_moe/hf", 512), &tokens);
    for ubatch in [1, 3, 7] {
        let chunked = logits(&engine("qwen3_5_moe/hf", ubatch), &tokens);
        assert_eq!(bits(&chunked), bits(&whole), "ubatch {ubatch}");
    }
}

/// Snapshot, carry on, restore: the continuation after restoring is
/// bit-identical to the one after the snapshot, and to an uninterrupted
/// run.
#[test]
fn snapshot_restore_continue_is_bit_identical() {
    for rel in ["qwen3_5_moe/hf", "qwen3_next/gguf/qwen3_next-F32.gguf"] {
        let e = engine(rel, 512);
        let tokens = fixture_tokens("qwen3_5_moe");
        let (head, tail) = tokens.split_at(20);

        let mut straight = e.new_session();
        straight.eval(head).unwrap();
        let want = straight.eval_all(tail).unwrap();

        let mut s = e.new_session();
        s.eval(head).unwrap();
        let snap = s.snapshot().unwrap();
        // Wander off: other tokens change the recurrent state and KV cache.
        s.eval(&[5, 6, 7, 8, 9]).unwrap();
        s.restore(&snap).unwrap();
        assert_eq!(s.tokens(), head);
        let got = s.eval_all(tail).unwrap();
        assert_eq!(bits(&got), bits(&want), "{rel}: restored continuation");
    }
}

/// `truncate(n)` then re-generating equals a fresh session fed the same
/// tokens — with and without checkpoints, before and after them.
#[test]
fn truncate_equals_a_fresh_session() {
    let e = engine("qwen3_5_moe/hf", 512);
    let tokens = fixture_tokens("qwen3_5_moe");
    let fresh = |n: usize, next: &[u32]| -> Vec<u32> {
        let mut s = e.new_session();
        s.eval(&tokens[..n]).unwrap();
        bits(&s.eval_all(next).unwrap())
    };
    let next = [11u32, 12, 13];

    // No checkpoint: replays from the start.
    let mut s = e.new_session();
    s.eval(&tokens).unwrap();
    s.truncate(17).unwrap();
    assert_eq!(s.len(), 17);
    assert_eq!(bits(&s.eval_all(&next).unwrap()), fresh(17, &next));

    common::truncate_resumes_from_checkpoints(&e, &tokens);
}

#[test]
fn checkpoints_are_bounded() {
    let opts = EngineOptions {
        threads: 2,
        checkpoints: 2,
        ..Default::default()
    };
    let e = Engine::open(&fixture("qwen3_5_moe/hf"), opts).unwrap();
    let tokens = fixture_tokens("qwen3_5_moe");
    let mut s = e.new_session();
    for chunk in tokens.chunks(8) {
        s.eval(chunk).unwrap();
        s.checkpoint();
    }
    assert_eq!(s.checkpoint_positions(), vec![32, 40]);
}

/// Save, load into a new session: the continuation is bit-identical. A
/// file of another model, a truncated file or garbage is refused with the
/// session left as it was.
#[test]
fn save_load_round_trip_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.bin");
    let e = engine("qwen3_5_moe/hf", 512);
    let tokens = fixture_tokens("qwen3_5_moe");
    let mut s = e.new_session();
    s.eval(&tokens[..16]).unwrap();
    s.checkpoint();
    s.eval(&tokens[16..30]).unwrap();
    s.save(&path).unwrap();
    let want = bits(&s.eval_all(&tokens[30..]).unwrap());

    let mut t = e.new_session();
    t.load(&path).unwrap();
    assert_eq!(t.tokens(), &tokens[..30]);
    assert_eq!(t.checkpoint_positions(), vec![16]);
    assert_eq!(bits(&t.eval_all(&tokens[30..]).unwrap()), want);

    // Another model (same tokenizer, different weights) refuses the file.
    let other = engine("qwen3_next/hf", 512);
    let mut o = other.new_session();
    o.eval(&[1, 2, 3]).unwrap();
    let err = o.load(&path).unwrap_err().to_string();
    assert!(err.contains("different model"), "{err}");
    assert_eq!(o.tokens(), &[1, 2, 3]);

    // Truncated and corrupted copies.
    let bytes = std::fs::read(&path).unwrap();
    for (name, bad) in [
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("empty", Vec::new()),
        ("bad magic", {
            let mut b = bytes.clone();
            b[0] ^= 0xff;
            b
        }),
        ("bad version", {
            let mut b = bytes.clone();
            b[8] = 99;
            b
        }),
        ("huge token count", {
            let mut b = bytes.clone();
            // tokens count follows magic(8) version(4) model(8) type(1) layers(4).
            b[25..33].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
        ("trailing bytes", {
            let mut b = bytes.clone();
            b.push(0);
            b
        }),
    ] {
        let p = dir.path().join("bad.bin");
        std::fs::write(&p, &bad).unwrap();
        let mut u = e.new_session();
        u.eval(&[4, 5]).unwrap();
        let err = u.load(&p).expect_err(name);
        assert_eq!(u.tokens(), &[4, 5], "{name}: session changed");
        assert!(!err.to_string().is_empty());
    }

    // A context too small for the saved tokens is refused, not cut.
    let small = Engine::open(
        &fixture("qwen3_5_moe/hf"),
        EngineOptions {
            ctx: 8,
            kv_type: moeflux::state::KvType::F32,
            ..Default::default()
        },
    )
    .unwrap();
    let err = small.new_session().load(&path).unwrap_err().to_string();
    assert!(err.contains("context"), "{err}");
}

/// A q8_0 KV cache is saved and loaded like the others: the continuation
/// after loading is bit-identical to carrying on, and an engine with
/// another cache type refuses the file, naming both types.
#[test]
fn q8_0_kv_cache_saves_and_loads() {
    use moeflux::state::KvType;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q8.bin");
    let open = |kv_type| {
        let opts = EngineOptions {
            threads: 2,
            kv_type,
            ..Default::default()
        };
        Engine::open(&fixture("qwen3_5_moe/hf"), opts).unwrap()
    };
    let e = open(KvType::Q8_0);
    let tokens = fixture_tokens("qwen3_5_moe");
    let mut s = e.new_session();
    s.eval(&tokens[..25]).unwrap();
    s.save(&path).unwrap();
    let want = bits(&s.eval_all(&tokens[25..]).unwrap());
    let mut t = e.new_session();
    t.load(&path).unwrap();
    assert_eq!(bits(&t.eval_all(&tokens[25..]).unwrap()), want);

    let mut u = open(KvType::F16).new_session();
    let err = u.load(&path).unwrap_err().to_string();
    assert!(err.contains("q8_0") && err.contains("f16"), "{err}");
    assert!(u.tokens().is_empty());
}

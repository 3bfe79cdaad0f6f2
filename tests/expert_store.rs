//! The streaming expert store: output never depends on the memory plan.
//! Logits and greedy output must be bit-identical whatever the expert cache
//! size (from one layer's top-k to every expert), the I/O mode, the
//! prefetch policy and the thread count — and the counters must show the
//! store actually streamed.

mod common;

use common::{fixture, fixture_tokens, synth_preset};
use moeflux::experts::{Budget, IoMode};
use moeflux::model::Prefetch;
use moeflux::quant::GgmlType;
use moeflux::sampling::argmax;
use moeflux::{Engine, EngineOptions};

fn opts(budget: Budget, io: IoMode, prefetch: Prefetch, threads: usize) -> EngineOptions {
    EngineOptions {
        budget: Some(budget),
        io,
        prefetch,
        threads,
        ..Default::default()
    }
}

/// All logits of the prompt, then 8 greedy steps' logits, as raw bits.
fn run(rel: &str, o: EngineOptions) -> (Vec<u32>, Engine) {
    run_path(&fixture(rel), o)
}

fn run_path(path: &std::path::Path, o: EngineOptions) -> (Vec<u32>, Engine) {
    let rel = path.display();
    let engine = Engine::open(path, o).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let tokens = fixture_tokens("qwen3_moe");
    let mut s = engine.new_session();
    let mut bits: Vec<u32> = s
        .eval_all(&tokens)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let mut last = s.eval(&[]).unwrap();
    for _ in 0..8 {
        let t = argmax(&last);
        last = s.eval(&[t]).unwrap();
        bits.extend(last.iter().map(|v| v.to_bits()));
    }
    (bits, engine)
}

fn check_family(rel: &str) {
    check_path(&fixture(rel));
}

fn check_path(path: &std::path::Path) {
    let rel = path.display().to_string();
    let rel = rel.as_str();
    let all = Budget::Total(1 << 30);
    let (baseline, engine) = run_path(path, opts(all, IoMode::Direct, Prefetch::Off, 2));
    let total = engine.plan().input.total_experts;
    let slot = engine.plan().input.slot_bytes;
    assert!(engine.plan().all_resident());
    let variants = [
        (
            "min cache",
            Budget::ExpertCacheMin,
            IoMode::Direct,
            Prefetch::Off,
            2,
        ),
        (
            "min cache, lookahead",
            Budget::ExpertCacheMin,
            IoMode::Direct,
            Prefetch::Lookahead,
            2,
        ),
        (
            "min cache, buffered",
            Budget::ExpertCacheMin,
            IoMode::Buffered,
            Prefetch::Off,
            1,
        ),
        (
            "a third of the experts",
            Budget::ExpertCache(slot * total / 3),
            IoMode::Direct,
            Prefetch::Lookahead,
            1,
        ),
        (
            "half, buffered",
            Budget::ExpertCache(slot * total / 2),
            IoMode::Buffered,
            Prefetch::Lookahead,
            2,
        ),
        (
            "everything, lookahead, 1 thread",
            all,
            IoMode::Direct,
            Prefetch::Lookahead,
            1,
        ),
    ];
    for (name, budget, io, prefetch, threads) in variants {
        let (bits, engine) = run_path(path, opts(budget, io, prefetch, threads));
        let first_diff = bits.iter().zip(&baseline).position(|(a, b)| a != b);
        assert!(
            first_diff.is_none(),
            "{rel}, {name}: output differs at value {first_diff:?}"
        );
        let st = engine.store_stats();
        assert!(
            st.total.misses > 0 && st.total.bytes_read > 0,
            "{rel}, {name}: nothing was read: {st:?}"
        );
        if matches!(budget, Budget::ExpertCacheMin) {
            assert_eq!(st.slots as u64, engine.config().n_experts_used as u64);
            // With only top-k slots, almost every request misses.
            assert!(
                st.total.misses > st.total.hits,
                "{rel}, {name}: {:?}",
                st.total
            );
        }
    }
}

#[test]
fn hf_checkpoint_is_plan_independent() {
    check_family("qwen3_moe/hf");
}

#[test]
fn gguf_k_quants_are_plan_independent() {
    check_family("qwen3_moe_k/gguf/qwen3_moe_k-Q4_K.gguf");
}

#[test]
fn mlx_checkpoint_is_plan_independent() {
    check_family("qwen3_moe/mlx");
}

// The hybrids: recurrent state and shared experts beside the store.
#[test]
fn hybrid_checkpoints_are_plan_independent() {
    check_family("qwen3_5_moe/hf");
    check_family("qwen3_5_moe/mlx");
    check_family("qwen3_next/gguf/qwen3_next-Q8_0.gguf");
}

#[test]
fn synthetic_hybrid_is_plan_independent() {
    let dir = tempfile::tempdir().unwrap();
    check_path(&synth_preset(
        dir.path(),
        "tiny-qwen35moe",
        None,
        GgmlType::Q4_K,
    ));
}

#[test]
fn a_budget_that_cannot_hold_one_layer_is_refused_with_numbers() {
    let o = opts(Budget::Total(1 << 20), IoMode::Direct, Prefetch::Off, 1);
    let e = Engine::open(&fixture("qwen3_moe/hf"), o).expect_err("refused");
    let msg = e.to_string();
    assert!(msg.contains("cannot hold the dense weights"), "{msg}");
    assert!(msg.contains("at least"), "{msg}");
}

#[test]
fn a_full_cache_stops_reading() {
    let (_, engine) = run(
        "qwen3_moe/hf",
        opts(Budget::Total(1 << 30), IoMode::Direct, Prefetch::Off, 2),
    );
    let st = engine.store_stats();
    // Each expert is read at most once when everything fits.
    assert!(
        st.total.misses <= engine.plan().input.total_experts,
        "{:?}",
        st.total
    );
    assert!(st.total.hits > 0);
}

/// Every logit of a fresh session's prompt, as raw bits.
fn prompt_bits(engine: &Engine, tokens: &[u32]) -> Vec<u32> {
    let mut s = engine.new_session();
    let logits = s.eval_all(tokens).unwrap();
    logits.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn preloading_makes_the_model_resident_and_changes_nothing() {
    let rel = "qwen3_moe_k/gguf/qwen3_moe_k-Q4_K.gguf";
    let all = opts(Budget::Total(1 << 30), IoMode::Direct, Prefetch::Off, 2);
    let (baseline, _) = run(rel, all.clone());

    let engine = Engine::open(&fixture(rel), all).unwrap();
    let total = engine.plan().input.total_experts as usize;
    let mut calls = Vec::new();
    let n = engine.preload_experts(|d, t| calls.push((d, t))).unwrap();
    assert_eq!(n, total);
    assert_eq!(calls.last(), Some(&(total, total)), "{calls:?}");
    // A second preload has nothing left to read.
    assert_eq!(engine.preload_experts(|_, _| {}).unwrap(), 0);
    let before = engine.store_stats();
    let tokens = fixture_tokens("qwen3_moe");
    let bits = prompt_bits(&engine, &tokens);
    assert_eq!(bits[..], baseline[..bits.len()]);
    let after = engine.store_stats().since(&before);
    assert_eq!(after.total.misses, 0, "{:?}", after.total);
    assert!(after.total.hits > 0);

    // With room for a third of the experts, preload fills the cache and
    // stops; streaming then stays exact.
    let slot = engine.plan().input.slot_bytes;
    let third = opts(
        Budget::ExpertCache(slot * total as u64 / 3),
        IoMode::Direct,
        Prefetch::Off,
        2,
    );
    let engine = Engine::open(&fixture(rel), third).unwrap();
    let slots = engine.store_stats().slots;
    assert_eq!(engine.preload_experts(|_, _| {}).unwrap(), slots);
    let bits = prompt_bits(&engine, &tokens);
    assert_eq!(bits[..], baseline[..bits.len()]);
}

/// A synthetic model with more layers than the fixtures (so lookahead has
/// layers to read ahead for), written by `moeflux synth`'s library code.
fn synth_model(dir: &std::path::Path, skew: Option<f64>) -> std::path::PathBuf {
    synth_preset(dir, "tiny-qwen3moe", skew, GgmlType::Q4_K)
}

#[test]
fn synthetic_model_is_plan_independent() {
    let dir = tempfile::tempdir().unwrap();
    check_path(&synth_model(dir.path(), None));
}

/// Q4_0 experts are interleaved by eight rows by the reader threads as
/// they arrive (on CPUs with the eight-row kernel): every cache size must
/// still give the same bits.
#[test]
fn synthetic_q4_0_model_is_plan_independent() {
    let dir = tempfile::tempdir().unwrap();
    check_path(&synth_preset(
        dir.path(),
        "tiny-qwen3moe",
        None,
        GgmlType::Q4_0,
    ));
}

#[test]
fn lookahead_prefetch_reads_ahead_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth_model(dir.path(), Some(1.0));
    let probe = Engine::open(
        &path,
        opts(Budget::Total(1 << 30), IoMode::Direct, Prefetch::Off, 2),
    )
    .unwrap();
    let (slot, total) = (
        probe.plan().input.slot_bytes,
        probe.plan().input.total_experts,
    );
    drop(probe);
    let half = Budget::ExpertCache(slot * total / 2);
    let (off_bits, off) = run_path(&path, opts(half, IoMode::Direct, Prefetch::Off, 2));
    let (on_bits, on) = run_path(&path, opts(half, IoMode::Direct, Prefetch::Lookahead, 2));
    assert_eq!(off_bits, on_bits, "prefetch changed the output");
    let (a, b) = (off.store_stats().total, on.store_stats().total);
    assert_eq!(a.prefetched, 0);
    assert!(b.prefetched > 0, "{b:?}");
    // Requests served by a prefetch are ones that would otherwise miss.
    assert!(b.prefetch_hits > 0, "{b:?}");
    assert_eq!(a.requests(), b.requests(), "the same requests were made");
    assert!(
        b.misses < a.misses,
        "prefetch saved no miss: off {a:?}, on {b:?}"
    );
}

//! The GPU forward pass end to end (`--backend gpu`), on the tiny fixture
//! models, against the same references as the CPU tests (transformers,
//! and transformers on the dequantized weights of each GGUF type: the GPU
//! computes f32 activations with dequantized weights, i.e. the CPU's
//! reference level) and against the CPU itself; and the expert store's
//! standing test on the GPU: output never depends on the memory plan
//! (GPU arena and host cache sizes).
//!
//! Runs on lavapipe in CI. Without an adapter the tests fail, naming the
//! cause, unless `MOEFLUX_GPU_TESTS=skip` is set.

mod common;

use common::{
    all_logits, assert_logits, fixture, fixture_ref, fixture_tokens, greedy, ref_ids, F32_REL,
};
use moeflux::engine::Backend;
use moeflux::experts::Budget;
use moeflux::sampling::argmax;
use moeflux::state::KvType;
use moeflux::{Engine, EngineOptions};

/// Whether GPU tests are told to skip (then only when no adapter opens).
fn skip() -> bool {
    if !std::env::var("MOEFLUX_GPU_TESTS").is_ok_and(|v| v == "skip") {
        return false;
    }
    match moeflux::backend::gpu::Gpu::shared() {
        Ok(_) => false,
        Err(e) => {
            eprintln!("skipping a GPU test (MOEFLUX_GPU_TESTS=skip): {e}");
            true
        }
    }
}

fn gpu_opts(kv_type: KvType) -> EngineOptions {
    EngineOptions {
        backend: Backend::Gpu,
        kv_type,
        threads: 2,
        ..Default::default()
    }
}

fn open(rel: &str, o: EngineOptions) -> Engine {
    let e = Engine::open(&fixture(rel), o).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert!(e.on_gpu() || e.backend() == "cpu", "{rel}: {}", e.backend());
    e
}

fn open_gpu(rel: &str) -> Engine {
    let e = open(rel, gpu_opts(KvType::F32));
    assert!(e.on_gpu(), "{rel}: {}", e.backend());
    e
}

/// A family's Hugging Face copy on the GPU against transformers (logits,
/// greedy continuation) and the CPU (greedy).
fn hf_matches(family: &str) {
    let tokens = fixture_tokens(family);
    let reference = fixture_ref(family, "hf_logits").to_f32().unwrap();
    let want = ref_ids(family, "hf_greedy");
    let engine = open_gpu(&format!("{family}/hf"));
    let what = format!("{family} HF on the GPU");
    let ours = all_logits(&engine, &tokens);
    assert_logits(&what, &ours, &reference, engine.vocab(), F32_REL, 1.0);
    let ours = greedy(&engine, &tokens, want.len());
    assert_eq!(ours, want, "{what}: greedy vs transformers");
    let cpu = common::open_at(
        &format!("{family}/hf"),
        moeflux::backend::cpu::kernels::Level::Reference,
    );
    assert_eq!(
        ours,
        greedy(&cpu, &tokens, want.len()),
        "{what}: greedy vs CPU"
    );
}

/// A family's GGUF of type `ty` against transformers run on its
/// dequantized weights (tight: the GPU has f32 activations), greedy
/// included.
fn gguf_matches_dequantized(family: &str, ty: &str) {
    let tokens = fixture_tokens(family);
    let dequant = fixture_ref(family, &format!("gguf_{ty}_dequant_logits"))
        .to_f32()
        .unwrap();
    let engine = open_gpu(&format!("{family}/gguf/{family}-{ty}.gguf"));
    let what = format!("{family} {ty} on the GPU vs dequantized reference");
    let ours = all_logits(&engine, &tokens);
    assert_logits(&what, &ours, &dequant, engine.vocab(), F32_REL, 1.0);
    let want = ref_ids(family, &format!("gguf_{ty}_dequant_greedy"));
    assert_eq!(greedy(&engine, &tokens, want.len()), want, "{what}: greedy");
}

/// A family's F32 GGUF against llama.cpp and transformers, greedy included.
fn gguf_f32_matches(family: &str) {
    let tokens = fixture_tokens(family);
    let engine = open_gpu(&format!("{family}/gguf/{family}-F32.gguf"));
    let ours = all_logits(&engine, &tokens);
    for (who, r) in [
        ("llama.cpp", "gguf_F32_logits"),
        ("transformers", "hf_logits"),
    ] {
        let reference = fixture_ref(family, r).to_f32().unwrap();
        let what = format!("{family} GGUF F32 on the GPU vs {who}");
        assert_logits(&what, &ours, &reference, engine.vocab(), F32_REL, 1.0);
    }
    let want = ref_ids(family, "gguf_F32_greedy");
    assert_eq!(
        greedy(&engine, &tokens, want.len()),
        want,
        "{family} F32: greedy"
    );
}

/// A family's MLX copy against its dequantized reference, greedy included.
fn mlx_matches(family: &str) {
    let tokens = fixture_tokens(family);
    let reference = fixture_ref(family, "mlx_logits").to_f32().unwrap();
    let engine = open_gpu(&format!("{family}/mlx"));
    let what = format!("{family} MLX on the GPU");
    let ours = all_logits(&engine, &tokens);
    assert_logits(&what, &ours, &reference, engine.vocab(), F32_REL, 1.0);
    let want = ref_ids(family, "mlx_greedy");
    assert_eq!(greedy(&engine, &tokens, want.len()), want, "{what}: greedy");
}

#[test]
fn hf_checkpoint_matches_transformers_and_the_cpu() {
    if skip() {
        return;
    }
    hf_matches("qwen3_moe");
}

/// Every quantized GGUF type against transformers run on its dequantized
/// weights.
#[test]
fn gguf_types_match_their_dequantized_references() {
    if skip() {
        return;
    }
    for (family, ty) in [
        ("qwen3_moe", "F16"),
        ("qwen3_moe", "Q8_0"),
        ("qwen3_moe", "Q4_0"),
        ("qwen3_moe_k", "Q4_K"),
        ("qwen3_moe_k", "Q6_K"),
    ] {
        gguf_matches_dequantized(family, ty);
    }
}

#[test]
fn gguf_f32_matches_llama_cpp_and_transformers() {
    if skip() {
        return;
    }
    gguf_f32_matches("qwen3_moe");
}

#[test]
fn mlx_checkpoint_matches_its_dequantized_reference() {
    if skip() {
        return;
    }
    mlx_matches("qwen3_moe");
}

/// The f16 KV cache on the GPU (rounded as the CPU rounds) stays within
/// the f32 tolerance of transformers, as the CPU's does.
#[test]
fn f16_kv_cache_stays_close() {
    if skip() {
        return;
    }
    let tokens = fixture_tokens("qwen3_moe");
    let reference = fixture_ref("qwen3_moe", "hf_logits").to_f32().unwrap();
    let engine = open("qwen3_moe/hf", gpu_opts(KvType::F16));
    assert_logits(
        "qwen3_moe HF on the GPU, f16 KV",
        &all_logits(&engine, &tokens),
        &reference,
        engine.vocab(),
        F32_REL,
        1.0,
    );
}

/// All logits of the prompt, then 6 greedy steps' logits, as raw bits.
fn bits(engine: &Engine, tokens: &[u32]) -> Vec<u32> {
    let mut s = engine.new_session();
    let mut out: Vec<u32> = s
        .eval_all(tokens)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let mut last = s.eval(&[]).unwrap();
    for _ in 0..6 {
        last = s.eval(&[argmax(&last)]).unwrap();
        out.extend(last.iter().map(|v| v.to_bits()));
    }
    out
}

/// Asserts `got` has `want`'s bits, naming the first that differs.
fn assert_same_bits(got: &[u32], want: &[u32], what: &str) {
    let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(first_diff.is_none(), "{what}: differs at {first_diff:?}");
    assert_eq!(got.len(), want.len(), "{what}");
}

/// Prompt chunking (the causal multi-query attention at a nonzero start)
/// changes no bit: every query's arithmetic depends only on its position.
#[test]
fn prefill_chunking_changes_nothing() {
    if skip() {
        return;
    }
    let tokens = fixture_tokens("qwen3_moe");
    let whole = bits(&open_gpu("qwen3_moe/hf"), &tokens);
    for ubatch in [1, 3] {
        let engine = open(
            "qwen3_moe/hf",
            EngineOptions {
                ubatch,
                ..gpu_opts(KvType::F32)
            },
        );
        assert!(
            bits(&engine, &tokens) == whole,
            "chunks of {ubatch} differ from one chunk"
        );
    }
}

/// Principle 2 on the GPU: identical bits whatever the GPU arena size
/// (one slot, one layer's top-k, a third of the experts, all of them) and
/// host cache size; the counters show the tiers really evicted and
/// uploaded.
#[test]
fn output_does_not_depend_on_the_memory_plan() {
    if skip() {
        return;
    }
    let copy_queue = std::env::var("MOEFLUX_GPU_COPY_QUEUE").is_ok_and(|v| v == "shared");
    // A hybrid too: its experts stream the same way, between the Gated
    // DeltaNet layers' dispatches.
    for (family, rel) in [
        ("qwen3_moe", "qwen3_moe/gguf/qwen3_moe-Q8_0.gguf"),
        ("qwen3_moe", "qwen3_moe/mlx"),
        ("qwen3_5_moe", "qwen3_5_moe/gguf/qwen3_5_moe-Q8_0.gguf"),
    ] {
        let tokens = fixture_tokens(family);
        let base = open(rel, gpu_opts(KvType::F16));
        let want = bits(&base, &tokens);
        let st = base.gpu_stats().unwrap();
        let total = base.plan().input.total_experts;
        assert_eq!(
            st.slots as u64, total,
            "{rel}: all experts resident by default"
        );
        let k = base.config().n_experts_used as u64;
        let per_layer = total / base.config().n_layers as u64;
        for (name, slots, host) in [
            ("1 GPU slot, min host cache", 1, Budget::ExpertCacheMin),
            ("top-k GPU slots", k, Budget::Total(1 << 30)),
            (
                "a layer's experts less one",
                per_layer - 1,
                Budget::ExpertCacheMin,
            ),
            ("a third", total / 3, Budget::Total(1 << 30)),
        ] {
            let engine = open(
                rel,
                EngineOptions {
                    gpu_mem: Some(slots * st.slot_bytes),
                    budget: Some(host),
                    ..gpu_opts(KvType::F16)
                },
            );
            assert_same_bits(&bits(&engine, &tokens), &want, &format!("{rel}, {name}"));
            let g = engine.gpu_stats().unwrap();
            assert_eq!(g.slots as u64, slots, "{rel}, {name}");
            assert!(
                g.misses > g.slots as u64 && g.bytes_uploaded > 0,
                "{rel}, {name}: the GPU arena never evicted: {g:?}"
            );
            if slots == 1 {
                assert!(g.misses > g.hits, "{rel}, {name}: {g:?}");
            }
            // With a copy queue (CI asks for one on lavapipe's single
            // queue), decode steps copy the experts the next layer's
            // router is predicted to pick into slots the step has not
            // used: here a third of the experts fit, so some are, and
            // some of those get used — and the bits above did not move.
            if copy_queue && name == "a third" {
                assert!(
                    g.prefetched > 0 && g.prefetch_hits > 0,
                    "{rel}, {name}: nothing prefetched: {g:?}"
                );
            }
        }
    }
}

/// A snapshot of a GPU session reads its KV cache back: restoring it (on
/// the GPU or on the CPU) continues exactly where it was.
#[test]
fn snapshots_cross_backends() {
    if skip() {
        return;
    }
    let tokens = fixture_tokens("qwen3_moe");
    let (head, tail) = tokens.split_at(tokens.len() / 2);
    let gpu = open_gpu("qwen3_moe/hf");
    let mut s = gpu.new_session();
    s.eval(head).unwrap();
    let snap = s.snapshot().unwrap();
    let want = s.eval(tail).unwrap();
    let mut r = gpu.new_session();
    r.restore(&snap).unwrap();
    assert_eq!(r.eval(tail).unwrap(), want, "restored on the GPU");
    let cpu = common::open_at(
        "qwen3_moe/hf",
        moeflux::backend::cpu::kernels::Level::Reference,
    );
    let mut c = cpu.new_session();
    c.restore(&snap).unwrap();
    let got = c.eval(tail).unwrap();
    assert_logits(
        "GPU snapshot on the CPU",
        &got,
        &want,
        cpu.vocab(),
        F32_REL,
        1.0,
    );
}

/// `Auto` never picks a software rasterizer; `Gpu` refuses what the GPU
/// path cannot run (a KV cache type) with a typed error naming what is
/// missing, and `Auto` falls back to the CPU for it.
#[test]
fn backend_selection() {
    if skip() {
        return;
    }
    let auto = EngineOptions {
        backend: Backend::Auto,
        threads: 2,
        ..Default::default()
    };
    let engine = Engine::open(&fixture("qwen3_moe/hf"), auto.clone()).unwrap();
    let software = moeflux::backend::gpu::Gpu::shared()
        .map(|g| g.is_software())
        .unwrap_or(true);
    assert_eq!(engine.on_gpu(), !software, "{}", engine.backend());

    // The hybrids run on the GPU when asked, and like any model only on a
    // hardware adapter under Auto.
    let hybrid = fixture("qwen3_5_moe/hf");
    let engine = Engine::open(&hybrid, gpu_opts(KvType::F16)).unwrap();
    assert!(engine.on_gpu(), "{}", engine.backend());
    let engine = Engine::open(&hybrid, auto.clone()).unwrap();
    assert_eq!(engine.on_gpu(), !software, "{}", engine.backend());

    // A cache type the GPU kernels cannot read: refused on the GPU,
    // the CPU under Auto, saying why.
    let err = Engine::open(&fixture("qwen3_moe/hf"), gpu_opts(KvType::Q8_0))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("q8_0 KV cache"), "{err}");
    let q8 = EngineOptions {
        kv_type: KvType::Q8_0,
        ..auto
    };
    let engine = Engine::open(&fixture("qwen3_moe/hf"), q8).unwrap();
    assert!(
        !engine.on_gpu() && engine.backend().contains("q8_0"),
        "{}",
        engine.backend()
    );
}

/// A GPU that shares host memory (lavapipe in CI, Apple silicon) takes its
/// buffers from the memory the plan budgets: the plan counts them, the
/// host's expert slots get what they leave, and a GPU arena that leaves
/// the host too little is refused, naming the GPU. Output never changes.
/// (With the GPU's own copies of experts: reading them in place, where the
/// device can, is the next test's.)
#[test]
fn a_gpu_in_host_memory_is_in_the_plan() {
    if skip() {
        return;
    }
    let rel = "qwen3_moe/gguf/qwen3_moe-Q8_0.gguf";
    let tokens = fixture_tokens("qwen3_moe");
    let gpu_opts = |kv| EngineOptions {
        gpu_in_place: false,
        ..gpu_opts(kv)
    };
    let base = open(rel, gpu_opts(KvType::F16));
    let want = bits(&base, &tokens);
    let p = base.plan().input;
    let shares = moeflux::backend::gpu::Gpu::shared()
        .unwrap()
        .shares_host_memory();
    if !shares {
        assert_eq!(p.gpu_bytes, 0, "a discrete GPU is not in the host plan");
        return;
    }
    let g = base.gpu_stats().unwrap();
    let total = p.total_experts;
    assert_eq!(g.slots as u64, total);
    let gpu_arena = total * g.slot_bytes;
    assert!(
        p.gpu_bytes > gpu_arena + p.kv_bytes,
        "the plan counts the GPU's slots, KV cache and dense weights: {p:?}"
    );
    assert!(base.plan().summary().contains("+ GPU"));

    // A budget where the host's slots alone would hold every expert, but
    // not beside a GPU holding its own copies of them all.
    let host_fixed = p.dense_bytes + p.kv_bytes + p.scratch_bytes;
    let gpu_fixed = p.gpu_bytes - gpu_arena;
    let budget = host_fixed + gpu_fixed + total * (p.slot_bytes + g.slot_bytes) / 2;
    assert!(budget >= host_fixed + total * p.slot_bytes);
    let engine = open(
        rel,
        EngineOptions {
            budget: Some(Budget::Total(budget)),
            ..gpu_opts(KvType::F16)
        },
    );
    let plan = engine.plan();
    let g = engine.gpu_stats().unwrap();
    assert!(plan.total_bytes() <= budget, "{}", plan.summary());
    assert!(
        plan.input.gpu_bytes >= g.slots as u64 * g.slot_bytes + plan.input.kv_bytes,
        "{}",
        plan.summary()
    );
    assert!(
        plan.slots < total,
        "the host kept every expert beside the GPU's: {}",
        plan.summary()
    );
    assert_eq!(bits(&engine, &tokens), want, "output moved with the plan");

    // By default the GPU's slots get half of what the host's fixed part
    // and (estimated at the host's size) the GPU's leave: here room for
    // about half the experts.
    let split = 2 * host_fixed + total * g.slot_bytes;
    let engine = open(
        rel,
        EngineOptions {
            budget: Some(Budget::Total(split)),
            ..gpu_opts(KvType::F16)
        },
    );
    let g = engine.gpu_stats().unwrap();
    let half = total / 2;
    assert!(
        (half - 1..=half).contains(&(g.slots as u64)),
        "{} GPU slots of {total}: {}",
        g.slots,
        engine.plan().summary()
    );
    assert!(engine.plan().total_bytes() <= split);
    assert_eq!(bits(&engine, &tokens), want, "output moved with the plan");

    // --gpu-mem for every expert, under a budget with room for the host's
    // smallest cache only: refused before the GPU allocates, naming it.
    let k = base.config().n_experts_used as u64;
    let err = Engine::open(
        &fixture(rel),
        EngineOptions {
            budget: Some(Budget::Total(host_fixed + k * p.slot_bytes)),
            gpu_mem: Some(gpu_arena),
            ..gpu_opts(KvType::F16)
        },
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("GPU's allocations"), "{err}");
}

/// A GPU that shares host memory and imports it (lavapipe in CI; Vulkan on
/// integrated GPUs) reads streamed experts in place from the host's expert
/// cache: nothing is copied, its arena keeps a layer's top k only (for
/// experts that could not be read so), the host's cache gets the memory,
/// and the bits are those of a GPU holding every expert, with the host's
/// cache at a few slots or at half the experts. The GPU's own copies,
/// under the same budget, give the same bits too. The MLX fixture's
/// tensors start two bytes off a word (its safetensors header is 6494
/// bytes, unpadded), which the kernels cannot address: it keeps the GPU's
/// own copies, with the same bits; with `MOEFLUX_GPU_IN_PLACE=always` (a
/// run of CI) it is read in place anyway, and each of its experts is
/// copied into the arena's top-k slots instead, with the same bits. The
/// GGUFs (Q8_0, and Q4_K, whose products load 16 bytes at once) are read
/// in place.
#[test]
fn experts_are_read_in_place_on_a_gpu_in_host_memory() {
    if skip() {
        return;
    }
    let gpu = moeflux::backend::gpu::Gpu::shared().unwrap();
    if !gpu.reads_host_in_place() {
        eprintln!(
            "{}: no reads in place (not sharing host memory, or no import)",
            gpu.describe()
        );
        return;
    }
    // Q4_K: its products read 16 bytes at once, from 16-byte offsets.
    for rel in [
        "qwen3_moe/gguf/qwen3_moe-Q8_0.gguf",
        "qwen3_moe/mlx",
        "qwen3_moe_k/gguf/qwen3_moe_k-Q4_K.gguf",
    ] {
        let tokens = fixture_tokens(rel.split('/').next().unwrap_or_default());
        let base = open(rel, gpu_opts(KvType::F16));
        let want = bits(&base, &tokens);
        let p = base.plan().input;
        let g = base.gpu_stats().unwrap();
        let total = p.total_experts;
        assert_eq!(g.slots as u64, total, "{rel}: all experts in the GPU");
        assert_eq!(g.read_in_place, 0, "{rel}: {g:?}");
        let k = base.config().n_experts_used as u64;
        let host_fixed = p.dense_bytes + p.kv_bytes + p.scratch_bytes;
        let gpu_fixed = p.gpu_bytes - total * g.slot_bytes;
        for (name, cached) in [("2k host slots", 2 * k), ("half the experts", total / 2)] {
            let budget = host_fixed + gpu_fixed + k * g.slot_bytes + cached * p.slot_bytes;
            let opts = EngineOptions {
                budget: Some(Budget::Total(budget)),
                ..gpu_opts(KvType::F16)
            };
            let engine = open(rel, opts.clone());
            let (plan, g) = (engine.plan(), engine.gpu_stats().unwrap());
            let forced = std::env::var("MOEFLUX_GPU_IN_PLACE").is_ok_and(|v| v == "always");
            let aligned = rel.contains("gguf");
            let in_place = aligned || forced;
            assert!(plan.total_bytes() <= budget, "{}", plan.summary());
            assert!(plan.slots < total, "{}", plan.summary());
            if in_place {
                assert_eq!(g.slots as u64, k, "{rel}, {name}: {}", plan.summary());
                assert!(
                    plan.slots >= cached,
                    "{rel}, {name}: the host's cache did not get the memory: {}",
                    plan.summary()
                );
            }
            assert_same_bits(&bits(&engine, &tokens), &want, &format!("{rel}, {name}"));
            let g = engine.gpu_stats().unwrap();
            if aligned {
                assert!(
                    g.read_in_place > 0 && g.bytes_read_in_place > 0,
                    "{rel}, {name}: nothing read in place: {g:?}"
                );
                assert_eq!(g.bytes_uploaded, 0, "{rel}, {name}: {g:?}");
            } else if forced {
                assert!(
                    g.read_in_place == 0 && g.misses > g.slots as u64 && g.bytes_uploaded > 0,
                    "{rel}, {name}: arrays off a word were not copied: {g:?}"
                );
            } else {
                assert!(
                    g.read_in_place == 0 && g.bytes_uploaded > 0 && g.slots as u64 != k,
                    "{rel}, {name}: arrays off a word must keep the GPU's copies: {g:?}"
                );
            }

            let copies = open(
                rel,
                EngineOptions {
                    gpu_in_place: false,
                    ..opts
                },
            );
            assert_eq!(bits(&copies, &tokens), want, "{rel}, {name}: GPU copies");
            let g = copies.gpu_stats().unwrap();
            assert!(
                g.read_in_place == 0 && g.bytes_uploaded > 0,
                "{rel}, {name}: {g:?}"
            );
        }
    }
}

/// The Qwen hybrids (Gated DeltaNet, gated attention with partial RoPE,
/// shared experts) on the GPU: every copy of both fixtures against the
/// references the CPU tests use (transformers; transformers on each GGUF
/// type's dequantized weights; llama.cpp on the F32 GGUF; the dequantized
/// MLX reference), greedy continuations included, and against the CPU.
/// The four layouts of the linear layers' projections are all here:
/// Qwen3.5 HF (split), Qwen3.5 GGUF (split, value heads tiled), Qwen3-Next
/// HF (fused) and GGUF (b and a grouped).
#[test]
fn hybrids_match_their_references() {
    if skip() {
        return;
    }
    for family in ["qwen3_5_moe", "qwen3_next"] {
        hf_matches(family);
        gguf_f32_matches(family);
        for ty in ["F16", "Q8_0", "Q4_0"] {
            gguf_matches_dequantized(family, ty);
        }
    }
    mlx_matches("qwen3_5_moe");
}

/// A hybrid's prompt in chunks of any size gives the bits of one chunk
/// (the recurrent state carried between chunks in GPU memory), and so do
/// the decode steps after it.
#[test]
fn hybrid_prefill_chunking_changes_nothing() {
    if skip() {
        return;
    }
    let tokens = fixture_tokens("qwen3_5_moe");
    for rel in ["qwen3_5_moe/hf", "qwen3_next/gguf/qwen3_next-Q8_0.gguf"] {
        let whole = bits(&open_gpu(rel), &tokens);
        for ubatch in [1, 3, 7] {
            let engine = open(
                rel,
                EngineOptions {
                    ubatch,
                    ..gpu_opts(KvType::F32)
                },
            );
            assert_same_bits(
                &bits(&engine, &tokens),
                &whole,
                &format!("{rel}: chunks of {ubatch}"),
            );
        }
    }
}

/// A hybrid session's recurrent state lives in GPU memory and still does
/// what the CPU's does: a snapshot reads it back (restored on the GPU it
/// continues with the same bits, on the CPU within the f32 tolerance);
/// truncating resumes from a checkpoint read back from the GPU, or from
/// the start, with the bits of a fresh session; `reset` starts over.
#[test]
fn hybrid_session_state_on_the_gpu() {
    if skip() {
        return;
    }
    let raw = |v: &[f32]| -> Vec<u32> { v.iter().map(|x| x.to_bits()).collect() };
    let tokens = fixture_tokens("qwen3_5_moe");
    let (head, tail) = tokens.split_at(20);
    for rel in ["qwen3_5_moe/hf", "qwen3_next/gguf/qwen3_next-F32.gguf"] {
        let gpu = open_gpu(rel);
        let mut straight = gpu.new_session();
        straight.eval(head).unwrap();
        let want = straight.eval_all(tail).unwrap();

        let mut s = gpu.new_session();
        s.eval(head).unwrap();
        let snap = s.snapshot().unwrap();
        s.eval(&[5, 6, 7, 8, 9]).unwrap();
        s.restore(&snap).unwrap();
        assert_same_bits(
            &raw(&s.eval_all(tail).unwrap()),
            &raw(&want),
            &format!("{rel}: restored on the GPU"),
        );
        let cpu = common::open_at(rel, moeflux::backend::cpu::kernels::Level::Reference);
        let mut c = cpu.new_session();
        c.restore(&snap).unwrap();
        let got = c.eval_all(tail).unwrap();
        assert_logits(
            &format!("{rel}: GPU snapshot on the CPU"),
            &got,
            &want,
            cpu.vocab(),
            F32_REL,
            1.0,
        );
        // And a CPU snapshot on the GPU.
        let mut c = cpu.new_session();
        c.eval(head).unwrap();
        let mut g = gpu.new_session();
        g.restore(&c.snapshot().unwrap()).unwrap();
        let got = g.eval_all(tail).unwrap();
        assert_logits(
            &format!("{rel}: CPU snapshot on the GPU"),
            &got,
            &want,
            cpu.vocab(),
            F32_REL,
            1.0,
        );

        s.reset();
        s.eval(head).unwrap();
        assert_same_bits(
            &raw(&s.eval_all(tail).unwrap()),
            &raw(&want),
            &format!("{rel}: after reset"),
        );
    }

    let e = open_gpu("qwen3_5_moe/hf");
    common::truncate_resumes_from_checkpoints(&e, &tokens);
}

/// A hybrid whose b|a projections are F32 beside quantized q|k|v|z, as
/// GGUFs keep them and `moeflux synth` writes them: a decode step computes
/// b|a in a product of its own, beside the q|k|v|z product, and a prompt's
/// chunk after it (the same arithmetic). The GPU gives the CPU's logits,
/// and a prompt in chunks of one token (each a decode-shaped step) gives
/// the bits of one chunk.
#[test]
fn hybrid_with_a_b_a_product_of_its_own() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q4_0 = moeflux::quant::GgmlType::Q4_0;
    let path = common::synth_preset(dir.path(), "tiny-qwen35moe", None, q4_0);
    let tokens: Vec<u32> = (0..20u32).map(|i| (i * 37 + 11) % 1000).collect();
    let gpu = Engine::open(&path, gpu_opts(KvType::F32)).unwrap();
    assert!(gpu.on_gpu(), "{}", gpu.backend());
    let cpu = Engine::open(
        &path,
        EngineOptions {
            cpu_level: Some(moeflux::backend::cpu::kernels::Level::Reference),
            threads: 2,
            kv_type: KvType::F32,
            ..Default::default()
        },
    )
    .unwrap();
    assert_logits(
        "tiny-qwen35moe Q4_0 with F32 b|a: GPU against the CPU",
        &all_logits(&gpu, &tokens),
        &all_logits(&cpu, &tokens),
        cpu.vocab(),
        F32_REL,
        1.0,
    );
    let whole = bits(&gpu, &tokens);
    let one = Engine::open(
        &path,
        EngineOptions {
            ubatch: 1,
            ..gpu_opts(KvType::F32)
        },
    )
    .unwrap();
    assert_same_bits(&bits(&one, &tokens), &whole, "chunks of one token");
}

//! The GPU backend: WGSL compute kernels run through wgpu on Vulkan, Metal
//! or DX12 (feature `gpu`).
//!
//! - [`device`]: the shared [`Gpu`] context (adapter choice, limits read
//!   from the adapter, kernel variants, blocking helpers, buffers);
//! - [`kernels`]: the WGSL sources and their pipelines, compiled once per
//!   device;
//! - [`matrix`]: weights resident on the GPU, split by rows to fit the
//!   adapter's largest storage binding;
//! - [`pass`]: kernel dispatches recorded and submitted as one compute pass;
//! - [`model`]: the forward pass of a softmax-attention MoE model
//!   (Qwen3-MoE) on these kernels, the engine's one dispatch point
//!   (`Session::run` calls it instead of `Model::forward`);
//! - [`experts`]: the GPU tier of the expert store (a slot arena fed from
//!   the host slots);
//! - [`host_memory`]: the host slots imported into the device, so that
//!   the GPU copies experts from them by itself (Vulkan);
//! - [`copy_queue`]: a transfer-only Vulkan queue beside wgpu's, on which
//!   predicted experts are copied while the GPU computes;
//! - [`kv`]: a session's KV cache in GPU memory;
//!
//! - [`profile`]: GPU time per kernel from timestamps
//!   (`MOEFLUX_GPU_PROFILE=1 moeflux bench ...` prints it).
//!
//! Every kernel is checked against the CPU reference in
//! `tests/gpu_kernels.rs` (on lavapipe in CI), in every variant the adapter
//! runs, and every WGSL module is translated to MSL there, so the Metal
//! path compiles on every commit.
//!
//! # Status
//! Kernels and their tests: quantized matrix products (Q8_0, Q4_0, Q4_K,
//! Q6_K, F32/F16/BF16, MLX 4/8-bit; one token or a chunk; alone, into
//! columns of a wider buffer, added into it, or batched over experts with
//! SwiGLU fused), RMSNorm, the attention block's q/k norms + RoPE + K/V
//! cache writes in one kernel (f16 rounded exactly as the CPU), causal
//! attention over spans of the context with a merge, MoE routing
//! (softmax, top-k, renormalisation), row gather, MoE combine; RMSNorm
//! inside the product that first reads its output, and one token's expert
//! down products with the combine in one dispatch.
//! End to end ([`GpuModel`], `--backend gpu`): Qwen3-MoE decode and
//! prefill, checked against the fixtures' transformers references, the
//! CPU, and for independence from the GPU arena and host cache sizes and
//! from prompt chunking (`tests/gpu_model.rs`). With every expert in GPU
//! memory a decode token runs without a host round trip (submitted in
//! pieces: see the dispatch plan); otherwise one submit-and-wait per layer
//! brings the routed experts in.
//! The Qwen hybrids (Qwen3.5 / Qwen3-Next) run too: Gated DeltaNet layers
//! in one dispatch a chunk (`delta_net.wgsl`, their recurrent state in
//! the session's [`GpuKv`]), gated attention (the gate's rows after v in
//! the q|k|v product, `output_gate.wgsl`), shared experts (`swiglu.wgsl`).
//! Not yet: lookahead prefetch off Vulkan (Metal and DX12 have no second
//! queue through wgpu) and dense FFN layers.

//! # Buffers
//! - **Activations** are f32, row-major, `n × width` (`n` tokens), one
//!   storage buffer per role (hidden state, normed state, q|k|v side by
//!   side, attention output, SwiGLU output, ...), allocated once per model
//!   for the largest prefill chunk and reused by every layer.
//! - **Weights** ([`GpuMatrix`]) keep their file bytes: GGML rows of blocks
//!   (`rows × row_bytes`), or MLX's three arrays (packed words, scales,
//!   biases). Blocks are not word-aligned (Q4_0 is 18 bytes, Q6_K 210), so
//!   kernels bind `array<u32>` and assemble bytes with shifts; f16 fields are
//!   widened exactly ([`Variant::f16_native`] picks `unpack2x16float` or
//!   integer operations). q, k and v of a layer are stacked into one
//!   matrix when they share a format.
//! - **KV cache** ([`GpuKv`], one per session): per attention layer two
//!   buffers of `capacity × stride` values, f16 (two per word) or f32;
//!   position `j` at `j · stride`, KV group `g` at `+ g · head_dim` (the
//!   CPU cache's layout, see `state::kv`), so snapshots read it back into
//!   the CPU's form and either backend can restore them.
//! - **Experts** ([`GpuExperts`]): equal-sized slots in a few pool buffers
//!   (each within the largest storage binding and 2 GiB), every array of a
//!   slot (gate, up, down; MLX: each with scales and biases) at a fixed
//!   offset, sized for the largest expert; a host map `(layer, expert) →
//!   slot`, LRU eviction; a miss is staged through the host store. With a
//!   slot for every expert, expert `e` of layer `l` has its own slot and a
//!   pool holds whole layers, so one dispatch reaches any of a layer's
//!   experts. A layer whose experts exceed the arena runs in waves, each
//!   submitted before the next overwrites slots (`write_buffer` lands
//!   before the next submission). Where the device imports host memory
//!   (Vulkan's `VK_EXT_external_memory_host`: NVIDIA, lavapipe), the host
//!   store's arena is imported once and a miss is a copy command from its
//!   host slot, submitted at once (it lands like a queue write: after
//!   earlier submissions, before the next); the host slot stays acquired
//!   until the copy is done, which the next layer's upload checks (the
//!   routing read-back between them has waited for it), so the host
//!   records products while the GPU copies. The copy engine reads pinned
//!   host memory, with no CPU work: on an H100, streamed decode went
//!   13 → 24 tok/s, and 24 → 27 without the wait. Elsewhere uploads are
//!   queue writes whose copy into wgpu's staging memory runs on a pool of
//!   up to 16 threads (on a discrete GPU that memory is written across
//!   PCIe: ~25 GB/s on an H100 host with the pool, 6.7 GB/s with threads
//!   spawned per write). With a transfer-only queue family besides
//!   ([`copy_queue`]), a streamed decode step also guesses the next
//!   layer's experts (its router applied to the state after this layer's
//!   attention, read back with the routing) and copies them on that queue
//!   while wgpu's computes; a wave that uses one waits for its copy's
//!   timeline-semaphore value (H100: 28 → 37 tok/s). A layer's misses go
//!   on that queue too, ahead of the next layer's guesses, and only the
//!   ranks of the guess that are right often enough are copied
//!   ([`guess`]; H100: 37 → 40 tok/s).
//! - **RoPE angles**: the `(cos, sin)` of each token's angles are computed
//!   on the host exactly as the CPU does ([`rope_table`]) and uploaded once
//!   per step for all layers, so no result depends on GPU sin/cos accuracy.
//! - **Parameters**: a model's passes use a [`pass::ParamArena`]: every
//!   dispatch's parameter block sits at its own aligned offset
//!   (`min_uniform_buffer_offset_alignment`) of one uniform buffer, written
//!   with one `write_buffer` per submission (it takes effect before that
//!   submission starts, after the earlier ones, so blocks are reused from
//!   offset 0 by each submission), bound with a dynamic offset; bind
//!   groups are made once per (kernel, buffers) and cached, so recording a
//!   token creates no buffer and, once warm, no bind group. Pipelines for
//!   it have explicit layouts read from the WGSL with naga. A plain
//!   [`Pass::new`] (tests) still makes one uniform buffer per dispatch.
//!
//! # Binding split
//! A storage binding holds at most `max_storage_buffer_binding_size` bytes
//! (lavapipe 128 MiB, NVIDIA Vulkan about 2 GiB, Apple depends on the
//! device): read it, never assume it. A matrix is cut into parts of whole
//! rows, each in buffers of its own (`floor(limit / row_bytes)` rows, and at
//! most 2 GiB because kernel byte addresses are u32). Each part is one
//! dispatch writing its own columns `row0..row0 + rows` of `Y`, so parts
//! need no combining step: a 151 936-row Q8_0 LM head at hidden 2048
//! (330 MB) is three dispatches on lavapipe and one on an H100.
//!
//! # Dispatch plan for one decode layer
//! On an H100 via Vulkan an empty dependent dispatch costs ~2.5–5 µs
//! inside a pass, but the small kernels of a layer take 10–20 µs each:
//! what costs is each kernel's own chain of dependent steps (a workgroup
//! waiting on memory, then on barriers), not the dispatch count alone —
//! measured by running one kind of dispatch twice, or an emptied copy of
//! it, inside a real decode step (bench/BENCHMARKS.md, 2026-11-26, fourth
//! GPU session). Nor do dependent stages chained inside one dispatch
//! help (workgroups taking tickets in launch order, a later stage's
//! spinning on the earlier stage's count, the hand-off through `@coherent`
//! buffers; measured 2026-11-27): ~2 µs saved a hand-off between stages of
//! a few workgroups, 15–30 µs lost between stages of 512 and more (the
//! waiting workgroups hold the SMs), and without `@coherent` the later
//! stage read stale data. A submit-and-wait costs ~80 µs. So a layer is as few
//! dispatches as the data flow allows (six for a decode step whose q, k
//! and v projections share a format, where a dispatch's last workgroup
//! may finish its work — `arrive.wgsl`, Vulkan; eight otherwise; two more
//! for separate q, k and v products), and a
//! token a few submissions (after layers 2, 8, 16, 24, ..., so the GPU
//! starts while the host encodes the rest). Kernels are compiled without
//! naga's loop bounding (`kernels::RUNTIME_CHECKS`: a per-loop counter
//! that cost about a seventh of a decode step), and a product's last
//! reductions (but the combine's, one a job) end without a closing
//! barrier:
//! 1. the q|k|v product (one matrix when stacked) of the RMS-normalised
//!    hidden state, each workgroup summing the mean square beside its
//!    product and scaling after the sum (`Batch::OneNormed`);
//! 2. attention over spans of the context, each workgroup first doing
//!    `attention_prep`'s work for its own query head (q RMSNorm, RoPE) and,
//!    in the span holding the new position, for its K/V head (k RMSNorm,
//!    RoPE, rounding to the cache's format, one writer a group); then the
//!    merge of the spans, by each head's last workgroup to finish (or by a
//!    dispatch of its own where the last workgroup may not finish; none
//!    when one span holds the whole context — up to 64 positions, or any
//!    length when the scratch holds one span a query and head — its
//!    workgroups then write the output themselves).
//!    Prompts (several tokens) run `attention_prep` as a dispatch of its
//!    own first; both give the same bits (on drivers
//!    that give the two pipelines one subgroup size: see attention.wgsl);
//! 3. the output projection added into the hidden state;
//! 4. the router product, normalising the hidden state with the FFN norm
//!    and storing the normalised rows for the experts;
//! 5. the routing (`route.wgsl`: softmax, top-k by ranks; with every
//!    expert resident it also writes the expert jobs), in the router
//!    product's last workgroup (`Batch::Router`) or as `moe_route`;
//! 6. one product for every routed expert's gate and up with SwiGLU;
//! 7. one for their down projections, weighted and added to the hidden
//!    state in the same dispatch (`Batch::ExpertsCombine`; a workgroup a
//!    job's rows, the row group's last adding them up, was slower: 206 →
//!    193 tok/s, Q4_0 on an H100; again with the eight sums loaded at
//!    once: 1.02 → 1.07 ms a token).
//!
//! When experts must come from the host, step 5's choices are read back
//! (the layer's one round trip), the host writes the jobs of the experts
//! it brought in, and step 7 is a down product and a separate
//! `moe_combine` (they give the same bits as the fused one). A decode
//! product's workgroup (128 threads) handles four rows of one token
//! (`Batch::Router`: one row), with neighbouring threads on neighbouring
//! weights (`matmul.wgsl`; Q4_K a 16-byte chunk of quants and one row a thread,
//! the others eight weights of all the workgroup's rows); a
//! prompt's products run in tiles of up to 64 rows × 64 tokens that decode
//! each weight once for the tile's tokens (`matmul_tiled.wgsl`). The two
//! sum in different orders, so every chunk of a prompt, one token long or
//! not, takes the tiles ([`Pass::set_prompt`]).

pub mod copy_queue;
pub mod device;
pub mod experts;
pub mod guess;
pub mod host_memory;
pub mod kernels;
pub mod kv;
pub mod matrix;
pub mod model;
pub mod pass;
pub mod profile;

/// The wgpu version the backend is built on, for callers that hold its
/// buffers.
pub use wgpu;

pub use device::{Gpu, GpuLimits, Reduce, Variant};
pub use experts::{GpuExpertStats, GpuExperts};
pub use kernels::{Kernel, WeightKind};
pub use kv::GpuKv;
pub use matrix::{GpuMatrix, MatShape};
pub use model::{GpuModel, GpuOptions};
pub use pass::{rope_table, AttentionShape, DeltaShape, Pass, SwigluGate};

/// Why the GPU backend could not do something.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter found: wgpu sees no Vulkan, Metal or DX12 device. Install the GPU's driver (on Linux without a GPU, Mesa's software Vulkan driver: `apt-get install mesa-vulkan-drivers`), check `WGPU_BACKEND` if set, or use the CPU backend")]
    NoAdapter,
    #[error("could not open the GPU device: {0}")]
    RequestDevice(String),
    #[error("GPU error: {0}")]
    Wgpu(String),
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),
    #[error("{what} needs {bytes} bytes, more than this GPU allows in one buffer ({limit})")]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },
    #[error("the GPU backend has no kernel for {0}")]
    Unsupported(String),
    #[error("the GPU backend cannot run this model yet: {0} (use --backend cpu)")]
    UnsupportedModel(String),
    #[error("GPU kernel {kernel}: {detail}")]
    Shape {
        kernel: &'static str,
        detail: String,
    },
}

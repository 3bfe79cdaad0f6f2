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
//! - [`kv`]: a session's KV cache in GPU memory.
//!
//! Every kernel is checked against the CPU reference in
//! `tests/gpu_kernels.rs` (on lavapipe in CI), in every variant the adapter
//! runs, and every WGSL module is translated to MSL there, so the Metal
//! path compiles on every commit.
//!
//! # Status
//! Kernels and their tests exist: quantized matmul (Q8_0, Q4_0, Q4_K, Q6_K,
//! F32/F16/BF16, MLX 4/8-bit; over a range of token rows), RMSNorm, NEOX
//! RoPE, SwiGLU, causal attention (one or many queries), K/V append (f16
//! rounded exactly as the CPU), residual add, row gather, MoE combine.
//! End to end ([`GpuModel`], `--backend gpu`): Qwen3-MoE decode and
//! prefill, checked against the fixtures' transformers references, the
//! CPU, and for independence from the GPU arena and host cache sizes
//! (`tests/gpu_model.rs`). Routing: the router logits are read back and
//! routed on the host by `Moe::route` itself (bit-exact expert choice and
//! weights; one submit-and-wait per layer).
//! Kernel parameters come from a per-model parameter arena with cached
//! bind groups (no buffer or bind group is made per token once warm).
//! Not yet: top-k on the GPU and the expert-indexed matmul (a whole token
//! in one submission when every expert is resident; today one
//! submit-and-wait per layer, ~75 µs each on an H100 via Vulkan, 3.6 ms a
//! token for 48 layers), fused Q/K/V matrices, a tiled prefill matmul, lookahead prefetch on the GPU path, the
//! delta-net step and gated attention (Qwen3.5 / Qwen3-Next are refused
//! with a typed error, or run on the CPU under `--backend auto`), shared
//! experts and dense FFN layers.

//! # Buffers
//! - **Activations** are f32, row-major, `n × width` (`n` tokens), one
//!   storage buffer per role (hidden state, normed state, q, k, v, attention
//!   output, gate, up, ...), to be allocated once per session for the
//!   largest prefill chunk and reused by every layer.
//! - **Weights** ([`GpuMatrix`]) keep their file bytes: GGML rows of blocks
//!   (`rows × row_bytes`), or MLX's three arrays (packed words, scales,
//!   biases). Blocks are not word-aligned (Q4_0 is 18 bytes, Q6_K 210), so
//!   kernels bind `array<u32>` and assemble bytes with shifts; f16 fields are
//!   widened exactly ([`Variant::f16_native`] picks `unpack2x16float` or
//!   integer operations).
//! - **KV cache** ([`GpuKv`], one per session): per attention layer two
//!   buffers of `capacity × stride` values, f16 (two per word) or f32;
//!   position `j` at `j · stride`, KV group `g` at `+ g · head_dim` (the
//!   CPU cache's layout, see `state::kv`), so snapshots read it back into
//!   the CPU's form and either backend can restore them.
//! - **Experts** ([`GpuExperts`]): equal-sized slots, one buffer per array
//!   (gate, up, down; MLX: each with scales and biases), sized for the
//!   largest expert; a host map `(layer, expert) → slot`, LRU eviction; a
//!   miss is staged through the host store. A layer whose experts exceed
//!   the arena runs in waves, each submitted before the next overwrites
//!   slots (`write_buffer` lands before the next submission).
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
//! - **Experts** ([`GpuExperts`]): equal-sized slots, one buffer per array
//!   (gate, up, down; MLX: each with scales and biases), sized for the
//!   largest expert; a host map `(layer, expert) → slot`, LRU eviction; a
//!   miss is staged through the host store. A layer whose experts exceed
//!   the arena runs in waves, each submitted before the next overwrites
//!   slots (`write_buffer` lands before the next submission).
//! - **RoPE angles**: the `(cos, sin)` of each token's angles are computed
//!   on the host exactly as the CPU does ([`rope_table`]) and uploaded once
//!   per step for all layers, so no result depends on GPU sin/cos accuracy.
//! - **Parameters**: a small uniform block per dispatch (today one buffer
//!   each; a per-step parameter arena, written once before the submission,
//!   should replace that: `Queue::write_buffer` takes effect before the
//!   next submission starts, so one buffer cannot carry two different
//!   parameter sets within one submission).
//!
//! # Binding split
//! A storage binding holds at most `max_storage_buffer_binding_size` bytes
//! (lavapipe 128 MiB, NVIDIA Vulkan about 2 GiB, Apple depends on the
//! device): read it, never assume it. A matrix is cut into parts of whole
//! rows, each in buffers of its own (`floor(limit / row_bytes)` rows, and at
//! most 2 GiB because kernel byte addresses are u32). Each part is one
//! dispatch writing its own columns `row0..row0 + rows` of `Y`, so parts
//! need no combining step: a 151 936-row Q8_0 LM head at hidden 2048
//! (330 MB) is three dispatches on lavapipe and one on an H100. Expert
//! slots will be equal-sized ranges of a few large arena buffers, bound with
//! offsets rounded to `min_storage_buffer_offset_alignment`.
//!
//! # Dispatch plan for one decode layer
//! Implemented today (stage 1): steps 1–6 with the router's logits read
//! back at the end of each layer's submission and routed on the host;
//! the next submission gathers the tokens' rows grouped by expert, runs
//! each chosen expert's gate/up matmuls over its rows, one SwiGLU, the
//! down matmuls, and the rank-ordered combine + residual, then continues
//! with the next layer's attention. The plan below is the target.
//!
//! One compute pass per layer, ideally per token, one submission (costs
//! measured on H100 via Vulkan: ~7 µs a dispatch inside a pass, ~55 µs a
//! separate pass, ~75 µs a submit-and-wait):
//! 1. RMSNorm of the hidden state;
//! 2. Q, K, V projections (one dispatch per matrix part; fusing them into
//!    one matrix of concatenated rows saves two dispatches);
//! 3. per-head q/k RMSNorm (rows = heads), RoPE of q and k;
//! 4. K/V append into the cache at the position (a small kernel: copies
//!    are not allowed inside a compute pass);
//! 5. decode attention (one workgroup per head), output gate where the
//!    model has one, output projection, residual add;
//! 6. RMSNorm, router projection, top-k and its normalisation on the GPU,
//!    writing expert ids and weights to a small buffer;
//! 7. resident experts computed at once from a GPU-side table
//!    `expert id → slot` (indirect dispatch), the shared expert alongside;
//! 8. the only host round trip: the ids are read back (mapped) so the
//!    expert store can fetch the misses; their FFNs run in a second pass
//!    when the bytes have arrived; the weighted combine adds expert outputs
//!    in router-rank order (principle 2) and the residual.
//!
//! With everything resident, steps 7–8 need no read-back and a whole token
//! is one submission. A matrix product's workgroup handles one row for
//! four tokens (`z` picks the token group), so decode (`n = 1`) reads
//! each weight once; prefill wants a tiled kernel that reuses each decoded
//! block for many more tokens.

pub mod device;
pub mod experts;
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
pub use pass::{rope_table, AttentionShape, Pass};

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

//! The WGSL kernels: their sources, how a kernel's module is assembled, and
//! the pipelines, compiled once per device and cached.
//!
//! A kernel's module is a short generated header (`WG` and the kernel's
//! constants), then the files of its [`Variant`]: the reduction (which
//! defines the entry point's `Lane` builtins and `wg_sum4`/`wg_max`) and
//! the f16 widening (`f16x2`), then the kernel's own files: for a matrix
//! product `matmul_common.wgsl`, its shape's skeleton (`matmul.wgsl` for
//! one token, `matmul_tiled.wgsl` for prompts) and one weight-format file
//! defining `part_cols` and `part`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::device::{Gpu, Reduce, Variant};
use super::GpuError;
use crate::quant::GgmlType;

/// Threads per workgroup of most kernels (some take two or four times as
/// many, see [`Kernel::workgroup_size`]): a power of two (the shared-memory
/// tree halves it). Any subgroup size works: wgpu's smallest is 4, so at
/// most WG / 4 subgroups need a slot; a subgroup larger than WG (128 on
/// some adapters) is simply partly idle.
pub const WG: u32 = 64;

const REDUCE_SHARED: &str = include_str!("kernels/reduce_shared.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("kernels/reduce_subgroup.wgsl");
const F16_NATIVE: &str = include_str!("kernels/f16_native.wgsl");
const F16_BITS: &str = include_str!("kernels/f16_bits.wgsl");
const MATMUL_COMMON: &str = include_str!("kernels/matmul_common.wgsl");
const MATMUL: &str = include_str!("kernels/matmul.wgsl");
const MATMUL_TILED: &str = include_str!("kernels/matmul_tiled.wgsl");
const Q8_0: &str = include_str!("kernels/q8_0.wgsl");
const Q4_0: &str = include_str!("kernels/q4_0.wgsl");
const Q4_K: &str = include_str!("kernels/q4_k.wgsl");
const Q6_K: &str = include_str!("kernels/q6_k.wgsl");
const FLOAT: &str = include_str!("kernels/float.wgsl");
const MLX: &str = include_str!("kernels/mlx.wgsl");
const RMS_NORM: &str = include_str!("kernels/rms_norm.wgsl");
const ATTENTION: &str = include_str!("kernels/attention.wgsl");
const ATTENTION_MERGE: &str = include_str!("kernels/attention_merge.wgsl");
const MERGE: &str = include_str!("kernels/merge.wgsl");
const F16_ROUND: &str = include_str!("kernels/f16_round.wgsl");
const ATTENTION_PREP: &str = include_str!("kernels/attention_prep.wgsl");
const HEAD_PREP: &str = include_str!("kernels/head_prep.wgsl");
const GATHER: &str = include_str!("kernels/gather.wgsl");
const MOE_ROUTE: &str = include_str!("kernels/moe_route.wgsl");
const ROUTE: &str = include_str!("kernels/route.wgsl");
const MATMUL_ROUTE: &str = include_str!("kernels/matmul_route.wgsl");
const ARRIVE: &str = include_str!("kernels/arrive.wgsl");
const MOE_COMBINE: &str = include_str!("kernels/moe_combine.wgsl");
const DELTA_NET: &str = include_str!("kernels/delta_net.wgsl");
const SWIGLU: &str = include_str!("kernels/swiglu.wgsl");
const OUTPUT_GATE: &str = include_str!("kernels/output_gate.wgsl");

/// A weight format the matrix kernels decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightKind {
    Ggml(GgmlType),
    /// MLX affine with 4 or 8 bits per weight.
    Mlx {
        bits: u8,
    },
}

impl WeightKind {
    /// The ggml types with a GPU kernel.
    pub const GGML: [GgmlType; 7] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];

    /// Every supported format.
    pub fn all() -> Vec<WeightKind> {
        let mut v: Vec<_> = Self::GGML.into_iter().map(WeightKind::Ggml).collect();
        v.extend([WeightKind::Mlx { bits: 4 }, WeightKind::Mlx { bits: 8 }]);
        v
    }

    /// The format's decoder (constants + `part_cols` and `part`), or `None` when there
    /// is no GPU kernel for it.
    fn source(self) -> Option<(String, &'static str)> {
        Some(match self {
            WeightKind::Ggml(GgmlType::Q8_0) => (String::new(), Q8_0),
            WeightKind::Ggml(GgmlType::Q4_0) => (String::new(), Q4_0),
            WeightKind::Ggml(GgmlType::Q4_K) => (String::new(), Q4_K),
            WeightKind::Ggml(GgmlType::Q6_K) => (String::new(), Q6_K),
            WeightKind::Ggml(GgmlType::F32) => (float_consts(4, false), FLOAT),
            WeightKind::Ggml(GgmlType::F16) => (float_consts(2, false), FLOAT),
            WeightKind::Ggml(GgmlType::BF16) => (float_consts(2, true), FLOAT),
            WeightKind::Mlx { bits: b @ (4 | 8) } => (format!("const BITS: u32 = {b}u;\n"), MLX),
            _ => return None,
        })
    }

    /// Whether one-token products read this format a chunk of 32 weights
    /// a thread in 16-byte loads (`WIDE` in `matmul.wgsl`; the format's
    /// file has `wide_col` and `wide_dot`, and its weights are bound as
    /// `w4`, see `matmul_common.wgsl`). Its matrices must start on 16
    /// bytes.
    pub fn wide(self) -> bool {
        self == WeightKind::Ggml(GgmlType::Q4_K)
    }

    /// Bytes a matrix of this format must start on for the kernels to
    /// address it: 16 where WIDE, else a word.
    pub fn alignment(self) -> u64 {
        if self.wide() {
            16
        } else {
            4
        }
    }

    /// Whether a GPU kernel decodes this format.
    pub fn supported(self) -> bool {
        self.source().is_some()
    }

    /// Columns of a unit (the `UNIT` of `matmul.wgsl`): every matrix the
    /// kernels take has a whole number of units per row.
    pub const UNIT: usize = 32;

    pub fn name(self) -> String {
        match self {
            WeightKind::Ggml(t) => t.name().into(),
            WeightKind::Mlx { bits } => format!("MLX-Q{bits}"),
        }
    }
}

/// Most spans one attention call is cut into (`merge.wgsl`; longer
/// contexts get longer spans). The merge keeps two values a span in the
/// attention kernel's 1024-value shared array `sp`.
pub const MAX_SPANS: usize = 512;
const _: () = assert!(2 * MAX_SPANS <= 1024);

/// A product's weights (binding 3; see `matmul_common.wgsl`), read a word
/// at a time with `wd(i)`: as words, or as 16-byte vectors where the
/// format is WIDE (see `WeightKind::wide`). Formats that are not get
/// stubs of the WIDE format's `wide_col` and `wide_dot` (see q4_k.wgsl),
/// which `matmul.wgsl` then never calls.
fn weight_binding(wide: bool) -> String {
    if wide {
        "const WIDE: bool = true;\n\
         @group(0) @binding(3) var<storage, read> w4: array<vec4<u32>>;\n\
         fn wd(i: u32) -> u32 {\n    return w4[i >> 2u][i & 3u];\n}\n"
            .into()
    } else {
        "const WIDE: bool = false;\n\
         @group(0) @binding(3) var<storage, read> w: array<u32>;\n\
         fn wd(i: u32) -> u32 {\n    return w[i];\n}\n\
         fn wide_col(c: u32, i: u32) -> u32 {\n    return 0u;\n}\n\
         fn wide_dot(r: u32, c: u32, xs: array<vec4<f32>, 8>) -> f32 {\n    return 0.0;\n}\n"
            .into()
    }
}

/// An f32 array at `binding` written with `put(i, v)` and read with
/// `at(i)`: through atomics where another workgroup of the dispatch reads
/// what one stores (see `arrive.wgsl`), else plain.
fn f32_array(binding: usize, name: &str, (put, at): (&str, &str), atomic: bool) -> String {
    if atomic {
        format!(
            "@group(0) @binding({binding}) var<storage, read_write> {name}: array<atomic<u32>>;\n\
             fn {put}(i: u32, v: f32) {{\n    atomicStore(&{name}[i], bitcast<u32>(v));\n}}\n\
             fn {at}(i: u32) -> f32 {{\n    return bitcast<f32>(atomicLoad(&{name}[i]));\n}}\n"
        )
    } else {
        format!(
            "@group(0) @binding({binding}) var<storage, read_write> {name}: array<f32>;\n\
             fn {put}(i: u32, v: f32) {{\n    {name}[i] = v;\n}}\n\
             fn {at}(i: u32) -> f32 {{\n    return {name}[i];\n}}\n"
        )
    }
}

/// `arrive.wgsl`'s function in a module that never calls it (its calls
/// sit behind a false constant) and binds no counts.
const NO_ARRIVAL: &str =
    "fn last_to_arrive(c: u32, total: u32, lid: u32) -> bool {\n    return false;\n}\n";

/// The largest head_dim the attention block's kernels take:
/// `attention_prep.wgsl` keeps a head row in four slots of its WG threads,
/// and `attention.wgsl`'s decode prep (PREP_HD) the same number of values.
pub const MAX_HEAD_DIM: usize = 4 * WG as usize;

/// Words of one job of an expert batch (see `matmul.wgsl`): A's weight
/// byte offset, scale and bias word offsets; the same for B; the first
/// row of Y; the token count; the first row of X; three unused.
pub const JOB_WORDS: usize = 12;

/// The largest key and value head of a Gated DeltaNet layer on the GPU
/// (`delta_net.wgsl` gives each column of a head's state one to four
/// threads of a workgroup, which keep it in registers: 128 in every Qwen
/// hybrid released).
pub const MAX_DELTA_DIM: usize = 128;

/// The most conv taps of a Gated DeltaNet layer on the GPU (`delta_net.wgsl`
/// loads them together; 4 in every Qwen hybrid released).
pub const MAX_CONV_TAPS: usize = 4;

/// The shape of a matrix-product kernel (see `matmul.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Product {
    pub kind: WeightKind,
    /// One token (decode, `matmul.wgsl`): four rows per workgroup, one for
    /// the router product that routes; else tiles of rows and tokens
    /// (prompts, `matmul_tiled.wgsl`).
    pub one_token: bool,
    pub batch: Batch,
}

/// What one matrix-product dispatch covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Batch {
    /// One part of one matrix.
    One,
    /// One part of one matrix whose input row is RMS-normalised on the
    /// fly (the normalised row is stored too, for later products; one-token
    /// shape only: a prompt's rows are normalised by `rms_norm.wgsl` first).
    OneNormed,
    /// The same product for several experts (a job table).
    Experts,
    /// Experts' gate and up projections with SwiGLU applied.
    ExpertsGlu,
    /// One token's experts' down projections, weighted and added to the
    /// residual stream (the MoE combine) in the same dispatch: a workgroup
    /// computes its rows for every job in turn (one-token shape only).
    ExpertsCombine,
    /// [`Batch::OneNormed`] for a layer's router and one token, whose
    /// last workgroup routes the token and writes the expert jobs (see
    /// `matmul_route.wgsl`; one-token shape only).
    Router,
}

impl Batch {
    /// Whether the batch exists only in the one-token shape.
    fn one_token_only(self) -> bool {
        matches!(
            self,
            Batch::OneNormed | Batch::ExpertsCombine | Batch::Router
        )
    }
}

impl Product {
    /// Every shape of every format.
    pub fn all() -> Vec<Product> {
        let mut v = Vec::new();
        for kind in WeightKind::all() {
            for one_token in [true, false] {
                for batch in [
                    Batch::One,
                    Batch::OneNormed,
                    Batch::Experts,
                    Batch::ExpertsGlu,
                    Batch::ExpertsCombine,
                    Batch::Router,
                ] {
                    if batch.one_token_only() && !one_token {
                        continue;
                    }
                    v.push(Product {
                        kind,
                        one_token,
                        batch,
                    });
                }
            }
        }
        v
    }

    /// Rows one workgroup computes (`GROUP_ROWS` of `matmul.wgsl`, or `TR` of
    /// `matmul_tiled.wgsl`). A prompt tile's shared memory is 16 · TR
    /// (GLU: 32 · TR) plus 16 · TT bytes a column of the unit, 32 columns:
    /// every shape stays within 16 KiB (WebGPU's guaranteed minimum), so
    /// SwiGLU, with two matrices' tiles, takes half the rows.
    pub fn rows_per_group(self) -> usize {
        match (self.one_token, self.batch) {
            // One row a workgroup for the router product that routes (see
            // ROUTE in matmul.wgsl).
            (true, Batch::Router) => 1,
            (true, _) => 4,
            (false, Batch::ExpertsGlu) => 32,
            (false, _) => 64,
        }
    }

    /// Tokens one workgroup computes (`TT` of `matmul_tiled.wgsl`): 64 for
    /// dense products; an expert's job has fewer tokens (k / experts of a
    /// prompt's on average: 32 of 512 for Qwen3-30B-A3B), and expert
    /// batches take 32 (on an H100, 16 and 64 ran prompts 4–19 % slower).
    pub fn tokens_per_group(self) -> usize {
        match (self.one_token, self.experts()) {
            (true, _) => 1,
            (false, true) => 32,
            (false, false) => 64,
        }
    }

    /// Whether the product runs over a job table of experts.
    pub fn experts(self) -> bool {
        matches!(
            self.batch,
            Batch::Experts | Batch::ExpertsGlu | Batch::ExpertsCombine
        )
    }

    /// Storage buffers bound after the parameters: x, y, the weights, MLX
    /// scales and biases, then the job table (experts; and the combine
    /// weights, `ExpertsCombine`) or the norm weights and the normalised
    /// rows (`OneNormed`; `Router`: then the routing's choice, jobs, rows,
    /// weights and the arrival counts).
    pub fn n_buffers(self) -> usize {
        let mlx = matches!(self.kind, WeightKind::Mlx { .. });
        let extra = match self.batch {
            Batch::One => 0,
            Batch::OneNormed | Batch::ExpertsCombine => 2,
            Batch::Experts | Batch::ExpertsGlu => 1,
            Batch::Router => 7,
        };
        3 + if mlx { 2 } else { 0 } + extra
    }
}

fn float_consts(bytes: u32, bf16: bool) -> String {
    format!("const FLOAT_BYTES: u32 = {bytes}u;\nconst BF16: bool = {bf16};\n")
}

/// One compute kernel (one WGSL module with one entry point, `main`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `Y = X Wᵀ` over one part of a weight matrix, or over a batch of
    /// experts' matrices.
    MatMul(Product),
    RmsNorm,
    /// Causal attention of one or more queries over an f16 (`kv_f16`) or
    /// f32 KV cache.
    Attention {
        kv_f16: bool,
        /// One query, whose q/k norms, RoPE and cache writes this
        /// dispatch does itself (see `attention.wgsl`, PREP).
        prep: bool,
        /// The last workgroup of each head merges the spans (see
        /// `attention.wgsl`, MERGE); else [`Kernel::AttentionMerge`] does.
        merge: bool,
    },
    /// The spans of an attention call combined, in a dispatch of their
    /// own.
    AttentionMerge,
    /// q/k norms, RoPE and the K/V cache writes of an attention block.
    AttentionPrep {
        kv_f16: bool,
    },
    /// Rows gathered by index (the MoE layer's expert-grouped inputs).
    Gather,
    /// The routed experts' weighted sum in rank order, added to `x`.
    MoeCombine,
    /// One token's routing and expert jobs, on the GPU.
    MoeRoute,
    /// A chunk of tokens through a Gated DeltaNet layer, from its input
    /// projections to the gated RMSNorm (the Qwen hybrids' linear
    /// attention), for key heads of `k_dim` values, each column of a
    /// head's state split over `split` threads (see [`delta_net_split`]).
    DeltaNet {
        k_dim: u32,
        split: u32,
    },
    /// A dense SwiGLU, optionally scaled by a sigmoid gate whose logit it
    /// may take itself (shared experts).
    Swiglu,
    /// The gated attention's sigmoid output gate.
    OutputGate,
}

impl Kernel {
    /// Every kernel (for the translation tests).
    pub fn all() -> Vec<Kernel> {
        let mut v: Vec<_> = Product::all().into_iter().map(Kernel::MatMul).collect();
        v.push(Kernel::RmsNorm);
        for kv_f16 in [true, false] {
            for prep in [true, false] {
                for merge in [true, false] {
                    v.push(Kernel::Attention {
                        kv_f16,
                        prep,
                        merge,
                    });
                }
            }
        }
        v.extend([
            Kernel::AttentionMerge,
            Kernel::AttentionPrep { kv_f16: true },
            Kernel::AttentionPrep { kv_f16: false },
            Kernel::Gather,
            Kernel::MoeCombine,
            Kernel::MoeRoute,
            // Qwen3.5's and Qwen3-Next's key heads, and a small one.
            Kernel::DeltaNet {
                k_dim: 128,
                split: 4,
            },
            Kernel::DeltaNet {
                k_dim: 15,
                split: 1,
            },
            Kernel::Swiglu,
            Kernel::OutputGate,
        ]);
        v
    }

    /// Whether the kernel reduces across its workgroup (and so comes in a
    /// subgroup and a shared-memory variant).
    pub fn reduces(self) -> bool {
        match self {
            // Prompt tiles sum each output in one thread.
            Kernel::MatMul(p) => p.one_token,
            _ => matches!(
                self,
                Kernel::RmsNorm
                    | Kernel::Attention { .. }
                    | Kernel::AttentionPrep { .. }
                    | Kernel::MoeRoute
                    | Kernel::DeltaNet { .. }
                    | Kernel::Swiglu
            ),
        }
    }

    /// Whether the kernel widens f16 values (and so comes in a native and
    /// an integer variant).
    pub fn widens_f16(self) -> bool {
        matches!(self, Kernel::MatMul(_) | Kernel::Attention { .. })
    }

    /// `v` with the choices this kernel does not depend on fixed, so that
    /// equal modules share one pipeline.
    pub fn normalize(self, v: Variant) -> Variant {
        Variant {
            reduce: if self.reduces() {
                v.reduce
            } else {
                Reduce::Shared
            },
            f16_native: v.f16_native && self.widens_f16(),
        }
    }

    pub fn name(self) -> String {
        match self {
            Kernel::MatMul(p) => format!(
                "{} {}{}",
                if p.one_token { "matvec" } else { "matmul" },
                p.kind.name(),
                match p.batch {
                    Batch::One => "",
                    Batch::OneNormed => " normed",
                    Batch::Experts => " experts",
                    Batch::ExpertsGlu => " experts SwiGLU",
                    Batch::ExpertsCombine => " experts combine",
                    Batch::Router => " router+route",
                }
            ),
            Kernel::RmsNorm => "rms_norm".into(),
            Kernel::Attention {
                kv_f16,
                prep,
                merge,
            } => format!(
                "attention{}{} {} KV",
                if prep { "+prep" } else { "" },
                if merge { "+merge" } else { "" },
                if kv_f16 { "f16" } else { "f32" }
            ),
            Kernel::AttentionMerge => "attention_merge".into(),
            Kernel::AttentionPrep { kv_f16: true } => "attention_prep f16 KV".into(),
            Kernel::AttentionPrep { kv_f16: false } => "attention_prep f32 KV".into(),
            Kernel::Gather => "gather".into(),
            Kernel::MoeCombine => "moe_combine".into(),
            Kernel::MoeRoute => "moe_route".into(),
            Kernel::DeltaNet { k_dim, split } => format!("delta_net k_dim {k_dim} split {split}"),
            Kernel::Swiglu => "swiglu".into(),
            Kernel::OutputGate => "output_gate".into(),
        }
    }

    /// Threads per workgroup: [`WG`], but more where one workgroup walks
    /// long rows and a 64-thread one was latency-bound on an H100.
    pub fn workgroup_size(self) -> u32 {
        match self {
            // One workgroup a row of the hidden state (2048 values and
            // more), walked twice: ~30 µs a row at 64 threads.
            Kernel::RmsNorm => 4 * WG,
            // The router product's: a routing in its last workgroup sums
            // in the same order (see route.wgsl).
            Kernel::MoeRoute => 2 * WG,
            // Products: a 4096-column row is 512 parts, eight a thread at 64
            // threads; at 128 an H100 decoded 21–27 % faster (Q4_0, Q4_K;
            // 256 was no faster, and prompts slowed).
            Kernel::MatMul(p) if p.one_token => 2 * WG,
            // A prompt tile's threads: 16 outputs each, of one matrix (SwiGLU
            // has two).
            Kernel::MatMul(p) => {
                let glu = p.batch == Batch::ExpertsGlu;
                (p.rows_per_group() * p.tokens_per_group() / 16 * (1 + glu as usize)) as u32
            }
            // A chunk's rows read in rounds of WG · 2 / (head_dim / U)
            // rows (see attention.wgsl).
            Kernel::Attention { .. } => 2 * WG,
            // A thread an output value of a 128-wide head: one round of
            // loads, not two.
            Kernel::AttentionMerge => 2 * WG,
            // `split` threads a column of a head's state: value heads of
            // up to MAX_DELTA_DIM.
            Kernel::DeltaNet { split, .. } => split * MAX_DELTA_DIM as u32,
            // Its gate's dot product: 2048 values in four rounds of vec4s.
            Kernel::Swiglu => 2 * WG,
            _ => WG,
        }
    }

    /// The module's WGSL source in variant `v` (choices the kernel does not
    /// depend on are ignored).
    pub fn source(self, v: Variant) -> Result<String, GpuError> {
        let v = self.normalize(v);
        let mut s = format!(
            "// moeflux kernel: {}\nconst WG: u32 = {}u;\n",
            self.name(),
            self.workgroup_size()
        );
        let body: &[&str] = match self {
            Kernel::MatMul(p) => {
                let (consts, decoder) = p
                    .kind
                    .source()
                    .ok_or_else(|| GpuError::Unsupported(p.kind.name()))?;
                s.push_str(&consts);
                s.push_str(&weight_binding(p.kind.wide()));
                let route = p.batch == Batch::Router;
                s.push_str(&format!(
                    "const BATCH: bool = {};\nconst GLU: bool = {};\n\
                     const NORM: bool = {};\nconst COMBINE: bool = {};\nconst ROUTE: bool = {route};\n\
                     const JOB_WORDS: u32 = {JOB_WORDS}u;\n",
                    p.experts(),
                    p.batch == Batch::ExpertsGlu,
                    matches!(p.batch, Batch::OneNormed | Batch::Router),
                    p.batch == Batch::ExpertsCombine,
                ));
                // Y: through atomics when the last workgroup reads it.
                s.push_str(&f32_array(2, "y", ("put_y", "y_at"), route));
                if !route && p.one_token {
                    s.push_str("fn route_after(lane: Lane) {}\n");
                }
                if p.one_token {
                    s.push_str(&format!(
                        "const GROUP_ROWS: u32 = {}u;\n",
                        p.rows_per_group()
                    ));
                }
                if !p.one_token {
                    s.push_str(&format!(
                        "const TR: u32 = {}u;\nconst TT: u32 = {}u;\n",
                        p.rows_per_group(),
                        p.tokens_per_group()
                    ));
                }
                // The job table, or the norm weights and normalised rows,
                // bound after the other buffers.
                let last = p.n_buffers();
                s.push_str(&match p.batch {
                    Batch::One => "fn job_word(i: u32) -> u32 {\n    return 0u;\n}\n".into(),
                    Batch::Experts | Batch::ExpertsGlu => format!(
                        "@group(0) @binding({last}) var<storage, read> jobs: array<u32>;\n\
                         fn job_word(i: u32) -> u32 {{\n    return jobs[i];\n}}\n"
                    ),
                    Batch::ExpertsCombine => format!(
                        "@group(0) @binding({}) var<storage, read> jobs: array<u32>;\n\
                         @group(0) @binding({last}) var<storage, read> combine_w: array<f32>;\n\
                         fn job_word(i: u32) -> u32 {{\n    return jobs[i];\n}}\n",
                        last - 1
                    ),
                    Batch::OneNormed => format!(
                        "@group(0) @binding({}) var<storage, read> norm_w: array<vec4<f32>>;\n\
                         @group(0) @binding({last}) var<storage, read_write> normed: array<vec4<f32>>;\n\
                         fn job_word(i: u32) -> u32 {{\n    return 0u;\n}}\n",
                        last - 1
                    ),
                    Batch::Router => format!(
                        "@group(0) @binding({}) var<storage, read> norm_w: array<vec4<f32>>;\n\
                         @group(0) @binding({}) var<storage, read_write> normed: array<vec4<f32>>;\n\
                         @group(0) @binding({}) var<storage, read_write> choice: array<u32>;\n\
                         @group(0) @binding({}) var<storage, read_write> jobs: array<u32>;\n\
                         @group(0) @binding({}) var<storage, read_write> rows: array<u32>;\n\
                         @group(0) @binding({}) var<storage, read_write> weights: array<f32>;\n\
                         @group(0) @binding({last}) var<storage, read_write> counts: array<atomic<u32>>;\n\
                         fn job_word(i: u32) -> u32 {{\n    return 0u;\n}}\n",
                        last - 6,
                        last - 5,
                        last - 4,
                        last - 3,
                        last - 2,
                        last - 1
                    ),
                });
                if p.batch != Batch::ExpertsCombine {
                    s.push_str("var<private> combine_w: array<f32, 1>;\n");
                }
                if !matches!(p.batch, Batch::OneNormed | Batch::Router) {
                    s.push_str(
                        "var<private> norm_w: array<vec4<f32>, 1>;\n\
                         var<private> normed: array<vec4<f32>, 1>;\n",
                    );
                }
                if route {
                    &[MATMUL_COMMON, MATMUL, decoder, MATMUL_ROUTE, ROUTE, ARRIVE]
                } else if p.one_token {
                    &[MATMUL_COMMON, MATMUL, decoder]
                } else {
                    &[MATMUL_COMMON, MATMUL_TILED, decoder]
                }
            }
            Kernel::RmsNorm => &[RMS_NORM],
            Kernel::Attention {
                kv_f16,
                prep,
                merge,
            } => {
                // The cache is written with PREP; the norms and the rotary
                // table are bound only then.
                let access = if prep { "read_write" } else { "read" };
                s.push_str(&format!(
                    "const KV_F16: bool = {kv_f16};\nconst PREP: bool = {prep};\n\
                     const PWG: u32 = {}u;\nconst PREP_HD: u32 = {MAX_HEAD_DIM}u;\n\
                     @group(0) @binding(2) var<storage, {access}> k: array<vec4<u32>>;\n\
                     @group(0) @binding(3) var<storage, {access}> v: array<vec4<u32>>;\n",
                    Kernel::AttentionPrep { kv_f16 }.workgroup_size()
                ));
                // With MERGE the partial results are atomics (see
                // attention.wgsl), and the arrival counts are bound (6).
                s.push_str(&format!(
                    "const MERGE: bool = {merge};\nconst MAX_SPANS: u32 = {MAX_SPANS}u;\n"
                ));
                s.push_str(&f32_array(4, "part", ("put_part", "part_at"), merge));
                if merge {
                    s.push_str(
                        "@group(0) @binding(6) var<storage, read_write> counts: array<atomic<u32>>;\n",
                    );
                } else {
                    s.push_str(NO_ARRIVAL);
                }
                let at = if merge { 7 } else { 6 };
                s.push_str(&if prep {
                    format!(
                        "@group(0) @binding({at}) var<storage, read> norms: array<f32>;\n\
                         @group(0) @binding({}) var<storage, read> cs: array<vec2<f32>>;\n\
                         fn put_kv(ak: u32, av: u32, kw: vec4<u32>, vw: vec4<u32>) {{\n\
                         k[ak] = kw;\n    v[av] = vw;\n}}\n",
                        at + 1
                    )
                } else {
                    "var<private> norms: array<f32, 1>;\nvar<private> cs: array<vec2<f32>, 1>;\n\
                     fn put_kv(ak: u32, av: u32, kw: vec4<u32>, vw: vec4<u32>) {}\n"
                        .to_string()
                });
                if merge {
                    &[F16_ROUND, HEAD_PREP, MERGE, ARRIVE, ATTENTION]
                } else {
                    &[F16_ROUND, HEAD_PREP, MERGE, ATTENTION]
                }
            }
            Kernel::AttentionPrep { kv_f16 } => {
                s.push_str(&format!("const KV_F16: bool = {kv_f16};\n"));
                &[F16_ROUND, HEAD_PREP, ATTENTION_PREP]
            }
            Kernel::AttentionMerge => {
                s.push_str(&format!("const MAX_SPANS: u32 = {MAX_SPANS}u;\n"));
                &[MERGE, ATTENTION_MERGE]
            }
            Kernel::Gather => &[GATHER],
            Kernel::MoeCombine => &[MOE_COMBINE],
            Kernel::MoeRoute => {
                s.push_str(&format!("const JOB_WORDS: u32 = {JOB_WORDS}u;\n"));
                &[ROUTE, MOE_ROUTE]
            }
            Kernel::DeltaNet { k_dim, split } => {
                let rows = k_dim / split;
                s.push_str(&format!(
                    "const DK: u32 = {k_dim}u;\nconst SPLIT: u32 = {split}u;\n\
                     const RW: u32 = {rows}u;\nconst MAX_DV: u32 = {MAX_DELTA_DIM}u;\n"
                ));
                s.push_str(&delta_net_rows(rows));
                &[DELTA_NET]
            }
            Kernel::Swiglu => &[SWIGLU],
            Kernel::OutputGate => &[OUTPUT_GATE],
        };
        if self.reduces() {
            s.push_str(match v.reduce {
                Reduce::Subgroup => REDUCE_SUBGROUP,
                Reduce::Shared => REDUCE_SHARED,
            });
        }
        if self.widens_f16() {
            s.push_str(if v.f16_native { F16_NATIVE } else { F16_BITS });
        }
        for part in body {
            s.push_str(part);
        }
        Ok(s)
    }
}

/// `delta_net.wgsl`'s walks down a thread's rows of a column of the state
/// (a function-scope array of the kernel's main, passed by pointer), written
/// out row by row for `rows` rows: indexed with constants only, they can
/// stay in registers and their loads are issued together (an NVIDIA driver
/// issued a loop's loads one wait at a time; see attention.wgsl's chunk
/// loads). Each partial sum is taken row by row; `row0` is the thread's
/// first row (of q and k in shared memory).
fn delta_net_rows(rows: u32) -> String {
    let each = |line: &dyn Fn(u32) -> String| -> String { (0..rows).map(line).collect() };
    let col = "s: ptr<function, array<f32, RW>>";
    format!(
        "fn load_rows({col}, at: u32, stride: u32) {{\n{}}}\n\
         fn store_rows({col}, at: u32, stride: u32) {{\n{}}}\n\
         // S ← g·S; returns these rows' part of Sᵀk (this column's).\n\
         fn decay_then_k({col}, g: f32, row0: u32) -> f32 {{\n    var m = 0.0;\n{}    return m;\n}}\n\
         // S ← S + k·d; returns these rows' part of Sᵀq (this column's).\n\
         fn update_then_q({col}, d: f32, row0: u32) -> f32 {{\n    var o = 0.0;\n{}    return o;\n}}\n",
        each(&|i| format!("    (*s)[{i}] = state[at + {i}u * stride];\n")),
        each(&|i| format!("    state[at + {i}u * stride] = (*s)[{i}];\n")),
        each(&|i| format!("    (*s)[{i}] *= g;\n    m += (*s)[{i}] * ks[row0 + {i}u];\n")),
        each(&|i| format!("    (*s)[{i}] += ks[row0 + {i}u] * d;\n    o += (*s)[{i}] * qs[row0 + {i}u];\n")),
    )
}

/// How many threads share each column of a Gated DeltaNet head's state
/// (`delta_net.wgsl`'s SPLIT): four where the rows divide by four and the
/// adapter runs workgroups of 4 · MAX_DELTA_DIM threads, else two, else
/// one. On an H200 (with the conv's history kept in registers), a decode
/// step of a Qwen3.5-35B-A3B linear layer went from 19.2 to 14.2 µs
/// (`gpu/delta_net`), 31.9 to 18.3 µs in a model's step (profile), and
/// that model's decode from 187–189 to 201–206 tok/s.
pub fn delta_net_split(k_dim: usize, max_invocations: u32) -> u32 {
    [4u32, 2]
        .into_iter()
        .find(|&s| k_dim.is_multiple_of(s as usize) && max_invocations >= s * MAX_DELTA_DIM as u32)
        .unwrap_or(1)
}

/// The checks naga compiles into every kernel: wgpu's defaults less loop
/// bounding. With it on, naga gives every loop a second, 64-bit iteration
/// counter and an exit on its overflow (so that an endless loop cannot be
/// undefined behaviour); on an H100 that counter cost about a seventh of a
/// decode step (Q4_0 157 → 182 tok/s without it, prompts 827 → 983;
/// measured, the cause presumably that the driver no longer unrolls or
/// pipelines our short loops). Our loops end by construction (see the
/// `SAFETY` note where modules are made).
const RUNTIME_CHECKS: wgpu::ShaderRuntimeChecks = {
    let mut checks = wgpu::ShaderRuntimeChecks::checked();
    checks.force_loop_bounding = false;
    checks
};

/// Compiled pipelines of one device, by kernel and variant.
#[derive(Debug, Default)]
pub struct Kernels {
    cache: Mutex<HashMap<(Kernel, Variant), Arc<KernelPipeline>>>,
}

/// A kernel's pipeline, with the bind group layout read from its WGSL: the
/// parameter block (binding 0) is read at a dynamic offset — of a model's
/// shared parameter arena, so one bind group serves every dispatch over
/// the same buffers whatever its parameters, or 0 of a test pass's own
/// uniform buffer.
#[derive(Debug)]
pub struct KernelPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// The bind group layout of a kernel's module, read from its WGSL with
/// naga: the uniform parameter block at binding 0 with a dynamic offset,
/// storage buffers read-only unless the kernel writes them.
fn layout_entries(label: &str, source: &str) -> Result<Vec<wgpu::BindGroupLayoutEntry>, GpuError> {
    let module = naga::front::wgsl::parse_str(source)
        .map_err(|e| GpuError::Wgpu(format!("{label}: {}", e.emit_to_string(source))))?;
    let mut entries = Vec::new();
    for (_, g) in module.global_variables.iter() {
        let Some(b) = &g.binding else { continue };
        let ty = match g.space {
            naga::AddressSpace::Uniform => wgpu::BufferBindingType::Uniform,
            naga::AddressSpace::Storage { access } => wgpu::BufferBindingType::Storage {
                read_only: !access.contains(naga::StorageAccess::STORE),
            },
            _ => continue,
        };
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: b.binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty,
                has_dynamic_offset: ty == wgpu::BufferBindingType::Uniform,
                min_binding_size: None,
            },
            count: None,
        });
    }
    entries.sort_by_key(|e| e.binding);
    Ok(entries)
}

impl Gpu {
    /// The pipeline of `kernel` in variant `v` (see [`KernelPipeline`]),
    /// compiled on first use.
    pub fn pipeline(&self, kernel: Kernel, v: Variant) -> Result<Arc<KernelPipeline>, GpuError> {
        let v = kernel.normalize(v);
        if !self.variants().contains(&v) {
            return Err(GpuError::Unsupported(format!(
                "{} as {v:?} on {}",
                kernel.name(),
                self.info.name
            )));
        }
        let key = (kernel, v);
        // A panic while compiling cannot leave the map half-updated.
        let mut cache = self.kernels.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let source = kernel.source(v)?;
        let label = kernel.name();
        let entries = layout_entries(&label, &source)?;
        let made = self.checked(&format!("compiling kernel {label}"), || {
            let layout = self
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(&label),
                    entries: &entries,
                });
            let pipeline_layout =
                self.device
                    .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some(&label),
                        bind_group_layouts: &[Some(&layout)],
                        immediate_size: 0,
                    });
            let desc = wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            };
            // SAFETY: the one check `RUNTIME_CHECKS` leaves out guards
            // against loops that never end. Every loop of every kernel is
            // a counted `for` whose counter only its header changes: either
            // counting up by a positive step of at most 512 towards a bound
            // no larger than a kernel parameter or a module constant (the
            // host keeps parameters ≤ `pass::MAX_PARAM`, 1024 below
            // `u32::MAX`, so the counter cannot wrap), or halving down to
            // zero. So none is infinite; the test `every_loop_is_counted`
            // holds every module to those forms. Bounds and
            // integer-division checks stay on.
            let module = unsafe {
                self.device
                    .create_shader_module_trusted(desc, RUNTIME_CHECKS)
            };
            let pipeline = self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                });
            KernelPipeline { pipeline, layout }
        })?;
        let made = Arc::new(made);
        cache.insert(key, made.clone());
        Ok(made)
    }
}

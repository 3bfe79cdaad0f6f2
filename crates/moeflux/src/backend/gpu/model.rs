//! The GPU forward pass: a [`Model`] of MoE layers whose token mixer is
//! softmax attention (Qwen3-MoE; gated, Qwen3.5 / Qwen3-Next) or Gated
//! DeltaNet (the hybrids' linear layers), with an optional shared expert,
//! computed with the WGSL kernels, with the same semantics as the CPU's
//! [`Model::forward`].
//!
//! Dense weights are resident ([`GpuMatrix`], norms as f32 buffers);
//! activations live in buffers sized once for the largest chunk; routed
//! experts come through the GPU slot arena ([`GpuExperts`]) fed by the host
//! [`ExpertStore`]. The GPU routes (`route.wgsl`: the softmax and top-k
//! of [`Moe::route`], in the GPU's f32). When every expert of the model
//! is in GPU memory (loaded on the first step), a decode step never
//! returns to the host: the routing (in the router product's last
//! workgroup where the device allows, see `arrive.wgsl`) writes the expert
//! jobs itself and the token is submitted in pieces (after layers 2, 8,
//! 16, ...) without waiting, so the GPU starts while the host encodes the
//! rest. Otherwise, per layer, one submission carries the previous layer's
//! experts and combine (in a decode step those go alone, as soon as they
//! are recorded, the experts already in GPU memory in a submission before
//! the others, so that they are computed while the misses are copied),
//! this layer's attention block, router and routing (`moe_route.wgsl`);
//! the choices are read back (the one host round trip of a layer) so the
//! host can bring the experts in. Both ways use the
//! same routing code and the same product kernels, so the output does not
//! depend on the memory plan.
//!
//! What runs on the GPU equals the CPU reference level (dequantized
//! weights, f32 activations) up to f32 rounding order; the CPU's integer
//! levels quantize activations to 8 bits, the GPU does not.

use std::sync::Arc;

use super::device::Gpu;
use super::experts::{GpuExpertStats, GpuExperts, Located, SlotCount, Source};
use super::guess::GuessPrecision;
use super::kernels::JOB_WORDS;
use super::kv::GpuKv;
use super::matrix::{GpuMatrix, MatShape};
use super::pass::{
    rope_table, AttentionShape, DeltaShape, ExpertPlace, ParamArena, Pass, RouteOut, SwigluGate,
};
use super::GpuError;
use crate::backend::cpu::{Matrix, MatrixData};
use crate::experts::{ExpertRef, ExpertStore};
use crate::format::ModelFiles;
use crate::model::attention::Attention;
use crate::model::linear_attention::{GatedDeltaNet, LinearInput, ValueHeads};
use crate::model::moe::{Moe, Routing};
use crate::model::timings::Lap;
use crate::model::transformer::{Ffn, Layer};
use crate::model::weights::WeightRef;
use crate::model::{Logits, Mixer, Model, Timings};
use crate::quant::GgmlType;
use crate::state::KvType;
use crate::tokenizer::TokenId;

/// Layers of a GPU-routed decode step submitted together.
const SUBMIT_EVERY: usize = 8;
/// The first submission of a GPU-routed decode step holds only this many
/// layers: the GPU is idle from the last step's logits until it comes,
/// and waiting for eight layers to be encoded and submitted cost decode
/// speed (an H100: Q4_0 188 → 196 tok/s, Q4_K 162 → 167 with two; one
/// was no faster).
const FIRST_SUBMIT: usize = 2;
/// Logit rows computed per LM-head dispatch group (bounds the logits
/// buffer: `LOGIT_ROWS × vocab` f32).
const LOGIT_ROWS: usize = 16;

/// How the GPU model is built.
#[derive(Clone, Copy, Debug)]
pub struct GpuOptions {
    /// Largest chunk of tokens one forward pass takes.
    pub ubatch: usize,
    /// Bytes of GPU memory for the expert slot arena (`None`: every expert
    /// if the device allocates them; see [`GpuModel::new`]).
    pub expert_mem: Option<u64>,
    /// Read missing experts in place from the host store's slots where the
    /// device can ([`Gpu::reads_host_in_place`]); the arena then holds
    /// only those that cannot be.
    pub read_in_place: bool,
}

/// A layer's projections of one input into one activation row: each run
/// of neighbours that share a format and width stacked into one matrix,
/// one product a run into consecutive columns of the row (one dispatch
/// when all share one; a GGUF's small F32 projections beside quantized
/// ones make two: Qwen3.5's b and a after q|k|v and z).
struct Proj(Vec<GpuMatrix>);

impl Proj {
    fn upload(gpu: &Gpu, ms: &[Matrix<'_>]) -> Result<Proj, GpuError> {
        let mut runs = Vec::new();
        let mut rest = ms;
        while let Some(first) = rest.first() {
            let len = 1 + rest[1..]
                .iter()
                .take_while(|m| same_format(first, m))
                .count();
            let run: Vec<&Matrix<'_>> = rest[..len].iter().collect();
            match GpuMatrix::upload_stacked(gpu, &run)? {
                Some(m) => runs.push(m),
                None => {
                    for m in run {
                        runs.push(GpuMatrix::upload(gpu, m)?);
                    }
                }
            }
            rest = &rest[len..];
        }
        Ok(Proj(runs))
    }

    /// Values of the row it writes.
    fn width(&self) -> usize {
        self.0.iter().map(|m| m.shape.rows).sum()
    }

    fn bytes(&self) -> u64 {
        self.0.iter().map(GpuMatrix::bytes).sum()
    }
}

/// Records `y = x Wᵀ` for `n` tokens with a [`Proj`]'s runs (`runs`: all
/// of them, or the first few), into rows of `width` (≥ their width)
/// values from column 0; with `norm`, `x` is RMS-normalised first (the
/// first product leaves the normalised rows in `h`, which the others
/// read: the same values as the first's, scaled after its sum, up to f32
/// rounding).
#[allow(clippy::too_many_arguments)]
fn record_proj(
    runs: &[GpuMatrix],
    pass: &mut Pass<'_>,
    x: &wgpu::Buffer,
    norm: Option<(&wgpu::Buffer, f32)>,
    h: &wgpu::Buffer,
    y: &wgpu::Buffer,
    n: usize,
    width: usize,
) -> Result<(), GpuError> {
    let mut col = 0;
    for (i, m) in runs.iter().enumerate() {
        match norm {
            Some(norm) if i == 0 => pass.matmul_normed(m, x, norm, h, y, n, (col, width))?,
            Some(_) => pass.matmul_into(m, h, y, n, (col, width))?,
            None => pass.matmul_into(m, x, y, n, (col, width))?,
        }
        col += m.shape.rows;
    }
    Ok(())
}

/// A softmax-attention layer's resident weights.
struct GpuAttention {
    /// The per-head q and k norm weights, `2 × head_dim` (zeros where
    /// a model has none), and which the model has.
    qk_norms: wgpu::Buffer,
    qk_norm: (bool, bool),
    qk_eps: f32,
    /// q, k, v (and a gated attention's gates, all heads' after v).
    qkv: Proj,
    wo: GpuMatrix,
}

/// A Gated DeltaNet layer's resident weights.
struct GpuDelta {
    /// Its input projections, in the layout `shape.layout` says.
    proj: Proj,
    /// Where b|a is a run of `proj` of its own (the last; GGUFs keep
    /// them F32 or Q8_0 beside quantized q|k|v|z): a decode step's b|a
    /// row. That product RMS-normalises the layer's input itself rather
    /// than reading the normalised row the q|k|v|z product stores, and
    /// writes buffers of this layer's own, so wgpu puts no barrier
    /// before it and the two run side by side (a prompt's chunk computes
    /// it the same way, after q|k|v|z, into its columns of the row).
    ba: Option<DeltaBa>,
    /// Conv taps, `channels × taps`.
    conv_w: wgpu::Buffer,
    /// `[a | dt_bias | norm]`.
    head_w: wgpu::Buffer,
    out: GpuMatrix,
    shape: DeltaShape,
}

/// A decode step's b|a product's outputs (see [`GpuDelta::ba`]).
struct DeltaBa {
    /// b|a, `2 n_v` values.
    row: wgpu::Buffer,
    /// The normalised input row the product stores (`hidden` values; read
    /// by nothing).
    normed: wgpu::Buffer,
}

enum GpuMixer {
    Attention(GpuAttention),
    Linear(GpuDelta),
}

/// A shared expert: gate and up side by side, then down.
struct GpuShared {
    proj: Proj,
    down: GpuMatrix,
    ff: usize,
    gate: SharedGate,
    /// A decode step's gate | up | scale row: a buffer of each layer's
    /// own, which no other dispatch of a step writes, so that the product
    /// needs no barrier before it and runs beside the routed experts'
    /// gate/up (see [`GpuModel::experts_routed_on_gpu`]).
    row: wgpu::Buffer,
}

/// A shared expert's sigmoid gate (the Qwen hybrids').
enum SharedGate {
    None,
    /// Its row is a third product after gate and up.
    InRow,
    /// An F32 row, whose dot product the SwiGLU takes (one dispatch
    /// fewer).
    Dot(wgpu::Buffer),
}

/// One layer's resident weights.
struct GpuLayer {
    attn_norm: wgpu::Buffer,
    ffn_norm: wgpu::Buffer,
    mixer: GpuMixer,
    router: GpuMatrix,
    moe: Moe,
    shared: Option<GpuShared>,
}

/// Sizes every layer of a kind shares (checked when the model is built).
#[derive(Clone, Copy, Debug)]
struct Dims {
    hidden: usize,
    /// Of the attention layers (zeros in a model without).
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// Rotated pairs per head.
    half: usize,
    /// Whether attention has an output gate.
    gated: bool,
    /// The linear-attention layers' shape (`None` in a model without).
    delta: Option<DeltaShape>,
    /// The widest shared expert: its row (gate | up | scale) and ff.
    shared: (usize, usize),
    n_experts: usize,
    k: usize,
    ff: usize,
    vocab: usize,
    eps: f32,
    ubatch: usize,
}

impl Dims {
    fn attention(&self) -> AttentionShape {
        AttentionShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            len: 0,
            k_stride: self.n_kv_heads * self.head_dim,
            v_stride: self.n_kv_heads * self.head_dim,
            kv_f16: false,
            gated: self.gated,
        }
    }
}

/// Activation buffers, f32 unless said (sizes for `ubatch` tokens).
struct Activations {
    /// Residual stream, `n × hidden`.
    x: wgpu::Buffer,
    /// Normalised state, `n × hidden`.
    h: wgpu::Buffer,
    /// Each token's q, k and v projections side by side, `n × (n_heads +
    /// 2 n_kv_heads) · head_dim` (and a gated attention's gates after v).
    qkv: wgpu::Buffer,
    /// A linear-attention layer's input projections, `n ×` its row.
    lin: wgpu::Buffer,
    /// q after its per-head norm and RoPE.
    qn: wgpu::Buffer,
    /// Attention's output, or a linear-attention layer's.
    attn: wgpu::Buffer,
    /// Partial results of attention spans (see `Pass::attention_causal`).
    attn_parts: wgpu::Buffer,
    /// `(cos, sin)` of every token's rotary angles.
    rope: wgpu::Buffer,
    /// Router logits, `n × n_experts`.
    router: wgpu::Buffer,
    /// A streamed layer's guess of the next layer's logits (`n_experts`):
    /// a buffer apart from `router`, so that no barrier orders the two
    /// products.
    guess: wgpu::Buffer,
    /// The experts' inputs, SwiGLU outputs and down projections, one row
    /// per (token, rank) pair grouped by expert: `n·k × hidden`, `n·k ×
    /// ff`, `n·k × hidden`.
    moe_in: wgpu::Buffer,
    act: wgpu::Buffer,
    down: wgpu::Buffer,
    /// u32: token of each expert-grouped row.
    gather_idx: wgpu::Buffer,
    /// u32: expert-grouped row of each (token, rank).
    combine_row: wgpu::Buffer,
    /// Routing weight of each (token, rank).
    combine_w: wgpu::Buffer,
    /// A shared expert's gate | up | scale rows and its SwiGLU output.
    shared: wgpu::Buffer,
    shared_act: wgpu::Buffer,
    /// u32: the expert products' job tables (see `Pass::expert_matmul`).
    jobs: wgpu::Buffer,
    /// u32 pairs: each (token, rank)'s expert and weight bits, as the
    /// GPU routed them.
    choice: wgpu::Buffer,
    /// u32: which rows of `x` get logits.
    out_idx: wgpu::Buffer,
    /// Final-norm input rows and normalised rows, `LOGIT_ROWS × hidden`.
    out_x: wgpu::Buffer,
    out_h: wgpu::Buffer,
    logits: wgpu::Buffer,
    /// Host-readable target of the router and logit copies.
    readback: wgpu::Buffer,
}

/// Buffers in [`Activations`]: all of its fields.
const ACTIVATION_BUFFERS: usize = 25;

// A field added to `Activations` changes its size: it then does not
// compile until `Activations::bytes` counts it (the memory plan of a GPU
// in shared memory rests on that count).
const _: () = assert!(
    std::mem::size_of::<Activations>() == ACTIVATION_BUFFERS * std::mem::size_of::<wgpu::Buffer>()
);

impl Activations {
    /// Bytes of every buffer.
    fn bytes(&self) -> u64 {
        let all: [&wgpu::Buffer; ACTIVATION_BUFFERS] = [
            &self.x,
            &self.h,
            &self.qkv,
            &self.lin,
            &self.qn,
            &self.attn,
            &self.attn_parts,
            &self.rope,
            &self.router,
            &self.guess,
            &self.moe_in,
            &self.act,
            &self.down,
            &self.shared,
            &self.shared_act,
            &self.gather_idx,
            &self.combine_row,
            &self.combine_w,
            &self.jobs,
            &self.choice,
            &self.out_idx,
            &self.out_x,
            &self.out_h,
            &self.logits,
            &self.readback,
        ];
        all.iter().map(|b| b.size()).sum()
    }
}

/// Host-side scratch of the MoE routing.
#[derive(Default)]
struct Routing_ {
    choice: Vec<(u32, f32)>,
    /// Start of each expert's rows in the grouped layout (`n_experts + 1`).
    start: Vec<usize>,
    gather: Vec<u32>,
    rows: Vec<u32>,
    weights: Vec<f32>,
    used: Vec<u32>,
    /// The job tables of a wave.
    jobs: Vec<u32>,
}

/// A model resident on the GPU.
pub struct GpuModel {
    gpu: Arc<Gpu>,
    layers: Vec<GpuLayer>,
    output_norm: wgpu::Buffer,
    lm_head: GpuMatrix,
    inv_freq: Vec<f32>,
    dims: Dims,
    act: Activations,
    experts: GpuExperts,
    routing: Routing_,
    /// Kernel parameters and cached bind groups of this model's passes
    /// (taken out while a forward pass records).
    params: Option<ParamArena>,
    /// Experts of each layer.
    per_layer: Vec<usize>,
    /// How often each rank of the next layer's guessed experts was right.
    guesses: GuessPrecision,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("adapter", &self.gpu.info.name)
            .field("layers", &self.layers.len())
            .field("expert_slots", &self.experts.n_slots())
            .finish()
    }
}

/// Why `model` cannot run on the GPU path (what is missing), if it cannot.
pub fn unsupported(model: &Model) -> Option<String> {
    for (i, l) in model.layers.iter().enumerate() {
        if let Mixer::Linear(g) = &l.mixer {
            let d = &g.dims;
            let most = super::kernels::MAX_DELTA_DIM;
            if d.k_head_dim > most || d.v_head_dim > most {
                return Some(format!(
                    "layer {i}: linear-attention heads of {} key and {} value dimensions (the GPU takes up to {most})",
                    d.k_head_dim, d.v_head_dim
                ));
            }
            let taps = super::kernels::MAX_CONV_TAPS;
            if d.conv_kernel > taps {
                return Some(format!(
                    "layer {i}: a linear-attention conv of {} taps (the GPU takes up to {taps})",
                    d.conv_kernel
                ));
            }
        }
        match &l.ffn {
            Ffn::Moe(m) if m.n_experts > super::pass::MAX_ROUTED || m.routing.k() > 64 => {
                return Some(format!(
                    "layer {i}: top-{} of {} experts (the GPU routes up to {} experts, k ≤ 64)",
                    m.routing.k(),
                    m.n_experts,
                    super::pass::MAX_ROUTED
                ))
            }
            Ffn::Moe(_) => {}
            Ffn::Dense(_) => {
                return Some(format!(
                    "layer {i}: dense FFN layers are not wired on the GPU yet"
                ))
            }
        }
    }
    None
}

/// Whether `b` can be stacked under `a` (one format, one width).
fn same_format(a: &Matrix<'_>, b: &Matrix<'_>) -> bool {
    a.cols == b.cols
        && match (a.data, b.data) {
            (MatrixData::Ggml { ty: x, .. }, MatrixData::Ggml { ty: y, .. }) => x == y,
            (MatrixData::Mlx { q: x, .. }, MatrixData::Mlx { q: y, .. }) => x == y,
            _ => false,
        }
}

fn shape_err(detail: String) -> GpuError {
    GpuError::Shape {
        kernel: "model",
        detail,
    }
}

fn norm_buffer(gpu: &Gpu, w: &[f32]) -> Result<wgpu::Buffer, GpuError> {
    gpu.upload_f32("norm", w)
}

/// The shape the GPU gives a Gated DeltaNet layer (`None` for a layout of
/// its projections the kernel does not read).
fn delta_shape(g: &GatedDeltaNet) -> Option<DeltaShape> {
    let d = g.dims;
    let layout = match &g.input {
        LinearInput::Split { .. } => 0,
        LinearInput::SplitBa { .. } => 1,
        LinearInput::Fused { .. } => 2,
    };
    let tiled = g.heads == ValueHeads::Tiled;
    if tiled && layout != 0 {
        return None;
    }
    Some(DeltaShape {
        n_k: d.n_k_heads,
        n_v: d.n_v_heads,
        k_dim: d.k_head_dim,
        v_dim: d.v_head_dim,
        taps: d.conv_kernel,
        layout,
        tiled,
        stride: d.conv_channels() + d.n_v_heads * d.v_head_dim + 2 * d.n_v_heads,
        eps: g.eps,
    })
}

impl GpuModel {
    /// Uploads `model`'s dense weights and makes the activation buffers and
    /// the expert arena. The arena gets `opts.expert_mem / slot` slots, at
    /// least one; without a budget, one per expert on a discrete GPU (as
    /// many as the device allocates, less a tenth for headroom: wgpu cannot
    /// query free VRAM), and on a unified-memory or software adapter as many
    /// as fit half the host's available memory (the engine passes a budget
    /// there, from its memory plan: `MemoryPlan::gpu_arena_in_shared_memory`).
    pub fn new(
        gpu: Arc<Gpu>,
        model: &Model,
        files: &ModelFiles,
        experts: &[Vec<ExpertRef>],
        opts: GpuOptions,
    ) -> Result<GpuModel, GpuError> {
        if let Some(why) = unsupported(model) {
            return Err(GpuError::UnsupportedModel(why));
        }
        let cfg = &model.cfg;
        let m0 = match model.layers.first().map(|l| &l.ffn) {
            Some(Ffn::Moe(m)) => m,
            Some(Ffn::Dense(_)) => return Err(GpuError::Unsupported("a dense FFN layer".into())),
            None => return Err(shape_err("a model without layers".into())),
        };
        // Attention's shape from the first attention layer, the linear
        // layers' from the first linear one: every other must match.
        let a0 = model.layers.iter().find_map(|l| match &l.mixer {
            Mixer::Attention(a) => Some(a),
            Mixer::Linear(_) => None,
        });
        let delta = match model.layers.iter().find_map(|l| match &l.mixer {
            Mixer::Linear(g) => Some(g),
            Mixer::Attention(_) => None,
        }) {
            Some(g) => Some(delta_shape(g).ok_or_else(|| {
                GpuError::Unsupported(
                    "linear attention with tiled value heads and grouped b/a projections".into(),
                )
            })?),
            None => None,
        };
        let shared = model
            .layers
            .iter()
            .filter_map(|l| l.shared.as_ref())
            .map(|s| {
                let ff = s.ffn.gate.rows;
                (2 * ff + usize::from(s.gate.is_some()), ff)
            })
            .fold((0, 0), |a, b| (a.0.max(b.0), a.1.max(b.1)));
        let inv_freq = a0.map_or(Vec::new(), |a| a.rope.inv_freq.clone());
        let dims = Dims {
            hidden: cfg.hidden,
            n_heads: a0.map_or(0, |a| a.n_heads),
            n_kv_heads: a0.map_or(0, |a| a.n_kv_heads),
            head_dim: a0.map_or(0, |a| a.head_dim),
            half: inv_freq.len(),
            gated: a0.is_some_and(|a| a.output_gate),
            delta,
            shared,
            n_experts: m0.n_experts,
            k: m0.routing.k(),
            ff: m0.expert_ff,
            vocab: model.lm_head.rows,
            eps: cfg.rms_eps,
            ubatch: opts.ubatch.max(1),
        };
        let mut layers = Vec::with_capacity(model.layers.len());
        for (i, l) in model.layers.iter().enumerate() {
            layers.push(Self::layer(&gpu, files, l, i, &dims, &inv_freq)?);
            // wgpu keeps each write's staging copy until a submission
            // carries it: a layer at a time, so a load never holds a
            // second copy of the dense weights (host memory, and on a
            // GPU that shares it, the memory the plan budgets).
            gpu.submit("dense weights", Vec::new(), 0)?;
            gpu.wait()?;
        }
        let lm_head = GpuMatrix::upload(&gpu, &model.lm_head.view(files))?;
        let output_norm = norm_buffer(&gpu, &model.output_norm)?;
        let act = Self::activations(&gpu, &dims)?;

        let (arrays, array_bytes) = GpuExperts::slot_layout(experts);
        let total: usize = experts.iter().map(Vec::len).sum();
        let slot: u64 = array_bytes.iter().sum::<u64>().max(1);
        let count = match opts.expert_mem {
            Some(bytes) => SlotCount::Exactly(((bytes / slot) as usize).clamp(1, total.max(1))),
            None if gpu.shares_host_memory() => {
                let avail = crate::experts::plan::available_memory().unwrap_or(8 << 30);
                SlotCount::Exactly(((avail / 2 / slot) as usize).clamp(1, total.max(1)))
            }
            None => SlotCount::UpTo(total.max(1)),
        };
        let per_layer: Vec<usize> = experts.iter().map(Vec::len).collect();
        let experts = GpuExperts::new(&gpu, arrays, array_bytes, count, &per_layer)?
            .reading_in_place(opts.read_in_place);
        let params = Some(ParamArena::new(&gpu)?);
        Ok(GpuModel {
            gpu,
            layers,
            output_norm,
            lm_head,
            inv_freq,
            dims,
            act,
            experts,
            routing: Routing_::default(),
            params,
            per_layer,
            guesses: GuessPrecision::new(),
        })
    }

    fn layer(
        gpu: &Gpu,
        files: &ModelFiles,
        l: &Layer,
        i: usize,
        d: &Dims,
        inv_freq: &[f32],
    ) -> Result<GpuLayer, GpuError> {
        let Ffn::Moe(m) = &l.ffn else {
            return Err(GpuError::Unsupported(format!("layer {i}'s FFN kind")));
        };
        if (m.n_experts, m.routing.k(), m.expert_ff) != (d.n_experts, d.k, d.ff) {
            return Err(GpuError::Unsupported(format!(
                "layer {i}'s experts differ in shape from layer 0's"
            )));
        }
        let view = |w: &WeightRef| w.view(files);
        let up = |w: &WeightRef| GpuMatrix::upload(gpu, &w.view(files));
        let mixer = match &l.mixer {
            Mixer::Attention(a) => {
                GpuMixer::Attention(Self::attention(gpu, files, a, i, d, inv_freq)?)
            }
            Mixer::Linear(g) => {
                if delta_shape(g) != d.delta {
                    return Err(GpuError::Unsupported(format!(
                        "layer {i}'s linear attention differs in shape from the first's"
                    )));
                }
                let shape = d
                    .delta
                    .ok_or_else(|| shape_err(format!("layer {i}: no linear shape")))?;
                let ws = g.weights();
                let inputs: Vec<Matrix<'_>> = ws[..ws.len() - 1].iter().map(|w| view(w)).collect();
                let proj = Proj::upload(gpu, &inputs)?;
                if proj.width() != shape.stride {
                    return Err(shape_err(format!(
                        "layer {i}: linear-attention projections of {} rows, {} expected",
                        proj.width(),
                        shape.stride
                    )));
                }
                let mut head_w = g.a.clone();
                head_w.extend_from_slice(&g.dt_bias);
                head_w.extend_from_slice(&g.norm);
                let ba_width = 2 * shape.n_v;
                let ba = match proj.0.split_last() {
                    Some((last, rest))
                        if !rest.is_empty()
                            && last.shape.rows == ba_width
                            && shape.stride == proj.width() =>
                    {
                        Some(DeltaBa {
                            row: gpu.zeros_f32("b|a row", ba_width)?,
                            normed: gpu.zeros_f32("b|a normed input", d.hidden)?,
                        })
                    }
                    _ => None,
                };
                GpuMixer::Linear(GpuDelta {
                    proj,
                    ba,
                    conv_w: gpu.upload_f32("conv taps", &g.conv)?,
                    head_w: gpu.upload_f32("linear heads", &head_w)?,
                    out: up(&g.out)?,
                    shape,
                })
            }
        };
        let shared = match &l.shared {
            Some(s) => {
                let mut ms = vec![view(&s.ffn.gate), view(&s.ffn.up)];
                let gate = match s.gate.as_ref().map(view) {
                    None => SharedGate::None,
                    Some(g) => match g.data {
                        MatrixData::Ggml {
                            ty: GgmlType::F32,
                            bytes,
                        } if g.rows == 1 => {
                            SharedGate::Dot(gpu.storage("shared gate", bytes, 0)?)
                        }
                        _ => {
                            ms.push(g);
                            SharedGate::InRow
                        }
                    },
                };
                let proj = Proj::upload(gpu, &ms)?;
                Some(GpuShared {
                    row: gpu.zeros_f32("shared expert row", proj.width())?,
                    proj,
                    down: up(&s.ffn.down)?,
                    ff: s.ffn.gate.rows,
                    gate,
                })
            }
            None => None,
        };
        Ok(GpuLayer {
            attn_norm: norm_buffer(gpu, &l.attn_norm)?,
            ffn_norm: norm_buffer(gpu, &l.ffn_norm)?,
            mixer,
            router: up(&m.router)?,
            moe: m.clone(),
            shared,
        })
    }

    /// An attention layer's weights, checked against the model's shape.
    fn attention(
        gpu: &Gpu,
        files: &ModelFiles,
        a: &Attention,
        i: usize,
        d: &Dims,
        inv_freq: &[f32],
    ) -> Result<GpuAttention, GpuError> {
        let same = (a.n_heads, a.n_kv_heads, a.head_dim, a.output_gate)
            == (d.n_heads, d.n_kv_heads, d.head_dim, d.gated);
        if !same || a.rope.inv_freq != inv_freq {
            return Err(GpuError::Unsupported(format!(
                "layer {i} differs in shape or RoPE from the first attention layer"
            )));
        }
        // attention.wgsl reads rows in 16-byte loads; see MAX_HEAD_DIM.
        let most = super::kernels::MAX_HEAD_DIM;
        if a.head_dim > most || !a.head_dim.is_multiple_of(8) {
            return Err(GpuError::Unsupported(format!(
                "head_dim {} (the attention kernels take multiples of 8 up to {most})",
                a.head_dim
            )));
        }
        let hd = a.head_dim;
        let mut w = vec![0f32; 2 * hd];
        for (j, n) in [&a.q_norm, &a.k_norm].into_iter().enumerate() {
            if let Some(n) = n.as_deref() {
                if n.len() != hd {
                    return Err(shape_err(format!(
                        "layer {i}: a q/k norm of {} values for heads of {hd}",
                        n.len()
                    )));
                }
                w[j * hd..(j + 1) * hd].copy_from_slice(n);
            }
        }
        let (q, k, v) = (a.wq.view(files), a.wk.view(files), a.wv.view(files));
        let qkv = if a.output_gate {
            // `[q_h | gate_h]` per head: the q rows of every head, k, v,
            // then the gate rows of every head.
            let rows = |r0: usize| {
                q.row_range(r0, hd).ok_or_else(|| {
                    shape_err(format!(
                        "layer {i}: a gated q projection of {} rows for {} heads of {hd}",
                        q.rows, a.n_heads
                    ))
                })
            };
            let mut ms = Vec::with_capacity(2 * a.n_heads + 2);
            for h in 0..a.n_heads {
                ms.push(rows(2 * h * hd)?);
            }
            ms.extend([k, v]);
            for h in 0..a.n_heads {
                ms.push(rows(2 * h * hd + hd)?);
            }
            // Where k and v differ in format from q, the q rows, k and v,
            // and the gate rows are three runs (not a product a head).
            Proj::upload(gpu, &ms)?
        } else {
            Proj::upload(gpu, &[q, k, v])?
        };
        Ok(GpuAttention {
            qk_norms: norm_buffer(gpu, &w)?,
            qk_norm: (a.q_norm.is_some(), a.k_norm.is_some()),
            qk_eps: a.norm_eps,
            qkv,
            wo: GpuMatrix::upload(gpu, &a.wo.view(files))?,
        })
    }

    fn activations(gpu: &Gpu, d: &Dims) -> Result<Activations, GpuError> {
        let u = d.ubatch;
        let q = u * d.n_heads * d.head_dim;
        let rows = u * d.k;
        let z = |label: &str, len: usize| gpu.zeros_f32(label, len);
        let lr = LOGIT_ROWS.min(u);
        let readback = (2 * u * d.k).max(lr * d.vocab);
        let (lin, lin_out) = d.delta.map_or((0, 0), |s| (s.stride, s.n_v * s.v_dim));
        Ok(Activations {
            x: z("x", u * d.hidden)?,
            h: z("h", u * d.hidden)?,
            qkv: z("qkv", u * d.attention().qkv_width())?,
            lin: z("linear projections", u * lin)?,
            qn: z("qn", q)?,
            attn: z("attn", q.max(u * lin_out))?,
            // Room for 32 Ki spans × heads: a decode step over 32 Ki
            // positions uses 512 spans of each of 32 heads (the most,
            // merge.wgsl's MAX_SPANS; longer contexts get longer spans).
            attn_parts: z(
                "attention spans",
                (u * d.n_heads).max(1 << 15) * (d.head_dim + 2),
            )?,
            rope: z("rope", 2 * u * d.half.max(1))?,
            router: z("router", u * d.n_experts)?,
            guess: z("guess", d.n_experts)?,
            moe_in: z("moe_in", rows * d.hidden)?,
            act: z("act", rows * d.ff)?,
            down: z("down", rows * d.hidden)?,
            shared: z("shared expert", u * d.shared.0)?,
            shared_act: z("shared expert SwiGLU", u * d.shared.1)?,
            gather_idx: z("gather_idx", rows)?,
            combine_row: z("combine_row", rows)?,
            combine_w: z("combine_w", rows)?,
            jobs: z("jobs", 2 * JOB_WORDS * rows.max(d.k))?,
            choice: z("choice", 2 * rows)?,
            out_idx: z("out_idx", lr)?,
            out_x: z("out_x", lr * d.hidden)?,
            out_h: z("out_h", lr * d.hidden)?,
            logits: z("logits", lr * d.vocab)?,
            readback: gpu.readback_buffer(4 * readback as u64)?,
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Bytes of the GPU buffers this model holds: dense weights, norms,
    /// activations, kernel parameters and the expert arena (not a
    /// session's KV cache: [`GpuModel::kv_bytes`]). Where the GPU shares
    /// host memory, the memory plan counts them.
    pub fn allocated_bytes(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                let mixer = match &l.mixer {
                    GpuMixer::Attention(a) => a.qk_norms.size() + a.qkv.bytes() + a.wo.bytes(),
                    GpuMixer::Linear(g) => {
                        let ba = g.ba.as_ref().map_or(0, |b| b.row.size() + b.normed.size());
                        g.proj.bytes() + g.conv_w.size() + g.head_w.size() + g.out.bytes() + ba
                    }
                };
                let shared = l
                    .shared
                    .as_ref()
                    .map_or(0, |s| s.proj.bytes() + s.down.bytes() + s.row.size());
                l.attn_norm.size() + l.ffn_norm.size() + mixer + l.router.bytes() + shared
            })
            .sum();
        let act = self.act.bytes();
        let params = self.params.as_ref().map_or(0, ParamArena::bytes);
        layers
            + self.output_norm.size()
            + self.lm_head.bytes()
            + act
            + params
            + self.experts.pool_bytes()
    }

    /// Bytes of a session's KV cache of `capacity` positions and its
    /// recurrent state ([`GpuModel::new_kv`]).
    pub fn kv_bytes(&self, capacity: usize, ty: KvType) -> u64 {
        let row = ty.row_bytes(self.kv_dim() as u64);
        self.state_shape()
            .map(|(kv, lin)| match (kv, lin) {
                (Some(_), _) => 2 * capacity as u64 * row,
                // Two copies of the conv window.
                (None, Some((w, s))) => 4 * (2 * w + s) as u64,
                (None, None) => 0,
            })
            .sum()
    }

    /// Values a position's K (or V) row holds in one attention layer.
    fn kv_dim(&self) -> usize {
        self.dims.n_kv_heads * self.dims.head_dim
    }

    /// Per layer, the KV row of an attention layer, or the conv window's
    /// and recurrent state's values of a linear one.
    fn state_shape(&self) -> impl Iterator<Item = (Option<usize>, Option<(usize, usize)>)> + '_ {
        self.layers.iter().map(|l| match &l.mixer {
            GpuMixer::Attention(_) => (Some(self.kv_dim()), None),
            GpuMixer::Linear(g) => {
                let d = g.shape;
                let window = (d.taps - 1) * d.channels();
                (None, Some((window, d.n_v * d.k_dim * d.v_dim)))
            }
        })
    }

    /// Counters of the GPU expert tier.
    pub fn expert_stats(&self) -> GpuExpertStats {
        let mut s = self.experts.stats();
        self.guesses.count(&mut s);
        s
    }

    /// Frees a session's KV cache: the bind groups cached for its buffers
    /// go with it (they would keep its memory alive, a cache for every
    /// session a long-lived engine ever ran).
    pub fn release_kv(&mut self, kv: GpuKv) {
        let kv_rows = kv.layers.iter().flatten().flat_map(|l| [&l.k, &l.v]);
        let recurrent = kv
            .linear
            .iter()
            .flatten()
            .flat_map(|l| [&l.window, &l.state]);
        let gone: Vec<&wgpu::Buffer> = kv_rows.chain(recurrent).collect();
        if let Some(arena) = &mut self.params {
            arena.forget(&gone);
        }
    }

    /// An empty KV cache for `capacity` positions, and a zeroed
    /// recurrent state.
    pub fn new_kv(&self, capacity: usize, ty: KvType) -> Result<GpuKv, GpuError> {
        let (dims, linear): (Vec<_>, Vec<_>) = self.state_shape().unzip();
        GpuKv::new(&self.gpu, &dims, &linear, capacity, ty)
    }

    /// Runs `tokens` at positions `pos0..` through the model, appending to
    /// `kv`; returns the logits of the last position or of all (`n ×
    /// vocab`). Token ids must be below the vocabulary size and `pos0 + n`
    /// within the cache (checked by the caller; checked again here).
    /// `prompt`: the tokens are a chunk of a prompt, computed with the
    /// prompt kernels even when there is one (see [`Pass::set_prompt`]);
    /// else one token is a decode step.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        model: &Model,
        files: &ModelFiles,
        store: &mut ExpertStore,
        kv: &mut GpuKv,
        pos0: usize,
        tokens: &[TokenId],
        which: Logits,
        prompt: bool,
        timings: &mut Timings,
    ) -> Result<Vec<f32>, crate::Error> {
        let mut arena = self
            .params
            .take()
            .ok_or_else(|| shape_err("the parameter arena is in use".into()))?;
        let out = self.forward_in(
            &mut arena, model, files, store, kv, pos0, tokens, which, prompt, timings,
        );
        self.params = Some(arena);
        if out.is_err() {
            // Work of the failed step may still read slots that the next
            // step's misses refill on the copy queue, unordered with it.
            let _ = self.gpu.wait();
        }
        // Copies still in flight (after the logits' read-back, none are)
        // give their host slots back to the store, whatever the step's
        // outcome; its first error is the one to report.
        let settled = self.experts.settle(&self.gpu, store);
        let logits = out?;
        settled?;
        Ok(logits)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_in(
        &mut self,
        arena: &mut ParamArena,
        model: &Model,
        files: &ModelFiles,
        store: &mut ExpertStore,
        kv: &mut GpuKv,
        pos0: usize,
        tokens: &[TokenId],
        which: Logits,
        prompt: bool,
        t: &mut Timings,
    ) -> Result<Vec<f32>, crate::Error> {
        let d = self.dims;
        let n = tokens.len();
        // A decode step: one token, not a chunk of a prompt (which takes
        // the prompt shapes whatever its length; see `Pass::set_prompt`).
        let one = n == 1 && !prompt;
        if n == 0 || n > d.ubatch || pos0 + n > kv.capacity {
            return Err(shape_err(format!(
                "{n} tokens at position {pos0} (chunks of at most {}, cache of {})",
                d.ubatch, kv.capacity
            ))
            .into());
        }
        let gpu = self.gpu.clone();
        let gpu = &*gpu;
        let mut lap = Lap::start();
        store.begin_step();
        self.experts.tick();

        // Embedding rows and rotary angles, on the host.
        let embed = model.embed.view(files);
        let mut x = vec![0f32; n * d.hidden];
        for (t, &id) in tokens.iter().enumerate() {
            if id as usize >= embed.rows {
                return Err(crate::Error::TokenOutOfRange {
                    token: id,
                    vocab: embed.rows,
                });
            }
            embed.row(id as usize, &mut x[t * d.hidden..(t + 1) * d.hidden]);
        }
        gpu.write_padded(&self.act.x, bytemuck::cast_slice(&x))?;
        let table = rope_table(pos0, n, &self.inv_freq);
        gpu.write_padded(&self.act.rope, bytemuck::cast_slice(&table))?;
        lap.charge(&mut t.other);

        // With every expert in GPU memory (loaded on the first step), a
        // decode step routes on the GPU and never waits for it before the
        // logits.
        self.experts.load_all(gpu, store, &self.per_layer)?;
        let on_gpu = one && self.experts.all_resident();
        let mut pass = Pass::with_arena(gpu, arena);
        pass.set_prompt(!one);
        // A guess left by a step that ended early is not this step's.
        self.guesses.drop_pending();
        // The guessed experts of this layer not worth copying ahead (see
        // `spare` below), left by the layer before.
        let mut doubtful: Vec<u32> = Vec::new();
        for l in 0..self.layers.len() {
            self.mixer_block(&mut pass, kv, l, n, one, pos0)?;
            match self.layers[l].mixer {
                GpuMixer::Attention(_) => lap.charge(&mut t.full_attn),
                GpuMixer::Linear(_) => lap.charge(&mut t.linear_attn),
            }
            if on_gpu {
                self.experts_routed_on_gpu(&mut pass, l)?;
                lap.charge(&mut t.moe);
                // Submitted in pieces, so the GPU runs the first layers
                // while the host encodes the rest (encoding a token's
                // ~500 dispatches took 1.5 ms on an H100 host).
                let piece_ends = l + 1 == FIRST_SUBMIT || l % SUBMIT_EVERY == SUBMIT_EVERY - 1;
                if piece_ends && l + 1 < self.layers.len() {
                    pass.flush()?;
                    lap.charge(&mut t.gpu_submit);
                }
                continue;
            }
            // The FFN norm inside the router product, which leaves the
            // normalised rows in `h` for the experts.
            let (layer, a) = (&self.layers[l], &self.act);
            let norm = (&layer.ffn_norm, d.eps);
            let ne = layer.router.shape.rows;
            pass.matmul_normed(&layer.router, &a.x, norm, &a.h, &a.router, n, (0, ne))?;
            // One token, experts streamed, and a copy queue beside the
            // compute: the next layer's router applied to this layer's
            // state after attention guesses which experts it will pick, so
            // that they are copied while this layer computes (79 % of the
            // picks on a qwen3-235b-a22b-shaped synthetic model). Its logits
            // are routed as a second token's, so one routing dispatch and
            // one read-back serve both. They and its normalised row (to
            // `moe_in`, scratch until this layer's gather) go to buffers
            // the router product does not write, so the two products run
            // side by side.
            let guessing = one && d.ubatch >= 2 && self.experts.can_prefetch();
            let next = (self.layers.get(l + 1)).filter(|nx| guessing && nx.router.shape.rows == ne);
            if let Some(next) = next {
                let norm = (&next.ffn_norm, d.eps);
                pass.matmul_normed(&next.router, &a.x, norm, &a.moe_in, &a.guess, 1, (0, ne))?;
            }
            let guessed = next.is_some();
            let routed = n + usize::from(guessed);
            let dims = (routed, d.n_experts, d.k, self.norm_topk(l));
            if guessed {
                pass.moe_route_with_guess((&a.router, &a.guess), self.route_out(), dims)?;
            } else {
                pass.moe_route(&a.router, self.route_out(), dims, None)?;
            }
            lap.charge(&mut t.moe);
            let len = 2 * routed * d.k;
            pass.flush_with_copy(&a.choice, len, &a.readback)?;
            lap.charge(&mut t.gpu_submit);
            // While the routing is computed: the copy queue, once idle
            // until this layer's misses are known, copies the guesses
            // too doubtful to copy ahead of them, one expert at a time,
            // so that a layer's misses wait behind at most one (a wrong
            // one then costs a slot and that wait; a right one is a miss
            // less after the routing).
            let (experts, mut failed) = (&mut self.experts, None);
            let mut spare = |experts: &mut GpuExperts| -> Result<bool, crate::Error> {
                if doubtful.is_empty() {
                    return Ok(false);
                }
                if experts.copy_queue_idle()? {
                    let e = doubtful.remove(0);
                    experts.prefetch(gpu, store, l, &[e])?;
                }
                Ok(true)
            };
            let choice = gpu.map_f32_meanwhile(&self.act.readback, len, &mut || {
                spare(experts).unwrap_or_else(|e| {
                    failed = Some(e);
                    false
                })
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            doubtful.clear();
            lap.charge(&mut t.gpu_wait);
            self.route(&choice, n)?;
            if one {
                let chosen: Vec<u32> = self.routing.choice.iter().map(|c| c.0).collect();
                self.guesses.judge(l, &chosen);
            }
            // The guess's ranks that are right often enough (six
            // of eight on a synthetic model's random router; `guess.rs`).
            let mut ahead = Vec::new();
            if guessed {
                let guess = choice[2 * n * d.k..len]
                    .chunks_exact(2)
                    .map(|c| c[0].to_bits());
                ahead = self.guesses.guess(l + 1, guess.collect());
                ahead.retain(|&e| (e as usize) < d.n_experts);
                doubtful = self.guesses.doubtful();
                doubtful.retain(|&e| (e as usize) < d.n_experts);
            }
            self.experts_block(gpu, &mut pass, store, l, n)?;
            lap.charge(&mut t.moe);
            self.shared_block(&mut pass, l, n)?;
            lap.charge(&mut t.dense_ffn);
            if one && l + 1 < self.layers.len() {
                // The layer's products go now, so the GPU computes them
                // while the host records the next attention block (one
                // submission more a layer; H100 decode 32.3/32.8 → 36.2/35.8
                // tok/s, run 29).
                pass.flush()?;
                lap.charge(&mut t.gpu_submit);
            }
            if !ahead.is_empty() {
                // Submitted right after the first wave's misses instead
                // (before the products are recorded), decode measured the
                // same.
                self.experts.prefetch(gpu, store, l + 1, &ahead)?;
            }
            lap.charge(&mut t.prefetch);
        }
        self.logits(&mut pass, which, n, &mut lap, t)
    }

    /// Records layer `l`'s token mixer and its residual add: attention
    /// ([`GpuModel::attention_block`]) or Gated DeltaNet (the norm inside
    /// the input projections, then `delta_net.wgsl`, whose recurrent state
    /// the chunk advances, then the output projection).
    fn mixer_block(
        &self,
        pass: &mut Pass<'_>,
        kv: &mut GpuKv,
        l: usize,
        n: usize,
        one: bool,
        pos0: usize,
    ) -> Result<(), GpuError> {
        let (d, a, layer) = (self.dims, &self.act, &self.layers[l]);
        let g = match &layer.mixer {
            GpuMixer::Attention(at) => return self.attention_block(pass, kv, at, l, n, one, pos0),
            GpuMixer::Linear(g) => g,
        };
        let st = kv
            .linear
            .get_mut(l)
            .and_then(Option::as_mut)
            .ok_or_else(|| shape_err(format!("layer {l} has no recurrent state")))?;
        let norm = (&layer.attn_norm, d.eps);
        let stride = g.shape.stride;
        let runs = &g.proj.0;
        let ba = match (&g.ba, runs.split_last()) {
            (Some(own), Some((m, rest))) => {
                record_proj(rest, pass, &a.x, Some(norm), &a.h, &a.lin, n, stride)?;
                if n == 1 {
                    pass.matmul_normed(m, &a.x, norm, &own.normed, &own.row, 1, (0, m.shape.rows))?;
                    Some(&own.row)
                } else {
                    let col = stride - m.shape.rows;
                    pass.matmul_normed(m, &a.x, norm, &a.h, &a.lin, n, (col, stride))?;
                    None
                }
            }
            _ => {
                record_proj(runs, pass, &a.x, Some(norm), &a.h, &a.lin, n, stride)?;
                None
            }
        };
        pass.delta_net(
            (&a.lin, ba),
            (&g.conv_w, &g.head_w),
            (&st.window, &st.state),
            &a.attn,
            g.shape,
            n,
            st.cur,
        )?;
        // The next chunk reads the window this one wrote.
        st.cur = !st.cur;
        pass.matmul_add(&g.out, &a.attn, &a.x, n)
    }

    /// Records an attention layer's block: norm, projections, q/k norms,
    /// RoPE, K/V append, attention, output gate, output projection,
    /// residual add (`one`: a decode step's, with the prep inside the
    /// attention dispatch).
    #[allow(clippy::too_many_arguments)]
    fn attention_block(
        &self,
        pass: &mut Pass<'_>,
        kv: &GpuKv,
        at: &GpuAttention,
        l: usize,
        n: usize,
        one: bool,
        pos0: usize,
    ) -> Result<(), GpuError> {
        let (d, a, layer) = (self.dims, &self.act, &self.layers[l]);
        let cache = kv.layers[l]
            .as_ref()
            .ok_or_else(|| shape_err(format!("layer {l} has no KV cache")))?;
        let shape = AttentionShape {
            len: pos0 + n,
            kv_f16: kv.kv_f16,
            ..d.attention()
        };
        // The norm inside the first projection; q, k and v side by side
        // in one buffer, then norms, RoPE and the cache writes in one
        // dispatch (for one token, inside the attention dispatch).
        let width = shape.qkv_width();
        let norm = Some((&layer.attn_norm, d.eps));
        record_proj(&at.qkv.0, pass, &a.x, norm, &a.h, &a.qkv, n, width)?;
        let norm = (at.qk_norm, at.qk_eps);
        if one {
            // One dispatch fewer: the attention workgroups prepare their
            // own query and the new position (same bits).
            pass.attention_decode(
                &a.qkv,
                &at.qk_norms,
                &a.rope,
                (&cache.k, &cache.v),
                &a.attn_parts,
                &a.attn,
                shape,
                d.half,
                norm,
            )?;
        } else {
            pass.attention_prep(
                &a.qkv,
                &at.qk_norms,
                &a.rope,
                &a.qn,
                (&cache.k, &cache.v),
                shape,
                (n, pos0, d.half),
                norm,
            )?;
            let q = &a.qn;
            pass.attention_causal(q, &cache.k, &cache.v, &a.attn_parts, &a.attn, shape, n)?;
        }
        if shape.gated {
            let q = d.n_heads * d.head_dim;
            let gates = width - q;
            pass.output_gate(&a.qkv, &a.attn, n, q, (width, gates))?;
        }
        pass.matmul_add(&at.wo, &a.attn, &a.x, n)
    }

    /// Records layer `l`'s shared expert, if it has one, for the
    /// normalised rows in `h`: gate and up (and the gate's logit, unless
    /// the SwiGLU takes it) in one row, SwiGLU scaled by σ of that logit,
    /// down added to `x`.
    fn shared_block(&self, pass: &mut Pass<'_>, l: usize, n: usize) -> Result<(), GpuError> {
        self.shared_gate_up(pass, l, n)?;
        self.shared_down(pass, l, n)
    }

    /// The rows a shared expert's gate and up go to: for one token, the
    /// layer's own buffer (see [`GpuShared::row`]).
    fn shared_rows<'a>(&'a self, s: &'a GpuShared, n: usize) -> &'a wgpu::Buffer {
        if n == 1 {
            &s.row
        } else {
            &self.act.shared
        }
    }

    /// [`GpuModel::shared_block`]'s gate and up product.
    fn shared_gate_up(&self, pass: &mut Pass<'_>, l: usize, n: usize) -> Result<(), GpuError> {
        let Some(s) = &self.layers[l].shared else {
            return Ok(());
        };
        let a = &self.act;
        let rows = self.shared_rows(s, n);
        record_proj(&s.proj.0, pass, &a.h, None, &a.h, rows, n, s.proj.width())
    }

    /// [`GpuModel::shared_block`]'s SwiGLU and down product.
    fn shared_down(&self, pass: &mut Pass<'_>, l: usize, n: usize) -> Result<(), GpuError> {
        let Some(s) = &self.layers[l].shared else {
            return Ok(());
        };
        let a = &self.act;
        let gate = match &s.gate {
            SharedGate::None => SwigluGate::None,
            SharedGate::InRow => SwigluGate::InRow,
            SharedGate::Dot(w) => SwigluGate::Dot {
                h: &a.h,
                w,
                hidden: self.dims.hidden,
            },
        };
        let rows = self.shared_rows(s, n);
        pass.swiglu(rows, &a.shared_act, n, s.ff, (s.proj.width(), gate))?;
        pass.matmul_add(&s.down, &a.shared_act, &a.x, n)
    }

    /// Records layer `l`'s MoE block for one token with every expert
    /// resident: the router product (the FFN norm inside, which leaves the
    /// normalised row in `h` for the experts) and the routing on the GPU
    /// (`route.wgsl`, the same softmax and top-k as [`Moe::route`]), which
    /// writes the expert jobs — one dispatch where the last workgroup may
    /// finish ([`Pass::router_route`]) — then one dispatch computes the k
    /// experts' gate/up with SwiGLU, one their down projections weighted
    /// and added to `x` (the combine). No host round trip. A shared
    /// expert's gate and up are recorded between the two: they read what
    /// the routed experts' gate/up reads and write the layer's own row
    /// buffer, so wgpu puts no barrier before them and the GPU runs the two
    /// products side by side.
    fn experts_routed_on_gpu(&mut self, pass: &mut Pass<'_>, l: usize) -> Result<(), GpuError> {
        let (d, a) = (self.dims, &self.act);
        let ex = &self.experts;
        let (pool, first) = ex
            .layer_place(l)
            .ok_or_else(|| shape_err(format!("layer {l}'s experts have no fixed place")))?;
        let [g, _, dn] = ex.layer_shapes(l)?;
        let k = d.k;
        let place = ExpertPlace {
            first,
            stride: ex.stride(),
            offsets: [0, 1, 2].map(|m| ex.matrix_offsets(m)),
        };
        let layer = &self.layers[l];
        let norm = (&layer.ffn_norm, d.eps);
        let topk = (k, self.norm_topk(l));
        let out = self.route_out();
        pass.router_route(&layer.router, &a.x, norm, &a.h, &a.router, out, topk, place)?;
        let p = ex.pool(pool);
        pass.expert_matmul(&g, true, p, &a.h, &a.act, &a.jobs, (0, k), (1, k), 1)?;
        self.shared_gate_up(pass, l, 1)?;
        pass.expert_matmul_combine(&dn, p, &a.act, &a.x, &a.jobs, (k, k), &a.combine_w)?;
        self.shared_down(pass, l, 1)?;
        self.experts.count_hits(k);
        Ok(())
    }

    /// Whether layer `l` renormalises its top-k weights.
    fn norm_topk(&self, l: usize) -> bool {
        match self.layers[l].moe.routing {
            Routing::SoftmaxTopK { norm, .. } => norm,
        }
    }

    /// Where the routing kernel writes.
    fn route_out(&self) -> RouteOut<'_> {
        let a = &self.act;
        RouteOut {
            choice: &a.choice,
            jobs: &a.jobs,
            rows: &a.combine_row,
            weights: &a.combine_w,
        }
    }

    /// Takes every token's routing as the GPU chose it (`choice`: expert
    /// id and weight bits per (token, rank), as f32 bits), groups the
    /// (token, rank) pairs by expert, and writes the gather, combine and
    /// weight tables.
    fn route(&mut self, choice: &[f32], n: usize) -> Result<(), GpuError> {
        let d = self.dims;
        let (ne, k) = (d.n_experts, d.k);
        let r = &mut self.routing;
        r.choice.clear();
        r.choice.extend(
            choice[..2 * n * k]
                .chunks_exact(2)
                .map(|c| (c[0].to_bits(), f32::from_bits(c[1].to_bits()))),
        );
        // Counting sort of the pairs by expert (stable: token order within
        // an expert).
        r.start.clear();
        r.start.resize(ne + 1, 0);
        for &(e, _) in &r.choice {
            let e = e as usize;
            if e >= ne {
                return Err(shape_err(format!("router chose expert {e} of {ne}")));
            }
            r.start[e + 1] += 1;
        }
        for e in 0..ne {
            r.start[e + 1] += r.start[e];
        }
        let mut fill = r.start.clone();
        r.gather.clear();
        r.gather.resize(n * k, 0);
        r.rows.clear();
        r.rows.resize(n * k, 0);
        r.weights.clear();
        for t in 0..n {
            for rank in 0..k {
                let (e, w) = r.choice[t * k + rank];
                let at = fill[e as usize];
                fill[e as usize] += 1;
                r.gather[at] = t as u32;
                r.rows[t * k + rank] = at as u32;
                r.weights.push(w);
            }
        }
        r.used.clear();
        r.used
            .extend((0..ne as u32).filter(|&e| r.start[e as usize + 1] > r.start[e as usize]));
        let gpu = &self.gpu;
        gpu.write_padded(&self.act.gather_idx, bytemuck::cast_slice(&r.gather))?;
        gpu.write_padded(&self.act.combine_row, bytemuck::cast_slice(&r.rows))?;
        gpu.write_padded(&self.act.combine_w, bytemuck::cast_slice(&r.weights))?;
        Ok(())
    }

    /// Records layer `l`'s routed experts (in waves when the arena holds
    /// fewer slots than the layer uses: each wave but the last is
    /// submitted, so the next may reuse its slots) and the weighted
    /// combine + residual add. A wave is two products per pool its experts
    /// lie in (gate and up with SwiGLU, then down), each over all those
    /// experts at once; where some of the wave's experts wait for copies,
    /// the products of the others go first, submitted at once.
    fn experts_block<'g>(
        &mut self,
        gpu: &'g Gpu,
        pass: &mut Pass<'g>,
        store: &mut ExpertStore,
        l: usize,
        n: usize,
    ) -> Result<(), crate::Error> {
        let d = self.dims;
        let rows = n * d.k;
        pass.gather(
            &self.act.h,
            &self.act.gather_idx,
            &self.act.moe_in,
            rows,
            d.hidden,
        )?;
        let mut todo = std::mem::take(&mut self.routing.used);
        let mut jobs = std::mem::take(&mut self.routing.jobs);
        let mut wave: Vec<(u32, Located)> = Vec::new();
        let mut misses: Vec<(u32, u32)> = Vec::new();
        let mut read: Vec<u32> = Vec::new();
        let mut copy: Vec<u32> = Vec::new();
        // Experts of the wave whose bytes may still be on their way (the
        // misses, and hits whose prefetch has not landed): the others'
        // products go first, in a submission of their own, so the GPU
        // computes them while the misses are copied.
        let mut late: Vec<u32> = Vec::new();
        self.experts.import_host(gpu, store);
        while !todo.is_empty() {
            self.experts.unpin_all();
            wave.clear();
            misses.clear();
            read.clear();
            copy.clear();
            late.clear();
            // The copy queue's progress, and the latest copy of the slots
            // hit that landed (waited for all the same: the wait makes its
            // writes visible to the compute, see `GpuExperts::hit`).
            let landed = self.experts.copies_landed(store)?;
            let mut early_after = 0;
            for &e in &todo {
                if let Some(s) = self.experts.hit(l, e) {
                    let ready = self.experts.ready_at(s);
                    if ready <= landed {
                        early_after = early_after.max(ready);
                    } else {
                        late.push(e);
                    }
                    wave.push((e, self.experts.located(s)?));
                } else if self.experts.reads_in_place() {
                    read.push(e);
                } else {
                    copy.push(e);
                }
            }
            self.experts
                .read_in_place(gpu, store, l, &read, &mut wave, &mut copy)?;
            // Misses copied into GPU slots, as many as the arena has
            // unpinned.
            for &e in &copy {
                let Some(s) = self.experts.claim(l, e) else {
                    break;
                };
                misses.push((e, s));
            }
            if wave.is_empty() && misses.is_empty() {
                return Err(shape_err("the GPU expert arena has no slot".into()).into());
            }
            self.experts.upload(gpu, store, l, &misses)?;
            for &(e, s) in &misses {
                wave.push((e, self.experts.located(s)?));
                late.push(e);
            }
            // Batches: experts of one buffer and one shape, in the
            // buffer's order, those ready first.
            wave.sort_by_key(|(e, at)| (late.contains(e), at.source, at.offsets[0][0]));
            let early = wave.len() - late.len();
            let mut batches: Vec<(Source, [MatShape; 3], usize, usize, usize)> = Vec::new();
            jobs.clear();
            let start = &self.routing.start;
            let job = |jobs: &mut Vec<u32>, e: u32, at: &Located, ms: &[usize]| {
                for m in [ms[0], ms[ms.len() - 1]] {
                    let [w, sc, bi] = at.offsets[m];
                    // Scales and biases are addressed in words.
                    jobs.extend([w as u32, (sc / 4) as u32, (bi / 4) as u32]);
                }
                let (s0, s1) = (start[e as usize], start[e as usize + 1]);
                // Rows of the expert-grouped input and output alike.
                jobs.extend([s0 as u32, (s1 - s0) as u32, s0 as u32, 0, 0, 0]);
            };
            let mut i = 0;
            while i < wave.len() {
                let (source, shapes) = (wave[i].1.source, wave[i].1.shapes);
                let mut j = i;
                let mut most = 0;
                let group = j < early;
                while j < wave.len()
                    && wave[j].1.source == source
                    && wave[j].1.shapes == shapes
                    && (j < early) == group
                {
                    let e = wave[j].0 as usize;
                    most = most.max(start[e + 1] - start[e]);
                    j += 1;
                }
                batches.push((source, shapes, i, j - i, most));
                i = j;
            }
            // Gate and up jobs of every batch, then down jobs.
            for ms in [&[0, 1][..], &[2]] {
                for &(_, _, i, count, _) in &batches {
                    for (e, at) in &wave[i..i + count] {
                        job(&mut jobs, *e, at, ms);
                    }
                }
            }
            gpu.write_padded(&self.act.jobs, bytemuck::cast_slice(&jobs))?;
            // The ready experts' products, submitted at once where others
            // wait for copies (each job writes rows of its own, and the
            // combine sums them in rank order: the same bits either way);
            // then the others', after their copies (prefetched experts
            // among the hits, and misses the upload copied on the copy
            // queue, not already waited for by its copies on wgpu's queue).
            let split = early > 0 && early < wave.len();
            for late_group in [false, true] {
                if split && late_group {
                    pass.flush()?;
                }
                let after = match (split, late_group) {
                    (true, false) => early_after,
                    (false, false) => continue,
                    (_, true) => self.experts.take_after(),
                };
                pass.after_copies(after);
                let (a, ex) = (&self.act, &self.experts);
                let group = batches
                    .iter()
                    .filter(|b| !split || (b.2 >= early) == late_group);
                // Gate and up with SwiGLU into the activations, then down.
                // Job w of the wave's gate/up jobs is wave entry w, its
                // down job wave.len() + w.
                for (glu, m, x, y) in [(true, 0, &a.moe_in, &a.act), (false, 2, &a.act, &a.down)] {
                    for &(source, shapes, i, count, most) in group.clone() {
                        let j0 = if glu { i } else { wave.len() + i };
                        pass.expert_matmul(
                            &shapes[m],
                            glu,
                            ex.source(source)?,
                            x,
                            y,
                            &a.jobs,
                            (j0, count),
                            (rows, rows),
                            most,
                        )?;
                    }
                }
            }
            todo.retain(|e| !wave.iter().any(|w| w.0 == *e));
            if !todo.is_empty() {
                pass.flush()?;
            }
        }
        self.routing.used = todo;
        self.routing.jobs = jobs;
        self.experts.unpin_all();
        let a = &self.act;
        pass.moe_combine(
            &a.x,
            &a.down,
            &a.combine_row,
            &a.combine_w,
            n,
            d.hidden,
            d.k,
        )?;
        Ok(())
    }

    /// Final norm and LM head of the last row or of all `n` rows of the
    /// residual stream, read back.
    fn logits(
        &self,
        pass: &mut Pass<'_>,
        which: Logits,
        n: usize,
        lap: &mut Lap,
        t: &mut Timings,
    ) -> Result<Vec<f32>, crate::Error> {
        let (d, a) = (self.dims, &self.act);
        let gpu = &*self.gpu;
        let (first, count) = match which {
            Logits::Last => (n - 1, 1),
            Logits::All => (0, n),
        };
        let group = LOGIT_ROWS.min(d.ubatch);
        let mut out = Vec::with_capacity(count * d.vocab);
        for g0 in (first..first + count).step_by(group) {
            let m = group.min(first + count - g0);
            let idx: Vec<u32> = (g0 as u32..(g0 + m) as u32).collect();
            // Lands before the next submission: the recorded layers do not
            // read it, the dispatches below do.
            gpu.write_padded(&a.out_idx, bytemuck::cast_slice(&idx))?;
            pass.gather(&a.x, &a.out_idx, &a.out_x, m, d.hidden)?;
            pass.rms_norm(&a.out_x, &self.output_norm, &a.out_h, m, d.hidden, d.eps)?;
            pass.matmul(&self.lm_head, &a.out_h, &a.logits, m)?;
            lap.charge(&mut t.other);
            pass.flush_with_copy(&a.logits, m * d.vocab, &a.readback)?;
            lap.charge(&mut t.gpu_submit);
            out.extend(gpu.map_f32(&a.readback, m * d.vocab)?);
            lap.charge(&mut t.gpu_wait);
        }
        Ok(out)
    }
}

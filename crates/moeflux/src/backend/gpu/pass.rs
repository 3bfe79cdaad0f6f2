//! Recording kernel dispatches and submitting them as one compute pass.
//!
//! A [`Pass`] collects dispatches (each checked for shapes and buffer sizes
//! when it is added) and encodes them into a single compute pass and a
//! single submission: wgpu orders dispatches that touch the same buffer, so
//! a layer's chain of kernels needs no host involvement between them.

use std::collections::HashMap;
use std::sync::Arc;

use super::device::{Gpu, Variant, ARRIVAL_COUNTS};
use super::kernels::{
    delta_net_split, Batch, Kernel, KernelPipeline, Product, WeightKind, JOB_WORDS, MAX_CONV_TAPS,
    MAX_DELTA_DIM, MAX_HEAD_DIM, MAX_SPANS, WG,
};
use super::matrix::{GpuMatrix, MatShape};
use super::profile::MAX_STAMPS;
use super::GpuError;

/// One recorded dispatch.
struct Dispatch {
    kernel: Kernel,
    pipeline: Arc<KernelPipeline>,
    bind: wgpu::BindGroup,
    groups: [u32; 3],
    /// Offset of its parameters in the bound uniform buffer (the arena's;
    /// 0 for a dispatch with a buffer of its own).
    offset: u32,
}

/// Bytes a dispatch's parameter block may have (the largest, the GPU
/// routing's, has 80).
const PARAM_BYTES: u64 = 128;

/// Parameter blocks a [`ParamArena`] holds before a pass flushes.
const ARENA_DISPATCHES: u64 = 4096;

/// Bind groups kept before the cache starts over (bounds what dropped
/// buffers, such as a finished session's KV cache, keep alive). A model
/// needs about three per expert slot plus a few per layer — 19 000 for
/// Qwen3-30B-A3B with every expert resident — and the cache must hold them
/// all: at 2^14 it started over every few tokens and decode on an H100
/// spent most of its time making bind groups again (8 tok/s).
const MAX_BIND_GROUPS: usize = 1 << 17;

/// Kernel parameters for many dispatches in one uniform buffer, written
/// with one `write_buffer` per submission, and bind groups made once per
/// (kernel, buffers) and reused: what a model's passes use, so recording
/// a token creates no buffer and, after the first token, no bind group.
/// Owned by one user at a time (a pass borrows it mutably): two passes
/// sharing an arena would overwrite each other's parameters.
pub struct ParamArena {
    buffer: wgpu::Buffer,
    /// Parameters of the pass being recorded, each block at a multiple of
    /// the adapter's uniform offset alignment.
    host: Vec<u8>,
    align: u64,
    bind_groups: HashMap<(usize, Vec<wgpu::Buffer>), wgpu::BindGroup>,
}

impl ParamArena {
    pub fn new(gpu: &Gpu) -> Result<ParamArena, GpuError> {
        let align = (gpu.limits.uniform_align as u64).max(PARAM_BYTES);
        let size = align * ARENA_DISPATCHES;
        let buffer = gpu.checked("parameter arena", || {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("parameter arena"),
                size,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        Ok(ParamArena {
            buffer,
            host: Vec::new(),
            align,
            bind_groups: HashMap::new(),
        })
    }

    fn full(&self) -> bool {
        self.host.len() as u64 >= self.buffer.size()
    }

    /// Bytes of its uniform buffer.
    pub fn bytes(&self) -> u64 {
        self.buffer.size()
    }

    /// Bind groups cached so far.
    pub fn bind_groups(&self) -> usize {
        self.bind_groups.len()
    }

    /// Drops the cached bind groups that bind any of `gone`: a bind group
    /// and its key hold their buffers alive, so a buffer its owner drops
    /// (a finished session's KV cache) is freed only once they go too.
    pub fn forget(&mut self, gone: &[&wgpu::Buffer]) {
        self.bind_groups
            .retain(|(_, buffers), _| !buffers.iter().any(|b| gone.contains(&b)));
    }
}

/// Dispatches to run together, in order.
pub struct Pass<'g> {
    gpu: &'g Gpu,
    variant: Variant,
    /// Whether a dispatch's last workgroup finishes its work where a
    /// second dispatch would (see [`Pass::set_last_group_finishes`]).
    last_group_finishes: bool,
    items: Vec<Dispatch>,
    arena: Option<&'g mut ParamArena>,
    /// The copy-queue value the next submission waits for (see
    /// [`Pass::after_copies`]).
    after: u64,
    /// Whether one-token products take the prompt shape (see
    /// [`Pass::set_prompt`]).
    prompt: bool,
}

/// Shape of a decode-attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Positions attended (the cache already holds the new token's K/V).
    pub len: usize,
    /// Cache elements per position (`n_kv_heads · head_dim` for a cache
    /// of this layer alone).
    pub k_stride: usize,
    pub v_stride: usize,
    /// Whether the cache holds f16 (else f32).
    pub kv_f16: bool,
    /// Whether each token's q|k|v row is followed by `n_heads · head_dim`
    /// output-gate values (gated attention: the row is that much wider).
    pub gated: bool,
}

impl AttentionShape {
    /// Values of one token's q|k|v row (gates included).
    pub fn qkv_width(&self) -> usize {
        (self.n_heads * (1 + self.gated as usize) + 2 * self.n_kv_heads) * self.head_dim
    }
}

/// Shape of a Gated DeltaNet layer (see [`Pass::delta_net`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeltaShape {
    pub n_k: usize,
    pub n_v: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    /// Conv taps.
    pub taps: usize,
    /// How a projection row is laid out (`delta_net.wgsl`): 0 `[q | k |
    /// v | z | b | a]`, 1 with b and a grouped per key head, 2 q, k, v
    /// and z grouped too.
    pub layout: u32,
    /// Value head `j` reads key head `j % n_k` (else `j / (n_v / n_k)`).
    pub tiled: bool,
    /// Values of one token's projection row.
    pub stride: usize,
    /// Epsilon of the gated RMSNorm and of the q/k L2 normalisation.
    pub eps: f32,
}

impl DeltaShape {
    /// Conv channels: q and k of every key head, v of every value head.
    pub fn channels(&self) -> usize {
        2 * self.n_k * self.k_dim + self.n_v * self.v_dim
    }
}

/// What scales a dense SwiGLU's outputs (see [`Pass::swiglu`]).
#[derive(Clone, Copy, Debug)]
pub enum SwigluGate<'a> {
    /// Nothing.
    None,
    /// σ of the value after each row's gate and up.
    InRow,
    /// `σ(h[t] · w)`: `h` the `hidden`-wide rows the products read, `w` an
    /// F32 row.
    Dot {
        h: &'a wgpu::Buffer,
        w: &'a wgpu::Buffer,
        hidden: usize,
    },
}

/// Positions of one attention span (a multiple of the kernel's chunk): a
/// decode step over a long context is cut into spans of this many
/// positions, each read by its own workgroups.
pub const ATTENTION_SPAN: usize = 64;

/// What [`Pass::attention_decode`] does besides attending: the inputs of
/// [`Pass::attention_prep`] for one token.
struct DecodePrep<'a> {
    norms: &'a wgpu::Buffer,
    cs: &'a wgpu::Buffer,
    half: usize,
    norm: (bool, bool),
    eps: f32,
}

/// Where [`Pass::moe_route`] and [`Pass::router_route`] write: every
/// token's choice; with an
/// [`ExpertPlace`], one token's expert jobs and the combine's rows and
/// weights.
#[derive(Clone, Copy)]
pub struct RouteOut<'a> {
    pub choice: &'a wgpu::Buffer,
    pub jobs: &'a wgpu::Buffer,
    pub rows: &'a wgpu::Buffer,
    pub weights: &'a wgpu::Buffer,
}

/// Where a layer's experts are, for the jobs the routing writes.
#[derive(Clone, Copy, Debug)]
pub struct ExpertPlace {
    /// Slot of the layer's expert 0 in its pool.
    pub first: u32,
    /// Bytes from one slot to the next.
    pub stride: u64,
    /// Byte offsets in a slot of gate's, up's and down's arrays (weights,
    /// MLX scales, MLX biases; zero where absent).
    pub offsets: [[u64; 3]; 3],
}

/// Experts a layer may have for the GPU's own routing (route.wgsl's
/// MAX_E).
pub const MAX_ROUTED: usize = 1024;

/// Little-endian u32 words of a parameter block.
fn words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The parameter block of `matmul.wgsl` for a product with matrix `m`:
/// `rows` of it (this part's rows, the column of Y its first row goes to,
/// Y's row width), `n` tokens, `wg_x` workgroups along x, the first job of
/// an expert batch, whether Y is added to, and the RMSNorm epsilon of a
/// normalising product; the routing words (ROUTE) zero.
fn product_params(
    m: &MatShape,
    (rows, row0, width): (usize, usize, usize),
    n: usize,
    wg_x: u32,
    job0: usize,
    acc: bool,
    eps: f32,
) -> Result<Vec<u8>, GpuError> {
    const K: &str = "matmul";
    let mut v = vec![
        u32_of(K, "rows", rows)?,
        u32_of(K, "cols", m.cols)?,
        u32_of(K, "tokens", n)?,
        u32_of(K, "first row", row0)?,
        u32_of(K, "row width", width)?,
        u32_of(K, "row bytes", m.row_bytes)?,
        u32_of(K, "units", m.cols / WeightKind::UNIT)?,
        wg_x,
        m.group,
        m.scale_f16 as u32,
        eps.to_bits(),
        u32_of(K, "first job", job0)?,
        acc as u32,
    ];
    // Three unused words, then ROUTE's 16 (k, norm, first, stride, gate,
    // up, down): 128 bytes.
    v.resize(32, 0);
    Ok(words(&v))
}

/// Checks a routing of `n` tokens (top `k` of `n_experts`; one token when
/// it writes expert `jobs`) and that `out.choice` holds it.
fn route_checks(
    kernel: &'static str,
    out: &RouteOut<'_>,
    (n, n_experts, k): (usize, usize, usize),
    jobs: bool,
) -> Result<(), GpuError> {
    if n_experts == 0 || n_experts > MAX_ROUTED || k == 0 || k > 64 || k > n_experts {
        return Err(GpuError::Shape {
            kernel,
            detail: format!(
                "top-{k} of {n_experts} experts (the kernel takes up to {MAX_ROUTED} experts and k ≤ 64)"
            ),
        });
    }
    if n == 0 || (jobs && n != 1) {
        return Err(GpuError::Shape {
            kernel,
            detail: format!("{n} tokens (expert jobs are written for one)"),
        });
    }
    holds(kernel, "choice", out.choice, 2 * n * k)
}

/// The words of `route.wgsl`'s `Route` after n_experts, k, norm and jobs
/// that place one token's expert jobs (first slot, slot stride, gate's,
/// up's and down's array offsets in fours), for `n_experts` experts at
/// `pl`; checks that the pool's byte offsets fit a u32 and that `out`
/// holds the jobs, rows and weights.
fn place_words(
    kernel: &'static str,
    out: &RouteOut<'_>,
    (n_experts, k): (usize, usize),
    pl: ExpertPlace,
) -> Result<[u32; 14], GpuError> {
    holds(kernel, "jobs", out.jobs, 2 * k * JOB_WORDS)?;
    holds(kernel, "rows", out.rows, k)?;
    holds(kernel, "weights", out.weights, k)?;
    let last = (pl.first as u64 + n_experts as u64) * pl.stride;
    u32_of(kernel, "pool bytes", last as usize)?;
    let mut w = [0u32; 14];
    w[0] = pl.first;
    w[1] = u32_of(kernel, "slot stride", pl.stride as usize)?;
    for (m, o) in pl.offsets.iter().enumerate() {
        for (i, &v) in o.iter().enumerate() {
            w[2 + 4 * m + i] = u32_of(kernel, "array offset", v as usize)?;
        }
    }
    Ok(w)
}

/// The buffers of an expert-batch product, in binding order: `x`, `y`,
/// the pool (weights), the pool again for MLX scales and biases (read at
/// the jobs' word offsets), then `tail` (the job table, ...).
fn expert_buffers<'b>(
    m: &MatShape,
    x: &'b wgpu::Buffer,
    y: &'b wgpu::Buffer,
    pool: &'b wgpu::Buffer,
    tail: &[&'b wgpu::Buffer],
) -> Vec<&'b wgpu::Buffer> {
    let mut bufs = vec![x, y, pool];
    if matches!(m.kind, WeightKind::Mlx { .. }) {
        bufs.extend([pool, pool]);
    }
    bufs.extend_from_slice(tail);
    bufs
}

/// Checks the inputs of an attention block's prep (`attention_prep.wgsl`
/// or the decode attention's PREP, both through `head_prep.wgsl`) for `n`
/// tokens: a head_dim the kernels take and `half` rotated pairs within it,
/// the q|k|v rows, the rotary table, and the norms when either is used.
fn prep_inputs(
    kernel: &'static str,
    (qkv, norms, cs): (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer),
    s: AttentionShape,
    n: usize,
    half: usize,
    normed: bool,
) -> Result<(), GpuError> {
    let hd = s.head_dim;
    if hd == 0 || !hd.is_multiple_of(2) || hd > MAX_HEAD_DIM || 2 * half > hd {
        return Err(GpuError::Shape {
            kernel,
            detail: format!(
                "head_dim {hd} with {half} rotated pairs (an even head_dim up to {MAX_HEAD_DIM})"
            ),
        });
    }
    holds(kernel, "qkv", qkv, n * s.qkv_width())?;
    holds(kernel, "cs", cs, 2 * n * half)?;
    if normed {
        holds(kernel, "norms", norms, 2 * hd)?;
    }
    Ok(())
}

/// The largest value of a kernel's size parameter. Kernel loops count up
/// towards bounds no larger than their parameters, in steps of at most
/// twice a workgroup (512); with this headroom a counter never wraps past
/// `u32::MAX`, so every loop ends (what lets the kernels be compiled
/// without naga's loop bounding: see `kernels::RUNTIME_CHECKS`).
pub const MAX_PARAM: u32 = u32::MAX - 1024;

/// Converts a size to the u32 a kernel parameter holds (at most
/// [`MAX_PARAM`]).
fn u32_of(kernel: &'static str, what: &str, v: usize) -> Result<u32, GpuError> {
    u32::try_from(v)
        .ok()
        .filter(|&v| v <= MAX_PARAM)
        .ok_or_else(|| GpuError::Shape {
            kernel,
            detail: format!(
                "{what} = {v} is too large for a kernel parameter (at most {MAX_PARAM})"
            ),
        })
}

/// Checks that `buf` holds at least `len` f32 values.
fn holds(kernel: &'static str, what: &str, buf: &wgpu::Buffer, len: usize) -> Result<(), GpuError> {
    if buf.size() < 4 * len as u64 {
        return Err(GpuError::Shape {
            kernel,
            detail: format!("{what} holds {} bytes, needs {}", buf.size(), 4 * len),
        });
    }
    Ok(())
}

impl<'g> Pass<'g> {
    /// An empty pass with the device's default kernel variant.
    pub fn new(gpu: &'g Gpu) -> Pass<'g> {
        Pass::with_variant(gpu, gpu.variant)
    }

    /// An empty pass whose kernels are compiled as `variant` (tests run
    /// every variant the device supports).
    pub fn with_variant(gpu: &'g Gpu, variant: Variant) -> Pass<'g> {
        Pass {
            gpu,
            variant,
            last_group_finishes: gpu.device_scope_barrier,
            items: Vec::new(),
            arena: None,
            after: 0,
            prompt: false,
        }
    }

    /// Makes the next submission wait for the copy queue's copies up to
    /// `value` (experts prefetched into slots it reads; see
    /// [`super::copy_queue`]).
    pub fn after_copies(&mut self, value: u64) {
        self.after = self.after.max(value);
    }

    /// Whether the last workgroup of a dispatch finishes its work (see
    /// `arrive.wgsl`): attention merges its spans, and
    /// [`Pass::router_route`] routes, in one dispatch; else each in a
    /// second dispatch. The default is [`Gpu::device_scope_barrier`], and
    /// only where it holds may this turn it on (elsewhere the second
    /// dispatches stay); tests run both.
    pub fn set_last_group_finishes(&mut self, on: bool) {
        self.last_group_finishes = on && self.gpu.device_scope_barrier;
    }

    /// Whether products of one token take the prompt shape
    /// (`matmul_tiled.wgsl`, as products of several tokens always do)
    /// instead of the one-token kernels. The two shapes sum in different
    /// orders, so a prompt cut into chunks (some of one token) gets the
    /// bits of the whole prompt only if every chunk takes the prompt
    /// shape; decode steps take the one-token shape (the default).
    pub fn set_prompt(&mut self, on: bool) {
        self.prompt = on;
    }

    /// Whether a product of `shape` binds no more storage buffers than the
    /// device allows (the fused variants bind the most).
    fn binds(&self, shape: Product) -> bool {
        shape.n_buffers() <= self.gpu.limits.max_storage_buffers as usize
    }

    /// An empty pass whose parameters and bind groups come from `arena`
    /// (the default variant). When the arena fills up the pass submits
    /// what it has recorded and goes on: the order of the work is the
    /// same.
    pub fn with_arena(gpu: &'g Gpu, arena: &'g mut ParamArena) -> Pass<'g> {
        arena.host.clear();
        Pass {
            gpu,
            variant: gpu.variant,
            last_group_finishes: gpu.device_scope_barrier,
            items: Vec::new(),
            arena: Some(arena),
            after: 0,
            prompt: false,
        }
    }

    /// Workgroup counts `(x, y)` covering `count` workgroups within the
    /// per-dimension limit; the kernels number them `x + y · wg_x`.
    fn grid(&self, count: usize) -> Result<(u32, u32), GpuError> {
        let max = self.gpu.limits.max_workgroups_per_dim.max(1) as usize;
        let x = count.clamp(1, max);
        let y = count.div_ceil(x);
        if y > max {
            return Err(GpuError::Shape {
                kernel: "dispatch",
                detail: format!("{count} workgroups exceed {max} × {max}"),
            });
        }
        Ok((x as u32, y as u32))
    }

    /// Records `kernel` over `groups` workgroups with `params` (binding 0)
    /// and `buffers` (bindings 1, 2, ...).
    fn push(
        &mut self,
        kernel: Kernel,
        params: &[u8],
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) -> Result<(), GpuError> {
        let gpu = self.gpu;
        if self.arena.is_some() {
            return self.push_shared(kernel, params, buffers, groups);
        }
        let pipeline = gpu.pipeline(kernel, self.variant)?;
        let uniform = gpu.uniform("params", params)?;
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.as_entire_binding(),
            });
        }
        let bind = gpu.checked(&format!("binding {}", kernel.name()), || {
            gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.layout,
                entries: &entries,
            })
        })?;
        self.items.push(Dispatch {
            kernel,
            pipeline,
            bind,
            groups,
            offset: 0,
        });
        Ok(())
    }

    /// [`Pass::push`] through the parameter arena.
    fn push_shared(
        &mut self,
        kernel: Kernel,
        params: &[u8],
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) -> Result<(), GpuError> {
        let gpu = self.gpu;
        if params.len() as u64 > PARAM_BYTES {
            return Err(GpuError::Shape {
                kernel: "parameters",
                detail: format!("{} bytes for {}", params.len(), kernel.name()),
            });
        }
        if self.arena.as_ref().is_some_and(|a| a.full()) {
            self.flush()?;
        }
        let pipeline = gpu.pipeline(kernel, self.variant)?;
        let Some(arena) = self.arena.as_deref_mut() else {
            return Err(GpuError::Wgpu("parameter arena missing".into()));
        };
        let offset = arena.host.len();
        arena.host.extend_from_slice(params);
        arena.host.resize(offset + arena.align as usize, 0);
        let key = (
            Arc::as_ptr(&pipeline) as usize,
            buffers.iter().map(|b| (*b).clone()).collect::<Vec<_>>(),
        );
        let bind = match arena.bind_groups.get(&key) {
            Some(b) => b.clone(),
            None => {
                if arena.bind_groups.len() >= MAX_BIND_GROUPS {
                    arena.bind_groups.clear();
                }
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &arena.buffer,
                        offset: 0,
                        size: std::num::NonZeroU64::new(PARAM_BYTES),
                    }),
                }];
                for (i, b) in buffers.iter().enumerate() {
                    entries.push(wgpu::BindGroupEntry {
                        binding: i as u32 + 1,
                        resource: b.as_entire_binding(),
                    });
                }
                let bind = gpu.checked(&format!("binding {}", kernel.name()), || {
                    gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: None,
                        layout: &pipeline.layout,
                        entries: &entries,
                    })
                })?;
                arena.bind_groups.insert(key, bind.clone());
                bind
            }
        };
        self.items.push(Dispatch {
            kernel,
            pipeline,
            bind,
            groups,
            offset: offset as u32,
        });
        Ok(())
    }

    /// Submits what is recorded so far and goes on with an empty pass
    /// (and arena), without waiting.
    pub fn flush(&mut self) -> Result<(), GpuError> {
        self.flush_then(None)
    }

    /// `y = x Wᵀ`: `x` is `n × w.cols`, `y` is `n × w.rows` (f32,
    /// row-major). One dispatch per part of `w`.
    pub fn matmul(
        &mut self,
        w: &GpuMatrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n: usize,
    ) -> Result<(), GpuError> {
        self.product(w, x, y, n, (0, w.shape.rows), false, None)
    }

    /// `y += x Wᵀ` (`x`: `n × w.cols`, `y`: `n × w.rows`): a projection
    /// and its residual add in one dispatch.
    pub fn matmul_add(
        &mut self,
        w: &GpuMatrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n: usize,
    ) -> Result<(), GpuError> {
        self.product(w, x, y, n, (0, w.shape.rows), true, None)
    }

    /// `y = x Wᵀ` into columns `col0..col0 + w.rows` of `y`, whose rows
    /// are `width` values long (`x`: `n × w.cols`): several projections of
    /// the same input side by side in one buffer.
    pub fn matmul_into(
        &mut self,
        w: &GpuMatrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n: usize,
        cols: (usize, usize),
    ) -> Result<(), GpuError> {
        self.product(w, x, y, n, cols, false, None)
    }

    /// [`Pass::matmul_into`] of `x`'s rows RMS-normalised with `norm`
    /// (weights of `w.cols` values, epsilon), which also leaves the
    /// normalised rows in `normed` (`n × w.cols`): an RMSNorm and the first
    /// product that reads it in one dispatch (a prompt's: `rms_norm`, then
    /// the product of the normalised rows).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_normed(
        &mut self,
        w: &GpuMatrix,
        x: &wgpu::Buffer,
        norm: (&wgpu::Buffer, f32),
        normed: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n: usize,
        cols: (usize, usize),
    ) -> Result<(), GpuError> {
        self.product(w, x, y, n, cols, false, Some((norm.0, normed, norm.1)))
    }

    /// [`Pass::matmul_into`], adding to `y` when `acc`, normalising `x`
    /// when `norm` (weights, normalised rows, epsilon).
    #[allow(clippy::too_many_arguments)]
    fn product(
        &mut self,
        w: &GpuMatrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n: usize,
        (col0, width): (usize, usize),
        acc: bool,
        norm: Option<(&wgpu::Buffer, &wgpu::Buffer, f32)>,
    ) -> Result<(), GpuError> {
        const K: &str = "matmul";
        if n == 0 {
            return Ok(());
        }
        let m = &w.shape;
        if col0 + m.rows > width {
            return Err(GpuError::Shape {
                kernel: K,
                detail: format!("{} rows at column {col0} of rows of {width}", m.rows),
            });
        }
        holds(K, "x", x, n * m.cols)?;
        holds(K, "y", y, n * width)?;
        if let Some((weights, normed, _)) = norm {
            holds(K, "norm weights", weights, m.cols)?;
            holds(K, "normed", normed, n * m.cols)?;
        }
        let one_token = n == 1 && !self.prompt;
        // A prompt's rows are normalised first, and the product reads them.
        let (x, norm) = match norm {
            Some((weights, normed, eps)) if !one_token => {
                self.rms_norm(x, weights, normed, n, m.cols, eps)?;
                (normed, None)
            }
            other => (x, other),
        };
        let shape = Product {
            kind: m.kind,
            one_token,
            batch: if norm.is_some() {
                Batch::OneNormed
            } else {
                Batch::One
            },
        };
        let eps = norm.map_or(0.0, |n| n.2);
        for part in &w.parts {
            let (gx, gy) = self.grid(part.rows.div_ceil(shape.rows_per_group()))?;
            let rows = (part.rows, col0 + part.row0, width);
            let params = product_params(m, rows, n, gx, 0, acc, eps)?;
            let gz = u32_of(K, "token groups", n.div_ceil(shape.tokens_per_group()))?;
            let mut bufs = vec![x, y, &part.weight];
            if let Some((s, b)) = &part.scales {
                bufs.extend([s, b]);
            }
            if let Some((weights, normed, _)) = norm {
                bufs.extend([weights, normed]);
            }
            self.push(Kernel::MatMul(shape), &params, &bufs, [gx, gy, gz])?;
        }
        Ok(())
    }

    /// One product for a batch of experts whose matrices (all of shape
    /// `m`) lie in `pool`: jobs `job0..job0 + count` of the table `jobs`
    /// ([`JOB_WORDS`] u32 words a job, see `matmul.wgsl`: A's byte offset,
    /// A's scale and bias word offsets, the same for B, first row of `y`,
    /// token count, first row of `x`). `Batch::Experts`: `y = x Aᵀ`;
    /// `Batch::ExpertsGlu`: `y = silu(x Aᵀ) · x Bᵀ`. `x` and `y` hold
    /// `rows.0` and `rows.1` token rows (of `m.cols` and `m.rows` values);
    /// `max_tokens` is the most tokens of a job (one, outside a prompt: the
    /// decode kernel).
    #[allow(clippy::too_many_arguments)]
    pub fn expert_matmul(
        &mut self,
        m: &MatShape,
        glu: bool,
        pool: &wgpu::Buffer,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        jobs: &wgpu::Buffer,
        (job0, count): (usize, usize),
        rows: (usize, usize),
        max_tokens: usize,
    ) -> Result<(), GpuError> {
        const K: &str = "expert matmul";
        if count == 0 || max_tokens == 0 {
            return Ok(());
        }
        holds(K, "x", x, rows.0 * m.cols)?;
        holds(K, "y", y, rows.1 * m.rows)?;
        holds(K, "jobs", jobs, JOB_WORDS * (job0 + count))?;
        let shape = Product {
            kind: m.kind,
            one_token: max_tokens == 1 && !self.prompt,
            batch: if glu {
                Batch::ExpertsGlu
            } else {
                Batch::Experts
            },
        };
        let gx = u32_of(K, "row groups", m.rows.div_ceil(shape.rows_per_group()))?;
        let gy = u32_of(K, "jobs", count)?;
        let gz = u32_of(
            K,
            "token groups",
            max_tokens.div_ceil(shape.tokens_per_group()),
        )?;
        let max = self.gpu.limits.max_workgroups_per_dim;
        if gx > max || gy > max || gz > max {
            return Err(GpuError::Shape {
                kernel: K,
                detail: format!("{gx} × {gy} × {gz} workgroups (at most {max} a dimension)"),
            });
        }
        // Tokens come from each job.
        let params = product_params(m, (m.rows, 0, m.rows), 0, gx, job0, false, 0.0)?;
        let bufs = expert_buffers(m, x, y, pool, &[jobs]);
        self.push(Kernel::MatMul(shape), &params, &bufs, [gx, gy, gz])
    }

    /// One token's expert down projections and the MoE combine in one
    /// dispatch: for jobs `job0..job0 + count` of `jobs` (the token's
    /// experts in rank order, matrices of shape `m` in `pool`, inputs at
    /// the jobs' rows of `x`), `y += Σ_r weights[r] · x_r A_rᵀ`, summed in
    /// rank order — what [`Pass::expert_matmul`] and [`Pass::moe_combine`]
    /// compute, bit for bit, in one dispatch instead of two.
    #[allow(clippy::too_many_arguments)]
    pub fn expert_matmul_combine(
        &mut self,
        m: &MatShape,
        pool: &wgpu::Buffer,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        jobs: &wgpu::Buffer,
        (job0, count): (usize, usize),
        weights: &wgpu::Buffer,
    ) -> Result<(), GpuError> {
        const K: &str = "expert matmul combine";
        if count == 0 {
            return Ok(());
        }
        holds(K, "x", x, count * m.cols)?;
        holds(K, "y", y, m.rows)?;
        holds(K, "jobs", jobs, JOB_WORDS * (job0 + count))?;
        holds(K, "weights", weights, count)?;
        let shape = Product {
            kind: m.kind,
            one_token: true,
            batch: Batch::ExpertsCombine,
        };
        let gx = u32_of(K, "row groups", m.rows.div_ceil(shape.rows_per_group()))?;
        if gx > self.gpu.limits.max_workgroups_per_dim {
            return Err(GpuError::Shape {
                kernel: K,
                detail: format!("{gx} row groups"),
            });
        }
        // p.n is the job count.
        let params = product_params(m, (m.rows, 0, m.rows), count, gx, job0, false, 0.0)?;
        let bufs = expert_buffers(m, x, y, pool, &[jobs, weights]);
        self.push(Kernel::MatMul(shape), &params, &bufs, [gx, 1, 1])
    }

    /// RMSNorm of each `dim`-long row of `x` (`rows` rows) into `out`.
    pub fn rms_norm(
        &mut self,
        x: &wgpu::Buffer,
        weight: &wgpu::Buffer,
        out: &wgpu::Buffer,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        const K: &str = "rms_norm";
        holds(K, "x", x, rows * dim)?;
        holds(K, "out", out, rows * dim)?;
        holds(K, "weight", weight, dim)?;
        let (gx, gy) = self.grid(rows)?;
        let params = words(&[
            u32_of(K, "rows", rows)?,
            u32_of(K, "dim", dim)?,
            gx,
            eps.to_bits(),
        ]);
        self.push(Kernel::RmsNorm, &params, &[x, weight, out], [gx, gy, 1])
    }

    /// Decode attention of one token's queries `q` (`n_heads × head_dim`)
    /// over the cache `k`, `v`; writes `out` (`n_heads × head_dim`).
    /// `scratch` holds the partial results of spans of the context (see
    /// [`Pass::attention_causal`]).
    pub fn attention(
        &mut self,
        q: &wgpu::Buffer,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
        scratch: &wgpu::Buffer,
        out: &wgpu::Buffer,
        s: AttentionShape,
    ) -> Result<(), GpuError> {
        self.attention_causal(q, k, v, scratch, out, s, 1)
    }

    /// Causal attention of the last `n_q` of `s.len` positions (the
    /// prefill chunk; the cache holds their keys and values already):
    /// query `t` of `q` (`n_q × n_heads × head_dim`) sees the first
    /// `s.len − n_q + 1 + t` positions; writes `out` (same shape as `q`).
    /// The context is cut into spans computed by separate workgroups and
    /// merged by each head's last workgroup or by a second dispatch (see
    /// [`Pass::set_last_group_finishes`]; a single span needs no merge);
    /// `scratch` holds a partial
    /// result (`head_dim + 2` f32) per span, head and query, and the more
    /// it holds (up to one span per [`ATTENTION_SPAN`] positions) the more
    /// workgroups share the work; one that holds none for every query and
    /// head gives a single span.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_causal(
        &mut self,
        q: &wgpu::Buffer,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
        scratch: &wgpu::Buffer,
        out: &wgpu::Buffer,
        s: AttentionShape,
        n_q: usize,
    ) -> Result<(), GpuError> {
        self.attention_spans(q, (k, v), scratch, out, s, n_q, None)
    }

    /// A decode step's attention block after its projections, in the two
    /// dispatches of [`Pass::attention`]: [`Pass::attention_prep`]'s work
    /// for the one token at position `s.len − 1` (`qkv` its raw q, k and
    /// v head rows; `cs` the rotary table's one row for that position;
    /// `norms`, `half`, `norm`, `eps` as there; its k and v written into
    /// the cache `k`, `v` at that position) done by the attention
    /// workgroups themselves, with the same bits as the prep dispatch
    /// followed by [`Pass::attention`] (see `attention.wgsl`, PREP, for
    /// the drivers where that holds).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &mut self,
        qkv: &wgpu::Buffer,
        norms: &wgpu::Buffer,
        cs: &wgpu::Buffer,
        (k, v): (&wgpu::Buffer, &wgpu::Buffer),
        scratch: &wgpu::Buffer,
        out: &wgpu::Buffer,
        s: AttentionShape,
        half: usize,
        (norm, eps): ((bool, bool), f32),
    ) -> Result<(), GpuError> {
        const K: &str = "attention (decode)";
        prep_inputs(K, (qkv, norms, cs), s, 1, half, norm.0 || norm.1)?;
        let prep = DecodePrep {
            norms,
            cs,
            half,
            norm,
            eps,
        };
        self.attention_spans(qkv, (k, v), scratch, out, s, 1, Some(prep))
    }

    /// [`Pass::attention_causal`], or with `prep` [`Pass::attention_decode`].
    #[allow(clippy::too_many_arguments)]
    fn attention_spans(
        &mut self,
        q: &wgpu::Buffer,
        (k, v): (&wgpu::Buffer, &wgpu::Buffer),
        scratch: &wgpu::Buffer,
        out: &wgpu::Buffer,
        s: AttentionShape,
        n_q: usize,
        prep: Option<DecodePrep<'_>>,
    ) -> Result<(), GpuError> {
        const K: &str = "attention";
        let bad = |detail: String| GpuError::Shape { kernel: K, detail };
        if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
            return Err(bad(format!(
                "{} heads over {} KV heads",
                s.n_heads, s.n_kv_heads
            )));
        }
        // 16-byte loads of whole rows, at most one load a thread a row.
        let max_hd = 4 * (2 * WG as usize);
        if s.head_dim == 0 || !s.head_dim.is_multiple_of(8) || s.head_dim > max_hd {
            return Err(bad(format!(
                "head_dim {} (must be a multiple of 8 and at most {max_hd})",
                s.head_dim
            )));
        }
        if s.len == 0 || n_q == 0 || n_q > s.len {
            return Err(bad(format!(
                "{n_q} queries over {} positions (need 1 ≤ queries ≤ positions)",
                s.len
            )));
        }
        let kv_dim = s.n_kv_heads * s.head_dim;
        if s.k_stride < kv_dim
            || s.v_stride < kv_dim
            || !(s.k_stride.is_multiple_of(8) && s.v_stride.is_multiple_of(8))
        {
            return Err(bad(format!(
                "cache strides {} / {} for {kv_dim} values a position (must be multiples of 8)",
                s.k_stride, s.v_stride
            )));
        }
        if prep.is_none() {
            holds(K, "q", q, n_q * s.n_heads * s.head_dim)?;
        }
        holds(K, "out", out, n_q * s.n_heads * s.head_dim)?;
        // Sizes in f32 units: an f16 cache needs half the bytes.
        let cache = |stride: usize| {
            let elems = (s.len - 1) * stride + kv_dim;
            if s.kv_f16 {
                elems.div_ceil(2)
            } else {
                elems
            }
        };
        holds(K, "k", k, cache(s.k_stride))?;
        holds(K, "v", v, cache(s.v_stride))?;
        // Spans: as many as the scratch holds, one per ATTENTION_SPAN
        // positions at most (a single span uses no scratch).
        let row = s.head_dim + 2;
        let fits = (scratch.size() as usize / 4 / row) / (n_q * s.n_heads);
        // (and at most merge.wgsl's MAX_SPANS: longer contexts get longer
        // spans).
        let spans = s.len.div_ceil(ATTENTION_SPAN).min(fits).clamp(1, MAX_SPANS);
        let span = s.len.div_ceil(spans).next_multiple_of(ATTENTION_SPAN);
        let spans = s.len.div_ceil(span);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        // Positions a chunk (see attention.wgsl): a power of two dividing
        // the span, its partial dot products (L a row) within the kernel's
        // 1024 shared slots, its rows within eight rounds of WG / L.
        let loads = s.head_dim / if s.kv_f16 { 8 } else { 4 };
        let rows_a_round = (2 * WG as usize) / loads;
        let most = 64usize.min(1024 / loads).min(8 * rows_a_round);
        let chunk = 1usize << most.ilog2();
        let params = words(&[
            u32_of(K, "heads", s.n_heads)?,
            u32_of(K, "kv heads", s.n_kv_heads)?,
            u32_of(K, "head_dim", s.head_dim)?,
            u32_of(K, "len", s.len)?,
            u32_of(K, "k stride", s.k_stride)?,
            u32_of(K, "v stride", s.v_stride)?,
            scale.to_bits(),
            u32_of(K, "queries", n_q)?,
            u32_of(K, "span", span)?,
            u32_of(K, "spans", spans)?,
            chunk as u32,
            u32_of(K, "half", prep.as_ref().map_or(0, |p| p.half))?,
            prep.as_ref().map_or(0, |p| p.eps.to_bits()),
            prep.as_ref().is_some_and(|p| p.norm.0) as u32,
            prep.as_ref().is_some_and(|p| p.norm.1) as u32,
            0,
            0,
            0,
        ]);
        let heads = u32_of(K, "heads", s.n_heads)?;
        let queries = u32_of(K, "queries", n_q)?;
        let max = self.gpu.limits.max_workgroups_per_dim;
        if heads > max || queries > max || spans as u32 > max {
            return Err(bad(format!(
                "{heads} heads × {queries} queries × {spans} spans"
            )));
        }
        // One span writes the output itself (see attention.wgsl); more
        // are merged by the attention workgroups where the device allows
        // and the counts suffice, else by a merge dispatch.
        let merge = spans > 1 && self.last_group_finishes && n_q * s.n_heads <= ARRIVAL_COUNTS;
        let kernel = Kernel::Attention {
            kv_f16: s.kv_f16,
            prep: prep.is_some(),
            merge,
        };
        let mut bufs = vec![q, k, v, scratch, out];
        if merge {
            bufs.push(&self.gpu.arrival_counts);
        }
        if let Some(p) = &prep {
            bufs.extend([p.norms, p.cs]);
        }
        self.push(kernel, &params, &bufs, [heads, queries, spans as u32])?;
        if spans == 1 || merge {
            return Ok(());
        }
        let params = words(&[heads, u32_of(K, "head_dim", s.head_dim)?, spans as u32, 0]);
        self.push(
            Kernel::AttentionMerge,
            &params,
            &[scratch, out],
            [heads, queries, 1],
        )
    }

    /// The steps between an attention block's projections and its
    /// attention (see `attention_prep.wgsl`): `qkv` holds each token's q,
    /// k and v head rows side by side; q rows are normalised with
    /// `norms[..head_dim]` (when `norm.0`) and rotated into `qn`, k rows
    /// normalised with `norms[head_dim..]` (when `norm.1`), rotated and
    /// written into the cache `k` at positions `pos0..pos0 + n`, v rows
    /// into `v`. `cs` is the (cos, sin) table of [`rope_table`] (`n ×
    /// half` pairs).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prep(
        &mut self,
        qkv: &wgpu::Buffer,
        norms: &wgpu::Buffer,
        cs: &wgpu::Buffer,
        qn: &wgpu::Buffer,
        (k, v): (&wgpu::Buffer, &wgpu::Buffer),
        s: AttentionShape,
        (n, pos0, half): (usize, usize, usize),
        (norm, eps): ((bool, bool), f32),
    ) -> Result<(), GpuError> {
        const K: &str = "attention_prep";
        let bad = |detail: String| GpuError::Shape { kernel: K, detail };
        let hd = s.head_dim;
        if s.n_kv_heads == 0 || n == 0 {
            return Err(bad(format!("{} KV heads, {n} tokens", s.n_kv_heads)));
        }
        prep_inputs(K, (qkv, norms, cs), s, n, half, norm.0 || norm.1)?;
        holds(K, "qn", qn, n * s.n_heads * hd)?;
        let kv_dim = s.n_kv_heads * hd;
        if s.k_stride != s.v_stride || s.k_stride < kv_dim || !s.k_stride.is_multiple_of(2) {
            return Err(bad(format!(
                "cache strides {} / {}",
                s.k_stride, s.v_stride
            )));
        }
        let end = (pos0 + n - 1) * s.k_stride + kv_dim;
        let words_needed = if s.kv_f16 { end.div_ceil(2) } else { end };
        holds(K, "k", k, words_needed)?;
        holds(K, "v", v, words_needed)?;
        let params = words(&[
            u32_of(K, "heads", s.n_heads)?,
            u32_of(K, "kv heads", s.n_kv_heads)?,
            u32_of(K, "head_dim", hd)?,
            u32_of(K, "half", half)?,
            u32_of(K, "pos0", pos0)?,
            u32_of(K, "stride", s.k_stride)?,
            eps.to_bits(),
            norm.0 as u32,
            norm.1 as u32,
            u32_of(K, "q|k|v row", s.qkv_width())?,
            0,
            0,
        ]);
        let rows = u32_of(K, "head rows", s.n_heads + 2 * s.n_kv_heads)?;
        let tokens = u32_of(K, "tokens", n)?;
        let max = self.gpu.limits.max_workgroups_per_dim;
        if rows > max || tokens > max {
            return Err(bad(format!("{rows} head rows × {tokens} tokens")));
        }
        self.push(
            Kernel::AttentionPrep { kv_f16: s.kv_f16 },
            &params,
            &[qkv, norms, cs, qn, k, v],
            [rows, tokens, 1],
        )
    }

    /// `out[i] = src[idx[i]]` for `rows` rows of `dim` values (`idx`: u32).
    pub fn gather(
        &mut self,
        src: &wgpu::Buffer,
        idx: &wgpu::Buffer,
        out: &wgpu::Buffer,
        rows: usize,
        dim: usize,
    ) -> Result<(), GpuError> {
        const K: &str = "gather";
        if rows == 0 {
            return Ok(());
        }
        holds(K, "idx", idx, rows)?;
        holds(K, "out", out, rows * dim)?;
        u32_of(K, "values", rows * dim)?;
        let (gx, gy) = self.grid((rows * dim).div_ceil(WG as usize))?;
        let params = words(&[u32_of(K, "rows", rows)?, u32_of(K, "dim", dim)?, gx, 0]);
        self.push(Kernel::Gather, &params, &[src, idx, out], [gx, gy, 1])
    }

    /// `x[t] += Σ_r w[t·k + r] · y[row[t·k + r]]` for `n` tokens of `dim`
    /// values, in rank order (`row`: u32, `w`: f32, `n × k` each).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_combine(
        &mut self,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        row: &wgpu::Buffer,
        w: &wgpu::Buffer,
        n: usize,
        dim: usize,
        k: usize,
    ) -> Result<(), GpuError> {
        const K: &str = "moe_combine";
        if n == 0 {
            return Ok(());
        }
        holds(K, "x", x, n * dim)?;
        holds(K, "y", y, n * k * dim)?;
        holds(K, "row", row, n * k)?;
        holds(K, "w", w, n * k)?;
        u32_of(K, "values", n * k * dim)?;
        let (gx, gy) = self.grid((n * dim).div_ceil(WG as usize))?;
        let params = words(&[
            u32_of(K, "tokens", n)?,
            u32_of(K, "dim", dim)?,
            u32_of(K, "k", k)?,
            gx,
        ]);
        self.push(Kernel::MoeCombine, &params, &[x, y, row, w], [gx, gy, 1])
    }

    /// A chunk of `n` tokens through a Gated DeltaNet layer (see
    /// `delta_net.wgsl`): `proj` holds each token's input projections
    /// (`shape.stride` values, laid out as `shape.layout` says) — their
    /// b|a part there, or, where `ba` is given, in `ba` instead (rows of
    /// `2 n_v` values: a b|a product of its own) — `conv_w` the conv taps,
    /// `head_w` `[a | dt_bias | norm]`; `window` (two copies, `cur` the
    /// one read) and `state` are the layer's recurrent state; `out` gets
    /// `n × n_v × d_v`.
    #[allow(clippy::too_many_arguments)]
    pub fn delta_net(
        &mut self,
        (proj, ba): (&wgpu::Buffer, Option<&wgpu::Buffer>),
        (conv_w, head_w): (&wgpu::Buffer, &wgpu::Buffer),
        (window, state): (&wgpu::Buffer, &wgpu::Buffer),
        out: &wgpu::Buffer,
        shape: DeltaShape,
        n: usize,
        cur: bool,
    ) -> Result<(), GpuError> {
        const K: &str = "delta_net";
        let d = shape;
        let bad = |detail: String| GpuError::Shape { kernel: K, detail };
        if d.n_k == 0
            || d.n_v == 0
            || !d.n_v.is_multiple_of(d.n_k)
            || d.taps == 0
            || d.taps > MAX_CONV_TAPS
            || n == 0
        {
            return Err(bad(format!(
                "{} key heads, {} value heads, {} taps (at most {MAX_CONV_TAPS}), {n} tokens",
                d.n_k, d.n_v, d.taps
            )));
        }
        if d.k_dim == 0 || d.v_dim == 0 || d.k_dim > MAX_DELTA_DIM || d.v_dim > MAX_DELTA_DIM {
            return Err(bad(format!(
                "heads of {} key and {} value dimensions (at most {MAX_DELTA_DIM})",
                d.k_dim, d.v_dim
            )));
        }
        if d.layout > 2 || (d.layout != 0 && d.tiled) {
            return Err(bad(format!(
                "layout {} with tiled heads {}",
                d.layout, d.tiled
            )));
        }
        let ch = d.channels();
        // b|a's first column and row length.
        let (ba_at, ba_stride) = match ba {
            Some(_) => (0, 2 * d.n_v),
            None => (ch + d.n_v * d.v_dim, d.stride),
        };
        let row = ch + d.n_v * d.v_dim + if ba.is_some() { 0 } else { 2 * d.n_v };
        if d.stride < row {
            return Err(bad(format!("rows of {} values for {row} inputs", d.stride)));
        }
        holds(K, "proj", proj, n * d.stride)?;
        if let Some(ba) = ba {
            holds(K, "ba", ba, n * ba_stride)?;
        }
        holds(K, "conv_w", conv_w, ch * d.taps)?;
        holds(K, "head_w", head_w, 2 * d.n_v + d.v_dim)?;
        holds(K, "window", window, 2 * (d.taps - 1) * ch)?;
        holds(K, "state", state, d.n_v * d.k_dim * d.v_dim)?;
        holds(K, "out", out, n * d.n_v * d.v_dim)?;
        let params = words(&[
            u32_of(K, "tokens", n)?,
            u32_of(K, "key heads", d.n_k)?,
            u32_of(K, "value heads", d.n_v)?,
            u32_of(K, "v_dim", d.v_dim)?,
            u32_of(K, "taps", d.taps)?,
            d.layout,
            d.tiled as u32,
            u32_of(K, "stride", d.stride)?,
            cur as u32,
            d.eps.to_bits(),
            (1.0 / (d.k_dim as f32).sqrt()).to_bits(),
            u32_of(K, "b|a stride", ba_stride)?,
            u32_of(K, "b|a column", ba_at)?,
            0,
            0,
            0,
        ]);
        let heads = u32_of(K, "value heads", d.n_v)?;
        if heads > self.gpu.limits.max_workgroups_per_dim {
            return Err(bad(format!("{heads} value heads")));
        }
        self.push(
            Kernel::DeltaNet {
                k_dim: d.k_dim as u32,
                split: delta_net_split(d.k_dim, self.gpu.limits.max_invocations),
            },
            &params,
            &[proj, conv_w, head_w, window, state, out, ba.unwrap_or(proj)],
            [heads, 1, 1],
        )
    }

    /// `out[t] = SiLU(gate) · up · s` for `n` tokens of `width` values
    /// (see `swiglu.wgsl`): `a` holds each token's gate and up side by
    /// side, `stride` values a token, and `gate` says what `s` is.
    pub fn swiglu(
        &mut self,
        a: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n: usize,
        width: usize,
        (stride, gate): (usize, SwigluGate<'_>),
    ) -> Result<(), GpuError> {
        const K: &str = "swiglu";
        let bad = |detail: String| GpuError::Shape { kernel: K, detail };
        if n == 0 {
            return Ok(());
        }
        let in_row = matches!(gate, SwigluGate::InRow);
        if stride < 2 * width + in_row as usize {
            return Err(bad(format!("rows of {stride} values for {width} outputs")));
        }
        holds(K, "a", a, n * stride)?;
        holds(K, "out", out, n * width)?;
        let (mode, hidden, h, w) = match gate {
            SwigluGate::None => (0, 0, a, a),
            SwigluGate::InRow => (1, 0, a, a),
            SwigluGate::Dot { h, w, hidden } => {
                if hidden == 0 || !hidden.is_multiple_of(4) {
                    return Err(bad(format!("a gate row of {hidden} values")));
                }
                holds(K, "h", h, n * hidden)?;
                holds(K, "gate row", w, hidden)?;
                (2, hidden, h, w)
            }
        };
        let wg = Kernel::Swiglu.workgroup_size() as usize;
        let (gx, tokens) = (
            u32_of(K, "blocks", width.div_ceil(wg))?,
            u32_of(K, "tokens", n)?,
        );
        let max = self.gpu.limits.max_workgroups_per_dim;
        if gx > max || tokens > max {
            return Err(bad(format!("{gx} blocks × {tokens} tokens")));
        }
        let params = words(&[
            tokens,
            u32_of(K, "width", width)?,
            u32_of(K, "stride", stride)?,
            mode,
            u32_of(K, "hidden", hidden / 4)?,
            0,
            0,
            0,
        ]);
        self.push(Kernel::Swiglu, &params, &[a, out, h, w], [gx, tokens, 1])
    }

    /// `y[t][i] *= σ(g[t · stride + at + i])` for `n` tokens of `width`
    /// values: the gated attention's output gate.
    pub fn output_gate(
        &mut self,
        g: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n: usize,
        width: usize,
        (stride, at): (usize, usize),
    ) -> Result<(), GpuError> {
        const K: &str = "output_gate";
        if n == 0 {
            return Ok(());
        }
        if stride < at + width {
            return Err(GpuError::Shape {
                kernel: K,
                detail: format!("gates at {at} of rows of {stride} values"),
            });
        }
        holds(K, "g", g, n * stride)?;
        holds(K, "y", y, n * width)?;
        let (gx, gy) = self.grid((n * width).div_ceil(WG as usize))?;
        let params = words(&[
            u32_of(K, "tokens", n)?,
            u32_of(K, "width", width)?,
            u32_of(K, "stride", stride)?,
            u32_of(K, "gate offset", at)?,
            gx,
            0,
            0,
            0,
        ]);
        self.push(Kernel::OutputGate, &params, &[g, y], [gx, gy, 1])
    }

    /// A layer's router product for one token — `x` RMS-normalised with
    /// `norm` (weights, epsilon), the normalised row left in `normed`, the
    /// logits in `logits` — and its routing with every expert resident
    /// ([`Pass::moe_route`] with `place`, top `k`, renormalised when
    /// `norm_topk`). One dispatch whose last workgroup routes (see
    /// `matmul_route.wgsl`) where the pass lets the last workgroup finish
    /// ([`Pass::set_last_group_finishes`]) and the router is one part;
    /// else the two dispatches. The same bits either way.
    #[allow(clippy::too_many_arguments)]
    pub fn router_route(
        &mut self,
        router: &GpuMatrix,
        x: &wgpu::Buffer,
        norm: (&wgpu::Buffer, f32),
        normed: &wgpu::Buffer,
        logits: &wgpu::Buffer,
        out: RouteOut<'_>,
        (k, norm_topk): (usize, bool),
        place: ExpertPlace,
    ) -> Result<(), GpuError> {
        const K: &str = "router";
        let m = &router.shape;
        let ne = m.rows;
        let shape = Product {
            kind: m.kind,
            one_token: true,
            batch: Batch::Router,
        };
        let part = match router.parts.as_slice() {
            [part] if self.last_group_finishes && self.binds(shape) => part,
            _ => {
                self.matmul_normed(router, x, norm, normed, logits, 1, (0, ne))?;
                return self.moe_route(logits, out, (1, ne, k, norm_topk), Some(place));
            }
        };
        route_checks(K, &out, (1, ne, k), true)?;
        let placed = place_words(K, &out, (ne, k), place)?;
        holds(K, "x", x, m.cols)?;
        holds(K, "logits", logits, ne)?;
        holds(K, "norm weights", norm.0, m.cols)?;
        holds(K, "normed", normed, m.cols)?;
        let (gx, gy) = self.grid(ne.div_ceil(shape.rows_per_group()))?;
        let mut params = product_params(m, (ne, 0, ne), 1, gx, 0, false, norm.1)?;
        // The routing words (see matmul.wgsl's Params) from word 16.
        params.truncate(16 * 4);
        params.extend(words(&[k as u32, norm_topk as u32]));
        params.extend(words(&placed));
        let mut bufs = vec![x, logits, &part.weight];
        if let Some((s, b)) = &part.scales {
            bufs.extend([s, b]);
        }
        bufs.extend([norm.0, normed, out.choice, out.jobs, out.rows, out.weights]);
        bufs.push(&self.gpu.arrival_counts);
        self.push(Kernel::MatMul(shape), &params, &bufs, [gx, gy, 1])
    }

    /// Routing of `n` tokens on the GPU (see `moe_route.wgsl`): from the
    /// router `logits` (`n × n_experts` f32), each token's `k` experts
    /// and weights into `out.choice` (`n · k` pairs of u32: expert id,
    /// weight bits). With `place` (one token only), also the k experts'
    /// product jobs (k gate/up jobs, then k down jobs) into `out.jobs` and
    /// the combine's rows and weights.
    pub fn moe_route(
        &mut self,
        logits: &wgpu::Buffer,
        out: RouteOut<'_>,
        (n, n_experts, k, norm): (usize, usize, usize, bool),
        place: Option<ExpertPlace>,
    ) -> Result<(), GpuError> {
        self.moe_route_split((logits, None), out, (n, n_experts, k, norm), place)
    }

    /// [`Pass::moe_route`] of `n` tokens whose last one's logits are in a
    /// buffer of their own, `guess` (a streamed layer's guess of the next
    /// layer's routing): the product writing them then needs no barrier
    /// after the one writing `logits`, and runs beside it.
    pub fn moe_route_with_guess(
        &mut self,
        (logits, guess): (&wgpu::Buffer, &wgpu::Buffer),
        out: RouteOut<'_>,
        dims: (usize, usize, usize, bool),
    ) -> Result<(), GpuError> {
        self.moe_route_split((logits, Some(guess)), out, dims, None)
    }

    fn moe_route_split(
        &mut self,
        (logits, guess): (&wgpu::Buffer, Option<&wgpu::Buffer>),
        out: RouteOut<'_>,
        (n, n_experts, k, norm): (usize, usize, usize, bool),
        place: Option<ExpertPlace>,
    ) -> Result<(), GpuError> {
        const K: &str = "moe_route";
        route_checks(K, &out, (n, n_experts, k), place.is_some())?;
        let place = place
            .map(|pl| place_words(K, &out, (n_experts, k), pl))
            .transpose()?;
        let groups = u32_of(K, "tokens", n)?;
        // Tokens whose logits are in `logits` (n ≥ 1: `route_checks`);
        // the rest in `guess`.
        let split = groups - u32::from(guess.is_some());
        holds(K, "logits", logits, split as usize * n_experts)?;
        if let Some(g) = guess {
            holds(K, "guess", g, n_experts)?;
        }
        // n_experts, k, norm, first, stride, jobs, split, one unused,
        // gate, up, down (see moe_route.wgsl).
        let mut v = vec![n_experts as u32, k as u32, norm as u32];
        match place {
            Some(w) => {
                v.extend([w[0], w[1], 1, split, 0]);
                v.extend(&w[2..]);
            }
            None => {
                v.extend([0, 0, 0, split, 0]);
                v.extend([0; 12]);
            }
        }
        let second = guess.unwrap_or(logits);
        let bufs = [logits, out.choice, out.jobs, out.rows, out.weights, second];
        self.push(Kernel::MoeRoute, &words(&v), &bufs, [groups, 1, 1])
    }

    /// Dispatches recorded so far.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Encodes every recorded dispatch into one compute pass and submits
    /// it (does not wait: read a result, or [`Gpu::wait`], to wait).
    pub fn submit(mut self) -> Result<(), GpuError> {
        self.encode_and_submit(None)
    }

    /// Submits what is recorded followed, in the same submission, by a
    /// copy of the first `len` f32 values of `src` into the readback buffer
    /// `staging`, waits, returns them, and goes on with an empty pass.
    pub fn flush_and_read(
        &mut self,
        src: &wgpu::Buffer,
        len: usize,
        staging: &wgpu::Buffer,
    ) -> Result<Vec<f32>, GpuError> {
        self.flush_with_copy(src, len, staging)?;
        self.gpu.map_f32(staging, len)
    }

    /// Submits what is recorded, followed by a copy of the first `len` f32
    /// values of `src` into the readback buffer `staging` (read it with
    /// [`Gpu::map_f32`]), and goes on with an empty pass.
    pub fn flush_with_copy(
        &mut self,
        src: &wgpu::Buffer,
        len: usize,
        staging: &wgpu::Buffer,
    ) -> Result<(), GpuError> {
        self.flush_then(Some((src, 4 * len as u64, staging)))
    }

    /// Submits what is recorded (and `copy`) and goes on with an empty pass
    /// and arena.
    fn flush_then(
        &mut self,
        copy: Option<(&wgpu::Buffer, u64, &wgpu::Buffer)>,
    ) -> Result<(), GpuError> {
        self.encode_and_submit(copy)?;
        self.items.clear();
        if let Some(a) = self.arena.as_deref_mut() {
            a.host.clear();
        }
        Ok(())
    }

    fn encode_and_submit(
        &mut self,
        copy: Option<(&wgpu::Buffer, u64, &wgpu::Buffer)>,
    ) -> Result<(), GpuError> {
        let gpu = self.gpu;
        if let Some(a) = self.arena.as_deref() {
            if !a.host.is_empty() {
                // Lands before this submission, after every earlier one.
                gpu.checked("writing parameters", || {
                    gpu.queue.write_buffer(&a.buffer, 0, &a.host)
                })?;
            }
        }
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("pass"),
            });
        let prof = gpu.profiler.as_ref();
        // Timestamps: one before the first dispatch, one after each.
        let stamps = prof.map_or(0, |_| (self.items.len() + 1).min(MAX_STAMPS as usize));
        gpu.checked("encoding a pass", || {
            if !self.items.is_empty() {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("pass"),
                    timestamp_writes: None,
                });
                if let Some(p) = prof {
                    pass.write_timestamp(&p.queries, 0);
                }
                for (i, d) in self.items.iter().enumerate() {
                    pass.set_pipeline(&d.pipeline.pipeline);
                    pass.set_bind_group(0, &d.bind, &[d.offset]);
                    pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
                    if let Some(p) = prof.filter(|_| i + 1 < stamps) {
                        pass.write_timestamp(&p.queries, i as u32 + 1);
                    }
                }
            }
            if let (Some(p), true) = (prof, stamps > 1 && !self.items.is_empty()) {
                enc.resolve_query_set(&p.queries, 0..stamps as u32, &p.resolve, 0);
                enc.copy_buffer_to_buffer(&p.resolve, 0, &p.readback, 0, 8 * stamps as u64);
            }
            if let Some((src, bytes, dst)) = copy {
                enc.copy_buffer_to_buffer(src, 0, dst, 0, bytes);
            }
        })?;
        let commands = gpu.checked("finishing a pass", || enc.finish())?;
        gpu.submit(
            "submitting a pass",
            vec![commands],
            std::mem::take(&mut self.after),
        )?;
        if let (Some(p), true) = (prof, stamps > 1 && !self.items.is_empty()) {
            let words = gpu.map_f32(&p.readback, 2 * stamps)?;
            let ticks: Vec<u64> = words
                .chunks_exact(2)
                .map(|w| w[0].to_bits() as u64 | (w[1].to_bits() as u64) << 32)
                .collect();
            let names: Vec<String> = self.items.iter().map(|d| d.kernel.name()).collect();
            p.add(&names, &ticks);
        }
        Ok(())
    }
}

/// The `(cos, sin)` of every rotary angle of tokens at positions
/// `pos0..pos0 + n`: `n × inv_freq.len()` pairs, computed exactly as the
/// CPU reference (`ops::rope_neox`) does, in f32.
pub fn rope_table(pos0: usize, n: usize, inv_freq: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(2 * n * inv_freq.len());
    for t in 0..n {
        for &f in inv_freq {
            let (sin, cos) = ((pos0 + t) as f32 * f).sin_cos();
            out.extend([cos, sin]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gpu::Kernel;

    /// Kernel parameters leave room for a loop's last step: sizes up to
    /// `MAX_PARAM` pass, larger ones are a typed error, and no loop steps
    /// by more than the headroom (the largest step is twice a workgroup).
    #[test]
    fn kernel_parameters_keep_loop_headroom() {
        let max = MAX_PARAM as usize;
        assert_eq!(u32_of("t", "x", max).unwrap(), MAX_PARAM);
        for v in [max + 1, u32::MAX as usize, usize::MAX] {
            assert!(matches!(u32_of("t", "x", v), Err(GpuError::Shape { .. })));
        }
        for k in Kernel::all() {
            assert!(
                2 * k.workgroup_size() <= u32::MAX - MAX_PARAM,
                "{}",
                k.name()
            );
        }
    }
}

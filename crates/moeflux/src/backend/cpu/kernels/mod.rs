//! Quantized matrix products with runtime CPU-feature dispatch.
//!
//! [`Level`] picks the instruction set: AVX-512 (with VNNI), AVX2 + FMA,
//! NEON (AArch64), the portable integer kernels, or the reference path
//! (dequantize each row, f32 dot). It is detected once;
//! `MOEFLUX_CPU=reference|scalar|neon|avx2|avx512` forces a level (tests
//! run every level this way).
//!
//! Which activation format a weight type is multiplied with:
//! - Q4_0, Q8_0, MXFP4, Q4_K, Q5_K, Q6_K and MLX affine (bf16 scales):
//!   activations quantized to 8 bits in blocks of 32 ([`Q8Acts`]);
//! - F32, F16, BF16: f32 activations;
//! - other types: the reference path.

#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use std::sync::OnceLock;

use super::interleave::{self, MAX_ROW_BYTES, ROWS};
use super::matrix::{dot as f32_dot, Matrix, MatrixData};
use super::pool::ThreadPool;
use super::quantize::{Q8Acts, Q8Row};
use crate::quant::mlx::ScaleType;
use crate::quant::{GgmlType, TensorType};

/// An instruction-set level for the kernels. The order means something
/// only within one architecture (`>= Avx2`: an x86 SIMD level); NEON sits
/// between the portable kernels and AVX2 but is no x86 level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Dequantize rows to f32, f32 dot: the reference every level is checked against.
    Reference,
    /// Portable integer kernels.
    Scalar,
    /// AArch64 NEON (the row kernels with 8-bit activations; float
    /// weights and attention use the portable code).
    Neon,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL with VNNI.
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Reference => "reference",
            Level::Scalar => "scalar",
            Level::Neon => "neon",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    pub fn from_name(s: &str) -> Option<Level> {
        Some(match s {
            "reference" => Level::Reference,
            "scalar" => Level::Scalar,
            "neon" => Level::Neon,
            "avx2" => Level::Avx2,
            "avx512" => Level::Avx512,
            _ => return None,
        })
    }

    /// The best level this CPU supports.
    pub fn detect() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Level::Avx512;
            }
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Level::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            return Level::Neon;
        }
        Level::Scalar
    }

    /// Whether this CPU can run the level: the reference and the portable
    /// kernels anywhere, NEON on AArch64, the x86 levels up to the one
    /// detected.
    pub fn supported(self) -> bool {
        // Detected once: the kernels ask on every SIMD choice.
        static BEST: OnceLock<Level> = OnceLock::new();
        let best = *BEST.get_or_init(Level::detect);
        match self {
            Level::Reference | Level::Scalar => true,
            Level::Neon => best == Level::Neon,
            Level::Avx2 | Level::Avx512 => best >= Level::Avx2 && self <= best,
        }
    }
}

/// Whether `level` is an x86 SIMD level this CPU runs: the test every
/// choice of SIMD code makes. The public functions take their level from
/// the caller; checking it here keeps a level the CPU lacks (a caller's
/// mistake) from reaching `#[target_feature]` code, which would be
/// undefined behaviour: it gets the portable code instead. (The check is a
/// few cached feature bits, made once per kernel choice or tile.)
#[cfg(target_arch = "x86_64")]
#[inline]
fn x86_simd(level: Level) -> bool {
    level >= Level::Avx2 && level.supported()
}

/// The level in use: `MOEFLUX_CPU` if set (and supported), else detected.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = Level::detect();
        match std::env::var("MOEFLUX_CPU")
            .ok()
            .as_deref()
            .and_then(Level::from_name)
        {
            Some(l) if l.supported() => l,
            _ => detected,
        }
    })
}

/// The activation format a weight type is computed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActKind {
    Q8,
    F32,
    /// No integer kernel: the reference path.
    Reference,
}

pub fn act_kind(m: &Matrix<'_>, level: Level) -> ActKind {
    act_kind_of(
        match m.data {
            MatrixData::Ggml { ty, .. } | MatrixData::Interleaved { ty, .. } => {
                TensorType::Ggml(ty)
            }
            MatrixData::Mlx { q, .. } => TensorType::Mlx(q),
        },
        level,
    )
}

/// [`act_kind`] from the weight's type alone.
pub fn act_kind_of(ty: TensorType, level: Level) -> ActKind {
    if level == Level::Reference {
        return ActKind::Reference;
    }
    match ty {
        TensorType::Ggml(ty) => match ty {
            GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::MXFP4 => ActKind::Q8,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => ActKind::Q8,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => ActKind::F32,
            _ => ActKind::Reference,
        },
        TensorType::Mlx(q) if q.scale_type == ScaleType::BF16 => ActKind::Q8,
        _ => ActKind::Reference,
    }
}

/// Scratch space for quantized activations, reused between products (it
/// grows to the largest input and then no longer allocates).
#[derive(Debug, Default)]
pub struct Acts {
    pub q8: Q8Acts,
}

/// The input of one or more products: `n` rows of `cols` activations from
/// row `row0` of `x` (and of `q8`, when quantized).
#[derive(Clone, Copy)]
pub struct Input<'a> {
    pub x: &'a [f32],
    pub cols: usize,
    pub q8: Option<&'a Q8Acts>,
    pub row0: usize,
    pub n: usize,
}

impl<'a> Input<'a> {
    /// Rows `row0..row0 + n` of the same activations.
    pub fn rows(&self, row0: usize, n: usize) -> Input<'a> {
        Input {
            row0: self.row0 + row0,
            n,
            ..*self
        }
    }
}

/// Whether a weight is a k-quant (its kernels need power-of-two
/// activation block scales).
fn is_k_quant(w: &Matrix<'_>) -> bool {
    matches!(
        w.data,
        MatrixData::Ggml {
            ty: GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K,
            ..
        } | MatrixData::Interleaved {
            ty: GgmlType::Q4_K,
            ..
        }
    )
}

/// How inputs must be prepared for products with weights of `types`:
/// whether they need 8-bit activations, and whether with power-of-two block
/// scales (k-quants).
pub fn input_needs(types: &[TensorType], level: Level) -> (bool, bool) {
    let q8 = types.iter().any(|&t| act_kind_of(t, level) == ActKind::Q8);
    let k = types.iter().any(|t| {
        matches!(
            t,
            TensorType::Ggml(GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K)
        )
    });
    (q8, q8 && k)
}

/// The input for products over rows of `x` that were quantized (if `q8`)
/// into `acts` beforehand with [`Q8Acts::reserve_rows`] and
/// [`Q8Acts::quantize_rows`].
pub fn input_from<'a>(x: &'a [f32], cols: usize, acts: Option<&'a Acts>) -> Input<'a> {
    Input {
        x,
        cols,
        q8: acts.map(|a| &a.q8),
        row0: 0,
        n: x.len() / cols.max(1),
    }
}

/// Quantizes `x` (`n × cols`) into `acts` if any of `weights` needs 8-bit
/// activations, and returns the input for products with them.
pub fn prepare<'a>(
    x: &'a [f32],
    cols: usize,
    weights: &[&Matrix<'_>],
    acts: &'a mut Acts,
    level: Level,
) -> Input<'a> {
    let n = x.len() / cols.max(1);
    let needs_q8 = weights.iter().any(|w| act_kind(w, level) == ActKind::Q8);
    if needs_q8 {
        if weights.iter().any(|w| is_k_quant(w)) {
            acts.q8.quantize_pow2(x, cols);
        } else {
            acts.q8.quantize(x, cols);
        }
    }
    Input {
        x,
        cols,
        q8: needs_q8.then_some(&acts.q8),
        row0: 0,
        n,
    }
}

/// A raw pointer to an output, shared by tasks that write disjoint rows.
#[derive(Clone, Copy, Debug)]
pub struct OutPtr(*mut f32, usize);

// SAFETY: tasks write disjoint elements (distinct weight rows of every
// input row), and `run_jobs` returns only after all tasks have finished.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// An output of `len` values. The slice must outlive the product.
    pub fn new(y: &mut [f32]) -> OutPtr {
        OutPtr(y.as_mut_ptr(), y.len())
    }
}

/// One product: `Y = X Wᵀ`, written to `y` as `input.n × w.rows`.
pub struct MatJob<'a> {
    pub w: Matrix<'a>,
    pub input: Input<'a>,
    pub y: OutPtr,
}

/// A row kernel with 8-bit activations: `(weight row, activations) → dot`.
pub type Q8Kernel = unsafe fn(&[u8], Q8Row<'_>) -> f32;
/// A row kernel for four activation rows at once.
pub type Q8Kernel4 = unsafe fn(&[u8], &[Q8Row<'_>; 4]) -> [f32; 4];
/// A kernel over one group of eight interleaved rows
/// ([`super::interleave`]) and one activation row: the eight dots.
pub type Q8KernelX8 = unsafe fn(&[u8], Q8Row<'_>) -> [f32; 8];
/// An MLX affine row kernel: `(bits, group, weights, scales, biases, activations)`.
pub type MlxKernel = unsafe fn(u32, usize, &[u8], &[u8], &[u8], Q8Row<'_>) -> f32;
/// A float-weight row kernel with f32 activations.
pub type FKernel = unsafe fn(GgmlType, &[u8], &[f32]) -> f32;

/// A kernel resolved for one weight matrix at one level: chosen once per
/// task, then called per row.
#[derive(Clone, Copy)]
enum RowKernel {
    Q8(Q8Kernel),
    Mlx(MlxKernel),
    F(FKernel),
    Reference,
}

fn resolve(w: &Matrix<'_>, input: &Input<'_>, level: Level) -> RowKernel {
    let kind = act_kind(w, level);
    if kind == ActKind::Reference || (kind == ActKind::Q8 && input.q8.is_none()) {
        return RowKernel::Reference;
    }
    match (kind, w.data) {
        (ActKind::Q8, MatrixData::Ggml { ty, .. } | MatrixData::Interleaved { ty, .. }) => {
            RowKernel::Q8(q8_kernel(ty, level))
        }
        (ActKind::Q8, MatrixData::Mlx { .. }) => RowKernel::Mlx(mlx_kernel(level)),
        _ => RowKernel::F(f_kernel(level)),
    }
}

fn q8_kernel(ty: GgmlType, level: Level) -> Q8Kernel {
    #[cfg(target_arch = "x86_64")]
    if x86_simd(level) {
        return x86::q8_kernel(ty, level);
    }
    #[cfg(target_arch = "aarch64")]
    if level == Level::Neon {
        return neon::q8_kernel(ty);
    }
    let _ = level;
    match ty {
        GgmlType::Q4_0 => scalar::dot_q4_0,
        GgmlType::Q8_0 => scalar::dot_q8_0,
        GgmlType::MXFP4 => scalar::dot_mxfp4,
        GgmlType::Q4_K => scalar::dot_q4_k,
        GgmlType::Q5_K => scalar::dot_q5_k,
        GgmlType::Q6_K => scalar::dot_q6_k,
        _ => unreachable!("not an 8-bit-activation type"),
    }
}

/// The kernel over eight interleaved rows of a type at a level, if it has
/// one.
fn q8_kernel_x8(ty: GgmlType, level: Level) -> Option<Q8KernelX8> {
    #[cfg(target_arch = "x86_64")]
    if x86_simd(level) {
        return x86::q8_kernel_x8(ty, level);
    }
    let _ = (ty, level);
    None
}

/// Whether weights of `ty` in a `rows × cols` matrix are worth
/// interleaving at `level` (a kernel reads that layout there); the loader
/// interleaves the resident copies of those.
pub fn wants_interleaved(ty: GgmlType, rows: usize, cols: usize, level: Level) -> bool {
    super::interleave::supports(ty, rows, cols) && q8_kernel_x8(ty, level).is_some()
}

/// The four-row kernel of a type at a level, if it has one.
fn q8_kernel4(ty: GgmlType, level: Level) -> Option<Q8Kernel4> {
    #[cfg(target_arch = "x86_64")]
    if x86_simd(level) {
        return x86::q8_kernel4(ty, level);
    }
    let _ = (ty, level);
    None
}

fn mlx_kernel(level: Level) -> MlxKernel {
    #[cfg(target_arch = "x86_64")]
    if x86_simd(level) {
        return x86::mlx_kernel(level);
    }
    #[cfg(target_arch = "aarch64")]
    if level == Level::Neon {
        return neon::dot_mlx;
    }
    let _ = level;
    scalar::dot_mlx
}

fn scalar_f(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    match ty {
        GgmlType::F32 => scalar::dot_f32(w, x),
        GgmlType::F16 => scalar::dot_f16(w, x),
        GgmlType::BF16 => scalar::dot_bf16(w, x),
        _ => unreachable!("not a float type"),
    }
}

fn f_kernel(level: Level) -> FKernel {
    #[cfg(target_arch = "x86_64")]
    if x86_simd(level) {
        return x86::f_kernel(level);
    }
    let _ = level;
    scalar_f
}

/// `Σ a_i b_i` in the fixed summation order of attention's scores at
/// `level` (what [`scores`] computes per row): the float kernel of the
/// level, but at both x86 levels the AVX2 one, which the AVX-512 level's
/// scores use too (its own float kernel sums rows of 64 and more in
/// another order).
pub fn dot(level: Level, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    if level == Level::Reference {
        return f32_dot(a, b);
    }
    #[cfg(target_arch = "x86_64")]
    if x86_simd(level) {
        // SAFETY: the level is supported (`x86_simd`), so AVX2 and FMA are.
        return unsafe { x86::dot_f32(a, b) };
    }
    // SAFETY: the kernel was resolved for this level, SIMD code only for
    // a level the CPU has (`x86_simd`); `a` is `b.len()` f32s.
    unsafe { f_kernel(level)(GgmlType::F32, bytemuck::cast_slice(a), b) }
}

/// f16 → f32 (exact), with F16C where the CPU has it: the KV cache's rows.
/// (`half`'s slice conversion calls a function per eight values.)
pub fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: both features were just detected.
        unsafe { x86::f16_to_f32_f16c(src.reinterpret_cast(), dst) };
        return;
    }
    src.convert_to_f32_slice(dst);
}

/// Where a tile's rows are in a KV cache's values: row r (of `rows`)
/// starts at `at + r · stride` and has `width` values.
#[derive(Clone, Copy, Debug)]
pub struct Strided {
    pub at: usize,
    pub stride: usize,
    pub width: usize,
    pub rows: usize,
}

impl Strided {
    /// Asserts the rows lie inside a cache of `src` values and fit a tile
    /// of `dst` values (`rows · width`): what the SIMD loaders rely on.
    fn check(self, src: usize, dst: usize) {
        assert!(
            self.span().is_some_and(|n| n <= src)
                && self.rows.checked_mul(self.width).is_some_and(|n| n <= dst),
            "{self:?} outside the cache ({src}) or the tile ({dst})"
        );
    }

    /// The values the rows span (`src` must hold at least this many), or
    /// `None` if that overflows.
    fn span(self) -> Option<usize> {
        match self.rows {
            0 => Some(0),
            r => (r - 1)
                .checked_mul(self.stride)?
                .checked_add(self.at)?
                .checked_add(self.width),
        }
    }
}

/// Strided f16 rows `s` of `src` as f32 into `dst` (row r at `r · width`),
/// exact, then a prefetch of the `ahead` rows after them, so a tile's
/// cache rows arrive while the previous tile is used. Decode attention
/// reads ~1 MB of cache rows a layer (Qwen3-30B-A3B at a 640-position
/// context), 256 bytes of every 1 KiB; converting them row by row spent
/// 9 % of a decode step, mostly waiting on memory. Measured (`cargo bench
/// -p moeflux-bench --bench kernels -- attention`, 2 threads): one call a
/// tile with the next tile prefetched after it, 21–22 → 15–17 ms for 48
/// layers; prefetching before converting (24 ms) or two tiles ahead
/// (21–22 ms) was slower: the prefetches then compete with the tile's own
/// loads.
pub fn f16_rows_to_f32(level: Level, src: &[half::f16], s: Strided, ahead: usize, dst: &mut [f32]) {
    s.check(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if x86_simd(level) {
        use half::slice::HalfFloatSliceExt;
        // SAFETY: the level is supported (`x86_simd`); the rows lie inside both slices (asserted above).
        unsafe { x86::f16_rows_f16c(src.reinterpret_cast(), s, ahead, dst) };
        return;
    }
    let _ = (level, ahead);
    for r in 0..s.rows {
        let from = s.at + r * s.stride;
        f16_to_f32(
            &src[from..from + s.width],
            &mut dst[r * s.width..(r + 1) * s.width],
        );
    }
}

/// Strided rows `s` of a Q8_0 cache as f32 into `dst` (row r at
/// `r · width`): each value is its code times its block's f16 scale, as
/// [`Rows::read`](crate::state::kv::Rows::read) computes it, so the result
/// is exact against that reference. At the x86 SIMD levels whole blocks
/// go eight codes at a time and the `ahead` rows after the tile are
/// prefetched (as [`f16_rows_to_f32`] does, for the same reason).
pub fn q8_0_rows_to_f32(
    level: Level,
    src: &crate::state::kv::Q8Rows,
    s: Strided,
    ahead: usize,
    dst: &mut [f32],
) {
    s.check(src.q.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if x86_simd(level) {
        // SAFETY: the level is supported (`x86_simd`); the rows lie inside both slices (asserted above).
        unsafe { x86::q8_0_rows_avx2(src, s, ahead, dst) };
        return;
    }
    let _ = (level, ahead);
    q8_0_rows(src, s, dst);
}

/// The body of [`q8_0_rows_to_f32`]: a row's values are walked one run of
/// a single block at a time (a run ends where the block or the tile's
/// row does), one scale per run.
#[inline(always)]
pub(crate) fn q8_0_rows(src: &crate::state::kv::Q8Rows, s: Strided, dst: &mut [f32]) {
    use crate::state::kv::Q8_BLOCK;
    let (dim, bpr) = (src.dim, src.blocks_per_row());
    for r in 0..s.rows {
        let start = s.at + r * s.stride;
        let out = &mut dst[r * s.width..(r + 1) * s.width];
        let mut i = start;
        while i < start + s.width {
            let (row, c) = (i / dim, i % dim);
            let end = (row * dim + (c / Q8_BLOCK + 1) * Q8_BLOCK)
                .min(row * dim + dim)
                .min(start + s.width);
            let d = src.d[row * bpr + c / Q8_BLOCK].to_f32();
            for (o, &q) in out[i - start..end - start].iter_mut().zip(&src.q[i..end]) {
                *o = q as f32 * d;
            }
            i = end;
        }
    }
}

/// `y += s · x` at `level`: attention's weighted sum of values.
pub fn axpy(level: Level, s: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if x86_simd(level) {
        // SAFETY: as above.
        unsafe { x86::axpy_avx2(s, x, y) };
        return;
    }
    let _ = level;
    for (a, &b) in y.iter_mut().zip(x) {
        *a += s * b;
    }
}

/// Scores of query `q` against consecutive rows of `tile` (`out.len()`
/// rows of `q.len()` values): `out[j] = dot(q, row j) · scale`, each exactly
/// as [`dot`] computes it.
pub fn scores(level: Level, q: &[f32], tile: &[f32], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    assert!(tile.len() >= out.len() * hd);
    #[cfg(target_arch = "x86_64")]
    if x86_simd(level) {
        // SAFETY: the level is supported (`x86_simd`).
        unsafe { x86::scores_avx2(q, tile, scale, out) };
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot(level, q, &tile[j * hd..(j + 1) * hd]) * scale;
    }
}

/// `o += Σ_j s_j · row j` over consecutive rows of `tile` (`s.len()` rows of
/// `o.len()` values), identical to one [`axpy`] per row in row order.
pub fn weighted_rows(level: Level, s: &[f32], tile: &[f32], o: &mut [f32]) {
    let hd = o.len();
    assert!(tile.len() >= s.len() * hd);
    #[cfg(target_arch = "x86_64")]
    if x86_simd(level) {
        // SAFETY: as above.
        unsafe { x86::weighted_rows_avx2(s, tile, o) };
        return;
    }
    for (j, &sj) in s.iter().enumerate() {
        axpy(level, sj, &tile[j * hd..(j + 1) * hd], o);
    }
}

/// Rows per task: about 16 KiB of weights (a few microseconds of work per
/// token), so that the threads finish a job together — a decode step runs
/// hundreds of jobs, and the wait for the slowest thread at the end of each
/// one adds up. With several tokens the rows stay the same (they stay in
/// L1 while the tokens pass) and a task does proportionally more work.
///
/// Interleaved matrices are split at whole groups of eight rows.
fn rows_per_task(w: &Matrix<'_>) -> usize {
    let row_bytes = match w.data {
        MatrixData::Ggml { bytes, .. } | MatrixData::Interleaved { bytes, .. } => {
            bytes.len() / w.rows.max(1)
        }
        MatrixData::Mlx { weight, .. } => weight.len() / w.rows.max(1),
    };
    let rows = (16_384 / row_bytes.max(1)).clamp(1, w.rows.max(1));
    match w.data {
        MatrixData::Interleaved { .. } => rows.next_multiple_of(ROWS),
        _ => rows,
    }
}

/// `y_i = W_i x` for `N` weights applied to the same input `x` (`n × cols`
/// row-major; each `y_i` is `n × rows_i`), as one parallel job: the input is
/// quantized once for all of them. Allocates nothing.
pub fn project<const N: usize>(
    pool: &ThreadPool,
    level: Level,
    acts: &mut Acts,
    x: &[f32],
    cols: usize,
    mut outs: [(Matrix<'_>, &mut [f32]); N],
) {
    let weights: [&Matrix<'_>; N] = std::array::from_fn(|i| &outs[i].0);
    let input = prepare(x, cols, &weights, acts, level);
    let jobs: [MatJob<'_>; N] = std::array::from_fn(|i| MatJob {
        w: outs[i].0,
        input,
        y: OutPtr::new(outs[i].1),
    });
    run_jobs(pool, &jobs, level);
}

/// Runs several products as one parallel job (for example the gate and up
/// projections of every selected expert), so the threads are handed work
/// once.
pub fn run_jobs(pool: &ThreadPool, jobs: &[MatJob<'_>], level: Level) {
    // Where each job's tasks start, on the stack: a layer has at most a few
    // hundred products (every expert's gate and up projections).
    const MAX_JOBS: usize = 512;
    if jobs.len() > MAX_JOBS {
        for chunk in jobs.chunks(MAX_JOBS) {
            run_jobs(pool, chunk, level);
        }
        return;
    }
    let mut start = [0usize; MAX_JOBS + 1];
    let mut chunks = [0usize; MAX_JOBS];
    for (i, j) in jobs.iter().enumerate() {
        assert!(j.y.1 >= j.input.n * j.w.rows, "output too small");
        assert!(
            j.input.x.len() >= (j.input.row0 + j.input.n) * j.w.cols,
            "input too small"
        );
        chunks[i] = rows_per_task(&j.w);
        start[i + 1] = start[i] + j.w.rows.div_ceil(chunks[i]);
    }
    let total = start[jobs.len()];
    let (start, chunks) = (&start, &chunks);
    pool.run(total, &|task, _thread| {
        // The job holding this task: the last whose start is ≤ task.
        let ji = start[1..=jobs.len()].partition_point(|&s| s <= task);
        let job = &jobs[ji];
        let task = task - start[ji];
        let c = chunks[ji];
        let (w, input) = (&job.w, &job.input);
        let (r0, r1) = (task * c, (task * c + c).min(w.rows));
        let out = job.y;
        let (rows, cols) = (w.rows, w.cols);
        let put = |t: usize, r: usize, v: f32| {
            // SAFETY: element (t, r) is written by this task only and lies
            // inside the output (checked above).
            unsafe { *out.0.add(t * rows + r) = v };
        };
        let x_row = |t: usize| &input.x[(input.row0 + t) * cols..(input.row0 + t + 1) * cols];
        // Token blocks (float kernels) keep a block's activations in cache
        // while the rows stream past.
        const TOKENS: usize = 16;
        match (resolve(w, input, level), w.data) {
            (RowKernel::Q8(f), MatrixData::Ggml { ty, bytes }) => {
                let Some(q8) = input.q8 else {
                    unreachable!("resolved for quantized input")
                };
                let rb = bytes.len() / rows;
                let q8rows = Q8Rows {
                    f,
                    f4: q8_kernel4(ty, level),
                    q8,
                    row0: input.row0,
                    n: input.n,
                };
                q8rows.run(&bytes[r0 * rb..r1 * rb], rb, r0, &put);
            }
            (RowKernel::Q8(f), MatrixData::Interleaved { ty, bytes }) => {
                let Some(q8) = input.q8 else {
                    unreachable!("resolved for quantized input")
                };
                let rb = bytes.len() / rows;
                let groups = bytes[r0 * rb..r1 * rb].chunks_exact(ROWS * rb);
                match q8_kernel_x8(ty, level) {
                    // Eight rows at a time, one lane per row, token by
                    // token while the group (9 KiB for a 2048-wide Q4_0
                    // or Q4_K row) stays in L1. For prompts too: measured
                    // faster than the plain rows' four-token kernels
                    // (512-token prompt, Qwen3-30B-A3B shape, 2 threads:
                    // Q4_K 18.3 vs 15.3 tok/s, Q4_0 17.4 vs 14.6).
                    Some(f8) => {
                        for t in 0..input.n {
                            let a = q8.row(input.row0 + t);
                            for (g, group) in groups.clone().enumerate() {
                                // SAFETY: the kernel was resolved for this CPU's level.
                                let v = unsafe { f8(group, a) };
                                for (j, v) in v.into_iter().enumerate() {
                                    put(t, r0 + ROWS * g + j, v);
                                }
                            }
                        }
                    }
                    // No eight-row kernel at this level (the loader does not
                    // interleave then; kernel tests do): each group back
                    // to plain rows, then the row kernels.
                    None => {
                        let q8rows = Q8Rows {
                            f,
                            f4: q8_kernel4(ty, level),
                            q8,
                            row0: input.row0,
                            n: input.n,
                        };
                        let mut plain = [0u8; ROWS * MAX_ROW_BYTES];
                        let plain = &mut plain[..ROWS * rb];
                        for (g, group) in groups.enumerate() {
                            interleave::group_to_rows(ty, group, plain);
                            q8rows.run(plain, rb, r0 + ROWS * g, &put);
                        }
                    }
                }
            }
            (
                RowKernel::Mlx(f),
                MatrixData::Mlx {
                    q,
                    weight,
                    scales,
                    biases,
                },
            ) => {
                let Some(q8) = input.q8 else {
                    unreachable!("resolved for quantized input")
                };
                let (wb, sb) = (weight.len() / rows, scales.len() / rows);
                for r in r0..r1 {
                    for t in 0..input.n {
                        // SAFETY: as above.
                        let v = unsafe {
                            f(
                                q.bits as u32,
                                q.group_size as usize,
                                &weight[r * wb..(r + 1) * wb],
                                &scales[r * sb..(r + 1) * sb],
                                &biases[r * sb..(r + 1) * sb],
                                q8.row(input.row0 + t),
                            )
                        };
                        put(t, r, v);
                    }
                }
            }
            (RowKernel::F(f), MatrixData::Ggml { ty, bytes }) => {
                let rb = bytes.len() / rows;
                for t0 in (0..input.n).step_by(TOKENS) {
                    for r in r0..r1 {
                        for t in t0..(t0 + TOKENS).min(input.n) {
                            // SAFETY: as above.
                            let v = unsafe { f(ty, &bytes[r * rb..(r + 1) * rb], x_row(t)) };
                            put(t, r, v);
                        }
                    }
                }
            }
            _ => {
                let mut row = vec![0f32; cols];
                for r in r0..r1 {
                    w.row(r, &mut row);
                    for t in 0..input.n {
                        put(t, r, f32_dot(&row, x_row(t)));
                    }
                }
            }
        }
    });
}

/// Row kernels with 8-bit activations over plain rows, for `n` activation
/// rows from `row0`.
struct Q8Rows<'a> {
    f: Q8Kernel,
    f4: Option<Q8Kernel4>,
    q8: &'a Q8Acts,
    row0: usize,
    n: usize,
}

impl Q8Rows<'_> {
    /// `put(t, r, dot)` for every token `t` and row `first + i` of `rows`
    /// (`rb` bytes each).
    fn run(&self, rows: &[u8], rb: usize, first: usize, put: &impl Fn(usize, usize, f32)) {
        let q8 = self.q8;
        // Groups of four tokens through the four-row kernel: the rows
        // (about 16 KiB) stay in L1 while the groups' activations stream
        // past, and each weight block is unpacked once per group.
        let mut t = 0;
        if let Some(f4) = self.f4 {
            while t + 4 <= self.n {
                let a = std::array::from_fn(|i| q8.row(self.row0 + t + i));
                for (i, row) in rows.chunks_exact(rb).enumerate() {
                    // SAFETY: the kernel was resolved for this CPU's level.
                    let v = unsafe { f4(row, &a) };
                    for (k, v) in v.into_iter().enumerate() {
                        put(t + k, first + i, v);
                    }
                }
                t += 4;
            }
        }
        for t in t..self.n {
            let a = q8.row(self.row0 + t);
            for (i, row) in rows.chunks_exact(rb).enumerate() {
                // SAFETY: the kernel was resolved for this CPU's level.
                put(t, first + i, unsafe { (self.f)(row, a) });
            }
        }
    }
}

/// `Y = X Wᵀ` for `n` activation rows `x` (`n × cols`) into `y`
/// (`n × rows`), on `pool`, at the detected (or forced) level.
pub fn matmul(
    pool: &ThreadPool,
    w: &Matrix<'_>,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    acts: &mut Acts,
) {
    matmul_at(pool, w, x, n, y, acts, level())
}

/// [`matmul`] at a given level (which must be supported).
pub fn matmul_at(
    pool: &ThreadPool,
    w: &Matrix<'_>,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    acts: &mut Acts,
    level: Level,
) {
    assert_eq!(x.len(), n * w.cols);
    assert_eq!(y.len(), n * w.rows);
    let input = prepare(x, w.cols, &[w], acts, level);
    let job = MatJob {
        w: *w,
        input,
        y: OutPtr::new(y),
    };
    run_jobs(pool, &[job], level);
}

#[cfg(test)]
mod tests;

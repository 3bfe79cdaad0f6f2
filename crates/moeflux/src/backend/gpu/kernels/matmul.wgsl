// Y = X Wᵀ for one part (a range of rows) of a quantized weight matrix.
//
// X is n × cols f32 (row-major, read as vec4s: cols is a multiple of 32),
// Y is n × y_stride f32, and this part's row r is column row0 + r of Y
// (an expert batch's jobs each name their own first rows of X and Y).
//
// A row is cut into units of 32 columns (a quant block or sub-block) and
// each unit into four parts of eight columns; thread i of a workgroup
// takes parts i, i + WG, ..., so neighbouring threads read neighbouring
// weights and neighbouring activations (coalesced loads: reading x with a
// stride of a whole unit per thread made every load touch as many cache
// lines as there are threads). The format file appended to this one
// decodes one part of one row into eight f32 weights (`part`) and says
// which eight columns they are (`part_cols`).
//
// Two shapes, by TOK (a constant of the module):
// - TOK = 1 (decode): a workgroup computes four rows for one token
//   (workgroup z), the activations loaded once for the four rows;
// - TOK = 4 (prompts): a workgroup computes two rows for four tokens
//   (workgroup z picks tokens 4z..4z+4), each weight decoded once for the
//   four, each activation loaded once for the two rows.
// A row's (or two rows') four sums are one vec4, reduced across the
// workgroup at the end. Row groups are numbered wg.x + wg.y * wg_x, because one
// dispatch dimension holds at most 65535 workgroups and an LM head has
// more rows.
//
// Expert batches (BATCH, a constant of the module): one dispatch computes
// the same product for several experts, each a job of the job table
// (`job_word`, generated with the module): workgroup y is job p.job0 + y,
// row groups are workgroup x. A job is JOB_WORDS words: the byte offset
// in w of its matrix A, the word offsets of A's MLX scales and biases, the
// same three for a matrix B, the job's first row of Y, its token count,
// and its first row of X (the rest unused). With GLU, A and B are an expert's gate and up projections,
// both are computed from the same activations, and Y gets
// silu(X Aᵀ) · (X Bᵀ) (SwiGLU, as the CPU computes it).
// COMBINE (one token): the job loop runs inside each workgroup, and the
// weighted sum of the jobs' rows is added to Y (see below).
//
// NORM (a constant of the module): X's rows are RMS-normalised — each
// row of Y is s · Σ w · (x · norm_w) with s = 1 / sqrt(mean(x²) + eps),
// the token's inverse RMS, applied once after the sum. Each workgroup
// finds its tokens' mean squares itself, from the activations its product
// loads anyway: the squares are summed beside the products and reduced
// with them, so the norm adds no wait on memory (and, for one token, no
// barrier; four tokens' squares take one more reduction). Summing
// them first, in a pass of their own, cost 2.2 µs a layer for q|k|v and
// 1.3 for the router on an H100; decode went 3–6 % faster without it,
// Q4_K prompts 3–7 % slower. A pass of squares for four tokens, in this
// order or the old one with the one-token loop matching it, gave prompts
// no better and decode less. The workgroups of the first rows store
// the normalised rows, x · s · norm_w, in `normed` for the products after
// this one. Products and squares are summed the same way for one token
// and four, so a token's normalised row and its products have the same
// bits in either shape (where the driver gives both pipelines one
// subgroup size, as NVIDIA and lavapipe do). NORM never goes with GLU:
// the squares are reduced only beside a product's own sums.
//
// ROUTE (a constant of the module; one token, NORM, the router of a layer
// whose experts are all resident): the last workgroup to finish routes
// the token (`route_after`, matmul_route.wgsl), so no routing dispatch
// follows. Y is then stored through atomics. Y is declared with the
// module's constants, with `put_y` and `y_at`.

struct Params {
    rows: u32,       // rows in this part
    cols: u32,
    n: u32,          // tokens
    row0: u32,       // first row of this part in the whole matrix
    y_stride: u32,   // rows of the whole matrix (Y's row length)
    row_bytes: u32,  // GGML formats: bytes of one row
    units: u32,      // units per row: cols / 32
    wg_x: u32,       // workgroups along x in this dispatch
    group: u32,      // MLX: columns per scale/bias group
    scale_f16: u32,  // MLX: 1 when scales/biases are f16, 0 for bf16
    eps: f32,        // NORM: the RMSNorm epsilon
    job0: u32,       // BATCH: first job of this dispatch
    acc: u32,        // 1: Y += X Wᵀ (a residual add), else Y = X Wᵀ
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
    // ROUTE (see route.wgsl): top k, whether the weights are renormalised,
    // the layer's first expert slot, the slot stride in bytes, and the
    // byte offsets of gate's, up's and down's arrays in a slot.
    k: u32,
    norm: u32,
    first: u32,
    stride: u32,
    gate: vec4<u32>,
    up: vec4<u32>,
    down: vec4<u32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
// The part's weight bytes, little-endian, packed into words; blocks need
// not start on a word boundary (Q4_0 blocks are 18 bytes, Q6_K 210).
@group(0) @binding(3) var<storage, read> w: array<u32>;

const UNIT: u32 = 32u;
// The squares of NORM are reduced only beside a product's own sums.
const_assert !(NORM && GLU);

// One-token products hold 4 KiB of shared memory that they never use
// (besides the reductions' slots: 1 KiB with subgroups, 4 with a tree):
// measured on an H100 (NVIDIA's Vulkan driver), a decode step's products
// ran faster with it (Q4_K decode 162 → 182 tok/s, Q4_0 188 → 193; the
// down + combine product 1.59 → 1.05 ms a token). The effect is a step:
// 2 KiB was as slow as none (156 tok/s against 162 without it, one run
// apart), 8 KiB about as fast as 4 (Q4_K 195 against 193, Q4_0 198
// against 203), 16 KiB slower again (149). Why is not known; a guess is
// the driver's split of each SM's memory between L1 and shared memory,
// which the other kernels of a layer (attention, routing: 4–9 KiB) set
// differently. Prompt products keep none (they were 3 % slower with it).
// `footprint` keeps it allocated.
const FOOTPRINT: u32 = select(1u, 256u, TOK == 1u);
var<workgroup> footprint_slots: array<vec4<f32>, FOOTPRINT>;

fn footprint(lane: Lane) {
    // Never true (the host keeps parameters ≤ MAX_PARAM, below this), but
    // the compiler cannot know; uniform, so the barrier is allowed.
    if p.rows == 0xffffffffu {
        footprint_slots[lane.lid % FOOTPRINT] = vec4<f32>(1.0);
        workgroupBarrier();
        put_y(0u, footprint_slots[(lane.lid + 1u) % FOOTPRINT].x);
    }
}
// Rows of one workgroup.
const R: u32 = select(2u, 4u, TOK == 1u);

// Where the matrix being decoded starts: a byte offset in w and, for MLX,
// word offsets in the scales and biases (zero but for expert batches).
var<private> wb: u32;
var<private> sb: u32;
var<private> bb: u32;

// Eight decoded weights: columns part_cols(q).x .. +4 and part_cols(q).y .. +4
// of their unit.
struct Part {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

// Byte b of the weights.
fn byte_at(b: u32) -> u32 {
    return (w[b >> 2u] >> ((b & 3u) * 8u)) & 0xffu;
}

// The four bytes from byte b (any alignment), little-endian.
fn word_at(b: u32) -> u32 {
    let i = b >> 2u;
    let s = (b & 3u) * 8u;
    if s == 0u {
        return w[i];
    }
    return (w[i] >> s) | (w[i + 1u] << (32u - s));
}

// The little-endian u16 at an even byte offset b.
fn half_at(b: u32) -> u32 {
    return (w[b >> 2u] >> ((b & 2u) * 8u)) & 0xffffu;
}

// The f16 at an even byte offset b, widened exactly.
fn f16_at(b: u32) -> f32 {
    return f16x2(half_at(b)).x;
}

// NORM: 1 / sqrt(mean(x²) + eps) from summed squares.
fn inv_rms(squares: vec4<f32>) -> vec4<f32> {
    return 1.0 / sqrt(squares / f32(p.cols) + p.eps);
}

// The (vec4) indices in a token row of part i's two groups of four
// activations.
fn part_x(i: u32) -> vec2<u32> {
    return ((i >> 2u) * UNIT + part_cols(i & 3u)) / 4u;
}

// NORM: the squares of part i's eight activations (the columns
// `rows_part` reads) of the token row starting at (vec4) index `row`.
fn part_squares(row: u32, i: u32) -> f32 {
    let pc = part_x(i);
    let a = x[row + pc.x];
    let b = x[row + pc.y];
    return dot(a, a) + dot(b, b);
}

// NORM: the normalised token row starting at (vec4) index `row`, inverse
// RMS `s`, stored in `normed` (by the whole workgroup).
fn store_normed(row: u32, s: f32, lane: Lane) {
    for (var i = lane.lid; i < p.cols / 4u; i += WG) {
        normed[row + i] = x[row + i] * s * norm_w[i];
    }
}

// Four activations from (vec4) index c of the token row starting at
// `row`, times the norm's weights when NORM (the inverse RMS comes after
// the sum).
fn x_at(row: u32, c: u32) -> vec4<f32> {
    if NORM {
        return x[row + c] * norm_w[c];
    }
    return x[row + c];
}

// Part i (of 4 · units) of rows rr against one token's activations (row
// `xr`): the four rows' partial sums.
fn rows_part(rr: vec4<u32>, xr: u32, i: u32) -> vec4<f32> {
    let u = i >> 2u;
    let q = i & 3u;
    let pc = part_x(i);
    let xl = x_at(xr, pc.x);
    let xh = x_at(xr, pc.y);
    let a = part(rr.x, u, q);
    let b = part(rr.y, u, q);
    let c = part(rr.z, u, q);
    let d = part(rr.w, u, q);
    return vec4<f32>(
        dot(a.lo, xl) + dot(a.hi, xh),
        dot(b.lo, xl) + dot(b.hi, xh),
        dot(c.lo, xl) + dot(c.hi, xh),
        dot(d.lo, xl) + dot(d.hi, xh),
    );
}

// Part i of row r against four tokens' activations (rows `xr`): the four
// tokens' partial sums.
fn tokens_part(r: u32, xr: vec4<u32>, i: u32) -> vec4<f32> {
    let u = i >> 2u;
    let q = i & 3u;
    let pc = part_x(i);
    let a = part(r, u, q);
    return vec4<f32>(
        dot(a.lo, x_at(xr.x, pc.x)) + dot(a.hi, x_at(xr.x, pc.y)),
        dot(a.lo, x_at(xr.y, pc.x)) + dot(a.hi, x_at(xr.y, pc.y)),
        dot(a.lo, x_at(xr.z, pc.x)) + dot(a.hi, x_at(xr.z, pc.y)),
        dot(a.lo, x_at(xr.w, pc.x)) + dot(a.hi, x_at(xr.w, pc.y)),
    );
}

// Decodes from matrix m (0: A, 1: B) of offsets o.
fn use_matrix(o: array<vec3<u32>, 2>, m: u32) {
    wb = o[m].x;
    sb = o[m].y;
    bb = o[m].z;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, lane: Lane) {
    var g = wg.x + wg.y * p.wg_x;
    // First token rows of X and of Y.
    var x_base = 0u;
    var y_base = 0u;
    var n = p.n;
    // Offsets of matrices A and B.
    var o = array<vec3<u32>, 2>(vec3<u32>(0u), vec3<u32>(0u));
    let c4 = p.cols / 4u;
    footprint(lane);
    let parts = p.units * 4u;
    if COMBINE {
        // Rows r0.. of every job's product in turn (jobs p.job0 .. p.job0
        // + p.n, one token's experts in rank order), weighted and summed in
        // that order and added to Y: the down products and moe_combine.wgsl
        // in one dispatch, with the same arithmetic as the two.
        let r0 = wg.x * R;
        if r0 >= p.rows {
            return;
        }
        let rr = min(vec4<u32>(r0, r0 + 1u, r0 + 2u, r0 + 3u), vec4<u32>(p.rows - 1u));
        var total = vec4<f32>(0.0);
        for (var r = 0u; r < p.n; r++) {
            let j = (p.job0 + r) * JOB_WORDS;
            o[0] = vec3<u32>(job_word(j), job_word(j + 1u), job_word(j + 2u));
            use_matrix(o, 0u);
            let xr = job_word(j + 8u) * c4;
            var acc = vec4<f32>(0.0);
            for (var i = lane.lid; i < parts; i += WG) {
                acc += rows_part(rr, xr, i);
            }
            total += combine_w[r] * wg_sum4(acc, lane);
        }
        if lane.lid < 4u && r0 + lane.lid < p.rows {
            let at = p.row0 + r0 + lane.lid;
            put_y(at, y_at(at) + total[lane.lid]);
        }
        return;
    }
    if BATCH {
        g = wg.x;
        let j = (p.job0 + wg.y) * JOB_WORDS;
        o[0] = vec3<u32>(job_word(j), job_word(j + 1u), job_word(j + 2u));
        o[1] = vec3<u32>(job_word(j + 3u), job_word(j + 4u), job_word(j + 5u));
        y_base = job_word(j + 6u);
        n = job_word(j + 7u);
        x_base = job_word(j + 8u);
    }
    let r0 = g * R;
    let t0 = wg.z * TOK;
    // Uniform over the workgroup, so the barriers below stay uniform.
    if r0 >= p.rows || t0 >= n {
        return;
    }
    // Sums of A's rows, and of B's (GLU).
    var acc = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    // Four tokens: the same for the workgroup's second row.
    var acc_b = vec4<f32>(0.0);
    var acc2_b = vec4<f32>(0.0);
    // NORM: each token's summed squares (one token: in .x).
    var squares = vec4<f32>(0.0);
    // The token rows' first (vec4) indices in X.
    var xr = vec4<u32>(0u);
    if TOK == 1u {
        // Rows past the end repeat the last one; their sums are dropped.
        let rr = min(vec4<u32>(r0, r0 + 1u, r0 + 2u, r0 + 3u), vec4<u32>(p.rows - 1u));
        xr = vec4<u32>((x_base + t0) * c4);
        for (var i = lane.lid; i < parts; i += WG) {
            use_matrix(o, 0u);
            acc += rows_part(rr, xr.x, i);
            if NORM {
                squares.x += part_squares(xr.x, i);
            }
            if GLU {
                use_matrix(o, 1u);
                acc2 += rows_part(rr, xr.x, i);
            }
        }
    } else {
        // Tokens past n repeat the last one; their sums are dropped.
        let tt = min(vec4<u32>(t0, t0 + 1u, t0 + 2u, t0 + 3u), vec4<u32>(n - 1u));
        xr = (tt + x_base) * c4;
        // The second row (past the end: the first again, dropped).
        let r1 = min(r0 + 1u, p.rows - 1u);
        for (var i = lane.lid; i < parts; i += WG) {
            use_matrix(o, 0u);
            acc += tokens_part(r0, xr, i);
            acc_b += tokens_part(r1, xr, i);
            if NORM {
                squares += vec4<f32>(
                    part_squares(xr.x, i),
                    part_squares(xr.y, i),
                    part_squares(xr.z, i),
                    part_squares(xr.w, i),
                );
            }
            if GLU {
                use_matrix(o, 1u);
                acc2 += tokens_part(r0, xr, i);
                acc2_b += tokens_part(r1, xr, i);
            }
        }
    }
    // The workgroup's sums, two at a time where two are wanted (and four
    // tokens' squares alone), the last without a closing barrier (no
    // shared slot is written after it): each reduction is a chain of
    // barriers that the whole workgroup waits on.
    var s = vec4<f32>(0.0);
    var s_b = vec4<f32>(0.0);
    var up = vec4<f32>(0.0);
    var up_b = vec4<f32>(0.0);
    // NORM: the tokens' inverse RMS (a token's squares are reduced the
    // same way in either shape: each lane of a sum on its own).
    var inv = vec4<f32>(1.0);
    if TOK == 1u {
        if GLU {
            let r = wg_sum4x2_last(acc, acc2, lane);
            s = r.a;
            up = r.b;
        } else if NORM {
            let r = wg_sum4x2_last(acc, squares, lane);
            inv = inv_rms(r.b);
            s = r.a * inv.x;
        } else {
            s = wg_sum4_last(acc, lane);
        }
    } else {
        if GLU {
            let r = wg_sum4x2(acc, acc_b, lane);
            s = r.a;
            s_b = r.b;
            let u = wg_sum4x2_last(acc2, acc2_b, lane);
            up = u.a;
            up_b = u.b;
        } else if NORM {
            let r = wg_sum4x2(acc, acc_b, lane);
            inv = inv_rms(wg_sum4_last(squares, lane));
            s = r.a * inv;
            s_b = r.b * inv;
        } else {
            let r = wg_sum4x2_last(acc, acc_b, lane);
            s = r.a;
            s_b = r.b;
        }
    }
    if NORM && r0 == 0u {
        for (var t = 0u; t < TOK; t++) {
            if t0 + t < n {
                store_normed(xr[t], inv[t], lane);
            }
        }
    }
    if GLU {
        s = s / (1.0 + exp(-s)) * up;
        s_b = s_b / (1.0 + exp(-s_b)) * up_b;
    }
    // One token: lanes 0..4 write rows r0..r0 + 4. Four tokens: lanes
    // 0..4 write row r0 for tokens t0..t0 + 4, lanes 4..8 row r0 + 1.
    if lane.lid < 8u {
        var at = 0xffffffffu;
        var v = 0.0;
        if TOK == 1u {
            if lane.lid < 4u && r0 + lane.lid < p.rows {
                at = (y_base + t0) * p.y_stride + p.row0 + r0 + lane.lid;
                v = s[lane.lid];
            }
        } else {
            let t = lane.lid % 4u;
            let r = r0 + lane.lid / 4u;
            if t0 + t < n && r < p.rows {
                at = (y_base + t0 + t) * p.y_stride + p.row0 + r;
                v = select(s[t], s_b[t], lane.lid >= 4u);
            }
        }
        if at != 0xffffffffu {
            if p.acc == 1u {
                put_y(at, y_at(at) + v);
            } else {
                put_y(at, v);
            }
        }
    }
    if ROUTE {
        route_after(lane);
    }
}

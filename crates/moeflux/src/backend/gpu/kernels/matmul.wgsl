// Y = X Wᵀ for one part (a range of rows) of a quantized weight matrix.
//
// X is (t_base + n) × cols f32 (row-major), Y is (t_base + n) × y_stride
// f32; tokens t_base..t_base + n are computed (so one expert's rows of a
// buffer holding several experts' tokens can be used in place), and this
// part's row r is column row0 + r of Y. One workgroup computes one row for up to four
// tokens (workgroup z picks tokens 4z..4z+4), so each weight is decoded once
// per four tokens; the row's units (UNIT consecutive columns, decoded
// together: a quant block or a sub-block) are spread over the threads, and
// the partial sums are reduced across the workgroup. Rows are numbered
// wg.x + wg.y * wg_x, because one dispatch dimension holds at most 65535
// workgroups and an LM head has more rows.
//
// The format file appended to this one defines UNIT and
// `unit_dot(r, u) -> vec4<f32>`: Σ over the unit's columns c of
// W[r][c] · X[t][c], for the four tokens t of the workgroup.

struct Params {
    rows: u32,       // rows in this part
    cols: u32,
    n: u32,          // tokens
    row0: u32,       // first row of this part in the whole matrix
    y_stride: u32,   // rows of the whole matrix (Y's row length)
    row_bytes: u32,  // GGML formats: bytes of one row
    units: u32,      // units per row: ceil(cols / UNIT)
    wg_x: u32,       // workgroups along x in this dispatch
    group: u32,      // MLX: columns per scale/bias group
    scale_f16: u32,  // MLX: 1 when scales/biases are f16, 0 for bf16
    t_base: u32,     // first token row of X and Y
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
// The part's weight bytes, little-endian, packed into words; blocks need
// not start on a word boundary (Q4_0 blocks are 18 bytes, Q6_K 210).
@group(0) @binding(3) var<storage, read> w: array<u32>;

// Offsets in x of the four tokens' rows (tokens past n repeat the last one;
// their sums are computed and dropped).
var<private> xrow: vec4<u32>;

fn xv(c: u32) -> vec4<f32> {
    return vec4<f32>(x[xrow.x + c], x[xrow.y + c], x[xrow.z + c], x[xrow.w + c]);
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

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, lane: Lane) {
    let r = wg.x + wg.y * p.wg_x;
    // Uniform over the workgroup, so the barriers below stay uniform.
    if r >= p.rows {
        return;
    }
    let t0 = wg.z * 4u;
    let last = p.n - 1u;
    xrow = (vec4<u32>(min(t0, last), min(t0 + 1u, last), min(t0 + 2u, last), min(t0 + 3u, last)) + p.t_base) * p.cols;
    var acc = vec4<f32>(0.0);
    for (var u = lane.lid; u < p.units; u += WG) {
        acc += unit_dot(r, u);
    }
    let s = wg_sum4(acc, lane);
    if lane.lid < 4u && t0 + lane.lid < p.n {
        y[(p.t_base + t0 + lane.lid) * p.y_stride + p.row0 + r] = s[lane.lid];
    }
}

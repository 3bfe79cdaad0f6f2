// Rotary embedding, NEOX layout, in place: for token t, every head of
// head_dim values, and i < half, the pair (i, i + half) is rotated by the
// angle of (t, i), whose cosine and sine the host computed (cs[t · half +
// i] = (cos, sin), exactly as the CPU reference does, so the result does
// not depend on the GPU's sin/cos accuracy). Dimensions from 2 · half on
// are left as they are (partial RoPE). One thread per (t, head, i).

struct Params {
    n: u32,
    heads: u32,
    head_dim: u32,
    half: u32,
    wg_x: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> cs: array<vec2<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let id = (wg.x + wg.y * p.wg_x) * WG + lid;
    if id >= p.n * p.heads * p.half {
        return;
    }
    let i = id % p.half;
    let th = id / p.half; // t · heads + head
    let t = th / p.heads;
    let a_at = th * p.head_dim + i;
    let b_at = a_at + p.half;
    let a = x[a_at];
    let b = x[b_at];
    let c = cs[t * p.half + i];
    x[a_at] = a * c.x - b * c.y;
    x[b_at] = b * c.x + a * c.y;
}

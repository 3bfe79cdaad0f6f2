// The gated attention's output gate (Qwen3.5 / Qwen3-Next): for token
// t < n and i < width, y[t · width + i] *= σ(g[t · stride + at + i]), the
// gate values lying in the token's q|k|v row after v. One thread per
// value.

struct Params {
    n: u32,
    width: u32,
    stride: u32,
    at: u32,
    wg_x: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let id = (wg.x + wg.y * p.wg_x) * WG + lid;
    if id >= p.n * p.width {
        return;
    }
    let t = id / p.width;
    let gate = g[t * p.stride + p.at + id % p.width];
    y[id] = y[id] * (1.0 / (1.0 + exp(-gate)));
}

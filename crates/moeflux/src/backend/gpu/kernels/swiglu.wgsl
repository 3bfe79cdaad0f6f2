// A dense SwiGLU (a shared expert's): for token t < n and i < width,
// out[t · width + i] = SiLU(g) · u · s, with g = a[t · stride + i], u =
// a[t · stride + width + i] (the gate and up products side by side in one
// row) and s = σ(a[t · stride + 2 · width]) when p.scaled (the Qwen
// hybrids' shared-expert gate, a third product in the same row), else 1.
// Scaling the down product's input rather than its output is the same
// arithmetic up to rounding. One thread per output value.

struct Params {
    n: u32,
    width: u32,
    stride: u32,
    scaled: u32,
    wg_x: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let id = (wg.x + wg.y * p.wg_x) * WG + lid;
    if id >= p.n * p.width {
        return;
    }
    let t = id / p.width;
    let row = t * p.stride;
    let g = a[row + id % p.width];
    let u = a[row + p.width + id % p.width];
    var v = g / (1.0 + exp(-g)) * u;
    if p.scaled == 1u {
        v *= 1.0 / (1.0 + exp(-a[row + 2u * p.width]));
    }
    out[id] = v;
}

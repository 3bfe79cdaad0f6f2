// A dense SwiGLU (a shared expert's): for token t < n (wg.y) and i < width,
// out[t · width + i] = SiLU(g) · u · s, with g = a[t · stride + i] and
// u = a[t · stride + width + i] (the gate and up products side by side in
// one row), and s the Qwen hybrids' shared-expert gate:
// - p.gate 0: s = 1 (no gate);
// - p.gate 1: s = σ(a[t · stride + 2 · width]), its logit a third product
//   in the same row;
// - p.gate 2: s = σ(h[t] · gw), the logit's dot product taken here (an F32
//   gate row: one dispatch fewer than a product of one row), h being the
//   rows the gate and up products read (hidden = 4 · p.hidden4 values).
// Scaling the down product's input rather than its output is the same
// arithmetic up to rounding. A thread per output value; every workgroup
// of a token takes the dot product (2048 values for a 3B-active model).

struct Params {
    n: u32,
    width: u32,
    stride: u32,
    gate: u32,
    hidden4: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> h: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> gw: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, lane: Lane) {
    let t = wg.y;
    let i = wg.x * WG + lane.lid;
    let row = t * p.stride;
    var s = 1.0;
    if p.gate == 1u {
        s = 1.0 / (1.0 + exp(-a[row + 2u * p.width]));
    } else if p.gate == 2u {
        var acc = vec4<f32>(0.0);
        for (var k = lane.lid; k < p.hidden4; k += WG) {
            acc += h[t * p.hidden4 + k] * gw[k];
        }
        let d = wg_sum4(acc, lane);
        s = 1.0 / (1.0 + exp(-(d.x + d.y + d.z + d.w)));
    }
    if i < p.width {
        let g = a[row + i];
        let u = a[row + p.width + i];
        out[t * p.width + i] = g / (1.0 + exp(-g)) * u * s;
    }
}

// RMSNorm of each row of x (n rows of `dim`): out = x / sqrt(mean(x²) + eps)
// · weight, as the CPU's rms_norm. One workgroup per row (rows numbered
// wg.x + wg.y · wg_x). Per-head norms are the same with rows = heads.

struct Params {
    rows: u32,
    dim: u32,
    wg_x: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, lane: Lane) {
    let r = wg.x + wg.y * p.wg_x;
    if r >= p.rows {
        return;
    }
    let base = r * p.dim;
    var ss = 0.0;
    for (var i = lane.lid; i < p.dim; i += WG) {
        let v = x[base + i];
        ss += v * v;
    }
    let total = wg_sum4(vec4<f32>(ss, 0.0, 0.0, 0.0), lane).x;
    let scale = 1.0 / sqrt(total / f32(p.dim) + p.eps);
    for (var i = lane.lid; i < p.dim; i += WG) {
        out[base + i] = x[base + i] * scale * weight[i];
    }
}

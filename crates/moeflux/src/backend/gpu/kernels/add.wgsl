// Residual add: x += o over len values. One thread per value.

struct Params {
    len: u32,
    wg_x: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> o: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.x + wg.y * p.wg_x) * WG + lid;
    if i >= p.len {
        return;
    }
    x[i] = x[i] + o[i];
}

// Row gather: out[i] = src[idx[i]] for rows i < rows of dim values (the
// MoE layer lays its tokens' rows out grouped by expert, so each expert's
// tokens are consecutive rows). One thread per value.

struct Params {
    rows: u32,
    dim: u32,
    wg_x: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let id = (wg.x + wg.y * p.wg_x) * WG + lid;
    if id >= p.rows * p.dim {
        return;
    }
    let i = id / p.dim;
    let c = id % p.dim;
    out[id] = src[idx[i] * p.dim + c];
}

// MoE combine + residual: for token t < n and column c < dim,
// x[t][c] += Σ_{r < k} w[t·k + r] · y[row[t·k + r]][c], the sum taken in
// router-rank order r from 0 (as the CPU reference: the result does not
// depend on which expert was computed first). y holds the experts' output
// rows in any order; row[] says where (token t, rank r) went. One thread
// per (t, c).

struct Params {
    n: u32,
    dim: u32,
    k: u32,
    wg_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read> row: array<u32>;
@group(0) @binding(4) var<storage, read> w: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let id = (wg.x + wg.y * p.wg_x) * WG + lid;
    if id >= p.n * p.dim {
        return;
    }
    let t = id / p.dim;
    let c = id % p.dim;
    var acc = 0.0;
    for (var r = 0u; r < p.k; r++) {
        let i = t * p.k + r;
        acc += w[i] * y[row[i] * p.dim + c];
    }
    x[id] = x[id] + acc;
}

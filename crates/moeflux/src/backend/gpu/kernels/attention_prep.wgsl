// The steps of an attention block between the projections and the
// attention, in one dispatch: for each token t, the q, k and v head rows of
// `qkv` (token t's row of p.width values: n_heads q heads, then n_kv k
// heads, then n_kv v heads, head_dim values each, then a gated attention's
// gates) are
// - q: normalised (RMSNorm with the per-head weight norms[0..head_dim],
//   when p.norm_q), rotated (NEOX RoPE of the first 2 · half dimensions,
//   angles from the host's (cos, sin) table cs[t · half + i], computed as
//   the CPU computes them), written to qn;
// - k: the same with norms[head_dim..2 · head_dim] (p.norm_k), written
//   into the cache at position pos0 + t (element (pos0 + t) · stride +
//   head · head_dim), as f16 rounded to nearest-even exactly as the CPU's
//   cache (`f16_bits`, f16_round.wgsl; KV_F16) or f32;
// - v: written into its cache the same way.
// The norms and rotation are head_prep.wgsl's (shared with attention.wgsl).
// One workgroup per (head row, token): wg.x < n_heads is a q head, then the
// k heads, then the v heads; wg.y is the token. head_dim ≤ 4 · WG, even.

struct Params {
    n_heads: u32,
    n_kv: u32,
    head_dim: u32,
    half: u32,
    pos0: u32,
    stride: u32,
    eps: f32,
    norm_q: u32,
    norm_k: u32,
    // Values of one token's q|k|v row (a gated attention's gates follow v).
    width: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> norms: array<f32>;
@group(0) @binding(3) var<storage, read> cs: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read_write> qn: array<f32>;
@group(0) @binding(5) var<storage, read_write> kc: array<u32>;
@group(0) @binding(6) var<storage, read_write> vc: array<u32>;

// The row being prepared (see head_prep.wgsl), and what prep_row needs.
var<workgroup> prow: array<f32, 4u * WG>;
var<workgroup> pnorm: array<f32, 4u * WG>;
var<workgroup> pcs: array<vec2<f32>, 2u * WG>;
const PWG: u32 = WG;

fn qkv_at(i: u32) -> f32 {
    return qkv[i];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, lane: Lane) {
    let hd = p.head_dim;
    let slot = wg.x;
    let t = wg.y;
    let width = p.width;
    let is_q = slot < p.n_heads;
    let is_v = slot >= p.n_heads + p.n_kv;
    // q and k rows normalised (when asked) and rotated; v rows as they
    // are (uniform: the same choice for the workgroup).
    let norm = select(p.norm_k, p.norm_q, is_q) == 1u && !is_v;
    let w0 = select(hd, 0u, is_q);
    prep_row(0u, t * width + slot * hd, norm, w0, !is_v, t * p.half, lane);
    if is_q {
        let dst = (t * p.n_heads + slot) * hd;
        for (var d = lane.lid; d < hd; d += WG) {
            qn[dst + d] = prow[d];
        }
        return;
    }
    let head = select(slot - p.n_heads, slot - p.n_heads - p.n_kv, is_v);
    let at = (p.pos0 + t) * p.stride + head * hd;
    if KV_F16 {
        for (var d = 2u * lane.lid; d < hd; d += 2u * WG) {
            let word = f16_bits(prow[d]) | (f16_bits(prow[d + 1u]) << 16u);
            if is_v {
                vc[(at + d) / 2u] = word;
            } else {
                kc[(at + d) / 2u] = word;
            }
        }
    } else {
        for (var d = lane.lid; d < hd; d += WG) {
            if is_v {
                vc[at + d] = bitcast<u32>(prow[d]);
            } else {
                kc[at + d] = bitcast<u32>(prow[d]);
            }
        }
    }
}

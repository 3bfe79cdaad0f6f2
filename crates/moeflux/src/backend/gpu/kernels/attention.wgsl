// Causal attention of n_q query tokens (q: n_q × n_heads × head_dim, the
// last n_q of `len` positions, whose K/V the cache already holds): query t
// attends to the first len − n_q + 1 + t positions of a KV cache
// (position j's keys at k[j · k_stride ..], values at v[j · v_stride ..],
// head group g at offset g · head_dim; f16 pairs packed in words when
// KV_F16, else f32 bits). Grouped-query: head h
// reads KV group h / (n_heads / n_kv_heads). Scores are q·k · scale; the
// softmax and the weighted sum of values are exact in f32 (no
// approximation), computed over chunks of CH positions with a running max
// (each chunk's sums are rescaled by exp(old max − new max)), so the shared
// memory is bounded whatever the context length.
//
// The positions are split into spans of p.span (a multiple of CH) so that
// a long context is read by many workgroups at once (one workgroup per
// head reading all of a 500-token cache took half a millisecond a layer on
// an H100). One workgroup per (head, query, span): wg.x is the head, wg.y
// the query (decode is n_q = 1), wg.z the span; thread d (and d + WG, ...)
// owns output dimension d, so head_dim ≤ 4 · WG. Each writes its span's
// partial result — the unnormalised weighted sum of values, the running
// max m and the sum l of exp(score − m) — as row (query · n_heads + head)
// · spans + span of `part` (head_dim + 2 values); attention_merge.wgsl
// combines the spans. A span past the query's causal end writes l = 0.

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    len: u32,
    k_stride: u32,
    v_stride: u32,
    scale: f32,
    n_q: u32,
    span: u32,
    spans: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> v: array<u32>;
@group(0) @binding(4) var<storage, read_write> part: array<f32>;

const CH: u32 = 64u;
const MAX_HD: u32 = 4u * WG;
// Finite stand-in for −∞: exp(LOWEST − m) is 0 for any finite score m.
const LOWEST: f32 = -3.4028235e38;

var<workgroup> qh: array<f32, MAX_HD>;
var<workgroup> ps: array<f32, CH>;

// Elements i and i + 1 (i even) of the keys or the values.
fn k_pair(i: u32) -> vec2<f32> {
    if KV_F16 {
        return f16x2(k[i >> 1u]);
    }
    return vec2<f32>(bitcast<f32>(k[i]), bitcast<f32>(k[i + 1u]));
}

fn v_pair(i: u32) -> vec2<f32> {
    if KV_F16 {
        return f16x2(v[i >> 1u]);
    }
    return vec2<f32>(bitcast<f32>(v[i]), bitcast<f32>(v[i + 1u]));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, lane: Lane) {
    let h = wg.x;
    let t = wg.y;
    let hd = p.head_dim;
    let g = h / (p.n_heads / p.n_kv_heads);
    // Positions this query sees (causal), this span's share of them, and
    // where its rows start.
    let seen = p.len - p.n_q + 1u + t;
    let first = wg.z * p.span;
    let len = min(seen, first + p.span);
    let row = (t * p.n_heads + h) * hd;
    let out = ((t * p.n_heads + h) * p.spans + wg.z) * (hd + 2u);
    for (var d = lane.lid; d < hd; d += WG) {
        qh[d] = q[row + d];
    }
    workgroupBarrier();
    var m = LOWEST; // running max of the scores
    var l = 0.0;    // running sum of exp(score − m)
    var o = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var c0 = first; c0 < len; c0 += CH) {
        let cn = min(CH, len - c0);
        var mx = LOWEST;
        for (var j = lane.lid; j < cn; j += WG) {
            let kb = (c0 + j) * p.k_stride + g * hd;
            var s = 0.0;
            for (var d = 0u; d < hd; d += 2u) {
                let kk = k_pair(kb + d);
                s += qh[d] * kk.x + qh[d + 1u] * kk.y;
            }
            s *= p.scale;
            ps[j] = s;
            mx = max(mx, s);
        }
        let nm = max(m, wg_max(mx, lane));
        let f = exp(m - nm);
        var ls = 0.0;
        for (var j = lane.lid; j < cn; j += WG) {
            let e = exp(ps[j] - nm);
            ps[j] = e;
            ls += e;
        }
        // The reduction's barrier also publishes every ps[j].
        l = l * f + wg_sum4(vec4<f32>(ls, 0.0, 0.0, 0.0), lane).x;
        for (var slot = 0u; slot < 4u; slot++) {
            let d = lane.lid + slot * WG;
            if d < hd {
                let vb = g * hd + (d & ~1u);
                var acc = 0.0;
                for (var j = 0u; j < cn; j++) {
                    acc += ps[j] * v_pair((c0 + j) * p.v_stride + vb)[d & 1u];
                }
                o[slot] = o[slot] * f + acc;
            }
        }
        m = nm;
        // The next chunk overwrites ps.
        workgroupBarrier();
    }
    for (var slot = 0u; slot < 4u; slot++) {
        let d = lane.lid + slot * WG;
        if d < hd {
            part[out + d] = o[slot];
        }
    }
    if lane.lid == 0u {
        part[out + hd] = m;
        part[out + hd + 1u] = l;
    }
}

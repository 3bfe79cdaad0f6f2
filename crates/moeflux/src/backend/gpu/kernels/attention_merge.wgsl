// Merges the spans' partial attention results (attention.wgsl): for each
// (query, head), with M the largest span max, out = Σ o_s · exp(m_s − M) /
// Σ l_s · exp(m_s − M), summed in span order. A span with l = 0 (past the
// causal end, or all scores −∞) adds nothing. One workgroup per (head,
// query); thread d (and d + WG, ...) owns output dimension d.

struct Params {
    n_heads: u32,
    head_dim: u32,
    spans: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.x;
    let t = wg.y;
    let hd = p.head_dim;
    let rows = (t * p.n_heads + h) * p.spans;
    let w = hd + 2u;
    var big = -3.4028235e38;
    for (var s = 0u; s < p.spans; s++) {
        if part[(rows + s) * w + hd + 1u] > 0.0 {
            big = max(big, part[(rows + s) * w + hd]);
        }
    }
    var l = 0.0;
    for (var s = 0u; s < p.spans; s++) {
        let b = (rows + s) * w;
        if part[b + hd + 1u] > 0.0 {
            l += part[b + hd + 1u] * exp(part[b + hd] - big);
        }
    }
    for (var d = lid; d < hd; d += WG) {
        var o = 0.0;
        for (var s = 0u; s < p.spans; s++) {
            let b = (rows + s) * w;
            if part[b + hd + 1u] > 0.0 {
                o += part[b + d] * exp(part[b + hd] - big);
            }
        }
        out[(t * p.n_heads + h) * hd + d] = o / l;
    }
}

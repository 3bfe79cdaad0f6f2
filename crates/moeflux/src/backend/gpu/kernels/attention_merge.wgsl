// Merges the spans' partial attention results (attention.wgsl): for each
// (query, head), with M the largest span max, out = Σ o_s · exp(m_s − M) /
// Σ l_s · exp(m_s − M), summed in span order. A span with l = 0 (past the
// causal end, or all scores −∞) adds nothing. One workgroup per (head,
// query); the spans' maxima and sums are read in parallel into shared
// memory (at most MAX_SPANS spans), then thread d (and d + WG, ...) owns
// output dimension d, its loads over the spans issued LOADS at a time.

struct Params {
    n_heads: u32,
    head_dim: u32,
    spans: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const MAX_SPANS: u32 = 1024u;
// Spans whose values a thread loads before adding any: a decode step
// over a few thousand positions waits on memory once or twice.
const LOADS: u32 = 16u;
// exp(m_s − M) of each span, 0 for a span that adds nothing.
var<workgroup> fac: array<f32, MAX_SPANS>;
var<workgroup> sum: array<f32, MAX_SPANS>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.x;
    let t = wg.y;
    let hd = p.head_dim;
    let ns = min(p.spans, MAX_SPANS);
    let rows = (t * p.n_heads + h) * p.spans;
    let w = hd + 2u;
    for (var s = lid; s < ns; s += WG) {
        let b = (rows + s) * w;
        fac[s] = part[b + hd];
        sum[s] = part[b + hd + 1u];
    }
    workgroupBarrier();
    var big = -3.4028235e38;
    for (var s = 0u; s < ns; s++) {
        if sum[s] > 0.0 {
            big = max(big, fac[s]);
        }
    }
    var l = 0.0;
    for (var s = 0u; s < ns; s++) {
        if sum[s] > 0.0 {
            l += sum[s] * exp(fac[s] - big);
        }
    }
    // Every thread has read the maxima before they are replaced.
    workgroupBarrier();
    for (var s = lid; s < ns; s += WG) {
        fac[s] = select(0.0, exp(fac[s] - big), sum[s] > 0.0);
    }
    workgroupBarrier();
    for (var d = lid; d < hd; d += WG) {
        var o = 0.0;
        for (var s0 = 0u; s0 < ns; s0 += LOADS) {
            var v: array<f32, LOADS>;
            for (var k = 0u; k < LOADS; k++) {
                let s = min(s0 + k, ns - 1u);
                v[k] = part[(rows + s) * w + d];
            }
            for (var k = 0u; k < LOADS; k++) {
                if s0 + k < ns && sum[s0 + k] > 0.0 {
                    o += v[k] * fac[s0 + k];
                }
            }
        }
        out[(t * p.n_heads + h) * hd + d] = o / l;
    }
}

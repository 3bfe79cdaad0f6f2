// Merging the spans of one (head, query) of an attention call
// (attention.wgsl writes them): with M the largest span max, out =
// Σ o_s · exp(m_s − M) / Σ l_s · exp(m_s − M), summed in span order. A span
// with l = 0 (past the causal end, or all scores −∞) adds nothing.
//
// The includer declares `p` (with n_heads, head_dim, spans), MAX_SPANS
// (the host keeps p.spans ≤ MAX_SPANS: longer contexts get longer spans),
// the shared array `sp` (2 · MAX_SPANS f32), `part_at` (value i of the partial
// results: head_dim + 2 values a span, row (query · n_heads + head) ·
// spans + span) and the output `out`. Run by a whole workgroup of WG
// threads, from uniform control flow: the spans' maxima and sums are read
// in parallel into `sp`, then thread d (and d + WG, ...) owns output
// dimension d, its loads over the spans issued LOADS at a time.

// Spans whose values a thread loads before adding any: a decode step
// over a few thousand positions waits on memory once or twice.
const LOADS: u32 = 16u;

fn merge_spans(h: u32, t: u32, lid: u32) {
    let hd = p.head_dim;
    let ns = min(p.spans, MAX_SPANS);
    let rows = (t * p.n_heads + h) * p.spans;
    let w = hd + 2u;
    // sp[s]: span s's max, then exp(m_s − M) (0 for a span that adds
    // nothing); sp[MAX_SPANS + s]: its sum l_s.
    for (var s = lid; s < ns; s += WG) {
        let b = (rows + s) * w;
        sp[s] = part_at(b + hd);
        sp[MAX_SPANS + s] = part_at(b + hd + 1u);
    }
    workgroupBarrier();
    var big = -3.4028235e38;
    for (var s = 0u; s < ns; s++) {
        if sp[MAX_SPANS + s] > 0.0 {
            big = max(big, sp[s]);
        }
    }
    var l = 0.0;
    for (var s = 0u; s < ns; s++) {
        let ls = sp[MAX_SPANS + s];
        if ls > 0.0 {
            l += ls * exp(sp[s] - big);
        }
    }
    // Every thread has read the maxima before they are replaced.
    workgroupBarrier();
    for (var s = lid; s < ns; s += WG) {
        sp[s] = select(0.0, exp(sp[s] - big), sp[MAX_SPANS + s] > 0.0);
    }
    workgroupBarrier();
    for (var d = lid; d < hd; d += WG) {
        var o = 0.0;
        for (var s0 = 0u; s0 < ns; s0 += LOADS) {
            var v: array<f32, LOADS>;
            for (var k = 0u; k < LOADS; k++) {
                let s = min(s0 + k, ns - 1u);
                v[k] = part_at((rows + s) * w + d);
            }
            for (var k = 0u; k < LOADS; k++) {
                if s0 + k < ns && sp[MAX_SPANS + s0 + k] > 0.0 {
                    o += v[k] * sp[s0 + k];
                }
            }
        }
        out[(t * p.n_heads + h) * hd + d] = o / l;
    }
}

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

// Spans whose values a thread loads before adding any (written out in
// straight-line code below).
const LOADS: u32 = 8u;

// Adds span s's value v, weighted, to o (nothing past the last span or
// for a span that adds nothing).
fn merge_add(o: f32, v: f32, s: u32, ns: u32) -> f32 {
    if s < ns && sp[MAX_SPANS + s] > 0.0 {
        return o + v * sp[s];
    }
    return o;
}

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
        // LOADS spans' loads at a time, in straight-line code so that
        // they wait on memory together (loaded into an array in a loop
        // they were issued one wait at a time).
        for (var s0 = 0u; s0 < ns; s0 += LOADS) {
            let v0 = part_at((rows + min(s0, ns - 1u)) * w + d);
            let v1 = part_at((rows + min(s0 + 1u, ns - 1u)) * w + d);
            let v2 = part_at((rows + min(s0 + 2u, ns - 1u)) * w + d);
            let v3 = part_at((rows + min(s0 + 3u, ns - 1u)) * w + d);
            let v4 = part_at((rows + min(s0 + 4u, ns - 1u)) * w + d);
            let v5 = part_at((rows + min(s0 + 5u, ns - 1u)) * w + d);
            let v6 = part_at((rows + min(s0 + 6u, ns - 1u)) * w + d);
            let v7 = part_at((rows + min(s0 + 7u, ns - 1u)) * w + d);
            o = merge_add(o, v0, s0, ns);
            o = merge_add(o, v1, s0 + 1u, ns);
            o = merge_add(o, v2, s0 + 2u, ns);
            o = merge_add(o, v3, s0 + 3u, ns);
            o = merge_add(o, v4, s0 + 4u, ns);
            o = merge_add(o, v5, s0 + 5u, ns);
            o = merge_add(o, v6, s0 + 6u, ns);
            o = merge_add(o, v7, s0 + 7u, ns);
        }
        out[(t * p.n_heads + h) * hd + d] = o / l;
    }
}

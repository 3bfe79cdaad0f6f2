// MoE routing of one token (`route_token`): softmax over the token's
// router logits, the k largest probabilities (lower expert id first on
// ties, as the CPU's `Moe::route`), renormalised to sum to 1 when r.norm
// is 1, written to `choice` (token t, rank r: the expert id and the
// weight's bits at 2 (t·k + r)). Every routing decision of the GPU path is
// this function's — in moe_route.wgsl, or in the router product's last
// workgroup (matmul.wgsl, ROUTE) — whether the host reads it back to bring
// experts in or the GPU goes on alone, so the results do not depend on the
// memory plan. Both kernels have the same workgroup size, so their sums
// are added in the same order.
//
// With r.jobs = 1 (one token, every expert of the model resident), it also
// writes the layer's expert product jobs (see matmul.wgsl: k gate/up jobs
// reading row 0 of X, then k down jobs reading row r of the SwiGLU output,
// rank r writing row r) and the MoE combine's rows (rank r: row r) and
// weights.
//
// Expert e of the layer is slot r.first + e of the pool, at byte
// (r.first + e) · r.stride; r.gate, r.up and r.down give the byte offsets
// of each matrix's arrays (weights, MLX scales, MLX biases) in a slot.
//
// The includer declares `logit_at` (logit i of the token rows),
// `rank_top_k` and the outputs `choice`, `jobs`, `rows` and `weights`;
// the whole workgroup calls `route_token` from uniform control flow.
// moe_route.wgsl binds a `Route` as its parameters.

struct Route {
    n_experts: u32,
    k: u32,
    norm: u32,
    first: u32,
    stride: u32,
    jobs: u32,
    // moe_route.wgsl: tokens whose logits are in its first buffer.
    split: u32,
    gate: vec4<u32>,
    up: vec4<u32>,
    down: vec4<u32>,
}

const MAX_E: u32 = 1024u;
const MAX_K: u32 = 64u;
const LOWEST: f32 = -3.4028235e38;

var<workgroup> prob: array<f32, MAX_E>;
var<workgroup> chosen: array<u32, MAX_K>;
var<workgroup> chosen_p: array<f32, MAX_K>;
var<workgroup> total: f32;

// Whether (v, i) ranks before (bv, bi): larger, or equal with a lower id.
fn before(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return v > bv || (v == bv && i < bi);
}

// The job of matrix offsets o (weights, scales, biases in bytes) for
// expert e, as words (byte offset, scale and bias word offsets).
fn put(r: Route, at: u32, e: u32, o: vec4<u32>) {
    let base = (r.first + e) * r.stride;
    jobs[at] = base + o.x;
    jobs[at + 1u] = (base + o.y) / 4u;
    jobs[at + 2u] = (base + o.z) / 4u;
}

// Each expert's rank: how many experts rank before it (see `before`, a
// total order on (probability, id), so ranks are distinct); those of rank
// < k are the top k, in order. One pass of comparisons in shared memory
// instead of k rounds of reductions: ne comparisons an expert.
fn rank_all(k: u32, ne: u32, lane: Lane) {
    for (var e = lane.lid; e < ne; e += WG) {
        let v = prob[e];
        var rank = 0u;
        for (var f = 0u; f < ne; f++) {
            if before(prob[f], f, v, e) {
                rank++;
            }
        }
        if rank < k {
            chosen[rank] = e;
            chosen_p[rank] = v;
        }
    }
}

fn route_token(ro: Route, t: u32, lane: Lane) {
    let ne = ro.n_experts;
    var mx = LOWEST;
    for (var e = lane.lid; e < ne; e += WG) {
        let v = logit_at(t * ne + e);
        prob[e] = v;
        mx = max(mx, v);
    }
    let m = wg_max(mx, lane);
    var s = 0.0;
    for (var e = lane.lid; e < ne; e += WG) {
        let v = exp(prob[e] - m);
        prob[e] = v;
        s += v;
    }
    let sum = wg_sum4(vec4<f32>(s, 0.0, 0.0, 0.0), lane).x;
    for (var e = lane.lid; e < ne; e += WG) {
        // A NaN (from a NaN or infinite logit) becomes −1: it ranks after
        // every probability, lower id first, so the order below stays total
        // and every rank is filled once. Its bits are tested, as a compiler
        // may fold v != v.
        var v = prob[e] / sum;
        if (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u {
            v = -1.0;
        }
        prob[e] = v;
    }
    workgroupBarrier();
    // The top k into `chosen` and `chosen_p`, in rank order: the
    // includer's `rank_top_k` (`rank_all` below, or moe_route.wgsl's).
    // Ranks are exact comparisons, so every way gives the same choice.
    rank_top_k(ro.k, ne, lane);
    workgroupBarrier();
    if lane.lid == 0u {
        // In rank order, as the CPU sums them.
        var t = 0.0;
        for (var r = 0u; r < ro.k; r++) {
            t += chosen_p[r];
        }
        total = t;
    }
    workgroupBarrier();
    for (var r = lane.lid; r < ro.k; r += WG) {
        var w = chosen_p[r];
        if ro.norm == 1u {
            w = w / total;
        }
        choice[2u * (t * ro.k + r)] = chosen[r];
        choice[2u * (t * ro.k + r) + 1u] = bitcast<u32>(w);
        if ro.jobs == 0u {
            continue;
        }
        weights[r] = w;
        rows[r] = r;
        let e = chosen[r];
        // Gate and up: SwiGLU into row r, from row 0 of the input.
        let g = r * JOB_WORDS;
        put(ro, g, e, ro.gate);
        put(ro, g + 3u, e, ro.up);
        jobs[g + 6u] = r;
        jobs[g + 7u] = 1u;
        jobs[g + 8u] = 0u;
        // Down: row r of the SwiGLU output into row r.
        let d = (ro.k + r) * JOB_WORDS;
        put(ro, d, e, ro.down);
        put(ro, d + 3u, e, ro.down);
        jobs[d + 6u] = r;
        jobs[d + 7u] = 1u;
        jobs[d + 8u] = r;
    }
}

// MoE routing on the GPU in a dispatch of its own (route.wgsl, its top k
// taken among candidates: see `rank_top_k` below), one
// workgroup per token (wg.x): for the host to read back (a streamed
// layer), for prompts, and where the router product does not route
// itself (matmul.wgsl, ROUTE).

// The parameters are route.wgsl's `Route` (as a uniform, its vec4s start
// at byte 32: an unused word after `split`). The first p.split tokens'
// logits are in `logits`, the others' in `logits2` (a streamed layer's
// guess of the next layer's routing, written beside the router product;
// else `logits` bound again).
@group(0) @binding(0) var<uniform> p: Route;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> choice: array<u32>;
@group(0) @binding(3) var<storage, read_write> jobs: array<u32>;
@group(0) @binding(4) var<storage, read_write> rows: array<u32>;
@group(0) @binding(5) var<storage, read_write> weights: array<f32>;
@group(0) @binding(6) var<storage, read> logits2: array<f32>;

fn logit_at(i: u32) -> f32 {
    let first = p.split * p.n_experts;
    if i < first {
        return logits[i];
    }
    return logits2[i - first];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, lane: Lane) {
    route_token(p, wg.x, lane);
}

// The top k ranked among candidates only (route.wgsl's `rank_all` ranks
// every expert against every other: for 512 experts, 2048 comparisons a
// thread, most of a 46 µs dispatch on an H200). Each thread takes the
// best of its experts; the k-th best of those bests is a cut that at
// least k experts reach, so every expert of the top k reaches it. The
// experts at or before the cut (in `before`'s order) are the candidates,
// usually a few more than k; a candidate's rank among them is its rank
// among all experts, since every expert before a top-k one is itself in
// the top k. So the choice is rank_all's, whatever the ties.
var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;
// The cut (a probability's bits and its expert), and the candidates.
var<workgroup> cut: vec2<u32>;
var<workgroup> n_cand: atomic<u32>;
var<workgroup> cand: array<u32, MAX_E>;

fn rank_top_k(k: u32, ne: u32, lane: Lane) {
    // Below every probability (they are ≥ 0, or −1 for a NaN): a thread
    // without experts, and a cut every expert reaches.
    let none = vec2<u32>(bitcast<u32>(-2.0), 0xffffffffu);
    var bv = bitcast<f32>(none.x);
    var bi = none.y;
    for (var e = lane.lid; e < ne; e += WG) {
        let v = prob[e];
        if before(v, e, bv, bi) {
            bv = v;
            bi = e;
        }
    }
    best_v[lane.lid] = bv;
    best_i[lane.lid] = bi;
    if lane.lid == 0u {
        // Stays so when fewer than k threads have experts.
        cut = none;
        atomicStore(&n_cand, 0u);
    }
    workgroupBarrier();
    // The thread whose best has k − 1 bests before it sets the cut (the
    // bests are distinct experts; stand-ins rank after them all).
    var r = 0u;
    for (var t = 0u; t < WG; t++) {
        if before(best_v[t], best_i[t], bv, bi) {
            r++;
        }
    }
    if r == k - 1u && bi != none.y {
        cut = vec2<u32>(bitcast<u32>(bv), bi);
    }
    workgroupBarrier();
    let cv = bitcast<f32>(cut.x);
    let ci = cut.y;
    for (var e = lane.lid; e < ne; e += WG) {
        if e == ci || before(prob[e], e, cv, ci) {
            cand[atomicAdd(&n_cand, 1u)] = e;
        }
    }
    workgroupBarrier();
    // In whatever order the atomics listed them: ranks do not depend on it.
    let nc = atomicLoad(&n_cand);
    for (var i = lane.lid; i < nc; i += WG) {
        let e = cand[i];
        let v = prob[e];
        var rank = 0u;
        for (var j = 0u; j < nc; j++) {
            let f = cand[j];
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

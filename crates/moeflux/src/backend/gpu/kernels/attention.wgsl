// Causal attention of n_q query tokens (q: n_q × n_heads × head_dim, the
// last n_q of `len` positions, whose K/V the cache already holds — but see
// PREP below): query t
// attends to the first len − n_q + 1 + t positions of a KV cache
// (position j's keys at k[j · k_stride ..], values at v[j · v_stride ..],
// head group g at offset g · head_dim; f16 pairs packed in words when
// KV_F16, else f32 bits). Grouped-query: head h
// reads KV group h / (n_heads / n_kv_heads). Scores are q·k · scale; the
// softmax and the weighted sum of values are exact in f32 (no
// approximation), computed over chunks of p.chunk positions with a running
// max (each chunk's sums are rescaled by exp(old max − new max)), so the
// shared memory is bounded whatever the context length.
//
// The positions are split into spans of p.span (a multiple of the chunk)
// so that a long context is read by many workgroups at once. One workgroup
// per (head, query, span): wg.x is the head, wg.y the query (decode is
// n_q = 1), wg.z the span. Each writes its span's partial result — the
// unnormalised weighted sum of values, the running max m and the sum l of
// exp(score − m) — as row (query · n_heads + head) · spans + span of
// `part` (head_dim + 2 values); a span past the query's causal end writes
// l = 0. With one span (p.spans = 1) there is nothing to merge: the
// workgroup writes its normalised result into `out`.
//
// MERGE (a constant of the module): the last workgroup of a (head, query)
// to finish (arrive.wgsl, count query · n_heads + head) merges its spans
// (merge.wgsl) and writes `out`, so no merge dispatch follows; the partial
// results then go through atomics. Without MERGE, attention_merge.wgsl
// merges in a dispatch of its own.
//
// Memory is read in 16-byte loads (U = 8 f16 or 4 f32 values; a row is
// L = head_dim / U loads), every thread issuing all of a chunk's key (then
// value) loads before it uses any: a chunk is two memory round trips, not
// one per position (the per-position loop this replaces spent ~70 µs a layer on an
// H100, waiting on one value row at a time).
// - Scores: thread (r, i) = (lid / L, lid % L) takes load i of rows r,
//   r + RPR, ... of the chunk (RPR = WG / L rows a round, at most 8
//   rounds: p.chunk · L ≤ 1024), so neighbouring threads read neighbouring
//   bytes of a row; each writes its partial dot product to `sp`, and
//   thread j then sums row j's L partials in order.
// - Values: thread (r, i) takes values i·U .. i·U + U of rows r, r + RPR,
//   ...; the RPR partial sums of each output value meet in `sv` and are
//   added in lane order.
//
// PREP (decode: one query, a constant of the module) folds
// attention_prep.wgsl into this dispatch: q is not a prepared query but
// the token's raw q|k|v projection row, and every workgroup normalises and
// rotates its head's q row itself; the workgroups of the last span (the
// one holding the new position) do the same for their group's k row and
// round k and v to the cache's format, use those values for the new
// position instead of reading the cache, and the first head of each group
// writes them into the cache. Both kernels prepare a row with
// head_prep.wgsl's `prep_row` (its mean square summed by PWG threads, the
// prep kernel's workgroup), so a decode step gives the bits of prep +
// attention — where
// the driver gives both pipelines the same subgroup size (a fixed 32 on
// NVIDIA, 8 on lavapipe; AMD and Intel drivers may choose per pipeline)
// and contracts the RoPE expressions alike in both; tested bit for bit on
// lavapipe, in CI.

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
    chunk: u32, // positions a chunk: a power of two ≤ 64, chunk · L ≤ 1024
    // PREP: rotated pairs a head, the RMSNorm epsilon, whether q and k
    // rows are normalised (norms[0..head_dim], norms[head_dim..]).
    half: u32,
    eps: f32,
    norm_q: u32,
    norm_k: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// k and v (bindings 2 and 3, writable with PREP), `put_kv` (their
// stores, empty without PREP), the partial results `part` (4) with
// `put_part` and `part_at`, the arrival counts (6, MERGE) and, with PREP,
// the norms and the rotary table (the next two bindings) are declared
// with the module's constants.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

// Values in one 16-byte load.
const U: u32 = select(4u, 8u, KV_F16);
const MAX_CH: u32 = 64u;
const ROUNDS: u32 = 8u;
// Output values a thread keeps (head_dim ≤ SLOTS · WG).
const SLOTS: u32 = 8u;
// Finite stand-in for −∞: exp(LOWEST − m) is 0 for any finite score m.
const LOWEST: f32 = -3.4028235e38;

// Partial dot products (chunk · L ≤ 1024), then partial value sums
// (RPR · head_dim ≤ WG · U ≤ 1024); MERGE: the merge's maxima and sums.
var<workgroup> sp: array<f32, 1024>;
var<workgroup> ps: array<f32, MAX_CH>;

// PREP: the q, k and v rows (head_dim ≤ PREP_HD each, a constant of the
// module) and the new position's k and v in the cache's format, as
// 16-byte loads.
var<workgroup> prow: array<f32, 3u * PREP_HD>;
var<workgroup> knew: array<vec4<u32>, PREP_HD / 4u>;
var<workgroup> vnew: array<vec4<u32>, PREP_HD / 4u>;

// PREP: value i of the raw q|k|v row.
fn qkv_at(i: u32) -> f32 {
    return q[i / 4u][i % 4u];
}

// PREP: the 16-byte load of the cache that holds prow[at..at + U], in the
// cache's format (f16 rounded as attention_prep.wgsl rounds it).
fn cache_load(at: u32) -> vec4<u32> {
    if KV_F16 {
        var w = vec4<u32>(0u);
        for (var c = 0u; c < 4u; c++) {
            w[c] = f16_bits(prow[at + 2u * c]) | (f16_bits(prow[at + 2u * c + 1u]) << 16u);
        }
        return w;
    }
    return bitcast<vec4<u32>>(vec4<f32>(prow[at], prow[at + 1u], prow[at + 2u], prow[at + 3u]));
}

// The U values of a 16-byte load, as two vec4s (the second zero for f32).
struct Vals {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn widen(w: vec4<u32>) -> Vals {
    if KV_F16 {
        let a = f16x2(w.x);
        let b = f16x2(w.y);
        let c = f16x2(w.z);
        let d = f16x2(w.w);
        return Vals(vec4<f32>(a, b), vec4<f32>(c, d));
    }
    return Vals(bitcast<vec4<f32>>(w), vec4<f32>(0.0));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, lane: Lane) {
    let h = wg.x;
    let t = wg.y;
    let hd = p.head_dim;
    let g = h / (p.n_heads / p.n_kv_heads);
    let nl = hd / U;       // L: loads a row
    let rpr = WG / nl;     // rows a round
    let rounds = (p.chunk + rpr - 1u) / rpr;
    let li = lane.lid % nl;
    let lr = lane.lid / nl;
    let busy = lr < rpr;
    // Positions this query sees (causal), this span's share of them, and
    // where its rows start.
    let seen = p.len - p.n_q + 1u + t;
    let first = wg.z * p.span;
    let len = min(seen, first + p.span);
    let row = (t * p.n_heads + h) * hd;
    let at = ((t * p.n_heads + h) * p.spans + wg.z) * (hd + 2u);
    // This thread's U query values (its load i of a row).
    var qv = Vals(vec4<f32>(0.0), vec4<f32>(0.0));
    // PREP: the new position (the last; in the last span only).
    let new_pos = p.len - 1u;
    let has_new = PREP && first + p.span > new_pos;
    if PREP {
        prep_row(0u, h * hd, p.norm_q == 1u, 0u, true, 0u, lane);
        if busy {
            let b = li * U;
            qv.lo = vec4<f32>(prow[b], prow[b + 1u], prow[b + 2u], prow[b + 3u]);
            if KV_F16 {
                qv.hi = vec4<f32>(prow[b + 4u], prow[b + 5u], prow[b + 6u], prow[b + 7u]);
            }
        }
        if has_new {
            let kv0 = p.n_heads * hd;
            prep_row(PREP_HD, kv0 + g * hd, p.norm_k == 1u, hd, true, 0u, lane);
            prep_row(2u * PREP_HD, kv0 + (p.n_kv_heads + g) * hd, false, 0u, false, 0u, lane);
            for (var i = lane.lid; i < nl; i += WG) {
                knew[i] = cache_load(PREP_HD + i * U);
                vnew[i] = cache_load(2u * PREP_HD + i * U);
            }
            workgroupBarrier();
            // One writer a group: the cache holds the new position for the
            // next step (this step reads knew and vnew).
            if h % (p.n_heads / p.n_kv_heads) == 0u {
                let at_k = (new_pos * p.k_stride + g * hd) / U;
                let at_v = (new_pos * p.v_stride + g * hd) / U;
                for (var i = lane.lid; i < nl; i += WG) {
                    put_kv(at_k + i, at_v + i, knew[i], vnew[i]);
                }
            }
        }
    } else if busy {
        qv.lo = q[(row + li * U) / 4u];
        if KV_F16 {
            qv.hi = q[(row + li * U) / 4u + 1u];
        }
    }
    let kcol = (g * hd) / U + li;
    var m = LOWEST; // running max of the scores
    var l = 0.0;    // running sum of exp(score − m)
    var o: array<f32, SLOTS>;
    for (var c0 = first; c0 < len; c0 += p.chunk) {
        let cn = min(p.chunk, len - c0);
        // Scores: every load first, then the partial dot products.
        var kw: array<vec4<u32>, ROUNDS>;
        for (var r = 0u; r < ROUNDS; r++) {
            let j = r * rpr + lr;
            if busy && r < rounds && j < cn {
                if has_new && c0 + j == new_pos {
                    kw[r] = knew[li];
                } else {
                    kw[r] = k[((c0 + j) * p.k_stride) / U + kcol];
                }
            }
        }
        for (var r = 0u; r < ROUNDS; r++) {
            let j = r * rpr + lr;
            if busy && r < rounds && j < cn {
                let kk = widen(kw[r]);
                sp[j * nl + li] = dot(kk.lo, qv.lo) + dot(kk.hi, qv.hi);
            }
        }
        workgroupBarrier();
        var s = LOWEST;
        if lane.lid < cn {
            var acc = 0.0;
            for (var i = 0u; i < nl; i++) {
                acc += sp[lane.lid * nl + i];
            }
            s = acc * p.scale;
        }
        let nm = max(m, wg_max(s, lane));
        let f = exp(m - nm);
        var e = 0.0;
        if lane.lid < cn {
            e = exp(s - nm);
            ps[lane.lid] = e;
        }
        // The reduction's barriers also publish every ps[j] and keep sp
        // from being overwritten before every row's sum is read.
        l = l * f + wg_sum4(vec4<f32>(e, 0.0, 0.0, 0.0), lane).x;
        // Values: every load first, then the weighted sums.
        var vw: array<vec4<u32>, ROUNDS>;
        for (var r = 0u; r < ROUNDS; r++) {
            let j = r * rpr + lr;
            if busy && r < rounds && j < cn {
                if has_new && c0 + j == new_pos {
                    vw[r] = vnew[li];
                } else {
                    vw[r] = v[((c0 + j) * p.v_stride) / U + kcol];
                }
            }
        }
        var acc = Vals(vec4<f32>(0.0), vec4<f32>(0.0));
        for (var r = 0u; r < ROUNDS; r++) {
            let j = r * rpr + lr;
            if busy && r < rounds && j < cn {
                let vv = widen(vw[r]);
                let pj = ps[j];
                acc.lo += pj * vv.lo;
                acc.hi += pj * vv.hi;
            }
        }
        if busy {
            let b = lr * hd + li * U;
            for (var u = 0u; u < 4u; u++) {
                sp[b + u] = acc.lo[u];
                if KV_F16 {
                    sp[b + 4u + u] = acc.hi[u];
                }
            }
        }
        workgroupBarrier();
        for (var slot = 0u; slot < SLOTS; slot++) {
            let d = lane.lid + slot * WG;
            if d < hd {
                var sum = 0.0;
                for (var r = 0u; r < rpr; r++) {
                    sum += sp[r * hd + d];
                }
                o[slot] = o[slot] * f + sum;
            }
        }
        m = nm;
        // The next chunk overwrites sp and ps.
        workgroupBarrier();
    }
    if p.spans == 1u {
        // The only span: this is what merge.wgsl makes of one span (its
        // factor exp(m − m) is 1; the merge's 0 + o would turn a −0 into
        // +0, the only difference), with no merge.
        for (var slot = 0u; slot < SLOTS; slot++) {
            let d = lane.lid + slot * WG;
            if d < hd {
                out[row + d] = o[slot] / l;
            }
        }
        return;
    }
    for (var slot = 0u; slot < SLOTS; slot++) {
        let d = lane.lid + slot * WG;
        if d < hd {
            put_part(at + d, o[slot]);
        }
    }
    if lane.lid == 0u {
        put_part(at + hd, m);
        put_part(at + hd + 1u, l);
    }
    if MERGE {
        if last_to_arrive(t * p.n_heads + h, p.spans, lane.lid) {
            merge_spans(h, t, lane.lid);
        }
    }
}

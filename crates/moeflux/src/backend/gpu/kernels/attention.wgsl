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
// value) loads before it uses any, in straight-line code: a chunk is two
// memory round trips (a decode step's one: its value loads go with the
// keys), not one per position (the per-position loop this replaces spent
// ~70 µs a layer on an H100, waiting on one value row at a time).
// - Scores: thread (r, i) = (lid / L, lid % L) takes load i of rows r,
//   r + RPR, ... of the chunk (RPR = WG / L rows a round, at most
//   ROUNDS rounds: see ROUNDS), so neighbouring threads read neighbouring
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
// head_prep.wgsl's code (`prep_row` there is `prep_load`, a barrier and
// `prep_math`, which this kernel calls for three rows at once; the mean
// square summed by PWG threads, the prep kernel's workgroup), so a decode
// step gives the bits of prep + attention — where
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
// Rounds of a chunk's loads, written out in straight-line code below: the
// host makes the chunk a power of two of at most 8 · RPR positions (see
// `attention_spans` in pass.rs), so no round is left out.
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
// module), the q and k rows' norm weights, the rotation's (cos, sin) pairs
// (one position: q and k share them), and the new position's k and v in
// the cache's format, as 16-byte loads. Without PREP nothing touches them,
// and PH keeps them a few words long: every workgroup's shared memory is
// zeroed at its start, and the total stays well within WebGPU's 16 KiB
// minimum.
const PH: u32 = select(4u, PREP_HD, PREP);
var<workgroup> prow: array<f32, 3u * PH>;
var<workgroup> pnorm: array<f32, 2u * PH>;
var<workgroup> pcs: array<vec2<f32>, PH / 2u>;
var<workgroup> knew: array<vec4<u32>, PH / 4u>;
var<workgroup> vnew: array<vec4<u32>, PH / 4u>;

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

// The chunk loop's per-thread constants (set once in main): rows a
// round, this thread's row in a round and load in a row, whether it
// loads at all, rounds a chunk, its column (in loads) of a cache row, and
// the new position (PREP's last span; else none).
var<private> c_rpr: u32;
var<private> c_lr: u32;
var<private> c_li: u32;
var<private> c_busy: bool;
var<private> c_rounds: u32;
var<private> c_kcol: u32;
var<private> c_new: u32;

// Whether this thread has round r's row of a chunk of cn positions.
fn has_row(cn: u32, r: u32) -> bool {
    return c_busy && r < c_rounds && r * c_rpr + c_lr < cn;
}

// Round r's key (or value) load of the chunk from c0 (zero where the
// thread has no row).
fn kv_load(is_v: bool, c0: u32, cn: u32, r: u32) -> vec4<u32> {
    var w = vec4<u32>(0u);
    if has_row(cn, r) {
        let pos = c0 + r * c_rpr + c_lr;
        // PREP is a constant: prompts' loads carry no run-time check
        // (with one, prompts ran 2–3 % slower on an H100).
        if PREP && pos == c_new {
            w = select(knew[c_li], vnew[c_li], is_v);
        } else if is_v {
            w = v[(pos * p.v_stride) / U + c_kcol];
        } else {
            w = k[(pos * p.k_stride) / U + c_kcol];
        }
    }
    return w;
}

// Every round's key (or value) load of the chunk from c0, in
// straight-line code (see the chunk loop); indexed with constants only,
// so the array stays in registers.
fn chunk_loads(is_v: bool, c0: u32, cn: u32) -> array<vec4<u32>, ROUNDS> {
    return array<vec4<u32>, ROUNDS>(
        kv_load(is_v, c0, cn, 0u),
        kv_load(is_v, c0, cn, 1u),
        kv_load(is_v, c0, cn, 2u),
        kv_load(is_v, c0, cn, 3u),
        kv_load(is_v, c0, cn, 4u),
        kv_load(is_v, c0, cn, 5u),
        kv_load(is_v, c0, cn, 6u),
        kv_load(is_v, c0, cn, 7u),
    );
}

// Round r's partial dot product of key load kw with the query's.
fn score(kw: vec4<u32>, qv: Vals, cn: u32, r: u32) {
    if has_row(cn, r) {
        let kk = widen(kw);
        sp[(r * c_rpr + c_lr) * (p.head_dim / U) + c_li] = dot(kk.lo, qv.lo) + dot(kk.hi, qv.hi);
    }
}

// acc plus round r's value load vw weighted by its position's exp(score − m).
fn weigh(acc: Vals, vw: vec4<u32>, cn: u32, r: u32) -> Vals {
    var a = acc;
    if has_row(cn, r) {
        let vv = widen(vw);
        let pj = ps[r * c_rpr + c_lr];
        a.lo += pj * vv.lo;
        a.hi += pj * vv.hi;
    }
    return a;
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
        // Every row's loads first (one wait on memory), then the math; k
        // is rotated with the pairs loaded with q (the same position).
        let kv0 = p.n_heads * hd;
        prep_load(0u, h * hd, p.norm_q == 1u, 0u, true, 0u, lane.lid);
        if has_new {
            prep_load(PREP_HD, kv0 + g * hd, p.norm_k == 1u, hd, false, 0u, lane.lid);
            prep_load(2u * PREP_HD, kv0 + (p.n_kv_heads + g) * hd, false, 0u, false, 0u, lane.lid);
        }
        workgroupBarrier();
        prep_math(0u, p.norm_q == 1u, true, lane);
        if busy {
            let b = li * U;
            qv.lo = vec4<f32>(prow[b], prow[b + 1u], prow[b + 2u], prow[b + 3u]);
            if KV_F16 {
                qv.hi = vec4<f32>(prow[b + 4u], prow[b + 5u], prow[b + 6u], prow[b + 7u]);
            }
        }
        if has_new {
            prep_math(PREP_HD, p.norm_k == 1u, true, lane);
            prep_math(2u * PREP_HD, false, false, lane);
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
    c_rpr = rpr;
    c_lr = lr;
    c_li = li;
    c_busy = busy;
    c_rounds = rounds;
    c_kcol = (g * hd) / U + li;
    c_new = select(0xffffffffu, new_pos, has_new);
    var m = LOWEST; // running max of the scores
    var l = 0.0;    // running sum of exp(score − m)
    var o: array<f32, SLOTS>;
    for (var c0 = first; c0 < len; c0 += p.chunk) {
        let cn = min(p.chunk, len - c0);
        // The chunk's key loads, in straight-line code (ROUNDS of them):
        // one wait on memory. (Loaded into an array in a loop they were
        // issued a wait at a time.) A decode step (PREP: a few hundred
        // workgroups, each on the step's critical path) issues the value
        // loads with them; a prompt (many thousands of workgroups) after
        // the softmax, as before, keeping its registers down.
        let kw = chunk_loads(false, c0, cn);
        var vw = array<vec4<u32>, ROUNDS>();
        if PREP {
            vw = chunk_loads(true, c0, cn);
        }
        // Scores: the partial dot products.
        score(kw[0], qv, cn, 0u);
        score(kw[1], qv, cn, 1u);
        score(kw[2], qv, cn, 2u);
        score(kw[3], qv, cn, 3u);
        score(kw[4], qv, cn, 4u);
        score(kw[5], qv, cn, 5u);
        score(kw[6], qv, cn, 6u);
        score(kw[7], qv, cn, 7u);
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
        if !PREP {
            vw = chunk_loads(true, c0, cn);
        }
        // Values: the weighted sums, in round order.
        var acc = Vals(vec4<f32>(0.0), vec4<f32>(0.0));
        acc = weigh(acc, vw[0], cn, 0u);
        acc = weigh(acc, vw[1], cn, 1u);
        acc = weigh(acc, vw[2], cn, 2u);
        acc = weigh(acc, vw[3], cn, 3u);
        acc = weigh(acc, vw[4], cn, 4u);
        acc = weigh(acc, vw[5], cn, 5u);
        acc = weigh(acc, vw[6], cn, 6u);
        acc = weigh(acc, vw[7], cn, 7u);
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

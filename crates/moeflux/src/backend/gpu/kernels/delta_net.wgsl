// Gated DeltaNet, the Qwen hybrids' linear attention, for a chunk of n
// tokens of one layer: from the input projections (`proj`, one row of
// p.stride values a token) to the gated RMSNorm's output (`out`, n ×
// n_v × d_v), as `GatedDeltaNet::forward` on the CPU (model/
// linear_attention.rs): the causal depthwise conv over q|k|v with SiLU,
// q and k L2-normalised per key head (q scaled by 1/√d_k), the decay
// g = exp(a · softplus(α + dt_bias)) and β = σ(b), then per token
//
//     S ← g·S;  δ = β·(v − Sᵀk);  S ← S + k δᵀ;  o = Sᵀq
//
// and RMSNorm(o) · w · SiLU(z). The conv's sums are taken in the CPU's
// order; Sᵀk and Sᵀq in row blocks (below), and the three reductions over
// a head (the squares of q, of k and of o) in the workgroup's.
//
// One workgroup per value head j (wg.x), of SPLIT × MAX_DV threads:
// thread (g, c) = (lid / MAX_DV, lid % MAX_DV) owns rows g·RW .. g·RW + RW
// (RW = DK / SPLIT) of column c of the head's DK × d_v state, which it
// keeps over the chunk in an array indexed with constants only (the host
// writes the walks down those rows: load_rows, store_rows, decay_then_k,
// update_then_q). A column's SPLIT partial sums (Sᵀk, then Sᵀq) meet in
// shared memory and are added in g order: each is a sum of SPLIT row
// blocks, each block in row order (so not the CPU's order, but the same
// for every chunk size). Splitting the rows shortens each token's chain
// of dependent additions SPLIT times and keeps the state in registers.
//
// Conv channel c of the head's q (c < DK), k (c < DK) and v (c < d_v),
// and z, each go to one row group (`ROLE_*` below; all to g = 0 when
// SPLIT is 1); the thread keeps its channels' last K − 1 inputs as it
// goes (`Channel`), so the conv reads each input once and the next window
// is at hand when the chunk ends. The tokens of a chunk run in order
// inside the workgroup, so a prompt gives the same bits in chunks of any
// size.
//
// The conv window (the last K − 1 ≤ 3 inputs of every channel, oldest
// first, the CPU's layout) has two copies: this dispatch reads copy p.cur and
// writes the next window into the other, so no workgroup can overwrite a
// window another still reads (the q and k channels of a key head are read
// by every value head of its group and written by the first). The host
// flips p.cur after each chunk.
//
// Layouts of a projection row (p.packing), with r = n_v / n_k:
// 0: [q (n_k·DK) | k (n_k·DK) | v (n_v·d_v) | z (n_v·d_v) | b (n_v) | a (n_v)]
// 1: the same with b and a grouped per key head: [b (r) | a (r)] × n_k
// 2: [q | k | v (r heads) | z (r heads)] per key head, then b|a as 1
// The b|a part of a row is read from `ba_in` (binding 7), a row of
// p.ba_stride values a token starting at p.ba_at: the projection buffer
// itself (p.ba_at = q|k|v|z's width, p.ba_stride = p.stride), or a
// buffer of its own where b|a is a product of its own (a decode step's
// b|a then runs beside q|k|v|z; see `GpuDelta` in model.rs).
// Value head j reads key head j % n_k when p.tiled, else j / r (layouts
// 1 and 2 are always grouped).

struct Params {
    n: u32,
    n_k: u32,
    n_v: u32,
    d_v: u32,
    taps: u32,
    packing: u32,
    tiled: u32,
    stride: u32,
    cur: u32,
    eps: f32,
    q_scale: f32,
    ba_stride: u32,
    ba_at: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> proj: array<f32>;
// channels × taps, channels in the order [q (all key heads) | k | v].
@group(0) @binding(2) var<storage, read> conv_w: array<f32>;
// [a = −exp(A_log) (n_v) | dt_bias (n_v) | norm (d_v)]
@group(0) @binding(3) var<storage, read> head_w: array<f32>;
// 2 × (taps − 1) × channels
@group(0) @binding(4) var<storage, read_write> window: array<f32>;
// n_v × DK × d_v: head j's S[i][c] at (j · DK + i) · d_v + c.
@group(0) @binding(5) var<storage, read_write> state: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
// b|a rows (see the layouts above).
@group(0) @binding(7) var<storage, read> ba_in: array<f32>;

// A token's normalised q and k, and its v, for every row group.
var<workgroup> qs: array<f32, DK>;
var<workgroup> ks: array<f32, DK>;
var<workgroup> vs: array<f32, MAX_DV>;
// Each row group's partial sums of a column: Sᵀk, then Sᵀq.
var<workgroup> part_k: array<f32, WG>;
var<workgroup> part_q: array<f32, WG>;

// The row group that convolves a head's q, k and v channels, and reads
// its z and writes its output.
const ROLE_Q: u32 = 0u;
const ROLE_K: u32 = 1u % SPLIT;
const ROLE_V: u32 = 2u % SPLIT;
const ROLE_Z: u32 = 3u % SPLIT;

// Where a value head's inputs lie in a projection row (b and a: in a b|a
// row, see `ba_in`); the first of its
// q, k and v conv channels (column c's are these + c); whether it is the
// first value head reading its key head (the one that writes the key
// head's q and k window).
struct Head {
    q: u32,
    k: u32,
    v: u32,
    z: u32,
    b: u32,
    a: u32,
    chan: vec3<u32>,
    first: bool,
}

fn channels() -> u32 {
    return 2u * p.n_k * DK + p.n_v * p.d_v;
}

fn head_of(j: u32) -> Head {
    let r = p.n_v / p.n_k;
    let ch = channels();
    let kh = select(j / r, j % p.n_k, p.tiled == 1u);
    let first = select(kh * r, kh, p.tiled == 1u) == j;
    let chan = vec3<u32>(kh * DK, (p.n_k + kh) * DK, 2u * p.n_k * DK + j * p.d_v);
    let i = j % r;
    let ba = p.ba_at + kh * 2u * r;
    if p.packing == 2u {
        let g = kh * (2u * DK + 2u * r * p.d_v);
        let v = g + 2u * DK + i * p.d_v;
        return Head(g, g + DK, v, v + r * p.d_v, ba + i, ba + r + i, chan, first);
    }
    var b = p.ba_at + j;
    var a = b + p.n_v;
    if p.packing == 1u {
        b = ba + i;
        a = ba + r + i;
    }
    // Layouts 0 and 1 start their rows with q|k|v in conv-channel order.
    return Head(chan.x, chan.y, chan.z, ch + j * p.d_v, b, a, chan, first);
}

// SiLU of the causal conv of one channel, taps ≤ 4 (`MAX_CONV_TAPS`):
// weights `w` (the last tap's in w.w), the last taps − 1 inputs `h`
// (oldest first, see `Channel`) and the token's input `now`, summed
// oldest first, as the CPU sums them.
fn conv(w: vec4<f32>, h: vec3<f32>, now: f32) -> f32 {
    let last = p.taps - 1u;
    var acc = 0.0;
    if last > 0u {
        acc += w.x * h.x;
    }
    if last > 1u {
        acc += w.y * h.y;
    }
    if last > 2u {
        acc += w.z * h.z;
    }
    let y = acc + w.w * now;
    return y / (1.0 + exp(-y));
}

// A channel's conv weights: its taps − 1 older ones in .xyz (unused ones
// 0), its last in .w.
fn conv_weights(chan: u32) -> vec4<f32> {
    let last = p.taps - 1u;
    let w0 = chan * p.taps;
    var w = vec4<f32>(0.0, 0.0, 0.0, conv_w[w0 + last]);
    if last > 0u {
        w.x = conv_w[w0];
    }
    if last > 1u {
        w.y = conv_w[w0 + 1u];
    }
    if last > 2u {
        w.z = conv_w[w0 + 2u];
    }
    return w;
}

// One conv channel of a thread: its weights (`conv_weights`) and its last
// taps − 1 inputs, oldest first (the unused slots 0): from the window
// before the first token, shifted as each token comes in, the next window
// after the last.
struct Channel {
    w: vec4<f32>,
    h: vec3<f32>,
}

fn channel_of(chan: u32) -> Channel {
    return Channel(conv_weights(chan), window_in(chan));
}

// The channel's conv output for the token's input `now`, which then
// comes into its history.
fn conv_next(ch: ptr<function, Channel>, now: f32) -> f32 {
    let y = conv((*ch).w, (*ch).h, now);
    (*ch).h = shifted((*ch).h, now);
    return y;
}

// A channel's window slots (copy p.cur).
fn window_in(chan: u32) -> vec3<f32> {
    let last = p.taps - 1u;
    let at = p.cur * last * channels() + chan;
    var h = vec3<f32>(0.0);
    if last > 0u {
        h.x = window[at];
    }
    if last > 1u {
        h.y = window[at + channels()];
    }
    if last > 2u {
        h.z = window[at + 2u * channels()];
    }
    return h;
}

// `h` with the input `now` come in.
fn shifted(h: vec3<f32>, now: f32) -> vec3<f32> {
    switch p.taps - 1u {
        case 3u: {
            return vec3<f32>(h.y, h.z, now);
        }
        case 2u: {
            return vec3<f32>(h.y, now, 0.0);
        }
        case 1u: {
            return vec3<f32>(now, 0.0, 0.0);
        }
        default: {
            return h;
        }
    }
}

// Writes a channel's next window into the copy not read.
fn put_window(chan: u32, h: vec3<f32>) {
    let last = p.taps - 1u;
    let at = (1u - p.cur) * last * channels() + chan;
    if last > 0u {
        window[at] = h.x;
    }
    if last > 1u {
        window[at + channels()] = h.y;
    }
    if last > 2u {
        window[at + 2u * channels()] = h.z;
    }
}

// log(1 + e^x) without overflow (torch's threshold), and without losing
// e^x where 1 + e^x rounds to 1.
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        return x;
    }
    let e = exp(x);
    let u = 1.0 + e;
    if u == 1.0 {
        return e;
    }
    return log(u) * e / (u - 1.0);
}

// A token's inputs for this thread, before the conv: those of its roles'
// channels (0 elsewhere), and the head's a and b.
struct Token {
    q: f32,
    k: f32,
    v: f32,
    z: f32,
    alpha: f32,
    b: f32,
}

// Which of a head's inputs a thread reads.
struct Roles {
    q: bool,
    k: bool,
    v: bool,
    z: bool,
}

fn fetch(t: u32, h: Head, c: u32, r: Roles) -> Token {
    let row = t * p.stride;
    let bar = t * p.ba_stride;
    var tok = Token(0.0, 0.0, 0.0, 0.0, ba_in[bar + h.a], ba_in[bar + h.b]);
    if r.q {
        tok.q = proj[row + h.q + c];
    }
    if r.k {
        tok.k = proj[row + h.k + c];
    }
    if r.v {
        tok.v = proj[row + h.v + c];
    }
    if r.z {
        tok.z = proj[row + h.z + c];
    }
    return tok;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, lane: Lane) {
    let j = wg.x;
    if j >= p.n_v {
        return;
    }
    let c = lane.lid % MAX_DV;
    let g = lane.lid / MAX_DV;
    let dv = p.d_v;
    let h = head_of(j);
    let col = c < dv;
    let qk = c < DK;
    let roles = Roles(qk && g == ROLE_Q, qk && g == ROLE_K, col && g == ROLE_V, col && g == ROLE_Z);
    // This thread's rows of its column of S, in function scope, where a
    // driver can keep them in registers.
    var s: array<f32, RW>;
    let row0 = g * RW;
    let at = (j * DK + row0) * dv + c;
    if col {
        load_rows(&s, at, dv);
    }
    let chan = h.chan + vec3<u32>(c);
    let none = Channel(vec4<f32>(0.0), vec3<f32>(0.0));
    var cq = none;
    var ck = none;
    var cv = none;
    if roles.q {
        cq = channel_of(chan.x);
    }
    if roles.k {
        ck = channel_of(chan.y);
    }
    if roles.v {
        cv = channel_of(chan.z);
    }
    let decay = head_w[j];
    let dt_bias = head_w[p.n_v + j];
    var norm_w = 0.0;
    if roles.z {
        norm_w = head_w[2u * p.n_v + c];
    }
    // A token's inputs are fetched while the token before is computed
    // (none of them depends on the recurrence); after the last token, the
    // last again (never used).
    var next = fetch(0u, h, c, roles);
    for (var t = 0u; t < p.n; t++) {
        let cur = next;
        next = fetch(min(t + 1u, p.n - 1u), h, c, roles);
        var qv = 0.0;
        var kv = 0.0;
        if roles.q {
            qv = conv_next(&cq, cur.q);
        }
        if roles.k {
            kv = conv_next(&ck, cur.k);
        }
        if roles.v {
            vs[c] = conv_next(&cv, cur.v);
        }
        let sq = wg_sum4(vec4<f32>(qv * qv, kv * kv, 0.0, 0.0), lane);
        if roles.q {
            qs[c] = qv * (1.0 / sqrt(sq.x + p.eps) * p.q_scale);
        }
        if roles.k {
            ks[c] = kv * (1.0 / sqrt(sq.y + p.eps));
        }
        workgroupBarrier();
        let gk = exp(decay * softplus(cur.alpha + dt_bias));
        let beta = 1.0 / (1.0 + exp(-cur.b));
        if col {
            part_k[lane.lid] = decay_then_k(&s, gk, row0);
        }
        workgroupBarrier();
        var o = 0.0;
        if col {
            var m = 0.0;
            for (var i = 0u; i < SPLIT; i++) {
                m += part_k[i * MAX_DV + c];
            }
            part_q[lane.lid] = update_then_q(&s, (vs[c] - m) * beta, row0);
        }
        workgroupBarrier();
        if roles.z {
            for (var i = 0u; i < SPLIT; i++) {
                o += part_q[i * MAX_DV + c];
            }
        }
        // Its closing barrier also keeps qs, ks, vs and the partial sums
        // until every thread has read them.
        let ms = wg_sum4(vec4<f32>(o * o, 0.0, 0.0, 0.0), lane).x / f32(dv);
        if roles.z {
            let inv = 1.0 / sqrt(ms + p.eps);
            out[(t * p.n_v + j) * dv + c] = o * inv * norm_w * (cur.z / (1.0 + exp(-cur.z)));
        }
    }
    // The next window: v of this head's; q and k of its key head's in the
    // key head's first value head.
    if col {
        store_rows(&s, at, dv);
    }
    if roles.v {
        put_window(chan.z, cv.h);
    }
    if h.first && roles.q {
        put_window(chan.x, cq.h);
    }
    if h.first && roles.k {
        put_window(chan.y, ck.h);
    }
}

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
// and RMSNorm(o) · w · SiLU(z). Every sum is taken in the CPU's order
// except the three reductions over a head (the squares of q, of k and of
// o), which take the workgroup's.
//
// One workgroup per value head j (wg.x); thread c owns column c of the
// head's DK × d_v state, which it keeps over the chunk in an array indexed
// with constants only (the host writes the walks down the column row by
// row: load_column, store_column, decay_then_k, update_then_q), and conv
// channel c of the head's q, k (c < DK) and v (c < d_v). The tokens
// of a chunk run in order inside the workgroup, so a prompt gives the
// same bits in chunks of any size (the conv reads a chunk's earlier
// inputs from `proj` and older ones from the window, both the same
// values).
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
    _pad0: u32,
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

var<workgroup> qs: array<f32, DK>;
var<workgroup> ks: array<f32, DK>;

// Where a value head's inputs lie in a projection row; the first of its
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
    let ba = ch + p.n_v * p.d_v + kh * 2u * r;
    if p.packing == 2u {
        let g = kh * (2u * DK + 2u * r * p.d_v);
        let v = g + 2u * DK + i * p.d_v;
        return Head(g, g + DK, v, v + r * p.d_v, ba + i, ba + r + i, chan, first);
    }
    var b = ch + p.n_v * p.d_v + j;
    var a = b + p.n_v;
    if p.packing == 1u {
        b = ba + i;
        a = ba + r + i;
    }
    // Layouts 0 and 1 start their rows with q|k|v in conv-channel order.
    return Head(chan.x, chan.y, chan.z, ch + j * p.d_v, b, a, chan, first);
}

// Conv input of channel `chan` (at `at` in a projection row) at chunk
// position t: a row of this chunk, or a slot of the window for t < 0.
fn conv_in(t: i32, chan: u32, at: u32) -> f32 {
    if t >= 0 {
        return proj[u32(t) * p.stride + at];
    }
    let slot = u32(t + i32(p.taps) - 1);
    return window[(p.cur * (p.taps - 1u) + slot) * channels() + chan];
}

// SiLU of the causal conv of channel `chan` at chunk position t, taps ≤ 4
// (`MAX_CONV_TAPS`): the taps and inputs loaded together in straight-line
// code, then summed oldest first, as the CPU sums them.
fn conv_at(t: u32, chan: u32, at: u32) -> f32 {
    let last = p.taps - 1u;
    let w0 = chan * p.taps;
    let t0 = i32(t) - i32(last);
    var w = vec4<f32>(0.0);
    var x = vec4<f32>(0.0);
    if last > 0u {
        w.x = conv_w[w0];
        x.x = conv_in(t0, chan, at);
    }
    if last > 1u {
        w.y = conv_w[w0 + 1u];
        x.y = conv_in(t0 + 1, chan, at);
    }
    if last > 2u {
        w.z = conv_w[w0 + 2u];
        x.z = conv_in(t0 + 2, chan, at);
    }
    let now = conv_w[w0 + last] * proj[t * p.stride + at];
    var acc = 0.0;
    if last > 0u {
        acc += w.x * x.x;
    }
    if last > 1u {
        acc += w.y * x.y;
    }
    if last > 2u {
        acc += w.z * x.z;
    }
    let y = acc + now;
    return y / (1.0 + exp(-y));
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

// A token's inputs for this thread: its conv outputs (q and k where
// c < DK, v where c < d_v, else 0), z, and the head's a and b.
struct Token {
    q: f32,
    k: f32,
    v: f32,
    z: f32,
    alpha: f32,
    b: f32,
}

fn fetch(t: u32, h: Head, c: u32) -> Token {
    let row = t * p.stride;
    var tok = Token(0.0, 0.0, 0.0, 0.0, proj[row + h.a], proj[row + h.b]);
    if c < DK {
        tok.q = conv_at(t, h.chan.x + c, h.q + c);
        tok.k = conv_at(t, h.chan.y + c, h.k + c);
    }
    if c < p.d_v {
        tok.v = conv_at(t, h.chan.z + c, h.v + c);
        tok.z = proj[row + h.z + c];
    }
    return tok;
}

// The next window of a channel: its last taps − 1 inputs (up to 3, the
// unused slots 0) once the chunk is in, oldest first.
fn window_of(chan: u32, at: u32) -> vec3<f32> {
    let last = p.taps - 1u;
    let t0 = i32(p.n) - i32(last);
    var w = vec3<f32>(0.0);
    if last > 0u {
        w.x = conv_in(t0, chan, at);
    }
    if last > 1u {
        w.y = conv_in(t0 + 1, chan, at);
    }
    if last > 2u {
        w.z = conv_in(t0 + 2, chan, at);
    }
    return w;
}

// Writes a channel's next window into the copy not read. Every load of the
// windows comes before the first of these writes (the two copies are one
// buffer, so a write would otherwise wait for each load before it, and a
// load after a write for the write).
fn put_window(chan: u32, w: vec3<f32>) {
    let last = p.taps - 1u;
    let at = (1u - p.cur) * last * channels() + chan;
    if last > 0u {
        window[at] = w.x;
    }
    if last > 1u {
        window[at + channels()] = w.y;
    }
    if last > 2u {
        window[at + 2u * channels()] = w.z;
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, lane: Lane) {
    let j = wg.x;
    if j >= p.n_v {
        return;
    }
    let c = lane.lid;
    let dv = p.d_v;
    let h = head_of(j);
    let col = c < dv;
    let qk = c < DK;
    // This thread's column of S, in function scope, where a driver can
    // keep it in registers.
    var s: array<f32, DK>;
    if col {
        load_column(&s, j * DK * dv + c, dv);
    }
    let decay = head_w[j];
    let dt_bias = head_w[p.n_v + j];
    var norm_w = 0.0;
    if col {
        norm_w = head_w[2u * p.n_v + c];
    }
    // A token's inputs are fetched while the token before is computed
    // (none of them depends on the recurrence); after the last token, the
    // last again (never used).
    var next = fetch(0u, h, c);
    for (var t = 0u; t < p.n; t++) {
        let cur = next;
        next = fetch(min(t + 1u, p.n - 1u), h, c);
        let qv = cur.q;
        let kv = cur.k;
        let sq = wg_sum4(vec4<f32>(qv * qv, kv * kv, 0.0, 0.0), lane);
        let q_inv = 1.0 / sqrt(sq.x + p.eps) * p.q_scale;
        let k_inv = 1.0 / sqrt(sq.y + p.eps);
        if qk {
            qs[c] = qv * q_inv;
            ks[c] = kv * k_inv;
        }
        workgroupBarrier();
        let g = exp(decay * softplus(cur.alpha + dt_bias));
        let beta = 1.0 / (1.0 + exp(-cur.b));
        var o = 0.0;
        if col {
            let d = (cur.v - decay_then_k(&s, g)) * beta;
            o = update_then_q(&s, d);
        }
        // Its closing barrier also keeps qs and ks until every thread has
        // read them.
        let ms = wg_sum4(vec4<f32>(o * o, 0.0, 0.0, 0.0), lane).x / f32(dv);
        if col {
            let inv = 1.0 / sqrt(ms + p.eps);
            out[(t * p.n_v + j) * dv + c] = o * inv * norm_w * (cur.z / (1.0 + exp(-cur.z)));
        }
    }
    // The channels this thread writes the window of: v of its head; q and
    // k of its key head in the key head's first value head.
    let chan = h.chan + vec3<u32>(c);
    let first = h.first;
    var wv = vec3<f32>(0.0);
    var wq = vec3<f32>(0.0);
    var wk = vec3<f32>(0.0);
    if col {
        wv = window_of(chan.z, h.v + c);
    }
    if first && qk {
        wq = window_of(chan.x, h.q + c);
        wk = window_of(chan.y, h.k + c);
    }
    if col {
        store_column(&s, j * DK * dv + c, dv);
        put_window(chan.z, wv);
    }
    if first && qk {
        put_window(chan.x, wq);
        put_window(chan.y, wk);
    }
}

// K/V append: the n new positions' rows (src: n × dim f32) are written into
// a cache at positions pos0..pos0 + n (position j at element j · stride,
// the CPU cache's layout). An f16 cache (KV_F16) holds two values a word,
// low half first, rounded to nearest-even exactly as the CPU's conversion
// (integer operations, so no driver's pack2x16float rounding mode matters);
// dim and stride are even, so a position starts on a word. One thread per
// word written.

struct Params {
    n: u32,
    dim: u32,
    pos0: u32,
    stride: u32,
    wg_x: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

// IEEE binary16 bits of f, rounded to nearest, ties to even; overflow to
// infinity, NaN stays NaN (quiet), subnormals kept.
fn f16_bits(f: f32) -> u32 {
    let x = bitcast<u32>(f);
    let sign = (x >> 16u) & 0x8000u;
    let be = (x >> 23u) & 0xffu;
    let m = x & 0x7fffffu;
    if be == 0xffu {
        return sign | 0x7c00u | select(0u, 0x200u | (m >> 13u), m != 0u);
    }
    let e = i32(be) - 112; // rebias 127 → 15
    if e >= 31 {
        return sign | 0x7c00u;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        // Subnormal: the 24-bit significand shifted to units of 2⁻²⁴.
        let mm = m | 0x800000u;
        let shift = u32(14 - e);
        let half = 1u << (shift - 1u);
        var r = mm >> shift;
        let rem = mm & ((1u << shift) - 1u);
        if rem > half || (rem == half && (r & 1u) == 1u) {
            r += 1u;
        }
        return sign | r;
    }
    var r = (u32(e) << 10u) | (m >> 13u);
    let rem = m & 0x1fffu;
    // A carry out of the mantissa bumps the exponent, as rounding should.
    if rem > 0x1000u || (rem == 0x1000u && (r & 1u) == 1u) {
        r += 1u;
    }
    return sign | r;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let id = (wg.x + wg.y * p.wg_x) * WG + lid;
    if KV_F16 {
        if id >= p.n * p.dim / 2u {
            return;
        }
        let i = 2u * id;
        let t = i / p.dim;
        let c = i % p.dim;
        let a = f16_bits(src[i]);
        let b = f16_bits(src[i + 1u]);
        dst[((p.pos0 + t) * p.stride + c) / 2u] = a | (b << 16u);
    } else {
        if id >= p.n * p.dim {
            return;
        }
        let t = id / p.dim;
        let c = id % p.dim;
        dst[(p.pos0 + t) * p.stride + c] = bitcast<u32>(src[id]);
    }
}

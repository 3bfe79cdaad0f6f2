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

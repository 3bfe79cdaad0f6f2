// Two f16 values packed in a word (low half first), widened exactly with
// integer operations, for adapters without unpack2x16float (Mesa's
// llvmpipe without native f16, some older drivers).
fn f16_widen(h: u32) -> f32 {
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    var mag: f32;
    if e == 0u {
        // Zero and subnormals: m · 2⁻²⁴, exact in f32.
        mag = f32(m) * 5.9604645e-8;
    } else if e == 31u {
        // Infinities and NaNs.
        mag = bitcast<f32>(0x7f800000u | (m << 13u));
    } else {
        // Rebias the exponent (15 → 127), widen the mantissa (10 → 23 bits).
        mag = bitcast<f32>(((e + 112u) << 23u) | (m << 13u));
    }
    return select(mag, -mag, (h & 0x8000u) != 0u);
}

fn f16x2(v: u32) -> vec2<f32> {
    return vec2<f32>(f16_widen(v & 0xffffu), f16_widen(v >> 16u));
}

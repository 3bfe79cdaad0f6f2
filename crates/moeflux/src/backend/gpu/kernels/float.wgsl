// F32, F16 and BF16 weights (FLOAT_BYTES: 4, 2, or 2 with BF16 true).
// Part q is columns 8q..8q + 8 of its unit.
fn part_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn weight(b: u32) -> f32 {
    if FLOAT_BYTES == 4u {
        return bitcast<f32>(wd(b >> 2u));
    }
    if BF16 {
        // bfloat16 is the top half of an f32: widening is exact.
        return bitcast<f32>(half_at(b) << 16u);
    }
    return f16_at(b);
}

fn part(r: u32, u: u32, q: u32) -> Part {
    let b = wb + r * p.row_bytes + (u * UNIT + 8u * q) * FLOAT_BYTES;
    let s = FLOAT_BYTES;
    return Part(
        vec4<f32>(weight(b), weight(b + s), weight(b + 2u * s), weight(b + 3u * s)),
        vec4<f32>(weight(b + 4u * s), weight(b + 5u * s), weight(b + 6u * s), weight(b + 7u * s)),
    );
}

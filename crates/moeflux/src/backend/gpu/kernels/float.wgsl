// F32, F16 and BF16 weights (FLOAT_BYTES: 4, 2, or 2 with BF16 true): a
// unit is 8 columns; the last unit of a row may be partial.
const UNIT: u32 = 8u;

fn weight(b: u32) -> f32 {
    if FLOAT_BYTES == 4u {
        return bitcast<f32>(w[b >> 2u]);
    }
    if BF16 {
        // bfloat16 is the top half of an f32: widening is exact.
        return bitcast<f32>(half_at(b) << 16u);
    }
    return f16_at(b);
}

fn unit_dot(r: u32, u: u32) -> vec4<f32> {
    let b = r * p.row_bytes;
    var s = vec4<f32>(0.0);
    for (var k = 0u; k < UNIT; k++) {
        let c = u * UNIT + k;
        if c < p.cols {
            s += weight(b + c * FLOAT_BYTES) * xv(c);
        }
    }
    return s;
}

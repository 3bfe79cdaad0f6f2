// MLX affine (BITS = 4 or 8): weights packed in little-endian u32 words,
// element j of a word in bits [j·BITS, (j+1)·BITS); per group of p.group
// columns one scale and one bias (bf16, or f16 when p.scale_f16 is 1), in
// their own arrays; w = q · scale + bias. A unit is 32 columns, which lie in
// one group (the group size is a multiple of 32).
@group(0) @binding(4) var<storage, read> scales: array<u32>;
@group(0) @binding(5) var<storage, read> biases: array<u32>;

const UNIT: u32 = 32u;
const PER_WORD: u32 = 32u / BITS;

// Element i of a scale or bias array of 16-bit values.
fn scale_at(a: u32, i: u32) -> f32 {
    let bits = (a >> (16u * (i & 1u))) & 0xffffu;
    if p.scale_f16 == 1u {
        return f16x2(bits).x;
    }
    return bitcast<f32>(bits << 16u);
}

fn unit_dot(r: u32, u: u32) -> vec4<f32> {
    // Element index of the unit's first weight within this part.
    let e = r * p.cols + u * 32u;
    let g = e / p.group;
    let sc = scale_at(scales[g >> 1u], g);
    let bi = scale_at(biases[g >> 1u], g);
    let c = u * 32u;
    var sq = vec4<f32>(0.0);
    var sx = vec4<f32>(0.0);
    // A unit is BITS words of PER_WORD weights.
    for (var k = 0u; k < BITS; k++) {
        let word = w[e / PER_WORD + k];
        for (var j = 0u; j < PER_WORD; j++) {
            let q = f32((word >> (j * BITS)) & ((1u << BITS) - 1u));
            let xc = xv(c + k * PER_WORD + j);
            sq += q * xc;
            sx += xc;
        }
    }
    return sc * sq + bi * sx;
}

// MLX affine (BITS = 4 or 8): weights packed in little-endian u32 words,
// element j of a word in bits [j·BITS, (j+1)·BITS); per group of p.group
// columns one scale and one bias (bf16, or f16 when p.scale_f16 is 1), in
// their own arrays; w = q · scale + bias. A unit is 32 columns, which lie in
// one group (the group size is a multiple of 32); part q is columns
// 8q..8q + 8 of it. Offsets wb (bytes), sb and bb (words) locate the
// matrix's arrays (expert batches; each starts on a word boundary).
@group(0) @binding(4) var<storage, read> scales: array<u32>;
@group(0) @binding(5) var<storage, read> biases: array<u32>;

// Element i of a scale or bias array of 16-bit values.
fn scale_at(a: u32, i: u32) -> f32 {
    let bits = (a >> (16u * (i & 1u))) & 0xffffu;
    if p.scale_f16 == 1u {
        return f16x2(bits).x;
    }
    return bitcast<f32>(bits << 16u);
}

fn part_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn part(r: u32, u: u32, q: u32) -> Part {
    // Element index of the part's first weight within this matrix part.
    let e = r * p.cols + u * UNIT + 8u * q;
    let g = e / p.group;
    let sc = scale_at(scales[sb + (g >> 1u)], g);
    let bi = scale_at(biases[bb + (g >> 1u)], g);
    var lo: vec4<f32>;
    var hi: vec4<f32>;
    if BITS == 4u {
        let v = wd((wb >> 2u) + e / 8u);
        lo = vec4<f32>(f32(v & 15u), f32((v >> 4u) & 15u), f32((v >> 8u) & 15u), f32((v >> 12u) & 15u));
        hi = vec4<f32>(f32((v >> 16u) & 15u), f32((v >> 20u) & 15u), f32((v >> 24u) & 15u), f32(v >> 28u));
    } else {
        let i = (wb >> 2u) + e / 4u;
        lo = vec4<f32>(unpack4xU8(wd(i)));
        hi = vec4<f32>(unpack4xU8(wd(i + 1u)));
    }
    return Part(lo * sc + bi, hi * sc + bi);
}

// Q8_0: 34-byte blocks of 32 weights: d: f16, q: [i8; 32]; w = d · q.
// Part q is columns 8q..8q + 8.
fn part_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn part(r: u32, u: u32, q: u32) -> Part {
    let b = wb + r * p.row_bytes + u * 34u;
    let d = f16_at(b);
    let o = b + 2u + 8u * q;
    return Part(
        vec4<f32>(unpack4xI8(word_at(o))) * d,
        vec4<f32>(unpack4xI8(word_at(o + 4u))) * d,
    );
}

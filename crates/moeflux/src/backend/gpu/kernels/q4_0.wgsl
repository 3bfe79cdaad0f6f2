// Q4_0: 18-byte blocks of 32 weights: d: f16, qs: [u8; 16]; weight j < 16
// is the low nibble of qs[j], weight j + 16 its high nibble; w = d · (q − 8).
// Part q is qs[4q..4q + 4]: columns 4q.. (low nibbles) and 16 + 4q.. (high).
fn part_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(4u * q, 16u + 4u * q);
}

fn part(r: u32, u: u32, q: u32) -> Part {
    let b = wb + r * p.row_bytes + u * 18u;
    let v = word_at(b + 2u + 4u * q);
    let d = f16_at(b);
    // (q − 8) · d is exact in f32 (4 bits times an 11-bit mantissa).
    return Part(
        (vec4<f32>(unpack4xU8(v & 0x0f0f0f0fu)) - 8.0) * d,
        (vec4<f32>(unpack4xU8((v >> 4u) & 0x0f0f0f0fu)) - 8.0) * d,
    );
}

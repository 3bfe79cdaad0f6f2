// Q6_K: 210-byte super-blocks of 256 weights: ql: [u8; 128], qh: [u8; 64],
// scales: [i8; 16], d: f16. A unit is 32 weights i = 128h + 32j + l
// (unit v = 4h + j of the block): the low nibble is nibble j / 2 of
// ql[64h + 32 (j % 2) + l], the two high bits are bits 2j..2j+2 of
// qh[32h + l]; w = d · scale[i / 16] · (q − 32). Part q is l = 8q..8q + 8
// (one scale: l < 16 for q < 2).
fn part_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn part(r: u32, u: u32, q: u32) -> Part {
    let b = wb + r * p.row_bytes + (u / 8u) * 210u;
    let v = u % 8u;
    let h = v / 4u;
    let j = v % 4u;
    let lo_b = b + 64u * h + 32u * (j % 2u) + 8u * q;
    let lo_shift = 4u * (j / 2u);
    let hi_b = b + 128u + 32u * h + 8u * q;
    let hi_shift = 2u * j;
    let sc = f32(extractBits(i32(byte_at(b + 192u + 8u * h + 2u * j + q / 2u)), 0u, 8u));
    let d = f16_at(b + 208u) * sc;
    let q0 = ((word_at(lo_b) >> lo_shift) & 0x0f0f0f0fu) | (((word_at(hi_b) >> hi_shift) & 0x03030303u) << 4u);
    let q1 = ((word_at(lo_b + 4u) >> lo_shift) & 0x0f0f0f0fu) | (((word_at(hi_b + 4u) >> hi_shift) & 0x03030303u) << 4u);
    return Part(
        (vec4<f32>(unpack4xU8(q0)) - 32.0) * d,
        (vec4<f32>(unpack4xU8(q1)) - 32.0) * d,
    );
}

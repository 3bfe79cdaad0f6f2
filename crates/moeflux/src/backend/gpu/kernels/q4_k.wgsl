// Q4_K: 144-byte super-blocks of 256 weights: d: f16, dmin: f16,
// scales: [u8; 12] (eight 6-bit scales and mins), qs: [u8; 128].
// A unit is sub-block s (32 weights): weight 32s + l is nibble s % 2 of
// qs[32 (s / 2) + l]; w = d · sc_s · q − dmin · m_s. Part q is columns
// 8q..8q + 8 of the sub-block. Super-blocks and their qs are word-aligned.
fn part_cols(q: u32) -> vec2<u32> {
    return vec2<u32>(8u * q, 8u * q + 4u);
}

fn part(r: u32, u: u32, q: u32) -> Part {
    let b = wb + r * p.row_bytes + (u / 8u) * 144u;
    let sb = u % 8u;
    // The 6-bit scale and min of sub-block sb (scales[j] is byte 4 + j of
    // the super-block): sub-blocks 0..4 in the low 6 bits of scales[sb]
    // and scales[sb + 4]; 4..8 in the nibbles of scales[sb + 4] plus the
    // top two bits of scales[sb − 4] and scales[sb]. With j = sb % 4, the
    // three words of scales shifted by 8j hold every byte needed, so both
    // cases are computed from three loads and one is selected (threads of
    // a warp take different sub-blocks: a branch here diverged).
    let at = 8u * (sb % 4u);
    let s0 = w[(b >> 2u) + 1u] >> at;
    let s1 = w[(b >> 2u) + 2u] >> at;
    let s2 = w[(b >> 2u) + 3u] >> at;
    let lo = sb < 4u;
    let sc = select((s2 & 0x0fu) | ((s0 >> 2u) & 0x30u), s0 & 63u, lo);
    let mn = select(((s2 >> 4u) & 0x0fu) | ((s1 >> 2u) & 0x30u), s1 & 63u, lo);
    let dw = f16x2(w[b >> 2u]);
    let a = dw.x * f32(sc);
    let m = dw.y * f32(mn);
    let shift = 4u * (sb % 2u);
    let qi = (b + 16u + 32u * (sb / 2u) + 8u * q) >> 2u;
    return Part(
        vec4<f32>(unpack4xU8((w[qi] >> shift) & 0x0f0f0f0fu)) * a - m,
        vec4<f32>(unpack4xU8((w[qi + 1u] >> shift) & 0x0f0f0f0fu)) * a - m,
    );
}

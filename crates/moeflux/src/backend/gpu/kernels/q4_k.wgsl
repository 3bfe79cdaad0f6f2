// Q4_K: 144-byte super-blocks of 256 weights: d: f16, dmin: f16,
// scales: [u8; 12] (eight 6-bit scales and mins), qs: [u8; 128].
// A unit is sub-block s (32 weights): weight 32s + l is nibble s % 2 of
// qs[32 (s / 2) + l]; w = d · sc_s · q − dmin · m_s.
const UNIT: u32 = 32u;

fn unit_dot(r: u32, u: u32) -> vec4<f32> {
    let b = r * p.row_bytes + (u / 8u) * 144u;
    let sb = u % 8u;
    // The 6-bit scale and min of sub-block sb: sub-blocks 0..4 in the low
    // 6 bits of bytes sb and sb + 4; 4..8 in the nibbles of bytes 8..12
    // plus the top two bits of bytes 0..8.
    var sc: u32;
    var mn: u32;
    if sb < 4u {
        sc = byte_at(b + 4u + sb) & 63u;
        mn = byte_at(b + 8u + sb) & 63u;
    } else {
        let e = byte_at(b + 8u + sb);
        sc = (e & 0x0fu) | ((byte_at(b + sb) >> 2u) & 0x30u);
        mn = (e >> 4u) | ((byte_at(b + 4u + sb) >> 2u) & 0x30u);
    }
    let shift = 4u * (sb % 2u);
    let qb = b + 16u + 32u * (sb / 2u);
    let c = u * 32u;
    var sq = vec4<f32>(0.0);
    var sx = vec4<f32>(0.0);
    for (var k = 0u; k < 8u; k++) {
        let q = vec4<f32>(unpack4xU8((word_at(qb + 4u * k) >> shift) & 0x0f0f0f0fu));
        let ck = c + 4u * k;
        let x0 = xv(ck);
        let x1 = xv(ck + 1u);
        let x2 = xv(ck + 2u);
        let x3 = xv(ck + 3u);
        sq += q.x * x0 + q.y * x1 + q.z * x2 + q.w * x3;
        sx += x0 + x1 + x2 + x3;
    }
    return (f16_at(b) * f32(sc)) * sq - (f16_at(b + 2u) * f32(mn)) * sx;
}

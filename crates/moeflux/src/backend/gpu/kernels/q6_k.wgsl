// Q6_K: 210-byte super-blocks of 256 weights: ql: [u8; 128], qh: [u8; 64],
// scales: [i8; 16], d: f16. A unit is 32 weights i = 128h + 32j + l
// (unit v = 4h + j of the block): the low nibble is nibble j / 2 of
// ql[64h + 32 (j % 2) + l], the two high bits are bits 2j..2j+2 of
// qh[32h + l]; w = d · scale[i / 16] · (q − 32).
const UNIT: u32 = 32u;

fn unit_dot(r: u32, u: u32) -> vec4<f32> {
    let b = r * p.row_bytes + (u / 8u) * 210u;
    let v = u % 8u;
    let h = v / 4u;
    let j = v % 4u;
    let lo_b = b + 64u * h + 32u * (j % 2u);
    let lo_shift = 4u * (j / 2u);
    let hi_b = b + 128u + 32u * h;
    let hi_shift = 2u * j;
    let c = u * 32u;
    // Weights l < 16 and l >= 16 have different scales.
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    for (var k = 0u; k < 8u; k++) {
        let lo = (word_at(lo_b + 4u * k) >> lo_shift) & 0x0f0f0f0fu;
        let hi = (word_at(hi_b + 4u * k) >> hi_shift) & 0x03030303u;
        let q = vec4<f32>(unpack4xU8(lo | (hi << 4u))) - 32.0;
        let ck = c + 4u * k;
        let t = q.x * xv(ck) + q.y * xv(ck + 1u) + q.z * xv(ck + 2u) + q.w * xv(ck + 3u);
        if k < 4u {
            s0 += t;
        } else {
            s1 += t;
        }
    }
    let si = b + 192u + 8u * h + 2u * j;
    let sc0 = f32(extractBits(i32(byte_at(si)), 0u, 8u));
    let sc1 = f32(extractBits(i32(byte_at(si + 1u)), 0u, 8u));
    return f16_at(b + 208u) * (sc0 * s0 + sc1 * s1);
}

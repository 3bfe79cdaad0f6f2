// Q4_0: 18-byte blocks of 32 weights: d: f16, qs: [u8; 16]; weight j < 16
// is the low nibble of qs[j], weight j + 16 its high nibble; w = d · (q − 8).
const UNIT: u32 = 32u;

fn unit_dot(r: u32, u: u32) -> vec4<f32> {
    let b = r * p.row_bytes + u * 18u;
    let c = u * 32u;
    var s = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        let q = word_at(b + 2u + 4u * k);
        let lo = vec4<f32>(unpack4xU8(q & 0x0f0f0f0fu)) - 8.0;
        let hi = vec4<f32>(unpack4xU8((q >> 4u) & 0x0f0f0f0fu)) - 8.0;
        let cl = c + 4u * k;
        let ch = cl + 16u;
        s += lo.x * xv(cl) + lo.y * xv(cl + 1u) + lo.z * xv(cl + 2u) + lo.w * xv(cl + 3u);
        s += hi.x * xv(ch) + hi.y * xv(ch + 1u) + hi.z * xv(ch + 2u) + hi.w * xv(ch + 3u);
    }
    return f16_at(b) * s;
}

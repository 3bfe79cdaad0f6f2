// Q8_0: 34-byte blocks of 32 weights: d: f16, q: [i8; 32]; w = d · q.
const UNIT: u32 = 32u;

fn unit_dot(r: u32, u: u32) -> vec4<f32> {
    let b = r * p.row_bytes + u * 34u;
    let c = u * 32u;
    var s = vec4<f32>(0.0);
    for (var k = 0u; k < 8u; k++) {
        let q = vec4<f32>(unpack4xI8(word_at(b + 2u + 4u * k)));
        let ck = c + 4u * k;
        s += q.x * xv(ck) + q.y * xv(ck + 1u) + q.z * xv(ck + 2u) + q.w * xv(ck + 3u);
    }
    return f16_at(b) * s;
}

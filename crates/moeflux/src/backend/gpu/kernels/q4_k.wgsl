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
    let s0 = wd((b >> 2u) + 1u) >> at;
    let s1 = wd((b >> 2u) + 2u) >> at;
    let s2 = wd((b >> 2u) + 3u) >> at;
    let lo = sb < 4u;
    let sc = select((s2 & 0x0fu) | ((s0 >> 2u) & 0x30u), s0 & 63u, lo);
    let mn = select(((s2 >> 4u) & 0x0fu) | ((s1 >> 2u) & 0x30u), s1 & 63u, lo);
    let dw = f16x2(wd(b >> 2u));
    let a = dw.x * f32(sc);
    let m = dw.y * f32(mn);
    let shift = 4u * (sb % 2u);
    let qi = (b + 16u + 32u * (sb / 2u) + 8u * q) >> 2u;
    return Part(
        vec4<f32>(unpack4xU8((wd(qi) >> shift) & 0x0f0f0f0fu)) * a - m,
        vec4<f32>(unpack4xU8((wd(qi + 1u) >> shift) & 0x0f0f0f0fu)) * a - m,
    );
}

// WIDE (one-token products, matmul.wgsl): a chunk is 32 weights read with
// one 16-byte load. Chunk c of a row is bytes 16h.. 16h + 16 of the 32
// bytes of qs shared by sub-blocks 2j and 2j + 1 of super-block c / 8
// (c % 8 = 2j + h): its low nibbles are columns 16h.. of sub-block 2j,
// its high nibbles the same columns of sub-block 2j + 1. The super-block's
// first 16 bytes (d, dmin, scales) are a second load, shared by its eight
// chunks' threads. Super-blocks start on 16 bytes: a row is a multiple of
// 144 bytes, and matrices (and experts' arrays) start on 16 bytes.

// The (vec4) column in a token row of chunk c's i-th four weights: its
// low nibbles' columns are four vec4s from `lo` (i < 4), its high
// nibbles' the four from `lo + 8`.
fn wide_col(c: u32, i: u32) -> u32 {
    let cc = c % 8u;
    let lo = (c / 8u) * 64u + (cc / 2u) * 16u + (cc % 2u) * 4u;
    return lo + i + 4u * (i / 4u);
}

// Σ w · x over chunk c of row r, xs[i] the activations at
// `wide_col(c, i)`: xs[0..4] its low nibbles', xs[4..8] its high
// nibbles'. Each sub-block's sum is d · sc · Σ q · x − dmin · m · Σ x
// (the weights' formula, factored).
fn wide_dot(r: u32, c: u32, xs: array<vec4<f32>, 8>) -> f32 {
    let b = (wb + r * p.row_bytes + (c / 8u) * 144u) >> 4u;
    let cc = c % 8u;
    let head = w4[b];
    let q = w4[b + 1u + cc];
    // Both sub-blocks' 6-bit scales and mins, 2j's in the low byte and
    // 2j + 1's in the next (the bytes `part` selects one at a time).
    let j = cc / 2u;
    let at = 16u * (j % 2u);
    let s0 = head.y >> at;
    let s1 = head.z >> at;
    let s2 = head.w >> at;
    let lo = j < 2u;
    let sc = select((s2 & 0x0f0fu) | ((s0 >> 2u) & 0x3030u), s0 & 0x3f3fu, lo);
    let mn = select(((s2 >> 4u) & 0x0f0fu) | ((s1 >> 2u) & 0x3030u), s1 & 0x3f3fu, lo);
    let dm = f16x2(head.x);
    let m4 = vec4<u32>(0x0f0f0f0fu);
    let ql = q & m4;
    let qh = (q >> vec4<u32>(4u)) & m4;
    let dl = dot(vec4<f32>(unpack4xU8(ql.x)), xs[0]) + dot(vec4<f32>(unpack4xU8(ql.y)), xs[1])
        + dot(vec4<f32>(unpack4xU8(ql.z)), xs[2]) + dot(vec4<f32>(unpack4xU8(ql.w)), xs[3]);
    let dh = dot(vec4<f32>(unpack4xU8(qh.x)), xs[4]) + dot(vec4<f32>(unpack4xU8(qh.y)), xs[5])
        + dot(vec4<f32>(unpack4xU8(qh.z)), xs[6]) + dot(vec4<f32>(unpack4xU8(qh.w)), xs[7]);
    let one = vec4<f32>(1.0);
    let sl = dot(xs[0] + xs[1] + xs[2] + xs[3], one);
    let sh = dot(xs[4] + xs[5] + xs[6] + xs[7], one);
    return dm.x * (f32(sc & 0xffu) * dl + f32(sc >> 8u) * dh)
        - dm.y * (f32(mn & 0xffu) * sl + f32(mn >> 8u) * sh);
}

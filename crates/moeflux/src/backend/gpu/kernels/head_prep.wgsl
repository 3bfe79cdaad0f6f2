// One head row of the q|k|v projection prepared for attention, shared by
// attention_prep.wgsl (every token) and attention.wgsl's PREP (a decode
// step), so both give the same bits: head row `src` (qkv_at(src..)) into
// prow[at..], RMS-normalised with norms[w0..] when `norm` and rotated
// (NEOX RoPE of the first 2 · p.half values, angles cs[cs0..]) when
// `rope`.
//
// Two phases, so that a kernel preparing several rows waits on memory
// once: `prep_load` copies a row and its norm weights (into pnorm[at..])
// and, with `angles`, the rotation's (cos, sin) pairs (into pcs) to shared
// memory; after a barrier, `prep_math` normalises and rotates in shared
// memory. The mean square is summed by the first PWG threads, dimension
// j, j + PWG, ... each (attention_prep's workgroup); threads past PWG add
// zeros, which change no bit. `prep_math` has barriers: uniform control
// flow only. The module provides p.head_dim, p.half, p.eps, norms, cs,
// qkv_at, prow, pnorm (covering every normalised row's region of prow),
// pcs (at least p.half pairs) and PWG.

fn prep_load(at: u32, src: u32, norm: bool, w0: u32, angles: bool, cs0: u32, lid: u32) {
    let hd = p.head_dim;
    for (var d = lid; d < hd; d += WG) {
        prow[at + d] = qkv_at(src + d);
        if norm {
            pnorm[at + d] = norms[w0 + d];
        }
    }
    if angles {
        for (var i = lid; i < p.half; i += WG) {
            pcs[i] = cs[cs0 + i];
        }
    }
}

fn prep_math(at: u32, norm: bool, rope: bool, lane: Lane) {
    let hd = p.head_dim;
    if norm {
        var ss = 0.0;
        if lane.lid < PWG {
            for (var d = lane.lid; d < hd; d += PWG) {
                ss += prow[at + d] * prow[at + d];
            }
        }
        let total = wg_sum4(vec4<f32>(ss, 0.0, 0.0, 0.0), lane).x;
        let scale = 1.0 / sqrt(total / f32(hd) + p.eps);
        for (var d = lane.lid; d < hd; d += WG) {
            prow[at + d] = prow[at + d] * scale * pnorm[at + d];
        }
        workgroupBarrier();
    }
    if rope {
        for (var i = lane.lid; i < p.half; i += WG) {
            let a = prow[at + i];
            let b = prow[at + i + p.half];
            let c = pcs[i];
            prow[at + i] = a * c.x - b * c.y;
            prow[at + i + p.half] = b * c.x + a * c.y;
        }
        workgroupBarrier();
    }
}

// One row, loaded and prepared.
fn prep_row(at: u32, src: u32, norm: bool, w0: u32, rope: bool, cs0: u32, lane: Lane) {
    prep_load(at, src, norm, w0, rope, cs0, lane.lid);
    workgroupBarrier();
    prep_math(at, norm, rope, lane);
}

// Workgroup reductions over shared memory: a tree of WG slots (WG is a
// power of two). Every thread gets the result. Call only from control flow
// that is uniform over the workgroup (they contain barriers).
//
// Both reduction files define the same functions (each file sums in its
// own order — a tree here, subgroups then slots in order there — and
// every function of a file in that one order):
// - wg_sum4, wg_max: one sum (maximum), ending with a barrier, so the
//   slots may be used again at once;
// - wg_sum4_last: the same without the closing barrier, for a kernel's
//   last reduction (no slot may be written after it);
// - wg_sum4x2_last: two sums in the barrier rounds of one, without the
//   closing barrier.

struct Lane {
    @builtin(local_invocation_index) lid: u32,
}

var<workgroup> red4: array<vec4<f32>, WG>;

var<workgroup> red4b: array<vec4<f32>, WG>;

struct Sum2 {
    a: vec4<f32>,
    b: vec4<f32>,
}

fn wg_sum4_last(v: vec4<f32>, lane: Lane) -> vec4<f32> {
    red4[lane.lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if lane.lid < s {
            red4[lane.lid] += red4[lane.lid + s];
        }
        workgroupBarrier();
    }
    return red4[0];
}

fn wg_sum4(v: vec4<f32>, lane: Lane) -> vec4<f32> {
    let r = wg_sum4_last(v, lane);
    // Nobody may overwrite slot 0 before every thread has read it.
    workgroupBarrier();
    return r;
}

fn wg_sum4x2_last(a: vec4<f32>, b: vec4<f32>, lane: Lane) -> Sum2 {
    red4[lane.lid] = a;
    red4b[lane.lid] = b;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if lane.lid < s {
            red4[lane.lid] += red4[lane.lid + s];
            red4b[lane.lid] += red4b[lane.lid + s];
        }
        workgroupBarrier();
    }
    return Sum2(red4[0], red4b[0]);
}

fn wg_max(v: f32, lane: Lane) -> f32 {
    red4[lane.lid].x = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if lane.lid < s {
            red4[lane.lid].x = max(red4[lane.lid].x, red4[lane.lid + s].x);
        }
        workgroupBarrier();
    }
    let r = red4[0].x;
    workgroupBarrier();
    return r;
}

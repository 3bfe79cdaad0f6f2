// Workgroup reductions over shared memory: a tree of WG slots (WG is a
// power of two). Every thread gets the result. Call only from control flow
// that is uniform over the workgroup (they contain barriers).

struct Lane {
    @builtin(local_invocation_index) lid: u32,
}

var<workgroup> red4: array<vec4<f32>, WG>;

fn wg_sum4(v: vec4<f32>, lane: Lane) -> vec4<f32> {
    red4[lane.lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if lane.lid < s {
            red4[lane.lid] += red4[lane.lid + s];
        }
        workgroupBarrier();
    }
    let r = red4[0];
    // Nobody may overwrite slot 0 before every thread has read it.
    workgroupBarrier();
    return r;
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

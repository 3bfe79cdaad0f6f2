// Workgroup reductions with subgroup operations: each subgroup reduces in
// registers, its first lane writes one shared slot, every thread then sums
// the slots in the same order. The subgroup size is whatever the adapter
// picked (wgpu guarantees at least 4, so WG / 4 slots suffice). Call only
// from control flow that is uniform over the workgroup.

struct Lane {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) n_sg: u32,
}

var<workgroup> red4: array<vec4<f32>, WG / 4u>;

var<workgroup> red4b: array<vec4<f32>, WG / 4u>;

// Two sums (see reduce_shared.wgsl).
struct Sum2 {
    a: vec4<f32>,
    b: vec4<f32>,
}

fn wg_sum4_last(v: vec4<f32>, lane: Lane) -> vec4<f32> {
    let s = subgroupAdd(v);
    if lane.sg_lane == 0u {
        red4[lane.sg_id] = s;
    }
    workgroupBarrier();
    var r = vec4<f32>(0.0);
    for (var i = 0u; i < lane.n_sg; i++) {
        r += red4[i];
    }
    return r;
}

fn wg_sum4(v: vec4<f32>, lane: Lane) -> vec4<f32> {
    let r = wg_sum4_last(v, lane);
    // Nobody may overwrite a slot before every thread has read them all.
    workgroupBarrier();
    return r;
}

fn wg_sum4x2_last(a: vec4<f32>, b: vec4<f32>, lane: Lane) -> Sum2 {
    let sa = subgroupAdd(a);
    let sb = subgroupAdd(b);
    if lane.sg_lane == 0u {
        red4[lane.sg_id] = sa;
        red4b[lane.sg_id] = sb;
    }
    workgroupBarrier();
    var r = Sum2(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var i = 0u; i < lane.n_sg; i++) {
        r.a += red4[i];
        r.b += red4b[i];
    }
    return r;
}

fn wg_max(v: f32, lane: Lane) -> f32 {
    let s = subgroupMax(v);
    if lane.sg_lane == 0u {
        red4[lane.sg_id].x = s;
    }
    workgroupBarrier();
    var r = red4[0].x;
    for (var i = 1u; i < lane.n_sg; i++) {
        r = max(r, red4[i].x);
    }
    workgroupBarrier();
    return r;
}

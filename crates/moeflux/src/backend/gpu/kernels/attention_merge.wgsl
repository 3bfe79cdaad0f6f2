// The spans of an attention call merged by a dispatch of their own (see
// merge.wgsl), one workgroup per (head, query): where the attention
// workgroups do not merge them themselves (attention.wgsl, MERGE).

struct Params {
    n_heads: u32,
    head_dim: u32,
    spans: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

var<workgroup> sp: array<f32, 2u * MAX_SPANS>;

fn part_at(i: u32) -> f32 {
    return part[i];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    merge_spans(wg.x, wg.y, lid);
}

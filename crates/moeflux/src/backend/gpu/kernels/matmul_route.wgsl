// ROUTE (matmul.wgsl): the router product's last workgroup to finish
// (arrive.wgsl, count 0) routes the token (route.wgsl) from the logits
// every workgroup stored, as moe_route.wgsl would (the same workgroup
// size, so the same sums). One token; the host binds the whole router
// (one part, row0 = 0, y_stride = rows = the layer's experts).

fn logit_at(i: u32) -> f32 {
    return y_at(i);
}

// Every expert ranked against every other (route.wgsl). The candidates'
// way (moe_route.wgsl) needs ~5 KiB more shared memory; a variant with 2
// KiB more made this module, and the products beside it, slower on an
// H200 (bench/BENCHMARKS.md, nineteenth GPU session).
fn rank_top_k(k: u32, ne: u32, lane: Lane) {
    rank_all(k, ne, lane);
}

// Called by every workgroup that computed rows, after its stores. Its
// last reduction left shared slots to be read (`wg_sum4x2_last`, the
// product's sums beside the norm's squares):
// `last_to_arrive` begins with a barrier of the whole workgroup, so the
// routing may write them again.
//
// The same bits as the router product and moe_route.wgsl apart where the
// driver gives these pipelines one subgroup size (as attention.wgsl
// says for its prep: NVIDIA and lavapipe do; AMD and Intel may choose per
// pipeline).
fn route_after(lane: Lane) {
    if last_to_arrive(0u, (p.rows + GROUP_ROWS - 1u) / GROUP_ROWS, lane.lid) {
        let r = Route(p.rows, p.k, p.norm, p.first, p.stride, 1u, 1u, p.gate, p.up, p.down);
        route_token(r, 0u, lane);
    }
}

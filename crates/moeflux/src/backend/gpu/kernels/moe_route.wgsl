// MoE routing on the GPU in a dispatch of its own (route.wgsl), one
// workgroup per token (wg.x): for the host to read back (a streamed
// layer), for prompts, and where the router product does not route
// itself (matmul.wgsl, ROUTE).

// The parameters are route.wgsl's `Route` (as a uniform, its vec4s start
// at byte 32: two unused words after `jobs`).
@group(0) @binding(0) var<uniform> p: Route;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> choice: array<u32>;
@group(0) @binding(3) var<storage, read_write> jobs: array<u32>;
@group(0) @binding(4) var<storage, read_write> rows: array<u32>;
@group(0) @binding(5) var<storage, read_write> weights: array<f32>;

fn logit_at(i: u32) -> f32 {
    return logits[i];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, lane: Lane) {
    route_token(p, wg.x, lane);
}

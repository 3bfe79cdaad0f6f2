// The last workgroup of a dispatch (or of a group of its workgroups)
// finishing the group's work, so that no second dispatch has to: the
// attention spans' merge (attention.wgsl) and the routing after the
// router product (matmul.wgsl, ROUTE). On an H100 a dependent dispatch
// costs more than such a kernel's own work.
//
// Each workgroup stores its results (through atomics: they are coherent
// across workgroups, which plain loads and stores need not be), then
// passes a storage barrier — naga makes it a device-scope acquire-release
// barrier in SPIR-V and HLSL (not in MSL, hence the host's
// `device_scope_barrier`) — and counts itself in `counts[c]` (declared by
// the includer, an atomic<u32> array). The one that sees total − 1 before
// it resets the count to zero for the next dispatch, passes a second
// barrier and may read every result. No workgroup waits for another, so
// this needs no forward-progress guarantee.

var<workgroup> arrived_last: u32;

// Whether this workgroup is the last of `total` to arrive at count `c`.
// Call from uniform control flow, after every store the last one reads.
fn last_to_arrive(c: u32, total: u32, lid: u32) -> bool {
    // Released: this workgroup's stores come before its count.
    storageBarrier();
    if lid == 0u {
        let last = atomicAdd(&counts[c], 1u) == total - 1u;
        if last {
            atomicStore(&counts[c], 0u);
        }
        arrived_last = select(0u, 1u, last);
    }
    let last = workgroupUniformLoad(&arrived_last) == 1u;
    if last {
        // Acquired: every counted workgroup's stores are visible.
        storageBarrier();
    }
    return last;
}

// qlinear: the row reduction of rowquant.wgsl with subgroup operations (adapters with
// the subgroups feature).
//
// Each subgroup takes its maximum (and min and max keys) at once, and one invocation of
// it (its smallest local_invocation_index, taken over the active invocations: unique)
// folds them into the workgroup atomics. Every invocation is in exactly one subgroup,
// so the row's result is the same whatever the subgroup size or the mapping of
// invocations to subgroups, neither of which WebGPU promises. The subgroup builtins run
// in uniform control flow (SCHEME is an override constant), as Tint requires.

fn reduce_row(tid: u32, m: u32, kmin: u32, kmax: u32) {
    let hi = subgroupMax(m);
    var lo_key = kmin;
    var hi_key = kmax;
    if (SCHEME == DYNAMIC_ASYM) {
        lo_key = subgroupMin(kmin);
        hi_key = subgroupMax(kmax);
    }
    if (subgroupMin(tid) == tid) {
        atomicMax(&red, hi);
        if (SCHEME == DYNAMIC_ASYM) {
            atomicMin(&red_min, lo_key);
            atomicMax(&red_max, hi_key);
        }
    }
}

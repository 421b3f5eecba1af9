// qlinear: the K reduction of gemv.wgsl with subgroup operations (adapters with the
// subgroups feature).
//
// WebGPU promises neither a subgroup size nor which invocations share a subgroup, so
// nothing here assumes either. Each subgroup sums its invocations' vec4 at once
// (subgroupAdd), and asks whether all of them work on one column (min c == max c). If
// so, one of them (its smallest local_invocation_index: unique, and active, since it
// is taken over the active invocations) adds that sum into the column's
// workgroup-memory sum; if the subgroup mixes columns, each invocation adds its own
// vec4 instead. Either way each invocation's partial sums reach its own column's sum
// exactly once, whether a column spans one subgroup, several, or shares one with other
// columns, and integer addition (wrapping, in WGSL) gives the same sum in any order.
// The subgroup builtins run unconditionally, in uniform control flow, as Tint's
// subgroup uniformity analysis requires; only the atomic adds depend on their results.

var<workgroup> sums: array<atomic<i32>, 16u * CG>;

fn reduce_rows(g: u32, tid: u32, kl: u32, c: u32, v: vec4<i32>) {
    if (g == 0u) {
        for (var i = tid; i < 16u * CG; i = i + KL * CG) {
            atomicStore(&sums[i], 0);
        }
        workgroupBarrier();
    }
    let s = subgroupAdd(v);
    let one_column = subgroupMin(c) == subgroupMax(c);
    let lead = subgroupMin(tid) == tid;
    if (lead || !one_column) {
        let t = select(v, s, one_column);
        for (var j = 0u; j < 4u; j = j + 1u) {
            if (g * 4u + j < MROWS) {
                atomicAdd(&sums[(g * 4u + j) * CG + c], t[j]);
            }
        }
    }
    workgroupBarrier();
}

fn row_sum(m: u32, c: u32) -> i32 {
    return atomicLoad(&sums[m * CG + c]);
}

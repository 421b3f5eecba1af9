// qlinear: the row reduction of rowquant.wgsl through workgroup atomics (every adapter).

// Fold invocation tid's |x| bit maximum m (and, for dynamic_asym, its min and max order
// keys) into the row's.
fn reduce_row(tid: u32, m: u32, kmin: u32, kmax: u32) {
    atomicMax(&red, m);
    if (SCHEME == DYNAMIC_ASYM) {
        atomicMin(&red_min, kmin);
        atomicMax(&red_max, kmax);
    }
}

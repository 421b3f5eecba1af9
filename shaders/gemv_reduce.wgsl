// qlinear: the K reduction of gemv.wgsl through workgroup memory (every adapter).

var<workgroup> part: array<vec4<i32>, KL * CG>;
var<workgroup> sums: array<i32, 16u * CG>;

// Every invocation (kl, c) parks its partial sums v of rows 4g..4g+3 of column c, then
// invocation kl of each column adds the KL partial sums of rows 4g + kl, 4g + kl + KL, ...
// (one row each where KL >= 4; all four where KL is 1).
fn reduce_rows(g: u32, tid: u32, kl: u32, c: u32, v: vec4<i32>) {
    part[c * KL + kl] = v;
    workgroupBarrier();
    for (var r = kl; r < 4u && g * 4u + r < MROWS; r = r + KL) {
        var t = 0;
        for (var j = 0u; j < KL; j = j + 1u) {
            t = t + part[c * KL + j][r];
        }
        sums[(g * 4u + r) * CG + c] = t;
    }
    workgroupBarrier();
}

fn row_sum(m: u32, c: u32) -> i32 {
    return sums[m * CG + c];
}

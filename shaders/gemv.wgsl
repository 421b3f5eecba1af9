// qlinear: the small-M (decode, M <= 16) GEMM. Decode is bound by the weight read,
// so each weight word is read once: a workgroup owns CG columns, KL invocations
// share the K range of each column, and every weight word loaded is used for all M
// rows while the M activation rows (a few KiB) stay in cache. The KL per-invocation
// int32 sums of a column are added up by reduce_rows (integer adds: exact in any
// order), then the epilogue stores pairs of columns.
//
// The reduction is composed in from one of two files, which both define
// reduce_rows(g, tid, kl, c, v) (every invocation calls it for each group of four rows
// g with 4g < MROWS, in uniform control flow; the sums are complete when the last call
// returns) and row_sum(m, c) (the K sum of row m, column c of the workgroup):
// gemv_reduce.wgsl through workgroup memory, gemv_reduce_sg.wgsl with subgroup
// operations where the adapter has them.
//
// The M rows are accumulated in four vec4 registers, written out row by row under
// constant MROWS guards rather than as an indexed array, so that no compiler has a
// reason to put them in memory.
//
// STRATEGY 0: dot4I8Packed. STRATEGY 1: unpack to f32 and multiply-add, moving the
// f32 sums into int32 every 256 words (see gemm_f32.wgsl for why that is exact).

override KL: u32 = 32u;
override CG: u32 = 8u;       // even
override MROWS: u32 = 1u;    // M of the plan, 1..16
override STRATEGY: u32 = 0u;
const CHUNK_WORDS: u32 = 256u;

// dot4I8Packed of activation row m, word w with b; 0 past MROWS.
fn ip4(m: u32, w: u32, b: u32) -> i32 {
    if (m < MROWS) {
        return dot4I8Packed(act[p.a_base + m * p.kw + w], b);
    }
    return 0;
}

fn rows4(m0: u32, w: u32, b: u32) -> vec4<i32> {
    return vec4<i32>(ip4(m0, w, b), ip4(m0 + 1u, w, b), ip4(m0 + 2u, w, b), ip4(m0 + 3u, w, b));
}

// The same inner products as f32 (exact integers).
fn fp4(m: u32, w: u32, b: vec4<f32>) -> f32 {
    if (m < MROWS) {
        return dot(vec4<f32>(unpack4xI8(act[p.a_base + m * p.kw + w])), b);
    }
    return 0.0;
}

fn frows4(m0: u32, w: u32, b: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(fp4(m0, w, b), fp4(m0 + 1u, w, b), fp4(m0 + 2u, w, b), fp4(m0 + 3u, w, b));
}

// One-dimensional, K lane kl of column c being invocation c * KL + kl: implementations
// that form subgroups along x only (lavapipe) then group invocations as the others do,
// by that index.
@compute @workgroup_size(KL * CG)
fn main(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let kl = tid % KL;
    let c = tid / KL;
    let col0 = wid.x * CG;
    let col = col0 + c;
    var acc0 = vec4<i32>(0);
    var acc1 = vec4<i32>(0);
    var acc2 = vec4<i32>(0);
    var acc3 = vec4<i32>(0);
    if (col < p.n) {
        let brow = p.b_base + col * p.kw;
        if (STRATEGY == 0u) {
            for (var w = kl; w < p.kw; w = w + KL) {
                let b = wt[brow + w];
                acc0 = acc0 + rows4(0u, w, b);
                if (MROWS > 4u) {
                    acc1 = acc1 + rows4(4u, w, b);
                }
                if (MROWS > 8u) {
                    acc2 = acc2 + rows4(8u, w, b);
                    acc3 = acc3 + rows4(12u, w, b);
                }
            }
        } else {
            var w = kl;
            while (w < p.kw) {
                var f0 = vec4<f32>(0.0);
                var f1 = vec4<f32>(0.0);
                var f2 = vec4<f32>(0.0);
                var f3 = vec4<f32>(0.0);
                for (var it = 0u; it < CHUNK_WORDS && w < p.kw; it = it + 1u) {
                    let b = vec4<f32>(unpack4xI8(wt[brow + w]));
                    f0 = f0 + frows4(0u, w, b);
                    if (MROWS > 4u) {
                        f1 = f1 + frows4(4u, w, b);
                    }
                    if (MROWS > 8u) {
                        f2 = f2 + frows4(8u, w, b);
                        f3 = f3 + frows4(12u, w, b);
                    }
                    w = w + KL;
                }
                acc0 = acc0 + vec4<i32>(f0);
                acc1 = acc1 + vec4<i32>(f1);
                acc2 = acc2 + vec4<i32>(f2);
                acc3 = acc3 + vec4<i32>(f3);
            }
        }
    }
    // Four rows per round.
    for (var g = 0u; g < 4u; g = g + 1u) {
        if (g * 4u < MROWS) {
            var v = acc0;
            if (g == 1u) {
                v = acc1;
            } else if (g == 2u) {
                v = acc2;
            } else if (g == 3u) {
                v = acc3;
            }
            reduce_rows(g, tid, kl, c, v);
        }
    }
    let pairs = CG / 2u;
    for (var i = tid; i < min(MROWS, p.m) * pairs; i = i + KL * CG) {
        let m = i / pairs;
        let cp = (i % pairs) * 2u;
        let cc = col0 + cp;
        if (cc < p.n) {
            let two = cc + 1u < p.n;
            store_pair(m, cc, row_scale(m), col_params(cc), col_params(min(cc + 1u, p.n - 1u)),
                       row_sum(m, cp), row_sum(m, cp + 1u), two);
        }
    }
}

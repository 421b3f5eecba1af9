// qlinear: the small-M (decode, M <= 16) GEMM. Decode is bound by the weight read,
// so each weight word is read once: a workgroup owns CG columns, KL invocations
// share the K range of each column, and every weight word loaded is used for all M
// rows while the M activation rows (a few KiB) stay in cache. Per-invocation sums
// are combined with integer atomics in workgroup memory (exact, order-free), then
// the epilogue stores pairs of columns.
//
// STRATEGY 0: dot4I8Packed. STRATEGY 1: unpack to f32 and multiply-add, moving the
// f32 sums into int32 every 256 words (see gemm_f32.wgsl for why that is exact).

override KL: u32 = 32u;
override CG: u32 = 8u;       // even
override MROWS: u32 = 1u;    // M of the plan, <= MMAX
override STRATEGY: u32 = 0u;
const MMAX: u32 = 16u;
const CHUNK_WORDS: u32 = 256u;

var<workgroup> sums: array<atomic<i32>, MMAX * CG>;

@compute @workgroup_size(KL, CG)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let kl = lid.x;
    let c = lid.y;
    let tid = c * KL + kl;
    let col0 = wid.x * CG;
    for (var i = tid; i < MROWS * CG; i = i + KL * CG) {
        atomicStore(&sums[i], 0);
    }
    workgroupBarrier();
    let col = col0 + c;
    if (col < p.n) {
        var acc: array<i32, MMAX>;
        let brow = p.b_base + col * p.kw;
        if (STRATEGY == 0u) {
            for (var w = kl; w < p.kw; w = w + KL) {
                let b = wt[brow + w];
                for (var m = 0u; m < MROWS; m = m + 1u) {
                    acc[m] = acc[m] + dot4I8Packed(act[p.a_base + m * p.kw + w], b);
                }
            }
        } else {
            var w = kl;
            while (w < p.kw) {
                var accf: array<f32, MMAX>;
                for (var it = 0u; it < CHUNK_WORDS && w < p.kw; it = it + 1u) {
                    let b = vec4<f32>(unpack4xI8(wt[brow + w]));
                    for (var m = 0u; m < MROWS; m = m + 1u) {
                        accf[m] = accf[m] + dot(vec4<f32>(unpack4xI8(act[p.a_base + m * p.kw + w])), b);
                    }
                    w = w + KL;
                }
                for (var m = 0u; m < MROWS; m = m + 1u) {
                    acc[m] = acc[m] + i32(accf[m]);
                }
            }
        }
        for (var m = 0u; m < MROWS; m = m + 1u) {
            atomicAdd(&sums[m * CG + c], acc[m]);
        }
    }
    workgroupBarrier();
    let pairs = CG / 2u;
    for (var i = tid; i < min(MROWS, p.m) * pairs; i = i + KL * CG) {
        let m = i / pairs;
        let cp = (i % pairs) * 2u;
        let cc = col0 + cp;
        if (cc < p.n) {
            store_pair(m, cc, atomicLoad(&sums[m * CG + cp]), atomicLoad(&sums[m * CG + cp + 1u]),
                       cc + 1u < p.n);
        }
    }
}

// qlinear: tiled int8 GEMM on dot4I8Packed, dequant + bias epilogue fused.
//
// A workgroup computes a BM x BN block of y; each invocation a 4 x 4 register tile
// of int32 accumulators (rows 4*ty.., columns 4*tx..). K advances BK packed words
// (4*BK int8) at a time through workgroup-memory tiles stored k-major as vec4<u32>
// (four rows, or four columns, of one word), so the inner loop reads one vec4 of A
// and one of B per word and issues 16 dot4I8Packed. int32 accumulation is exact:
// the plan bounds K so that no sum can overflow.

override BM: u32 = 64u;
override BN: u32 = 64u;
override BK: u32 = 8u;
override WGX: u32 = 16u;  // BN / 4
override WGY: u32 = 16u;  // BM / 4

var<workgroup> As: array<vec4<u32>, BK * BM / 4u>;
var<workgroup> Bs: array<vec4<u32>, BK * BN / 4u>;

fn dot4x4(a: u32, b: vec4<u32>) -> vec4<i32> {
    return vec4<i32>(dot4I8Packed(a, b.x), dot4I8Packed(a, b.y), dot4I8Packed(a, b.z),
                     dot4I8Packed(a, b.w));
}

@compute @workgroup_size(WGX, WGY)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * WGX + tx;
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    // Four named registers rather than an array: an array indexed in a loop that a
    // compiler does not unroll may be kept in memory, slowing every multiply-add
    // (on lavapipe the named form measured faster).
    var acc0 = vec4<i32>(0);
    var acc1 = vec4<i32>(0);
    var acc2 = vec4<i32>(0);
    var acc3 = vec4<i32>(0);
    for (var k0 = 0u; k0 < p.kw; k0 = k0 + BK) {
        for (var e = tid; e < BM * BK; e = e + WGX * WGY) {
            let r = e / BK;
            let kk = e % BK;
            var v = 0u;
            if (row0 + r < p.m && k0 + kk < p.kw) {
                v = act[p.a_base + (row0 + r) * p.kw + k0 + kk];
            }
            As[kk * (BM / 4u) + r / 4u][r % 4u] = v;
        }
        for (var e = tid; e < BN * BK; e = e + WGX * WGY) {
            let c = e / BK;
            let kk = e % BK;
            var v = 0u;
            if (col0 + c < p.n && k0 + kk < p.kw) {
                v = wt[p.b_base + (col0 + c) * p.kw + k0 + kk];
            }
            Bs[kk * (BN / 4u) + c / 4u][c % 4u] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk = kk + 1u) {
            let a = As[kk * (BM / 4u) + ty];
            let b = Bs[kk * (BN / 4u) + tx];
            acc0 = acc0 + dot4x4(a.x, b);
            acc1 = acc1 + dot4x4(a.y, b);
            acc2 = acc2 + dot4x4(a.z, b);
            acc3 = acc3 + dot4x4(a.w, b);
        }
        workgroupBarrier();
    }
    store_tile(row0 + ty * 4u, col0 + tx * 4u, acc0, acc1, acc2, acc3);
}

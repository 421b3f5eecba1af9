// qlinear: tiled int8 GEMM on dot4I8Packed, dequant + bias epilogue fused.
//
// A workgroup computes a BM x BN block of y; each invocation a register tile of
// int32 accumulators: 4 x 4 (entry point tile4x4: rows 4*ty.., columns 4*tx..) or
// 8 x 8 (tile8x8, for GPUs: twice the multiply-adds per byte read from workgroup
// memory, whose bandwidth bounds the 4 x 4 tile). K advances BK packed words (4*BK
// int8) at a time through workgroup-memory tiles stored k-major as vec4<u32> (four
// rows, or four columns, of one word), so per word the 4 x 4 loop reads one vec4 of
// A and one of B and issues 16 dot4I8Packed, the 8 x 8 loop two and two for 64.
// int32 accumulation is exact: the plan bounds K so that no sum can overflow.
//
// The blocking and the tile loads are gemm_tiles.wgsl's; WGX = BN / tile width,
// WGY = BM / tile height.

var<workgroup> As: array<vec4<u32>, BK * BM / 4u>;
var<workgroup> Bs: array<vec4<u32>, BK * BN / 4u>;

fn dot4x4(a: u32, b: vec4<u32>) -> vec4<i32> {
    return vec4<i32>(dot4I8Packed(a, b.x), dot4I8Packed(a, b.y), dot4I8Packed(a, b.z),
                     dot4I8Packed(a, b.w));
}

// Words stay packed, k-major: vec4 kk * (BM / 4) + r / 4 holds word kk of rows 4(r/4)..+3.
fn stage_a(r: u32, kk: u32, v: u32) {
    As[kk * (BM / 4u) + r / 4u][r % 4u] = v;
}

fn stage_b(c: u32, kk: u32, v: u32) {
    Bs[kk * (BN / 4u) + c / 4u][c % 4u] = v;
}

@compute @workgroup_size(WGX, WGY)
fn tile4x4(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
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
        load_tiles(tid, row0, col0, k0);
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

fn store_row8(row: u32, c0: u32, s: u32, wb0: array<vec2<u32>, 4>, wb1: array<vec2<u32>, 4>,
              v0: vec4<i32>, v1: vec4<i32>) {
    if (row < p.m) {
        store_quad(row, c0, s, wb0, v0);
        store_quad(row, c0 + 4u, s, wb1, v1);
    }
}

@compute @workgroup_size(WGX, WGY)
fn tile8x8(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * WGX + tx;
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    // cRJ: row R of the tile, columns 4J..4J+3. Named registers: see tile4x4.
    var c00 = vec4<i32>(0);
    var c01 = vec4<i32>(0);
    var c10 = vec4<i32>(0);
    var c11 = vec4<i32>(0);
    var c20 = vec4<i32>(0);
    var c21 = vec4<i32>(0);
    var c30 = vec4<i32>(0);
    var c31 = vec4<i32>(0);
    var c40 = vec4<i32>(0);
    var c41 = vec4<i32>(0);
    var c50 = vec4<i32>(0);
    var c51 = vec4<i32>(0);
    var c60 = vec4<i32>(0);
    var c61 = vec4<i32>(0);
    var c70 = vec4<i32>(0);
    var c71 = vec4<i32>(0);
    for (var k0 = 0u; k0 < p.kw; k0 = k0 + BK) {
        load_tiles(tid, row0, col0, k0);
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk = kk + 1u) {
            let a0 = As[kk * (BM / 4u) + ty * 2u];
            let a1 = As[kk * (BM / 4u) + ty * 2u + 1u];
            let b0 = Bs[kk * (BN / 4u) + tx * 2u];
            let b1 = Bs[kk * (BN / 4u) + tx * 2u + 1u];
            c00 = c00 + dot4x4(a0.x, b0);
            c01 = c01 + dot4x4(a0.x, b1);
            c10 = c10 + dot4x4(a0.y, b0);
            c11 = c11 + dot4x4(a0.y, b1);
            c20 = c20 + dot4x4(a0.z, b0);
            c21 = c21 + dot4x4(a0.z, b1);
            c30 = c30 + dot4x4(a0.w, b0);
            c31 = c31 + dot4x4(a0.w, b1);
            c40 = c40 + dot4x4(a1.x, b0);
            c41 = c41 + dot4x4(a1.x, b1);
            c50 = c50 + dot4x4(a1.y, b0);
            c51 = c51 + dot4x4(a1.y, b1);
            c60 = c60 + dot4x4(a1.z, b0);
            c61 = c61 + dot4x4(a1.z, b1);
            c70 = c70 + dot4x4(a1.w, b0);
            c71 = c71 + dot4x4(a1.w, b1);
        }
        workgroupBarrier();
    }
    let r = row0 + ty * 8u;
    let c = col0 + tx * 8u;
    if (c >= p.n) {
        return;
    }
    let wb0 = quad_params(c);
    let wb1 = quad_params(c + 4u);
    let last = min(r + 8u, p.m);
    store_row8(r, c, row_scale(min(r, last - 1u)), wb0, wb1, c00, c01);
    store_row8(r + 1u, c, row_scale(min(r + 1u, last - 1u)), wb0, wb1, c10, c11);
    store_row8(r + 2u, c, row_scale(min(r + 2u, last - 1u)), wb0, wb1, c20, c21);
    store_row8(r + 3u, c, row_scale(min(r + 3u, last - 1u)), wb0, wb1, c30, c31);
    store_row8(r + 4u, c, row_scale(min(r + 4u, last - 1u)), wb0, wb1, c40, c41);
    store_row8(r + 5u, c, row_scale(min(r + 5u, last - 1u)), wb0, wb1, c50, c51);
    store_row8(r + 6u, c, row_scale(min(r + 6u, last - 1u)), wb0, wb1, c60, c61);
    store_row8(r + 7u, c, row_scale(min(r + 7u, last - 1u)), wb0, wb1, c70, c71);
}

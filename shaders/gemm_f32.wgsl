// qlinear: tiled int8 GEMM with float multiply-adds, for adapters on which
// dot4I8Packed is emulated (naga lowers it to scalar code for Metal and GLSL).
//
// Same blocking and tile loads as gemm_dot4.wgsl's 4 x 4 tile (gemm_tiles.wgsl; here
// WGX = BN / 4, WGY = BM / 4), but each packed word is unpacked once, when it
// is staged into workgroup memory, to a vec4<f32>, and the register tile accumulates
// f32 dot products. Exactness: every product is an integer of magnitude <= 2^14, and
// the f32 accumulators are moved into int32 every 256 words (1024 products), so
// every partial sum is an integer of magnitude <= 2^24, held exactly by f32 in any
// summation order, FMA or not.

const CHUNK_WORDS: u32 = 256u;

var<workgroup> As: array<vec4<f32>, BK * BM>;
var<workgroup> Bs: array<vec4<f32>, BK * BN>;

// Words are unpacked as they are staged, so the inner loop does no unpacking.
fn stage_a(r: u32, kk: u32, v: u32) {
    As[kk * BM + r] = vec4<f32>(unpack4xI8(v));
}

fn stage_b(c: u32, kk: u32, v: u32) {
    Bs[kk * BN + c] = vec4<f32>(unpack4xI8(v));
}

@compute @workgroup_size(WGX, WGY)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * WGX + tx;
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    // Named registers rather than arrays: see gemm_dot4.wgsl.
    var acc0 = vec4<i32>(0);
    var acc1 = vec4<i32>(0);
    var acc2 = vec4<i32>(0);
    var acc3 = vec4<i32>(0);
    var f0 = vec4<f32>(0.0);
    var f1 = vec4<f32>(0.0);
    var f2 = vec4<f32>(0.0);
    var f3 = vec4<f32>(0.0);
    var done = 0u;  // words summed in f0..f3 since they were last moved into int32
    for (var k0 = 0u; k0 < p.kw; k0 = k0 + BK) {
        load_tiles(tid, row0, col0, k0);
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk = kk + 1u) {
            let b0 = Bs[kk * BN + tx * 4u];
            let b1 = Bs[kk * BN + tx * 4u + 1u];
            let b2 = Bs[kk * BN + tx * 4u + 2u];
            let b3 = Bs[kk * BN + tx * 4u + 3u];
            let a0 = As[kk * BM + ty * 4u];
            let a1 = As[kk * BM + ty * 4u + 1u];
            let a2 = As[kk * BM + ty * 4u + 2u];
            let a3 = As[kk * BM + ty * 4u + 3u];
            f0 = f0 + vec4<f32>(dot(a0, b0), dot(a0, b1), dot(a0, b2), dot(a0, b3));
            f1 = f1 + vec4<f32>(dot(a1, b0), dot(a1, b1), dot(a1, b2), dot(a1, b3));
            f2 = f2 + vec4<f32>(dot(a2, b0), dot(a2, b1), dot(a2, b2), dot(a2, b3));
            f3 = f3 + vec4<f32>(dot(a3, b0), dot(a3, b1), dot(a3, b2), dot(a3, b3));
        }
        done = done + BK;
        if (done >= CHUNK_WORDS) {
            acc0 = acc0 + vec4<i32>(f0);
            acc1 = acc1 + vec4<i32>(f1);
            acc2 = acc2 + vec4<i32>(f2);
            acc3 = acc3 + vec4<i32>(f3);
            f0 = vec4<f32>(0.0);
            f1 = vec4<f32>(0.0);
            f2 = vec4<f32>(0.0);
            f3 = vec4<f32>(0.0);
            done = 0u;
        }
        workgroupBarrier();
    }
    store_tile(row0 + ty * 4u, col0 + tx * 4u, acc0 + vec4<i32>(f0), acc1 + vec4<i32>(f1),
               acc2 + vec4<i32>(f2), acc3 + vec4<i32>(f3));
}

// qlinear: a plain f32 tiled matmul C[M, N] = A[M, K] @ B[K, N], the floating-point
// baseline that benchmarks compare the W8A8 plan with on the same adapter. Same
// blocking as gemm_dot4.wgsl's tile8x8: 128 x 128 blocks, 8 x 8 register tiles in
// named vec4 registers, BK-deep workgroup-memory tiles.

override BM: u32 = 128u;
override BN: u32 = 128u;
override BK: u32 = 8u;
override WGX: u32 = 16u;
override WGY: u32 = 16u;

struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read_write> c_out: array<f32>;
@group(0) @binding(1) var<storage, read_write> a_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> b_in: array<f32>;
@group(0) @binding(7) var<uniform> p: MatmulParams;

var<workgroup> As: array<vec4<f32>, BK * BM / 4u>;
var<workgroup> Bs: array<vec4<f32>, BK * BN / 4u>;

@compute @workgroup_size(WGX, WGY)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * WGX + tx;
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    var c00 = vec4<f32>(0.0);
    var c01 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0);
    var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0);
    var c21 = vec4<f32>(0.0);
    var c30 = vec4<f32>(0.0);
    var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0);
    var c41 = vec4<f32>(0.0);
    var c50 = vec4<f32>(0.0);
    var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0);
    var c61 = vec4<f32>(0.0);
    var c70 = vec4<f32>(0.0);
    var c71 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k; k0 = k0 + BK) {
        for (var e = tid; e < BM * BK; e = e + WGX * WGY) {
            let r = e / BK;
            let kk = e % BK;
            var v = 0.0;
            if (row0 + r < p.m && k0 + kk < p.k) {
                v = a_in[(row0 + r) * p.k + k0 + kk];
            }
            As[kk * (BM / 4u) + r / 4u][r % 4u] = v;
        }
        for (var e = tid; e < BN * BK; e = e + WGX * WGY) {
            let kk = e / BN;
            let c = e % BN;
            var v = 0.0;
            if (col0 + c < p.n && k0 + kk < p.k) {
                v = b_in[(k0 + kk) * p.n + col0 + c];
            }
            Bs[kk * (BN / 4u) + c / 4u][c % 4u] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk = kk + 1u) {
            let a0 = As[kk * (BM / 4u) + ty * 2u];
            let a1 = As[kk * (BM / 4u) + ty * 2u + 1u];
            let b0 = Bs[kk * (BN / 4u) + tx * 2u];
            let b1 = Bs[kk * (BN / 4u) + tx * 2u + 1u];
            c00 = c00 + a0.x * b0;
            c01 = c01 + a0.x * b1;
            c10 = c10 + a0.y * b0;
            c11 = c11 + a0.y * b1;
            c20 = c20 + a0.z * b0;
            c21 = c21 + a0.z * b1;
            c30 = c30 + a0.w * b0;
            c31 = c31 + a0.w * b1;
            c40 = c40 + a1.x * b0;
            c41 = c41 + a1.x * b1;
            c50 = c50 + a1.y * b0;
            c51 = c51 + a1.y * b1;
            c60 = c60 + a1.z * b0;
            c61 = c61 + a1.z * b1;
            c70 = c70 + a1.w * b0;
            c71 = c71 + a1.w * b1;
        }
        workgroupBarrier();
    }
    let r = row0 + ty * 8u;
    let c = col0 + tx * 8u;
    store8(r, c, c00, c01);
    store8(r + 1u, c, c10, c11);
    store8(r + 2u, c, c20, c21);
    store8(r + 3u, c, c30, c31);
    store8(r + 4u, c, c40, c41);
    store8(r + 5u, c, c50, c51);
    store8(r + 6u, c, c60, c61);
    store8(r + 7u, c, c70, c71);
}

fn store8(row: u32, c0: u32, v0: vec4<f32>, v1: vec4<f32>) {
    if (row >= p.m) {
        return;
    }
    for (var j = 0u; j < 4u; j = j + 1u) {
        if (c0 + j < p.n) {
            c_out[row * p.n + c0 + j] = v0[j];
        }
        if (c0 + 4u + j < p.n) {
            c_out[row * p.n + c0 + 4u + j] = v1[j];
        }
    }
}

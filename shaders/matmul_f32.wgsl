// qlinear: a plain f32 tiled matmul C[M, N] = A[M, K] @ B[K, N], the floating-point
// baseline that benchmarks compare the W8A8 plan with on the same adapter. Same
// blocking as gemm_dot4.wgsl: 64 x 64 blocks, 4 x 4 register tiles, BK-deep tiles.

override BM: u32 = 64u;
override BN: u32 = 64u;
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
    var acc: array<vec4<f32>, 4>;
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
            let a = As[kk * (BM / 4u) + ty];
            let b = Bs[kk * (BN / 4u) + tx];
            for (var i = 0u; i < 4u; i = i + 1u) {
                acc[i] = acc[i] + a[i] * b;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i = i + 1u) {
        let row = row0 + ty * 4u + i;
        for (var j = 0u; j < 4u; j = j + 1u) {
            let col = col0 + tx * 4u + j;
            if (row < p.m && col < p.n) {
                c_out[row * p.n + col] = acc[i][j];
            }
        }
    }
}

// qlinear: microbenchmarks that put the GEMM figures in context on an adapter:
// `dot4_peak`, dot4I8Packed throughput from registers (ITERS x 16 independent
// dot4 per invocation, so latency hides), and `copy`, the memory bandwidth of a
// vec4<u32> copy.

override WG: u32 = 256u;
override ITERS: u32 = 256u;

@group(0) @binding(0) var<storage, read_write> dst: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> src: array<vec4<u32>>;

@compute @workgroup_size(WG)
fn dot4_peak(@builtin(global_invocation_id) gid: vec3<u32>) {
    let seed = src[gid.x % arrayLength(&src)];
    var a = seed;
    var b = seed.wzyx ^ vec4<u32>(0x01020304u);
    var acc = vec4<i32>(0);
    var acc2 = vec4<i32>(0);
    var acc3 = vec4<i32>(0);
    var acc4 = vec4<i32>(0);
    for (var i = 0u; i < ITERS; i = i + 1u) {
        acc = acc + vec4<i32>(dot4I8Packed(a.x, b.x), dot4I8Packed(a.y, b.y),
                              dot4I8Packed(a.z, b.z), dot4I8Packed(a.w, b.w));
        acc2 = acc2 + vec4<i32>(dot4I8Packed(a.x, b.y), dot4I8Packed(a.y, b.z),
                                dot4I8Packed(a.z, b.w), dot4I8Packed(a.w, b.x));
        acc3 = acc3 + vec4<i32>(dot4I8Packed(a.x, b.z), dot4I8Packed(a.y, b.w),
                                dot4I8Packed(a.z, b.x), dot4I8Packed(a.w, b.y));
        acc4 = acc4 + vec4<i32>(dot4I8Packed(a.x, b.w), dot4I8Packed(a.y, b.x),
                                dot4I8Packed(a.z, b.y), dot4I8Packed(a.w, b.z));
        a = a.yzwx;
    }
    let r = acc + acc2 + acc3 + acc4;
    // Written only when impossible-looking, so the work cannot be optimised away.
    if (r.x == 0x7fffffff) {
        dst[gid.x % arrayLength(&dst)] = vec4<u32>(r);
    }
}

@compute @workgroup_size(WG)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i < arrayLength(&dst)) {
        dst[i] = src[i];
    }
}

// qlinear: the dot4I8Packed probe. Some drivers compute the integer dot product that
// naga emits for dot4I8Packed wrong (a lane's sign extension, or the sum); this kernel
// computes it on edge values the host knows the answers to, and a wrong answer sends
// the adapter's plans to the exact f32 path. The operands are read from a buffer, so
// the compiler cannot fold them.

@group(0) @binding(0) var<storage, read_write> dst: array<i32>;
// Pairs of words, four int8 lanes each, lane 0 in the low byte: (a, b) of product i at
// src[2i], src[2i + 1].
@group(0) @binding(1) var<storage, read_write> src: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i < arrayLength(&dst)) {
        dst[i] = dot4I8Packed(src[2u * i], src[2u * i + 1u]);
    }
}

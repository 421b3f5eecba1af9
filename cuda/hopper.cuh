// Hopper (sm_90a) building blocks of gemm_wgmma.cu: mbarriers, the tensor-memory copy
// engine (TMA), warpgroup MMA (wgmma) with shared-memory matrix descriptors, and the
// warpgroup register hand-over (setmaxnreg).
//
// Every wrapper is a single PTX instruction (or a try-wait loop around one) and compiles
// to a trap below sm_90, so the header can be inlined into any source. The numbers that
// tie the copy engine's shared-memory layout to the descriptors that read it back are
// stated once here and mirrored, with the same names, in tests/test_cuda_wgmma_emulation.py.
#pragma once

#include "qlinear_common.cuh"

namespace ql {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define QL_SM90 1
#else
#define QL_SM90 0
#endif

// A CUtensorMap, passed by value as a __grid_constant__ kernel parameter (the driver's
// own type needs <cuda.h>, which NVRTC does not have): 128 opaque bytes, 64-byte aligned.
struct __align__(64) TmaMap {
    u64_t opaque[16];
};

__device__ __forceinline__ u32_t smem_addr(const void* p) {
    return static_cast<u32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------------------------
// mbarriers (64-bit, in shared memory). A phase completes when the expected number of
// arrivals and of transaction bytes (the copy engine's) have both come in; waiters name
// the phase by its parity.
__device__ __forceinline__ void mbar_init(u64_t* bar, u32_t arrivals) {
#if QL_SM90
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals)
                 : "memory");
#else
    __trap();
#endif
}

// Makes the initialised barriers visible to the copy engine (the async proxy).
__device__ __forceinline__ void mbar_init_fence() {
#if QL_SM90
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// One arrival that also announces `bytes` of copy-engine transactions for this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(u64_t* bar, u32_t bytes) {
#if QL_SM90
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
                 ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void mbar_arrive(u64_t* bar) {
#if QL_SM90
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#else
    __trap();
#endif
}

// Blocks until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u64_t* bar, u32_t parity) {
#if QL_SM90
    const u32_t addr = smem_addr(bar);
    u32_t done = 0;
    do {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n"
            "}\n"
            : "=r"(done) : "r"(addr), "r"(parity) : "memory");
    } while (!done);
#else
    __trap();
#endif
}

// ---------------------------------------------------------------------------------
// The copy engine: a box of a 2-D tensor (inner coordinate x in elements, outer y) into
// shared memory, laid out (and swizzled) as the tensor map says, zero past the tensor's
// edges; completion counts the box's bytes on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaMap* map, int x, int y,
                                            u64_t* bar) {
#if QL_SM90
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(smem_addr(dst)), "l"(reinterpret_cast<u64_t>(map)), "r"(x), "r"(y),
          "r"(smem_addr(bar))
        : "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void tma_prefetch_map(const TmaMap* map) {
#if QL_SM90
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64_t>(map)) : "memory");
#endif
}

// ---------------------------------------------------------------------------------
// The shared-memory layout both sides agree on. The copy engine writes a box of rows of
// SW128_ROW_BYTES (the k-tile) with the 128-byte swizzle: the 16-byte chunk c of row r
// lands at chunk c ^ (r % 8) of that row, i.e. address bits [4:6] are XORed with bits
// [7:9]; the pattern repeats every SW128_ATOM_BYTES (8 rows), so every tile starts
// 1024-byte aligned. A wgmma descriptor of the same swizzle mode reads a K-major operand
// from such rows: 8-row groups SW128_ATOM_BYTES apart (the stride byte offset), the row
// and k-offset inside a group found by the same address swizzle, which is why advancing
// the start address by 32 bytes selects the next k32 slice.
constexpr int SW128_ROW_BYTES = 128;
constexpr int SW128_ATOM_BYTES = 1024;
// Descriptor fields (PTX ISA, "matrix descriptor" of wgmma): start address >> 4 in bits
// 0-13, leading byte offset >> 4 in 16-29 (unused by swizzled K-major layouts: 1),
// stride byte offset >> 4 in 32-45, base offset in 49-51 (0: tiles are atom aligned),
// layout in 62-63 (1: 128-byte swizzle).
constexpr u64_t WGMMA_DESC_SW128 = (static_cast<u64_t>(1) << 16) |
                                   (static_cast<u64_t>(SW128_ATOM_BYTES >> 4) << 32) |
                                   (static_cast<u64_t>(1) << 62);

__device__ __forceinline__ u64_t wgmma_desc(u32_t smem_address) {
    return WGMMA_DESC_SW128 | static_cast<u64_t>((smem_address & 0x3FFFF) >> 4);
}

// ---------------------------------------------------------------------------------
// Warpgroup MMA, s8 x s8 -> s32, both operands K-major in shared memory:
//   D[64 x N] (+)= A[64 x 32] * B[32 x N]
// issued by the 128 threads of one warpgroup. D's fragment: warp w of the group holds rows
// 16w..16w+15; lane (g = lane / 4, t = lane % 4) holds, for each 8-column block j,
// d[4j] = (16w + g, 8j + 2t), d[4j + 1] = (16w + g, 8j + 2t + 1), d[4j + 2] and d[4j + 3]
// the same columns of row 16w + g + 8. `accumulate` 0 overwrites D.
__device__ __forceinline__ void wgmma_fence() {
#if QL_SM90
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if QL_SM90
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N committed groups of this warpgroup are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if QL_SM90
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

#define QL_D4(i) "+r"(d[i]), "+r"(d[i + 1]), "+r"(d[i + 2]), "+r"(d[i + 3])
#define QL_D16(i) QL_D4(i), QL_D4(i + 4), QL_D4(i + 8), QL_D4(i + 12)
#define QL_D64(i) QL_D16(i), QL_D16(i + 16), QL_D16(i + 32), QL_D16(i + 48)

template <int N> __device__ __forceinline__ void wgmma_s8(int (&d)[N / 2], u64_t a, u64_t b,
                                                          int accumulate);

template <>
__device__ __forceinline__ void wgmma_s8<128>(int (&d)[64], u64_t a, u64_t b, int accumulate) {
#if QL_SM90
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p;\n"
        "}\n"
        : QL_D64(0)
        : "l"(a), "l"(b), "r"(accumulate)
        : "memory");
#else
    __trap();
#endif
}

template <>
__device__ __forceinline__ void wgmma_s8<256>(int (&d)[128], u64_t a, u64_t b, int accumulate) {
#if QL_SM90
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, "
        "%110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, "
        "%123, %124, %125, %126, %127}, "
        "%128, %129, p;\n"
        "}\n"
        : QL_D64(0), QL_D64(64)
        : "l"(a), "l"(b), "r"(accumulate)
        : "memory");
#else
    __trap();
#endif
}

#undef QL_D4
#undef QL_D16
#undef QL_D64

// Hands registers between warpgroups: the producer gives up what the consumers take.
// Takes effect only under a launch-bounds register cap, with every thread of the
// warpgroup executing it.
template <int REGS>
__device__ __forceinline__ void regs_release() {
#if QL_SM90
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
#endif
}
template <int REGS>
__device__ __forceinline__ void regs_acquire() {
#if QL_SM90
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
#endif
}

}  // namespace ql

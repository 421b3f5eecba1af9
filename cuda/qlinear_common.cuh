// Shared device code of qlinear's CUDA kernels: element types, exact arithmetic,
// vector loads, the dequantization epilogue and the integer-MMA / cp.async wrappers.
//
// Compiled by NVRTC only: no host headers. The Python side inlines this file into
// each .cu before compiling (so the source hash covers it).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace ql {

// Own fixed-width typedefs: <cstdint> is not available under NVRTC.
typedef signed char s8_t;
typedef unsigned char u8_t;
typedef unsigned short u16_t;
typedef int s32_t;
typedef unsigned int u32_t;
typedef long long s64_t;
typedef unsigned long long u64_t;

// ---------------------------------------------------------------------------------
// Exact arithmetic in the compute type C (float, or double for f64). The _rn
// intrinsics are never contracted into FMAs, so every backend rounds the same way; an
// fma is only ever written out (fma_rn), where its single rounding is the point.
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
// a * b + c rounded once.
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
// 1 / a correctly rounded (IEEE), as the division would give it.
__device__ __forceinline__ float rcp_rn(float a) { return __frcp_rn(a); }
__device__ __forceinline__ double rcp_rn(double a) { return __drcp_rn(a); }
// Nearest integer, ties to even, in one conversion (out-of-range values saturate).
__device__ __forceinline__ int rint_to_int(float a) { return __float2int_rn(a); }
__device__ __forceinline__ int rint_to_int(double a) { return __double2int_rn(a); }
template <typename C> __device__ __forceinline__ C from_int(int v);
template <> __device__ __forceinline__ float from_int<float>(int v) { return __int2float_rn(v); }
template <> __device__ __forceinline__ double from_int<double>(int v) { return __int2double_rn(v); }

// ---------------------------------------------------------------------------------
// Element traits. C is the compute type of the numerical contract; Bits holds the
// raw encoding, so stores (and the canonical NaN) are exact bit patterns.
template <typename T> struct Elem;

template <> struct Elem<float> {
    typedef float C;
    typedef u32_t Bits;
    static __device__ __forceinline__ C to_c(float v) { return v; }
    static __device__ __forceinline__ Bits bits_rn(C c) { return __float_as_uint(c); }
    static __device__ __forceinline__ C from_bits(Bits b) { return __uint_as_float(b); }
    static constexpr Bits kNaN = 0x7fc00000u;
};
template <> struct Elem<double> {
    typedef double C;
    typedef u64_t Bits;
    static __device__ __forceinline__ C to_c(double v) { return v; }
    static __device__ __forceinline__ Bits bits_rn(C c) {
        return static_cast<Bits>(__double_as_longlong(c));
    }
    static __device__ __forceinline__ C from_bits(Bits b) {
        return __longlong_as_double(static_cast<s64_t>(b));
    }
    static constexpr Bits kNaN = 0x7ff8000000000000ull;
};
template <> struct Elem<__half> {
    typedef float C;
    typedef u16_t Bits;
    static __device__ __forceinline__ C to_c(__half v) { return __half2float(v); }
    static __device__ __forceinline__ Bits bits_rn(C c) {
        return __half_as_ushort(__float2half_rn(c));
    }
    static __device__ __forceinline__ C from_bits(Bits b) {
        return __half2float(__ushort_as_half(b));
    }
    static constexpr Bits kNaN = 0x7e00u;
};
template <> struct Elem<__nv_bfloat16> {
    typedef float C;
    typedef u16_t Bits;
    static __device__ __forceinline__ C to_c(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ Bits bits_rn(C c) {
        return __bfloat16_as_ushort(__float2bfloat16_rn(c));
    }
    static __device__ __forceinline__ C from_bits(Bits b) {
        // bf16 is the top half of an f32: widening is a shift, exact.
        return __uint_as_float(static_cast<u32_t>(b) << 16);
    }
    static constexpr Bits kNaN = 0x7fc0u;
};

// C -> T rounded once to nearest even; every NaN becomes the positive quiet NaN that
// numpy produces for the reference, so NaN outputs compare equal bit for bit.
template <typename T>
__device__ __forceinline__ typename Elem<T>::Bits store_bits(typename Elem<T>::C c) {
    return c != c ? Elem<T>::kNaN : Elem<T>::bits_rn(c);
}

template <typename T>
__device__ __forceinline__ void store_elem(T* p, typename Elem<T>::C c) {
    *reinterpret_cast<typename Elem<T>::Bits*>(p) = store_bits<T>(c);
}

template <typename T>
__device__ __forceinline__ typename Elem<T>::C load_elem(const T* p) {
    return Elem<T>::from_bits(__ldg(reinterpret_cast<const typename Elem<T>::Bits*>(p)));
}

// The same through L2 only (ld.global.cg): for data a kernel overlapped by programmatic
// dependent launch is still writing when this kernel starts, so no L1 copy can be stale.
template <typename T>
__device__ __forceinline__ typename Elem<T>::C load_elem_l2(const T* p) {
    return Elem<T>::from_bits(__ldcg(reinterpret_cast<const typename Elem<T>::Bits*>(p)));
}

// Two adjacent outputs in one store; the caller guarantees 2*sizeof(T) alignment.
__device__ __forceinline__ void store_pair_bits(u16_t* p, u16_t a, u16_t b) {
    *reinterpret_cast<u32_t*>(p) = static_cast<u32_t>(a) | (static_cast<u32_t>(b) << 16);
}
__device__ __forceinline__ void store_pair_bits(u32_t* p, u32_t a, u32_t b) {
    *reinterpret_cast<uint2*>(p) = make_uint2(a, b);
}
__device__ __forceinline__ void store_pair_bits(u64_t* p, u64_t a, u64_t b) {
    *reinterpret_cast<ulonglong2*>(p) = make_ulonglong2(a, b);
}

// Outputs n and n + 1 of a row: in one store where the caller says pairs are aligned
// (pair_ok: an even row length and a 2-element aligned base), else one at a time.
template <typename Bits>
__device__ __forceinline__ void store_two_bits(Bits* row, int n, Bits a, Bits b, int pair_ok) {
    if (pair_ok) {
        store_pair_bits(row + n, a, b);
    } else {
        row[n] = a;
        row[n + 1] = b;
    }
}

// ---------------------------------------------------------------------------------
// The epilogue of the contract, step 5:
//   y = ((C(acc) * C(scale_m)) * C(weight_scale_n)) (+ C(bias_n)), rounded once to T.
template <typename T>
__device__ __forceinline__ typename Elem<T>::C dequant(int acc, typename Elem<T>::C scale_m,
                                                       typename Elem<T>::C wscale_n,
                                                       const T* bias, int n) {
    typedef typename Elem<T>::C C;
    C y = mul_rn(mul_rn(from_int<C>(acc), scale_m), wscale_n);
    if (bias != nullptr) y = add_rn(y, load_elem(bias + n));
    return y;
}

// ---------------------------------------------------------------------------------
// The zero-point term of the asymmetric schemes, applied before step 5:
//   acc' = acc - zp_m * colsum_n        (colsum_n = sum_k W[n, k])
// in 32-bit wrapping (unsigned) arithmetic, where signed overflow would be undefined; the
// host's K bound keeps the true value within int32, so the wrapped result is exact.
// The ZP template argument of the GEMM kernels says where it applies:
//   ZP_NONE      never (the symmetric schemes; the kernels are the plain ones)
//   ZP_ALWAYS    always (the asymmetric schemes' fast kernels)
//   ZP_IF_GIVEN  where a zero-point pointer is given: the byte-load fallbacks are slow
//                anyway, so one kernel of them serves every scheme.
constexpr int ZP_NONE = 0;
constexpr int ZP_ALWAYS = 1;
constexpr int ZP_IF_GIVEN = 2;

template <int ZP>
__device__ __forceinline__ bool zp_applies(const s32_t* zp) {
    return ZP == ZP_ALWAYS || (ZP == ZP_IF_GIVEN && zp != nullptr);
}

__device__ __forceinline__ int zp_adjust(int acc, int zp_m, int colsum_n) {
    return static_cast<int>(static_cast<u32_t>(acc) -
                            static_cast<u32_t>(zp_m) * static_cast<u32_t>(colsum_n));
}

// ---------------------------------------------------------------------------------
// 16 int8 values of a row starting at byte k, zero past K.
// ALIGNED: the caller guarantees a 16-byte aligned row start and K % 16 == 0, so a
// 16-byte chunk is either wholly inside the row or wholly outside.
// L2_ONLY: read through L2 only (see load_elem_l2); otherwise the read-only path.
template <bool ALIGNED, bool L2_ONLY = false>
__device__ __forceinline__ uint4 load16(const s8_t* row, int k, int K) {
    if (ALIGNED) {
        if (k < K) {
            const uint4* p = reinterpret_cast<const uint4*>(row + k);
            return L2_ONLY ? __ldcg(p) : __ldg(p);
        }
        return make_uint4(0u, 0u, 0u, 0u);
    }
    u32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        u32_t v = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int kk = k + 4 * i + j;
            const s8_t raw = kk < K ? (L2_ONLY ? __ldcg(row + kk) : __ldg(row + kk)) : s8_t(0);
            const u32_t b = static_cast<u32_t>(static_cast<u8_t>(raw));
            v |= b << (8 * j);
        }
        w[i] = v;
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// ---------------------------------------------------------------------------------
// Integer tensor cores (sm_80+): D = A(16x32, row) * B(32x8, col) + C, s8 x s8 -> s32.
// Fragment of lane (g = lane / 4, t = lane % 4): a0/a2 hold row g, a1/a3 row g + 8,
// a0/a1 and b0 the k-slots 4t..4t+3, a2/a3 and b1 the k-slots 16+4t..16+4t+3; b holds
// column g. A k-slot only has to name the same physical k in A and B (the sum over k
// does not care which slot holds which k), so over a 64-byte k-chunk lane t takes
// bytes 16t..16t+15 of its rows and column: bytes 0-7 feed the first k32 step,
// bytes 8-15 the second. One 16-byte load per row then serves two MMAs, and the
// loads of a warp from a 64-byte-wide shared tile hit 32 distinct banks.
__device__ __forceinline__ void mma_s8(int (&c)[4], u32_t a0, u32_t a1, u32_t a2, u32_t a3,
                                       u32_t b0, u32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

// Two m16n8k32 steps over one 16-byte chunk per lane: bytes 0-7 then bytes 8-15.
__device__ __forceinline__ void mma_s8_k64(int (&c)[4], const uint4& row_g, const uint4& row_g8,
                                           const uint4& col_g) {
    mma_s8(c, row_g.x, row_g8.x, row_g.y, row_g8.y, col_g.x, col_g.y);
    mma_s8(c, row_g.z, row_g8.z, row_g.w, row_g8.w, col_g.z, col_g.w);
}

// cp.async (sm_80+): 16 bytes global -> shared, bypassing L1; bytes past src_bytes
// are zero-filled, which is how tile edges are padded.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const u32_t s = static_cast<u32_t>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
#else
    __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Programmatic dependent launch (sm_90+). A kernel launched with the programmatic
// stream serialization attribute may start while the previous kernel on the stream is
// still running; wait_for_producer() blocks until that kernel has finished and its
// writes are visible. Without the attribute (or before sm_90) both are no-ops, so
// stream order alone keeps the kernels correct.
__device__ __forceinline__ void wait_for_producer() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Grouped rasterisation of a 1-D grid over (tiles_m x tiles_n): consecutive blocks
// share weight tiles and a band of activation rows, which keeps both in L2.
__device__ __forceinline__ void tile_coords(int pid, int tiles_m, int tiles_n, int& tm, int& tn) {
    const int group = 8;
    const int width = group * tiles_n;
    const int first_m = (pid / width) * group;
    const int rows = min(tiles_m - first_m, group);
    const int in_group = pid % width;
    tm = first_m + in_group % rows;
    tn = in_group / rows;
}

}  // namespace ql

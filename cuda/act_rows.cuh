// One row of the activation pass, read and written: 16-byte vectors of T and their
// elements widened to C, the row's amax as raw bits (which also flags NaN and Inf), its
// min and max (the asymmetric scheme), and the packed stores of q. act_quant.cu's kernel
// is built from these.
#pragma once
#include "qlinear_common.cuh"

namespace ql {

__device__ __forceinline__ u32_t word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Element j of a 16-byte vector of T, widened to C.
template <typename T>
__device__ __forceinline__ typename Elem<T>::C vec_get(const uint4& v, int j) {
    if constexpr (sizeof(T) == 2) {
        return Elem<T>::from_bits(static_cast<u16_t>(word_of(v, j >> 1) >> ((j & 1) * 16)));
    } else if constexpr (sizeof(T) == 4) {
        return Elem<T>::from_bits(word_of(v, j));
    } else {
        return Elem<T>::from_bits((static_cast<u64_t>(word_of(v, 2 * j + 1)) << 32) |
                                  word_of(v, 2 * j));
    }
}

// Vector v of a row, or zeros past its end: zeros leave amax as it is and are never stored,
// so every load can be issued unconditionally (predicated) ahead of the arithmetic.
__device__ __forceinline__ uint4 load_vec(const uint4* xv, int v, int nvec) {
    return v < nvec ? __ldg(xv + v) : make_uint4(0u, 0u, 0u, 0u);
}

// amax as raw bits: |x| is x's bits without the sign, and non-negative floats (subnormals
// included) order as their bits do, so an integer max finds amax exactly. NaN and Inf
// encode above every finite value, so the same max also tells whether the row holds one.
template <typename T> struct AbsBits;
template <> struct AbsBits<__half> {
    static constexpr u32_t kInf = 0x7c00u;
};
template <> struct AbsBits<__nv_bfloat16> {
    static constexpr u32_t kInf = 0x7f80u;
};
template <> struct AbsBits<float> {
    static constexpr u32_t kInf = 0x7f800000u;
};
template <> struct AbsBits<double> {
    static constexpr u64_t kInf = 0x7ff0000000000000ull;
};

// One thread's running max of |x| bits. 16-bit types: two halfword maxima in one word
// (__vmaxu2 takes two elements per instruction), folded at the end.
template <typename T, int BYTES = static_cast<int>(sizeof(T))>
struct AbsMax {
    u32_t m = 0;
    __device__ __forceinline__ void vec(const uint4& v) {
        m = __vmaxu2(m, v.x & 0x7fff7fffu);
        m = __vmaxu2(m, v.y & 0x7fff7fffu);
        m = __vmaxu2(m, v.z & 0x7fff7fffu);
        m = __vmaxu2(m, v.w & 0x7fff7fffu);
    }
    __device__ __forceinline__ void elem(const T* p) {
        m = __vmaxu2(m, __ldg(reinterpret_cast<const u16_t*>(p)) & 0x7fffu);
    }
    __device__ __forceinline__ u32_t lane_max() const { return ::max(m & 0xffffu, m >> 16); }
};
template <typename T>
struct AbsMax<T, 4> {
    u32_t m = 0;
    __device__ __forceinline__ void vec(const uint4& v) {
        m = ::max(m, v.x & 0x7fffffffu);
        m = ::max(m, v.y & 0x7fffffffu);
        m = ::max(m, v.z & 0x7fffffffu);
        m = ::max(m, v.w & 0x7fffffffu);
    }
    __device__ __forceinline__ void elem(const T* p) {
        m = ::max(m, __ldg(reinterpret_cast<const u32_t*>(p)) & 0x7fffffffu);
    }
    __device__ __forceinline__ u32_t lane_max() const { return m; }
};
template <typename T>
struct AbsMax<T, 8> {
    u64_t m = 0;
    __device__ __forceinline__ void vec(const uint4& v) {
        m = ::max(m, ((static_cast<u64_t>(v.y) << 32) | v.x) & 0x7fffffffffffffffull);
        m = ::max(m, ((static_cast<u64_t>(v.w) << 32) | v.z) & 0x7fffffffffffffffull);
    }
    __device__ __forceinline__ void elem(const T* p) {
        m = ::max(m, __ldg(reinterpret_cast<const u64_t*>(p)) & 0x7fffffffffffffffull);
    }
    __device__ __forceinline__ u64_t lane_max() const { return m; }
};

__device__ __forceinline__ float min_c(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double min_c(double a, double b) { return fmin(a, b); }
__device__ __forceinline__ float max_c(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_c(double a, double b) { return fmax(a, b); }
template <typename C> __device__ __forceinline__ C inf_c();
template <> __device__ __forceinline__ float inf_c<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double inf_c<double>() {
    return __longlong_as_double(0x7ff0000000000000ll);
}
__device__ __forceinline__ bool finite_c(float a) {
    return (__float_as_uint(a) & 0x7fffffffu) < 0x7f800000u;
}
__device__ __forceinline__ bool finite_c(double a) {
    return (static_cast<u64_t>(__double_as_longlong(a)) & 0x7fffffffffffffffull) <
           0x7ff0000000000000ull;
}

// One thread's running min and max of C(x) (ON: the asymmetric scheme; otherwise nothing).
// NaN is skipped (fmin/fmax return the other operand): a row holding one is told apart by
// AbsMax, whatever this says.
template <typename T, bool ON>
struct RowRange {
    typedef typename Elem<T>::C C;
    C mn, mx;
    __device__ __forceinline__ RowRange() : mn(inf_c<C>()), mx(-inf_c<C>()) {}
    __device__ __forceinline__ void add(C v) {
        if (ON) {
            mn = min_c(mn, v);
            mx = max_c(mx, v);
        }
    }
    __device__ __forceinline__ void vec(const uint4& v) {
        constexpr int E = 16 / static_cast<int>(sizeof(T));
#pragma unroll
        for (int j = 0; j < E; ++j) add(vec_get<T>(v, j));
    }
    __device__ __forceinline__ void elem(const T* p) { add(load_elem(p)); }
};

// E int8 results (one 16-byte input vector) in one store of E bytes. The values are
// already within q_min..q_max, so the packing's saturation never changes one.
__device__ __forceinline__ u32_t pack2(int hi, int lo, u32_t rest) {
    u32_t d;
    asm("cvt.pack.sat.s8.s32.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(hi), "r"(lo), "r"(rest));
    return d;
}
__device__ __forceinline__ u32_t pack4(const int* q) {
    return pack2(q[1], q[0], pack2(q[3], q[2], 0u));
}
template <int E>
__device__ __forceinline__ void store_q(s8_t* p, const int (&q)[E]) {
    if constexpr (E == 8) {
        *reinterpret_cast<uint2*>(p) = make_uint2(pack4(q), pack4(q + 4));
    } else if constexpr (E == 4) {
        *reinterpret_cast<u32_t*>(p) = pack4(q);
    } else {
        *reinterpret_cast<u16_t*>(p) = static_cast<u16_t>(pack2(q[1], q[0], 0u));
    }
}

}  // namespace ql

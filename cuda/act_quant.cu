// The activation pass, fused: per-row amax (reduction), scale, quantization.
//
//   amax  = max_k |x[m, k]|                           (C = f32, f64 for f64)
//   scale = amax / q_max  (IEEE division)            stored rounded to T (RNE)
//   q     = clamp(rint(x / stored_scale), q_min, q_max)
//   NaN/Inf in the row          -> scale NaN, q 0
//   stored scale 0 (zero row,
//   or underflow in T)          -> scale 1,   q 0
//
// WARP_ROWS: one warp per row (short rows); otherwise the whole block takes a row.
// VEC: 16-byte loads of x and E-byte stores of q (the host checks K * sizeof(T) % 16 == 0
// and the alignment of both pointers); otherwise element loads for any K.
// The first CACHE (possibly 0) 16-byte vectors of each thread stay in registers between
// the two passes; the rest are read again (from L1/L2), TAIL vectors at a time. Each group
// of loads is issued before any of it is used, so that several are in flight per thread.
#include "qlinear_common.cuh"

namespace ql {

constexpr int TAIL = 4;

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

// Where the reciprocal quantization below is exact: divisors d with
//   d normal, and 1/d normal and finite         (r = RN(1/d) has full precision);
//   ulp(d) * ulp(1/4) >= the smallest subnormal  (the residual of every quotient >= 1/4
//                                                  lies on the subnormal grid).
// f32: 2^-101 <= d <= 2^126; f64: 2^-968 <= d <= 2^1022. A stored scale is
// RN_T(amax / q_max) <= max(T) / 127, so only the lower limit is ever reached: rows whose
// amax is below about 5e-29 (f32, bf16) or 5e-290 (f64) take the division.
// tests/test_cuda_act_numerics.py holds the same limits (FAST_RANGE).
__device__ __forceinline__ bool fast_divisor(float d) { return d >= 0x1p-101f && d <= 0x1p126f; }
__device__ __forceinline__ bool fast_divisor(double d) { return d >= 0x1p-968 && d <= 0x1p1022; }

template <typename C>
struct RowQuant {
    C d, r;
    int lo, hi;

    // q = clamp(rint(x / d)) with x / d the correctly rounded quotient, from the row's
    // reciprocal r = RN(1/d), with Markstein's correction (P. Markstein, IBM J. Res. Dev.
    // 34(1), 1990; the last steps of CUDA's own division):
    //   q0 = RN(x * r)          within 1.5 ulp of x / d
    //   e  = RN(x - q0 * d)     one fma: the residual (rounded only when q0 is > 1 ulp off)
    //   q1 = RN(q0 + e * r)     = RN(x / d)
    // q0 can be further off than the theorem's one ulp, so the test below is the proof:
    // within fast_divisor's range and for |q0| >= 1/4, every step is a power-of-two scaling
    // of the same steps on the significands of x and d (r, q0, q1 are normal; x - q0 * d is
    // a multiple of ulp(q0) * ulp(d) >= the smallest subnormal, so e rounds as at any other
    // scale). tests/test_cuda_act_numerics.py (markstein32, markstein64) emulates exactly
    // these operations and checks all significand pairs of f16 and bf16, every f32
    // significand against the worst-rounded reciprocals, and edge and random f32/f64 values.
    // When |q0| < 1/4 the residual may underflow and q1 may differ from RN(x / d), but both
    // stay below 1/2: |x / d| < 1/4 (1 + 2^-22), and |e * r| <= 1.5 ulp(q0) (1 + 2^-23) plus
    // at most 2^-150 * 2^101 (f64: 2^-1075 * 2^968), so rint gives 0 for each.
    __device__ __forceinline__ int fast(C x) const {
        const C q0 = mul_rn(x, r);
        const C e = fma_rn(-q0, d, x);
        const C q1 = fma_rn(e, r, q0);
        return ::min(::max(rint_to_int(q1), lo), hi);
    }
    // Divisors outside the range above: the IEEE division itself.
    __device__ __forceinline__ int slow(C x) const {
        return ::min(::max(rint_to_int(div_rn(x, d)), lo), hi);
    }
};

}  // namespace ql

template <typename T, int THREADS, bool WARP_ROWS, bool VEC, int CACHE>
__global__ void __launch_bounds__(THREADS)
qlinear_act_quant(const T* __restrict__ x, ql::s8_t* __restrict__ q, T* __restrict__ scale,
                  int M, int K, int q_min, int q_max) {
    using namespace ql;
    typedef typename Elem<T>::C C;
    typedef typename Elem<T>::Bits Bits;
    constexpr int G = WARP_ROWS ? 32 : THREADS;  // threads sharing one row
    constexpr int E = 16 / static_cast<int>(sizeof(T));
    constexpr int WARPS = THREADS / 32;
    typedef decltype(AbsMax<T>().lane_max()) Acc;
    __shared__ Acc red_max[WARPS];

    // The decode kernel that consumes q may launch now and stream its weights meanwhile.
    allow_dependents();
    const int lane = WARP_ROWS ? static_cast<int>(threadIdx.x & 31) : static_cast<int>(threadIdx.x);
    const s64_t row = WARP_ROWS ? static_cast<s64_t>(blockIdx.x) * WARPS + (threadIdx.x >> 5)
                                : static_cast<s64_t>(blockIdx.x);
    // Uniform per warp (WARP_ROWS) or per block, so no barrier below is skipped by half a group.
    if (row >= M) return;
    const T* xr = x + row * K;
    s8_t* qr = q + row * K;
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    const int nvec = VEC ? K / E : 0;

    AbsMax<T> absmax;
    uint4 cache[CACHE > 0 ? CACHE : 1];
    if (VEC) {
#pragma unroll
        for (int i = 0; i < CACHE; ++i) cache[i] = load_vec(xv, lane + i * G, nvec);
#pragma unroll
        for (int i = 0; i < CACHE; ++i) absmax.vec(cache[i]);
        int v = lane + CACHE * G;
#pragma unroll 1
        for (; v + (TAIL - 1) * G < nvec; v += TAIL * G) {
            uint4 w[TAIL];
#pragma unroll
            for (int u = 0; u < TAIL; ++u) w[u] = __ldg(xv + v + u * G);
#pragma unroll
            for (int u = 0; u < TAIL; ++u) absmax.vec(w[u]);
        }
        for (; v < nvec; v += G) absmax.vec(__ldg(xv + v));
    } else {
        for (int k = lane; k < K; k += G) absmax.elem(xr + k);
    }

    Acc m = absmax.lane_max();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = ::max(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (!WARP_ROWS) {
        const int warp = threadIdx.x >> 5;
        if ((threadIdx.x & 31) == 0) red_max[warp] = m;
        __syncthreads();
        m = red_max[0];
#pragma unroll
        for (int w = 1; w < WARPS; ++w) m = ::max(m, red_max[w]);
    }
    const bool bad = m >= AbsBits<T>::kInf;
    const C amax = Elem<T>::from_bits(static_cast<Bits>(m));

    // The stored (rounded) scale is the divisor, so dequantization matches it.
    Bits sbits = Elem<T>::bits_rn(div_rn(amax, static_cast<C>(q_max)));
    const C divisor = Elem<T>::from_bits(sbits);
    const bool zero_row = !(divisor > C(0));
    if (bad) sbits = Elem<T>::kNaN;
    else if (zero_row) sbits = Elem<T>::bits_rn(C(1));
    if (lane == 0) *reinterpret_cast<Bits*>(scale + row) = sbits;

    // A zero or NaN/Inf row clamps every result to 0..0 (whatever x * r gives, NaN
    // included), through the fast path with d = 1.
    RowQuant<C> quant;
    quant.d = bad || zero_row ? C(1) : divisor;
    quant.r = rcp_rn(quant.d);
    quant.lo = bad || zero_row ? 0 : q_min;
    quant.hi = bad || zero_row ? 0 : q_max;

    // Uniform per row: rows whose scale is out of the reciprocal's range (see
    // fast_divisor) are read again and divided element by element, keeping nothing live
    // across the division's slow path.
    if (!fast_divisor(quant.d)) {
        if (VEC) {
            for (int v = lane; v < nvec; v += G) {
                const uint4 w = __ldg(xv + v);
                int qv[E];
#pragma unroll
                for (int j = 0; j < E; ++j) qv[j] = quant.slow(vec_get<T>(w, j));
                store_q<E>(qr + static_cast<s64_t>(v) * E, qv);
            }
        } else {
            for (int k = lane; k < K; k += G)
                qr[k] = static_cast<s8_t>(quant.slow(load_elem(xr + k)));
        }
        return;
    }

    if (VEC) {
#pragma unroll
        for (int i = 0; i < CACHE; ++i) {
            const int v = lane + i * G;
            if (v < nvec) {
                int qv[E];
#pragma unroll
                for (int j = 0; j < E; ++j) qv[j] = quant.fast(vec_get<T>(cache[i], j));
                store_q<E>(qr + static_cast<s64_t>(v) * E, qv);
            }
        }
#pragma unroll 1
        for (int v = lane + CACHE * G; v < nvec; v += TAIL * G) {
            uint4 w[TAIL];
#pragma unroll
            for (int u = 0; u < TAIL; ++u) w[u] = load_vec(xv, v + u * G, nvec);
#pragma unroll
            for (int u = 0; u < TAIL; ++u) {
                if (v + u * G < nvec) {
                    int qv[E];
#pragma unroll
                    for (int j = 0; j < E; ++j) qv[j] = quant.fast(vec_get<T>(w[u], j));
                    store_q<E>(qr + static_cast<s64_t>(v + u * G) * E, qv);
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += G)
            qr[k] = static_cast<s8_t>(quant.fast(load_elem(xr + k)));
    }
}

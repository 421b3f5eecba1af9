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
// The first CACHE 16-byte vectors of each thread stay in registers between the two
// passes; the rest are read again (from L1/L2).
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

// E int8 results (one 16-byte input vector) in one store of E bytes.
template <int E>
__device__ __forceinline__ void store_q(s8_t* p, const int (&q)[E]) {
    if constexpr (E == 8) {
        u32_t lo = 0, hi = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            lo |= (static_cast<u32_t>(q[j]) & 0xffu) << (8 * j);
            hi |= (static_cast<u32_t>(q[j + 4]) & 0xffu) << (8 * j);
        }
        *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
    } else if constexpr (E == 4) {
        u32_t w = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) w |= (static_cast<u32_t>(q[j]) & 0xffu) << (8 * j);
        *reinterpret_cast<u32_t*>(p) = w;
    } else {
        const u32_t w = (static_cast<u32_t>(q[0]) & 0xffu) | ((static_cast<u32_t>(q[1]) & 0xffu) << 8);
        *reinterpret_cast<u16_t*>(p) = static_cast<u16_t>(w);
    }
}

template <typename C>
struct RowQuant {
    C divisor;
    C lo, hi;
    bool zero;
    __device__ __forceinline__ int operator()(C x) const {
        if (zero) return 0;
        const C r = round_even(div_rn(x, divisor));
        return static_cast<int>(min_c(max_c(r, lo), hi));
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
    __shared__ C red_max[WARPS];
    __shared__ int red_bad[WARPS];

    // The decode kernel that consumes q may launch now and stream its weights meanwhile.
    allow_dependents();
    const int lane = WARP_ROWS ? static_cast<int>(threadIdx.x & 31) : static_cast<int>(threadIdx.x);
    const s64_t row = WARP_ROWS ? static_cast<s64_t>(blockIdx.x) * WARPS + (threadIdx.x >> 5)
                                : static_cast<s64_t>(blockIdx.x);
    // Uniform per warp (WARP_ROWS) or per block, so no barrier below is skipped by half a group.
    if (row >= M) return;
    const T* xr = x + row * K;
    s8_t* qr = q + row * K;

    C amax = C(0);
    bool bad = false;
    uint4 cache[CACHE > 0 ? CACHE : 1];
    const int nvec = VEC ? K / E : 0;
    if (VEC) {
        const uint4* xv = reinterpret_cast<const uint4*>(xr);
#pragma unroll
        for (int i = 0; i < CACHE; ++i) {
            const int v = lane + i * G;
            if (v < nvec) {
                cache[i] = __ldg(xv + v);
#pragma unroll
                for (int j = 0; j < E; ++j) {
                    const C c = vec_get<T>(cache[i], j);
                    bad |= !finite_c(c);
                    amax = max_c(amax, abs_c(c));
                }
            }
        }
        for (int v = lane + CACHE * G; v < nvec; v += G) {
            const uint4 w = __ldg(xv + v);
#pragma unroll
            for (int j = 0; j < E; ++j) {
                const C c = vec_get<T>(w, j);
                bad |= !finite_c(c);
                amax = max_c(amax, abs_c(c));
            }
        }
    } else {
        for (int k = lane; k < K; k += G) {
            const C c = load_elem(xr + k);
            bad |= !finite_c(c);
            amax = max_c(amax, abs_c(c));
        }
    }

#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = max_c(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    bad = __any_sync(0xffffffffu, bad);
    if (!WARP_ROWS) {
        const int warp = threadIdx.x >> 5;
        if ((threadIdx.x & 31) == 0) {
            red_max[warp] = amax;
            red_bad[warp] = bad ? 1 : 0;
        }
        __syncthreads();
        amax = red_max[0];
        int any_bad = red_bad[0];
#pragma unroll
        for (int w = 1; w < WARPS; ++w) {
            amax = max_c(amax, red_max[w]);
            any_bad |= red_bad[w];
        }
        bad = any_bad != 0;
    }

    // The stored (rounded) scale is the divisor, so dequantization matches it.
    Bits sbits = Elem<T>::bits_rn(div_rn(amax, static_cast<C>(q_max)));
    const C divisor = Elem<T>::from_bits(sbits);
    const bool zero_row = !(divisor > C(0));
    if (bad) sbits = Elem<T>::kNaN;
    else if (zero_row) sbits = Elem<T>::bits_rn(C(1));
    if (lane == 0) *reinterpret_cast<Bits*>(scale + row) = sbits;

    RowQuant<C> quant;
    quant.divisor = divisor;
    quant.lo = static_cast<C>(q_min);
    quant.hi = static_cast<C>(q_max);
    quant.zero = bad || zero_row;

    if (VEC) {
        const uint4* xv = reinterpret_cast<const uint4*>(xr);
#pragma unroll
        for (int i = 0; i < CACHE; ++i) {
            const int v = lane + i * G;
            if (v < nvec) {
                int qv[E];
#pragma unroll
                for (int j = 0; j < E; ++j) qv[j] = quant(vec_get<T>(cache[i], j));
                store_q<E>(qr + static_cast<s64_t>(v) * E, qv);
            }
        }
        for (int v = lane + CACHE * G; v < nvec; v += G) {
            const uint4 w = __ldg(xv + v);
            int qv[E];
#pragma unroll
            for (int j = 0; j < E; ++j) qv[j] = quant(vec_get<T>(w, j));
            store_q<E>(qr + static_cast<s64_t>(v) * E, qv);
        }
    } else {
        for (int k = lane; k < K; k += G) qr[k] = static_cast<s8_t>(quant(load_elem(xr + k)));
    }
}

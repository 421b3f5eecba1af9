// The activation pass, fused: per-row reduction, scale (and zero point), quantization.
//
// SCHEME (compile time; the host's ActivationScheme):
//   SCHEME_DYNAMIC       amax  = max_k |x[m, k]|                  (C = f32, f64 for f64)
//                        scale = amax / q_max (IEEE division), stored rounded to T (RNE)
//                        q     = clamp(rint(x / stored_scale), q_min, q_max)
//   SCHEME_STATIC        scale = in_scale (already a T value), z = in_zp (0 when symmetric)
//                        q     = clamp(rint(x / scale) + z, q_min, q_max)
//   SCHEME_DYNAMIC_ASYM  mn, mx = row min and max in C; if mx > mn:
//                        t = (mx - mn) / (q_max - q_min), scale = T(t) if that is > 0 and
//                        finite, z = clamp(rint(q_min - mn / scale), q_min, q_max),
//                        q = clamp(rint(x / scale) + z, q_min, q_max);
//                        otherwise the row is quantized as SCHEME_DYNAMIC does, z = 0
//   Every scheme:        NaN/Inf in the row -> scale NaN, q 0, z 0
//   SCHEME_DYNAMIC:      stored scale 0 (zero row, or underflow in T) -> scale 1, q 0
// z goes to zp[m] where zp is given (the asymmetric schemes).
//
// WARP_ROWS: one warp per row (short rows); otherwise the whole block takes a row.
// VEC: 16-byte loads of x and E-byte stores of q (the host checks K * sizeof(T) % 16 == 0
// and the alignment of both pointers); otherwise element loads for any K.
// The first CACHE (possibly 0) 16-byte vectors of each thread stay in registers between
// the two passes; the rest are read again (from L1/L2), TAIL vectors at a time. Each group
// of loads is issued before any of it is used, so that several are in flight per thread.
#include "act_rows.cuh"

namespace ql {

constexpr int TAIL = 4;

// The values of SCHEME (qlinear/backends/cuda/specs.py names them the same).
constexpr int SCHEME_DYNAMIC = 0;
constexpr int SCHEME_STATIC = 1;
constexpr int SCHEME_DYNAMIC_ASYM = 2;

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

template <typename C, bool WIDE>
struct RowQuant {
    C d, r;
    int lo, hi;
    int z;  // the zero point, added after rounding (WIDE only)

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
    // WIDE (the static and asymmetric schemes): x / d is not bounded by the row's own
    // range and may overflow. At |q0| >= kSat, x / d is as far out (q0 is within 1.5 ulp
    // of it) and saturates whatever the zero point, while q1 may be inf - inf = NaN: q0
    // stands in for it.
    __device__ __forceinline__ int fast(C x) const {
        const C q0 = mul_rn(x, r);
        const C e = fma_rn(-q0, d, x);
        const C q1 = fma_rn(e, r, q0);
        if (WIDE) return finish(q0 > -kSat && q0 < kSat ? q1 : q0);
        return ::min(::max(rint_to_int(q1), lo), hi);
    }
    // Divisors outside the range above: the IEEE division itself.
    __device__ __forceinline__ int slow(C x) const {
        if (WIDE) return finish(div_rn(x, d));
        return ::min(::max(rint_to_int(div_rn(x, d)), lo), hi);
    }

    // |z| <= 128 and q_min..q_max lies within -128..127, so quotients beyond kSat saturate
    // exactly as at kSat. Clamping (an integer bound: rint commutes with it) in C before
    // the conversion keeps rint(v) + z far from int overflow.
    static constexpr C kSat = C(1024);
    __device__ __forceinline__ int finish(C v) const {
        v = v < -kSat ? -kSat : (v > kSat ? kSat : v);
        return ::min(::max(rint_to_int(v) + z, lo), hi);
    }
};

}  // namespace ql

// zp: the per-row zero points (s32), or null (the symmetric schemes). in_scale, in_zp:
// the static scheme's scale (a T value, widened to C) and zero point; unused otherwise.
template <typename T, int THREADS, bool WARP_ROWS, bool VEC, int CACHE, int SCHEME>
__global__ void __launch_bounds__(THREADS)
qlinear_act_quant(const T* __restrict__ x, ql::s8_t* __restrict__ q, T* __restrict__ scale,
                  ql::s32_t* __restrict__ zp, int M, int K, int q_min, int q_max,
                  typename ql::Elem<T>::C in_scale, int in_zp) {
    using namespace ql;
    typedef typename Elem<T>::C C;
    typedef typename Elem<T>::Bits Bits;
    static_assert(SCHEME >= SCHEME_DYNAMIC && SCHEME <= SCHEME_DYNAMIC_ASYM, "unknown SCHEME");
    constexpr bool ASYM = SCHEME == SCHEME_DYNAMIC_ASYM;
    constexpr int G = WARP_ROWS ? 32 : THREADS;  // threads sharing one row
    constexpr int E = 16 / static_cast<int>(sizeof(T));
    constexpr int WARPS = THREADS / 32;
    typedef decltype(AbsMax<T>().lane_max()) Acc;
    __shared__ Acc red_max[WARPS];
    __shared__ C red_mn[ASYM ? WARPS : 1], red_mx[ASYM ? WARPS : 1];

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
    RowRange<T, ASYM> range;
    uint4 cache[CACHE > 0 ? CACHE : 1];
    if (VEC) {
#pragma unroll
        for (int i = 0; i < CACHE; ++i) cache[i] = load_vec(xv, lane + i * G, nvec);
#pragma unroll
        for (int i = 0; i < CACHE; ++i) {
            absmax.vec(cache[i]);
            // The zeros past the row's end would be values of the range.
            if (ASYM && lane + i * G < nvec) range.vec(cache[i]);
        }
        int v = lane + CACHE * G;
#pragma unroll 1
        for (; v + (TAIL - 1) * G < nvec; v += TAIL * G) {
            uint4 w[TAIL];
#pragma unroll
            for (int u = 0; u < TAIL; ++u) w[u] = __ldg(xv + v + u * G);
#pragma unroll
            for (int u = 0; u < TAIL; ++u) {
                absmax.vec(w[u]);
                range.vec(w[u]);
            }
        }
        for (; v < nvec; v += G) {
            const uint4 w = __ldg(xv + v);
            absmax.vec(w);
            range.vec(w);
        }
    } else {
        for (int k = lane; k < K; k += G) {
            absmax.elem(xr + k);
            range.elem(xr + k);
        }
    }

    Acc m = absmax.lane_max();
    C mn = range.mn, mx = range.mx;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        m = ::max(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (ASYM) {
            mn = min_c(mn, __shfl_xor_sync(0xffffffffu, mn, o));
            mx = max_c(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        }
    }
    if (!WARP_ROWS) {
        const int warp = threadIdx.x >> 5;
        if ((threadIdx.x & 31) == 0) {
            red_max[warp] = m;
            if (ASYM) {
                red_mn[warp] = mn;
                red_mx[warp] = mx;
            }
        }
        __syncthreads();
        m = red_max[0];
#pragma unroll
        for (int w = 1; w < WARPS; ++w) m = ::max(m, red_max[w]);
        if (ASYM) {
            mn = red_mn[0];
            mx = red_mx[0];
#pragma unroll
            for (int w = 1; w < WARPS; ++w) {
                mn = min_c(mn, red_mn[w]);
                mx = max_c(mx, red_mx[w]);
            }
        }
    }
    const bool bad = m >= AbsBits<T>::kInf;
    const C amax = Elem<T>::from_bits(static_cast<Bits>(m));

    // The row's stored scale (its bits) and zero point. The stored value is the divisor,
    // so dequantization matches it.
    Bits sbits;
    int z = 0;
    if (SCHEME == SCHEME_STATIC) {
        sbits = Elem<T>::bits_rn(in_scale);  // exact: in_scale holds a T value
        z = in_zp;
    } else if (ASYM) {
        // t = (mx - mn) / (q_max - q_min); a constant row, or a t that rounds to 0 or
        // overflows in T, takes the symmetric scale amax / q_max (amax = max(|mn|, |mx|),
        // read from the bits as there) and zero point 0. u is then the zero point's
        // quotient mn / scale, or that symmetric scale. Both divisions go through one call
        // of the division's slow path (a loop that is not unrolled): around two, ptxas
        // spills the cached vectors.
        const bool spread = mx > mn;
        C num = spread ? add_rn(mx, -mn) : amax;
        C den = from_int<C>(spread ? q_max - q_min : q_max);
        Bits tbits = 0;
        bool ok = false;
        C u = C(0);
#pragma unroll 1
        for (int step = 0; step < 2; ++step) {
            const C quotient = div_rn(num, den);
            if (step == 0) {
                tbits = Elem<T>::bits_rn(quotient);
                const C s = Elem<T>::from_bits(tbits);
                ok = spread && s > C(0) && finite_c(s);
                num = ok ? mn : amax;
                den = ok ? s : static_cast<C>(q_max);
            } else {
                u = quotient;
            }
        }
        sbits = ok ? tbits : Elem<T>::bits_rn(u);
        if (ok) z = ::min(::max(rint_to_int(add_rn(from_int<C>(q_min), -u)), q_min), q_max);
    } else {
        sbits = Elem<T>::bits_rn(div_rn(amax, static_cast<C>(q_max)));
    }
    const C divisor = Elem<T>::from_bits(sbits);
    // A symmetric scale of 0 (a zero row, or underflow in T) is stored as 1 and every q is
    // 0; static and asymmetric scales are > 0 here.
    const bool off = bad || !(divisor > C(0));
    if (bad) {
        sbits = Elem<T>::kNaN;
        z = 0;
    } else if (off) {
        sbits = Elem<T>::bits_rn(C(1));
    }
    if (lane == 0) {
        *reinterpret_cast<Bits*>(scale + row) = sbits;
        if (SCHEME != SCHEME_DYNAMIC && zp != nullptr) zp[row] = z;
    }

    // A zero or NaN/Inf row clamps every result to 0..0 (whatever x * r gives, NaN
    // included), through the fast path with d = 1.
    RowQuant<C, SCHEME != SCHEME_DYNAMIC> quant;
    quant.d = off ? C(1) : divisor;
    quant.r = rcp_rn(quant.d);
    quant.lo = off ? 0 : q_min;
    quant.hi = off ? 0 : q_max;
    quant.z = z;

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

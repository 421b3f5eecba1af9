// Int8 GEMM on integer tensor cores (sm_80+) with the dequantization epilogue fused:
//
//   acc[m, n] = sum_k A[m, k] * W[n, k]            (mma.sync m16n8k32 s8, int32, exact)
//   acc[m, n] -= a_zp[m] * w_colsum[n]              (ZP: the asymmetric schemes, int32)
//   Y[m, n]   = ((C(acc) * C(a_scale[m])) * C(w_scale[n])) (+ C(bias[n]))   rounded once to T
//
// A (the quantized activation) is [M, K] row-major, W is [N, K] row-major: both are
// "K-contiguous", exactly the row.col operands of mma. Block tile BM x BN, k-tile 64
// bytes, STAGES-deep shared-memory pipeline filled by cp.async (zero-filled past the
// edges). Each warp owns a (BM / WARPS_M) x (BN / WARPS_N) sub-tile.
//
// ALIGNED: rows start 16-byte aligned (K % 16 == 0 and aligned base pointers), so
// tiles load with cp.async. Otherwise the same pipeline is filled with byte loads
// (any K, any alignment: a slow but exact path).
#include "qlinear_common.cuh"

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool ALIGNED,
          int ZP>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32)
qlinear_gemm_mma(const ql::s8_t* __restrict__ A, const T* __restrict__ a_scale,
                 const ql::s8_t* __restrict__ W, const T* __restrict__ w_scale,
                 const T* __restrict__ bias, const ql::s32_t* __restrict__ a_zp,
                 const ql::s32_t* __restrict__ w_colsum, T* __restrict__ Y, int M, int N,
                 int K, int pair_ok) {
    using namespace ql;
    typedef typename Elem<T>::C C;
    typedef typename Elem<T>::Bits Bits;
    constexpr int BK = 64;
    constexpr int THREADS = WARPS_M * WARPS_N * 32;
    constexpr int WM = BM / WARPS_M;
    constexpr int WN = BN / WARPS_N;
    constexpr int MI = WM / 16;
    constexpr int NI = WN / 8;
    constexpr int STAGE_BYTES = (BM + BN) * BK;
    static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be a multiple of 16 x 8");
    static_assert(STAGES >= 2, "the pipeline needs at least two stages");
    static_assert(STAGES * STAGE_BYTES <= 48 * 1024, "static shared memory is limited to 48 KiB");
    static_assert((BM * 4) % THREADS == 0 && (BN * 4) % THREADS == 0, "tile loads must divide");
    __shared__ __align__(128) u8_t smem[STAGES * STAGE_BYTES];

    const int tiles_m = (M + BM - 1) / BM;
    const int tiles_n = (N + BN - 1) / BN;
    int tm, tn;
    tile_coords(blockIdx.x, tiles_m, tiles_n, tm, tn);
    const int m0 = tm * BM;
    const int n0 = tn * BN;

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int wm0 = (warp / WARPS_N) * WM;
    const int wn0 = (warp % WARPS_N) * WN;

    // One k-tile into one stage: BM (resp. BN) rows x four 16-byte chunks.
    auto load_tile = [&](int stage, int kt) {
        u8_t* sa = smem + stage * STAGE_BYTES;
        u8_t* sb = sa + BM * BK;
        const int k0 = kt * BK;
#pragma unroll
        for (int i = 0; i < (BM * 4) / THREADS; ++i) {
            const int c = tid + i * THREADS;
            const int r = c >> 2;
            const int kc = (c & 3) * 16;
            const int gm = m0 + r;
            const int gk = k0 + kc;
            if (ALIGNED) {
                const bool ok = gm < M && gk < K;
                const s8_t* src = ok ? A + static_cast<s64_t>(gm) * K + gk : A;
                cp_async16(sa + r * BK + kc, src, ok ? 16 : 0);
            } else {
                const uint4 v = gm < M ? load16<false>(A + static_cast<s64_t>(gm) * K, gk, K)
                                       : make_uint4(0u, 0u, 0u, 0u);
                *reinterpret_cast<uint4*>(sa + r * BK + kc) = v;
            }
        }
#pragma unroll
        for (int i = 0; i < (BN * 4) / THREADS; ++i) {
            const int c = tid + i * THREADS;
            const int r = c >> 2;
            const int kc = (c & 3) * 16;
            const int gn = n0 + r;
            const int gk = k0 + kc;
            if (ALIGNED) {
                const bool ok = gn < N && gk < K;
                const s8_t* src = ok ? W + static_cast<s64_t>(gn) * K + gk : W;
                cp_async16(sb + r * BK + kc, src, ok ? 16 : 0);
            } else {
                const uint4 v = gn < N ? load16<false>(W + static_cast<s64_t>(gn) * K, gk, K)
                                       : make_uint4(0u, 0u, 0u, 0u);
                *reinterpret_cast<uint4*>(sb + r * BK + kc) = v;
            }
        }
    };

    int acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0;

    const int KT = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KT) load_tile(s, s);
        cp_async_commit();
    }

    for (int kt = 0; kt < KT; ++kt) {
        // Groups committed so far: STAGES - 1 + kt; leaving STAGES - 2 in flight means
        // the group of tile kt has landed. The barrier then publishes every thread's
        // copies and retires the reads of the stage refilled below (tile kt - 1).
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < KT) load_tile(next % STAGES, next);
        cp_async_commit();  // possibly empty: keeps the group count in step

        const u8_t* sa = smem + (kt % STAGES) * STAGE_BYTES;
        const u8_t* sb = sa + BM * BK;
        uint4 bf[NI];
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
            bf[ni] = *reinterpret_cast<const uint4*>(sb + (wn0 + ni * 8 + g) * BK + 16 * t);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
            const uint4 a_lo = *reinterpret_cast<const uint4*>(sa + (wm0 + mi * 16 + g) * BK + 16 * t);
            const uint4 a_hi =
                *reinterpret_cast<const uint4*>(sa + (wm0 + mi * 16 + g + 8) * BK + 16 * t);
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) mma_s8_k64(acc[mi][ni], a_lo, a_hi, bf[ni]);
        }
    }
    cp_async_wait<0>();

    // Epilogue. Lane (g, t) holds rows g / g + 8 and columns 2t, 2t + 1 of each 16x8 tile.
    const bool zp_on = zp_applies<ZP>(a_zp);
    C ws[NI][2];
    int cs[NI][2];
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int n = n0 + wn0 + ni * 8 + 2 * t + j;
            ws[ni][j] = n < N ? load_elem(w_scale + n) : C(0);
            cs[ni][j] = zp_on && n < N ? __ldg(w_colsum + n) : 0;
        }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = m0 + wm0 + mi * 16 + g + 8 * h;
            if (m >= M) continue;
            const C sm = load_elem(a_scale + m);
            const int zm = zp_on ? __ldg(a_zp + m) : 0;
            T* yrow = Y + static_cast<s64_t>(m) * N;
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const int n = n0 + wn0 + ni * 8 + 2 * t;
                if (n >= N) continue;
                int a0 = acc[mi][ni][2 * h], a1 = acc[mi][ni][2 * h + 1];
                if (zp_on) {
                    a0 = zp_adjust(a0, zm, cs[ni][0]);
                    a1 = zp_adjust(a1, zm, cs[ni][1]);
                }
                const Bits b0 = store_bits<T>(dequant<T>(a0, sm, ws[ni][0], bias, n));
                if (n + 1 < N) {
                    const Bits b1 = store_bits<T>(dequant<T>(a1, sm, ws[ni][1], bias, n + 1));
                    store_two_bits(reinterpret_cast<Bits*>(yrow), n, b0, b1, pair_ok);
                } else {
                    reinterpret_cast<Bits*>(yrow)[n] = b0;
                }
            }
        }
}

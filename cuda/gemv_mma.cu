// Small-M (decode) int8 GEMM on integer tensor cores (sm_80+), where reading the
// weight once dominates. The epilogue (with the zero-point term where ZP says) is fused as
// in gemm_mma.cu.
//
// A block owns 16 rows (blockIdx.y) x NG * 8 columns (blockIdx.x) and splits K across
// its WARPS warps (split-K inside the block: no workspace, no atomics). Each warp
// streams its share of K straight from global memory with 16-byte loads, U chunks of
// 64 bytes at a time, the weights one step ahead (register double buffering), and
// feeds mma.sync from registers (one 16-byte load per row serves two m16n8k32 steps, see
// qlinear_common.cuh). The int32 partials of the warps are summed in shared memory in
// a fixed order (integers: exact, so deterministic) before the float epilogue.
//
// ALIGNED: K % 16 == 0 and 16-byte aligned base pointers; otherwise byte loads.
#include "qlinear_common.cuh"

namespace ql {

// The weights do not depend on the activation pass, but the compiler moves the
// programmatic-dependent-launch wait above the 16-byte read-only loads (they are not
// ordered against an asm memory clobber), so those loads cannot overlap it. An asm
// volatile prefetch with a memory clobber stays ahead of the (equally volatile) wait and
// warms L2 while the activation pass runs.
// Warp w takes rows w, w + 8, ... of the block (NG of its 8 * NG), lane l the line at
// byte 128 * l of the row: the first 4 KB of every row, each line once (the first two
// steps of every warp at U = 4, four at U = 2), at NG instructions per thread. Only
// rows n < N and bytes k < K: no address outside the weight tensor is touched.
// Only sm_90+ overlaps anything, so older targets skip it.
template <int WARPS, int NG>
__device__ __forceinline__ void prefetch_weights(const s8_t* W, int n0, int N, int K,
                                                 int warp, int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    static_assert((NG * 8) % WARPS == 0, "every warp prefetches the same number of rows");
    const int k = 128 * lane;
#pragma unroll
    for (int q = 0; q < NG * 8 / WARPS; ++q) {
        const int n = n0 + q * WARPS + warp;
        if (n < N && k < K) {
            const s8_t* p = W + static_cast<s64_t>(n) * K + k;
            asm volatile("prefetch.global.L2 [%0];" ::"l"(p) : "memory");
        }
    }
#endif
}

// Column of red[w][j][reg][.] that holds lane `lane`'s register `reg`. The epilogue's
// warp reads registers 2h and 2h + 1 of 16 consecutive lanes at once; swapping the
// halves of the odd registers' rows puts those 32 words in 32 distinct banks (a pad of
// 33 would not: reg + lane spans only 17 banks), and keeps each row a permutation of
// the lanes for the writes.
__device__ __forceinline__ int red_col(int reg, int lane) { return lane ^ ((reg & 1) << 4); }

}  // namespace ql

template <typename T, int WARPS, int NG, int U, bool ALIGNED, int ZP>
__global__ void __launch_bounds__(WARPS * 32)
qlinear_gemv_mma(const ql::s8_t* __restrict__ A, const T* __restrict__ a_scale,
                 const ql::s8_t* __restrict__ W, const T* __restrict__ w_scale,
                 const T* __restrict__ bias, const ql::s32_t* __restrict__ a_zp,
                 const ql::s32_t* __restrict__ w_colsum, T* __restrict__ Y, int M, int N,
                 int K, int pair_ok) {
    using namespace ql;
    typedef typename Elem<T>::C C;
    __shared__ int red[WARPS][NG][4][32];

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int n0 = blockIdx.x * (NG * 8);
    const int m0 = blockIdx.y * 16;

    const bool va = m0 + g < M;
    const bool vb = m0 + g + 8 < M;
    const s8_t* ra = A + (va ? static_cast<s64_t>(m0 + g) * K : 0);
    const s8_t* rb = A + (vb ? static_cast<s64_t>(m0 + g + 8) * K : 0);
    const s8_t* wr[NG];
    bool vn[NG];
#pragma unroll
    for (int j = 0; j < NG; ++j) {
        const int n = n0 + j * 8 + g;
        vn[j] = n < N;
        wr[j] = W + (vn[j] ? static_cast<s64_t>(n) * K : 0);
    }

    int acc[NG][4];
#pragma unroll
    for (int j = 0; j < NG; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[j][r] = 0;

    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    const int chunks = (K + 63) / 64;
    // The weights of step c (chunks c .. c + U - 1), zero past K (no load is issued there).
    auto load_w = [&](uint4 (&fw)[U][NG], int c) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = (c + u) * 64 + 16 * t;
#pragma unroll
            for (int j = 0; j < NG; ++j) fw[u][j] = vn[j] ? load16<ALIGNED>(wr[j], k, K) : zero;
        }
    };

    // Weights do not depend on the activation pass: their first lines are requested
    // before waiting for it (under programmatic dependent launch they stream while it
    // runs). Then each step requests the next step's weights before its MMAs, so
    // U * (2 * NG + 2) 16-byte loads per lane are in flight.
    prefetch_weights<WARPS, NG>(W, n0, N, K, warp, lane);
    int c0 = warp * U;
    uint4 fw[U][NG];
    load_w(fw, c0);
    wait_for_producer();
    for (; c0 < chunks; c0 += WARPS * U) {
        uint4 fa[U], fb[U], nw[U][NG];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = (c0 + u) * 64 + 16 * t;
            // A is the activation pass's output: read through L2 (see load_elem_l2).
            fa[u] = va ? load16<ALIGNED, true>(ra, k, K) : zero;
            fb[u] = vb ? load16<ALIGNED, true>(rb, k, K) : zero;
        }
        load_w(nw, c0 + WARPS * U);
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int j = 0; j < NG; ++j) mma_s8_k64(acc[j], fa[u], fb[u], fw[u][j]);
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int j = 0; j < NG; ++j) fw[u][j] = nw[u][j];
    }

#pragma unroll
    for (int j = 0; j < NG; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) red[warp][j][r][red_col(r, lane)] = acc[j][r];
    __syncthreads();

    // Output (row rr, column cc) of n-group j sits in lane (rr % 8) * 4 + cc / 2,
    // register (rr / 8) * 2 + cc % 2 of every warp. Consecutive threads take
    // consecutive columns, so the stores of a row coalesce.
    for (int e = threadIdx.x; e < NG * 128; e += WARPS * 32) {
        const int j = e >> 7;
        const int rr = (e >> 3) & 15;
        const int cc = e & 7;
        const int m = m0 + rr;
        const int n = n0 + j * 8 + cc;
        if (m >= M || n >= N) continue;
        const int src_lane = (rr & 7) * 4 + (cc >> 1);
        const int reg = (rr >> 3) * 2 + (cc & 1);
        const int col = red_col(reg, src_lane);
        int s = 0;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) s += red[w][j][reg][col];
        // The zero points are the activation pass's output, like a_scale: through L2.
        if (zp_applies<ZP>(a_zp)) s = zp_adjust(s, __ldcg(a_zp + m), __ldg(w_colsum + n));
        const C y = dequant<T>(s, load_elem_l2(a_scale + m), load_elem(w_scale + n), bias, n);
        store_elem(Y + static_cast<s64_t>(m) * N + n, y);
    }
    (void)pair_ok;
}

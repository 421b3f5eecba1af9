// Small-M (decode) int8 GEMM on integer tensor cores (sm_80+), where reading the
// weight once dominates. The epilogue is fused as in gemm_mma.cu.
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

template <typename T, int WARPS, int NG, int U, bool ALIGNED>
__global__ void __launch_bounds__(WARPS * 32)
qlinear_gemv_mma(const ql::s8_t* __restrict__ A, const T* __restrict__ a_scale,
                 const ql::s8_t* __restrict__ W, const T* __restrict__ w_scale,
                 const T* __restrict__ bias, T* __restrict__ Y, int M, int N, int K,
                 int pair_ok) {
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

    // Weights do not depend on the activation pass: the first step's are requested
    // before waiting for it (under programmatic dependent launch they stream while it
    // runs). Then each step requests the next step's weights before its MMAs, so
    // U * (2 * NG + 2) 16-byte loads per lane are in flight.
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
        for (int r = 0; r < 4; ++r) red[warp][j][r][lane] = acc[j][r];
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
        int s = 0;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) s += red[w][j][reg][src_lane];
        const C y = dequant<T>(s, load_elem_l2(a_scale + m), load_elem(w_scale + n), bias, n);
        store_elem(Y + static_cast<s64_t>(m) * N + n, y);
    }
    (void)pair_ok;
}

// Int8 GEMM for Hopper (sm_90a): warpgroup MMA (wgmma) fed by the tensor-memory copy
// engine (TMA), with the dequantization epilogue of gemm_mma.cu fused:
//
//   acc[m, n] = sum_k A[m, k] * W[n, k]            (wgmma m64n{BN}k32 s8, int32, exact)
//   acc[m, n] -= a_zp[m] * w_colsum[n]              (ZP: the asymmetric schemes, int32)
//   Y[m, n]   = ((C(acc) * C(a_scale[m])) * C(w_scale[n])) (+ C(bias[n]))   rounded once to T
//
// A (the quantized activation, [M, K]) and W ([N, K]) are both K-contiguous: the K-major
// operands wgmma reads for s8. The host describes each with a tensor map (uint8, dims
// {K, rows}, box {128, rows of the tile}, 128-byte swizzle, zero fill), so the copy engine
// loads whole tiles, zero past every edge: any M, N and any K that is a multiple of 16
// (the tensor map's row pitch; the plan routes other K to gemm_mma.cu).
//
// Block: three warpgroups of 128 threads, warp-specialised.
//   warpgroup 0, the producer: gives most of its registers away (setmaxnreg) and one
//     thread keeps the pipeline full: for every k-tile, wait until the stage is free,
//     announce its bytes on the stage's `full` barrier, start the two tile copies;
//   warpgroups 1 and 2, the consumers: take the registers and own 64 rows each of the
//     128 x BN tile; per k-tile four wgmma k32 steps from the stage, then they release
//     the previous stage (its MMAs are done once at most one group is in flight) with one
//     arrival per warp on its `empty` barrier. After the last k-tile, the epilogue goes
//     straight from the accumulator fragments to Y.
// Persistent: the grid has at most one block per SM; block b takes tiles b, b + gridDim.x,
// ... in the grouped rasterisation of qlinear_common.cuh. The stage ring and its phases
// run on across tiles, so the producer loads the next tile while the consumers finish
// the last one and write its outputs.
//
// Shared memory (dynamic, above 48 KiB: the host raises the kernel's limit), from a
// 1024-byte aligned base: STAGES x [A tile 128 x 128 B | W tile BN x 128 B], then the
// STAGES full and STAGES empty barriers. Tiles are 128-byte swizzled as hopper.cuh says.
// Only the copy engine writes the tiles and only the tensor cores read them (both the
// async proxy, ordered by the barriers), and the epilogue stores straight to global
// memory, so no ordinary store ever feeds the async proxy: the one proxy fence needed is
// the one that publishes the initialised barriers.
#include "qlinear_common.cuh"
#include "hopper.cuh"

namespace ql {
constexpr int WGMMA_BM = 128;       // rows of a tile: two consumer warpgroups x 64
constexpr int WGMMA_BK = 128;       // bytes of K per stage: one swizzled row
constexpr int WGMMA_THREADS = 384;  // producer + two consumers
constexpr int WGMMA_CONSUMER_WARPS = 8;
// Registers per thread after the hand-over (the launch-bounds cap is 65536 / 384 = 168):
// 128 x 40 + 256 x 232 = 64512 of the SM's 65536.
constexpr int WGMMA_PRODUCER_REGS = 40;
constexpr int WGMMA_CONSUMER_REGS = 232;
}  // namespace ql

template <typename T, int BN, int STAGES, int ZP>
__global__ void __launch_bounds__(ql::WGMMA_THREADS, 1)
qlinear_gemm_wgmma(const __grid_constant__ ql::TmaMap map_a,
                   const __grid_constant__ ql::TmaMap map_w, const T* __restrict__ a_scale,
                   const T* __restrict__ w_scale, const T* __restrict__ bias,
                   const ql::s32_t* __restrict__ a_zp, const ql::s32_t* __restrict__ w_colsum,
                   T* __restrict__ Y, int M, int N, int K, int pair_ok) {
    using namespace ql;
    typedef typename Elem<T>::C C;
    typedef typename Elem<T>::Bits Bits;
    constexpr int BM = WGMMA_BM;
    constexpr int BK = WGMMA_BK;
    constexpr int A_BYTES = BM * BK;
    constexpr int STAGE_BYTES = (BM + BN) * BK;
    constexpr int NACC = BN / 2;  // s32 accumulators per consumer thread
    static_assert(BN == 128 || BN == 256, "wgmma tiles are 128 or 256 columns wide");
    static_assert(BK == SW128_ROW_BYTES, "a stage's rows are one 128-byte swizzle row");
    static_assert(A_BYTES % SW128_ATOM_BYTES == 0 && STAGE_BYTES % SW128_ATOM_BYTES == 0,
                  "every tile starts on a swizzle atom");

    extern __shared__ u8_t smem_raw[];
    u8_t* smem = smem_raw + ((SW128_ATOM_BYTES - (smem_addr(smem_raw) % SW128_ATOM_BYTES)) %
                             SW128_ATOM_BYTES);
    u64_t* full = reinterpret_cast<u64_t*>(smem + STAGES * STAGE_BYTES);
    u64_t* empty = full + STAGES;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full + s, 1);
            mbar_init(empty + s, WGMMA_CONSUMER_WARPS);
        }
        mbar_init_fence();
    }
    __syncthreads();

    const int tiles_m = (M + BM - 1) / BM;
    const int tiles_n = (N + BN - 1) / BN;
    const int tiles = tiles_m * tiles_n;
    const int KT = (K + BK - 1) / BK;
    const int warpgroup = threadIdx.x / 128;

    if (warpgroup == 0) {
        regs_release<WGMMA_PRODUCER_REGS>();
        if (threadIdx.x == 0) {
            tma_prefetch_map(&map_a);
            tma_prefetch_map(&map_w);
            int stage = 0;
            u32_t phase = 0;
            for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
                int tm, tn;
                tile_coords(tile, tiles_m, tiles_n, tm, tn);
                for (int kt = 0; kt < KT; ++kt) {
                    // A fresh barrier counts its previous phase (parity 1) as complete,
                    // so the first pass over the ring does not wait.
                    mbar_wait(empty + stage, phase ^ 1);
                    mbar_arrive_expect_tx(full + stage, STAGE_BYTES);
                    u8_t* sa = smem + stage * STAGE_BYTES;
                    tma_load_2d(sa, &map_a, kt * BK, tm * BM, full + stage);
                    tma_load_2d(sa + A_BYTES, &map_w, kt * BK, tn * BN, full + stage);
                    if (++stage == STAGES) {
                        stage = 0;
                        phase ^= 1;
                    }
                }
            }
        }
        return;
    }

    regs_acquire<WGMMA_CONSUMER_REGS>();
    const int wg = warpgroup - 1;  // rows 64 * wg .. 64 * wg + 63 of the tile
    const int warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    const int g = lane >> 2;
    const int t = lane & 3;
    const bool zp_on = zp_applies<ZP>(a_zp);

    int acc[NACC];
    int stage = 0;
    u32_t phase = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        int tm, tn;
        tile_coords(tile, tiles_m, tiles_n, tm, tn);
#pragma unroll
        for (int i = 0; i < NACC; ++i) acc[i] = 0;
        int held = -1;  // the stage whose MMAs may still be running
        for (int kt = 0; kt < KT; ++kt) {
            mbar_wait(full + stage, phase);
            const u32_t a_tile = smem_addr(smem + stage * STAGE_BYTES) + wg * 64 * BK;
            const u32_t w_tile = smem_addr(smem + stage * STAGE_BYTES + A_BYTES);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 32; ++kk)
                wgmma_s8<BN>(acc, wgmma_desc(a_tile + 32 * kk), wgmma_desc(w_tile + 32 * kk), 1);
            wgmma_commit();
            wgmma_wait<1>();
            if (held >= 0 && lane == 0) mbar_arrive(empty + held);
            held = stage;
            if (++stage == STAGES) {
                stage = 0;
                phase ^= 1;
            }
        }
        wgmma_wait<0>();
        if (held >= 0 && lane == 0) mbar_arrive(empty + held);

        // Epilogue: lane (g, t) of warp w holds rows 16w + g and 16w + g + 8 of its 64,
        // columns 8j + 2t and 8j + 2t + 1 of every 8-column block j.
        const int n0 = tn * BN;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = tm * BM + wg * 64 + warp * 16 + g + 8 * h;
            if (m >= M) continue;
            const C sm = load_elem(a_scale + m);
            const int zm = zp_on ? __ldg(a_zp + m) : 0;
            T* yrow = Y + static_cast<s64_t>(m) * N;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const int n = n0 + 8 * j + 2 * t;
                if (n >= N) continue;
                int a0 = acc[4 * j + 2 * h];
                if (zp_on) a0 = zp_adjust(a0, zm, __ldg(w_colsum + n));
                const Bits b0 = store_bits<T>(dequant<T>(a0, sm, load_elem(w_scale + n), bias, n));
                if (n + 1 < N) {
                    int a1 = acc[4 * j + 2 * h + 1];
                    if (zp_on) a1 = zp_adjust(a1, zm, __ldg(w_colsum + n + 1));
                    const Bits b1 = store_bits<T>(
                        dequant<T>(a1, sm, load_elem(w_scale + n + 1), bias, n + 1));
                    store_two_bits(reinterpret_cast<Bits*>(yrow), n, b0, b1, pair_ok);
                } else {
                    reinterpret_cast<Bits*>(yrow)[n] = b0;
                }
            }
        }
    }
}

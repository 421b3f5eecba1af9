// Int8 GEMM with __dp4a (sm_75: no cp.async, no m16n8k32 integer MMA), dequantization
// epilogue (with the zero-point term where ZP says) fused as in gemm_mma.cu.
//
// Block tile BM x BN, k-tile 32 bytes held in shared memory as int32 words, k-major
// (As[word][row]), padded by 4 words so that the transposing stores of a warp hit 32
// distinct banks. Thread (tx, ty) owns rows ty + i * (BM / TM) and columns
// tx + j * (BN / TN): strided, so that a warp's shared reads and global stores are
// contiguous. Plain loads (16-byte when ALIGNED, bytes otherwise); zero past the edges.
#include "qlinear_common.cuh"

template <typename T, int BM, int BN, int TM, int TN, bool ALIGNED, int ZP>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
qlinear_gemm_dp4a(const ql::s8_t* __restrict__ A, const T* __restrict__ a_scale,
                  const ql::s8_t* __restrict__ W, const T* __restrict__ w_scale,
                  const T* __restrict__ bias, const ql::s32_t* __restrict__ a_zp,
                  const ql::s32_t* __restrict__ w_colsum, T* __restrict__ Y, int M, int N,
                  int K, int pair_ok) {
    using namespace ql;
    typedef typename Elem<T>::C C;
    constexpr int TX = BN / TN;
    constexpr int TY = BM / TM;
    constexpr int THREADS = TX * TY;
    constexpr int BK = 32;
    constexpr int KW = BK / 4;
    __shared__ int As[KW][BM + 4];
    __shared__ int Bs[KW][BN + 4];

    const int tiles_m = (M + BM - 1) / BM;
    const int tiles_n = (N + BN - 1) / BN;
    int tm, tn;
    tile_coords(blockIdx.x, tiles_m, tiles_n, tm, tn);
    const int m0 = tm * BM;
    const int n0 = tn * BN;
    const int tid = threadIdx.x;
    const int tx = tid % TX;
    const int ty = tid / TX;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    int acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0;

    for (int k0 = 0; k0 < K; k0 += BK) {
        // Two 16-byte chunks per row; chunk h covers words 4h..4h+3.
        for (int c = tid; c < BM * 2; c += THREADS) {
            const int r = c >> 1;
            const int h = c & 1;
            const int gm = m0 + r;
            const uint4 v = gm < M ? load16<ALIGNED>(A + static_cast<s64_t>(gm) * K, k0 + 16 * h, K) : zero;
            As[4 * h + 0][r] = static_cast<int>(v.x);
            As[4 * h + 1][r] = static_cast<int>(v.y);
            As[4 * h + 2][r] = static_cast<int>(v.z);
            As[4 * h + 3][r] = static_cast<int>(v.w);
        }
        for (int c = tid; c < BN * 2; c += THREADS) {
            const int r = c >> 1;
            const int h = c & 1;
            const int gn = n0 + r;
            const uint4 v = gn < N ? load16<ALIGNED>(W + static_cast<s64_t>(gn) * K, k0 + 16 * h, K) : zero;
            Bs[4 * h + 0][r] = static_cast<int>(v.x);
            Bs[4 * h + 1][r] = static_cast<int>(v.y);
            Bs[4 * h + 2][r] = static_cast<int>(v.z);
            Bs[4 * h + 3][r] = static_cast<int>(v.w);
        }
        __syncthreads();
#pragma unroll
        for (int kw = 0; kw < KW; ++kw) {
            int a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) a[i] = As[kw][ty + i * TY];
#pragma unroll
            for (int j = 0; j < TN; ++j) b[j] = Bs[kw][tx + j * TX];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

    const bool zp_on = zp_applies<ZP>(a_zp);
    C ws[TN];
    int cs[TN];
#pragma unroll
    for (int j = 0; j < TN; ++j) {
        const int n = n0 + tx + j * TX;
        ws[j] = n < N ? load_elem(w_scale + n) : C(0);
        cs[j] = zp_on && n < N ? __ldg(w_colsum + n) : 0;
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + ty + i * TY;
        if (m >= M) continue;
        const C sm = load_elem(a_scale + m);
        const int zm = zp_on ? __ldg(a_zp + m) : 0;
        T* yrow = Y + static_cast<s64_t>(m) * N;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tx + j * TX;
            const int a = zp_on ? zp_adjust(acc[i][j], zm, cs[j]) : acc[i][j];
            if (n < N) store_elem(yrow + n, dequant<T>(a, sm, ws[j], bias, n));
        }
    }
    (void)pair_ok;
}

"""Host-side emulation of the CUDA kernels' index math, checked against an int64 oracle.

No GPU here, so this re-enacts, lane by lane, what ``cuda/gemm_mma.cu``,
``cuda/gemv_mma.cu`` and ``cuda/gemm_dp4a.cu`` do with their indices: which bytes each
lane loads into which register, the ``mma.sync.m16n8k32.row.col.s8`` fragment layout of
the PTX ISA, the accumulator-to-output mapping, the split-K reduction and the tile
rasterisation. A wrong offset, a swapped register or a missed tail shows up as a
mismatch with ``A @ W.T``. The asymmetric schemes' zero-point term
``acc - zp[m] * colsum[n]`` (32-bit wrapping arithmetic) is applied where each kernel
applies it, with the row and column each thread loads its zero point and column sum
for, and compared with the int64 ``A @ W.T - zp * colsum``. (The float numerics of the
epilogue and the activation pass are the same formulas as the cpu backend and are
checked on a GPU by the shared suite; tests/test_cuda_act_numerics.py emulates the
activation pass's arithmetic.)
"""

import numpy as np
import pytest

from qlinear.backends import cuda as qc
from qlinear.backends.cuda import specs

LANES = np.arange(32)
G = LANES >> 2
T = LANES & 3


# ----------------------------------------------------------------------------------
# mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32, per the PTX ISA fragment tables:
#   A (16x32): a_i, i = 0..15, in 4 registers of 4 bytes (a0 lowest byte of reg 0)
#       row = g for i < 4 or 8 <= i < 12, else g + 8
#       col = 4t + (i & 3) (+ 16 for i >= 8)
#   B (32x8): b_i, i = 0..7, in 2 registers
#       row = 4t + (i & 3) (+ 16 for i >= 4), col = g
#   C/D (16x8) s32: c_i, i = 0..3
#       row = g (i < 2) or g + 8, col = 2t + (i & 1)

def _a_index():
    rows = np.empty((32, 16), int)
    cols = np.empty((32, 16), int)
    for i in range(16):
        rows[:, i] = np.where((i < 4) | ((i >= 8) & (i < 12)), G, G + 8)
        cols[:, i] = 4 * T + (i & 3) + (16 if i >= 8 else 0)
    return rows, cols


def _b_index():
    rows = np.empty((32, 8), int)
    cols = np.empty((32, 8), int)
    for i in range(8):
        rows[:, i] = 4 * T + (i & 3) + (16 if i >= 4 else 0)
        cols[:, i] = G
    return rows, cols


A_ROWS, A_COLS = _a_index()
B_ROWS, B_COLS = _b_index()
C_ROWS = np.stack([G, G, G + 8, G + 8], axis=1)
C_COLS = np.stack([2 * T, 2 * T + 1, 2 * T, 2 * T + 1], axis=1)


def _bytes(words):
    """[32, n] uint32 registers -> [32, 4n] signed bytes, lowest byte first."""
    w = np.ascontiguousarray(words, dtype="<u4")
    return w.view(np.int8).reshape(32, -1).astype(np.int64)


def mma(c, a_regs, b_regs):
    """c[32, 4] += D of one m16n8k32 s8 MMA from per-lane registers."""
    a = np.zeros((16, 32), np.int64)
    b = np.zeros((32, 8), np.int64)
    a[A_ROWS, A_COLS] = _bytes(a_regs)
    b[B_ROWS, B_COLS] = _bytes(b_regs)
    d = a @ b
    c += d[C_ROWS, C_COLS]


def words16(rows_bytes):
    """[32, 16] uint8 (one 16-byte load per lane) -> [32, 4] uint32 (x, y, z, w)."""
    return np.ascontiguousarray(rows_bytes, dtype=np.uint8).view("<u4").reshape(32, 4)


def mma_k64(c, lo, hi, col):
    """qlinear_common.cuh's mma_s8_k64: bytes 0-7 then 8-15 of each lane's chunk."""
    mma(c, np.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], 1), col[:, 0:2])
    mma(c, np.stack([lo[:, 2], hi[:, 2], lo[:, 3], hi[:, 3]], 1), col[:, 2:4])


def load16(mat, row, k, K, aligned):
    """load16<ALIGNED>(mat[row], k, K) for every lane: 16 bytes from k, zero past K.
    ``row`` is None for lanes that load nothing (the kernels then pass zeros)."""
    out = np.zeros((32, 16), np.uint8)
    for lane in range(32):
        r, kk = row[lane], int(k[lane])
        if r is None:
            continue
        if aligned:
            assert K % 16 == 0 and kk % 16 == 0
            if kk < K:
                out[lane] = mat[r, kk:kk + 16].view(np.uint8)
        else:
            n = max(0, min(16, K - kk))
            out[lane, :n] = mat[r, kk:kk + n].view(np.uint8)
    return out


def tile_coords(pid, tiles_m, tiles_n):
    """qlinear_common.cuh's grouped rasterisation."""
    group = 8
    width = group * tiles_n
    first_m = (pid // width) * group
    rows = min(tiles_m - first_m, group)
    in_group = pid % width
    return first_m + in_group % rows, in_group // rows


def oracle(a, w, zp=None):
    acc = a.astype(np.int64) @ w.astype(np.int64).T
    if zp is not None:
        acc = acc - zp.astype(np.int64)[:, None] * w.astype(np.int64).sum(axis=1)[None, :]
        assert np.all(np.abs(acc) < 2**31)
    return acc


def zp_adjust(acc, zp_m, colsum_n):
    """qlinear_common.cuh's zp_adjust: ``acc - zp_m * colsum_n`` in uint32 arithmetic,
    read back as int32."""
    def u32(v):
        return (np.asarray(v, np.int64) & 0xFFFFFFFF).astype(np.uint64)

    with np.errstate(over="ignore"):  # modular on purpose: mod 2**64, then 2**32
        v = (u32(acc) - u32(zp_m) * u32(colsum_n)) & np.uint64(0xFFFFFFFF)
    v = v.astype(np.int64)
    return np.where(v >= 1 << 31, v - (1 << 32), v)


def at(vec, idx, limit):
    """``idx < limit ? vec[idx] : 0`` elementwise (the kernels' guarded loads)."""
    idx = np.asarray(idx)
    return np.where(idx < limit, vec[np.minimum(idx, limit - 1)], 0)


def zero_points(rng, m):
    """Random per-row zero points, as the activation pass writes them."""
    return rng.integers(-128, 128, size=m).astype(np.int32)


def colsum_of(w):
    return w.astype(np.int64).sum(axis=1).astype(np.int32)


def random_s8(rng, shape):
    return rng.integers(-128, 128, size=shape, dtype=np.int64).astype(np.int8)


# ----------------------------------------------------------------------------------


def test_mma_emulation_is_a_matmul():
    # The fragment tables above, fed the natural (unpermuted) layout, compute A @ B.
    rng = np.random.default_rng(1)
    a = random_s8(rng, (16, 32))
    b = random_s8(rng, (32, 8))
    a_regs = np.zeros((32, 16), np.int8)
    a_regs[:, :] = a[A_ROWS, A_COLS]
    b_regs = b[B_ROWS, B_COLS]
    c = np.zeros((32, 4), np.int64)
    mma(c, a_regs.view("<u4").reshape(32, 4),
        np.ascontiguousarray(b_regs).view("<u4").reshape(32, 2))
    d = np.zeros((16, 8), np.int64)
    d[C_ROWS, C_COLS] = c
    np.testing.assert_array_equal(d, a.astype(np.int64) @ b.astype(np.int64))


@pytest.mark.parametrize("tiles_m,tiles_n", [(1, 1), (3, 5), (8, 2), (9, 7), (17, 3), (40, 1)])
def test_tile_rasterisation_is_a_bijection(tiles_m, tiles_n):
    seen = {tile_coords(pid, tiles_m, tiles_n) for pid in range(tiles_m * tiles_n)}
    assert seen == {(i, j) for i in range(tiles_m) for j in range(tiles_n)}


def emulate_gemm_mma(a, w, tile, aligned, zp=None, colsum=None):
    bm, bn, warps_m, warps_n, stages = specs.MMA_TILES[tile]
    cs_all = colsum_of(w) if colsum is None else colsum
    BK = 64
    M, K = a.shape
    N = w.shape[0]
    wm, wn = bm // warps_m, bn // warps_n
    mi_n, ni_n = wm // 16, wn // 8
    tiles_m, tiles_n = -(-M // bm), -(-N // bn)
    y = np.full((M, N), np.iinfo(np.int64).min)
    for pid in range(tiles_m * tiles_n):
        tm, tn = tile_coords(pid, tiles_m, tiles_n)
        m0, n0 = tm * bm, tn * bn
        acc = np.zeros((warps_m * warps_n, mi_n, ni_n, 32, 4), np.int64)
        for kt in range(-(-K // BK)):
            k0 = kt * BK
            sa = np.zeros((bm, BK), np.uint8)
            sb = np.zeros((bn, BK), np.uint8)
            for smem, mat, base, limit in ((sa, a, m0, M), (sb, w, n0, N)):
                for c in range(smem.shape[0] * 4):
                    r, kc = c >> 2, (c & 3) * 16
                    gr, gk = base + r, k0 + kc
                    if gr >= limit:
                        continue
                    if aligned:  # cp.async 16 bytes or a zero fill
                        if gk < K:
                            smem[r, kc:kc + 16] = mat[gr, gk:gk + 16].view(np.uint8)
                    else:
                        n = max(0, min(16, K - gk))
                        smem[r, kc:kc + n] = mat[gr, gk:gk + n].view(np.uint8)
            for warp in range(warps_m * warps_n):
                wm0, wn0 = (warp // warps_n) * wm, (warp % warps_n) * wn
                cols = 16 * T[:, None] + np.arange(16)[None, :]
                bf = [words16(sb[(wn0 + ni * 8 + G)[:, None], cols]) for ni in range(ni_n)]
                for mi in range(mi_n):
                    lo = words16(sa[(wm0 + mi * 16 + G)[:, None], cols])
                    hi = words16(sa[(wm0 + mi * 16 + G + 8)[:, None], cols])
                    for ni in range(ni_n):
                        mma_k64(acc[warp, mi, ni], lo, hi, bf[ni])
        for warp in range(warps_m * warps_n):
            wm0, wn0 = (warp // warps_n) * wm, (warp % warps_n) * wn
            # The epilogue's cs[ni][j], loaded before the row loop, and each row's zm.
            cs = [[at(cs_all, n0 + wn0 + ni * 8 + 2 * T + j, N) for j in range(2)]
                  for ni in range(ni_n)]
            for mi in range(mi_n):
                for h in range(2):
                    m = m0 + wm0 + mi * 16 + G + 8 * h
                    zm = None if zp is None else at(zp, m, M)
                    for ni in range(ni_n):
                        for j in range(2):
                            n = n0 + wn0 + ni * 8 + 2 * T + j
                            ok = (m < M) & (n < N)
                            unwritten = y[m[ok], n[ok]] == np.iinfo(np.int64).min
                            assert unwritten.all(), "written twice"
                            v = acc[warp, mi, ni, :, 2 * h + j]
                            if zp is not None:
                                v = zp_adjust(v, zm, cs[ni][j])
                            y[m[ok], n[ok]] = v[ok]
    return y


@pytest.mark.parametrize("tile", list(specs.MMA_TILES))
@pytest.mark.parametrize("m,n,k,aligned", [
    (1, 8, 64, True), (70, 72, 128, True), (130, 136, 208, True), (17, 130, 48, True),
    (33, 19, 3, False), (65, 65, 1, False), (20, 70, 77, False), (3, 5, 0, True),
])
def test_gemm_mma_index_math(tile, m, n, k, aligned):
    rng = np.random.default_rng(m * 1000 + n + k)
    a = random_s8(rng, (m, k))
    w = random_s8(rng, (n, k))
    y = emulate_gemm_mma(a, w, tile, aligned)
    np.testing.assert_array_equal(y, oracle(a, w))
    zp = zero_points(rng, m)
    y = emulate_gemm_mma(a, w, tile, aligned, zp)
    np.testing.assert_array_equal(y, oracle(a, w, zp))


def red_col(reg, lane):
    """gemv_mma.cu's red_col: the column of ``red[w][j][reg][.]`` holding ``lane``."""
    return lane ^ ((reg & 1) << 4)


def red_word(w, j, reg, col, ngroups):
    """The 4-byte word of ``red[w][j][reg][col]`` in ``int red[WARPS][NG][4][32]``."""
    return ((w * ngroups + j) * 4 + reg) * 32 + col


def epilogue_elements(tid, ngroups, warps):
    """``(j, rr, cc)`` of each trip of thread ``tid``'s loop
    ``for (e = threadIdx.x; e < NG * 128; e += WARPS * 32)``."""
    for e in range(tid, ngroups * 128, warps * 32):
        yield e >> 7, (e >> 3) & 15, e & 7


def emulate_gemv(a, w, ngroups, aligned, warps=specs.GEMV_WARPS, zp=None):
    unroll = specs.gemv_unroll(ngroups)
    cs_all = colsum_of(w)
    M, K = a.shape
    N = w.shape[0]
    y = np.full((M, N), np.iinfo(np.int64).min)
    chunks = -(-K // 64)
    for bx in range(-(-N // (8 * ngroups))):
        for by in range(-(-M // 16)):
            n0, m0 = bx * 8 * ngroups, by * 16
            red = np.zeros((warps, ngroups, 4, 32), np.int64)
            rows_a = [m0 + g if m0 + g < M else None for g in G]
            rows_b = [m0 + g + 8 if m0 + g + 8 < M else None for g in G]
            cols = [[n0 + j * 8 + g if n0 + j * 8 + g < N else None for g in G]
                    for j in range(ngroups)]
            for warp in range(warps):
                acc = np.zeros((ngroups, 32, 4), np.int64)
                for c0 in range(warp * unroll, chunks, warps * unroll):
                    for u in range(unroll):
                        k = (c0 + u) * 64 + 16 * T
                        fa = words16(load16(a, rows_a, k, K, aligned))
                        fb = words16(load16(a, rows_b, k, K, aligned))
                        for j in range(ngroups):
                            fw = words16(load16(w, cols[j], k, K, aligned))
                            mma_k64(acc[j], fa, fb, fw)
                for j in range(ngroups):
                    for r in range(4):
                        red[warp, j, r, red_col(r, LANES)] = acc[j, :, r]
            for tid in range(warps * 32):
                for j, rr, cc in epilogue_elements(tid, ngroups, warps):
                    m, n = m0 + rr, n0 + j * 8 + cc
                    if m >= M or n >= N:
                        continue
                    lane, reg = (rr & 7) * 4 + (cc >> 1), (rr >> 3) * 2 + (cc & 1)
                    assert y[m, n] == np.iinfo(np.int64).min, "written twice"
                    v = red[:, j, reg, red_col(reg, lane)].sum()
                    if zp is not None:
                        v = int(zp_adjust(v, zp[m], cs_all[n]))
                    y[m, n] = v
    return y


@pytest.mark.parametrize("ngroups", specs.GEMV_NGROUPS)
@pytest.mark.parametrize("m,n,k,aligned", [
    (1, 8, 64, True), (16, 40, 1024, True), (5, 33, 4096 + 64 * 3, True), (9, 70, 16, True),
    (1, 3, 1, False), (16, 17, 3, False), (7, 9, 333, False), (2, 4, 0, True),
])
def test_gemv_index_math(ngroups, m, n, k, aligned):
    rng = np.random.default_rng(m * 7919 + n * 31 + k)
    a = random_s8(rng, (m, k))
    w = random_s8(rng, (n, k))
    y = emulate_gemv(a, w, ngroups, aligned)
    np.testing.assert_array_equal(y, oracle(a, w))
    zp = zero_points(rng, m)
    y = emulate_gemv(a, w, ngroups, aligned, zp=zp)
    np.testing.assert_array_equal(y, oracle(a, w, zp))


def bank_ways(words):
    """Shared-memory wavefronts of one warp access: the most distinct 4-byte words that
    fall in one of the 32 banks (the same word twice is a broadcast, not a conflict)."""
    banks = {}
    for word in set(int(x) for x in words):
        banks.setdefault(word % 32, set()).add(word)
    return max((len(v) for v in banks.values()), default=0)


@pytest.mark.parametrize("ngroups", specs.GEMV_NGROUPS)
@pytest.mark.parametrize("m,n_cols", [(16, None), (9, None), (1, None), (16, 5)])
def test_gemv_reduction_has_no_bank_conflicts(ngroups, m, n_cols):
    """Both phases of the split-K reduction in shared memory, one warp access at a time,
    from the kernel's own index formulas: every access is one wavefront."""
    warps = specs.GEMV_WARPS
    n = n_cols if n_cols is not None else 8 * ngroups
    # Phase 1: red[warp][j][r][red_col(r, lane)] = acc[j][r], one store per (j, r).
    for warp in range(warps):
        for j in range(ngroups):
            for r in range(4):
                words = red_word(warp, j, r, red_col(r, LANES), ngroups)
                assert bank_ways(words) == 1, ("write", warp, j, r)
    # Phase 2: each thread sums red[w][j][reg][red_col(reg, src_lane)] over w for its
    # outputs; the 32 threads of a warp run the same trip of the loop together.
    for warp in range(warps):
        trips = [list(epilogue_elements(warp * 32 + lane, ngroups, warps)) for lane in LANES]
        for trip in range(max(len(t) for t in trips)):
            for w in range(warps):
                words = []
                for lane in LANES:
                    if trip >= len(trips[lane]):
                        continue
                    j, rr, cc = trips[lane][trip]
                    if rr >= m or j * 8 + cc >= n:
                        continue  # the thread skips outputs past M or N
                    src_lane, reg = (rr & 7) * 4 + (cc >> 1), (rr >> 3) * 2 + (cc & 1)
                    words.append(red_word(w, j, reg, red_col(reg, src_lane), ngroups))
                assert bank_ways(words) <= 1, ("read", warp, trip, w, sorted(words))


def emulate_dp4a(a, w, tile, aligned, zp=None):
    bm, bn, tm_, tn_ = specs.DP4A_TILES[tile]
    cs_all = colsum_of(w)
    tx_n, ty_n = bn // tn_, bm // tm_
    M, K = a.shape
    N = w.shape[0]
    tiles_m, tiles_n = -(-M // bm), -(-N // bn)
    y = np.full((M, N), np.iinfo(np.int64).min)
    tid = np.arange(tx_n * ty_n)
    tx, ty = tid % tx_n, tid // tx_n
    for pid in range(tiles_m * tiles_n):
        tm, tn = tile_coords(pid, tiles_m, tiles_n)
        m0, n0 = tm * bm, tn * bn
        acc = np.zeros((len(tid), tm_, tn_), np.int64)
        for k0 in range(0, K, 32):
            sh = {}
            for key, mat, base, limit, rows in (("a", a, m0, M, bm), ("b", w, n0, N, bn)):
                s = np.zeros((8, rows), np.int64)
                for c in range(rows * 2):
                    r, h = c >> 1, c & 1
                    if base + r >= limit:
                        continue
                    chunk = load16(mat, [base + r] + [None] * 31,
                                   np.full(32, k0 + 16 * h), K, aligned)[0]
                    s[4 * h:4 * h + 4, r] = chunk.view("<u4")
                sh[key] = s
            for kw in range(8):
                av = np.stack([sh["a"][kw, ty + i * ty_n] for i in range(tm_)], 1)
                bv = np.stack([sh["b"][kw, tx + j * tx_n] for j in range(tn_)], 1)
                ab = av.astype("<u4").view(np.int8).reshape(len(tid), tm_, 4).astype(np.int64)
                bb = bv.astype("<u4").view(np.int8).reshape(len(tid), tn_, 4).astype(np.int64)
                acc += np.einsum("tik,tjk->tij", ab, bb)  # __dp4a: 4 s8 products + c
        cs = [at(cs_all, n0 + tx + j * tx_n, N) for j in range(tn_)]
        for i in range(tm_):
            m = m0 + ty + i * ty_n
            zm = None if zp is None else at(zp, m, M)
            for j in range(tn_):
                n = n0 + tx + j * tx_n
                ok = (m < M) & (n < N)
                assert (y[m[ok], n[ok]] == np.iinfo(np.int64).min).all(), "written twice"
                v = acc[:, i, j] if zp is None else zp_adjust(acc[:, i, j], zm, cs[j])
                y[m[ok], n[ok]] = v[ok]
    return y


@pytest.mark.parametrize("tile", list(specs.DP4A_TILES))
@pytest.mark.parametrize("m,n,k,aligned", [
    (1, 8, 32, True), (20, 130, 96, True), (130, 9, 48, True), (3, 3, 3, False),
    (17, 129, 45, False),
])
def test_dp4a_index_math(tile, m, n, k, aligned):
    rng = np.random.default_rng(m * 31 + n * 7 + k)
    a = random_s8(rng, (m, k))
    w = random_s8(rng, (n, k))
    y = emulate_dp4a(a, w, tile, aligned)
    np.testing.assert_array_equal(y, oracle(a, w))
    zp = zero_points(rng, m)
    y = emulate_dp4a(a, w, tile, aligned, zp)
    np.testing.assert_array_equal(y, oracle(a, w, zp))


def test_emulated_kernels_match_the_sources():
    """The constants the emulation reads from the backend are the ones in the sources."""
    gemm = qc.expand_source("gemm_mma.cu")
    assert "constexpr int BK = 64;" in gemm
    assert "(wm0 + mi * 16 + g) * BK + 16 * t" in gemm
    assert "(wn0 + ni * 8 + g) * BK + 16 * t" in gemm
    common = gemm
    assert "mma_s8(c, row_g.x, row_g8.x, row_g.y, row_g8.y, col_g.x, col_g.y);" in common
    assert "mma_s8(c, row_g.z, row_g8.z, row_g.w, row_g8.w, col_g.z, col_g.w);" in common
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in common
    gemv = qc.expand_source("gemv_mma.cu")
    assert "const int k = (c0 + u) * 64 + 16 * t;" in gemv
    assert "const int src_lane = (rr & 7) * 4 + (cc >> 1);" in gemv
    assert "const int reg = (rr >> 3) * 2 + (cc & 1);" in gemv
    # The shared-memory layout of the reduction (red_word, red_col, epilogue_elements).
    assert "__shared__ int red[WARPS][NG][4][32];" in gemv
    assert "int red_col(int reg, int lane) { return lane ^ ((reg & 1) << 4); }" in gemv
    assert "red[warp][j][r][red_col(r, lane)] = acc[j][r];" in gemv
    assert "const int col = red_col(reg, src_lane);" in gemv
    assert "s += red[w][j][reg][col];" in gemv
    assert "for (int e = threadIdx.x; e < NG * 128; e += WARPS * 32) {" in gemv
    assert "const int j = e >> 7;" in gemv
    assert "const int rr = (e >> 3) & 15;" in gemv and "const int cc = e & 7;" in gemv
    code = "\n".join(line.split("//")[0] for line in gemv.splitlines())
    assert code.count("red[") == 3, "the declaration and both accesses of red are tied above"
    dp4a = qc.expand_source("gemm_dp4a.cu")
    assert "a[i] = As[kw][ty + i * TY]" in dp4a and "b[j] = Bs[kw][tx + j * TX]" in dp4a
    # The zero-point term: where each kernel loads zp and colsum, and the arithmetic.
    assert ("return static_cast<int>(static_cast<u32_t>(acc) -\n"
            "                            static_cast<u32_t>(zp_m) * static_cast<u32_t>(colsum_n));"
            in gemm)
    assert "cs[ni][j] = zp_on && n < N ? __ldg(w_colsum + n) : 0;" in gemm
    assert "const int n = n0 + wn0 + ni * 8 + 2 * t + j;" in gemm
    assert "const int zm = zp_on ? __ldg(a_zp + m) : 0;" in gemm
    assert "a0 = zp_adjust(a0, zm, cs[ni][0]);" in gemm
    assert "a1 = zp_adjust(a1, zm, cs[ni][1]);" in gemm
    assert "s = zp_adjust(s, __ldcg(a_zp + m), __ldg(w_colsum + n));" in gemv
    assert "cs[j] = zp_on && n < N ? __ldg(w_colsum + n) : 0;" in dp4a
    assert "const int zm = zp_on ? __ldg(a_zp + m) : 0;" in dp4a
    assert "zp_on ? zp_adjust(acc[i][j], zm, cs[j]) : acc[i][j];" in dp4a

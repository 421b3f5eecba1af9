"""Host-side emulation of the Hopper GEMM (``cuda/gemm_wgmma.cu``), checked against an int64
oracle.

No GPU here, so this models in numpy the hardware the kernel drives, as the PTX ISA
describes it, and replays the kernel's index math and schedule through the model: the copy
engine (``cp.async.bulk.tensor.2d`` with the host's tensor map: a ``rows x 128``-byte box
written through the 128-byte swizzle, an address function, zero outside the tensor, the
whole box counted as transaction bytes); mbarriers (arrival and transaction counts, phase
parity); the wgmma matrix descriptor, decoded field by field from the bits the kernel
builds (the constant parsed from cuda/hopper.cuh), and the canonical K-major layout of the
128-byte swizzle; ``wgmma.mma_async`` m64nNk32 s8 with the ISA's accumulator fragment,
asynchronous (an issued MMA reads shared memory at any time until its group is waited
for); and the kernel: the persistent grouped tile loop, the stage and phase rings, the
descriptors' start addresses, the release of a stage after ``wgmma_wait<1>``, the
epilogue's (m, n) per register with its guards and the zero-point term.

The producer, the two consumer warpgroups, the copy engine and each warpgroup's MMA unit
are coroutines interleaved under a policy (the producer running ahead with MMAs reading as
late as allowed, the consumers running ahead with copies landing as late as allowed, or at
random) over shared memory that starts as garbage. A stage refilled while its MMAs may
still read it, a wrong parity or arrival count, descriptor, swizzle or fragment shows up
as a mismatch with ``A @ W.T`` or as a deadlock; the last tests inject such faults.

What it cannot catch: hardware that behaves otherwise than the PTX ISA says (or than read
here), timing and performance, the float epilogue (the other GEMMs' ``dequant``, checked on
a GPU by the shared suite), the register hand-over, memory-ordering fences, and
interleavings none of the policies produce.
"""

import re

import numpy as np
import pytest
from test_cuda_emulation import oracle, random_s8, tile_coords, zero_points, zp_adjust

from qlinear import dtypes
from qlinear.backends import cuda as qc
from qlinear.backends.cuda import specs, tma

SOURCE = qc.expand_source("gemm_wgmma.cu")  # hopper.cuh and qlinear_common.cuh inlined


def _int_constant(name):
    return int(re.search(rf"constexpr int {name} = (\d+);", SOURCE).group(1))


BM, BK = _int_constant("WGMMA_BM"), _int_constant("WGMMA_BK")
CONSUMER_WARPS = _int_constant("WGMMA_CONSUMER_WARPS")

# The hardware's numbers (PTX ISA), stated here, not read from the kernel.
# (The swizzle's two under hopper.cuh's names; the last test compares them with the header.)
SW128_ROW_BYTES = 128    # the 128-byte swizzle: 16-byte chunks of a 128-byte row ...
SW128_ATOM_BYTES = 1024  # ... permuted by the row's index in its group of 8 rows
WGMMA_K = 32             # k of one wgmma with s8 operands
WARPGROUP = 128
ADDR_MASK = 0x3FFFF      # 18-bit shared addresses: a descriptor's 14-bit field << 4
SMEM_WINDOW = ADDR_MASK + 1


def _desc_constant():
    """WGMMA_DESC_SW128 evaluated from hopper.cuh's text: an OR of shifted terms, each an
    integer literal or a named constant of the header, optionally shifted right."""
    body = re.search(r"constexpr u64_t WGMMA_DESC_SW128 =(.*?);", SOURCE, re.S).group(1)
    term = re.compile(r"\(static_cast<u64_t>\((\w+)(?:\s*>>\s*(\d+))?\)\s*<<\s*(\d+)\)")
    assert re.fullmatch(r"[\s|]*", term.sub("", body)), body
    known = {"SW128_ATOM_BYTES": _int_constant("SW128_ATOM_BYTES")}
    value = 0
    for name, right, left in term.findall(body):
        v = int(name) if name.isdigit() else known[name]
        value |= (v >> int(right or 0)) << int(left)
    return value


DESC_SW128 = _desc_constant()


class ModelError(Exception):
    """The emulated kernel did something the hardware model rejects (deadlock, an output
    written twice, an unfinished copy or MMA at exit)."""


def swizzle(addr):
    """The 128-byte swizzle as an address function: chunk bits [4:6] ^= row bits [7:9]."""
    return addr ^ (((addr >> 7) & 7) << 4)


def tma_load(smem, mat, x, y, box, dst, swizzled=True):
    """cp.async.bulk.tensor.2d of the box {box[0] bytes, box[1] rows} of the int8 tensor
    ``mat`` at (x, y) into ``smem`` at ``dst``; zero fill outside. Returns the transaction
    bytes the copy signals (the whole box)."""
    assert dst % SW128_ATOM_BYTES == 0, "a 128-byte swizzled box starts on a swizzle atom"
    R, K = mat.shape
    r = np.arange(box[1])[:, None]
    k = np.arange(box[0])[None, :]
    gr, gk = y + r, x + k
    inside = (gr < R) & (gk < K)
    vals = np.where(inside, mat.view(np.uint8)[np.minimum(gr, R - 1), np.minimum(gk, K - 1)], 0)
    addr = dst + r * box[0] + k
    assert addr.max() < SMEM_WINDOW
    smem[swizzle(addr) if swizzled else addr] = vals
    return box[0] * box[1]


def decode_desc(desc):
    """The fields of a wgmma matrix descriptor (PTX ISA, "matrix descriptor")."""
    field = lambda lo, bits: (desc >> lo) & ((1 << bits) - 1)  # noqa: E731
    return {"start": field(0, 14) << 4, "lbo": field(16, 14) << 4, "sbo": field(32, 14) << 4,
            "base_offset": field(49, 3), "layout": field(62, 2)}


def read_operand(smem, desc, rows):
    """The [rows, 32] s8 K-major operand a descriptor names. Layout 1, the 128-byte
    swizzle: row r's 32-byte k-slice at swizzle(start + (r // 8) * SBO + (r % 8) * 128 + k);
    the leading byte offset is unused (the k-slice lies within one swizzle row)."""
    f = decode_desc(desc)
    if f["layout"] != 1 or f["base_offset"] != 0:
        raise NotImplementedError(f"only the atom-aligned 128-byte swizzle is modelled: {f}")
    r = np.arange(rows)[:, None]
    k = np.arange(WGMMA_K)[None, :]
    addr = f["start"] + (r // 8) * f["sbo"] + (r % 8) * SW128_ROW_BYTES + k
    return smem[swizzle(addr)].view(np.int8)


def d_fragment(n, swap_rows=False):
    """(row, col) of register i of each of the 128 threads of the m64nNk32 accumulator
    (PTX ISA): warp w rows 16w.., lane (g, t): d[4j + 2h + c] = (16w + g + 8h, 8j + 2t + c).
    ``swap_rows`` gives a wrong mapping, for the negative check."""
    tid = np.arange(WARPGROUP)[:, None]
    i = np.arange(n // 2)[None, :]
    warp, g, t = tid // 32, (tid % 32) // 4, tid % 4
    h = (i >> 1) & 1
    if swap_rows:
        h = 1 - h
    return 16 * warp + g + 8 * h, 8 * (i >> 2) + 2 * t + (i & 1)


class MBarrier:
    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def _complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def arrive(self, expect_tx=0):
        if self.pending == 0:
            raise ModelError("more arrivals than the barrier expects")
        self.tx += expect_tx
        self.pending -= 1
        self._complete()

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        self._complete()

    def wait(self, parity):
        """mbarrier.try_wait.parity: true once the phase of this parity has completed."""
        return lambda: (self.phase & 1) != parity


POLICIES = {  # agents, first = most eager
    "producer_ahead": ["tma", "producer", "wg0", "wg1", "mma0", "mma1"],
    "consumers_ahead": ["mma1", "mma0", "wg1", "wg0", "producer", "tma"],
    "random": ["tma", "producer", "wg0", "wg1", "mma0", "mma1"],
}


class Block:
    """One block of ``qlinear_gemm_wgmma<T, BN, STAGES, ZP>`` and the SM it runs on."""

    def __init__(self, bid, grid, a, w, zp, spec, y, rng, smem_raw, faults):
        self.bid, self.grid, self.a, self.w, self.y, self.faults = bid, grid, a, w, y, faults
        self.bn, self.stages, zp_arg = int(spec.args[1]), int(spec.args[2]), int(spec.args[3])
        self.box_a, self.box_w = [(tma.BOX_ROW_BYTES, rows) for rows in spec.tma_rows]
        self.zp = zp if zp_arg == specs.ZP_ALWAYS or (zp_arg == specs.ZP_IF_GIVEN and
                                                      zp is not None) else None
        self.colsum = w.astype(np.int64).sum(axis=1).astype(np.int32)  # the host's w_colsum
        self.stage_bytes = (BM + self.bn) * BK
        # Dynamic shared memory: garbage, the kernel's 1024-byte alignment of its base.
        self.smem = rng.integers(0, 256, SMEM_WINDOW, dtype=np.uint8)
        atom = SW128_ATOM_BYTES
        self.base = smem_raw + (atom - smem_raw % atom) % atom
        barriers_end = self.base + self.stages * self.stage_bytes + 16 * self.stages
        assert barriers_end <= smem_raw + spec.smem <= SMEM_WINDOW
        empty_count = CONSUMER_WARPS // 2 if "empty_count" in faults else CONSUMER_WARPS
        self.full = [MBarrier(1) for _ in range(self.stages)]
        self.empty = [MBarrier(empty_count) for _ in range(self.stages)]
        self.copies = []                  # issued, not landed: (dst, mat, x, y, box, bar)
        self.mmas = [[], []]              # per warpgroup: [group, acc, desc_a, desc_b]
        self.committed = [0, 0]
        M, N = a.shape[0], w.shape[0]
        self.tiles_m, self.tiles_n = -(-M // BM), -(-N // self.bn)
        self.desc_const = DESC_SW128
        if "sbo" in faults:  # the stride byte offset of half an atom
            half_atom = (SW128_ATOM_BYTES // 2) >> 4
            self.desc_const = (DESC_SW128 & ~(0x3FFF << 32)) | (half_atom << 32)
        self.frag = d_fragment(self.bn, swap_rows="fragment" in faults)

    def tiles(self):
        for tile in range(self.bid, self.tiles_m * self.tiles_n, self.grid):
            yield tile_coords(tile, self.tiles_m, self.tiles_n)

    def desc(self, addr):
        return self.desc_const | ((addr & ADDR_MASK) >> 4)

    # --- the hardware's asynchronous units ------------------------------------------
    def copy_engine(self):
        while True:
            yield lambda: bool(self.copies)
            dst, mat, x, y, box, bar = self.copies.pop(0)
            bar.complete_tx(tma_load(self.smem, mat, x, y, box, dst,
                                     swizzled="tma_unswizzled" not in self.faults))

    def execute(self, mma):
        """One wgmma reads its operands now; the products are summed in registers()."""
        _, acc, desc_a, desc_b = mma
        acc.append((read_operand(self.smem, desc_a, 64), read_operand(self.smem, desc_b, self.bn)))

    def registers(self, acc):
        """The accumulator registers [thread, N / 2] after the MMAs of ``acc``: the sum of
        their D fragments, taken as one integer product over the concatenated k-slices
        (the same sum; one product per tile instead of one per MMA keeps the test fast)."""
        a = np.concatenate([p[0] for p in acc], axis=1).astype(np.int64)
        b = np.concatenate([p[1] for p in acc], axis=1).astype(np.int64)
        return (a @ b.T)[self.frag]

    def mma_unit(self, wg):
        while True:
            yield lambda: bool(self.mmas[wg])
            self.execute(self.mmas[wg].pop(0))

    def wgmma_wait(self, wg, n):
        """wgmma.wait_group n: every group but the newest n has executed."""
        while self.mmas[wg] and self.mmas[wg][0][0] < self.committed[wg] - n:
            self.execute(self.mmas[wg].pop(0))

    # --- the kernel's threads ---------------------------------------------------------
    def producer(self):
        stage, phase = 0, 0
        wait_parity = 0 if "producer_parity" in self.faults else 1
        expect = BM * BK if "expect_tx" in self.faults else self.stage_bytes
        KT = -(-self.a.shape[1] // BK)
        for tm, tn in self.tiles():
            for kt in range(KT):
                yield self.empty[stage].wait(phase ^ wait_parity)
                self.full[stage].arrive(expect_tx=expect)
                sa = self.base + stage * self.stage_bytes
                self.copies.append((sa, self.a, kt * BK, tm * BM, self.box_a, self.full[stage]))
                yield None
                self.copies.append((sa + BM * BK, self.w, kt * BK, tn * self.bn, self.box_w,
                                    self.full[stage]))
                yield None
                stage += 1
                if stage == self.stages:
                    stage, phase = 0, phase ^ 1

    def release(self, stage):
        for _warp in range(4):  # lane 0 of each warp of the warpgroup
            self.empty[stage].arrive()
            yield None

    def consumer(self, wg):
        stage, phase = 0, 0
        full_parity = 1 if "full_parity" in self.faults else 0
        KT = -(-self.a.shape[1] // BK)
        for tm, tn in self.tiles():
            acc = []  # the operands of the MMAs accumulated since the tile began
            held = -1
            for _kt in range(KT):
                yield self.full[stage].wait(phase ^ full_parity)
                a_tile = self.base + stage * self.stage_bytes + wg * 64 * BK
                w_tile = self.base + stage * self.stage_bytes + BM * BK
                for kk in range(BK // WGMMA_K):
                    self.mmas[wg].append([self.committed[wg], acc, self.desc(a_tile + 32 * kk),
                                          self.desc(w_tile + 32 * kk)])
                    yield None
                self.committed[wg] += 1
                self.wgmma_wait(wg, 1)
                if "release_early" in self.faults:
                    held = stage  # the stage whose group may still be running
                if held >= 0:
                    yield from self.release(held)
                held = stage
                stage += 1
                if stage == self.stages:
                    stage, phase = 0, phase ^ 1
            self.wgmma_wait(wg, 0)
            if held >= 0 and "release_early" not in self.faults:
                yield from self.release(held)
            self.epilogue(wg, tm, tn, self.registers(acc))

    def epilogue(self, wg, tm, tn, acc):
        M, N = self.y.shape
        tid = np.arange(WARPGROUP)
        warp, g, t = tid // 32, (tid % 32) // 4, tid % 4
        for h in range(2):
            m = tm * BM + wg * 64 + warp * 16 + g + 8 * h
            for j in range(self.bn // 8):
                n = tn * self.bn + 8 * j + 2 * t
                for c, ok in ((0, (m < M) & (n < N)), (1, (m < M) & (n < N) & (n + 1 < N))):
                    v = acc[:, 4 * j + 2 * h + c]
                    if self.zp is not None:
                        v = zp_adjust(v, self.zp[np.minimum(m, M - 1)],
                                      self.colsum[np.minimum(n + c, N - 1)])
                    mm, nn = m[ok], (n + c)[ok]
                    if (self.y[mm, nn] != UNWRITTEN).any():
                        raise ModelError("an output written twice")
                    self.y[mm, nn] = v[ok]

    def run(self, policy, rng):
        agents = {"producer": self.producer(), "wg0": self.consumer(0), "wg1": self.consumer(1),
                  "tma": self.copy_engine(), "mma0": self.mma_unit(0), "mma1": self.mma_unit(1)}
        waits = dict.fromkeys(agents)
        while any(name in agents for name in ("producer", "wg0", "wg1")):
            ready = [a for a in POLICIES[policy]
                     if a in agents and (waits[a] is None or waits[a]())]
            if not ready:
                raise ModelError(f"deadlock: {sorted(agents)} all wait")
            name = ready[rng.integers(len(ready))] if policy == "random" else ready[0]
            try:
                waits[name] = next(agents[name])
            except StopIteration:
                del agents[name]
        if self.copies or any(self.mmas):
            raise ModelError("copies or MMAs still outstanding at exit")


UNWRITTEN = np.iinfo(np.int64).min


def emulate(a, w, tile, grid, zp=None, policy="producer_ahead", rng=None, smem_raw=0,
            faults=frozenset()):
    """Y (int64, UNWRITTEN where no thread stored) of the wgmma GEMM with ``grid`` blocks."""
    rng = np.random.default_rng() if rng is None else rng
    spec = specs.wgmma_spec(dtypes.f16, tile, zp is not None)
    y = np.full((a.shape[0], w.shape[0]), UNWRITTEN)
    for bid in range(grid):
        Block(bid, grid, a, w, zp, spec, y, rng, smem_raw, faults).run(policy, rng)
    return y


def outcome(*args, **kwargs):
    """The verdict on a run: "agrees" or "mismatch" (with the oracle), or the model's
    "deadlock" or "error"."""
    try:
        y = emulate(*args, **kwargs)
    except ModelError as e:
        return "deadlock" if str(e).startswith("deadlock") else "error"
    return "agrees" if np.array_equal(y, oracle(args[0], args[1], kwargs.get("zp"))) else "mismatch"


# ----------------------------------------------------------------------------------


def test_model_pieces(rng):
    # The swizzle permutes the 16-byte chunks within each 128-byte row of an atom.
    addr = np.arange(4 * SW128_ATOM_BYTES)
    s = swizzle(addr)
    assert sorted(s) == list(addr) and np.array_equal(s >> 7, addr >> 7)
    rows, chunks = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    assert np.array_equal(swizzle(128 * rows + 16 * chunks), 128 * rows + 16 * (chunks ^ rows))
    # A copy read back through descriptors (any 32-byte k-slice) is the box, zero-padded.
    mat = random_s8(rng, (70, 48))
    smem = rng.integers(0, 256, SMEM_WINDOW, dtype=np.uint8)
    assert tma_load(smem, mat, 0, 0, (128, 128), 2048) == 128 * 128
    padded = np.zeros((128, 128), np.int8)
    padded[:70, :48] = mat
    for kk in range(4):
        got = read_operand(smem, DESC_SW128 | (((2048 + 32 * kk) & ADDR_MASK) >> 4), 128)
        np.testing.assert_array_equal(got, padded[:, 32 * kk:32 * kk + 32])
    # The fragment covers the 64 x N accumulator once.
    for n in (128, 256):
        rows, cols = d_fragment(n)
        assert len(set(zip(rows.ravel(), cols.ravel()))) == 64 * n == rows.size


def test_descriptor_constant_decodes_as_the_layout():
    f = decode_desc(DESC_SW128 | ((0x1C400 & ADDR_MASK) >> 4))
    assert f == {"start": 0x1C400, "lbo": 16, "sbo": SW128_ATOM_BYTES, "base_offset": 0,
                 "layout": 1}


CASES = [  # m, n, k, tile, grid
    (65, 5, 16, "128x128", 1), (127, 136, 48, "128x256", 3), (129, 264, 144, "128x128", 7),
    (300, 520, 400, "128x256", 3), (300, 520, 272, "128x128", 7), (129, 520, 400, "128x128", 1),
    (65, 264, 272, "128x256", 64), (300, 136, 144, "128x256", 1), (127, 5, 400, "128x128", 132),
    (300, 264, 16, "128x128", 3), (129, 136, 48, "128x256", 2), (300, 5, 272, "128x256", 7),
]


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("m,n,k,tile,grid", CASES)
def test_wgmma_gemm_emulation(rng, m, n, k, tile, grid, policy):
    a = random_s8(rng, (m, k))
    w = random_s8(rng, (n, k))
    raw = int(rng.integers(0, 64)) * 16  # the dynamic window's start: 16-byte aligned
    np.testing.assert_array_equal(emulate(a, w, tile, grid, policy=policy, rng=rng,
                                          smem_raw=raw), oracle(a, w))
    zp = zero_points(rng, m)
    np.testing.assert_array_equal(emulate(a, w, tile, grid, zp, policy, rng, raw),
                                  oracle(a, w, zp))


# Each fault with a schedule that exposes it and what it leads to; more k-tiles per block
# than stages, so the ring wraps. A broken phase sequence hangs the kernel (after
# corrupting a stage, for the miscounted barriers); the model reports the hang.
@pytest.mark.parametrize("fault,policy,expected", [
    ("sbo", "producer_ahead", {"mismatch"}),
    ("tma_unswizzled", "random", {"mismatch"}),
    ("fragment", "consumers_ahead", {"mismatch"}),
    ("release_early", "producer_ahead", {"mismatch"}),
    ("empty_count", "producer_ahead", {"deadlock"}),
    ("full_parity", "consumers_ahead", {"deadlock"}),
    ("producer_parity", "random", {"deadlock"}),
    ("expect_tx", "consumers_ahead", {"deadlock", "error"}),
])
@pytest.mark.parametrize("tile", list(specs.WGMMA_TILES))
def test_emulation_catches_faults(rng, fault, policy, expected, tile):
    a = random_s8(rng, (300, 400))
    w = random_s8(rng, (264, 400))
    assert outcome(a, w, tile, 1, policy=policy, rng=rng) == "agrees"
    assert outcome(a, w, tile, 1, policy=policy, rng=rng, faults={fault}) in expected


def test_emulated_kernel_matches_the_source():
    """The lines the emulation replays, as the kernel has them."""
    for line in [
        "mbar_init(full + s, 1);", "mbar_init(empty + s, WGMMA_CONSUMER_WARPS);",
        "mbar_wait(empty + stage, phase ^ 1);",
        "mbar_arrive_expect_tx(full + stage, STAGE_BYTES);",
        "constexpr int STAGE_BYTES = (BM + BN) * BK;", "constexpr int A_BYTES = BM * BK;",
        "u8_t* sa = smem + stage * STAGE_BYTES;",
        "tma_load_2d(sa, &map_a, kt * BK, tm * BM, full + stage);",
        "tma_load_2d(sa + A_BYTES, &map_w, kt * BK, tn * BN, full + stage);",
        "for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {",
        "mbar_wait(full + stage, phase);",
        "const u32_t a_tile = smem_addr(smem + stage * STAGE_BYTES) + wg * 64 * BK;",
        "const u32_t w_tile = smem_addr(smem + stage * STAGE_BYTES + A_BYTES);",
        "for (int kk = 0; kk < BK / 32; ++kk)",
        "wgmma_s8<BN>(acc, wgmma_desc(a_tile + 32 * kk), wgmma_desc(w_tile + 32 * kk), 1);",
        "wgmma_wait<1>();", "if (held >= 0 && lane == 0) mbar_arrive(empty + held);",
        "held = stage;", "wgmma_wait<0>();", "for (int i = 0; i < NACC; ++i) acc[i] = 0;",
        "if (n >= N) continue;",
        "u8_t* smem = smem_raw + ((SW128_ATOM_BYTES - (smem_addr(smem_raw) % SW128_ATOM_BYTES)) %",
        "const int m = tm * BM + wg * 64 + warp * 16 + g + 8 * h;",
        "const int n = n0 + 8 * j + 2 * t;", "int a0 = acc[4 * j + 2 * h];",
        "int a1 = acc[4 * j + 2 * h + 1];", "if (n + 1 < N) {", "if (m >= M) continue;",
        "if (zp_on) a0 = zp_adjust(a0, zm, __ldg(w_colsum + n));",
        "if (zp_on) a1 = zp_adjust(a1, zm, __ldg(w_colsum + n + 1));",
        "return WGMMA_DESC_SW128 | static_cast<u64_t>((smem_address & 0x3FFFF) >> 4);",
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8",
        "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8",
    ]:
        assert line in SOURCE, line
    # The kernel's constants are the hardware's numbers the model states.
    assert _int_constant("SW128_ROW_BYTES") == SW128_ROW_BYTES == BK == tma.BOX_ROW_BYTES
    assert _int_constant("SW128_ATOM_BYTES") == SW128_ATOM_BYTES
    assert CONSUMER_WARPS == 2 * WARPGROUP // 32
    assert _int_constant("WGMMA_THREADS") == specs.WGMMA_THREADS == 3 * WARPGROUP
    for tile, (bm, bn, stages) in specs.WGMMA_TILES.items():
        spec = specs.wgmma_spec(dtypes.f16, tile)
        assert bm == BM and spec.tma_rows == (bm, bn)
        assert spec.args[1:3] == (str(bn), str(stages))

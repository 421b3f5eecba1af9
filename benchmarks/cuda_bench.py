"""GPU benchmark of qlinear's cuda backend beside torch, on one device, in one run.

    python benchmarks/cuda_bench.py          # M in {1, 16, 512, 4096} x 4 (K, N) x {f16, bf16}
    python benchmarks/cuda_bench.py --quick  # the same M x 2 LLM MLP (K, N), f16, 20 runs
    python benchmarks/cuda_bench.py --m 1 16 --kn 4096x4096 --dtype f16
    python benchmarks/cuda_bench.py --json cuda_bench.json

For every shape, first the qlinear plan's output (and both scratches) is checked bit for
bit against an exact oracle of the numerical contract (integer accumulation done in
``qlinear.reference``; every row for M <= 512, a sample of
rows spread over all tiles beyond). Then, side by side on the same CUDA stream, timed
with CUDA events (warm-up, median of --repeats runs; before each run a short spin
kernel keeps the GPU busy while Python enqueues, so launch overhead is not counted;
for decode shapes, M <= 16, the L2 cache is flushed before each run):

- qlinear: ``QuantizedLinearPlan.run`` (activation pass + int8 GEMM + fused dequant),
  selected with ``backend.wgmma`` off (the mma.sync GEMM, what every GPU runs by default);
- on sm_90a, the plan selected with ``backend.wgmma`` on, where it takes the Hopper wgmma
  GEMM (prefill shapes): checked against the oracle like the first, on its own output
  and scratches, and timed run for run in alternation with it;
- torch W8A8: per-token quantization in torch ops, ``torch._int_mm`` (M padded to 32
  where cuBLASLt refuses M <= 16; the table says so), dequantization + bias;
- torch ``matmul`` in f16 / bf16 (the floating-point layer it replaces);
- a device-to-device copy (the copy bandwidth) and, from it, the time to read the int8
  weight once (the floor for decode shapes);
- the activation pass alone (``DynamicRangeQuantizePlan``), as GB/s.

Prints a table (time, TOPS, % of the 1979 TOPS dense int8 peak of an H100 SXM, ratios:
each is baseline time / qlinear time, > 1 means qlinear is faster; against the weight
read, the floor, it is at most 1)
and writes JSON rows with the keys ``m, k, n, dtype, qlinear_ms, torch_w8a8_ms, fp16_ms,
weight_read_ms, act_pass_gbps, copy_gbps, qlinear_wgmma_ms`` (the last None where the
wgmma GEMM was not selected: decode shapes, other GPUs; plus details: both plans' skus,
the ratios, which are those raw times divided, device, date, commit, repeats), rewritten
after every shape so that a run stopped by a time limit still leaves the rows it finished.
Tensors are torch tensors
wrapped zero-copy by the backend, and everything runs on a non-default torch stream.
Without an NVIDIA GPU (or without the cuda backend) it stops with a clear message and
exit status 2. Without torch it still times qlinear and leaves the torch columns empty.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qlinear as ql  # noqa: E402
from qlinear.bench import git_commit  # noqa: E402
from qlinear.dtypes import as_dtype  # noqa: E402
from qlinear.problem import DECODE_MAX_M  # noqa: E402
from qlinear.reference import reference_linear  # noqa: E402

DEFAULT_M = (1, 16, 512, 4096)
DEFAULT_KN = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))
DEFAULT_DTYPES = ("f16", "bf16")
DEFAULT_REPEATS, DEFAULT_WARMUP = 50, 5
#: ``--quick``: the decode, small-batch and prefill regimes on the two MLP projections of
#: an 8B model (long K and wide N); M = 512 and 4096 are where the wgmma GEMM is timed
#: beside the default one. Sized for device_check.sh's 100 s step, an estimate: per shape
#: the host makes and quantizes a 58.7M-element weight and computes the oracle's rows in
#: float64 BLAS (3-6 s on a 2-core host, less on the GPU machine's 16 cores); the GPU
#: takes under a second (5 timed variants x 23 runs of at most ~2 ms plus the 0.3 ms
#: spin). 8 shapes x 5 s + ~15 s of start-up (torch, the context, kernels compiled or
#: read from the cache) = about 55 s.
QUICK = {"m": [1, 16, 512, 4096], "kn": [(4096, 14336), (14336, 4096)], "dtype": ["f16"],
         "repeats": 20, "warmup": 3}
#: The keys of every JSON row that BENCHMARKS.md documents; each ratio is recomputable
#: from them (baseline ms / qlinear_ms, or / qlinear_wgmma_ms).
RESULT_KEYS = ("m", "k", "n", "dtype", "qlinear_ms", "torch_w8a8_ms", "fp16_ms",
               "weight_read_ms", "act_pass_gbps", "copy_gbps", "qlinear_wgmma_ms")
#: Ratio key -> the baseline time it divides by ``qlinear_ms`` (> 1: qlinear is faster).
RATIOS = {"w8a8_over_ql": "torch_w8a8_ms", "fp_over_ql": "fp16_ms",
          "wread_over_ql": "weight_read_ms"}
#: The same for the wgmma plan's time, ``qlinear_wgmma_ms`` (> 1: the wgmma plan is
#: faster than the baseline; ``ql_over_wgmma`` > 1: faster than the default GEMM's plan).
WGMMA_RATIOS = {"ql_over_wgmma": "qlinear_ms", "w8a8_over_wgmma": "torch_w8a8_ms",
                "fp_over_wgmma": "fp16_ms"}
#: Dense int8 tensor-core peak of an H100 SXM (TOPS); the sparse figure is twice this.
INT8_PEAK_TOPS = 1979.0
#: Rows checked against the oracle beyond this M: a sample (see ``check_rows``).
FULL_CHECK_MAX_M = 512
COPY_BYTES = 512 << 20
SPIN_US = 300

_SPIN_SOURCE = r"""
extern "C" __global__ void qlinear_bench_spin(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}
"""


class BenchUnavailable(RuntimeError):
    """The benchmark cannot run here (no GPU, no driver, no cuda backend)."""


def parse_args(argv=None):
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the reduced set (M 1 16 512 4096, KxN 4096x14336 14336x4096, f16, "
                        "20 repeats); options given beside it still win")
    p.add_argument("--m", type=int, nargs="+", help="rows (tokens)")
    p.add_argument("--kn", nargs="+", help="KxN shapes, e.g. 4096x14336")
    p.add_argument("--dtype", nargs="+", choices=["f16", "bf16", "f32"])
    p.add_argument("--repeats", type=int, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--no-check", action="store_true",
                   help="skip the oracle check (not recommended)")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    p.add_argument("--no-wgmma", action="store_true",
                   help="time the default plan only (device_check.sh passes it when the "
                        "wgmma GEMM failed its smoke test)")
    args = p.parse_args(argv)
    if args.kn is not None:
        try:
            args.kn = [tuple(int(v) for v in s.lower().split("x")) for s in args.kn]
        except ValueError:
            p.error(f"--kn: expected shapes like 4096x14336, got {args.kn}")
    defaults = QUICK if args.quick else {
        "m": list(DEFAULT_M), "kn": list(DEFAULT_KN), "dtype": list(DEFAULT_DTYPES),
        "repeats": DEFAULT_REPEATS, "warmup": DEFAULT_WARMUP}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, list(value) if isinstance(value, list) else value)
    if any(len(s) != 2 or min(s) < 1 for s in args.kn) or min(args.m) < 1:
        p.error("--m and --kn: expected positive sizes")
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats >= 1 and --warmup >= 0: expected, got {args.repeats} and "
                f"{args.warmup}")
    return args


def require_cuda():
    """The qlinear cuda backend, or :class:`BenchUnavailable` saying why not."""
    try:
        return ql.backend("cuda")
    except ql.BackendUnavailable as e:
        hint = f" (to enable it: {e.install})" if e.install else ""
        raise BenchUnavailable(
            f"cuda_bench.py needs an NVIDIA GPU with qlinear's cuda backend, which is "
            f"unavailable here: {e.reason}{hint}") from None


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------
# Timing


class Timer:
    """CUDA-event timing on one stream: optional L2 flush, a spin kernel, then the work."""

    def __init__(self, be, stream):
        from cuda.core import EventOptions, LaunchConfig, Program, ProgramOptions, launch

        self.be = be
        self.stream = be.stream(stream)
        self._launch = launch
        self._events = EventOptions(timing_enabled=True)
        program = Program(_SPIN_SOURCE, "c++", ProgramOptions(arch=be.arch))
        self._spin = program.compile("cubin").get_kernel("qlinear_bench_spin")
        self._spin_config = LaunchConfig(grid=1, block=1)
        clock_khz = int(be.device.properties.clock_rate)
        self._spin_cycles = np.int64(clock_khz * SPIN_US // 1000)
        l2 = int(be.device.properties.l2_cache_size)
        self._flush = be.empty((2 * l2,), ql.s8)
        from cuda.bindings import driver

        self._driver = driver
        self._stream_handle = int(self.stream.handle)

    def flush_l2(self):
        """Overwrite twice the L2 size, so the next kernel starts cold."""
        err, = self._driver.cuMemsetD8Async(self._flush.data_ptr, 0, self._flush.size,
                                            self._stream_handle)
        if int(err):
            raise RuntimeError(f"cuMemsetD8Async failed: {err}")

    def spin(self):
        """Keep the GPU busy while the host enqueues what follows."""
        self._launch(self.stream, self._spin_config, self._spin, self._spin_cycles)

    def median_ms(self, fn, repeats: int, warmup: int, flush: bool) -> float:
        """Median GPU milliseconds of ``fn()`` (which enqueues on this stream)."""
        return self.medians_ms([fn], repeats, warmup, flush)[0]

    def medians_ms(self, fns, repeats: int, warmup: int, flush: bool) -> list[float]:
        """Median GPU milliseconds of each of ``fns``, timed in alternation (one run of
        each per round), so that clock and temperature drift touch them alike."""
        for _ in range(warmup):
            for fn in fns:
                fn()
        pairs: list[list] = [[] for _ in fns]
        for _ in range(repeats):
            for fn, runs in zip(fns, pairs):
                if flush:
                    self.flush_l2()
                self.spin()
                start = self.stream.record(options=self._events)
                fn()
                end = self.stream.record(options=self._events)
                runs.append((start, end))
        self.stream.sync()
        return [statistics.median(end - start for start, end in runs) for runs in pairs]

    def copy_gbps(self, repeats: int, warmup: int) -> float:
        """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
        n = COPY_BYTES // 2
        src = self.be.empty((n,), ql.s8)
        dst = self.be.empty((n,), ql.s8)

        def copy():
            err, = self._driver.cuMemcpyDtoDAsync(dst.data_ptr, src.data_ptr, n,
                                                  self._stream_handle)
            if int(err):
                raise RuntimeError(f"cuMemcpyDtoDAsync failed: {err}")
        ms = self.median_ms(copy, repeats, warmup, flush=False)
        return 2 * n / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------
# Oracle


def check_rows(m: int) -> np.ndarray:
    """Rows compared with the oracle: all up to FULL_CHECK_MAX_M, else both edges of every
    128-row tile band plus a random sample."""
    if m <= FULL_CHECK_MAX_M:
        return np.arange(m)
    rng = np.random.default_rng(m)
    edges = np.concatenate([np.arange(0, m, 128), np.arange(127, m, 128), [m - 1]])
    return np.unique(np.concatenate([edges[:128], rng.choice(m, 128, replace=False)]))


def is_wgmma(sku: str) -> bool:
    """Whether a plan's sku names the Hopper wgmma GEMM."""
    return "+gemm_wgmma" in sku


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same(got, want, what):
    """Bit-identical, NaN where NaN is expected."""
    gn = np.isnan(got.astype(np.float64))
    wn = np.isnan(want.astype(np.float64))
    bad = (gn != wn) | (~wn & (_bits(got) != _bits(want)))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} differ from the oracle; "
                             f"first at {i}: got {got[i]!r}, want {want[i]!r}")


# ------------------------------------------------------------------------------------
# One shape


class Shape:
    """The data of one (M, K, N, dtype) case, on the device, plus the runners."""

    def __init__(self, be, torch, m, k, n, dtype, rng, wgmma=True):
        self.be, self.torch = be, torch
        self.m, self.k, self.n, self.dtype = m, k, n, dtype
        x = rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-2, 2, size=(m, 1))
        self.x = x.astype(dtype.numpy)
        w = rng.standard_normal((n, k)).astype(np.float32)
        self.wq, self.ws = ql.quantize_weight(w, dtype=dtype)
        self.bias = rng.standard_normal(n).astype(dtype.numpy)
        self.w_fp = w.astype(dtype.numpy)
        self.desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype)
        self.plan = self._select(wgmma=False)
        # Where the switch changes nothing (decode shapes, other GPUs) there is no second
        # plan; where it fails to build one, the row says why and the rest is still timed.
        self.wgmma_error = ""
        switched = None
        try:
            switched = self._select(wgmma=True) if wgmma else None
        except ql.QlinearError as e:
            self.wgmma_error = f"{type(e).__name__}: {e}"
        self.sku_wgmma = None if switched is None else switched.sku
        self.wplan = switched if switched is not None and is_wgmma(switched.sku) else None
        self.qplan = ql.DynamicRangeQuantizePlan.select(be, self.desc.activation_pass)
        self.args = ql.QuantizedLinearArgs(
            activation=self._dev(self.x), weight_q=self._dev(self.wq),
            weight_scale=self._dev(self.ws), output=self._empty((m, n), dtype),
            act_q_scratch=self._empty((m, k), ql.s8), act_scale_scratch=self._empty((m,), dtype),
            bias=self._dev(self.bias))
        self.wargs = None
        if self.wplan is not None:
            # Its own outputs, filled with what no run writes (NaN, q = -128), so a kernel
            # that writes nothing cannot pass on the first plan's results.
            self.wargs = ql.QuantizedLinearArgs(
                activation=self.args.activation, weight_q=self.args.weight_q,
                weight_scale=self.args.weight_scale,
                output=self._dev(np.full((m, n), np.nan, dtype.numpy)),
                act_q_scratch=self._dev(np.full((m, k), -128, np.int8)),
                act_scale_scratch=self._dev(np.full((m,), np.nan, dtype.numpy)),
                bias=self.args.bias)
        self.qargs = ql.DynamicRangeQuantizeArgs(
            activation=self.args.activation, act_q=self.args.act_q_scratch,
            act_scale=self.args.act_scale_scratch)

    def _select(self, wgmma: bool):
        """The plan selected with the backend's wgmma switch set to ``wgmma`` (restored
        after; a backend without the switch selects as it always does)."""
        if not hasattr(self.be, "wgmma"):
            return ql.QuantizedLinearPlan.select(self.be, self.desc)
        before = self.be.wgmma
        self.be.wgmma = wgmma
        try:
            return ql.QuantizedLinearPlan.select(self.be, self.desc)
        finally:
            self.be.wgmma = before

    # Device tensors: torch's (wrapped zero-copy by the backend) when torch is here.
    def _dev(self, arr):
        if self.torch is None:
            return self.be.from_numpy(arr)
        t = self.torch
        if arr.dtype == ql.bf16.numpy:
            return t.from_numpy(arr.view(np.int16)).view(t.bfloat16).cuda()
        return t.from_numpy(np.ascontiguousarray(arr)).cuda()

    def _empty(self, shape, dtype):
        if self.torch is None:
            return self.be.empty(shape, dtype)
        t = self.torch
        tdt = {"f16": t.float16, "bf16": t.bfloat16, "f32": t.float32, "f64": t.float64,
               "s8": t.int8}[dtype.name]
        return t.empty(shape, dtype=tdt, device="cuda")

    def _host(self, obj, dtype):
        if self.torch is None:
            return self.be.to_numpy(obj)
        arr = obj.detach().cpu()
        if dtype == ql.bf16:
            return arr.view(self.torch.int16).numpy().view(ql.bf16.numpy)
        return arr.numpy()

    def run_qlinear(self, stream):
        """Enqueue one qlinear run."""
        self.plan.run(self.args, stream=stream)

    def run_wgmma(self, stream):
        """Enqueue one run of the plan with the wgmma GEMM."""
        self.wplan.run(self.wargs, stream=stream)

    def run_act_pass(self, stream):
        """Enqueue the activation pass alone."""
        self.qplan.run(self.qargs, stream=stream)

    def check(self, stream) -> str:
        """Run each plan once and compare its output and scratches with the oracle. The
        default plan's failure raises AssertionError; the wgmma plan's is returned (and
        that plan dropped), so the other figures are still taken: ``"ok"``, ``"not
        selected"`` or ``"FAILED: <what differs>"``."""
        rows = check_rows(self.m)
        want = reference_linear(self.x[rows], self.wq, self.ws, self.bias, self.dtype)
        self._check_plan(self.plan, self.args, stream, rows, want)
        if self.wplan is None:
            return "not selected"
        try:
            self._check_plan(self.wplan, self.wargs, stream, rows, want)
        except AssertionError as e:
            self.wplan = None
            return f"FAILED: {e}"
        return "ok"

    def _check_plan(self, plan, args, stream, rows, want) -> None:
        want_y, want_q, want_s = want
        plan.run(args, stream=stream)
        self.be.synchronize()
        y = self._host(args.output, self.dtype)[rows]
        q = self._host(args.act_q_scratch, ql.s8)[rows]
        s = self._host(args.act_scale_scratch, self.dtype)[rows]
        what = f"M={self.m} K={self.k} N={self.n} {self.dtype.name} [{plan.sku}]"
        assert_same(s, want_s, f"act_scale_scratch {what}")
        if not np.array_equal(q, want_q):
            raise AssertionError(f"act_q_scratch {what}: differs from the oracle")
        assert_same(y, want_y, f"output {what}")

    def torch_runners(self):
        """``(w8a8, matmul, note)``: zero-argument callables enqueueing torch's versions on
        the current torch stream, and a note on how W8A8 ran (e.g. padding)."""
        t = self.torch
        x, bias = self.args.activation, self.args.bias
        wq = self.args.weight_q          # [N, K] int8, the same memory qlinear reads
        ws = self.args.weight_scale
        tdt = x.dtype
        w_fp_t = self._dev(self.w_fp).t()  # [K, N] view of the [N, K] layer weight
        m, k = x.shape
        note = ""
        rows = m
        if m <= DECODE_MAX_M:
            rows = 32
            note = f"M padded {m}->32 for torch._int_mm (cuBLASLt refuses M <= 16)"
        q_buf = t.zeros((rows, k), dtype=t.int8, device="cuda")
        wq_t = wq.t()  # [K, N], column-major: cuBLASLt's preferred int8 layout

        def int_mm(q):
            if rows != m:
                q_buf[:m].copy_(q)
                return t._int_mm(q_buf, wq_t)[:m]
            return t._int_mm(q, wq_t)

        def w8a8():
            xc = x.float()
            amax = xc.abs().amax(dim=1, keepdim=True)
            scale = t.where(amax > 0, amax / 127, t.ones_like(amax)).to(tdt)
            q = t.clamp(t.round(xc / scale.float()), -127, 127).to(t.int8)
            acc = int_mm(q)
            return ((acc.float() * scale.float()) * ws.float() + bias.float()).to(tdt)

        def matmul():
            return t.matmul(x, w_fp_t)

        # Exactness of torch's integer GEMM on this shape (a few columns, all rows).
        q = t.randint(-127, 128, (m, k), dtype=t.int8, device="cuda")
        got = int_mm(q)[:, :4].cpu().long()
        want = q.cpu().long() @ wq[:4].cpu().long().t()
        if not t.equal(got, want):
            note += ("; " if note else "") + "torch._int_mm NOT exact here"
        return w8a8, matmul, note


def bench_shape(be, torch, timer, stream, m, k, n, dtype, args, copy_gbps, rng):
    """One table row."""
    shape = Shape(be, torch, m, k, n, dtype, rng, wgmma=not args.no_wgmma)
    wgmma_check = "not checked" if shape.wplan is not None else "not selected"
    if not args.no_check:
        wgmma_check = shape.check(stream)
    if args.no_wgmma:
        wgmma_check = "not run (--no-wgmma)"
    if shape.wgmma_error:
        wgmma_check = f"FAILED: selecting the plan: {shape.wgmma_error}"
    flush = m <= DECODE_MAX_M
    reps, warm = args.repeats, args.warmup
    row = {"m": m, "k": k, "n": n, "dtype": dtype.name, "sku": shape.plan.sku,
           "sku_wgmma": shape.sku_wgmma, "wgmma_check": wgmma_check,
           "checked_rows": "none" if args.no_check else
           ("all" if m <= FULL_CHECK_MAX_M else f"{len(check_rows(m))} sampled"),
           "l2_flushed": flush}
    plans = [lambda: shape.run_qlinear(stream)]
    if shape.wplan is not None:
        plans.append(lambda: shape.run_wgmma(stream))
    times = timer.medians_ms(plans, reps, warm, flush)
    row["qlinear_ms"] = times[0]
    row["qlinear_wgmma_ms"] = times[1] if shape.wplan is not None else None
    row["act_pass_ms"] = timer.median_ms(lambda: shape.run_act_pass(stream), reps, warm, flush)
    row["copy_gbps"] = copy_gbps
    row["torch_w8a8_ms"] = row["fp16_ms"] = None
    row["torch_note"] = "torch not installed" if torch is None else ""
    if torch is not None:
        w8a8, matmul, note = shape.torch_runners()
        row["torch_w8a8_ms"] = timer.median_ms(w8a8, reps, warm, flush)
        row["fp16_ms"] = timer.median_ms(matmul, reps, warm, flush)
        row["torch_note"] = note
    return derive(row)


def derive(row: dict) -> dict:
    """Add the figures that follow from a row's raw times: the activation pass's GB/s,
    the weight-read floor, TOPS and the ratios (None where a baseline was not timed)."""
    m, k, n = row["m"], row["k"], row["n"]
    itemsize = as_dtype(row["dtype"]).itemsize
    act_bytes = m * k * itemsize + m * k + m * itemsize
    row["act_pass_gbps"] = act_bytes / (row["act_pass_ms"] * 1e-3) / 1e9
    row["weight_read_ms"] = n * k / (row["copy_gbps"] * 1e9) * 1e3
    row["tops"] = 2 * m * k * n / (row["qlinear_ms"] * 1e-3) / 1e12
    row["pct_int8_peak"] = 100 * row["tops"] / INT8_PEAK_TOPS
    for key, base in RATIOS.items():
        row[key] = None if row[base] is None else row[base] / row["qlinear_ms"]
    wg = row.setdefault("qlinear_wgmma_ms", None)
    row["tops_wgmma"] = None if wg is None else 2 * m * k * n / (wg * 1e-3) / 1e12
    for key, base in WGMMA_RATIOS.items():
        row[key] = None if wg is None or row[base] is None else row[base] / wg
    return row


def provenance(args, device: str) -> dict:
    """What every JSON row carries besides its figures: device, date, commit, settings."""
    commit = git_commit()  # $QLINEAR_COMMIT where the tree travelled without .git
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"device": device, "date": stamp, "commit": commit, "quick": args.quick,
            "repeats": args.repeats, "warmup": args.warmup}


def write_json(path: str, rows: list) -> None:
    """Replace ``path`` with the rows in one rename, so a stopped run never leaves half a
    file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)


def _ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def _ms(value):
    return "-" if value is None else f"{value:.4f}"


def wgmma_line(rows) -> str:
    """Where the wgmma GEMM was timed (device_check.sh copies this line to its summary)."""
    timed = [r for r in rows if r["qlinear_wgmma_ms"] is not None]
    if not timed:
        return f"gemm: wgmma timed at 0 of {len(rows)} shapes (not selected: decode shapes, " \
               f"or not sm_90a)"
    line = f"gemm: wgmma timed at {len(timed)} of {len(rows)} shapes (M > 64 on sm_90a)"
    vs_fp = [r["fp_over_wgmma"] for r in timed if r["fp_over_wgmma"] is not None]
    vs_ql = [r["ql_over_wgmma"] for r in timed]
    line += f"; ql/wg {min(vs_ql):.2f}x-{max(vs_ql):.2f}x"
    return line + (f", fp/wg {min(vs_fp):.2f}x-{max(vs_fp):.2f}x" if vs_fp else "")


def print_table(rows, device: str, copy_gbps: float) -> None:
    """The human-readable table."""
    print(f"\n{device}; copy bandwidth {copy_gbps:.0f} GB/s; "
          f"int8 peak {INT8_PEAK_TOPS:.0f} TOPS (dense)")
    head = (f"{'M':>5} {'K':>6} {'N':>6} {'dt':>4} | {'qlinear ms':>10} {'TOPS':>7} {'%peak':>6} | "
            f"{'wgmma ms':>8} {'ql/wg':>6} {'fp/wg':>6} | "
            f"{'w8a8 ms':>8} {'w8a8/ql':>7} | {'fp ms':>8} {'fp/ql':>6} | {'wread ms':>8} "
            f"{'wread/ql':>8} | {'act GB/s':>8} {'%copy':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['m']:>5} {r['k']:>6} {r['n']:>6} {r['dtype']:>4} | {r['qlinear_ms']:>10.4f} "
              f"{r['tops']:>7.1f} {r['pct_int8_peak']:>5.1f}% | "
              f"{_ms(r['qlinear_wgmma_ms']):>8} {_ratio(r['ql_over_wgmma']):>6} "
              f"{_ratio(r['fp_over_wgmma']):>6} | "
              f"{_ms(r['torch_w8a8_ms']):>8} {_ratio(r['w8a8_over_ql']):>7} | "
              f"{_ms(r['fp16_ms']):>8} {_ratio(r['fp_over_ql']):>6} | "
              f"{r['weight_read_ms']:>8.4f} {_ratio(r['wread_over_ql']):>8} | "
              f"{r['act_pass_gbps']:>8.0f} {100 * r['act_pass_gbps'] / copy_gbps:>5.0f}%")
    for note in sorted({r["torch_note"] for r in rows}):
        if note:
            print(f"  note: {note}")
    print("  kernels: " + "; ".join(sorted({r['sku'] for r in rows})))
    wgmma = sorted({r["sku_wgmma"] for r in rows if r["qlinear_wgmma_ms"] is not None})
    print("  kernels with wgmma on: " + ("; ".join(wgmma) or "none"))
    print(wgmma_line(rows))


def main(argv=None) -> int:
    """Run the benchmark; 0 on success, 2 when it cannot run here, 1 on a failed check
    (the wgmma plan's at the end, after the figures of every shape)."""
    args = parse_args(argv)
    try:
        be = require_cuda()
    except BenchUnavailable as e:
        print(str(e), file=sys.stderr)
        return 2
    torch = _torch()
    if torch is None:
        print("note: torch with CUDA is not installed: only qlinear is timed", file=sys.stderr)
        stream_obj = None
    else:
        stream_obj = torch.cuda.Stream()
        torch.cuda.set_stream(stream_obj)  # torch ops and qlinear runs share it
    timer = Timer(be, stream_obj)
    stream = timer.stream if torch is None else stream_obj
    copy_gbps = timer.copy_gbps(args.repeats, args.warmup)
    device = be.device_name
    meta = provenance(args, device)
    rng = np.random.default_rng(0)
    rows = []
    for dt_name in args.dtype:
        dtype = as_dtype(dt_name)
        for k, n in args.kn:
            for m in args.m:
                try:
                    row = bench_shape(be, torch, timer, stream, m, k, n, dtype, args,
                                      copy_gbps, rng)
                except AssertionError as e:
                    print(f"CHECK FAILED: {e}", file=sys.stderr)
                    return 1
                row.update(meta)
                rows.append(row)
                if args.json:
                    write_json(args.json, rows)
                print(f"  M={m} K={k} N={n} {dtype.name}: qlinear {row['qlinear_ms']:.4f} ms "
                      f"[{row['sku']}], wgmma {_ms(row['qlinear_wgmma_ms'])} ms",
                      file=sys.stderr)
    print_table(rows, device, copy_gbps)
    if args.json:
        print(f"wrote {len(rows)} rows to {args.json}")
    failed = [r["wgmma_check"] for r in rows if r["wgmma_check"].startswith("FAILED")]
    for why in failed:
        print(f"CHECK FAILED (wgmma plan, not timed): {why[len('FAILED: '):]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Odd shapes through the cuda backend, for ``compute-sanitizer`` (memcheck, racecheck).

Every case is checked against the exact int64 reference as well, so one run under the
sanitizer says both "no bad access / no race" and "right answer"; the other activation
schemes' cases (zero points and weight column sums read at the tile edges) against the
cpu backend, which runs every scheme exactly. Each case names the GEMM it asks for: the
default one (``backend.wgmma`` off) or the Hopper wgmma GEMM (on, at shapes that select
it on an H100/H200: M > 64, K % 16 == 0, both tiles, odd M and N edges, zero points, more
tiles than SMs); on sm_90a a wgmma case whose plan did not take it is a failure, on other
GPUs it runs the default GEMM and the last line says so. It also runs one zero-copy case
each on torch and CuPy tensors on a non-default stream, where installed.

    compute-sanitizer --tool memcheck --error-exitcode 3 \
        python benchmarks/sanitize_cases.py
    compute-sanitizer --tool racecheck --error-exitcode 3 \
        python benchmarks/sanitize_cases.py --quick --no-interop
    python benchmarks/sanitize_cases.py --wgmma-sweep   # every dtype x scheme, wgmma on
    python benchmarks/sanitize_cases.py --wgmma-smoke   # one small case per tile, first

``--wgmma-smoke`` is the GPU run's first look at the wgmma GEMM (under a short time
limit: a kernel that never finishes hangs the process); where it fails, the later steps
pass ``--no-wgmma`` and the default GEMM's checks still run in full.
"""

import argparse
import contextlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qlinear as ql  # noqa: E402
from qlinear.reference import reference_linear  # noqa: E402

MS = [1, 16, 17, 4097]
KS = [3, 1025, 4096]
N = 72  # not a multiple of any tile
#: (M, K, dtype name, scheme): the zero-point GEMM (aligned K: the tiled kernel with the
#: term compiled in) and, in full runs, the byte-load decode kernel given zero points.
SCHEME_CASES = [(17, 4096, "f16", "dynamic_asym"), (1, 1025, "bf16", "static_asym")]
#: Shapes (M, K, N) that select the wgmma GEMM on 132 SMs (H100 SXM, H200), whichever
#: tile rule holds (128x256 when its tiles cover every SM; 128x128 when its tiles give at
#: least half of the SMs one), each with the tile it takes there. M is never a multiple of
#: 128, K leaves a partial 128-byte k-tile, and the k-tiles a block walks outnumber the
#: stages (the barrier ring wraps) except where a block walks several output tiles.
WGMMA_SHAPES = [
    (1153, 400, 3341, "128x256"),   # 10 x 14 tiles > 132: persistent; odd N
    (2049, 48, 4100, "128x256"),    # 17 x 17 tiles: up to 3 per block; one partial k-tile
    (300, 1040, 2825, "128x128"),   # 3 x 23 tiles; 9 k-tiles over 6 stages; odd N
    (129, 144, 4300, "128x128"),    # 2 x 34 tiles; one row in the last tile band
]
#: The sanitizer's wgmma cases, (shape index, dtype name, scheme): both tiles, with and
#: without zero points, every dtype; ``--quick`` (racecheck) takes the first two.
WGMMA_CASES = [(0, "f16", "dynamic_asym"), (2, "bf16", "dynamic"), (1, "f32", "static_asym"),
               (3, "f64", "static")]
SCHEMES = ["dynamic", "static_asym", "static", "dynamic_asym"]  # zero points every other
DTYPES = ["f16", "bf16", "f32", "f64"]


#: ``--wgmma-smoke``: one small case per tile, (M, K, N, dtype name, scheme): 135 tiles of
#: 128x256 (more than the 132 SMs: a block takes two) in one k-tile; 128x128 with a stage
#: ring that wraps (9 k-tiles over 6 stages) and zero points.
WGMMA_SMOKE = [(1100, 48, 3841, "f16", "dynamic"), (200, 1040, 600, "bf16", "dynamic_asym")]


def wgmma_sweep():
    """``--wgmma-sweep``: every dtype with every scheme, each dtype and each scheme over
    all four shapes, ``(shape index, dtype name, scheme)``."""
    return [((d + s) % len(WGMMA_SHAPES), dt, sch)
            for d, dt in enumerate(DTYPES) for s, sch in enumerate(SCHEMES)]


def same(got, want):
    g, w = got.astype(np.float64), want.astype(np.float64)
    return bool(np.all((g == w) | (np.isnan(g) & np.isnan(w))))


def _classes(values, period):
    """The residues ``values % period`` present, as ranges: "64-127", "5, 9-11"."""
    found = np.unique(values % period).tolist()
    runs, start = [], found[0]
    for prev, cur in zip(found, found[1:] + [None]):
        if cur is None or cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = cur
    return ", ".join(runs[:8]) + (" ..." if len(runs) > 8 else "")


def describe(got, want):
    """Where an output differs from the oracle, for the log of a first GPU run: how many
    elements, the first, and their rows mod 128 and columns mod 256 (a wrong tile edge,
    fragment layout or k-range shows as a pattern there). "" where nothing differs."""
    g, w = got.astype(np.float64), want.astype(np.float64)
    bad = ~((g == w) | (np.isnan(g) & np.isnan(w)))
    if not bad.any():
        return ""
    r, c = np.nonzero(bad)
    return (f" [output: {int(bad.sum())} of {bad.size} differ, first at ({r[0]}, {c[0]}): "
            f"{float(g[r[0], c[0]])} for {float(w[r[0], c[0]])}; rows mod 128: {_classes(r, 128)}; "
            f"columns mod 256: {_classes(c, 256)}]")


class Gemm:
    """Which GEMM the cases ask for and which their plans took."""

    def __init__(self, be):
        self.be = be
        self.switch = hasattr(be, "wgmma")  # the cuda backend's; no other backend has one
        self.hopper = getattr(be, "arch", None) == "sm_90a"
        self.asked = 0      # cases asking for the wgmma GEMM
        self.default = 0    # cases asking for the default one
        self.took = set()   # the wgmma GEMM labels their plans took
        self.wrong = 0      # wgmma cases on sm_90a whose plan did not take it

    @contextlib.contextmanager
    def selecting(self, wgmma):
        """Plans selected inside take the wgmma GEMM when ``wgmma`` (else the default)."""
        if not self.switch:
            yield
            return
        before = self.be.wgmma
        self.be.wgmma = wgmma
        try:
            yield
        finally:
            self.be.wgmma = before

    def check(self, sku, wgmma):
        """'' if the plan ran the GEMM asked for (as far as this device allows), else why."""
        took = "+gemm_wgmma" in sku
        self.asked += wgmma
        self.default += not wgmma
        if wgmma and took:
            label = next(p for p in sku.split("+") if p.startswith("gemm_wgmma_"))
            self.took.add(label[len("gemm_wgmma_"):])
        if took and not wgmma:
            return " (wgmma taken with the switch off)"
        if wgmma and self.hopper and not took:
            self.wrong += 1
            return " (wgmma asked for on sm_90a, not selected)"
        return ""

    def summary(self):
        """The run's account of its GEMMs, one line (device_check.sh's summary quotes it)."""
        line = "gemm: "
        if self.asked:
            if self.hopper:
                line += (f"wgmma on in {self.asked} cases, taken in {self.asked - self.wrong} "
                         f"(gemm_wgmma_{{{', '.join(sorted(self.took))}}})")
            else:
                where = getattr(self.be, "arch", self.be.name)
                line += f"wgmma on in {self.asked} cases, none taken ({where}: no wgmma GEMM)"
        if self.default:
            line += ("; " if self.asked else "") + f"wgmma off in {self.default}"
        return line


def run_case(be, gemm, m, k, n, dtype, rng, wgmma=False):
    """The default scheme against the int64 reference."""
    x = (rng.standard_normal((m, k)) * 3).astype(dtype.numpy)
    x[0, 0] = np.nan if m > 2 else x[0, 0]
    wq = rng.integers(-128, 128, (n, k), dtype=np.int8)
    ws = rng.uniform(1e-3, 1e-2, n).astype(dtype.numpy)
    bias = rng.standard_normal(n).astype(dtype.numpy)
    with gemm.selecting(wgmma):
        plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(m, n, k, dtype))
    args = ql.QuantizedLinearArgs(be.from_numpy(x), be.from_numpy(wq), be.from_numpy(ws),
                                  be.empty((m, n), dtype), be.empty((m, k), ql.s8),
                                  be.empty((m,), dtype), be.from_numpy(bias))
    plan.run(args)
    y, q, s = reference_linear(x, wq, ws, bias, dtype)
    wrong = gemm.check(plan.sku, wgmma)
    out = be.to_numpy(args.output)
    ok = not wrong and (
        same(out, y) and same(be.to_numpy(args.act_scale_scratch), s)
        and (be.to_numpy(args.act_q_scratch).astype(np.int64) == q).all())
    print(f"{'ok ' if ok else 'BAD'} M={m} K={k} N={n} {dtype.name} {plan.sku}{wrong}"
          f"{describe(out, y)}", flush=True)
    return ok


def run_scheme_case(be, gemm, m, k, n, dtype, scheme, rng, wgmma=False):
    """One problem in ``scheme`` on ``be`` and on the cpu backend: output, q, scales and
    (for the asymmetric schemes) zero points must agree bit for bit."""
    x = (rng.standard_normal((m, k)) * 3 + rng.uniform(-4, 4, (m, 1))).astype(dtype.numpy)
    if m > 2:
        x[1, 0] = np.nan
    wq = rng.integers(-128, 128, (n, k), dtype=np.int8)
    ws = rng.uniform(1e-3, 1e-2, n).astype(dtype.numpy)
    bias = rng.standard_normal(n).astype(dtype.numpy)
    desc = ql.QuantizedLinearDescriptor(m, n, k, dtype, scheme=scheme)
    extra = {"input_scale": 0.05} if desc.scheme.static else {}
    if desc.scheme.static_zero_point:
        extra["input_zero_point"] = -9
    got, skus = [], []
    for b in (be, ql.backend("cpu")):
        with gemm.selecting(wgmma and b is be):
            plan = ql.QuantizedLinearPlan.select(b, desc)
        skus.append(plan.sku)
        if desc.scheme.asymmetric:
            extra.update(act_zp_scratch=b.empty((m,), ql.s32),
                         weight_colsum=b.from_numpy(ql.weight_colsum(wq)))
        args = ql.QuantizedLinearArgs(
            b.from_numpy(x), b.from_numpy(wq), b.from_numpy(ws), b.empty((m, n), dtype),
            b.empty((m, k), ql.s8), b.empty((m,), dtype), b.from_numpy(bias), **extra)
        plan.run(args)
        outs = [args.output, args.act_q_scratch, args.act_scale_scratch, args.act_zp_scratch]
        got.append([b.to_numpy(t) for t in outs if t is not None])
    wrong = gemm.check(skus[0], wgmma)
    # Floats (bf16 is numpy kind "V") NaN where the other is NaN, integers equal.
    ok = not wrong and all(same(a, c) if a.dtype.kind in "fV" else bool((a == c).all())
                           for a, c in zip(*got))
    print(f"{'ok ' if ok else 'BAD'} M={m} K={k} N={n} {dtype.name} {scheme} {skus[0]}{wrong}"
          f"{describe(got[0][0], got[1][0])}", flush=True)
    return ok


def run_wgmma_cases(be, gemm, cases, rng):
    """``cases`` of ``(shape index, dtype name, scheme)`` with the wgmma GEMM asked for."""
    dtypes = {"f64"} if be.name == "wgpu" else set()
    ok = True
    for i, dt, scheme in cases:
        if dt in dtypes:
            continue
        m, k, n, _ = WGMMA_SHAPES[i]
        dtype = getattr(ql, dt)
        if scheme == "dynamic":
            ok &= run_case(be, gemm, m, k, n, dtype, rng, wgmma=True)
        else:
            ok &= run_scheme_case(be, gemm, m, k, n, dtype, scheme, rng, wgmma=True)
    return ok


def zero_copy(be, rng):
    ok = True
    try:
        import torch
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            x = torch.randn(5, 33, device="cuda", dtype=torch.float16)
            layer = ql.QuantizedLinear.from_float(rng.standard_normal((7, 33)).astype(np.float32),
                                                  backend=be, dtype=ql.f16)
            y = torch.empty(5, 7, device="cuda", dtype=torch.float16)
            layer.forward(be.wrap(x), out=be.wrap(y), stream=s)
        s.synchronize()
        want = layer(x.cpu().numpy())
        good = same(y.cpu().numpy(), want)
        print(f"{'ok ' if good else 'BAD'} torch zero-copy on a non-default stream", flush=True)
        ok &= good
    except ImportError:
        print("-- torch not installed: zero-copy torch case not run")
    try:
        import cupy as cp
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            x = cp.asarray(rng.standard_normal((4, 40)).astype(np.float32))
            layer = ql.QuantizedLinear.from_float(rng.standard_normal((9, 40)).astype(np.float32),
                                                  backend=be)
            y = cp.empty((4, 9), cp.float32)
            layer.forward(be.wrap(x), out=be.wrap(y), stream=s)
        s.synchronize()
        good = same(cp.asnumpy(y), layer(cp.asnumpy(x)))
        print(f"{'ok ' if good else 'BAD'} CuPy zero-copy on a non-default stream", flush=True)
        ok &= good
    except ImportError:
        print("-- CuPy not installed: zero-copy CuPy case not run")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases (racecheck is slow)")
    ap.add_argument("--backend", default="cuda", help="cuda (default); others to try it out")
    # racecheck looks at shared memory: torch's and CuPy's own kernels only cost it time.
    ap.add_argument("--no-interop", action="store_true",
                    help="skip the torch and CuPy zero-copy cases")
    ap.add_argument("--wgmma-smoke", action="store_true",
                    help="only one small wgmma case per tile (a first look, under a short "
                         "time limit)")
    ap.add_argument("--no-wgmma", action="store_true",
                    help="skip the wgmma cases (their smoke test failed)")
    ap.add_argument("--wgmma-sweep", action="store_true",
                    help="only the wgmma GEMM: every dtype with every scheme (no sanitizer "
                         "needed; the shared tests have few shapes that select it)")
    args = ap.parse_args(argv)
    try:
        be = ql.backend(args.backend)
    except ql.BackendUnavailable as e:
        print(f"the {args.backend} backend is unavailable here: {e.reason}", file=sys.stderr)
        return 2
    gemm = Gemm(be)
    rng = np.random.default_rng(7)
    if args.wgmma_smoke:
        ok = True
        for m, k, n, dt, scheme in WGMMA_SMOKE:
            if scheme == "dynamic":
                ok &= run_case(be, gemm, m, k, n, getattr(ql, dt), rng, wgmma=True)
            else:
                ok &= run_scheme_case(be, gemm, m, k, n, getattr(ql, dt), scheme, rng,
                                      wgmma=True)
    elif args.wgmma_sweep:
        ok = run_wgmma_cases(be, gemm, wgmma_sweep(), rng)
    else:
        ms, ks = (MS[:3], KS[:2]) if args.quick else (MS, KS)
        dtypes = [ql.f16] if args.quick else [ql.f16, ql.bf16, ql.f32] + (
            [ql.f64] if be.name != "wgpu" else [])
        ok = all([run_case(be, gemm, m, k, N, dt, rng) for m in ms for k in ks for dt in dtypes])
        cases = SCHEME_CASES[:1] if args.quick else SCHEME_CASES
        ok &= all([run_scheme_case(be, gemm, m, k, N, getattr(ql, dt), sch, rng)
                   for m, k, dt, sch in cases])
        if not args.no_wgmma:
            ok &= run_wgmma_cases(be, gemm, WGMMA_CASES[:2] if args.quick else WGMMA_CASES,
                                  rng)
        if be.name == "cuda" and not args.no_interop:
            ok &= zero_copy(be, rng)
    print(gemm.summary(), flush=True)
    print("all ok" if ok else "FAILURES", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``qlinear`` command: ``info`` (what runs here and why not) and ``bench`` (the main job).

``qlinear bench`` checks each shape against the exact int64 reference first, then
times the plan (activation pass + GEMM + epilogue, everything a layer call does)
beside the floating-point matmul of the same shape on the same device and, where
installed, the peers (torch's float matmul and its W8A8 composition).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import __version__
from .backends import backend as get_backend, backend_status
from .dtypes import FLOAT_DTYPES, as_dtype
from .errors import QlinearError, Unsupported
from .layer import quantize_weight
from .plans import QuantizedLinearPlan
from .problem import QuantizedLinearArgs, QuantizedLinearDescriptor
from .reference import reference_linear

__all__ = ["main", "info", "bench", "BenchCase", "default_cases"]

# (K, N) of real models, and M for decode and prefill.
LLM_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]
LLM_M = [1, 16, 512, 4096]
# What a 2-core machine finishes in well under a minute.
SMALL_SHAPES = [(384, 1536), (4096, 4096)]
SMALL_M = [1, 16, 512]
# Rows checked exactly against the int64 reference when checking every row costs too much.
_CHECK_ROWS = 8


class BenchCase(tuple):
    """``(m, k, n, dtype)`` of one benchmark row."""

    __slots__ = ()

    def __new__(cls, m, k, n, dtype):
        return super().__new__(cls, (int(m), int(k), int(n), as_dtype(dtype)))


def default_cases(be, dtype=None) -> list:
    """The shapes ``qlinear bench`` runs with no arguments on ``be``."""
    if be.is_gpu:
        dt = dtype or as_dtype("f16")
        return [BenchCase(m, k, n, dt) for k, n in LLM_SHAPES for m in LLM_M]
    dt = dtype or as_dtype("f32")
    return [BenchCase(m, k, n, dt) for k, n in SMALL_SHAPES for m in SMALL_M]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _median_time(fn, sync, min_seconds: float, max_reps: int) -> float:
    """Median wall time of ``fn(); sync()`` over repetitions, after one warm-up."""
    fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _check(be, plan, args, x, wq, ws, bias, desc, rng) -> str:
    """Compare the plan's output and scratches with the int64 reference (sampled rows on
    large problems). Returns "ok" or a description of the first mismatch."""
    m = desc.m
    rows = np.arange(m) if m * desc.k * desc.c_out <= 2**26 else \
        np.unique(np.concatenate([[0, m - 1], rng.integers(0, m, _CHECK_ROWS)]))
    plan.run(args)
    y = be.to_numpy(args.output)[rows]
    q = be.to_numpy(args.act_q_scratch)[rows]
    s = be.to_numpy(args.act_scale_scratch)[rows]
    want_y, want_q, want_s = reference_linear(x[rows], wq, ws, bias, desc.dtype,
                                              desc.q_min, desc.q_max)
    for name, got, want in (("act_scale", s, want_s), ("act_q", q.astype(np.int64), want_q),
                            ("output", y, want_y)):
        same = (got.astype(np.float64) == want.astype(np.float64)) | \
            (np.isnan(got.astype(np.float64)) & np.isnan(want.astype(np.float64)))
        if not same.all():
            return f"MISMATCH in {name} ({int((~same).sum())} elements)"
    return "ok"


def _peers(be, case):
    try:
        from .peers import torch_peers
    except ImportError:
        return {}
    device = "cuda" if be.name == "cuda" else "cpu"
    if be.name not in ("cpu", "cuda"):
        return {}
    try:
        return torch_peers(case[0], case[1], case[2], case[3], device=device)
    except Exception:
        return {}


def bench(be, cases, *, min_seconds=0.3, max_reps=50, progress=True, rng=None) -> list[dict]:
    """Check and time every case on ``be``; return one dict per case."""
    rng = rng or np.random.default_rng(0)
    rows = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(cases), desc=f"qlinear bench ({be.name})", file=sys.stderr,
                       leave=False)
        except ImportError:
            bar = None
    for case in cases:
        m, k, n, dt = case
        row = {"backend": be.name, "device": be.device_name, "m": m, "k": k, "n": n,
               "dtype": dt.name}
        x = (rng.standard_normal((m, k)) * 3).astype(dt.numpy)
        w = rng.standard_normal((n, k)).astype(np.float32)
        wq, ws = quantize_weight(w, dtype=dt)
        bias = rng.standard_normal(n).astype(dt.numpy)
        desc = QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dt)
        try:
            plan = QuantizedLinearPlan.select(be, desc)
        except Unsupported as e:
            row.update(check=f"unsupported: {e}")
            rows.append(row)
            if bar:
                bar.update()
            continue
        args = QuantizedLinearArgs(
            activation=be.from_numpy(x), weight_q=be.from_numpy(wq, readonly=True),
            weight_scale=be.from_numpy(ws, readonly=True), output=be.empty((m, n), dt),
            act_q_scratch=be.empty((m, k), as_dtype("s8")), act_scale_scratch=be.empty((m,), dt),
            bias=be.from_numpy(bias, readonly=True))
        row["sku"] = plan.sku
        row["check"] = _check(be, plan, args, x, wq, ws, bias, desc, rng)
        t = _median_time(lambda: plan.run(args), be.synchronize, min_seconds, max_reps)
        row["qlinear_ms"] = t * 1e3
        row["tops"] = desc.ops / t / 1e12
        fm = be.float_matmul(m, k, n, dt)
        if fm is not None:
            tf = _median_time(fm, lambda: None, min_seconds, max_reps)
            row["float_matmul_ms"] = tf * 1e3
            row["vs_float_matmul"] = tf / t
        for name, fn in _peers(be, case).items():
            tp = _median_time(fn, lambda: None, min_seconds, max_reps)
            row[f"{name}_ms"] = tp * 1e3
            row[f"vs_{name}"] = tp / t
        rows.append(row)
        if bar:
            bar.update()
    if bar:
        bar.close()
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of bench rows."""
    peer_cols = sorted({key for r in rows for key in r if key.startswith("vs_")
                        and key != "vs_float_matmul"})
    head = ["dtype", "M", "K", "N", "check", "time ms", "TOPS", "x float mm"] + \
        [f"x {c[3:]}" for c in peer_cols] + ["sku"]
    lines = []
    for r in rows:
        def fmt(key, spec):
            return format(r[key], spec) if key in r else "-"
        lines.append([r["dtype"], str(r["m"]), str(r["k"]), str(r["n"]), r.get("check", "-"),
                      fmt("qlinear_ms", ".3f"), fmt("tops", ".4f"), fmt("vs_float_matmul", ".2f")]
                     + [fmt(c, ".2f") for c in peer_cols] + [r.get("sku", "-")])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(l, widths)) for l in lines]
    return "\n".join(out)


def info() -> dict:
    """Every known backend, available or not and why; devices, limits and kernel choices."""
    out = {"qlinear": __version__, "python": platform.python_version(), "backends": []}
    for st in backend_status():
        entry = {"name": st.name, "available": st.available}
        if st.available:
            be = st.backend
            entry["is_gpu"] = be.is_gpu
            try:
                entry["info"] = be.info()
            except QlinearError as e:
                entry["info"] = {"error": str(e)}
            kernels = {}
            for m in (1, 16, 512):
                for dt in FLOAT_DTYPES[:2]:
                    desc = QuantizedLinearDescriptor(m=m, c_out=4096, k=4096, dtype=dt)
                    try:
                        kernels[f"M={m} K=N=4096 {dt.name}"] = QuantizedLinearPlan.select(be, desc).sku
                    except QlinearError as e:
                        kernels[f"M={m} K=N=4096 {dt.name}"] = f"unsupported: {e}"
            entry["plans"] = kernels
        else:
            entry["reason"] = st.reason
            entry["install"] = st.install
        out["backends"].append(entry)
    return out


def _print_info(data: dict) -> None:
    print(f"qlinear {data['qlinear']} (Python {data['python']})")
    for b in data["backends"]:
        if b["available"]:
            kind = "GPU" if b["is_gpu"] else "no GPU"
            print(f"\n[{b['name']}] available ({kind})")
            for key, value in b["info"].items():
                if isinstance(value, dict):
                    print(f"  {key}:")
                    for k2, v2 in value.items():
                        print(f"    {k2}: {v2}")
                else:
                    print(f"  {key}: {value}")
            print("  plans:")
            for k2, v2 in b["plans"].items():
                print(f"    {k2}: {v2}")
        else:
            print(f"\n[{b['name']}] unavailable: {b['reason']}")
            if b["install"]:
                print(f"  to enable: {b['install']}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlinear", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="backends, devices, limits and kernel choices")
    pi.add_argument("--json", metavar="FILE", help="also write the facts as JSON")
    pb = sub.add_parser("bench", help="check against the exact reference, then time")
    pb.add_argument("--backend", help="cpu, wgpu or cuda (default: the best available)")
    pb.add_argument("--m", type=int, nargs="+", help="rows (tokens); several allowed")
    pb.add_argument("--k", type=int, help="input features")
    pb.add_argument("--n", type=int, help="output features (C_out)")
    pb.add_argument("--dtype", help="f32, f16, bf16 or f64")
    pb.add_argument("--min-seconds", type=float, default=0.3, help="time per measurement")
    pb.add_argument("--max-reps", type=int, default=50, help="most repetitions per measurement")
    pb.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    pb.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    """Entry point of the ``qlinear`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    # Mesa's Vulkan drivers print an error when this is unset, which on a server without a
    # desktop session it usually is; they only use it for window-system sockets.
    if sys.platform.startswith("linux") and not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(tempfile.gettempdir()) / f"qlinear-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    try:
        if args.command == "info":
            data = info()
            _print_info(data)
            if args.json:
                Path(args.json).write_text(json.dumps(data, indent=2, default=str))
            return 0
        be = get_backend(args.backend)
        dtype = as_dtype(args.dtype) if args.dtype else None
        if args.m or args.k or args.n:
            if not (args.m and args.k and args.n):
                print("qlinear bench: --m, --k and --n go together", file=sys.stderr)
                return 2
            cases = [BenchCase(m, args.k, args.n, dtype or as_dtype("f32")) for m in args.m]
        else:
            cases = default_cases(be, dtype)
        print(f"qlinear bench on {be.name}: {be.device_name}")
        rows = bench(be, cases, min_seconds=args.min_seconds, max_reps=args.max_reps,
                     progress=not args.no_progress)
        print(format_table(rows))
        print("time: median wall time of plan.run + synchronize; TOPS = 2*M*K*N / time; "
              "x float mm = float matmul time / qlinear time (>1: qlinear is faster)")
        if args.json:
            meta = {"date": datetime.date.today().isoformat(), "commit": _git_commit(),
                    "qlinear": __version__, "backend": be.name, "device": be.device_name}
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0 if all(r.get("check", "ok") == "ok" or r["check"].startswith("unsupported")
                        for r in rows) else 1
    except QlinearError as e:
        print(f"qlinear {args.command}: {e}", file=sys.stderr)
        return 2

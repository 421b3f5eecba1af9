"""The ``qlinear`` command: ``info`` (what runs here and why not) and ``bench`` (the main job).

``qlinear bench`` checks each shape against the exact int64 reference first, then
times the plan (activation pass + GEMM + epilogue, everything a layer call does)
beside the floating-point matmul of the same shape on the same device and, where
installed, the peers (torch's float matmul and its W8A8 composition).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .backends import backend as get_backend
from .backends import backend_status
from .bench import BenchCase, bench, default_cases, format_table, run_meta
from .dtypes import as_dtype
from .errors import QlinearError
from .plans import typical_plans

__all__ = ["main", "info", "bench", "BenchCase", "default_cases"]


def info() -> dict[str, Any]:
    """Every known backend, available or not and why; devices, limits and kernel choices."""
    backends: list[dict[str, Any]] = []
    out = {"qlinear": __version__, "python": platform.python_version(), "backends": backends}
    for st in backend_status():
        entry: dict[str, Any] = {"name": st.name, "available": st.available}
        if st.available and st.backend is not None:
            be = st.backend
            entry["is_gpu"] = be.is_gpu
            try:
                entry["info"] = be.info()
            except QlinearError as e:
                entry["info"] = {"error": str(e)}
            entry["plans"] = typical_plans(be)
        else:
            entry["reason"] = st.reason
            entry["install"] = st.install
        backends.append(entry)
    return out


def _print_info(data: dict[str, Any]) -> None:
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
    p = argparse.ArgumentParser(prog="qlinear", description=(__doc__ or "").splitlines()[0])
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


def main(argv: Sequence[str] | None = None) -> int:
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
            meta = run_meta(be.name, be.device_name)
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0 if all(r.get("check", "ok") == "ok" or r["check"].startswith("unsupported")
                        for r in rows) else 1
    except QlinearError as e:
        print(f"qlinear {args.command}: {e}", file=sys.stderr)
        return 2

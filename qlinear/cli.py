"""The ``qlinear`` command: ``info`` (what runs here and why not) and ``bench`` (the main job).

``qlinear bench`` checks each shape against the exact int64 reference first, then
times the plan (activation pass + GEMM + epilogue, everything a layer call does)
beside the floating-point matmul of the same shape on the same device and, where
installed, the peers (torch's float matmul and its W8A8 composition).

Every argument is checked before any work; a bad one is a one-line message on stderr
naming the option, what was expected and what was given, and exit status 2.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .backends import Backend, backend_names, backend_status, default_backend
from .backends import backend as get_backend
from .bench import BenchCase, bench, default_cases, format_report, run_meta
from .dtypes import FLOAT_DTYPES, DType, as_dtype
from .errors import InvalidProblem, QlinearError
from .plans import typical_plans
from .problem import INT32_MAX, check_int, max_exact_k
from .schemes import ActivationScheme

__all__ = ["main", "info", "bench", "BenchCase", "default_cases", "UsageError"]

_DESCRIPTION = """\
W8A8 quantized linear layers on cpu, wgpu and cuda.

  qlinear info    every backend, available or not and why; devices, limits, kernels
  qlinear bench   check against the exact int64 reference, then time beside the float
                  matmul of the same shape and, where installed, torch's W8A8 path

Run 'qlinear COMMAND --help' for a command's options."""

_BENCH_DESCRIPTION = """\
Check each shape against the exact int64 reference, then time the plan (activation
pass + int8 GEMM + dequant epilogue) beside the float matmul of the same shape on the
same device and, where torch is installed, torch's matmul and its W8A8 composition.
Ratios are baseline time / qlinear time: > 1 means qlinear is faster."""


class UsageError(Exception):
    """A bad command line: the message names the option, expected vs given."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and exits on its own; one line and a status is clearer,
    # and main() then returns instead of raising SystemExit under a caller.
    def error(self, message: str) -> Any:
        raise UsageError(message)


def info() -> dict[str, Any]:
    """Every known backend, available or not and why; devices, limits and kernel choices.
    ``default`` names the backend ``ql.backend()`` picks here, and why."""
    choice = default_backend()
    backends: list[dict[str, Any]] = []
    out = {"qlinear": __version__, "python": platform.python_version(),
           "default": {"backend": choice.backend.name, "reason": choice.reason},
           "backends": backends}
    for st in backend_status():
        entry: dict[str, Any] = {"name": st.name, "available": st.available,
                                 "default": st.name == choice.backend.name}
        if st.available and st.backend is not None:
            be = st.backend
            entry["is_gpu"] = be.is_gpu
            entry["activation_schemes"] = [s.value for s in ActivationScheme
                                           if s in be.activation_schemes]
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
    print(f"default backend: {data['default']['backend']} ({data['default']['reason']})")
    for b in data["backends"]:
        mark = " (default)" if b["default"] else ""
        if b["available"]:
            kind = "GPU" if b["is_gpu"] else "no GPU"
            print(f"\n[{b['name']}] available ({kind}){mark}")
            print(f"  activation schemes: {', '.join(b['activation_schemes'])}")
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
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="qlinear", description=_DESCRIPTION, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"qlinear {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pi = sub.add_parser("info", help="backends, devices, limits and kernel choices")
    pi.add_argument("--json", metavar="FILE", help="also write the facts as JSON")
    pb = sub.add_parser("bench", help="check against the exact reference, then time",
                        description=_BENCH_DESCRIPTION, formatter_class=fmt)
    # Numbers are read as text and checked in _bench_request, so that every message has
    # the same form and names its option.
    pb.add_argument("--backend", help=f"one of {', '.join(backend_names())} "
                                      "(default: the best available, and why is printed)")
    pb.add_argument("--m", nargs="+", metavar="M", help="rows (tokens); several allowed")
    pb.add_argument("--k", metavar="K", help="input features (with --m and --n)")
    pb.add_argument("--n", metavar="N", help="output features, C_out (with --m and --k)")
    pb.add_argument("--dtype", help=f"one of {', '.join(d.name for d in FLOAT_DTYPES)}")
    pb.add_argument("--min-seconds", default="0.3", metavar="S",
                    help="time spent per measurement, at least (default 0.3)")
    pb.add_argument("--max-reps", default="50", metavar="R",
                    help="most repetitions per measurement (default 50)")
    pb.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    pb.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@dataclass(frozen=True)
class _BenchRequest:
    backend: str | None
    shape: tuple[list[int], int, int] | None
    dtype: DType | None
    min_seconds: float
    max_reps: int
    json: Path | None


def _int_option(option: str, text: str, lo: int, hi: int, what: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{option}: expected an integer in {lo}..{hi}{what}, "
                         f"got {text!r}") from None
    try:
        return check_int(option, value, lo, hi, what)
    except InvalidProblem as e:
        raise UsageError(str(e)) from None


def _writable(option: str, text: str) -> Path:
    """``text`` as a path that can be written; nothing is left behind by the check."""
    path = Path(text)
    if path.is_dir():
        raise UsageError(f"{option}: expected a file to write, got the directory {text!r}")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"{option}: expected a writable file, got {text!r} "
                         f"({e.strerror or e})") from None
    if not existed:
        path.unlink()
    return path


def _bench_request(a: argparse.Namespace) -> _BenchRequest:
    """Every option of ``qlinear bench`` checked, before any work."""
    if a.backend is not None and a.backend not in backend_names():
        raise UsageError(f"--backend: expected one of {', '.join(backend_names())}, "
                         f"got {a.backend!r}")
    dtype = None
    if a.dtype is not None:
        names = [d.name for d in FLOAT_DTYPES]
        if a.dtype not in names:
            raise UsageError(f"--dtype: expected one of {', '.join(names)}, got {a.dtype!r}")
        dtype = as_dtype(a.dtype)
    given = [opt for opt, v in (("--m", a.m), ("--k", a.k), ("--n", a.n)) if v is not None]
    shape = None
    if given:
        if len(given) != 3:
            raise UsageError(f"--m, --k and --n go together: expected all three, "
                             f"got only {' and '.join(given)}")
        ms = [_int_option("--m", t, 1, INT32_MAX) for t in a.m]
        k = _int_option("--k", a.k, 1, max_exact_k(),
                        " (so that the int32 accumulation is exact)")
        n = _int_option("--n", a.n, 1, INT32_MAX)
        shape = (ms, k, n)
    try:
        min_seconds = float(a.min_seconds)
    except ValueError:
        min_seconds = math.nan
    if not math.isfinite(min_seconds) or min_seconds < 0:
        raise UsageError(f"--min-seconds: expected a finite number of seconds >= 0, "
                         f"got {a.min_seconds!r}")
    max_reps = _int_option("--max-reps", a.max_reps, 1, 1_000_000)
    out = _writable("--json", a.json) if a.json is not None else None
    return _BenchRequest(a.backend, shape, dtype, min_seconds, max_reps, out)


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` through a temporary file: a failure leaves no partial file."""
    # open() gives the file the permissions the user's umask asks for (mkstemp's are 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _chosen(req: _BenchRequest) -> tuple[Backend, str]:
    """The backend to time and a sentence saying why it was picked."""
    if req.backend is not None:
        be = get_backend(req.backend)
        return be, f"{be.device_name}, chosen with --backend"
    choice = default_backend()
    be = choice.backend
    why = choice.reason
    if not be.is_gpu:
        others = [s.name for s in backend_status() if s.available and s.name != be.name]
        if others:
            why += f"; pass --backend {' or --backend '.join(others)} to time it anyway"
    return be, why


def _bench(req: _BenchRequest, progress: bool) -> int:
    be, why = _chosen(req)
    if req.shape is not None:
        ms, k, n = req.shape
        cases = [BenchCase(m, k, n, req.dtype or as_dtype("f32")) for m in ms]
    else:
        cases = default_cases(be, req.dtype)
    print(f"qlinear bench on {be.name}: {why}")
    try:
        rows = bench(be, cases, min_seconds=req.min_seconds, max_reps=req.max_reps,
                     progress=progress)
    except MemoryError:
        raise UsageError("--m, --k, --n: out of host memory for these shapes; "
                         "expected smaller ones") from None
    print(format_report(rows))
    if req.json is not None:
        _write_json(req.json, {"meta": run_meta(be.name, be.device_name), "rows": rows})
    return 0 if all(r.get("check", "ok") == "ok" or r["check"].startswith("unsupported")
                    for r in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qlinear`` command; returns the exit status (0 ok, 1 a check
    failed, 2 a bad command line or a backend that cannot run)."""
    parser = _parser()
    command = "qlinear"
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
        command = f"qlinear {args.command}"
        if args.command == "info":
            out = _writable("--json", args.json) if args.json is not None else None
            data = info()
            _print_info(data)
            if out is not None:
                _write_json(out, data)
            return 0
        req = _bench_request(args)
        return _bench(req, progress=not args.no_progress)
    except UsageError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except QlinearError as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (qlinear info | head): stop quietly, and keep Python's
        # final flush of stdout from raising again at exit.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        return 1
    except OSError as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2

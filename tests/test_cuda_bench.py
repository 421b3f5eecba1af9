"""benchmarks/cuda_bench.py imports cleanly and, without a GPU, stops with a clear message."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cuda_bench.py"


def _load():
    spec = importlib.util.spec_from_file_location("cuda_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_available() -> bool:
    import qlinear as ql

    try:
        ql.backend("cuda")
        return True
    except ql.BackendUnavailable:
        return False


def test_imports_cleanly_without_torch_or_gpu():
    code = ("import importlib.util, sys; "
            f"s = importlib.util.spec_from_file_location('b', {str(SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "assert 'torch' not in sys.modules and 'cuda.core' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_arguments_and_defaults():
    bench = _load()
    args = bench.parse_args([])
    assert args.m == [1, 16, 512, 4096]
    assert args.kn == [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]
    assert args.dtype == ["f16", "bf16"]
    args = bench.parse_args(["--m", "3", "--kn", "64x96", "--dtype", "bf16", "--json", "x.json"])
    assert (args.m, args.kn, args.dtype, args.json) == ([3], [(64, 96)], ["bf16"], "x.json")
    with pytest.raises(SystemExit):
        bench.parse_args(["--kn", "64by96"])


def test_oracle_helpers():
    import qlinear as ql

    bench = _load()
    rows = bench.check_rows(4096)
    assert rows[0] == 0 and rows[-1] == 4095 and 127 in rows and 128 in rows and len(rows) <= 400
    assert list(bench.check_rows(5)) == [0, 1, 2, 3, 4]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 40)).astype(np.float16)
    x[2] = 0
    x[3, 1] = np.nan
    wq = rng.integers(-128, 128, (5, 40), dtype=np.int8)
    ws = rng.uniform(0.01, 0.02, 5).astype(np.float16)
    from qlinear.reference import reference_linear

    ry, rq, rs = reference_linear(x, wq, ws, None, ql.f16)
    bench.assert_same(ry, ry.copy(), "y")
    bench.assert_same(rs, rs.copy(), "scale")  # NaN where NaN is expected
    off = ry.copy()
    off[0, 0] = np.nextafter(off[0, 0], np.float16(np.inf))
    with pytest.raises(AssertionError, match="1 of 30 differ"):
        bench.assert_same(off, ry, "y")


@pytest.mark.skipif(_cuda_available(), reason="a CUDA GPU is available: the benchmark would run")
def test_without_a_gpu_it_fails_clearly():
    out = subprocess.run([sys.executable, str(SCRIPT), "--m", "1", "--kn", "64x64"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out
    assert "needs an NVIDIA GPU" in out.stderr and "Traceback" not in out.stderr
    assert _load().main(["--m", "1"]) == 2

"""benchmarks/cuda_bench.py imports cleanly and, without a GPU, stops with a clear message."""

from __future__ import annotations

import importlib.util
import json
import re
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


def test_quick_is_the_reduced_set_and_explicit_options_win():
    bench = _load()
    args = bench.parse_args(["--quick"])
    assert args.quick and args.m == [1, 16, 512]
    assert args.kn == [(4096, 14336), (14336, 4096)]
    assert (args.dtype, args.repeats, args.warmup) == (["f16"], 20, 3)
    # The module's QUICK lists are not handed out to be changed by a caller.
    args.m.append(99)
    assert bench.parse_args(["--quick"]).m == [1, 16, 512]
    args = bench.parse_args(["--quick", "--m", "7", "--repeats", "5", "--kn", "64x32"])
    assert (args.m, args.kn, args.repeats, args.dtype) == ([7], [(64, 32)], 5, ["f16"])
    assert not bench.parse_args([]).quick and bench.parse_args([]).repeats == 50
    for bad in (["--repeats", "0"], ["--warmup", "-1"], ["--quick", "--m", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def _raw_row(bench, **over):
    row = {"m": 16, "k": 4096, "n": 14336, "dtype": "f16", "qlinear_ms": 0.05,
           "act_pass_ms": 0.004, "copy_gbps": 4000.0, "torch_w8a8_ms": 0.11, "fp16_ms": 0.08}
    row.update(over)
    return bench.derive(row)


def test_json_rows_keep_the_documented_keys_and_the_raw_times():
    bench = _load()
    text = (SCRIPT.parent.parent / "BENCHMARKS.md").read_text()
    documented = re.search(r"with keys `([^`]+)`", text)
    assert documented, "BENCHMARKS.md names the keys of cuda_bench.py's JSON rows"
    keys = [k.strip() for k in documented.group(1).split(",")]
    assert keys == list(bench.RESULT_KEYS)
    rng = np.random.default_rng()
    m, k, n = (int(v) for v in rng.integers(1, 9000, 3))
    times = {name: float(rng.uniform(0.01, 5)) for name in
             ("qlinear_ms", "act_pass_ms", "torch_w8a8_ms", "fp16_ms")}
    copy = float(rng.uniform(1000, 5000))
    row = _raw_row(bench, m=m, k=k, n=n, dtype="bf16", copy_gbps=copy, **times)
    assert set(bench.RESULT_KEYS) <= set(row)
    json.loads(json.dumps(row))  # plain JSON values only
    # Every derived figure is recomputable from the raw ones (independent formulas here).
    assert row["weight_read_ms"] == pytest.approx(k * n / copy / 1e6)
    assert row["act_pass_gbps"] == pytest.approx((m * k * 3 + m * 2) / times["act_pass_ms"] / 1e6)
    assert row["tops"] == pytest.approx(2 * m * k * n / times["qlinear_ms"] / 1e9)
    assert row["w8a8_over_ql"] == pytest.approx(times["torch_w8a8_ms"] / times["qlinear_ms"])
    assert row["fp_over_ql"] == pytest.approx(times["fp16_ms"] / times["qlinear_ms"])
    assert row["wread_over_ql"] == pytest.approx(row["weight_read_ms"] / times["qlinear_ms"])
    no_torch = _raw_row(bench, torch_w8a8_ms=None, fp16_ms=None)
    assert no_torch["w8a8_over_ql"] is None and no_torch["fp_over_ql"] is None
    assert no_torch["wread_over_ql"] is not None


def test_rows_carry_device_date_and_commit(monkeypatch, tmp_path):
    bench = _load()
    args = bench.parse_args(["--quick"])
    monkeypatch.setenv("QLINEAR_COMMIT", "abc1234")
    meta = bench.provenance(args, "NVIDIA H200")
    assert meta["device"] == "NVIDIA H200" and meta["commit"] == "abc1234"
    assert meta["date"][:4].isdigit() and "T" in meta["date"]
    assert (meta["quick"], meta["repeats"], meta["warmup"]) == (True, 20, 3)
    monkeypatch.delenv("QLINEAR_COMMIT")
    assert bench.provenance(args, "x")["commit"]  # from git, or "unknown" outside a checkout
    rows = [dict(_raw_row(bench), **meta), dict(_raw_row(bench, m=1), **meta)]
    path = tmp_path / "rows.json"
    bench.write_json(str(path), rows[:1])
    bench.write_json(str(path), rows)
    assert json.loads(path.read_text()) == rows
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]


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

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

from qlinear.backends.base import Executable
from qlinear.backends.cpu import CpuBackend

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
    # Decode, small batch, and the two prefill sizes where the wgmma GEMM is timed.
    assert args.quick and args.m == [1, 16, 512, 4096]
    assert args.kn == [(4096, 14336), (14336, 4096)]
    assert (args.dtype, args.repeats, args.warmup) == (["f16"], 20, 3)
    # The module's QUICK lists are not handed out to be changed by a caller.
    args.m.append(99)
    assert bench.parse_args(["--quick"]).m == [1, 16, 512, 4096]
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
    # No wgmma plan (decode shapes, other GPUs): its time and every figure from it None.
    assert row["qlinear_wgmma_ms"] is None and row["tops_wgmma"] is None
    assert all(row[key] is None for key in bench.WGMMA_RATIOS)
    wg = float(rng.uniform(0.01, 5))
    row = _raw_row(bench, m=m, k=k, n=n, copy_gbps=copy, qlinear_wgmma_ms=wg, **times)
    assert row["tops_wgmma"] == pytest.approx(2 * m * k * n / wg / 1e9)
    assert row["ql_over_wgmma"] == pytest.approx(times["qlinear_ms"] / wg)
    assert row["fp_over_wgmma"] == pytest.approx(times["fp16_ms"] / wg)
    assert row["w8a8_over_wgmma"] == pytest.approx(times["torch_w8a8_ms"] / wg)
    row = _raw_row(bench, qlinear_wgmma_ms=wg, torch_w8a8_ms=None, fp16_ms=None)
    assert row["ql_over_wgmma"] is not None and row["fp_over_wgmma"] is None


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


# ------------------------------------------------------------------------------------
# The wgmma plan beside the default one, rehearsed on a stand-in for an sm_90a backend:
# the cpu backend (exact) whose plans name the wgmma GEMM when its switch is on.


class _Renamed(Executable):
    """The cpu executable under a wgmma sku; with ``writes`` False, one that writes nothing
    (as a kernel that never ran would)."""

    def __init__(self, exe, writes):
        self.exe, self.writes = exe, writes
        self.sku = exe.sku.replace("+blas", "+gemm_wgmma_128x256x128_s4+blas")

    def run(self, tensors, stream=None):
        if self.writes:
            self.exe.run(tensors, stream)


class FakeHopper(CpuBackend):
    """``backend.wgmma`` as on sm_90a: on, prefill shapes with K % 16 == 0 take "wgmma"."""

    arch = "sm_90a"

    def __init__(self, honours=True, writes=True):
        super().__init__("numpy")  # its skus name "+blas", which _Renamed rewrites
        self.wgmma = False
        self.honours, self.writes = honours, writes

    def linear_executable(self, desc):
        exe = super().linear_executable(desc)
        if self.wgmma and self.honours and desc.m > 64 and desc.k % 16 == 0:
            return _Renamed(exe, self.writes)
        return exe


class FakeTimer:
    """Returns made-up medians; records which runs were timed together."""

    def __init__(self):
        self.groups = []

    def medians_ms(self, fns, repeats, warmup, flush):
        for fn in fns:
            fn()
        self.groups.append(len(fns))
        return [0.5 + 0.25 * i for i in range(len(fns))]

    def median_ms(self, fn, repeats, warmup, flush):
        return self.medians_ms([fn], repeats, warmup, flush)[0]


def _bench_row(be, m, k=64, n=40, *extra):
    import qlinear as ql

    bench = _load()
    args = bench.parse_args(["--m", str(m), "--kn", f"{k}x{n}", "--repeats", "2", *extra])
    timer = FakeTimer()
    row = bench.bench_shape(be, None, timer, None, m, k, n, ql.f16, args, 3000.0,
                            np.random.default_rng())
    return bench, row, timer


def test_the_wgmma_plan_is_checked_and_timed_with_the_default_one():
    be = FakeHopper()
    bench, row, timer = _bench_row(be, m=129)
    assert not be.wgmma  # the switch is put back
    assert "gemm_wgmma" not in row["sku"] and bench.is_wgmma(row["sku_wgmma"])
    assert row["wgmma_check"] == "ok"
    assert timer.groups[0] == 2  # both plans in one alternating measurement
    assert (row["qlinear_ms"], row["qlinear_wgmma_ms"]) == (0.5, 0.75)
    assert row["ql_over_wgmma"] == pytest.approx(0.5 / 0.75)
    assert set(bench.RESULT_KEYS) <= set(row)
    json.loads(json.dumps(row))


@pytest.mark.parametrize("be", [FakeHopper(), FakeHopper(honours=False)],
                         ids=["decode", "switch-ignored"])
def test_no_wgmma_time_where_the_plan_does_not_take_it(be):
    bench, row, timer = _bench_row(be, m=16 if be.honours else 129)
    assert row["qlinear_wgmma_ms"] is None and row["wgmma_check"] == "not selected"
    assert row["sku_wgmma"] == row["sku"] and timer.groups[0] == 1


def test_no_wgmma_times_the_default_plan_only():
    """device_check.sh passes --no-wgmma when the wgmma GEMM failed its smoke test: no
    plan with the switch on is even selected."""
    be = FakeHopper()
    bench, row, timer = _bench_row(be, 129, 64, 40, "--no-wgmma")
    assert row["qlinear_wgmma_ms"] is None and row["sku_wgmma"] is None
    assert row["wgmma_check"] == "not run (--no-wgmma)" and timer.groups[0] == 1
    assert "gemm_wgmma" not in row["sku"] and row["qlinear_ms"] == 0.5


def test_a_wgmma_plan_that_writes_nothing_fails_its_check(capsys):
    """Its outputs start as NaN and q = -128, never the default plan's results."""
    bench, row, timer = _bench_row(FakeHopper(writes=False), m=129)
    assert row["wgmma_check"].startswith("FAILED: ") and "differ" in row["wgmma_check"]
    assert row["qlinear_wgmma_ms"] is None and row["qlinear_ms"] == 0.5
    bench.print_table([bench.derive(dict(row))], "fake", 3000.0)
    out = capsys.readouterr().out
    assert "wgmma ms" in out and "gemm: wgmma timed at 0 of 1 shapes" in out


def test_the_table_shows_the_wgmma_column_and_its_summary_line(capsys):
    bench = _load()
    rows = [_raw_row(bench, m=512, qlinear_wgmma_ms=0.025, sku="a", sku_wgmma="b",
                     torch_note=""),
            _raw_row(bench, m=1, sku="c", sku_wgmma="c", torch_note="")]
    bench.print_table(rows, "fake", 4000.0)
    out = capsys.readouterr().out
    head = next(ln for ln in out.splitlines() if "qlinear ms" in ln)
    assert "wgmma ms" in head and "ql/wg" in head and "fp/wg" in head
    line512 = next(ln for ln in out.splitlines() if ln.lstrip().startswith("512 "))
    assert "0.0250" in line512 and "2.00x" in line512 and "3.20x" in line512
    assert "kernels with wgmma on: b" in out
    assert out.rstrip().splitlines()[-1] == (
        "gemm: wgmma timed at 1 of 2 shapes (M > 64 on sm_90a); ql/wg 2.00x-2.00x, "
        "fp/wg 3.20x-3.20x")

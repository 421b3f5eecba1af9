"""The command line: info and bench, through ``python -m qlinear`` and ``main()``."""

import json
import os
import subprocess
import sys

import qlinear as ql
from qlinear import cli


def _env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(ql.__file__)))
    return dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_info_lists_every_backend(capsys, tmp_path):
    assert cli.main(["info", "--json", str(tmp_path / "i.json")]) == 0
    out = capsys.readouterr().out
    for s in ql.backend_status():
        assert f"[{s.name}]" in out
        if not s.available:
            assert s.reason in out
    data = json.loads((tmp_path / "i.json").read_text())
    cpu = next(b for b in data["backends"] if b["name"] == "cpu")
    assert cpu["available"] and any("cpu." in v for v in cpu["plans"].values())


def test_bench_small_shape_checks_then_times(capsys, tmp_path):
    out_json = tmp_path / "b.json"
    rc = cli.main(["bench", "--backend", "cpu", "--m", "1", "7", "--k", "33", "--n", "20",
                   "--dtype", "bf16", "--min-seconds", "0.01", "--max-reps", "3",
                   "--no-progress", "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "x float mm" in out and " ok " in out
    data = json.loads(out_json.read_text())
    assert data["meta"]["backend"] == "cpu"
    assert [r["m"] for r in data["rows"]] == [1, 7]
    for r in data["rows"]:
        assert r["check"] == "ok" and r["qlinear_ms"] > 0 and r["vs_float_matmul"] > 0


def test_bench_check_catches_a_wrong_kernel(monkeypatch, capsys):
    """The oracle check is live: a kernel that writes a wrong value fails the bench."""
    from qlinear.backends import cpu

    real = cpu.dequantize

    def broken(acc, scale, ws, bias, out):
        real(acc, scale, ws, bias, out)
        out[0, 0] += 1

    monkeypatch.setattr(cpu, "dequantize", broken)
    rc = cli.main(["bench", "--backend", "cpu", "--m", "3", "--k", "8", "--n", "4",
                   "--min-seconds", "0.01", "--max-reps", "2", "--no-progress"])
    assert rc == 1
    assert "MISMATCH in output" in capsys.readouterr().out


def test_bench_arguments_go_together(capsys):
    assert cli.main(["bench", "--backend", "cpu", "--m", "3"]) == 2


def test_bench_unknown_backend_is_a_clear_error(capsys):
    assert cli.main(["bench", "--backend", "tpu"]) == 2
    assert "backend" in capsys.readouterr().err


def test_default_cases_fit_a_small_machine():
    cases = cli.default_cases(ql.backend("cpu"))
    assert {(c[1], c[2]) for c in cases} == {(384, 1536), (4096, 4096)}
    assert {c[0] for c in cases} == {1, 16, 512}


def test_python_dash_m_runs():
    r = subprocess.run([sys.executable, "-m", "qlinear", "info"], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "[cpu] available" in r.stdout

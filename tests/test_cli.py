"""The command line: info and bench, through ``python -m qlinear`` and ``main()``."""

import json
import os
import subprocess
import sys

import pytest

import qlinear as ql
from qlinear import cli
from qlinear.backends import default_backend


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
    assert cpu["activation_schemes"] == ["dynamic", "static", "static_asym", "dynamic_asym"]


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


@pytest.mark.parametrize("engine", ["numpy", "onednn"])
def test_bench_check_catches_a_wrong_kernel(monkeypatch, capsys, engine):
    """The oracle check is live: a kernel that writes a wrong value fails the bench, on
    either cpu engine (the other one is checked too where both run)."""
    from qlinear.backends import cpu, cpu_torch

    be = ql.backend("cpu")
    if engine == "onednn" and be.engine.engine != "onednn":
        pytest.skip(f"the oneDNN engine does not run here: {be.engine.why}")
    # The small problem's epilogue runs numpy's dequantize on either engine.
    real = cpu.dequantize

    def broken(acc, scale, ws, bias, out):
        real(acc, scale, ws, bias, out)
        out[0, 0] += 1
    monkeypatch.setattr(cpu if engine == "numpy" else cpu_torch, "dequantize", broken)
    rc = cli.main(["bench", "--backend", "cpu", "--m", "3", "--k", "8", "--n", "4",
                   "--min-seconds", "0.01", "--max-reps", "2", "--no-progress"])
    assert rc == 1
    assert "MISMATCH in output" in capsys.readouterr().out


def test_bench_arguments_go_together(capsys):
    assert cli.main(["bench", "--backend", "cpu", "--m", "3"]) == 2
    err = capsys.readouterr().err
    assert "--m, --k and --n go together" in err and "got only --m" in err


def test_bench_unknown_backend_is_a_clear_error(capsys):
    assert cli.main(["bench", "--backend", "tpu"]) == 2
    assert "backend" in capsys.readouterr().err


SMALL = ["--m", "2", "--k", "24", "--n", "8", "--min-seconds", "0", "--max-reps", "3",
         "--no-progress"]


def test_bench_says_which_backend_and_why(capsys):
    """Without --backend, the first line names the backend ql.backend() picks and the
    registry's reason; a CPU pick points at the other backends that work here."""
    choice = default_backend()
    assert cli.main(["bench", *SMALL]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"qlinear bench on {choice.backend.name}: {choice.reason}")
    others = [s.name for s in ql.backend_status() if s.available and s.name != "cpu"]
    if not choice.backend.is_gpu:
        for name in others:
            assert f"--backend {name}" in first and "to time it anyway" in first


def test_bench_with_backend_says_so(capsys):
    assert cli.main(["bench", "--backend", "cpu", *SMALL]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"qlinear bench on cpu: {ql.backend('cpu').device_name}, chosen with --backend"


def test_info_marks_the_default_backend(capsys):
    choice = default_backend()
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    marked = [line for line in out.splitlines() if line.endswith("(default)")]
    assert marked == [f"[{choice.backend.name}] available "
                      f"({'GPU' if choice.backend.is_gpu else 'no GPU'}) (default)"]
    assert f"default backend: {choice.backend.name} ({choice.reason})" in out


def test_bench_shows_the_spread_and_names_the_baselines(capsys, tmp_path):
    out_json = tmp_path / "b.json"
    assert cli.main(["bench", "--backend", "cpu", "--m", "1", "5", "--k", "40", "--n", "24",
                     "--min-seconds", "0", "--max-reps", "4", "--no-progress",
                     "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[1].split()
    for col in ("min", "median", "max", "reps"):
        assert col in head
    assert "baseline time / qlinear time" in out and "> 1 means qlinear is faster" in out
    assert "x float mm: numpy's float32 matmul" in out
    rows = json.loads(out_json.read_text())["rows"]
    for r in rows:
        for t in ["qlinear", *r["baselines"]]:
            assert r[f"{t}_min_ms"] <= r[f"{t}_ms"] <= r[f"{t}_max_ms"]
            assert 1 <= r[f"{t}_reps"] <= 4
        # One ratio direction: baseline / qlinear.
        assert r["vs_float_matmul"] == r["float_matmul_ms"] / r["qlinear_ms"]
        line = next(ln for ln in out.splitlines() if ln.split()[:4] == ["f32", str(r["m"]),
                                                                        "40", "24"])
        assert f"{r['vs_float_matmul']:.2f}" in line.split()
        assert f"{r['qlinear_reps']}" in line.split()


BAD = [
    (["--m", "-1", "--k", "8", "--n", "8"], "--m: expected an integer in 1..", "-1"),
    (["--m", "0", "--k", "8", "--n", "8"], "--m: expected an integer in 1..", "0"),
    (["--m", "1.5", "--k", "8", "--n", "8"], "--m: expected an integer", "'1.5'"),
    (["--m", "1", "--k", "0", "--n", "8"], "--k: expected an integer in 1..", "0"),
    (["--m", "1", "--k", "99999999", "--n", "8"], "--k: expected an integer in 1..", "99999999"),
    (["--m", "1", "--k", "8", "--n", "-3"], "--n: expected an integer in 1..", "-3"),
    (["--k", "8"], "--m, --k and --n go together: expected all three", "--k"),
    (["--max-reps", "0"], "--max-reps: expected an integer in 1..", "0"),
    (["--min-seconds", "-1"], "--min-seconds: expected a finite number of seconds >= 0", "'-1'"),
    (["--min-seconds", "nan"], "--min-seconds: expected a finite number", "'nan'"),
    (["--dtype", "f8"], "--dtype: expected one of f32, f16, bf16, f64", "'f8'"),
    (["--dtype", "float32"], "--dtype: expected one of f32, f16, bf16, f64", "'float32'"),
    (["--dtype", "int8"], "--dtype: expected one of f32, f16, bf16, f64", "'int8'"),
    (["--backend", "nope"], f"--backend: expected one of {', '.join(ql.backend_names())}",
     "'nope'"),
    (["--m"], "--m", "expected at least one argument"),
    (["--bogus"], "unrecognized arguments", "--bogus"),
]


@pytest.mark.parametrize("argv,expected,got", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bench_bad_argument_is_one_line_before_any_work(argv, expected, got, capsys,
                                                        monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(cli, "bench", no_work)
    monkeypatch.setattr(cli, "default_backend", no_work)
    monkeypatch.setattr(cli, "get_backend", no_work)
    assert cli.main(["bench", *argv]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    err = cap.err.rstrip("\n")
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("qlinear") and expected in err and got in err, err


@pytest.mark.parametrize("command", ["bench", "info"])
def test_unwritable_json_is_refused_before_any_work(command, capsys, monkeypatch, tmp_path):
    def no_work(*a, **k):
        raise AssertionError("work started before --json was checked")

    monkeypatch.setattr(cli, "bench", no_work)
    monkeypatch.setattr(cli, "default_backend", no_work)
    monkeypatch.setattr(cli, "get_backend", no_work)
    for path in (tmp_path / "no-such-dir" / "b.json", tmp_path):
        assert cli.main([command, "--json", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--json: expected a" in err and str(path) in err, err
    assert list(tmp_path.iterdir()) == []


def test_json_check_leaves_nothing_behind_on_failure(capsys, monkeypatch, tmp_path):
    """The writability check creates no file, and an existing one is untouched, when the
    run then fails (here: the backend cannot be created)."""
    def unavailable(name):
        raise ql.BackendUnavailable(name, "no such device here")

    monkeypatch.setattr(cli, "get_backend", unavailable)
    fresh, kept = tmp_path / "fresh.json", tmp_path / "kept.json"
    kept.write_text("earlier figures")
    for path in (fresh, kept):
        assert cli.main(["bench", "--backend", "cpu", "--json", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no such device here" in err
    assert not fresh.exists() and kept.read_text() == "earlier figures"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"qlinear {ql.__version__}\n"


def test_help_is_plain_text(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "qlinear info" in out and "qlinear bench" in out
    assert "``" not in out and ":mod:" not in out
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--max-reps" in out and "``" not in out


def test_no_command_is_one_line(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "command" in err.lower()


def test_main_leaves_the_environment_alone(capsys, monkeypatch):
    """The wgpu backend looks after XDG_RUNTIME_DIR itself; the command does not set it."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    before = dict(os.environ)
    assert cli.main(["bench", "--backend", "cpu", *SMALL]) == 0
    assert dict(os.environ) == before


def test_default_cases_fit_a_small_machine():
    cases = cli.default_cases(ql.backend("cpu"))
    assert {(c[1], c[2]) for c in cases} == {(384, 1536), (4096, 4096)}
    assert {c[0] for c in cases} == {1, 16, 512}


def test_python_dash_m_runs():
    r = subprocess.run([sys.executable, "-m", "qlinear", "info"], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "[cpu] available" in r.stdout


def test_time_stats_counts_every_repetition():
    from qlinear.bench import time_stats

    calls, syncs = [], []
    t = time_stats(lambda: calls.append(1), lambda: syncs.append(1), 0.0, 5)
    # At least 3 repetitions, at most max_reps, plus one warm-up that is not counted.
    assert 3 <= t.reps <= 5 and len(calls) == len(syncs) == t.reps + 1
    assert 0 <= t.min <= t.median <= t.max
    one = time_stats(lambda: calls.append(1), lambda: None, 10.0, 1)
    assert one.reps == 1 and one.min == one.median == one.max


def test_interleaved_stats_alternate_and_count_every_timed_call():
    from qlinear.bench import interleaved_stats

    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    stats = interleaved_stats(fns, lambda: None, 0.0, 10, rounds=4, settle=0.0)
    # One warm-up each, then per round and callable one uncounted call and its block.
    assert log[:3] == ["a", "b", "c"]
    blocks = [name for i, name in enumerate(log[3:]) if i == 0 or log[3 + i - 1] != name]
    assert blocks == ["a", "b", "c"] * 4
    for name, st in stats.items():
        assert st.reps == log.count(name) - 1 - 4 and st.reps >= 4
        assert 0 <= st.min <= st.median <= st.max


@pytest.mark.parametrize("kw,name", [({"max_reps": 0}, "max_reps"),
                                     ({"max_reps": 2.0}, "max_reps"),
                                     ({"max_reps": True}, "max_reps"),
                                     ({"min_seconds": -1}, "min_seconds"),
                                     ({"min_seconds": float("nan")}, "min_seconds"),
                                     ({"min_seconds": "1"}, "min_seconds")])
def test_bench_function_checks_its_timing_arguments(kw, name):
    from qlinear.bench import bench

    with pytest.raises(ql.InvalidProblem, match=f"^{name}: expected"):
        bench(ql.backend("cpu"), [cli.BenchCase(2, 8, 4, "f32")], progress=False, **kw)


def test_closed_pipe_is_quiet():
    """``qlinear info | head -1``: the reader leaving early is not an error report."""
    proc = subprocess.Popen([sys.executable, "-m", "qlinear", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    proc.stdout.close()  # before the command has printed anything: it imports first
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == "", err

"""The prepared GPU-machine scripts stay runnable: tried here on the backends we have."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_device_check_script_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_check.sh")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_device_check_names_files_that_exist():
    """The GPU run gets one try: every test file or script it names must be there."""
    text = (ROOT / "benchmarks" / "device_check.sh").read_text()
    names = set(re.findall(r"\b((?:tests|benchmarks)/[\w*]+\.(?:py|sh))", text))
    assert len(names) >= 4
    missing = sorted(n for n in names if not list(ROOT.glob(n)))
    assert not missing, f"device_check.sh names files that do not exist: {missing}"


@pytest.mark.parametrize("backend", ["cpu"])
def test_sanitize_cases_run_and_check(backend):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sanitize_cases.py"),
                        "--backend", backend, "--quick"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all ok" in r.stdout and "BAD" not in r.stdout


# ------------------------------------------------------------------------------------
# device_check.sh: one call of the GPU machine (at most 540 s of steps, at most 8 files
# back from $OUT, every log whole), checked statically and rehearsed here without a GPU.

SCRIPT = ROOT / "benchmarks" / "device_check.sh"
BUDGET_S = 540
MAX_OUT_FILES = 8
STEP = re.compile(r"^step\s+(\S+)\s+(\d+)\s+(\S+)\s+(\S+)\s*$", re.M)


def _text() -> str:
    return SCRIPT.read_text()


def _logical_lines() -> list[str]:
    """The script's commands with backslash continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", _text())
    return [ln for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _steps() -> list[tuple[str, int, str, str]]:
    return [(n, int(s), log, fn) for n, s, log, fn in STEP.findall(_text())]


def test_device_check_steps_fit_one_call_most_valuable_first():
    steps = _steps()
    names = [s[0] for s in steps]
    assert names == ["facts", "suite", "memcheck", "racecheck", "bench", "wgsl", "wgsl-tests",
                     "wgsl-bench"], names
    total = sum(s[1] for s in steps)
    assert total <= BUDGET_S, f"step limits add up to {total} s, expected at most {BUDGET_S}"
    assert all(s[1] > 0 for s in steps)
    text = _text()
    exported = re.search(r"^export -f (.+)$", text, re.M)
    assert exported, "the step functions must be exported for `timeout ... bash -c`"
    for _, _, _, fn in steps:
        assert re.search(rf"^{fn}\(\) \{{", text, re.M), f"step function {fn} is not defined"
        assert fn in exported.group(1).split(), f"step function {fn} is not exported"
    # The only time limits are the steps' own: a `timeout N` elsewhere would escape the sum.
    timeouts = re.findall(r"\btimeout\b(?:\s+-k\s+\d+)?\s+(\S+)", "\n".join(_logical_lines()))
    assert timeouts == ['"$limit"'], timeouts


def test_device_check_writes_at_most_eight_files_to_out():
    text = "\n".join(_logical_lines())
    files = {s[2] for s in _steps()}
    files |= set(re.findall(r"\$OUT/([\w.-]+)", text))
    for names, ext in re.findall(r'"\$OUT"/\{([\w,.-]+)\}\.(\w+)', text):
        files |= {f"{n}.{ext}" for n in names.split(",")}
    assert "summary.txt" in files and "cuda_bench.json" in files
    assert len(files) <= MAX_OUT_FILES, f"{len(files)} files in $OUT: {sorted(files)}"
    assert not re.search(r"\$OUT/[\w.-]+/", text), "no folders under $OUT"


def test_device_check_kernel_cache_is_not_under_out():
    m = re.search(r'^export QLINEAR_CACHE_DIR="\$\{QLINEAR_CACHE_DIR:-([^}]+)\}"$', _text(), re.M)
    assert m, "device_check.sh must export QLINEAR_CACHE_DIR"
    assert m.group(1).startswith("/tmp/") and "OUT" not in m.group(1)


def test_device_check_logs_whole_with_tee_before_tail():
    lines = _logical_lines()
    tails = [ln for ln in lines if re.search(r"\|\s*tail\b", ln)]
    assert tails, "the console should get each step's tail"
    for ln in tails:
        assert re.search(r'\|\s*tee\s+(?:-a\s+)?"\$OUT/[^"]+"\s*\|\s*tail\b', ln), (
            f"a tail must come after tee into $OUT, so the whole log is kept: {ln.strip()}")
    step_fn = "\n".join(ln for ln in lines if "timeout" in ln)
    assert 'tee -a "$OUT/$log"' in step_fn


def test_device_check_pytest_runs_go_on_after_failures():
    runs = [ln for ln in _logical_lines() if re.search(r"-m pytest\b", ln)]
    assert len(runs) == 2, runs  # the suite on cuda, the wgpu tests on the NVIDIA adapter
    for ln in runs:
        assert not re.search(r"\s-x\b|--exitfirst", ln), f"no -x: {ln.strip()}"
        assert "--maxfail=20" in ln and "--qlinear-require" in ln, ln.strip()
    assert "--qlinear-backend=cuda" in runs[0] and "--qlinear-backend=wgpu" in runs[1]
    text = _text()
    assert re.search(r"cuda_bench\.py --quick", text)
    assert re.search(r"--tool memcheck", text) and re.search(r"--tool racecheck", text)


def _rehearse(tmp_path, **env):
    out = tmp_path / "out"
    environ = dict(os.environ, OUT=str(out), PYTHON=sys.executable,
                   QLINEAR_CACHE_DIR=str(tmp_path / "kcache"), **env)
    environ.pop("PYTHONPATH", None)
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=environ,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def _rows(out) -> dict[str, str]:
    """Step name -> its summary row."""
    lines = (out / "summary.txt").read_text().splitlines()
    return {ln.split()[0]: ln for ln in lines if not ln.startswith(("gpu: ", "total "))}


@pytest.mark.skipif(bool(shutil.which("nvidia-smi")),
                    reason="an NVIDIA driver is here: the script would run for minutes")
def test_device_check_rehearsed_without_a_gpu_reaches_its_summary(tmp_path):
    out, console = _rehearse(tmp_path)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_OUT_FILES and all((out / f).is_file() for f in files), files
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("gpu: none"), summary[0]
    assert summary[-1].startswith("total ")
    rows = _rows(out)
    assert list(rows) == [s[0] for s in _steps()], summary
    for name in ("facts", "suite", "memcheck", "racecheck", "bench"):
        assert "FAILED" in rows[name], rows[name]  # nothing here to pass on
    for name in ("wgsl", "wgsl-tests", "wgsl-bench"):
        assert "skipped: " in rows[name], rows[name]  # never a pass on a CPU adapter
    assert "--qlinear-require" in (out / "suite-cuda.log").read_text()
    assert "needs an NVIDIA GPU" in (out / "cuda_bench.log").read_text()
    assert "=== summary" in console and console.index("=== summary") > console.index("wgsl-bench")


@pytest.mark.skipif(bool(shutil.which("nvidia-smi")),
                    reason="an NVIDIA driver is here: the script would run for minutes")
def test_device_check_only_runs_the_named_steps(tmp_path):
    out, _ = _rehearse(tmp_path, ONLY="bench,wgsl")
    rows = _rows(out)
    assert list(rows) == [s[0] for s in _steps()], rows
    ran = {n for n, ln in rows.items() if "not run (ONLY=bench,wgsl)" not in ln}
    assert ran == {"bench", "wgsl", "wgsl-tests", "wgsl-bench"}, rows
    assert not (out / "suite-cuda.log").exists()


def test_a_named_commit_wins_over_git(monkeypatch, tmp_path):
    # The GPU machine gets the tree without .git: the script names the commit instead.
    from qlinear.bench import provenance

    monkeypatch.delenv("QLINEAR_COMMIT", raising=False)
    assert provenance.git_commit(tmp_path) == "unknown"
    monkeypatch.setenv("QLINEAR_COMMIT", "abc1234")
    assert provenance.git_commit(tmp_path) == "abc1234"
    assert provenance.run_meta("cuda", "H200")["commit"] == "abc1234"


def test_device_check_runs_the_scheme_suite():
    suite = re.search(r'^export SUITE="([^"]+)"', _text(), re.M)
    assert suite, "device_check.sh must export SUITE"
    names = suite.group(1).split()
    assert "tests/test_schemes.py" in names and "tests/test_scheme_args.py" in names


def test_sanitize_cases_include_an_asymmetric_scheme():
    """Both sanitizer runs (racecheck takes --quick) reach the zero-point kernels."""
    import importlib.util

    import qlinear as ql

    spec = importlib.util.spec_from_file_location(
        "sanitize_cases", ROOT / "benchmarks" / "sanitize_cases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    quick = mod.SCHEME_CASES[:1]
    assert quick and all(ql.ActivationScheme(c[3]).asymmetric for c in mod.SCHEME_CASES)
    assert any(k % 16 == 0 for _, k, _, _ in quick)  # the kernel with the term compiled in

"""The prepared GPU-machine scripts stay runnable: tried here on the backends we have."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qlinear as ql

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
    assert names == ["facts", "suite", "wgmma-smoke", "suite-wgmma", "memcheck", "racecheck",
                     "bench", "wgsl", "wgsl-tests", "wgsl-bench"], names
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
    # The suite on cuda (wgmma off, then on), the wgpu tests on the NVIDIA adapter.
    assert len(runs) == 3, runs
    for ln in runs:
        assert not re.search(r"\s-x\b|--exitfirst", ln), f"no -x: {ln.strip()}"
        assert "--maxfail=20" in ln and "--qlinear-require" in ln, ln.strip()
    assert "--qlinear-backend=cuda" in runs[0] and "--qlinear-backend=cuda" in runs[1]
    assert "$SUITE" in runs[0] and "$WGMMA_TESTS" in runs[1]
    assert "--qlinear-backend=wgpu" in runs[2]
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
    for name in ("facts", "suite", "wgmma-smoke", "memcheck", "racecheck", "bench"):
        # Nothing here to pass on; the row quotes why.
        assert re.search(r"FAILED \(exit \d+\): \S", rows[name]), rows[name]
    # The smoke test failed, so the wgmma cases are left out of every later step.
    assert "skipped: the wgmma GEMM failed its smoke test" in rows["suite-wgmma"]
    for name in ("memcheck", "racecheck", "bench"):
        assert "wgmma cases left out: its smoke test failed" in rows[name], rows[name]
    for name in ("wgsl", "wgsl-tests", "wgsl-bench"):
        assert "skipped: " in rows[name], rows[name]  # never a pass on a CPU adapter
    assert "nvidia-smi" in rows["facts"] and "needs an NVIDIA GPU" in rows["bench"]
    assert rows["suite"].endswith("-- wgmma off") and rows["wgmma-smoke"].endswith("-- wgmma on")
    log = (out / "suite-cuda.log").read_text()
    assert log.count("--qlinear-require") == 1  # the suite refused to run on nothing
    assert "the cuda backend is unavailable here" in log  # the wgmma smoke, without a trace
    assert "Traceback" not in log
    assert "needs an NVIDIA GPU" in (out / "cuda_bench.log").read_text()
    assert "=== summary" in console and console.index("=== summary") > console.index("wgsl-bench")


@pytest.mark.skipif(bool(shutil.which("nvidia-smi")),
                    reason="an NVIDIA driver is here: the script would run for minutes")
@pytest.mark.parametrize("only, expected", [
    ("bench,wgsl", {"bench", "wgsl", "wgsl-tests", "wgsl-bench"}),
    ("suite-wgmma,memcheck", {"suite-wgmma", "memcheck"}),
    ("suite", {"suite", "suite-wgmma"}),
    ("wgmma", {"wgmma-smoke"}),
])
def test_device_check_only_runs_the_named_steps(tmp_path, only, expected):
    out, _ = _rehearse(tmp_path, ONLY=only)
    rows = _rows(out)
    assert list(rows) == [s[0] for s in _steps()], rows
    ran = {n for n, ln in rows.items() if f"not run (ONLY={only})" not in ln}
    assert ran == expected, rows
    assert (out / "suite-cuda.log").exists() == bool(
        expected & {"suite", "wgmma-smoke", "suite-wgmma"})


def _function(name: str) -> str:
    m = re.search(rf"^{name}\(\) \{{\n(.*?)^\}}$", _text(), re.M | re.S)
    assert m, f"device_check.sh defines no function {name}"
    return m.group(1)


def test_device_check_says_which_gemm_each_cuda_step_runs():
    """The default suite with the wgmma GEMM off, the second suite with it on, whatever
    the environment says; the steps whose programs say which GEMM ran pass that on."""
    suite = re.sub(r"\\\n", " ", _function("suite"))
    assert re.search(r"QLINEAR_CUDA_WGMMA=0 \S+ -m pytest", suite), suite
    assert 'note "wgmma off"' in suite
    wgmma = _function("suite_wgmma")
    assert "export QLINEAR_CUDA_WGMMA=1" in wgmma and 'note "wgmma on"' in wgmma
    assert wgmma.index("export QLINEAR_CUDA_WGMMA=1") < wgmma.index("-m pytest")
    assert "sanitize_cases.py --wgmma-sweep" in wgmma
    smoke = _function("wgmma_smoke")
    assert "export QLINEAR_CUDA_WGMMA=1" in smoke and "--wgmma-smoke" in smoke
    assert 'touch "$WORK/wgmma-ok"' in smoke  # only a pass lets the later steps run it
    for fn in ("memcheck", "racecheck", "bench"):
        body = re.sub(r"\\\n", " ", _function(fn))
        assert "no_wgmma && off=(--no-wgmma)" in body, fn
        assert re.search(r"^\s*gemm_note .+\"\$\{off\[@\]\}\"$", body, re.M), fn
    assert "gemm_note" in re.search(r"^export -f (.+)$", _text(), re.M).group(1).split()


def test_gemm_note_passes_the_status_on_and_keeps_the_last_gemm_line(tmp_path):
    script = ("set -uo pipefail\n" + "note() { echo \"$*\" >>\"$NOTE\"; }\n"
              + "gemm_note() {\n" + _function("gemm_note") + "}\n"
              + "gemm_note bash -c 'echo gemm: first; echo x; echo gemm: wgmma on in 3; exit 5'\n"
              + "echo rc=$?\n")
    env = dict(os.environ, NOTE=str(tmp_path / "note"), WORK=str(tmp_path))
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    assert r.stdout.splitlines() == ["gemm: first", "x", "gemm: wgmma on in 3", "rc=5"]
    assert (tmp_path / "note").read_text() == "wgmma on in 3\n"


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
    wgmma = re.search(r'^export WGMMA_TESTS="([^"]+)"', _text(), re.M)
    assert wgmma and set(wgmma.group(1).split()) <= set(names)


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


# ------------------------------------------------------------------------------------
# sanitize_cases.py's wgmma cases: shapes that take the Hopper GEMM on an H100/H200.

H100_SMS = 132


def _sanitize_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sanitize_cases", ROOT / "benchmarks" / "sanitize_cases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cdiv(a, b):
    return -(-a // b)


def _stated_tile(m, n):
    """The tile rule as the contract states it (restated here, not imported)."""
    if _cdiv(m, 128) * _cdiv(n, 256) >= H100_SMS:
        return "128x256"
    return "128x128" if 2 * _cdiv(m, 128) * _cdiv(n, 128) >= H100_SMS else None


def _selected(m, k, n, dtype, scheme):
    from qlinear.backends.cuda.select import select_linear

    return select_linear(m, n, k, dtype, "sm_90a", H100_SMS, scheme=scheme, wgmma=True).gemm


def test_wgmma_shapes_take_the_tile_they_name_with_odd_edges():
    mod = _sanitize_module()
    stages = {"128x256": 4, "128x128": 6}
    wraps, persistent = set(), set()
    for m, k, n, tile in mod.WGMMA_SHAPES:
        assert _stated_tile(m, n) == tile, (m, n)
        gemm = _selected(m, k, n, "f16", "dynamic")
        assert gemm.label.startswith(f"gemm_wgmma_{tile}x"), (m, k, n, gemm.label)
        # Edges: a partial last row band and k-tile; K as the tensor maps require it.
        assert m > 64 and m % 128 and k % 16 == 0 and k % 128, (m, k)
        tiles = _cdiv(m, 128) * _cdiv(n, int(tile[4:]))
        per_block = _cdiv(tiles, min(tiles, H100_SMS))
        if per_block * _cdiv(k, 128) > stages[tile]:
            wraps.add(tile)
        if tiles > H100_SMS:
            persistent.add(tile)
    tiles = {s[3] for s in mod.WGMMA_SHAPES}
    assert tiles == set(stages) and wraps == tiles and "128x256" in persistent
    for tile in tiles:  # an odd N (single stores) and an even one per tile
        assert {n % 2 for _, _, n, t in mod.WGMMA_SHAPES if t == tile} == {0, 1}


def test_wgmma_sweep_runs_every_kernel_and_every_dtype_with_every_scheme():
    import qlinear as ql
    from qlinear.backends.cuda.specs import kernel_variants

    mod = _sanitize_module()
    sweep = mod.wgmma_sweep()
    assert {(dt, sch) for _, dt, sch in sweep} == {
        (dt, sch.value) for dt in ("f16", "bf16", "f32", "f64") for sch in ql.ActivationScheme}
    labels = {f"{dt}:{_selected(*mod.WGMMA_SHAPES[i][:3], dt, sch).label}"
              for i, dt, sch in sweep}
    every = {f"{spec.args[0]}:{spec.label}" for spec in kernel_variants("sm_90a")
             if spec.label.startswith("gemm_wgmma")}
    ctype = {"f16": "__half", "bf16": "__nv_bfloat16", "f32": "float", "f64": "double"}
    assert {f"{ctype[lb.split(':')[0]]}:{lb.split(':')[1]}" for lb in labels} == every
    # Under the sanitizers: both tiles, with and without zero points; racecheck's two too.
    for cases in (mod.WGMMA_CASES, mod.WGMMA_CASES[:2]):
        gemms = {_selected(*mod.WGMMA_SHAPES[i][:3], dt, sch).label for i, dt, sch in cases}
        assert {g.startswith("gemm_wgmma_128x256") for g in gemms} == {True, False}
        assert {g.endswith("_zp") for g in gemms} == {True, False}


def test_wgmma_sweep_runs_and_checks_on_cpu():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sanitize_cases.py"),
                        "--backend", "cpu", "--wgmma-sweep"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "all ok" and sum(ln.startswith("ok ") for ln in lines) == 16
    assert lines[-2] == "gemm: wgmma on in 16 cases, none taken (cpu: no wgmma GEMM)"


@pytest.mark.parametrize("honours", [True, False])
def test_wgmma_cases_say_which_gemm_ran_and_fail_where_it_did_not(honours, capsys):
    from test_cuda_bench import FakeHopper

    mod = _sanitize_module()
    be = FakeHopper(honours=honours)
    gemm = mod.Gemm(be)
    rng = np.random.default_rng()
    ok = mod.run_wgmma_cases(be, gemm, mod.WGMMA_CASES[2:], rng)
    ok &= mod.run_case(be, gemm, 17, 32, 9, ql.f32, rng)  # the default GEMM asked for
    out = capsys.readouterr().out
    assert ok == honours and not be.wgmma
    if honours:
        assert gemm.summary() == ("gemm: wgmma on in 2 cases, taken in 2 "
                                  "(gemm_wgmma_{128x256x128_s4}); wgmma off in 1")
        assert out.count("ok ") == 3 and "BAD" not in out
    else:
        assert gemm.summary().startswith("gemm: wgmma on in 2 cases, taken in 0")
        assert out.count("wgmma asked for on sm_90a, not selected") == 2


def test_developers_md_lists_the_steps_and_limits_the_script_runs():
    text = (ROOT / "DEVELOPERS.md").read_text()
    section = text[text.index("## The GPU run: one call"):].split("\n## ")[0]
    table = re.findall(r"^\| ([\w-]+) \| (\d+) s \|", section, re.M)
    assert [(n, int(s)) for n, s in table] == [(n, s) for n, s, _, _ in _steps()]


def test_a_failing_case_says_where_its_output_differs():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sanitize_cases", ROOT / "benchmarks" / "sanitize_cases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    want = np.random.default_rng().standard_normal((300, 600)).astype(np.float32)
    assert mod.describe(want.copy(), want) == ""
    got = want.copy()
    got[64:128] += 1  # the second consumer warpgroup's rows of the first tile band
    got[:, 9:12] = np.nan
    text = mod.describe(got, want)
    assert "differ, first at (0, 9)" in text
    assert "rows mod 128: 0-127" in text and "columns mod 256: 0-255" in text
    got = want.copy()
    got[200:210, 300] = 0
    assert "rows mod 128: 72-81; columns mod 256: 44]" in mod.describe(got, want)

"""The README's Python snippets run, in order, as written."""

import importlib.metadata
import json
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_starts_with_the_two_commands():
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    assert "qlinear bench" in blocks[0] and "pip install" in blocks[0]
    assert "pytest" in blocks[1]


def test_readme_python_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)


def test_readme_says_the_snippets_continue_one_another():
    text = README.read_text()
    tour = text.index("## A short tour")
    first_snippet = text.index("```python", tour)
    assert "continue one another" in text[tour:first_snippet]


def test_readme_documents_every_plugin_option():
    import qlinear.pytest_plugin as plugin

    options = []

    class Group:
        def addoption(self, name, **kw):
            options.append(name)

    class Parser:
        def getgroup(self, name):
            return Group()

    plugin.pytest_addoption(Parser())
    assert "--qlinear-require" in options
    for name in options:
        assert name in README.read_text(), name


def test_readme_benchmark_snippet_runs_under_pytest_benchmark(pytester, monkeypatch):
    """The pytest-benchmark example is a working test: it runs, timed, on every backend
    available here, through the plugin's fixture."""
    pytest.importorskip("pytest_benchmark", reason="needs pytest-benchmark (test extra)")
    import qlinear as ql

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (snippet,) = [b for b in blocks if "def test_" in b and "benchmark(" in b]
    assert "be.synchronize()" in snippet
    root = Path(ql.__file__).resolve().parent.parent
    monkeypatch.setenv("PYTHONPATH", str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pytester.makepyfile(test_snippet=snippet)
    available = [s.name for s in ql.backend_status() if s.available]
    installed = any(ep.value == "qlinear.pytest_plugin"
                    for ep in importlib.metadata.entry_points(group="pytest11"))
    args = [] if installed else ["-p", "qlinear.pytest_plugin"]
    args += [f"--qlinear-backend={name}" for name in available]
    out = pytester.path / "bench.json"
    result = pytester.runpytest_subprocess(
        *args, "--benchmark-min-rounds=1",
        "--benchmark-max-time=0", "--benchmark-warmup=off", f"--benchmark-json={out}")
    # The plugin runs cpu twice, the second time on the numpy engine, where that is not
    # what cpu runs already (then it is skipped with the reason).
    two_engines = "cpu" in available and ql.backend("cpu").engine.engine != "numpy"
    params = available + ["cpu-numpy"] * two_engines
    result.assert_outcomes(passed=len(params), skipped=("cpu" in available) - two_engines)
    timed = {b["param"]: b["stats"] for b in json.loads(out.read_text())["benchmarks"]}
    assert sorted(timed) == sorted(params)
    assert all(stats["rounds"] >= 1 and stats["min"] > 0 for stats in timed.values())


BENCHMARKS = README.parent / "BENCHMARKS.md"
RESULTS = README.parent / "benchmarks" / "results"


def _table(text, first_header_cell, ratio_header):
    """The rows of the markdown table whose header has ``ratio_header``, as dicts."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith(f"| {first_header_cell} |") and ratio_header in line)
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(head, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_benchmarks_md_ratios_are_baseline_over_qlinear():
    """One ratio direction, stated at the top and used by every table: baseline time /
    qlinear time (> 1: qlinear is faster), checked against the raw results."""
    text = BENCHMARKS.read_text()
    assert "ratio = baseline time /\nqlinear time, so > 1 means qlinear is faster" in \
        text[:text.index("\n|")]
    assert "plan / matmul |" not in text and "ql/wread" not in text
    raw = json.loads((RESULTS / "cpu-2026-11-27.json").read_text())["runs"]
    cpu = _table(text, "K", "x f32 matmul (matmul / plan)")
    assert len(cpu) == len(raw[0])
    for row, *runs in zip(cpu, *raw):
        # The raw files recorded plan / matmul; the table shows its reciprocal.
        want = " / ".join(f"{1 / r['ratio']:.2f}" for r in runs)
        assert row["x f32 matmul (matmul / plan)"] == want, row
        assert all(1 / r["ratio"] < 1 for r in runs)  # qlinear slower: below 1
    lava = json.loads((RESULTS / "lavapipe-2026-11-27.json").read_text())["rows"]
    wgpu = _table(text, "K", "x f32 WGSL (f32 / wgpu)")
    assert len(wgpu) == len(lava)
    for row, r in zip(wgpu, lava):
        assert row["x f32 WGSL (f32 / wgpu)"] == f"{r['wgpu_f32_matmul_s'] / r['wgpu_s']:.1f}"
        assert row["x cpu backend (cpu / wgpu)"] == f"{r['cpu_s'] / r['wgpu_s']:.2f}"

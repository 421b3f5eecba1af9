"""The pytest plugin, tested with pytester: parametrisation, selection, skips with reasons."""

import importlib.metadata
import os

import pytest

import qlinear as ql

INSTALLED = any(ep.value == "qlinear.pytest_plugin"
                for ep in importlib.metadata.entry_points(group="pytest11"))
PLUGIN_ARGS = [] if INSTALLED else ["-p", "qlinear.pytest_plugin"]

TEST_FILE = """
import qlinear as ql

def test_backend_is_usable(qlinear_backend):
    assert isinstance(qlinear_backend, ql.Backend)
    assert qlinear_backend.name in ql.backend_names()

def test_without_fixture():
    pass
"""


@pytest.fixture
def run(pytester, monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(ql.__file__)))
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pytester.makepyfile(test_user=TEST_FILE)

    def _run(*args):
        return pytester.runpytest_subprocess(*PLUGIN_ARGS, "-rs", "-v", *args)
    return _run


def _numpy_variant_runs():
    """Whether ``cpu-numpy`` runs here (it is skipped where cpu's engine is numpy already)."""
    return ql.backend("cpu").engine.engine != "numpy"


def test_parametrised_over_every_backend(run):
    result = run()
    available = [s.name for s in ql.backend_status() if s.available]
    unavailable = [s for s in ql.backend_status() if not s.available]
    extra = _numpy_variant_runs()
    result.assert_outcomes(passed=len(available) + 1 + extra,
                           skipped=len(unavailable) + (not extra))
    for name in [*ql.backend_names(), "cpu-numpy"]:
        result.stdout.fnmatch_lines([f"*test_backend_is_usable?{name}?*"])
    for s in unavailable:
        # Skipped with its reason, never passed.
        result.stdout.fnmatch_lines([f"SKIPPED*{s.name}*unavailable*{s.reason[:30]}*"])


def test_select_one_backend(run):
    result = run("--qlinear-backend=cpu")
    extra = _numpy_variant_runs()
    result.assert_outcomes(passed=2 + extra, skipped=not extra)
    result.stdout.fnmatch_lines(["*test_backend_is_usable?cpu?*PASSED*"])
    assert "wgpu" not in result.stdout.str().split("short test summary")[0].split("collected")[1]


def test_cpu_numpy_variant_forces_the_numpy_engine(run, pytester):
    """``cpu-numpy`` selects plans on the numpy engine; where the setting forces numpy
    anyway it is skipped with that reason, never passed twice over the same engine."""
    pytester.makepyfile(test_engine="""
def test_engine(qlinear_backend):
    import qlinear as ql
    desc = ql.QuantizedLinearDescriptor(2, 3, 5, ql.f32)
    plan = ql.QuantizedLinearPlan.select(qlinear_backend, desc)
    assert ("blas_f32" in plan.sku) == (qlinear_backend.engine.engine == "numpy"), plan.sku
""")
    result = run("--qlinear-backend=cpu", "test_engine.py")
    extra = _numpy_variant_runs()
    result.assert_outcomes(passed=1 + extra, skipped=not extra)
    os.environ["QLINEAR_CPU_ENGINE"] = "numpy"
    try:
        forced = run("--qlinear-backend=cpu", "test_engine.py")
    finally:
        del os.environ["QLINEAR_CPU_ENGINE"]
    forced.assert_outcomes(passed=1, skipped=1)
    forced.stdout.fnmatch_lines(["SKIPPED*runs the numpy engine here already*"])


def test_unknown_backend_is_a_usage_error(run):
    result = run("--qlinear-backend=tpu")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--qlinear-backend*tpu*"])


def test_unavailable_backend_selected_is_skipped_not_passed(run):
    missing = [s for s in ql.backend_status() if not s.available]
    if not missing:
        pytest.skip("every backend is available on this machine")
    result = run(f"--qlinear-backend={missing[0].name}")
    result.assert_outcomes(passed=1, skipped=1)


def test_require_fails_when_a_selected_backend_is_unavailable(run):
    """--qlinear-require turns the skip into an error: a CI job that asks for an
    unavailable backend cannot pass having tested nothing."""
    missing = [s for s in ql.backend_status() if not s.available]
    if not missing:
        pytest.skip("every backend is available on this machine")
    s = missing[0]
    result = run(f"--qlinear-backend={s.name}", "--qlinear-require")
    assert result.ret != 0
    text = result.stdout.str() + result.stderr.str()
    assert "--qlinear-require" in text and s.name in text and s.reason in text, text
    assert "passed" not in result.stdout.str()


def test_require_fails_when_every_backend_is_asked_for_and_one_is_missing(run):
    missing = [s for s in ql.backend_status() if not s.available]
    if not missing:
        pytest.skip("every backend is available on this machine")
    result = run("--qlinear-require")
    assert result.ret != 0
    assert missing[0].reason in result.stdout.str() + result.stderr.str()


def test_require_passes_when_the_backend_is_here(run):
    result = run("--qlinear-backend=cpu", "--qlinear-require")
    assert result.ret == 0
    extra = _numpy_variant_runs()
    result.assert_outcomes(passed=2 + extra, skipped=not extra)

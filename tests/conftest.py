"""Test configuration: load the qlinear plugin when the package is not installed
(running from the tree with PYTHONPATH=.), hypothesis profiles, and the fixtures of the
wgpu and torch tests (torch is imported only by the tests that use it)."""

import importlib.metadata
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

if not any(ep.value == "qlinear.pytest_plugin"
           for ep in importlib.metadata.entry_points(group="pytest11")):
    pytest_plugins = ["qlinear.pytest_plugin"]

os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")

settings.register_profile(
    "ci", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(
    "dev", max_examples=10, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("QLINEAR_HYPOTHESIS_PROFILE", "ci"))

pytest_plugins = list(globals().get("pytest_plugins", [])) + ["pytester"]


@pytest.fixture(scope="session")
def wgpu_be():
    """The wgpu backend, on whatever adapter wgpu finds (lavapipe on a machine without a
    GPU); the test is skipped with the reason when there is none."""
    import qlinear as ql

    try:
        return ql.backend("wgpu")
    except ql.BackendUnavailable as e:
        pytest.skip(f"wgpu unavailable: {e.reason}")


@pytest.fixture
def rng():
    """A fresh, unseeded generator: every run draws new data."""
    return np.random.default_rng()


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """A torch device whose tensors the torch adapter runs with backend=None; the CUDA
    case is skipped with the reason where torch CUDA or qlinear's cuda backend is missing."""
    torch = pytest.importorskip("torch")
    from torch_helpers import cuda_skip_reason

    if request.param == "cuda":
        reason = cuda_skip_reason()
        if reason:
            pytest.skip(reason)
    return torch.device(request.param)


@pytest.fixture(scope="module")
def float_encoder():
    """A small float transformer encoder (torch.nn), in eval mode."""
    pytest.importorskip("torch")
    from torch_helpers import Encoder

    return Encoder(seed=0).eval()


@pytest.fixture(scope="session")
def cuda_variants():
    """Every kernel of every supported architecture compiled by NVRTC (no GPU needed):
    ``{(arch, name expression): (KernelSpec, CacheEntry)}``, once per session; skipped with
    the reason without cuda-python or NVRTC."""
    pytest.importorskip("cuda.core")
    from qlinear.backends import cuda as qc

    try:
        qc.nvrtc_version()
    except Exception as e:
        pytest.skip(f"NVRTC unavailable: {e}")
    return qc.compile_all_variants(workers=min(8, os.cpu_count() or 1))

"""The backend registry: one object per backend, the default choice and why."""

import sys
import threading
import time
import types

import pytest

import qlinear as ql
from qlinear import backends as registry
from qlinear.backends.cpu import CpuBackend


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry's tables, restored after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_instances", dict(registry._instances))
    monkeypatch.setattr(registry, "_failures", dict(registry._failures))
    return registry


class _FakeGpu(CpuBackend):
    name = "fakegpu"
    is_gpu = True

    @property
    def device_name(self):
        return "Fake GPU 9000"


def _fake_module(name, created, *, fail=None):
    mod = types.ModuleType(name)

    def create():
        if fail:
            raise ql.BackendUnavailable("fakegpu", fail)
        created.append(1)
        return _FakeGpu()

    mod.create = create
    return mod


def test_default_names_why_each_backend_before_it_was_passed_over():
    choice = registry.default_backend()
    assert choice.backend is ql.backend()
    for st in registry.backend_status():
        if st.name == choice.backend.name:
            break
        if not st.available:
            assert f"{st.name} is unavailable ({st.reason})" in choice.reason
        else:
            assert f"{st.name} runs on a CPU adapter" in choice.reason
    if choice.backend.name == "cpu":
        assert choice.reason.endswith("using cpu")


def test_default_prefers_a_gpu_backend_and_says_so(scratch_registry, monkeypatch):
    created = []
    monkeypatch.setitem(sys.modules, "fake_gpu_backend", _fake_module("fake_gpu_backend", created))
    scratch_registry._REGISTRY = {"fakegpu": ("fake_gpu_backend", ""),
                                  **scratch_registry._REGISTRY}
    choice = scratch_registry.default_backend()
    assert choice.backend.name == "fakegpu"
    assert choice.reason == "fakegpu runs on a GPU (Fake GPU 9000)"
    assert ql.backend() is choice.backend


def test_unavailable_gpu_backend_is_named_in_the_reason(scratch_registry, monkeypatch):
    monkeypatch.setitem(sys.modules, "fake_gpu_backend",
                        _fake_module("fake_gpu_backend", [], fail="no such device"))
    scratch_registry._REGISTRY = {"fakegpu": ("fake_gpu_backend", ""),
                                  **scratch_registry._REGISTRY}
    choice = scratch_registry.default_backend()
    assert choice.backend.name != "fakegpu"
    assert choice.reason.startswith("fakegpu is unavailable (no such device)")


def test_concurrent_first_calls_create_one_backend(scratch_registry, monkeypatch):
    created = []
    gate = threading.Barrier(4)

    def create():
        # Slow, as opening a device is: without the registry's lock every thread that
        # arrives meanwhile would create its own backend.
        time.sleep(0.2)
        created.append(1)
        return _FakeGpu()

    mod = types.ModuleType("fake_gpu_backend")
    mod.create = create
    monkeypatch.setitem(sys.modules, "fake_gpu_backend", mod)
    scratch_registry.register_backend("fakegpu", "fake_gpu_backend")
    got = []

    def worker():
        gate.wait()
        got.append(ql.backend("fakegpu"))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(got) == 4 and all(b is got[0] for b in got)
    assert len(created) == 1


@pytest.mark.parametrize("name", [["cpu"], 3, b"cpu", "nope"])
def test_backend_name_must_be_a_registered_name(name):
    with pytest.raises(ql.InvalidProblem, match=r"^backend: expected one of \["):
        ql.backend(name)

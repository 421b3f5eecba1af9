"""The backend registry: which backends exist, which work here, and why not.

Backends are imported lazily: importing qlinear never imports wgpu or cuda-python.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

from ..errors import BackendUnavailable, InvalidProblem
from .base import Backend, Executable, PrecisionGuarantee

__all__ = ["Backend", "Executable", "PrecisionGuarantee", "backend", "backend_names",
           "register_backend", "BackendStatus", "backend_status", "install_hint",
           "DefaultChoice", "default_backend"]

# name -> (module, what to install), said once here: a backend raises BackendUnavailable
# with a hint of its own only for a more specific remedy (a driver, NVRTC), and the
# registry adds this one otherwise. Order is preference order for ql.backend().
_REGISTRY: dict[str, tuple[str, str]] = {
    "cuda": ("qlinear.backends.cuda",
             "pip install 'qlinear[cuda]' (cuda-core, cuda-bindings, nvidia-cuda-nvrtc) "
             "and an NVIDIA driver"),
    "wgpu": ("qlinear.backends.wgpu",
             "pip install wgpu; on Linux without a GPU: "
             "apt-get install mesa-vulkan-drivers libvulkan1"),
    "cpu": ("qlinear.backends.cpu", ""),
}
_instances: dict[str, Backend] = {}
_failures: dict[str, BackendUnavailable] = {}
# One backend object per name (per device), whichever thread asks first: creation runs
# under this lock, so concurrent first calls get the same object. Re-entrant because a
# backend's create() may ask the registry for another one.
_lock = threading.RLock()


def register_backend(name: str, module: str, install: str = "") -> None:
    """Register a backend: ``module`` defines ``create() -> Backend``."""
    with _lock:
        _REGISTRY[name] = (module, install)
        _instances.pop(name, None)
        _failures.pop(name, None)


def install_hint(name: str) -> str:
    """What to install for backend ``name`` to work ("" when nothing is needed)."""
    return _REGISTRY[name][1] if name in _REGISTRY else ""


def backend_names() -> list[str]:
    """Every registered backend name, available or not, in preference order."""
    return list(_REGISTRY)


def _create(name: str) -> Backend:
    be = _instances.get(name)
    if be is not None:
        return be
    with _lock:
        return _create_locked(name)


def _create_locked(name: str) -> Backend:
    if name in _instances:
        return _instances[name]
    if name in _failures:
        raise _failures[name]
    module, install = _REGISTRY[name]
    try:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                raise BackendUnavailable(
                    name, "not implemented in this version of qlinear") from None
            raise BackendUnavailable(name, f"cannot import {e.name!r}", install) from e
        be = mod.create()
    except BackendUnavailable as e:
        if not e.install and install:
            e = BackendUnavailable(e.backend, e.reason, install)
        _failures[name] = e
        raise e
    _instances[name] = be
    return be


def backend(name: str | Backend | None = None) -> Backend:
    """Return a backend: ``name`` (``"cpu"``, ``"wgpu"``, ``"cuda"``), or the best one
    available (cuda, then wgpu on a real GPU, then cpu) when ``name`` is None.

    Raises :class:`BackendUnavailable` with the reason and what to install."""
    if isinstance(name, Backend):
        return name
    if name is None:
        return default_backend().backend
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InvalidProblem(f"backend: expected one of {backend_names()}, got {name!r}")
    return _create(name)


@dataclass(frozen=True)
class DefaultChoice:
    """Which backend ``ql.backend()`` picks here, and why, in a sentence."""

    backend: Backend
    reason: str


def default_backend() -> DefaultChoice:
    """The best available backend (a GPU backend in preference order, else cpu) and why
    the ones before it were passed over, e.g. "wgpu runs on a CPU adapter (llvmpipe)"."""
    passed: list[str] = []
    for candidate in _REGISTRY:
        try:
            be = _create(candidate)
        except BackendUnavailable as e:
            passed.append(f"{candidate} is unavailable ({e.reason})")
            continue
        if be.is_gpu:
            return DefaultChoice(be, f"{candidate} runs on a GPU ({be.device_name})")
        if candidate != "cpu":
            passed.append(f"{candidate} runs on a CPU adapter ({be.device_name})")
    be = _create("cpu")
    why = "; ".join(passed) or "no GPU backend is registered"
    return DefaultChoice(be, f"{why}: using cpu")


@dataclass
class BackendStatus:
    """Whether a backend works here: ``backend`` when it does, ``reason``/``install`` when not."""

    name: str
    available: bool
    backend: Backend | None = None
    reason: str = ""
    install: str = ""


def backend_status() -> list[BackendStatus]:
    """The status of every registered backend."""
    out = []
    for name in _REGISTRY:
        try:
            out.append(BackendStatus(name, True, _create(name)))
        except BackendUnavailable as e:
            out.append(BackendStatus(name, False, None, e.reason, e.install))
    return out

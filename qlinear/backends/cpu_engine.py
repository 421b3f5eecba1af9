"""Which int8 GEMM engine the cpu backend runs, and why: a pure chooser over host facts.

Two engines compute step 4 of the contract (``acc = q @ weight_q.T``, exact int32):

- ``"numpy"``: float32 BLAS over K-chunks whose partial sums stay exact integers
  (:mod:`qlinear.backends.cpu`); always there, the readable statement of the contract.
- ``"onednn"``: oneDNN's s8 x s8 -> s32 GEMM through ``torch._int_mm``, with the
  activation pass and the epilogue in torch ops (:mod:`qlinear.backends.cpu_torch`).
  Exact only where the CPU multiplies int8 in int32 (AVX512-VNNI, AVX-VNNI, AMX):
  without those oneDNN's u8 x s8 path adds pairs of products in int16 and can
  saturate, so the engine is never chosen there.

The choice, in order (:func:`choose_engine`):

1. the setting (``$QLINEAR_CPU_ENGINE`` when the backend is created, or
   ``be.configured(engine=...)``): ``"numpy"`` forces numpy, ``"onednn"`` requires
   oneDNN (plans are :class:`~qlinear.Unsupported` where it cannot run), ``"auto"``
   (default) takes oneDNN where it can run, else numpy;
2. torch must be importable (found without importing it: nothing imports torch until
   this engine is chosen);
3. the CPU must have VNNI or AMX (``/proc/cpuinfo`` on Linux; elsewhere torch's own
   detection, :func:`torch_isa`);
4. the probe (:func:`probe_int_mm`): on first use, GEMMs of extreme values (-128, -127,
   127) over a long K, in every operand layout the engine uses, must equal the exact
   int64 product; if one differs the engine is not used and ``qlinear info`` says why.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BackendUnavailable

__all__ = ["ENGINE_SETTING", "ENGINES", "HostFacts", "EngineChoice", "choose_engine",
           "engine_setting", "host_facts", "probe_int_mm", "ProbeResult", "torch_isa"]

#: The environment variable read when the cpu backend is created.
ENGINE_SETTING = "QLINEAR_CPU_ENGINE"
#: The values the setting takes.
ENGINES = ("auto", "numpy", "onednn")
# cpuinfo flags of the instructions that multiply int8 into int32 without an int16 step.
_EXACT_ISA = ("avx512_vnni", "avx_vnni", "amx_int8")


def engine_setting() -> str:
    """``$QLINEAR_CPU_ENGINE`` (``auto`` when unset); anything else raises
    :class:`BackendUnavailable` naming it."""
    text = os.environ.get(ENGINE_SETTING, "").strip().lower() or "auto"
    if text not in ENGINES:
        raise BackendUnavailable(
            "cpu", f"{ENGINE_SETTING}: expected one of {', '.join(ENGINES)}, got {text!r}",
            f"unset {ENGINE_SETTING} or set it to auto, numpy or onednn")
    return text


@dataclass(frozen=True)
class HostFacts:
    """What the chooser needs to know about the host.

    Attributes:
        torch: whether ``import torch`` can be attempted (its spec is found).
        machine: ``platform.machine()``, e.g. ``"x86_64"``.
        isa: the exact-int8 instruction sets the CPU has (among avx512_vnni, avx_vnni,
            amx_int8), or None where the OS does not say without torch.
    """

    torch: bool
    machine: str
    isa: frozenset[str] | None


@dataclass(frozen=True)
class ProbeResult:
    """What the probe GEMMs found: ``exact``, and ``detail`` in words."""

    exact: bool
    detail: str


@dataclass(frozen=True)
class EngineChoice:
    """The engine plans use (``"numpy"`` or ``"onednn"``) and why, in words; ``refused``
    holds why oneDNN cannot run here when the setting required it."""

    engine: str
    why: str
    refused: str = ""


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def host_facts() -> HostFacts:
    """The facts of this host, without importing torch."""
    flags = _cpuinfo_flags()
    isa = None if flags is None else frozenset(f for f in _EXACT_ISA if f in flags)
    return HostFacts(torch=importlib.util.find_spec("torch") is not None,
                     machine=platform.machine().lower(), isa=isa)


def _x86(machine: str) -> bool:
    return machine in ("x86_64", "amd64", "i386", "i686", "x86")


def choose_engine(setting: str, facts: HostFacts,
                  probe: Callable[[], ProbeResult]) -> EngineChoice:
    """The engine for ``setting`` on a host with ``facts``; ``probe`` is called only when
    every other condition holds (it imports torch and runs the probe GEMMs)."""
    if setting == "numpy":
        return EngineChoice("numpy", f"{ENGINE_SETTING}=numpy (or engine='numpy') forces it")
    why_not = ""
    if not facts.torch:
        why_not = "torch is not installed (pip install torch)"
    elif not _x86(facts.machine):
        why_not = (f"oneDNN's int8 GEMM is used on x86 CPUs with VNNI or AMX only, "
                   f"this is {facts.machine}")
    elif facts.isa is not None and not facts.isa:
        why_not = ("the CPU has neither AVX512-VNNI, AVX-VNNI nor AMX: oneDNN's int8 GEMM "
                   "could saturate in int16 there")
    else:
        result = probe()
        if result.exact:
            return EngineChoice("onednn", f"oneDNN's exact s8 GEMM via torch._int_mm "
                                          f"({result.detail})")
        why_not = f"the probe GEMM differs from the exact result: {result.detail}"
    if setting == "onednn":
        return EngineChoice("numpy", f"oneDNN required but {why_not}", refused=why_not)
    return EngineChoice("numpy", f"numpy float32 BLAS over exact K-chunks; not oneDNN: {why_not}")


def _probe_operands(rng: np.random.Generator, m: int, k: int, n: int) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """``a[m, k]``, ``w[n, k]`` int8 made of -128, -127, 127 and a few random values, with
    a row and a column of all -128 (the pairs that saturate an int16 sum)."""
    extremes = np.array([-128, -127, 127, -128], np.int8)
    a = extremes[rng.integers(0, 4, (m, k))]
    w = extremes[rng.integers(0, 4, (n, k))]
    a[0] = -128
    w[0] = -128
    a[-1, ::7] = rng.integers(-128, 128, a[-1, ::7].shape, dtype=np.int8)
    return a, w


def torch_isa(torch: Any) -> bool | None:
    """Whether torch finds VNNI or AMX here (None where this torch does not say): asked
    only where the OS does not list the CPU's flags."""
    checks = [getattr(torch.cpu, name, None) for name in
              ("_is_vnni_supported", "_is_amx_tile_supported")]
    answers = []
    for check in checks:
        try:
            answers.append(bool(check()) if check is not None else None)
        except Exception:
            answers.append(None)
    if any(answers):
        return True
    return None if None in answers else False


def probe_int_mm(torch: Any) -> ProbeResult:
    """``torch._int_mm`` on extreme values against the exact int64 product, in the three
    operand layouts the engine runs (:func:`qlinear.backends.cpu_torch.gemm_layout`):
    M = 1 with the weight as stored ([N, K], read transposed), M = 17 with a [K, N] copy,
    and M = 17 with the weight first (``W @ q.T``), over K = 4099 (long and odd). Never
    raises."""
    if not hasattr(torch, "_int_mm"):
        return ProbeResult(False, f"torch {torch.__version__} has no torch._int_mm")
    rng = np.random.default_rng(20260)
    k, n = 4099, 37
    try:
        for m, layout in ((1, "wnk"), (17, "wkn"), (17, "wt"), (1, "wkn")):
            a, w = _probe_operands(rng, m, k, n)
            at, wt = torch.from_numpy(a), torch.from_numpy(w)
            if layout == "wt":
                got = torch._int_mm(wt, at.t()).t()
            else:
                got = torch._int_mm(at, wt.t().contiguous() if layout == "wkn" else wt.t())
            want = a.astype(np.int64) @ w.astype(np.int64).T
            if got.dtype != torch.int32 or not np.array_equal(got.numpy(), want):
                bad = int((got.numpy().astype(np.int64) != want).sum())
                return ProbeResult(False, f"M={m} K={k} N={n} ({layout}): {bad} of {m * n} "
                                          f"sums wrong")
    except (RuntimeError, NotImplementedError, TypeError) as e:
        return ProbeResult(False, f"torch._int_mm failed: {e}")
    cap = ""
    try:
        cap = f", torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    except Exception:
        pass
    return ProbeResult(True, f"probe exact on -128/-127/127 over K={k}; torch "
                             f"{torch.__version__}{cap}")

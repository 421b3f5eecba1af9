"""Compilation: NVRTC (through cuda.core) turns a kernel spec into a cached cubin.

Needs NVRTC but no driver and no GPU, so CI compiles every kernel for every supported
architecture. Output is a cubin for exactly one architecture, never PTX: a cubin needs no
driver JIT, so an NVRTC newer than the driver is fine.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ...errors import BackendUnavailable, DeviceError, Unsupported
from ...kernel_cache import CacheEntry, KernelCache, default_cache
from .. import install_hint
from .driver import check_cuda_core
from .sources import expand_source
from .specs import SUPPORTED_ARCHS, KernelSpec, kernel_variants

__all__ = [
    "CompileOptions",
    "arch_for",
    "compile_all_variants",
    "compile_module",
    "device_arch",
    "nvrtc_version",
    "ptxas_report",
]


@dataclass(frozen=True)
class CompileOptions:
    """How a module is compiled. Every field is part of the cache key.

    Attributes:
        arch: the target, e.g. ``"sm_90a"``; the output is a cubin for exactly it.
        std: the C++ dialect.
        ptxas_verbose: ``-Xptxas -v``: registers, stack and spills in the log.
        max_register_count: a register cap, or None for the kernel's launch bounds.
    """

    arch: str
    std: str = "c++17"
    ptxas_verbose: bool = True
    max_register_count: int | None = None


class _Log:
    """A ``write``-able sink for cuda.core's compiler log."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str | bytes) -> None:
        self.parts.append(text.decode() if isinstance(text, bytes) else str(text))

    @property
    def text(self) -> str:
        return "".join(self.parts)


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    """NVRTC's ``(major, minor)``. Raises :class:`BackendUnavailable` without NVRTC."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise BackendUnavailable("cuda", f"cannot import cuda.bindings ({e})",
                                 install_hint("cuda")) from None
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # the library itself is missing
        raise BackendUnavailable("cuda", f"no NVRTC found ({e})",
                                 "pip install nvidia-cuda-nvrtc") from None
    if int(err) != 0:
        raise BackendUnavailable("cuda", f"NVRTC does not answer ({err})",
                                 "pip install nvidia-cuda-nvrtc")
    return int(major), int(minor)


@functools.cache
def _nvrtc_archs() -> tuple[int, ...]:
    from cuda.bindings import nvrtc

    err, archs = nvrtc.nvrtcGetSupportedArchs()
    return tuple(int(a) for a in archs) if int(err) == 0 else ()


def _package_version(name: str) -> str:
    try:
        import importlib.metadata as md

        return md.version(name)
    except Exception:
        return "unknown"


@functools.cache
def _header_options() -> tuple[dict[str, Any], str]:
    """``(ProgramOptions kwargs, description)`` that make ``<cuda_fp16.h>`` and
    ``<cuda_bf16.h>`` visible: NVRTC's bundled headers where the installed cuda.core and
    NVRTC support them, else the include folder of the ``nvidia-cuda-runtime`` wheel (or
    toolkit) that cuda.pathfinder finds."""
    check_cuda_core()  # an old cuda-core is BackendUnavailable here too, not an ImportError
    from cuda.core import Program, ProgramOptions

    probe = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n__global__ void qlinear_probe() {}\n"
    try:
        options = ProgramOptions(arch="sm_75", use_bundled_headers=True)
        Program(probe, "c++", options).compile("cubin")
        return {"use_bundled_headers": True}, f"bundled-nvrtc-{nvrtc_version()}"
    except Exception:
        pass
    try:
        import cuda.pathfinder as pf

        found = pf.find_nvidia_header_directory("cudart")
    except Exception:
        found = None
    if not found:
        raise BackendUnavailable(
            "cuda", "NVRTC has no bundled CUDA headers and no CUDA runtime headers were found",
            "pip install nvidia-cuda-runtime (or a newer nvidia-cuda-nvrtc)")
    runtime = _package_version("nvidia-cuda-runtime")
    return {"include_path": [str(found)]}, f"include:{found}:{runtime}"


def compile_module(source: str, names: Sequence[str], options: CompileOptions,
                   cache: KernelCache | None = None) -> CacheEntry:
    """Compile ``cuda/<source>`` with the template instantiations ``names`` (name
    expressions) to a cubin for ``options.arch``, through the kernel cache.

    Returns the :class:`~qlinear.kernel_cache.CacheEntry` (cubin, symbol map, ptxas log).
    Raises :class:`DeviceError` with the NVRTC log when compilation fails."""
    text = expand_source(source)
    header_kwargs, header_desc = _header_options()
    names = tuple(names)
    parts = {
        "kind": "cuda-cubin",
        "source": source,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "names": list(names),
        "options": asdict(options),
        "headers": header_desc,
        "nvrtc": list(nvrtc_version()),
        "nvrtc_package": _package_version("nvidia-cuda-nvrtc"),
        "cuda_core": _package_version("cuda-core"),
    }

    def build() -> tuple[bytes, dict[str, str], str]:
        from cuda.core import Program, ProgramOptions

        kwargs = dict(header_kwargs)
        if options.ptxas_verbose:
            kwargs["ptxas_options"] = ["-v"]
        if options.max_register_count is not None:
            kwargs["max_register_count"] = options.max_register_count
        opts = ProgramOptions(name=source, arch=options.arch, std=options.std, ftz=False,
                              prec_div=True, prec_sqrt=True, **kwargs)
        log = _Log()
        program = None
        try:
            program = Program(text, "c++", opts)
            obj = program.compile("cubin", name_expressions=names, logs=log)
            binary = bytes(obj.code)
            mapping = obj.symbol_mapping or {}
        except Exception as e:
            raise DeviceError(
                f"compiling cuda/{source} ({', '.join(names)}) for {options.arch} failed",
                native=f"{e}\n{log.text}".strip()) from None
        finally:
            if program is not None:
                try:
                    program.close()
                except Exception:
                    pass
        symbols = {str(k): (v.decode() if isinstance(v, bytes) else str(v))
                   for k, v in mapping.items()}
        return binary, symbols, log.text

    return (cache or default_cache()).get_or_build(parts, build)


# (source, arch, C++ element type), name expressions, cache folder or None
_Job = tuple[tuple[str, str, str], list[str], str | None]


def _compile_group(job: _Job) -> tuple[_Job, CacheEntry]:
    (source, arch, _ctype), names, directory = job
    cache = KernelCache(directory)
    return job, compile_module(source, names, CompileOptions(arch), cache)


def compile_all_variants(archs: Sequence[str] = SUPPORTED_ARCHS, *, workers: int | None = None,
                         cache_dir: str | os.PathLike[str] | None = None,
                         ) -> dict[tuple[str, str], tuple[KernelSpec, CacheEntry]]:
    """Compile every kernel of :func:`kernel_variants` for each of ``archs`` (no GPU
    needed): one NVRTC program per (source, arch, dtype) instantiating all its variants,
    the programs spread over a pool of ``workers`` processes (default: the CPU count).

    ``cache_dir`` is a kernel-cache folder, or None to keep nothing. Returns
    ``{(arch, name_expression): (KernelSpec, CacheEntry)}``; raises :class:`DeviceError`
    on the first compile failure."""
    import multiprocessing
    from collections import defaultdict
    from concurrent.futures import ProcessPoolExecutor

    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    specs = {}
    for arch in archs:
        for spec in kernel_variants(arch):
            groups[(spec.source, arch, spec.args[0])].append(spec.name_expression)
            specs[(arch, spec.name_expression)] = spec
    # Largest programs first, so the pool's tail is short.
    jobs: list[_Job] = sorted(
        ((key, names, None if cache_dir is None else str(cache_dir))
         for key, names in groups.items()),
        key=lambda j: (j[0][0] != "gemm_mma.cu", -len(j[1])))
    workers = max(1, min(len(jobs), workers or os.cpu_count() or 1))
    results = {}

    def collect(outputs: Any) -> None:
        for job, entry in outputs:
            arch = job[0][1]
            for name in job[1]:
                results[(arch, name)] = (specs[(arch, name)], entry)

    if workers == 1:
        collect(map(_compile_group, jobs))
        return results
    # spawn, not fork: the caller may hold CUDA driver state, which a forked child must not use.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        collect(pool.map(_compile_group, jobs))
    return results


_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_report(log: str) -> dict[str, dict[str, Any]]:
    """Per mangled kernel name, what ``ptxas -v`` said: ``registers``, ``stack``,
    ``spill_stores``, ``spill_loads`` and static shared memory ``smem`` (bytes; 0 where
    ptxas names none: the kernel's shared memory is all dynamic, or there is none)."""
    report: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in log.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            current = report.setdefault(m.group(1), {"arch": m.group(2)})
            continue
        if current is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        m = _PTXAS_REGS.search(line)
        if m:
            current["registers"] = int(m.group(1))
            smem = _PTXAS_SMEM.search(line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return report


def arch_for(compute_capability: tuple[int, int], supported: Sequence[int]) -> str:
    """The NVRTC target for a device of ``compute_capability``: its own architecture
    (``sm_90a`` for 9.0), or the newest one of the same major that NVRTC knows (cubins
    run on later minors of their major). Raises :class:`Unsupported`."""
    major, minor = (int(v) for v in compute_capability)
    number = major * 10 + minor
    if number < 75:
        raise Unsupported(
            f"device: expected compute capability 7.5 or newer (Turing: __dp4a; Ampere+: "
            f"integer tensor cores), got {major}.{minor}")
    if number == 90 and 90 in supported:
        return "sm_90a"
    if number in supported:
        return f"sm_{number}"
    same_major = [a for a in supported if a // 10 == major and a <= number]
    if not same_major:
        raise Unsupported(
            f"device: NVRTC {nvrtc_version()} cannot target compute capability {major}.{minor} "
            f"(it knows {sorted(supported)}); install a newer nvidia-cuda-nvrtc")
    return f"sm_{max(same_major)}"


def device_arch(compute_capability: tuple[int, int]) -> str:
    """:func:`arch_for` against the architectures the installed NVRTC can target."""
    return arch_for(compute_capability, _nvrtc_archs())

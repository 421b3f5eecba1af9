"""The cuda backend: NVIDIA GPUs through kernels compiled at run time with NVRTC (cuda.core).

The kernels live in the top-level ``cuda/`` folder (shipped inside the wheel):

- ``act_quant.cu``: the activation pass, fused (row amax, scale, quantization), vectorized;
- ``gemm_mma.cu``: the int8 GEMM on integer tensor cores (``mma.sync`` m16n8k32 s8,
  int32 accumulators) with a multi-stage ``cp.async`` pipeline, sm_80+;
- ``gemv_mma.cu``: the small-M (decode) kernel, split-K inside a block, sm_80+; on
  sm_90+ it is launched with programmatic dependent launch, so its first weight loads
  overlap the activation pass;
- ``gemm_dp4a.cu``: the ``__dp4a`` GEMM of sm_75;

each with the dequantization (+ bias) epilogue fused. They are compiled to a cubin for
the device's own architecture (never PTX: a cubin needs no driver JIT, so a newer NVRTC
than the driver is fine), and cached in memory and on disk by
:mod:`qlinear.kernel_cache`.

Everything above the :class:`CudaBackend` (sources, kernel specs, kernel selection,
compilation) works without a GPU or a driver, so CI compiles every kernel for every
supported architecture. cuda.core is imported lazily: importing this module never
touches the driver.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import math
import os
import re
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ..dtypes import FLOAT_DTYPES, DType, as_dtype, f16, f32, f64
from ..errors import BackendUnavailable, DeviceError, InvalidProblem, Unsupported
from ..kernel_cache import CacheEntry, KernelCache, default_cache
from ..resources import read_source
from ..tensors import Tensor, contiguous_strides
from .base import Backend, Executable, PrecisionGuarantee

__all__ = [
    "CudaBackend",
    "create",
    "CompileOptions",
    "KernelSpec",
    "LinearSelection",
    "SUPPORTED_ARCHS",
    "arch_for",
    "arch_number",
    "compile_all_variants",
    "compile_module",
    "expand_source",
    "kernel_variants",
    "nvrtc_version",
    "ptxas_report",
    "select_linear",
    "select_quantize",
]

#: The architectures CI compiles every kernel for (sm_90a: the H100's own, with its
#: architecture-specific features enabled).
SUPPORTED_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90a")

_INSTALL = "pip install 'qlinear[cuda]' (cuda-core, cuda-bindings, nvidia-cuda-nvrtc) and an NVIDIA driver"
_CTYPES = {"f32": "float", "f16": "__half", "bf16": "__nv_bfloat16", "f64": "double"}
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')

# Kernel configurations. Each is a template instantiation; kernel_variants() lists
# them all, so CI compiles exactly what the plans can choose.
_ACT_THREADS = 256
_ACT_WARP_MAX_K = 2048            # rows up to this many elements: one warp per row
_MMA_TILES = {                    # name: (BM, BN, WARPS_M, WARPS_N, STAGES)
    "128x128": (128, 128, 2, 4, 3),
    "64x64": (64, 64, 2, 2, 3),
}
_DP4A_TILES = {                   # name: (BM, BN, TM, TN)
    "128x128": (128, 128, 8, 8),
    "16x128": (16, 128, 2, 4),
}
_GEMV_WARPS = 8
_GEMV_NGROUPS = (1, 2, 4)         # column groups of 8 per block
_DECODE_MAX_M = 16


# ------------------------------------------------------------------------------------
# Sources


@functools.lru_cache(maxsize=None)
def expand_source(name: str) -> str:
    """The text of ``cuda/<name>`` with its local ``#include "..."`` headers inlined
    (once each, with ``#line`` markers so compiler messages name the right file).

    NVRTC then needs no include path for qlinear's own headers, and the text is
    exactly what the cache key hashes."""
    return _expand(name, set())


def _expand(name: str, seen: set) -> str:
    out = []
    for number, line in enumerate(read_source("cuda", name).splitlines(), 1):
        m = _INCLUDE.match(line)
        if m:
            header = m.group(1)
            if header not in seen:
                seen.add(header)
                out.append(f'#line 1 "{header}"')
                out.append(_expand(header, seen))
            out.append(f'#line {number + 1} "{name}"')
            continue
        out.append("" if line.strip() == "#pragma once" else line)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------
# Kernel specs


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: a template instantiation in one source file.

    Attributes:
        source: file in ``cuda/``.
        template: the ``__global__`` function template.
        args: template arguments, as C++ text.
        threads: threads per block it is compiled for (``__launch_bounds__``).
        label: a short name for ``plan.sku``.
        pdl: launched with programmatic dependent launch on sm_90+ (it waits for the
            previous kernel itself, with ``griddepcontrol.wait``, after loads that do
            not depend on it).
    """

    source: str
    template: str
    args: tuple
    threads: int
    label: str
    pdl: bool = False

    @property
    def name_expression(self) -> str:
        """The C++ name expression NVRTC instantiates, e.g. ``qlinear_act_quant<float, 256, ...>``."""
        return f"{self.template}<{', '.join(self.args)}>"


def _b(v: bool) -> str:
    return "true" if v else "false"


def _act_cache(dtype: DType, warp_rows: bool) -> int:
    # 16-byte vectors each thread keeps in registers between the two passes. f64 rows
    # per warp keep one: more makes ptxas spill around the IEEE division's slow path.
    return 1 if (dtype == f64 and warp_rows) else 8


def act_spec(dtype: DType, warp_rows: bool, vec: bool) -> KernelSpec:
    """The activation-pass kernel: one warp (``warp_rows``) or one block per row, 16-byte
    vectors (``vec``) or elements."""
    label = f"rowquant_{'warp' if warp_rows else f'block{_ACT_THREADS}'}_{'vec16' if vec else 'scalar'}"
    return KernelSpec("act_quant.cu", "qlinear_act_quant",
                      (_CTYPES[dtype.name], str(_ACT_THREADS), _b(warp_rows), _b(vec),
                       str(_act_cache(dtype, warp_rows))),
                      _ACT_THREADS, label)


def gemm_mma_spec(dtype: DType, tile: str, aligned: bool) -> KernelSpec:
    """The tensor-core GEMM with a ``tile`` of :data:`_MMA_TILES`."""
    bm, bn, wm, wn, stages = _MMA_TILES[tile]
    return KernelSpec("gemm_mma.cu", "qlinear_gemm_mma",
                      (_CTYPES[dtype.name], str(bm), str(bn), str(wm), str(wn), str(stages),
                       _b(aligned)),
                      wm * wn * 32,
                      f"gemm_mma_{tile}x64_s{stages}{'' if aligned else '_bytes'}")


def _gemv_unroll(ngroups: int) -> int:
    return 4 if ngroups <= 2 else 2


def gemv_spec(dtype: DType, ngroups: int, aligned: bool) -> KernelSpec:
    """The decode kernel with ``ngroups`` x 8 columns per block."""
    return KernelSpec("gemv_mma.cu", "qlinear_gemv_mma",
                      (_CTYPES[dtype.name], str(_GEMV_WARPS), str(ngroups),
                       str(_gemv_unroll(ngroups)), _b(aligned)),
                      _GEMV_WARPS * 32,
                      f"decode_gemv_mma_n{8 * ngroups}_splitk{_GEMV_WARPS}"
                      f"{'' if aligned else '_bytes'}", pdl=True)


def dp4a_spec(dtype: DType, tile: str, aligned: bool) -> KernelSpec:
    """The ``__dp4a`` GEMM with a ``tile`` of :data:`_DP4A_TILES`."""
    bm, bn, tm, tn = _DP4A_TILES[tile]
    decode = "decode_" if bm <= _DECODE_MAX_M else ""
    return KernelSpec("gemm_dp4a.cu", "qlinear_gemm_dp4a",
                      (_CTYPES[dtype.name], str(bm), str(bn), str(tm), str(tn), _b(aligned)),
                      (bm // tm) * (bn // tn),
                      f"{decode}gemm_dp4a_{tile}{'' if aligned else '_bytes'}")


def arch_number(arch: str) -> int:
    """``"sm_90a"`` -> 90."""
    m = re.fullmatch(r"sm_(\d+)[af]?", arch)
    if not m:
        raise InvalidProblem(f"arch: expected a name like 'sm_80' or 'sm_90a', got {arch!r}")
    return int(m.group(1))


def kernel_variants(arch: str) -> list[KernelSpec]:
    """Every kernel a plan can choose on ``arch``: every dtype, path, tile and alignment."""
    tensor_cores = arch_number(arch) >= 80
    specs = []
    for dt in FLOAT_DTYPES:
        for warp_rows in (True, False):
            for vec in (True, False):
                specs.append(act_spec(dt, warp_rows, vec))
        for aligned in (True, False):
            if tensor_cores:
                specs += [gemm_mma_spec(dt, tile, aligned) for tile in _MMA_TILES]
                specs += [gemv_spec(dt, ng, aligned) for ng in _GEMV_NGROUPS]
            else:
                specs += [dp4a_spec(dt, tile, aligned) for tile in _DP4A_TILES]
    return specs


# ------------------------------------------------------------------------------------
# Kernel selection (pure: testable without a GPU)


@dataclass(frozen=True)
class LinearSelection:
    """The kernels of one linear plan and their launch geometry.

    ``act``/``gemm`` are the fast variants for the shape; ``act_fallback``/``gemm_fallback``
    serve tensors whose addresses are not 16-byte aligned (the same kernels with element
    or byte loads; equal to the fast ones when the shape already rules vectors out)."""

    act: KernelSpec
    act_fallback: KernelSpec
    act_grid: tuple
    gemm: KernelSpec
    gemm_fallback: KernelSpec
    gemm_grid: tuple
    sku: str


def _act_plan(m: int, k: int, dtype: DType):
    warp_rows = k <= _ACT_WARP_MAX_K
    vec_ok = k > 0 and (k * dtype.itemsize) % 16 == 0
    fast = act_spec(dtype, warp_rows, vec_ok)
    fallback = act_spec(dtype, warp_rows, False)
    rows_per_block = _ACT_THREADS // 32 if warp_rows else 1
    return fast, fallback, (max(1, -(-m // rows_per_block)),)


def select_quantize(m: int, k: int, dtype) -> tuple:
    """``(fast, fallback, grid)`` of the activation pass for ``x[m, k]``."""
    return _act_plan(m, k, as_dtype(dtype))


def select_linear(m: int, n: int, k: int, dtype, arch: str, sm_count: int) -> LinearSelection:
    """Choose the kernels for ``y[m, n] = dequant(quant(x[m, k]) @ w[n, k].T)`` on ``arch``.

    Decode shapes (``m <= 16``) take the split-K kernel that streams the weight once
    (sm_80+) or the 16-row dp4a tile (sm_75); larger ones the tiled GEMM, 128x128 when
    that still gives every SM a tile, else 64x64."""
    dtype = as_dtype(dtype)
    act, act_fb, act_grid = _act_plan(m, k, dtype)
    aligned = k % 16 == 0
    arch_n = arch_number(arch)
    sm_count = max(1, int(sm_count))
    if arch_n >= 80:
        if m <= _DECODE_MAX_M:
            ng = next((g for g in sorted(_GEMV_NGROUPS, reverse=True)
                       if -(-n // (8 * g)) >= 2 * sm_count), min(_GEMV_NGROUPS))
            gemm = gemv_spec(dtype, ng, aligned)
            gemm_fb = gemv_spec(dtype, ng, False)
            grid = (max(1, -(-n // (8 * ng))), max(1, -(-m // 16)))
        else:
            bm, bn = 128, 128
            tile = "128x128" if (-(-m // bm)) * (-(-n // bn)) >= sm_count else "64x64"
            bm, bn = _MMA_TILES[tile][:2]
            gemm = gemm_mma_spec(dtype, tile, aligned)
            gemm_fb = gemm_mma_spec(dtype, tile, False)
            grid = ((-(-m // bm)) * (-(-n // bn)),)
    else:
        tile = "16x128" if m <= _DECODE_MAX_M else "128x128"
        bm, bn = _DP4A_TILES[tile][:2]
        gemm = dp4a_spec(dtype, tile, aligned)
        gemm_fb = dp4a_spec(dtype, tile, False)
        grid = (max(1, (-(-m // bm)) * (-(-n // bn))),)
    sku = f"cuda.{arch}.{act.label}+{gemm.label}+dequant_{dtype.name}"
    return LinearSelection(act, act_fb, act_grid, gemm, gemm_fb, grid, sku)


# ------------------------------------------------------------------------------------
# Compilation (NVRTC through cuda.core; needs no driver)


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
    max_register_count: Optional[int] = None


class _Log:
    """A ``write``-able sink for cuda.core's compiler log."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, text) -> None:
        self.parts.append(text.decode() if isinstance(text, bytes) else str(text))

    @property
    def text(self) -> str:
        return "".join(self.parts)


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> tuple[int, int]:
    """NVRTC's ``(major, minor)``. Raises :class:`BackendUnavailable` without NVRTC."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise BackendUnavailable("cuda", f"cannot import cuda.bindings ({e})", _INSTALL) from None
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # the library itself is missing
        raise BackendUnavailable("cuda", f"no NVRTC found ({e})",
                                 "pip install nvidia-cuda-nvrtc") from None
    if int(err) != 0:
        raise BackendUnavailable("cuda", f"NVRTC does not answer ({err})",
                                 "pip install nvidia-cuda-nvrtc")
    return int(major), int(minor)


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
def _header_options() -> tuple[dict, str]:
    """``(ProgramOptions kwargs, description)`` that make ``<cuda_fp16.h>`` and
    ``<cuda_bf16.h>`` visible: NVRTC's bundled headers where the installed cuda.core and
    NVRTC support them, else the include folder of the ``nvidia-cuda-runtime`` wheel (or
    toolkit) that cuda.pathfinder finds."""
    from cuda.core import Program, ProgramOptions

    probe = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n__global__ void qlinear_probe() {}\n"
    try:
        Program(probe, "c++", ProgramOptions(arch="sm_75", use_bundled_headers=True)).compile("cubin")
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
    return {"include_path": [str(found)]}, f"include:{found}:{_package_version('nvidia-cuda-runtime')}"


def compile_module(source: str, names: Sequence[str], options: CompileOptions,
                   cache: Optional[KernelCache] = None) -> CacheEntry:
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

    def build():
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


def _compile_group(job):
    (source, arch, _ctype), names, directory = job
    cache = KernelCache(directory)
    return job, compile_module(source, names, CompileOptions(arch), cache)


def compile_all_variants(archs: Sequence[str] = SUPPORTED_ARCHS, *, workers: Optional[int] = None,
                         cache_dir=None) -> dict:
    """Compile every kernel of :func:`kernel_variants` for each of ``archs`` (no GPU
    needed): one NVRTC program per (source, arch, dtype) instantiating all its variants,
    the programs spread over a pool of ``workers`` processes (default: the CPU count).

    ``cache_dir`` is a kernel-cache folder, or None to keep nothing. Returns
    ``{(arch, name_expression): (KernelSpec, CacheEntry)}``; raises :class:`DeviceError`
    on the first compile failure."""
    import multiprocessing
    from collections import defaultdict
    from concurrent.futures import ProcessPoolExecutor

    groups: dict = defaultdict(list)
    specs = {}
    for arch in archs:
        for spec in kernel_variants(arch):
            groups[(spec.source, arch, spec.args[0])].append(spec.name_expression)
            specs[(arch, spec.name_expression)] = spec
    # Largest programs first, so the pool's tail is short.
    jobs = sorted(((key, names, None if cache_dir is None else str(cache_dir))
                   for key, names in groups.items()),
                  key=lambda j: (j[0][0] != "gemm_mma.cu", -len(j[1])))
    workers = max(1, min(len(jobs), workers or os.cpu_count() or 1))
    results = {}
    if workers == 1:
        outputs = map(_compile_group, jobs)
        for job, entry in outputs:
            for name in job[1]:
                results[(job[0][1], name)] = (specs[(job[0][1], name)], entry)
        return results
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for job, entry in pool.map(_compile_group, jobs):
            for name in job[1]:
                results[(job[0][1], name)] = (specs[(job[0][1], name)], entry)
    return results


_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_report(log: str) -> dict[str, dict]:
    """Per mangled kernel name, what ``ptxas -v`` said: ``registers``, ``stack``,
    ``spill_stores``, ``spill_loads`` (bytes)."""
    report: dict[str, dict] = {}
    current = None
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


# ------------------------------------------------------------------------------------
# Driver probing


def _find_driver() -> Optional[str]:
    """Where libcuda is, found without calling into it (a driver call on a machine
    without a driver can leave later calls hanging). None when there is none."""
    try:
        import cuda.pathfinder as pf

        loaded = pf.load_nvidia_dynamic_lib("cuda")
        return getattr(loaded, "abs_path", None) or "libcuda"
    except Exception:
        pass
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return ctypes.util.find_library("cuda")


def _cu_check(result, what: str):
    """Unpack a cuda.bindings driver result; raise :class:`DeviceError` on an error."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if int(err) != 0:
        try:
            from cuda.bindings import driver

            _, name = driver.cuGetErrorName(err)
            _, text = driver.cuGetErrorString(err)
            detail = f"{name.decode()}: {text.decode()}"
        except Exception:
            detail = str(err)
        kind = "out of memory" if "OUT_OF_MEMORY" in detail else "the device failed"
        raise DeviceError(f"{what}: {kind}", native=detail)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


# ------------------------------------------------------------------------------------
# Tensors


_TYPESTRS = {"f4": f32, "f2": f16, "f8": f64, "i1": as_dtype("s8")}


def _cai_view(obj, name: str):
    """``(ptr, shape, strides_in_elements, dtype, readonly)`` from an object's
    ``__cuda_array_interface__``, or None when it has none (or one torch refuses, such
    as bf16)."""
    try:
        cai = obj.__cuda_array_interface__
    except Exception:
        return None
    if not isinstance(cai, dict):
        return None
    typestr = str(cai.get("typestr", ""))
    if typestr[:1] == ">" or typestr[1:] not in _TYPESTRS:
        raise InvalidProblem(
            f"{name}: expected dtype f32, f16, bf16, f64 or s8 (little-endian), got typestr {typestr!r}")
    if cai.get("mask") is not None:
        raise InvalidProblem(f"{name}: expected a tensor without a mask, got a masked array")
    dtype = _TYPESTRS[typestr[1:]]
    shape = tuple(int(s) for s in cai["shape"])
    ptr, readonly = cai["data"]
    strides = cai.get("strides")
    if strides is None:
        el_strides = contiguous_strides(shape)
    else:
        if any(int(s) % dtype.itemsize for s in strides):
            raise InvalidProblem(
                f"{name}: expected strides that are multiples of the item size "
                f"{dtype.itemsize}, got byte strides {tuple(strides)}")
        el_strides = tuple(int(s) // dtype.itemsize for s in strides)
    return int(ptr or 0), shape, el_strides, dtype, bool(readonly)


_DL_CUDA, _DL_CUDA_MANAGED = 2, 13


# ------------------------------------------------------------------------------------
# Kernels


def _aligned(*ptrs, to: int = 16) -> bool:
    return all(p % to == 0 for p in ptrs)


class _CudaQuantizeExecutable(Executable):
    precision_guarantee = PrecisionGuarantee(
        note="IEEE division (__fdiv_rn/__ddiv_rn), round half to even; bit-identical to cpu")

    def __init__(self, be: "CudaBackend", desc):
        self.be = be
        self.desc = desc
        self.fast, self.fallback, self.grid = select_quantize(desc.m, desc.k, desc.dtype)
        self.sku = f"cuda.{be.arch}.{self.fast.label}"
        be.kernel(self.fast)

    def run(self, t, stream=None):
        d = self.desc
        x, q, s = t.activation, t.act_q, t.act_scale
        spec = self.fast
        if spec != self.fallback and not (
                _aligned(x.data_ptr) and _aligned(q.data_ptr, to=16 // d.dtype.itemsize)):
            spec = self.fallback
        self.be.launch(spec, self.grid, stream, x.data_ptr, q.data_ptr, s.data_ptr,
                       np.int32(d.m), np.int32(d.k), np.int32(d.q_min), np.int32(d.q_max))


class _CudaLinearExecutable(Executable):
    precision_guarantee = PrecisionGuarantee(
        bit_identical=True, deterministic=True, flushes_subnormals=False, exact_int32=True,
        note="IEEE division and round half to even in the activation pass; exact int32 on "
             "integer tensor cores (dp4a on sm_75); split-K partials summed in int32 in a "
             "fixed order; epilogue with __fmul_rn/__fadd_rn (no FMA contraction)")

    def __init__(self, be: "CudaBackend", desc):
        self.be = be
        self.desc = desc
        self.sel = select_linear(desc.m, desc.c_out, desc.k, desc.dtype, be.arch, be.sm_count)
        self.sku = self.sel.sku
        be.kernel(self.sel.act)
        be.kernel(self.sel.gemm)

    def run(self, t, stream=None):
        d, sel = self.desc, self.sel
        x, wq, ws, y = t.activation, t.weight_q, t.weight_scale, t.output
        aq, asc, bias = t.act_q_scratch, t.act_scale_scratch, t.bias
        xp, aqp, ascp, wqp, wsp, yp = (x.data_ptr, aq.data_ptr, asc.data_ptr,
                                       wq.data_ptr, ws.data_ptr, y.data_ptr)
        item = d.dtype.itemsize
        act = sel.act
        if act != sel.act_fallback and not (_aligned(xp) and _aligned(aqp, to=16 // item)):
            act = sel.act_fallback
        gemm = sel.gemm
        if gemm != sel.gemm_fallback and not _aligned(aqp, wqp):
            gemm = sel.gemm_fallback
        pair_ok = d.c_out % 2 == 0 and yp % (2 * item) == 0
        s = self.be.stream(stream)
        self.be.launch(act, sel.act_grid, s, xp, aqp, ascp, np.int32(d.m), np.int32(d.k),
                       np.int32(d.q_min), np.int32(d.q_max))
        self.be.launch(gemm, sel.gemm_grid, s, aqp, ascp, wqp, wsp,
                       0 if bias is None else bias.data_ptr, yp,
                       np.int32(d.m), np.int32(d.c_out), np.int32(d.k), np.int32(pair_ok))


# ------------------------------------------------------------------------------------
# The backend


class CudaBackend(Backend):
    """One NVIDIA GPU through cuda.core: kernels compiled by NVRTC for the device's own
    architecture; tensors are cuda.core buffers or any object exposing
    ``__cuda_array_interface__`` or ``__dlpack__`` (torch, CuPy), wrapped without a copy.

    Runs are asynchronous on the stream given to ``plan.run`` (a cuda.core ``Stream``, a
    raw ``CUstream`` handle as an int, or any object with ``__cuda_stream__``; None: the
    device's default stream). ``wrap`` does not order streams: run on a stream that is
    ordered after the work producing the inputs (for torch, its current stream)."""

    name = "cuda"
    is_gpu = True
    torch_device_type = "cuda"

    def __init__(self, device, *, cache: Optional[KernelCache] = None):
        from cuda.core import LaunchConfig, Stream, launch

        self._device = device
        self._launch = launch
        self._LaunchConfig = LaunchConfig
        self._Stream = Stream
        self._cache = cache
        self.ordinal = int(device.device_id)
        self.device_id = f"cuda:{self.ordinal}"
        self.compute_capability = tuple(int(v) for v in device.compute_capability)
        self.arch = arch_for(self.compute_capability, _nvrtc_archs())
        self._arch_number = arch_number(self.arch)
        self.sm_count = int(device.properties.multiprocessor_count)
        self._kernels: dict[str, Any] = {}
        self._modules: list = []  # loaded ObjectCode, kept alive with their kernels
        self._configs: dict[tuple, Any] = {}
        self._streams: dict[int, Any] = {}
        self._lock = threading.RLock()
        # Programmatic dependent launch, until a launch with it is refused.
        self._pdl = os.environ.get("QLINEAR_CUDA_PDL", "1") != "0"

    # -- device ----------------------------------------------------------------------
    @property
    def device_name(self) -> str:
        """The GPU's name, compute capability and SM count."""
        major, minor = self.compute_capability
        return f"{self._device.name} (compute capability {major}.{minor}, {self.sm_count} SMs)"

    def _current(self):
        self._device.set_current()
        return self._device

    # -- streams -----------------------------------------------------------------------
    def stream(self, stream: Any = None):
        """The cuda.core ``Stream`` for ``stream``: None (the device's default stream), a
        ``Stream``, a raw ``CUstream`` handle (int), or any object with ``__cuda_stream__``
        or a ``cuda_stream`` handle attribute (torch, CuPy). Never creates a stream."""
        if stream is None:
            return self._current().default_stream
        if isinstance(stream, self._Stream):
            return stream
        handle = None
        if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
            handle = int(stream)
        elif hasattr(stream, "__cuda_stream__"):
            proto = stream.__cuda_stream__  # a method; a property in early cuda.core
            handle = int((proto() if callable(proto) else proto)[1])
        elif hasattr(stream, "cuda_stream"):
            handle = int(stream.cuda_stream)
        elif type(stream).__name__ == "CUstream":
            handle = int(stream)
        if handle is None:
            raise InvalidProblem(
                "stream: expected None, a cuda.core Stream, a CUstream handle (int) or an object "
                f"with __cuda_stream__ (torch, CuPy), got {type(stream).__name__}")
        s = self._streams.get(handle)
        if s is None:
            self._current()
            if handle in (0, 1):  # NULL / CU_STREAM_LEGACY: the legacy default stream
                from cuda.core import LEGACY_DEFAULT_STREAM as s
            elif handle == 2:  # CU_STREAM_PER_THREAD
                from cuda.core import PER_THREAD_DEFAULT_STREAM as s
            else:
                s = self._Stream.from_handle(handle)
            if len(self._streams) > 64:
                self._streams.clear()
            self._streams[handle] = s
        return s

    def synchronize(self, stream: Any = None) -> None:
        """Wait for ``stream`` (None: all work on the device) to finish."""
        try:
            if stream is None:
                self._current().sync()
            else:
                self.stream(stream).sync()
        except InvalidProblem:
            raise
        except Exception as e:
            raise DeviceError("synchronize: the device failed", native=str(e)) from None

    # -- kernels -----------------------------------------------------------------------
    def kernel(self, spec: KernelSpec):
        """The loaded cuda.core ``Kernel`` of ``spec`` (compiled and cached on first use)."""
        k = self._kernels.get(spec.name_expression)
        if k is not None:
            return k
        with self._lock:
            k = self._kernels.get(spec.name_expression)
            if k is not None:
                return k
            entry = compile_module(spec.source, [spec.name_expression],
                                   CompileOptions(self.arch), self._cache)
            from cuda.core import ObjectCode

            mangled = entry.symbols.get(spec.name_expression)
            if not mangled:
                raise DeviceError(f"NVRTC reported no symbol for {spec.name_expression}")
            self._current()
            try:
                # By its mangled name: symbol_mapping values must be bytes in some
                # cuda.core versions and str in none, a plain str name works in all.
                obj = ObjectCode.from_cubin(entry.binary, name=spec.source)
                k = obj.get_kernel(mangled)
            except Exception as e:
                raise DeviceError(f"loading {spec.name_expression} ({self.arch} cubin) failed",
                                  native=str(e)) from None
            self._modules.append(obj)
            self._kernels[spec.name_expression] = k
            return k

    def _config(self, grid: tuple, threads: int, pdl: bool):
        key = (grid, threads, pdl)
        config = self._configs.get(key)
        if config is None:
            kwargs = {"programmatic_stream_serialization": True} if pdl else {}
            config = self._configs[key] = self._LaunchConfig(grid=grid, block=threads, **kwargs)
        return config

    def launch(self, spec: KernelSpec, grid: tuple, stream, *args) -> None:
        """Launch ``spec`` on ``grid`` blocks of ``spec.threads`` threads on ``stream``
        (anything :meth:`stream` accepts) with ``args``; asynchronous.

        Kernels marked ``pdl`` use programmatic dependent launch on sm_90+ where the
        driver and cuda.core accept it (they wait for their producer themselves); if the
        launch is refused, they fall back to plain stream order from then on."""
        kernel = self.kernel(spec)
        s = self.stream(stream)
        pdl = spec.pdl and self._pdl and self._arch_number >= 90
        try:
            self._launch(s, self._config(grid, spec.threads, pdl), kernel, *args)
            return
        except Exception as e:
            if not pdl:
                raise DeviceError(f"launching {spec.name_expression} on grid {grid} failed",
                                  native=str(e)) from None
            self._pdl = False
        try:
            self._launch(s, self._config(grid, spec.threads, False), kernel, *args)
        except Exception as e:
            raise DeviceError(f"launching {spec.name_expression} on grid {grid} failed",
                              native=str(e)) from None

    def linear_executable(self, desc):
        """The fused activation pass + int8 GEMM + dequant kernels for ``desc``."""
        return _CudaLinearExecutable(self, desc)

    def quantize_executable(self, desc):
        """The activation-pass kernel for ``desc``."""
        return _CudaQuantizeExecutable(self, desc)

    # -- tensors -----------------------------------------------------------------------
    def _tensor(self, shape, dtype: DType, ptr: int, owner, handle=None, strides=None,
                readonly=False, device: Optional[str] = None) -> Tensor:
        shape = tuple(int(s) for s in shape)
        return Tensor("cuda", device or self.device_id, shape, dtype,
                      strides if strides is not None else contiguous_strides(shape),
                      handle if handle is not None else owner, device or self.device_id,
                      data_ptr=int(ptr), owner=owner, readonly=readonly)

    def empty(self, shape, dtype):
        """A new device tensor (a cuda.core ``Buffer`` from the device's memory resource)."""
        dtype = as_dtype(dtype)
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        dev = self._current()
        try:
            buf = dev.allocate(max(nbytes, 1), stream=dev.default_stream)
        except Exception as e:
            raise DeviceError(f"allocating {nbytes} bytes on {self.device_id} failed "
                              f"(out of memory?)", native=str(e)) from None
        return self._tensor(shape, dtype, int(buf.handle), buf)

    def from_numpy(self, array, *, readonly=False):
        """A device tensor holding a copy of ``array`` (copied before this returns)."""
        arr = np.ascontiguousarray(array)
        dtype = as_dtype(arr.dtype, name="array")
        t = self.empty(arr.shape, dtype)
        if arr.nbytes:
            from cuda.bindings import driver

            self._current()
            _cu_check(driver.cuMemcpyHtoD(t.data_ptr, arr.ctypes.data, arr.nbytes),
                      f"copying {arr.nbytes} bytes to {self.device_id}")
        t.readonly = bool(readonly)
        return t

    def to_numpy(self, tensor):
        """A host copy of ``tensor``, after all work on the device has finished."""
        t = self.wrap(tensor, name="tensor")
        if t.backend != "cuda":
            raise InvalidProblem(f"tensor: expected a cuda tensor, got one of backend {t.backend!r}")
        out = np.empty(t.shape, t.dtype.numpy)
        if t.size == 0:
            return out
        from cuda.bindings import driver

        self.synchronize()
        lo, hi = t.byte_span()
        if t.strides == contiguous_strides(t.shape):
            _cu_check(driver.cuMemcpyDtoH(out.ctypes.data, lo, hi - lo),
                      f"copying {hi - lo} bytes from {t.device}")
            return out
        raw = np.empty(hi - lo, np.uint8)
        _cu_check(driver.cuMemcpyDtoH(raw.ctypes.data, lo, hi - lo),
                  f"copying {hi - lo} bytes from {t.device}")
        item = t.dtype.itemsize
        base = (t.data_ptr - lo) // item
        flat = raw.view(t.dtype.numpy)
        view = np.lib.stride_tricks.as_strided(
            flat[base:], shape=t.shape, strides=tuple(s * item for s in t.strides))
        out[...] = view
        return out

    def wrap(self, obj, *, name="tensor"):
        """``obj`` as a cuda Tensor without a copy: a qlinear Tensor as is, or any device
        array with ``__cuda_array_interface__`` (read directly) or ``__dlpack__`` (through
        cuda.core's ``StridedMemoryView``; bf16 comes this way from torch)."""
        if isinstance(obj, Tensor):
            return obj
        if isinstance(obj, np.ndarray):
            raise InvalidProblem(
                f"{name}: expected a CUDA device tensor (torch, CuPy, or backend.empty/from_numpy), "
                f"got a numpy array in host memory")
        view = _cai_view(obj, name)
        if view is not None:
            ptr, shape, strides, dtype, readonly = view
            device = self._pointer_device(ptr) if ptr else self.device_id
            return self._tensor(shape, dtype, ptr, obj, strides=strides, readonly=readonly,
                                device=device)
        if hasattr(obj, "__dlpack__"):
            return self._wrap_dlpack(obj, name)
        raise InvalidProblem(
            f"{name}: expected a CUDA device tensor (__cuda_array_interface__ or __dlpack__), "
            f"got {type(obj).__name__}")

    def _pointer_device(self, ptr: int) -> str:
        from cuda.bindings import driver

        try:
            ordinal = _cu_check(driver.cuPointerGetAttribute(
                driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr),
                "querying a pointer's device")
            return f"cuda:{int(ordinal)}"
        except DeviceError:
            return "unknown (not CUDA device memory)"

    def _wrap_dlpack(self, obj, name: str) -> Tensor:
        try:
            dev_type, dev_id = obj.__dlpack_device__()
        except Exception:
            dev_type, dev_id = None, None
        if dev_type is not None and int(dev_type) not in (_DL_CUDA, _DL_CUDA_MANAGED):
            raise InvalidProblem(
                f"{name}: expected a tensor in CUDA device memory, got DLPack device type "
                f"{int(dev_type)} (1 = host CPU)")
        try:
            from cuda.core.utils import StridedMemoryView
        except ImportError:  # cuda.core < 0.4
            from cuda.core.experimental.utils import StridedMemoryView
        try:
            view = StridedMemoryView(obj, stream_ptr=-1)
        except Exception as e:
            raise InvalidProblem(f"{name}: expected a DLPack tensor cuda.core can read, got "
                                 f"{type(obj).__name__} ({e})") from None
        try:
            dtype = as_dtype(view.dtype)
        except Exception:
            raise InvalidProblem(
                f"{name}: expected dtype f32, f16, bf16, f64 or s8, got {view.dtype}") from None
        shape = tuple(view.shape)
        strides = view.strides
        strides = contiguous_strides(shape) if strides is None else tuple(int(s) for s in strides)
        device = f"cuda:{int(view.device_id if dev_id is None else dev_id)}"
        return self._tensor(shape, dtype, int(view.ptr), obj, handle=view, strides=strides,
                            readonly=bool(getattr(view, "readonly", False)), device=device)

    # -- facts -------------------------------------------------------------------------
    def info(self) -> dict:
        """Device, compiler, cache and the kernels chosen for typical shapes."""
        from ..kernel_cache import cache_dir

        props = self._device.properties
        try:
            from cuda.bindings import driver

            driver_version = _cu_check(driver.cuDriverGetVersion(), "driver version")
            driver_text = f"{int(driver_version) // 1000}.{int(driver_version) % 1000 // 10}"
        except Exception:
            driver_text = "unknown"
        decode = select_linear(1, 4096, 4096, f16, self.arch, self.sm_count).sku
        prefill = select_linear(4096, 4096, 4096, f16, self.arch, self.sm_count).sku
        return {
            "device": self.device_name,
            "arch": self.arch,
            "driver": driver_text,
            "nvrtc": ".".join(map(str, nvrtc_version())),
            "sms": self.sm_count,
            "shared_memory_per_block": int(props.max_shared_memory_per_block),
            "cache": str(cache_dir() or "off (memory only)"),
            "kernels": {"decode (M<=16)": decode, "prefill": prefill},
        }


def create() -> CudaBackend:
    """The cuda backend on device ``$QLINEAR_CUDA_DEVICE`` (default 0).

    Raises :class:`BackendUnavailable` (with the reason and what to install) when
    cuda-python, the driver, NVRTC or a supported GPU is missing. The driver library is
    looked for before any driver call."""
    try:
        import cuda.core  # noqa: F401
        import cuda.bindings  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable("cuda", f"cuda-python is not installed ({e})", _INSTALL) from None
    if _find_driver() is None:
        raise BackendUnavailable("cuda", "no NVIDIA driver (libcuda) found",
                                 "install the NVIDIA driver (it provides libcuda)")
    nvrtc_version()  # raises BackendUnavailable without NVRTC
    from cuda.bindings import driver

    try:
        _cu_check(driver.cuInit(0), "initialising the CUDA driver")
        count = _cu_check(driver.cuDeviceGetCount(), "counting CUDA devices")
    except DeviceError as e:
        raise BackendUnavailable("cuda", f"the CUDA driver does not start: {e.native or e}",
                                 "a working NVIDIA driver and GPU") from None
    if not count:
        raise BackendUnavailable("cuda", "no CUDA device found", "an NVIDIA GPU")
    ordinal = int(os.environ.get("QLINEAR_CUDA_DEVICE", "0") or 0)
    if not 0 <= ordinal < int(count):
        raise BackendUnavailable(
            "cuda", f"QLINEAR_CUDA_DEVICE={ordinal}, but only {int(count)} device(s) exist")
    from cuda.core import Device

    try:
        device = Device(ordinal)
        device.set_current()
    except Exception as e:
        raise BackendUnavailable("cuda", f"cannot use CUDA device {ordinal}: {e}") from None
    try:
        return CudaBackend(device)
    except Unsupported as e:
        raise BackendUnavailable("cuda", str(e), "an NVIDIA GPU of compute capability 7.5+") from None

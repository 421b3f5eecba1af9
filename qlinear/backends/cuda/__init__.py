"""The cuda backend: NVIDIA GPUs through kernels compiled at run time with NVRTC (cuda.core).

The kernels live in the top-level ``cuda/`` folder (shipped inside the wheel):

- ``act_quant.cu``: the activation pass, fused (row amax, scale, quantization), vectorized,
  in every activation scheme (the static ones with the caller's scale and zero point, the
  dynamic asymmetric one with the row's min and max and a per-row zero point), built from
  ``act_rows.cuh`` (a row's vector loads, amax bits, min/max and packed stores);
- ``gemm_mma.cu``: the int8 GEMM on integer tensor cores (``mma.sync`` m16n8k32 s8,
  int32 accumulators) with a multi-stage ``cp.async`` pipeline, sm_80+;
- ``gemv_mma.cu``: the small-M (decode) kernel, split-K inside a block, sm_80+; on
  sm_90+ it is launched with programmatic dependent launch, so its first weight loads
  overlap the activation pass (``+pdl`` in ``plan.sku`` while it is; ``qlinear info``
  says why not; ``QLINEAR_CUDA_PDL=0`` turns it off);
- ``gemm_dp4a.cu``: the ``__dp4a`` GEMM of sm_75;
- ``gemm_wgmma.cu``: the Hopper GEMM (sm_90a): ``wgmma`` from shared memory filled by
  the tensor-memory copy engine, producer and consumer warpgroups, a persistent grid,
  built from ``hopper.cuh``; selected only while the backend's ``wgmma`` switch is on
  (``QLINEAR_CUDA_WGMMA=1``), until a GPU run has verified it;

each with the dequantization (+ bias) epilogue fused, and, for the asymmetric schemes,
the zero-point term ``acc - zp[m] * weight_colsum[n]`` before it (a compile-time variant
of the aligned kernels; the byte-load fallbacks apply it when given zero points);
``qlinear_common.cuh`` holds what they share. They are compiled to a cubin for the
device's own architecture (never PTX: a cubin needs no driver JIT, so a newer NVRTC
than the driver is fine), and cached in memory and on disk by
:mod:`qlinear.kernel_cache`.

The modules, one concept each, from the sources up to the device:

- :mod:`.sources`: the text NVRTC compiles (``#include`` inlining);
- :mod:`.specs`: :class:`KernelSpec`, the tile tables, every variant per architecture;
- :mod:`.select`: the pure choice of kernels and launch geometry for a shape;
- :mod:`.compile`: NVRTC, the cache key, compiling every variant, the ptxas report;
- :mod:`.sass`: the cubins' machine code read back with nvdisasm, for the tests of its
  properties;
- :mod:`.driver`: the cuda-core names checked up front, finding libcuda without calling
  it, driver errors as ours;
- :mod:`.memory`: device memory that is freed only after the device's work;
- :mod:`.interop`: foreign arrays (``__cuda_array_interface__``, DLPack) and streams;
- :mod:`.launcher`: launch configurations, programmatic dependent launch and why not;
- :mod:`.tma`: tensor maps and the launch of kernels that take them by value;
- :mod:`.wgmma`: the Hopper GEMM's switch, its functions and maps per backend;
- :mod:`.executables`: what plans run, the launch glue;
- :mod:`.backend`: :class:`CudaBackend` (device, tensors, kernel loading) and
  :func:`create`.

Sources, specs, selection and compilation work without a GPU or a driver (selection
without cuda-python at all), so CI compiles every kernel for every supported
architecture. cuda.core is imported lazily: importing this package never touches the
driver.
"""

from __future__ import annotations

from .backend import CudaBackend, create
from .compile import (
    CompileOptions,
    arch_for,
    compile_all_variants,
    compile_module,
    nvrtc_version,
    ptxas_report,
)
from .select import LinearSelection, select_linear, select_quantize
from .sources import expand_source
from .specs import SUPPORTED_ARCHS, KernelSpec, arch_number, kernel_variants

# The spec builders, for tests and scripts that build a spec by hand (not in __all__).
from .specs import act_spec as act_spec
from .specs import dp4a_spec as dp4a_spec
from .specs import gemm_mma_spec as gemm_mma_spec
from .specs import gemv_spec as gemv_spec
from .specs import wgmma_spec as wgmma_spec

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

"""The wgpu backend: WGSL compute shaders through wgpu (Vulkan, Metal, DX12, GL, and
Mesa's lavapipe on a machine without a GPU).

A linear run is two kernels in one compute pass: the fused activation pass
(``shaders/rowquant.wgsl``) and a GEMM with the dequant/bias epilogue fused,
chosen by shape and adapter, and named in ``plan.sku``: for decode shapes
(M <= :data:`qlinear.problem.DECODE_MAX_M`) ``gemv.wgsl``, which reads each weight word
once; else ``gemm_dot4.wgsl`` (dot4I8Packed, 8 x 8 register tiles in 128 x 128 blocks
for M > 64, 4 x 4 in 64 x 64 blocks below), or ``gemm_f32.wgsl`` (exact f32
multiply-adds over K-chunks of 1024) on Metal and GL, where naga emulates
dot4I8Packed, and on adapters whose dot4I8Packed failed the probe (a tiny kernel,
``shaders/dot4_probe.wgsl``, run on first use of a backend object; the sku and
``qlinear info`` say so). Tiles shrink to fit the adapter's workgroup memory.
``be.configured(...)`` overrides these choices (tests run every variant on lavapipe).

Every activation scheme runs (:class:`qlinear.ActivationScheme`): the scheme is a pipeline
variant of the activation pass (its SCHEME override, named in the sku), fixed when a plan
is selected; a static scale and zero point reach it in each run's parameter block. With a
zero point, every GEMM family's epilogue (``linear_io.wgsl``, ASYM) subtracts
``act_zp[m] * weight_colsum[n]`` from the int32 accumulator before dequantizing (the sku's
GEMM name ends in ``_zp``).

Numbers are the cpu backend's bit for bit: every rounding the contract names is
done in integer arithmetic inside the shaders (see ``shaders/common.wgsl``).

Tensors are ``wgpu.GPUBuffer`` ranges. s8 matrices have rows padded to a multiple
of 4 bytes (``expected_strides``), so that the kernels see whole u32 words; the pad
bytes of ``act_q`` are written as zeros.

Streams: ``plan.run(args)`` encodes and submits at once; ``plan.run(args,
stream=b)`` with ``b`` from ``be.batch()`` encodes into ``b``, and everything
encoded is submitted once, when the ``with`` block ends (or at ``b.submit()``);
``stream`` may also be a ``wgpu.GPUCommandEncoder`` that the caller finishes and
submits. ``be.to_numpy`` and ``be.synchronize`` submit the calling thread's open
batches and wait.

Threads: one backend (and one plan or layer) may be used by many threads at once. A
batch belongs to the thread that opened it; the shader cache and each plan's run cache
take a lock (one uncontended lock per run); ``be.configured`` applies to its thread.
Creating a backend prints nothing (``quiet``).

Modules, one concept each (a module only imports those above it, but for type names):

``options``       :class:`WgpuOptions`, what ``be.configured(...)`` changes, checked once.
``choose``        pure kernel choice: (descriptor, :class:`AdapterFacts`, options) ->
                  a typed choice (:class:`QuantChoice`, :class:`GemvChoice`,
                  :class:`TiledChoice`) and the sku; no device, no wgpu.
``layouts``       the Python side of the WGSL interfaces: binding numbers by variable
                  name, and each uniform block as a numpy dtype named after its struct.
``shaders``       WGSL composition (:func:`shader_source`) and the per-device caches of
                  shader modules, bind group layouts and pipelines.
``device``        :class:`WgpuDevice`: the opened device, wgpu errors as DeviceError,
                  buffers, each thread's open batches, timestamps.
``steps``         dispatch planning under the adapter's limits, as data: binding
                  sub-ranges of named tensors and parameter blocks; no device.
``design``        what a plan runs, as data: its kernels and its steps (pure).
``program``       a design written out as JSON for another WebGPU implementation (a
                  browser's Dawn: ``examples/web/``); no device.
``dispatch``      steps realized on the device: parameter buffers, bind groups, and the
                  per-tensor-set run cache.
``streams``       :class:`Batch` and encoding into None / a batch / a command encoder.
``executables``   what plans run: a design's pipelines compiled, its steps realized.
``probe``         the dot4I8Packed probe: edge values against numpy's answers.
``quiet``         adapter creation without window-system errors or driver log noise.
``tensors``       the buffer layout of tensors (padded s8 rows), uploads and read-backs.
``backend``       :class:`WgpuBackend` and :func:`create`.
"""

from __future__ import annotations

from .backend import WgpuBackend, create
from .choose import (
    AdapterFacts,
    GemvChoice,
    QuantChoice,
    Storage,
    TiledChoice,
    choose_linear,
    choose_quant,
)
from .options import WgpuOptions
from .program import Program, linear_program, quantize_program
from .shaders import shader_source
from .streams import Batch

__all__ = ["WgpuBackend", "Batch", "create", "WgpuOptions", "AdapterFacts", "Storage",
           "QuantChoice", "GemvChoice", "TiledChoice", "choose_quant", "choose_linear",
           "shader_source", "Program", "linear_program", "quantize_program"]

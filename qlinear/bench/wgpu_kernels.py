"""Benchmark kernels of the wgpu backend: an f32 WGSL matmul (the floating-point
baseline on the same adapter) and micro kernels for the adapter's dot4I8Packed rate
and copy bandwidth. They use the backend's shader and dispatch machinery but are not
part of its plan interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import DType, f32
from ..tensors import Tensor

if TYPE_CHECKING:
    from ..backends.wgpu import WgpuBackend
    from ..backends.wgpu.device import WgpuDevice

__all__ = ["KernelRun", "float_matmul", "micro_kernels"]


@dataclass(frozen=True)
class KernelRun:
    """One benchmark kernel, bound and ready: calling it dispatches the kernel in its own
    submit and waits. ``keep`` holds the tensors it reads and writes, in the order the
    maker documents, alive as long as the run is."""

    gpu: WgpuDevice
    pipeline: Any
    bind_group: Any
    grid: tuple[int, int, int]
    keep: tuple[Any, ...] = ()

    def __call__(self) -> None:
        gpu = self.gpu
        enc = gpu.device.create_command_encoder()
        cp = enc.begin_compute_pass()
        cp.set_pipeline(self.pipeline)
        cp.set_bind_group(0, self.bind_group)
        cp.dispatch_workgroups(*self.grid)
        cp.end()
        gpu.device.queue.submit([enc.finish()])
        gpu.flush_batches()
        gpu.wait()


def float_matmul(be: WgpuBackend, m: int, k: int, n: int, dtype: DType) -> KernelRun | None:
    """A callable that runs an f32 WGSL tiled matmul ``[m,k] @ [k,n]`` on random data and
    waits (the floating-point baseline for benchmarks; ``dtype`` is ignored: f32 is the
    one float type every adapter has). None when an operand exceeds a binding. Its
    ``keep`` is ``(a, b, c, params)``: the operands, the result and the parameter buffer."""
    from ..backends.wgpu.dispatch import bind_group, bind_range, params_buffer
    from ..backends.wgpu.layouts import MATMUL, MatmulParams

    opts = be.options
    if max(m * k, k * n, m * n) * 4 > opts.max_storage_binding or -(-max(m, n) // 128) > \
            opts.max_workgroups_per_dim:
        return None
    # The deepest K step that fits workgroup memory (two 128-wide f32 tiles).
    bk = next((b for b in (32, 16, 8, 4, 2, 1)
               if b * 2 * 128 * 4 <= opts.max_workgroup_storage), None)
    if bk is None or 256 > be.facts.max_invocations_per_workgroup:
        return None
    rng = np.random.default_rng(0)
    a = be.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    b = be.from_numpy(rng.standard_normal((k, n)).astype(np.float32))
    c = be.empty((m, n), f32)
    gpu = be.gpu
    pipe = gpu.shaders.pipeline("matmul_f32", "", {"BM": 128, "BN": 128, "BK": bk, "WGX": 16,
                                                   "WGY": 16})
    params = params_buffer(gpu, MatmulParams, [{"m": m, "n": n, "k": k}])

    def whole(t: Tensor) -> dict[str, Any]:
        return bind_range(gpu, t, 0, max(4, t.size * 4))[0]

    bg = bind_group(gpu, MATMUL, {"c_out": whole(c), "a_in": whole(a), "b_in": whole(b)},
                    params, 0)
    return KernelRun(gpu, pipe, bg, (-(-n // 128), -(-m // 128), 1), keep=(a, b, c, params))


def micro_kernels(be: WgpuBackend, words: int = 1 << 22,
                  iters: int = 256) -> dict[str, tuple[KernelRun, int]]:
    """For benchmarks: ``{"dot4": (run, int8_ops), "copy": (run, bytes_moved)}`` where
    ``run()`` runs the dot4I8Packed throughput kernel or a copy of ``words`` vec4 words
    and waits."""
    from ..backends.wgpu.dispatch import bind_group
    from ..backends.wgpu.layouts import MICRO

    src = be.from_numpy(np.random.default_rng(1).integers(
        0, 2**32, size=words * 4, dtype=np.uint32).view(np.int32).view(np.float32))
    dst = be.empty((words * 4,), f32)
    gpu = be.gpu
    wg = min(256, be.facts.max_invocations_1d)
    bg = bind_group(gpu, MICRO, {"dst": {"buffer": dst.handle}, "src": {"buffer": src.handle}})
    groups = -(-words // wg)
    gx = min(groups, be.options.max_workgroups_per_dim)
    grid = (gx, -(-groups // gx), 1)
    out: dict[str, tuple[KernelRun, int]] = {}
    for entry in ("dot4_peak", "copy"):
        pipe = gpu.shaders.pipeline("micro", "", {"WG": wg, "ITERS": iters}, entry=entry)
        run = KernelRun(gpu, pipe, bg, grid, keep=(src, dst))
        amount = (grid[0] * grid[1] * wg * iters * 16 * 8 if entry == "dot4_peak"
                  else words * 16 * 2)
        out["dot4" if entry == "dot4_peak" else "copy"] = (run, amount)
    return out

"""Benchmark kernels of the wgpu backend: an f32 WGSL matmul (the floating-point
baseline on the same adapter) and micro kernels for the adapter's dot4I8Packed rate
and copy bandwidth. They use the backend's shader and dispatch machinery but are not
part of its plan interface."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from ..dtypes import DType, f32

if TYPE_CHECKING:
    from ..backends.wgpu import WgpuBackend

__all__ = ["float_matmul", "micro_kernels"]


def float_matmul(be: "WgpuBackend", m: int, k: int, n: int,
                 dtype: DType) -> Optional[Callable[[], None]]:
    """A callable that runs an f32 WGSL tiled matmul ``[m,k] @ [k,n]`` on random data and
    waits (the floating-point baseline for benchmarks; ``dtype`` is ignored: f32 is the
    one float type every adapter has). None when an operand exceeds a binding."""
    room = be._settings["max_storage_binding"]
    if max(m * k, k * n, m * n) * 4 > room or -(-max(m, n) // 128) > be._settings[
            "max_workgroups_per_dim"]:
        return None
    # The deepest K step that fits workgroup memory (two 128-wide f32 tiles).
    bk = next((b for b in (32, 16, 8, 4, 2, 1)
               if b * 2 * 128 * 4 <= be._settings["max_workgroup_storage"]), None)
    if bk is None or 256 > int(be.limits["max-compute-invocations-per-workgroup"]):
        return None
    rng = np.random.default_rng(0)
    a = be.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    b = be.from_numpy(rng.standard_normal((k, n)).astype(np.float32))
    c = be.empty((m, n), f32)
    pipe = be._pipeline("matmul_f32", "", {"BM": 128, "BN": 128, "BK": bk, "WGX": 16,
                                             "WGY": 16})
    params = be._params_buffer([[m, n, k, 0]])
    res = {i: be._range(t, 0, max(4, t.size * 4))[0] for i, t in ((0, c), (1, a), (2, b))}
    bg = be._bind_group("matmul", res, params, 0, 16)
    grid = (-(-n // 128), -(-m // 128), 1)

    def run() -> None:
        _dispatch_and_wait(be, pipe, bg, grid)

    run.keep = (a, b, c, params)
    return run


def _dispatch_and_wait(be: "WgpuBackend", pipe: Any, bind_group: Any, grid: tuple) -> None:
    """One dispatch in its own submit, waited for (the benchmark helpers' unit of work)."""
    enc = be.device.create_command_encoder()
    cp = enc.begin_compute_pass()
    cp.set_pipeline(pipe)
    cp.set_bind_group(0, bind_group)
    cp.dispatch_workgroups(*grid)
    cp.end()
    be.device.queue.submit([enc.finish()])
    be.synchronize()


def micro_kernels(be: "WgpuBackend", words: int = 1 << 22,
                  iters: int = 256) -> dict[str, tuple[Callable[[], None], int]]:
    """For benchmarks: ``{"dot4": (run, int8_ops), "copy": (run, bytes_moved)}`` where
    ``run()`` runs the dot4I8Packed throughput kernel or a copy of ``words`` vec4 words
    and waits."""
    src = be.from_numpy(np.random.default_rng(1).integers(
        0, 2**32, size=words * 4, dtype=np.uint32).view(np.int32).view(np.float32))
    dst = be.empty((words * 4,), f32)
    wg = min(256, be._max_invocations())
    out = {}
    for entry in ("dot4_peak", "copy"):
        pipe = be._pipeline("micro", "", {"WG": wg, "ITERS": iters}, entry=entry)
        bgl, _ = be._layout_for("micro")
        with be._guard("creating a bind group"):
            bg = be.device.create_bind_group(layout=bgl, entries=[
                {"binding": 0, "resource": {"buffer": dst.handle}},
                {"binding": 1, "resource": {"buffer": src.handle}}])
        groups = -(-words // wg)
        gx = min(groups, be._settings["max_workgroups_per_dim"])
        grid = (gx, -(-groups // gx), 1)

        def run(pipe=pipe, bg=bg, grid=grid):
            _dispatch_and_wait(be, pipe, bg, grid)

        run.keep = (src, dst)
        amount = (grid[0] * grid[1] * wg * iters * 16 * 8 if entry == "dot4_peak"
                  else words * 16 * 2)
        out["dot4" if entry == "dot4_peak" else "copy"] = (run, amount)
    return out

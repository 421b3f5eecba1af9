"""The dot4I8Packed probe: on a new device, ``shaders/dot4_probe.wgsl`` computes integer
dot products of edge values whose answers numpy knows. Some Vulkan drivers compute the
integer dot product that naga emits for ``dot4I8Packed`` wrong; an adapter that gets any
answer wrong (or cannot run the probe) is described with ``dot4_exact=False`` in its
:class:`AdapterFacts`, and its plans take the exact f32 path.

It runs once per backend object, when it is created: one small kernel, a few
milliseconds, never at ``import qlinear``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...errors import QlinearError
from .dispatch import bind_group
from .layouts import MICRO

if TYPE_CHECKING:
    from .device import WgpuDevice

__all__ = ["Dot4Probe", "probe_lanes", "expected_dots", "device_dots", "probe_dot4"]

# Lane values whose products and sums exercise each lane's sign extension and the sum.
_EDGES = (-128, -127, -1, 0, 1, 127)
# Written where the kernel writes, so that a product it never wrote is caught too.
_POISON = -0x5EED


@dataclass(frozen=True)
class Dot4Probe:
    """What the probe found: ``exact`` (every answer right) and, where not, ``detail``
    (how many were wrong and the first one, or why the probe kernel could not run)."""

    exact: bool
    detail: str = ""

    def describe(self) -> str:
        """One line for ``qlinear info``."""
        if self.exact:
            return "passed (dot4I8Packed is exact on this adapter)"
        return f"failed: {self.detail}; plans take the exact f32 path"


def probe_lanes() -> tuple[np.ndarray, np.ndarray]:
    """The probe's operands, int8 ``[P, 4]`` each (lane 0 first): every pair of edge
    values in each lane alone (the other lanes zero); every lane at the extremes together;
    mixed signs across lanes; and random words from a fixed seed."""
    a: list[list[int]] = []
    b: list[list[int]] = []
    for lane in range(4):
        for va, vb in itertools.product(_EDGES, repeat=2):
            wa, wb = [0] * 4, [0] * 4
            wa[lane], wb[lane] = va, vb
            a.append(wa)
            b.append(wb)
    for va, vb in itertools.product((-128, -127, 127), repeat=2):
        a.append([va] * 4)
        b.append([vb] * 4)
    mixed = [[127, -128, 1, -1], [-128, 127, -1, 1], [-1, -1, -1, -1], [-128, 0, 127, -127],
             [0, -128, 0, -128], [1, 2, -3, -4]]
    for wa, wb in itertools.product(mixed, repeat=2):
        a.append(wa)
        b.append(wb)
    rng = np.random.default_rng(0x0D074)
    ra = rng.integers(-128, 128, size=(64, 4), dtype=np.int8)
    rb = rng.integers(-128, 128, size=(64, 4), dtype=np.int8)
    return (np.concatenate([np.array(a, np.int8), ra]),
            np.concatenate([np.array(b, np.int8), rb]))


def expected_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The exact answers, int64 ``[P]``: the sum over lanes of ``a * b``."""
    return (a.astype(np.int64) * b.astype(np.int64)).sum(axis=1)


def device_dots(gpu: WgpuDevice, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``dot4I8Packed`` of each pair of rows of ``a`` and ``b`` on ``gpu``, int32 ``[P]``."""
    n = len(a)
    words = np.stack([np.ascontiguousarray(a).view(np.uint32)[:, 0],
                      np.ascontiguousarray(b).view(np.uint32)[:, 0]], axis=1).reshape(-1)
    src = gpu.buffer(words.nbytes, "qlinear dot4 probe operands")
    dst = gpu.buffer(4 * n, "qlinear dot4 probe results")
    pipeline = gpu.shaders.pipeline("dot4_probe", "words", {}, "main")
    group = bind_group(gpu, MICRO, {"dst": {"buffer": dst, "offset": 0, "size": 4 * n},
                                    "src": {"buffer": src, "offset": 0, "size": words.nbytes}})
    with gpu.guard("running the dot4I8Packed probe"):
        queue = gpu.device.queue
        queue.write_buffer(src, 0, words)
        queue.write_buffer(dst, 0, np.full(n, _POISON, np.int32))
        enc = gpu.device.create_command_encoder(label="qlinear dot4 probe")
        cp = enc.begin_compute_pass(label="dot4_probe")
        cp.set_pipeline(pipeline)
        cp.set_bind_group(0, group)
        cp.dispatch_workgroups(-(-n // 64), 1, 1)
        cp.end()
        queue.submit([enc.finish()])
        data = queue.read_buffer(dst, 0, 4 * n)
    return np.frombuffer(data, np.int32).copy()


def probe_dot4(gpu: WgpuDevice) -> Dot4Probe:
    """Run the probe on ``gpu`` and compare with :func:`expected_dots`. A probe that cannot
    run (the kernel fails to compile or dispatch) counts as failed, with wgpu's reason."""
    a, b = probe_lanes()
    try:
        got = device_dots(gpu, a, b).astype(np.int64)
    except QlinearError as e:
        return Dot4Probe(False, f"the probe kernel did not run ({str(e).splitlines()[0]})")
    want = expected_dots(a, b)
    bad = np.flatnonzero(got != want)
    if not len(bad):
        return Dot4Probe(True)
    i = int(bad[0])
    return Dot4Probe(False, f"{len(bad)} of {len(want)} products wrong, first "
                            f"a={a[i].tolist()} b={b[i].tolist()}: got {got[i]}, want {want[i]}")

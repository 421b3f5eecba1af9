"""The Python side of the kernels' WGSL interfaces, written once: for each bind group
layout, its binding numbers by WGSL variable name, and its uniform parameter block as a
numpy structured dtype named after, and laid out as, the WGSL struct it fills.

``tests/test_wgpu_shaders.py`` parses the structs and ``@binding`` declarations out of
``shaders/`` and checks them against these tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["Layout", "LINEAR", "QUANT", "MATMUL", "MICRO", "LAYOUTS", "LinearParams",
           "QuantParams", "MatmulParams", "PARAMS_BINDING"]

_U32 = np.dtype("<u4")

#: ``struct LinearParams`` of ``linear_io.wgsl``: one block of a GEMM dispatch.
LinearParams = np.dtype([(name, _U32) for name in (
    "m", "n", "kw", "a_base", "b_base", "s_base", "ws_base", "bias_base", "y_base",
    "y_stride", "zero", "zp_base", "cs_base", "pad0", "pad1", "pad2")])
#: ``struct QuantParams`` of ``rowquant.wgsl``: one block of activation-pass rows, and the
#: static schemes' scale (f32 bits) and zero point.
QuantParams = np.dtype([*((name, _U32) for name in (
    "k", "kw", "x_base", "q_base", "s_base", "zp_base", "in_scale")), ("in_zp", np.dtype("<i4"))])
#: ``struct MatmulParams`` of ``matmul_f32.wgsl``: the f32 benchmark matmul.
MatmulParams = np.dtype([(name, _U32) for name in ("m", "n", "k", "pad")])

#: The binding of the uniform parameter block in every layout that has one.
PARAMS_BINDING = 7


@dataclass(frozen=True)
class Layout:
    """One bind group layout: ``storage`` maps each storage buffer's WGSL variable name to
    its binding number; ``params`` is the dtype of the uniform block at
    :data:`PARAMS_BINDING`, or None where there is none."""

    name: str
    storage: Mapping[str, int]
    params: np.dtype | None = None

    def bindings(self) -> dict[str, int]:
        """Every binding by WGSL variable name (the uniform block is ``p``)."""
        out = dict(self.storage)
        if self.params is not None:
            out["p"] = PARAMS_BINDING
        return out


# ``tout`` is the TIn output of the element-access preludes (elem_*.wgsl): act_scale for
# the activation pass, y for the GEMMs. The zero-point bindings (act_zp, colsum) are in
# every scheme's layout; the schemes without one bind the device's dummy buffer there.
QUANT = Layout("quant", {"tout": 0, "x": 1, "q": 2, "act_zp": 3}, QuantParams)
LINEAR = Layout("linear", {"tout": 0, "act": 1, "wt": 2, "act_scale": 3, "wscale": 4,
                           "bias": 5, "act_zp": 6, "colsum": 8}, LinearParams)
MATMUL = Layout("matmul", {"c_out": 0, "a_in": 1, "b_in": 2}, MatmulParams)
MICRO = Layout("micro", {"dst": 0, "src": 1})

LAYOUTS = {lay.name: lay for lay in (QUANT, LINEAR, MATMUL, MICRO)}

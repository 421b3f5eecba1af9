"""WGSL composition and the per-device caches of shader modules, bind group layouts and
pipelines.

Kernels are specialised with WGSL ``override`` constants, so the only source-level step
is composition: a kernel family's file (``shaders/<family>.wgsl``) is preceded by the
element-access prelude (``elem_words.wgsl``, or ``elem_f16.wgsl`` where TIn is held as
WGSL f16), ``common.wgsl``, and for the GEMM families the bindings and epilogue
(``linear_io.wgsl``) and, for the tiled ones, the shared tile loads (``gemm_tiles.wgsl``).
The families that reduce across invocations (the activation pass, the small-M GEMM) are
followed by their reduction, a file of its own: through workgroup memory
(``<family>_reduce.wgsl``), or with subgroup operations (``<family>_reduce_sg.wgsl``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...errors import InvalidProblem
from ...resources import read_source
from .layouts import LAYOUTS, PARAMS_BINDING, Layout

if TYPE_CHECKING:
    from .device import WgpuDevice

__all__ = ["shader_source", "check_target", "ShaderCache", "FAMILY_LAYOUT", "TARGETS"]

#: The bind group layout of each kernel family.
FAMILY_LAYOUT = {"rowquant": "quant", "gemm_dot4": "linear", "gemm_f32": "linear",
                 "gemv": "linear", "matmul_f32": "matmul", "micro": "micro",
                 "dot4_probe": "micro"}
# The files composed after the prelude and common.wgsl, before the family's own.
_FAMILY_PARTS = {"rowquant": (), "gemv": ("linear_io.wgsl",),
                 "gemm_dot4": ("linear_io.wgsl", "gemm_tiles.wgsl"),
                 "gemm_f32": ("linear_io.wgsl", "gemm_tiles.wgsl")}
# Families that stand alone: no TIn, no shared numerics.
_STANDALONE = ("matmul_f32", "micro", "dot4_probe")
# Families whose reduction across invocations is a file of its own, in two variants.
_REDUCED = ("rowquant", "gemv")
# Tint accepts subgroup builtins only after this directive; naga refuses the directive
# (and needs none: the device feature enables the builtins).
_TINT_SUBGROUPS = "enable subgroups;\n"


#: The WGSL compilers sources are composed for: naga (wgpu) and Tint (Dawn: Chrome, Edge).
TARGETS = ("naga", "tint")


def check_target(target: str) -> None:
    """:class:`InvalidProblem` unless ``target`` is one of :data:`TARGETS`."""
    if target not in TARGETS:
        raise InvalidProblem(f"target: expected one of {TARGETS}, got {target!r}")


def shader_source(family: str, elem: str = "words", *, subgroups: bool = False,
                  target: str = "naga") -> str:
    """The WGSL text of kernel ``family`` (a file of ``shaders/``) as compiled: the
    element-access prelude (``elem`` = "words" or "f16"), ``common.wgsl``, the GEMM
    bindings and shared tile loads for GEMM families, then the family itself.

    ``subgroups`` composes the family's subgroup reductions instead of its
    workgroup-memory ones (only "rowquant" and "gemv" have them); ``target`` is the
    compiler the text is for ("naga" or "tint"): the ``enable`` directives differ
    between them. Without subgroups the text is the same for both."""
    check_target(target)
    if subgroups and family not in _REDUCED:
        raise InvalidProblem(f"subgroups: expected False for family {family!r} (only "
                             f"{' and '.join(_REDUCED)} have subgroup reductions), got True")
    if family in _STANDALONE:
        return read_source("shaders", f"{family}.wgsl")
    if elem not in ("words", "f16"):
        raise InvalidProblem(f"elem: expected 'words' or 'f16', got {elem!r}")
    parts = [f"elem_{elem}.wgsl", "common.wgsl", *_FAMILY_PARTS.get(family, ()),
             f"{family}.wgsl"]
    if family in _REDUCED:
        # After the family: its workgroup arrays are sized by the family's overrides, and
        # naga 29 panics on an override-sized array declared before its override.
        parts.append(f"{family}_reduce{'_sg' if subgroups else ''}.wgsl")
    text = "\n".join(read_source("shaders", p) for p in parts)
    return _TINT_SUBGROUPS + text if subgroups and target == "tint" else text


class ShaderCache:
    """The shader modules (by source text), bind group layouts (by layout name) and
    compute pipelines (by family, prelude, entry point and override constants) of one
    device: a plan selected twice, or for another shape, reuses them.

    Shared by every thread: a hit is one dict lookup; a miss creates the object under a
    lock, so two threads selecting the same plan at once compile it once."""

    def __init__(self, gpu: WgpuDevice):
        self.gpu = gpu
        self.modules: dict[str, Any] = {}
        self.layouts: dict[str, tuple[Any, Any]] = {}
        self.pipelines: dict[tuple, Any] = {}
        # Re-entrant: a pipeline's creation asks for its module and layout.
        self._lock = threading.RLock()

    def compile(self, source: str, label: str = "qlinear") -> Any:
        """The shader module of WGSL ``source``. A compile error raises
        :class:`DeviceError` carrying the compiler's log."""
        mod = self.modules.get(source)
        if mod is None:
            with self._lock:
                mod = self.modules.get(source)
                if mod is None:
                    with self.gpu.guard(f"compiling WGSL module {label!r}"):
                        mod = self.gpu.device.create_shader_module(label=label, code=source)
                    self.modules[source] = mod
        return mod

    def layout(self, layout: Layout) -> tuple[Any, Any]:
        """(bind group layout, pipeline layout) of ``layout``."""
        lay = self.layouts.get(layout.name)
        if lay is None:
            with self._lock:
                lay = self.layouts.get(layout.name) or self._new_layout(layout)
        return lay

    def _new_layout(self, layout: Layout) -> tuple[Any, Any]:
        gpu = self.gpu
        stage = gpu.wgpu.ShaderStage.COMPUTE
        entries = [{"binding": b, "visibility": stage, "buffer": {"type": "storage"}}
                   for b in sorted(layout.storage.values())]
        if layout.params is not None:
            entries.append({"binding": PARAMS_BINDING, "visibility": stage,
                            "buffer": {"type": "uniform"}})
        with gpu.guard("creating a pipeline layout"):
            bgl = gpu.device.create_bind_group_layout(entries=entries)
            pl = gpu.device.create_pipeline_layout(bind_group_layouts=[bgl])
        lay = self.layouts[layout.name] = (bgl, pl)
        return lay

    def pipeline(self, family: str, elem: str, constants: Mapping[str, int],
                 entry: str = "main", subgroups: bool = False) -> Any:
        """The compute pipeline of ``family``'s ``entry`` with TIn prelude ``elem``, these
        override ``constants``, and subgroup reductions or not."""
        key = (family, elem, entry, tuple(sorted(constants.items())), subgroups)
        pipe = self.pipelines.get(key)
        if pipe is None:
            with self._lock:
                pipe = self.pipelines.get(key) or self._new_pipeline(key, family, elem,
                                                                      constants, entry, subgroups)
        return pipe

    def _new_pipeline(self, key: tuple, family: str, elem: str, constants: Mapping[str, int],
                      entry: str, subgroups: bool) -> Any:
        module = self.compile(shader_source(family, elem, subgroups=subgroups), label=family)
        _, layout = self.layout(LAYOUTS[FAMILY_LAYOUT[family]])
        with self.gpu.guard(f"creating the {family} pipeline"):
            pipe = self.gpu.device.create_compute_pipeline(
                layout=layout, label=family,
                compute={"module": module, "entry_point": entry,
                         "constants": {k: float(v) for k, v in constants.items()}})
        self.pipelines[key] = pipe
        return pipe

    def info(self) -> dict[str, int]:
        """How many shader modules, pipelines and layouts are cached."""
        return {"modules": len(self.modules), "pipelines": len(self.pipelines),
                "layouts": len(self.layouts)}

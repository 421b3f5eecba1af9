"""Reading compressed-tensors W8A8 checkpoints without torch (numpy via ``safetensors``).

A checkpoint is a folder with ``config.json`` and ``*.safetensors`` files (one file, or
shards listed by ``model.safetensors.index.json``), as llm-compressor writes it and
vLLM serves it. ``config.json``'s ``quantization_config`` says which layers are
quantized and how; this module runs the ``int-quantized`` format:

=========================================  ================================================
``config_groups.<g>.weights``              8-bit ``int``, symmetric, static; ``strategy``
                                           ``channel`` (``weight_scale`` ``[N, 1]``) or
                                           ``tensor`` (``[1]``, broadcast per channel)
``input_activations``: token, dynamic      ``"dynamic"`` (symmetric) or ``"dynamic_asym"``
``input_activations``: tensor, static      ``"static"`` (``input_scale``, range -128..127)
                                           or ``"static_asym"`` (and ``input_zero_point``)
=========================================  ================================================

Each quantized layer ``<name>`` holds ``<name>.weight`` int8 ``[N, K]`` and
``<name>.weight_scale``, with ``<name>.bias`` when the layer has one. Its int8 weight and
scales are used as stored, never re-quantized. What the format allows but qlinear does
not run (packed int4, group or block strategies, floats, weight-only or output
quantization, ...) is refused with :class:`~qlinear.Unsupported` naming the config
field; a file that disagrees with its config (a missing, unexpected or misshapen
tensor) with :class:`~qlinear.InvalidProblem` naming the tensor.

Which layers a group covers follows compressed-tensors: a target is a module name, a
``"re:<pattern>"`` (``re.match`` on the name) or a class name; ``ignore`` entries are
the same. Without the model, the class name ``"Linear"`` stands for every quantized
layer; :func:`qlinear.torch.load_compressed` checks the real classes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends import Backend
from .dtypes import bf16
from .errors import InvalidProblem, Unsupported
from .layer import QuantizedLinear
from .schemes import ActivationScheme

__all__ = ["CompressedCheckpoint", "LayerGroup", "QuantizedLayerSpec", "open_compressed",
           "load_quantized_linears"]

_FORMAT = "int-quantized"
#: Per-layer tensor suffixes a quantized layer may hold.
_LAYER_PARTS = ("weight", "weight_scale", "weight_zero_point", "bias", "input_scale",
                "input_zero_point")


@dataclass(frozen=True)
class LayerGroup:
    """One ``config_groups`` entry that qlinear runs: its targets, the weight strategy and
    the activation scheme with its int8 range."""

    name: str
    targets: tuple[str, ...]
    weight_strategy: str  # "channel" or "tensor"
    scheme: ActivationScheme
    q_min: int
    q_max: int


@dataclass(frozen=True)
class QuantizedLayerSpec:
    """One quantized linear layer of a checkpoint, as stored (``weight_scale`` and
    ``bias`` in the checkpoint's float dtype)."""

    name: str
    weight_q: np.ndarray  # int8 [N, K]
    weight_scale: np.ndarray  # [N] (per channel) or [1] (per tensor)
    bias: np.ndarray | None
    scheme: ActivationScheme
    input_scale: float | None
    input_zero_point: int | None
    q_min: int
    q_max: int

    def scheme_arguments(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~qlinear.QuantizedLinear` for the scheme."""
        return {"scheme": self.scheme, "input_scale": self.input_scale,
                "input_zero_point": self.input_zero_point, "q_min": self.q_min,
                "q_max": self.q_max}

    def layer(self, backend: Backend | str | None = None) -> QuantizedLinear:
        """The :class:`~qlinear.QuantizedLinear` of this layer on ``backend``."""
        return QuantizedLinear(self.weight_q, self.weight_scale, self.bias, backend=backend,
                               **self.scheme_arguments())


def _field(path: str, value: Any, expected: str) -> Unsupported:
    return Unsupported(f"quantization_config.{path}: expected {expected}, got {value!r}")


def _check_args(where: str, args: Any, what: str) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise _field(where, args, f"the {what} quantization arguments (an object)")
    if args.get("num_bits") != 8:
        raise _field(f"{where}.num_bits", args.get("num_bits"), "8 (int8)")
    if args.get("type") != "int":
        raise _field(f"{where}.type", args.get("type"), "'int'")
    for key in ("group_size", "block_structure"):
        if args.get(key) is not None:
            raise _field(f"{where}.{key}", args.get(key), "null")
    if args.get("actorder") not in (None, "none"):
        raise _field(f"{where}.actorder", args.get("actorder"), "null")
    return args


def _group(name: str, g: Any, top_format: Any) -> LayerGroup:
    where = f"config_groups.{name}"
    if not isinstance(g, dict):
        raise _field(where, g, "an object with targets, weights and input_activations")
    fmt = g.get("format") or top_format
    if fmt != _FORMAT:
        raise _field(f"{where}.format", fmt, f"{_FORMAT!r}")
    targets = g.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise _field(f"{where}.targets", targets, "a list of names")
    if g.get("output_activations") is not None:
        raise _field(f"{where}.output_activations", g["output_activations"], "null")
    w = _check_args(f"{where}.weights", g.get("weights"), "weight")
    if w.get("strategy") not in ("channel", "tensor"):
        raise _field(f"{where}.weights.strategy", w.get("strategy"), "'channel' or 'tensor'")
    if w.get("symmetric") is not True:
        raise _field(f"{where}.weights.symmetric", w.get("symmetric"), "true")
    if w.get("dynamic") not in (False, None):
        raise _field(f"{where}.weights.dynamic", w.get("dynamic"), "false")
    a = g.get("input_activations")
    if a is None:
        raise _field(f"{where}.input_activations", a,
                     "int8 activation arguments (weight-only checkpoints are not W8A8)")
    a = _check_args(f"{where}.input_activations", a, "input")
    sym = a.get("symmetric")
    if sym not in (True, False):
        raise _field(f"{where}.input_activations.symmetric", sym, "true or false")
    strategy, dynamic = a.get("strategy"), a.get("dynamic")
    if (strategy, dynamic) == ("token", True):
        scheme = ActivationScheme.DYNAMIC if sym else ActivationScheme.DYNAMIC_ASYM
        # vLLM's per-token symmetric rule (amax / 127, so -128 never appears).
        q_min = -127 if sym else -128
    elif (strategy, dynamic) == ("tensor", False):
        scheme = ActivationScheme.STATIC if sym else ActivationScheme.STATIC_ASYM
        q_min = -128  # compressed-tensors clamps static inputs to -128..127
    else:
        raise _field(f"{where}.input_activations", {"strategy": strategy, "dynamic": dynamic},
                     "strategy 'token' with dynamic true, or 'tensor' with dynamic false")
    return LayerGroup(name, tuple(targets), w["strategy"], scheme, q_min, 127)


def _parse(qc: Any) -> tuple[list[LayerGroup], tuple[str, ...]]:
    if not isinstance(qc, dict):
        raise Unsupported(
            f"config.json: expected a quantization_config object (a compressed-tensors "
            f"checkpoint), got {qc!r}")
    if qc.get("quant_method") != "compressed-tensors":
        raise _field("quant_method", qc.get("quant_method"), "'compressed-tensors'")
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if qc.get(key):
            raise _field(key, qc.get(key), "null or empty")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _field("config_groups", groups, "at least one group")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
        raise _field("ignore", ignore, "a list of names")
    top = qc.get("format")
    return [_group(name, g, top) for name, g in groups.items()], tuple(ignore)


def _name_matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


class CompressedCheckpoint:
    """A compressed-tensors checkpoint folder, opened: its config parsed and checked, its
    tensors indexed (read on demand). Made by :func:`open_compressed`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        cfg_path = os.path.join(self.path, "config.json")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                self.config: dict[str, Any] = json.load(f)
        except (OSError, ValueError) as e:
            raise InvalidProblem(
                f"path: expected a checkpoint folder with a readable config.json, got "
                f"{self.path!r}: {e}") from e
        self.groups, self.ignore = _parse(self.config.get("quantization_config"))
        self._files = _index(self.path)
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, file in self._files.items():
            self._meta[name] = _header(file, name)

    @property
    def tensor_names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self._files)

    def stored(self, name: str) -> tuple[str, tuple[int, ...]]:
        """Tensor ``name``'s safetensors dtype (``"I8"``, ``"BF16"``, ...) and shape."""
        return self._meta[name]

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a numpy array (bf16 as ``ml_dtypes.bfloat16``)."""
        from safetensors import safe_open

        with safe_open(self._files[name], framework="np") as f:
            a = f.get_tensor(name)
        if self._meta[name][0] == "BF16" and a.dtype != bf16.numpy:
            a = a.view(bf16.numpy)
        return a

    def quantized_names(self) -> list[str]:
        """The layers that hold quantized weights (``<name>.weight_scale``), in file order."""
        return [n[: -len(".weight_scale")] for n in self._files if n.endswith(".weight_scale")]

    def group_for(self, name: str, classes: Sequence[str] = ("Linear",)) -> LayerGroup | None:
        """The group that quantizes module ``name`` of class ``classes`` (the names in its
        MRO), or None when none targets it or ``ignore`` names it. As compressed-tensors
        picks: exact names first, then patterns (in sorted order), then class names."""
        def hits(target: str) -> bool:
            return _name_matches(name, target) or target in classes

        if any(hits(t) for t in self.ignore):
            return None
        by_target = {t: g for g in self.groups for t in g.targets}
        ordered = sorted(by_target, key=lambda t: (t.startswith("re:"), t))
        for t in ordered:
            if _name_matches(name, t):
                return by_target[t]
        for t in ordered:
            if t in classes:
                return by_target[t]
        return None

    def layer_names(self, name: str) -> list[str]:
        """The tensors of layer ``name`` that the checkpoint holds."""
        return [f"{name}.{p}" for p in _LAYER_PARTS if f"{name}.{p}" in self._files]

    def layer_spec(self, name: str, group: LayerGroup) -> QuantizedLayerSpec:
        """Layer ``name``'s tensors, checked against ``group`` (InvalidProblem naming the
        tensor otherwise)."""
        from .checkpoint_layer import read_layer

        return read_layer(self, name, group)


def _index(path: str) -> dict[str, str]:
    """Tensor name -> file, from the shard index or every ``*.safetensors`` in ``path``."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            return {k: os.path.join(path, v) for k, v in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidProblem(
                f"path: expected a readable model.safetensors.index.json with a weight_map "
                f"in {path!r}: {type(e).__name__}: {e}") from e
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise InvalidProblem(f"path: expected *.safetensors files in {path!r}, found none")
    out: dict[str, str] = {}
    for file in files:
        full = os.path.join(path, file)
        for name in _keys(full):
            if name in out:
                raise InvalidProblem(
                    f"tensor {name!r}: expected once in the checkpoint, found in "
                    f"{os.path.basename(out[name])} and {file}")
            out[name] = full
    return out


def _keys(file: str) -> Iterable[str]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="np") as f:
            return list(f.keys())  # noqa: SIM118 (not a dict)
    except Exception as e:  # the library's error types vary by version: name the file
        raise InvalidProblem(
            f"path: expected a readable safetensors file, got {file!r}: "
            f"{type(e).__name__}: {e}") from e


def _header(file: str, name: str) -> tuple[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="np") as f:
            sl = f.get_slice(name)
            return str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape())
    except Exception as e:
        raise InvalidProblem(
            f"tensor {name!r}: expected in {file!r} (as the index says), but it cannot be "
            f"read: {type(e).__name__}: {e}") from e


def open_compressed(path: str | os.PathLike[str]) -> CompressedCheckpoint:
    """Open the compressed-tensors checkpoint folder ``path`` (config checked, tensors
    indexed; nothing else read)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise InvalidProblem(f"path: expected a checkpoint folder, got {path!r}")
    return CompressedCheckpoint(path)


def load_quantized_linears(path: str | os.PathLike[str], *,
                           backend: Backend | str | None = None) -> dict[str, QuantizedLinear]:
    """Every quantized layer of the checkpoint at ``path`` as a
    :class:`~qlinear.QuantizedLinear` on ``backend``, by module name. Torch is not needed.

    The tensors that are not part of a quantized layer (embeddings, norms, ignored layers)
    are left in the checkpoint: :meth:`CompressedCheckpoint.tensor` reads them."""
    ckpt = open_compressed(path)
    specs = []
    for name in ckpt.quantized_names():
        group = ckpt.group_for(name)
        if group is None:
            raise InvalidProblem(
                f"tensor {name + '.weight_scale'!r}: expected quantized layers only where a "
                f"config group targets them (by name, 're:' pattern or the class 'Linear') "
                f"and ignore does not, got layer {name!r}")
        specs.append(ckpt.layer_spec(name, group))
    return {s.name: s.layer(backend) for s in specs}

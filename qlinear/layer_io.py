"""Saving and loading a :class:`~qlinear.QuantizedLinear` without torch: one safetensors
file per layer, written and read with ``safetensors`` (numpy arrays).

The file, ``<name>.safetensors``::

    tensors
      weight_q      I8   [C_out, K]   the int8 weight, as the layer holds it
      weight_scale  TIn  [C_out]      per output channel
      bias          TIn  [C_out]      only when the layer has a bias
    metadata (text -> text)
      format          "qlinear.QuantizedLinear"
      format_version  "1" (dynamic scheme) or "2" (any scheme)
      dtype           "f32", "f16", "bf16" or "f64" (TIn)
      q_min, q_max    the activation quantization range, decimal
      out_features, in_features   C_out and K, decimal
      bias            "true" or "false"
    version 2 adds
      scheme            "dynamic", "static", "static_asym" or "dynamic_asym"
      input_scale       the static scale as ``float.hex`` (exact), or "" for dynamic schemes
      input_zero_point  decimal, or "" unless the scheme is "static_asym"

A layer with the default dynamic scheme is written as version 1, which every qlinear
release reads; other schemes need version 2. Both versions are read.

TIn tensors are stored as F32, F16 or F64; bf16 ones as U16 holding the bfloat16 bit
patterns (``ml_dtypes.bfloat16`` viewed as ``uint16``), because ``safetensors.numpy``
does not write or read ``ml_dtypes.bfloat16`` in every version this package supports;
``dtype = "bf16"`` in the metadata says how to read them back.

A layer is written to a temporary file in the target folder and renamed over ``path``
(``os.replace``), so a failed save leaves any previous file as it was. Reading checks
the format name and version, every tensor's presence, dtype and shape against the
metadata, and then the values as the layer's constructor does; any failure is an
:class:`~qlinear.InvalidProblem` naming the path, never a raw exception.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends import Backend
from .backends import backend as get_backend
from .dtypes import as_dtype, bf16
from .errors import InvalidProblem
from .schemes import ActivationScheme

if TYPE_CHECKING:
    from .layer import QuantizedLinear

__all__ = ["save_layer", "load_layer", "FORMAT", "FORMAT_VERSION"]

#: The ``format`` metadata value of a layer file.
FORMAT = "qlinear.QuantizedLinear"
#: The newest ``format_version`` this module writes and reads (it reads every older one).
FORMAT_VERSION = 2
_WHAT = f"a qlinear layer file (safetensors, format {FORMAT} version 1..{FORMAT_VERSION})"


def _check_path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidProblem(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _to_file(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint16) if a.dtype == bf16.numpy else a


def save_layer(layer: QuantizedLinear, path: str | os.PathLike[str]) -> None:
    """Write ``layer`` to ``path`` in the format above (atomically replacing the file)."""
    from safetensors.numpy import save_file

    p = _check_path(path)
    wq, ws, bias = layer.host_arrays()
    tensors = {"weight_q": np.ascontiguousarray(wq), "weight_scale": _to_file(ws)}
    if bias is not None:
        tensors["bias"] = _to_file(bias)
    meta = {"format": FORMAT, "format_version": "1",
            "dtype": layer.dtype.name, "q_min": str(layer.q_min), "q_max": str(layer.q_max),
            "out_features": str(layer.out_features), "in_features": str(layer.in_features),
            "bias": "true" if bias is not None else "false"}
    if layer.scheme is not ActivationScheme.DYNAMIC:
        scale, zp = layer.input_scale, layer.input_zero_point
        meta.update(format_version=str(FORMAT_VERSION), scheme=layer.scheme.value,
                    input_scale="" if scale is None else float(scale).hex(),
                    input_zero_point="" if zp is None else str(zp))
    folder = os.path.dirname(os.path.abspath(p))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".qlinear-", suffix=".tmp")
    except OSError as e:
        raise InvalidProblem(f"path: expected a file in a writable folder, got {p!r}: {e}") from e
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, p)
    except OSError as e:
        raise InvalidProblem(f"path: expected a writable file, got {p!r}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read(p: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    from safetensors import safe_open

    try:
        with safe_open(p, framework="np") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # the library's own error types vary by version: name the file
        raise InvalidProblem(
            f"path: expected {_WHAT}, got {p!r}, which cannot be read: "
            f"{type(e).__name__}: {e}") from e
    return meta, tensors


def _int(meta: dict[str, str], key: str, p: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise InvalidProblem(
            f"path: expected {_WHAT} with an integer {key!r} in its metadata, got {p!r} with "
            f"{meta.get(key)!r}") from None


def _from_file(name: str, a: np.ndarray, want: tuple[int, ...], dtype_name: str,
               p: str) -> np.ndarray:
    dt = as_dtype(dtype_name)
    stored = np.dtype(np.uint16) if dt == bf16 else dt.numpy
    if a.dtype == stored and a.shape == want:
        return a.view(bf16.numpy) if dt == bf16 else a
    raise InvalidProblem(
        f"path: expected {_WHAT} whose {name} is {stored} of shape {list(want)}, got {p!r} "
        f"holding {a.dtype} of shape {list(a.shape)}")


def _scheme_metadata(meta: dict[str, str], p: str) -> dict[str, Any]:
    """The scheme's keyword arguments from version 2 metadata (their values are checked by
    the layer's constructor, which names them)."""
    got = {key: meta.get(key) for key in ("scheme", "input_scale", "input_zero_point")}
    try:
        scale = got["input_scale"]
        zp = got["input_zero_point"]
        return {"scheme": got["scheme"],
                "input_scale": float.fromhex(scale) if scale else None,
                "input_zero_point": int(zp) if zp else None}
    except (TypeError, ValueError):
        raise InvalidProblem(
            f"path: expected {_WHAT} whose version 2 metadata holds a scheme name, "
            f"input_scale as float.hex text or '' and input_zero_point as an integer or '', "
            f"got {p!r} with {got}") from None


def load_layer(path: str | os.PathLike[str], *, backend: Backend | str | None = None,
               cls: type[QuantizedLinear] | None = None) -> QuantizedLinear:
    """The layer in the file at ``path``, built on ``backend`` (as ``cls``, default
    :class:`~qlinear.QuantizedLinear`)."""
    from .layer import QuantizedLinear

    cls = cls or QuantizedLinear
    p = _check_path(path)
    be = get_backend(backend)  # a bad backend is the caller's error, not the file's
    meta, tensors = _read(p)
    if meta.get("format") != FORMAT:
        raise InvalidProblem(
            f"path: expected {_WHAT}, got {p!r} with format {meta.get('format')!r}")
    version = meta.get("format_version")
    if version not in [str(v) for v in range(1, FORMAT_VERSION + 1)]:
        raise InvalidProblem(
            f"path: expected {_WHAT}, got {p!r} of format version {version!r}")
    dtype_name = meta.get("dtype", "")
    if dtype_name not in ("f32", "f16", "bf16", "f64"):
        raise InvalidProblem(
            f"path: expected {_WHAT} with dtype f32, f16, bf16 or f64, got {p!r} with "
            f"{dtype_name!r}")
    n, k = _int(meta, "out_features", p), _int(meta, "in_features", p)
    has_bias = meta.get("bias") == "true"
    names = {"weight_q", "weight_scale"} | ({"bias"} if has_bias else set())
    if set(tensors) != names:
        raise InvalidProblem(
            f"path: expected {_WHAT} holding tensors {sorted(names)}, got {p!r} holding "
            f"{sorted(tensors)}")
    wq = _from_file("weight_q", tensors["weight_q"], (n, k), "s8", p)
    ws = _from_file("weight_scale", tensors["weight_scale"], (n,), dtype_name, p)
    bias = _from_file("bias", tensors["bias"], (n,), dtype_name, p) if has_bias else None
    q_min, q_max = _int(meta, "q_min", p), _int(meta, "q_max", p)
    scheme = _scheme_metadata(meta, p) if version != "1" else {}
    try:
        return cls(wq, ws, bias, backend=be, q_min=q_min, q_max=q_max, **scheme)
    except InvalidProblem as e:
        raise InvalidProblem(f"path: expected {_WHAT} with valid contents, got {p!r}: {e}") from e

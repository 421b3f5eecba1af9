"""``quantize_linears``: swap every ``nn.Linear`` of a model for a :class:`QLinear`."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection
from typing import Any, Union

import torch
from torch import nn

from ..backends import Backend
from ..backends import backend as _get_backend
from ..dtypes import DTypeLike
from ..errors import InvalidProblem, QlinearError
from .convert import qlinear_dtype
from .module import QLinear

__all__ = ["quantize_linears", "SkipFilter"]

#: What ``skip`` takes: a predicate on (qualified name, module), or names / glob patterns.
SkipFilter = Union[  # noqa: UP007 (a runtime alias on 3.10)
    None, str, Callable[[str, nn.Module], bool], Collection[str]]


def _skip_fn(skip: SkipFilter) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, mod: False
    if callable(skip):
        return skip
    patterns = [skip] if isinstance(skip, str) else list(skip)
    for p in patterns:
        if not isinstance(p, str):
            raise InvalidProblem(
                f"skip: expected a callable (name, module) -> bool, or names / glob patterns "
                f"(str), got an element {p!r}")

    def matches(name: str, mod: nn.Module) -> bool:
        # A pattern naming a parent ("encoder.layers.0") skips every linear below it.
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatchcase(pre, p) for p in patterns for pre in prefixes)

    return matches


def _swappable(mod: nn.Module) -> bool:
    # MultiheadAttention's out_proj (NonDynamicallyQuantizableLinear) is never called as a
    # module: attention reads its .weight directly, so a swap would break it (torchao skips
    # it too). A subclass with its own forward would lose that forward.
    return (isinstance(mod, nn.Linear)
            and not isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear)
            and type(mod).forward is nn.Linear.forward)


def _no_op_pre_hook(module: nn.Module, args: Any) -> None:
    return None


def _leave_fast_paths(root: nn.Module, swapped: set) -> None:
    """nn.TransformerEncoder(Layer)'s fused inference path reads ``linear1.weight``
    directly and would bypass (or trip over) a QLinear. Torch leaves that path for a
    layer with forward hooks on any submodule, and for a stack whose
    ``use_nested_tensor`` is False; both are set where a linear was swapped."""
    for mod in root.modules():
        if isinstance(mod, nn.TransformerEncoderLayer):
            for sub in mod.modules():
                if id(sub) in swapped and not getattr(sub, "_qlinear_fastpath_hook", False):
                    sub.register_forward_pre_hook(_no_op_pre_hook)
                    sub._qlinear_fastpath_hook = True  # type: ignore[assignment]
        elif isinstance(mod, nn.TransformerEncoder):
            if any(id(sub) in swapped for sub in mod.modules()):
                mod.use_nested_tensor = False


def _naming(e: QlinearError, name: str) -> QlinearError:
    """``e`` again, of the same type, with the module's qualified name in front."""
    text = f"module {name!r} (nothing was swapped): {e}"
    try:
        return type(e)(text)
    except TypeError:  # an error type whose constructor takes more than the message
        return InvalidProblem(text)


def quantize_linears(module: nn.Module, backend: None | str | Backend = None, *,
                     skip: SkipFilter = None, dtype: DTypeLike | torch.dtype | None = None) -> int:
    """Replace, in place, every ``nn.Linear`` inside ``module`` by a :class:`QLinear`;
    return how many were replaced.

    Args:
        module: the model (it may itself be an ``nn.Linear``: then it cannot be replaced
            in place, and :class:`InvalidProblem` says to use :meth:`QLinear.from_linear`).
        backend: qlinear backend name or object for every swapped layer; None follows
            each input's device (cpu backend for CPU tensors, cuda for CUDA tensors).
        skip: which linears to keep in float: a callable ``(qualified_name, module) -> bool``
            (True keeps it), or a name / glob pattern / collection of them, matched
            against the linear's qualified name and every parent's (``"head"``,
            ``"encoder.layers.0"``, ``"*.linear2"``).
        dtype: the dtype of the quantized layers (scales, bias); default each linear's
            weight dtype. Inputs of other float dtypes still work (see :class:`QLinear`).

    Not swapped, whatever ``skip`` says: ``nn.MultiheadAttention``'s ``out_proj`` (attention
    reads its weight directly, as torchao also notes) and subclasses of ``nn.Linear`` that
    override ``forward``. Where a linear inside ``nn.TransformerEncoderLayer`` is swapped,
    that layer's fused inference fast path is turned off so that the QLinear is called.

    All or nothing: every QLinear is built (weights quantized, shapes, dtypes and the
    backend checked) before any is put in place, so when one linear cannot be quantized
    the model is left exactly as it was, and the error (of the type the failure raised)
    names the module.
    """
    if not isinstance(module, nn.Module):
        raise InvalidProblem(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if _swappable(module):
        raise InvalidProblem(
            "module: got an nn.Linear itself, which cannot be replaced in place; "
            "use QLinear.from_linear(linear) or pass its parent module")
    if dtype is not None:
        dtype = qlinear_dtype(dtype)
    if backend is not None:
        _get_backend(backend)  # an unavailable backend fails before anything is swapped
    should_skip = _skip_fn(skip)
    # Every place a linear sits (a module shared by two parents appears twice), so that
    # a shared linear becomes one shared QLinear, replaced everywhere it is used.
    todo = [name for name, mod in module.named_modules(remove_duplicate=False)
            if _swappable(mod) and not should_skip(name, mod)]
    # Build every QLinear first and swap only when all of them could be built, so that
    # a failure leaves the model exactly as it was.
    made: dict = {}
    swaps = []
    for name in todo:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, attr)
        q = made.get(id(linear))
        if q is None:
            try:
                q = QLinear.from_linear(linear, backend=backend, dtype=dtype)
            except QlinearError as e:
                raise _naming(e, name) from e
            made[id(linear)] = q
        swaps.append((parent, attr, q))
    for parent, attr, q in swaps:
        setattr(parent, attr, q)
    if made:
        _leave_fast_paths(module, {id(q) for q in made.values()})
    return len(made)

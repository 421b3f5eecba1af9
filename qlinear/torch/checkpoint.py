"""``load_compressed``: run a compressed-tensors W8A8 checkpoint in a torch model."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..backends import Backend
from ..backends import backend as _get_backend
from ..checkpoint import CompressedCheckpoint, open_compressed
from ..errors import InvalidProblem, QlinearError
from .convert import from_numpy
from .module import QLinear
from .swap import _leave_fast_paths, _naming

__all__ = ["load_compressed"]


def _classes(mod: nn.Module) -> tuple[str, ...]:
    # compressed-tensors matches a class target against every class in the MRO, and vLLM's
    # LinearBase counts as "Linear".
    names = tuple(c.__name__ for c in type(mod).__mro__ if issubclass(c, nn.Module))
    return names + (("Linear",) if "LinearBase" in names else ())


def _prefix_map(model: nn.Module, keys: set[str], names: list[str]) -> tuple[str, str]:
    """``(strip, add)``: how checkpoint names become model names. Transformers saves a
    model with a head under its base model's prefix (``bert.encoder...``) while the base
    model's own names lack it, and the other way round."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return "", ""
    p = prefix + "."

    def hits(strip: str, add: str) -> int:
        return sum(add + n[len(strip):] in keys for n in names if n.startswith(strip))

    best = max([("", ""), (p, ""), ("", p)], key=lambda sa: hits(*sa))
    return best if hits(*best) > hits("", "") else ("", "")


def load_compressed(model: nn.Module, path: str | os.PathLike[str],
                    backend: None | str | Backend = None) -> int:
    """Load the compressed-tensors checkpoint at ``path`` into ``model``; return how many
    linears were swapped for :class:`QLinear`.

    ``model`` is the float architecture (for example transformers'
    ``AutoModel.from_config(config)``); ``path`` a folder with ``config.json`` and
    ``*.safetensors`` (sharded with ``model.safetensors.index.json`` too), as
    llm-compressor writes it (format ``int-quantized``, see :mod:`qlinear.checkpoint`).
    Every ``nn.Linear`` that the checkpoint's config quantizes (its targets, less
    ``ignore``) becomes a QLinear holding the checkpoint's own int8 weight, scales and
    activation scheme (never re-quantized); every other tensor of the checkpoint is
    copied into the model's parameter or buffer of that name (converted to its dtype).

    Everything is checked before the model changes: a config qlinear does not run is
    :class:`qlinear.Unsupported` naming the field; a missing, unexpected or misshapen
    tensor is :class:`qlinear.InvalidProblem` naming it. Parameters tied to another one
    (shared tensors, such as a head tied to the embeddings) need only one of their names
    in the checkpoint. A checkpoint saved with a head (``bert.encoder...``) loads into the
    base model (``encoder...``), its head's tensors left out, as transformers does.
    """
    if not isinstance(model, nn.Module):
        raise InvalidProblem(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        _get_backend(backend)
    ckpt = open_compressed(path)
    state = model.state_dict(keep_vars=True)
    strip, add = _prefix_map(model, set(state), ckpt.tensor_names)
    # checkpoint name -> model name; with a stripped prefix, names outside it are a head's.
    to_model = {n: add + n[len(strip):] for n in ckpt.tensor_names if n.startswith(strip)}
    swaps, used = _plan_swaps(model, ckpt, to_model, backend)
    copies = _plan_copies(ckpt, state, to_model, used, {name for name, _, _, _ in swaps})
    with torch.no_grad():
        for _, parent, attr, q in swaps:
            setattr(parent, attr, q)
        for target, value in copies:
            target.copy_(value)
    made = {id(q) for _, _, _, q in swaps}
    if made:
        _leave_fast_paths(model, made)
    return len(made)


_Swap = tuple[str, nn.Module, str, QLinear]  # (module name, parent, attribute, new module)


def _plan_swaps(model: nn.Module, ckpt: CompressedCheckpoint, to_model: dict[str, str],
                backend: Any) -> tuple[list[_Swap], set[str]]:
    """The QLinear for every linear the checkpoint quantizes, built (and so checked), and
    the checkpoint names they use. A linear shared by two parents becomes one QLinear."""
    from_model = {m: c for c, m in to_model.items()}
    quantized = {to_model.get(n + ".weight_scale", "")[: -len(".weight_scale")]
                 for n in ckpt.quantized_names()}
    swaps: list[_Swap] = []
    used: set[str] = set()
    made: dict[int, QLinear] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        group = ckpt.group_for(name, _classes(mod)) if isinstance(mod, nn.Linear) else None
        if group is None:
            if name in quantized:
                raise InvalidProblem(
                    f"tensor {from_model[name + '.weight_scale']!r}: expected quantized "
                    f"layers only at nn.Linear modules that a config group targets and "
                    f"ignore does not, got {type(mod).__name__} {name!r}")
            continue
        cname = from_model.get(name + ".weight_scale", "")[: -len(".weight_scale")]
        if not cname:
            raise InvalidProblem(
                f"tensor {name + '.weight_scale'!r}: expected in the checkpoint (config "
                f"group {group.name!r} quantizes nn.Linear {name!r}), got no such tensor")
        spec = ckpt.layer_spec(cname, group)
        want = (mod.out_features, mod.in_features)
        if spec.weight_q.shape != want:
            raise InvalidProblem(
                f"tensor {cname + '.weight'!r}: expected shape {list(want)} (the model's "
                f"{name!r}), got {list(spec.weight_q.shape)}")
        if (spec.bias is None) != (mod.bias is None):
            raise InvalidProblem(
                f"tensor {cname + '.bias'!r}: expected "
                f"{'no such tensor' if mod.bias is None else 'one'} (the model's {name!r} "
                f"has {'no ' if mod.bias is None else 'a '}bias), got "
                f"{'none' if spec.bias is None else 'one'}")
        q = made.get(id(mod))
        if q is None:
            try:
                q = QLinear.from_quantized(spec.weight_q, spec.weight_scale, spec.bias,
                                           backend=backend, device=mod.weight.device,
                                           **spec.scheme_arguments())
            except QlinearError as e:
                raise _naming(e, name) from e
            q.train(mod.training)
            made[id(mod)] = q
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        swaps.append((name, parent, attr, q))
        used.update(ckpt.layer_names(cname))
    return swaps, used


def _plan_copies(ckpt: CompressedCheckpoint, state: dict[str, torch.Tensor],
                 to_model: dict[str, str], used: set[str],
                 swapped: set[str]) -> list[tuple[torch.Tensor, Any]]:
    """``(model tensor, checkpoint value)`` for every tensor outside the swapped linears
    (module names ``swapped``), read and checked: none missing, none unexpected, shapes
    equal."""
    provided: dict[str, str] = {}
    for c, m in to_model.items():
        if c in used:
            continue
        if m not in state or m.rpartition(".")[0] in swapped:
            raise InvalidProblem(
                f"tensor {c!r}: expected only tensors the model has (as {m!r}), got one "
                f"it does not have")
        provided[m] = c
    # Tied parameters are one tensor under several names: one name in the file suffices.
    by_tensor: dict[int, list[str]] = {}
    for n, t in state.items():
        if n.rpartition(".")[0] not in swapped:
            by_tensor.setdefault(id(t), []).append(n)
    copies: list[tuple[torch.Tensor, Any]] = []
    for names in by_tensor.values():
        given = [n for n in names if n in provided]
        if not given:
            raise InvalidProblem(
                f"tensor {names[0]!r}: expected in the checkpoint (the model has it), got no "
                f"such tensor")
        for n in given:
            c, target = provided[n], state[n]
            dtype, shape = ckpt.stored(c)
            if tuple(shape) != tuple(target.shape):
                raise InvalidProblem(
                    f"tensor {c!r}: expected shape {list(target.shape)} (the model's {n!r}), "
                    f"got {list(shape)}")
            if dtype.startswith(("F", "BF")) != target.is_floating_point():
                raise InvalidProblem(
                    f"tensor {c!r}: expected a {target.dtype} tensor (the model's {n!r}), "
                    f"got {dtype}")
            copies.append((target.data, from_numpy(ckpt.tensor(c))))
    return copies

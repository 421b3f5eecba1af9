"""Find the kernel sources (``shaders/*.wgsl``, ``cuda/*.cu[h]``) in the wheel or the source tree.

In a wheel they sit inside the package (``qlinear/shaders``, ``qlinear/cuda``); in a
source checkout run with ``PYTHONPATH=.`` they are the top-level folders.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidProblem

if TYPE_CHECKING:
    from importlib.abc import Traversable

__all__ = ["resource_dir", "read_source", "list_sources"]

_KINDS = ("shaders", "cuda")


@functools.cache
def resource_dir(kind: str) -> Traversable:
    """The folder holding ``kind`` (``"shaders"`` or ``"cuda"``) sources, as a Traversable."""
    if kind not in _KINDS:
        raise InvalidProblem(f"kind: expected one of {_KINDS}, got {kind!r}")
    packaged = resources.files("qlinear") / kind
    if packaged.is_dir():
        return packaged
    tree = Path(__file__).resolve().parent.parent / kind
    if tree.is_dir():
        return tree
    raise FileNotFoundError(f"qlinear's {kind}/ folder is neither in the package nor beside it")


def list_sources(kind: str) -> list[str]:
    """File names in the ``kind`` folder."""
    return sorted(p.name for p in resource_dir(kind).iterdir() if p.is_file())


@functools.cache
def read_source(kind: str, name: str) -> str:
    """The text of one kernel source file (cached)."""
    path = resource_dir(kind) / name
    if not path.is_file():
        raise FileNotFoundError(f"{kind}/{name}: no such kernel source")
    return path.read_text(encoding="utf-8")

"""A plan's memory of the arguments it checked last: a call with the same arguments gets
the same bundle without the checks being derived again, and nothing is kept alive.

What :func:`qlinear.validate.check_args` reads of each argument is compared instead:

1. a backend :class:`~qlinear.Tensor` is immutable, so it is the same argument when it
   is the same object: a weak reference to last call's tensor must give this one back;
2. a plain writable numpy array (what the cpu backend wraps) is the same argument when
   its identity, shape, strides, dtype and address are; its wrapper is rebuilt over the
   array in hand from last call's (same metadata, no checks), so no array is held;
3. None and host numbers (the static schemes' scale and zero point) compare by type and
   value, and give last call's normalised value;
4. anything else (a torch or CuPy tensor, a read-only or subclassed array, whose
   contents or metadata can change behind a fingerprint) is checked every time.

A read-only array is left out because its wrapper is marked read-only, and a backend
may keep data derived from the contents of read-only tensors; the caller can still make
the array writable, change it and make it read-only again.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from .tensors import Tensor

__all__ = ["CheckCache"]

_TENSOR, _ARRAY, _VALUE = 0, 1, 2


def _array_print(a: np.ndarray) -> tuple[Any, ...]:
    return (id(a), a.shape, a.strides, a.dtype, a.__array_interface__["data"][0])


class CheckCache:
    """The last checked arguments of one plan (see the module docstring). Thread-safe:
    an entry is replaced whole, and a lookup reads it once."""

    def __init__(self, names: tuple[str, ...], bundle: type):
        self._names = names
        self._bundle = bundle
        self._last: tuple[tuple[Any, ...], ...] | None = None

    def get(self, args: Any) -> Any | None:
        """The bundle for ``args`` if they are last call's, else None."""
        last = self._last
        if last is None:
            return None
        values = []
        for name, (kind, mark, value) in zip(self._names, last):
            obj = getattr(args, name)
            if kind == _TENSOR:
                if mark() is not obj:
                    return None
                values.append(obj)
            elif kind == _ARRAY:
                if type(obj) is not np.ndarray or not obj.flags.writeable \
                        or _array_print(obj) != mark:
                    return None
                values.append(value.rehandled(obj))
            else:
                if (type(obj), obj) != mark:
                    return None
                values.append(value)
        return self._bundle(*values)

    def put(self, args: Any, bundle: Any) -> None:
        """Remember ``bundle``, just checked for ``args`` (or forget, where some argument
        is of a kind that must be checked every time)."""
        entry: list[tuple[int, Any, Any]] = []
        for name in self._names:
            obj, value = getattr(args, name), getattr(bundle, name)
            kind = type(obj)
            if kind is Tensor:
                entry.append((_TENSOR, weakref.ref(obj), None))
            elif kind is np.ndarray and obj.flags.writeable and type(value) is Tensor:
                entry.append((_ARRAY, _array_print(obj), value.rehandled(None)))
            elif obj is None or kind in (int, float, bool):
                entry.append((_VALUE, (kind, obj), value))
            else:
                self._last = None
                return
        self._last = tuple(entry)

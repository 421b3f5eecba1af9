"""The text NVRTC compiles: a ``cuda/`` source with qlinear's own headers inlined."""

from __future__ import annotations

import functools
import re

from ...resources import read_source

__all__ = ["expand_source"]

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


@functools.cache
def expand_source(name: str) -> str:
    """The text of ``cuda/<name>`` with its local ``#include "..."`` headers inlined
    (once each, with ``#line`` markers so compiler messages name the right file).

    NVRTC then needs no include path for qlinear's own headers, and the text is
    exactly what the cache key hashes."""
    return _expand(name, set())


def _expand(name: str, seen: set[str]) -> str:
    out = []
    for number, line in enumerate(read_source("cuda", name).splitlines(), 1):
        m = _INCLUDE.match(line)
        if m:
            header = m.group(1)
            if header not in seen:
                seen.add(header)
                out.append(f'#line 1 "{header}"')
                out.append(_expand(header, seen))
            out.append(f'#line {number + 1} "{name}"')
            continue
        out.append("" if line.strip() == "#pragma once" else line)
    return "\n".join(out) + "\n"

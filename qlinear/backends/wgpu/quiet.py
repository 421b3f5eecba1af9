"""Opening an adapter without printing anything.

On Linux, requesting an adapter makes wgpu probe the window systems: libwayland then
prints "error: XDG_RUNTIME_DIR is invalid or not set in the environment." to stderr when
that variable is unset (as on servers, in containers, under cron) or not an absolute
path. It is read only while the instance and adapter are made. So, around adapter and
device creation only, :func:`quiet_creation` points it at an empty private directory
(mode 0700, made for the occasion and removed after) and then restores the environment
exactly as it was: the caller's other libraries never see the change. A value that is
already set is left alone.

wgpu-native's own log lines go through the Python logger ``"wgpu"``; those that adapter
enumeration emits at warning level and below that are known driver noise (a window
system or EGL platform missing, an adapter hidden as not Vulkan-compliant) are passed to
the ``"qlinear.wgpu"`` logger at debug level instead while creation runs. Errors, and
anything else, reach the user's logging configuration unchanged.

The environment is process-wide: creations take a lock, so that two threads creating
backends at once cannot restore each other's value; another thread reading the
environment at that moment sees the private directory, as a window-system probe there
would need anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator

__all__ = ["quiet_creation", "private_runtime_dir", "DriverNoise", "NOISE"]

_VAR = "XDG_RUNTIME_DIR"

#: Messages of wgpu's logger, at warning level or below, that adapter enumeration emits
#: on machines without a display or without some driver: not the user's problem.
NOISE = re.compile("|".join((
    r"XDG_RUNTIME_DIR",
    r"\bEGL\b|libEGL|EGL_",
    r"surfaceless|windowing system|[Ww]ayland|\bX11\b|\bxcb\b|\bXlib\b",
    r"not Vulkan compliant|non-conformant|not a conformant",
    r"[Uu]nable to (find|open|load) (layer|extension|library)",
    r"Optimus",
)))

_log = logging.getLogger("qlinear.wgpu")
# One creation at a time: each restores the environment it found.
_lock = threading.RLock()


class DriverNoise(logging.Filter):
    """Drops :data:`NOISE` records of warning level and below from the logger it filters,
    re-logging them on ``"qlinear.wgpu"`` at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for driver noise, True for everything else."""
        if record.levelno > logging.WARNING or not NOISE.search(record.getMessage()):
            return True
        _log.debug("wgpu (driver noise during adapter creation): %s", record.getMessage())
        return False


@contextlib.contextmanager
def private_runtime_dir() -> Iterator[None]:
    """On Linux and the BSDs, with ``XDG_RUNTIME_DIR`` unset or not an absolute path:
    set it to a new empty 0700 directory for the block, then restore the previous
    state and remove the directory. Elsewhere, or when it is set, nothing changes."""
    old = os.environ.get(_VAR)
    if sys.platform in ("darwin", "win32", "cygwin") or (old and old.startswith("/")):
        yield
        return
    path = tempfile.mkdtemp(prefix="qlinear-runtime-")  # mode 0700, never shared
    os.environ[_VAR] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_VAR, None)
        else:
            os.environ[_VAR] = old
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def quiet_creation() -> Iterator[None]:
    """Adapter and device creation without window-system errors on stderr or driver
    noise through logging (see the module's docstring); nothing outlives the block."""
    wgpu_log = logging.getLogger("wgpu")
    noise = DriverNoise()
    with _lock:
        wgpu_log.addFilter(noise)
        try:
            with private_runtime_dir():
                yield
        finally:
            wgpu_log.removeFilter(noise)

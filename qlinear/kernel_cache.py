"""The verified cache of compiled kernels: in memory, and on disk in ``$QLINEAR_CACHE_DIR``.

A compiled kernel module (a cubin, the map from name expressions to mangled symbols,
and the compiler log) is stored under a *key*: the SHA-256 of everything that can
change the binary (source text including headers, compiler options, target
architecture, compiler version). Nothing here knows about CUDA: a backend supplies the
key parts and a function that compiles.

On disk each entry is one file, ``<dir>/kernels-v1/<key>.qlk``::

    magic      b"QLINEAR-KC\\x01\\n"
    length     8 bytes, little-endian: size of the JSON header
    header     JSON: format, key, key parts, symbols, log, payload size
    payload    the binary
    digest     SHA-256 of everything above (32 bytes)

Entries are written to a temporary file in the same folder (``.<key prefix>.*.tmp``)
and renamed over the final name (``os.replace``, atomic), so a reader sees an old entry,
a new one or none, never half of one; several processes compiling the same kernel at
once each rename a complete file and the last one stays. A file that is truncated,
altered, written for another key or in another format fails verification and is
compiled again (and rewritten), never loaded.

An entry is a regular file of bounded size (at most ``_MAX_ENTRY``, 256 MiB; its header
at most 16 MiB): anything else at an entry's path (a FIFO, a device, a directory, a
symlink, which is never followed) is ignored and rebuilt, without blocking on it or
reading past the size the file had when opened. A header that parses to something this
module never writes (fields of the wrong types, JSON nested too deep to parse) is damage
like any other. A temporary file older than ``_STALE_TMP_S`` (10 minutes; a writer's
lives milliseconds) was left by a writer that died before its rename: it is removed when
the cache is opened or written. A writer stalled past that loses only its own write.

``QLINEAR_CACHE_DIR`` picks the folder (default ``~/.cache/qlinear``); ``off`` keeps the
cache in memory only. A folder that cannot be written is read-only for the cache,
never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CacheEntry",
    "KernelCache",
    "cache_dir",
    "default_cache",
    "make_key",
    "ENV_VAR",
]

#: The environment variable naming the cache folder (``off`` disables the disk).
ENV_VAR = "QLINEAR_CACHE_DIR"
_FORMAT = 1
_MAGIC = b"QLINEAR-KC\x01\n"
_LEN = struct.Struct("<Q")
_DIGEST = 32
_SUBDIR = f"kernels-v{_FORMAT}"
# A header beyond this is not one we wrote: refuse before parsing it.
_MAX_HEADER = 16 << 20
# An entry file beyond this is not one we wrote (cubins are a few MiB): not read.
_MAX_ENTRY = 256 << 20
# A temporary file untouched for this long belongs to a writer that died.
_STALE_TMP_S = 600.0
_TMP_NAME = re.compile(r"\.[0-9a-f]{16}\..+\.tmp")
# Opening never blocks (a FIFO) and never follows a final symlink, where the OS can say so.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


@dataclass(frozen=True)
class CacheEntry:
    """One compiled module.

    Attributes:
        key: the cache key (hex SHA-256 of ``parts``).
        binary: the compiled code (a cubin).
        symbols: name expression -> mangled symbol, as the compiler reported them.
        log: the compiler's log (for CUDA: ptxas register and spill report).
        parts: the key parts the entry was built for.
        source: where it came from: ``"compiled"``, ``"memory"`` or ``"disk"``.
    """

    key: str
    binary: bytes
    symbols: Mapping[str, str] = field(default_factory=dict)
    log: str = ""
    parts: Mapping[str, object] = field(default_factory=dict)
    source: str = "compiled"


def make_key(parts: Mapping[str, object]) -> str:
    """The cache key of ``parts``: SHA-256 over their canonical JSON (sorted keys)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_dir() -> Path | None:
    """The disk cache folder from ``$QLINEAR_CACHE_DIR`` (default ``~/.cache/qlinear``),
    or None when it is ``off``."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() == "off":
        return None
    if not value:
        return Path.home() / ".cache" / "qlinear"
    return Path(value).expanduser()


def _encode(entry: CacheEntry) -> bytes:
    header = json.dumps({
        "format": _FORMAT,
        "key": entry.key,
        "parts": dict(entry.parts),
        "symbols": dict(entry.symbols),
        "log": entry.log,
        "size": len(entry.binary),
    }, sort_keys=True, default=str).encode("utf-8")
    body = _MAGIC + _LEN.pack(len(header)) + header + bytes(entry.binary)
    return body + hashlib.sha256(body).digest()


def _decode(data: bytes, key: str) -> CacheEntry | None:
    """The entry in ``data`` if it verifies as an entry for ``key``, else None."""
    fixed = len(_MAGIC) + _LEN.size
    if len(data) < fixed + _DIGEST or not data.startswith(_MAGIC):
        return None
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        return None
    (hlen,) = _LEN.unpack_from(body, len(_MAGIC))
    if hlen > _MAX_HEADER or fixed + hlen > len(body):
        return None
    try:
        header = json.loads(body[fixed:fixed + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None  # RecursionError: nesting too deep for the parser, not ours either
    if not isinstance(header, dict) or header.get("format") != _FORMAT or header.get("key") != key:
        return None
    binary = body[fixed + hlen:]
    size = header.get("size")
    if type(size) is not int or size != len(binary):
        return None
    symbols = header.get("symbols")
    parts = header.get("parts")
    log = header.get("log", "")
    if not isinstance(symbols, dict) or not isinstance(parts, dict) or not isinstance(log, str):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in symbols.items()):
        return None
    return CacheEntry(key, binary, symbols, log, parts, "disk")


def _read_regular(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a followed symlink, FIFO, device
    or directory) of at most ``_MAX_ENTRY`` bytes; None otherwise. Never blocks, and never
    reads past the size the file had when opened."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)  # the file opened, which may not be the one lstat saw
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_ENTRY:
            return None
        chunks = []
        left = st.st_size + 1  # one byte more shows a file that grew: not a finished entry
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        return data if len(data) == st.st_size else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _remove_stale_tmp(folder: Path) -> None:
    """Remove the temporary files of writers that died before their rename: ours by name,
    untouched for ``_STALE_TMP_S``. Errors (another process removing them too) ignored."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    deadline = time.time() - _STALE_TMP_S
    for name in names:
        if not _TMP_NAME.fullmatch(name):
            continue
        p = folder / name
        try:
            if os.lstat(p).st_mtime < deadline:
                os.unlink(p)
        except OSError:
            pass


class KernelCache:
    """Compiled kernels by key, in memory and (unless ``directory`` is None) on disk.

    Thread-safe; concurrent processes share the disk folder safely. Opening the cache
    removes the temporary files that writers which died left behind.

    Args:
        directory: the folder of the disk cache, or None for memory only.
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.directory: Path | None = None if directory is None else Path(directory)
        if self.directory is not None:
            _remove_stale_tmp(self.directory / _SUBDIR)
        self._memory: dict[str, CacheEntry] = {}
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        #: Counters: ``hits_memory``, ``hits_disk``, ``compiles``, ``rejected`` (bad files
        #: found on disk), ``write_errors``.
        self.stats = {"hits_memory": 0, "hits_disk": 0, "compiles": 0, "rejected": 0,
                      "write_errors": 0}

    def path(self, key: str) -> Path | None:
        """Where the entry of ``key`` lives on disk (None without a disk cache)."""
        if self.directory is None:
            return None
        return self.directory / _SUBDIR / f"{key}.qlk"

    def get(self, key: str) -> CacheEntry | None:
        """The verified entry of ``key`` from memory or disk, or None."""
        entry = self._memory.get(key)
        if entry is not None:
            self.stats["hits_memory"] += 1
            return entry
        entry = self._read(key)
        if entry is not None:
            self.stats["hits_disk"] += 1
            with self._lock:
                self._memory[key] = entry
        return entry

    def put(self, entry: CacheEntry) -> None:
        """Keep ``entry`` in memory and write it to disk (atomically; errors ignored)."""
        with self._lock:
            self._memory[entry.key] = entry
        self._write(entry)

    def get_or_build(self, parts: Mapping[str, object],
                     build: Callable[[], tuple]) -> CacheEntry:
        """The entry for ``parts``; on a miss ``build()`` returns ``(binary, symbols, log)``,
        which is stored. Only one thread of this process builds a given key at a time."""
        key = make_key(parts)
        entry = self.get(key)
        if entry is not None:
            return entry
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            entry = self._memory.get(key)
            if entry is not None:
                return entry
            binary, symbols, log = build()
            self.stats["compiles"] += 1
            entry = CacheEntry(key, bytes(binary), dict(symbols or {}), log or "", dict(parts))
            self.put(entry)
            return entry

    def clear_memory(self) -> None:
        """Forget the in-memory entries (the disk keeps its own)."""
        with self._lock:
            self._memory.clear()

    def _read(self, key: str) -> CacheEntry | None:
        path = self.path(key)
        if path is None or not os.path.lexists(path):
            return None
        data = _read_regular(path)
        entry = None if data is None else _decode(data, key)
        if entry is None:
            self.stats["rejected"] += 1
        return entry

    def _write(self, entry: CacheEntry) -> None:
        path = self.path(entry.key)
        if path is None:
            return
        data = _encode(entry)
        if len(data) > _MAX_ENTRY:
            return  # a reader would refuse it: kept in memory only
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{entry.key[:16]}.", suffix=".tmp",
                                       dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            tmp = None
        except OSError:
            self.stats["write_errors"] += 1
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        _remove_stale_tmp(path.parent)

    def __repr__(self) -> str:
        where = "memory only" if self.directory is None else str(self.directory)
        return f"<KernelCache {where}: {len(self._memory)} in memory>"


_defaults: dict[Path | None, KernelCache] = {}
_defaults_lock = threading.Lock()


def default_cache() -> KernelCache:
    """The process-wide cache for the folder ``$QLINEAR_CACHE_DIR`` names right now."""
    directory = cache_dir()
    with _defaults_lock:
        cache = _defaults.get(directory)
        if cache is None:
            cache = _defaults[directory] = KernelCache(directory)
        return cache

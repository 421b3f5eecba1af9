"""The verified kernel cache (:mod:`qlinear.kernel_cache`), without a GPU.

Entries round-trip through memory and disk; files that are truncated, altered, foreign
or garbage are rejected and rebuilt, never loaded; ``QLINEAR_CACHE_DIR=off`` keeps the
disk untouched; several processes building the same kernel at once leave one valid
entry; and the CUDA compile path really goes through the cache.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from qlinear import kernel_cache as kc
from qlinear.kernel_cache import CacheEntry, KernelCache, make_key

PARTS = {"kind": "test", "source": "x.cu", "arch": "sm_90a", "nvrtc": [13, 5],
         "options": {"std": "c++17"}}


def payload(seed: int = 0, size: int = 4096) -> bytes:
    blocks = [hashlib.sha256(str(seed).encode()).digest()]
    while 32 * len(blocks) < size:
        blocks.append(hashlib.sha256(blocks[-1]).digest())
    return b"".join(blocks)[:size]


class Builder:
    def __init__(self, binary=None):
        self.calls = 0
        self.binary = binary if binary is not None else payload()

    def __call__(self):
        self.calls += 1
        return self.binary, {"k<float>": "_Z1kIfEvv"}, "ptxas info: 0 bytes spill stores"


def test_make_key_is_canonical_and_sensitive():
    assert make_key({"a": 1, "b": [1, 2]}) == make_key({"b": [1, 2], "a": 1})
    assert make_key(PARTS) != make_key({**PARTS, "arch": "sm_80"})
    assert make_key(PARTS) != make_key({**PARTS, "nvrtc": [13, 6]})
    assert len(make_key(PARTS)) == 64


def test_round_trip_memory_and_disk(tmp_path):
    build = Builder()
    cache = KernelCache(tmp_path)
    entry = cache.get_or_build(PARTS, build)
    assert build.calls == 1 and entry.source == "compiled"
    assert cache.get_or_build(PARTS, build) is entry and build.calls == 1
    path = cache.path(entry.key)
    assert path.is_file() and path.parent.parent == tmp_path
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    fresh = KernelCache(tmp_path)
    again = fresh.get_or_build(PARTS, build)
    assert build.calls == 1, "a verified disk entry must not be rebuilt"
    assert again.source == "disk" and fresh.stats["hits_disk"] == 1
    assert again.binary == entry.binary
    assert dict(again.symbols) == {"k<float>": "_Z1kIfEvv"}
    assert again.log == entry.log and dict(again.parts) == PARTS


def _corrupt_truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _corrupt_flip_payload(data: bytes) -> bytes:
    b = bytearray(data)
    b[-100] ^= 0x01
    return bytes(b)


def _corrupt_flip_header(data: bytes) -> bytes:
    b = bytearray(data)
    i = data.index(b'"_Z1kIfEvv"') + 3
    b[i] ^= 0x02
    return bytes(b)


def _corrupt_append(data: bytes) -> bytes:
    return data + b"\0"


def _corrupt_empty(data: bytes) -> bytes:
    return b""


def _corrupt_garbage(data: bytes) -> bytes:
    return os.urandom(len(data))


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_flip_payload, _corrupt_flip_header,
                                     _corrupt_append, _corrupt_empty, _corrupt_garbage])
def test_bad_files_are_rebuilt_never_loaded(tmp_path, corrupt):
    good = KernelCache(tmp_path).get_or_build(PARTS, Builder())
    path = KernelCache(tmp_path).path(good.key)
    path.write_bytes(corrupt(path.read_bytes()))

    cache = KernelCache(tmp_path)
    assert cache.get(good.key) is None
    assert cache.stats["rejected"] == 1
    build = Builder()
    entry = cache.get_or_build(PARTS, build)
    assert build.calls == 1 and entry.source == "compiled"
    # ... and the rebuilt entry replaced the bad file.
    assert KernelCache(tmp_path).get(good.key).binary == good.binary


def test_foreign_file_is_rejected(tmp_path):
    cache = KernelCache(tmp_path)
    other = {**PARTS, "arch": "sm_80"}
    a = cache.get_or_build(PARTS, Builder(payload(1)))
    b = cache.get_or_build(other, Builder(payload(2)))
    # A valid entry, but for another key, sitting under this key's name.
    cache.path(a.key).write_bytes(cache.path(b.key).read_bytes())
    fresh = KernelCache(tmp_path)
    assert fresh.get(a.key) is None and fresh.stats["rejected"] == 1
    assert fresh.get(b.key).binary == payload(2)


def test_other_format_is_rejected(tmp_path):
    cache = KernelCache(tmp_path)
    entry = cache.get_or_build(PARTS, Builder())
    path = cache.path(entry.key)
    data = bytearray(path.read_bytes())
    data[len(b"QLINEAR-KC")] = 0x02  # a future format version
    body = bytes(data[:-32])
    path.write_bytes(body + hashlib.sha256(body).digest())
    assert KernelCache(tmp_path).get(entry.key) is None


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QLINEAR_CACHE_DIR", str(tmp_path / "c"))
    assert kc.cache_dir() == tmp_path / "c"
    assert kc.default_cache().directory == tmp_path / "c"
    monkeypatch.setenv("QLINEAR_CACHE_DIR", "off")
    assert kc.cache_dir() is None
    monkeypatch.setenv("QLINEAR_CACHE_DIR", "OFF")
    assert kc.cache_dir() is None
    monkeypatch.delenv("QLINEAR_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kc.cache_dir() == tmp_path / "home" / ".cache" / "qlinear"


def test_off_touches_no_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("QLINEAR_CACHE_DIR", "off")
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = kc.default_cache()
    assert cache.directory is None and cache.path("0" * 64) is None
    build = Builder()
    entry = cache.get_or_build({**PARTS, "unique": str(tmp_path)}, build)
    assert cache.get(entry.key) is entry and build.calls == 1
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_not_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = KernelCache(blocker)
    entry = cache.get_or_build(PARTS, Builder())
    assert entry.binary == payload() and cache.stats["write_errors"] == 1
    assert cache.get(entry.key) is entry  # memory still works


def _build_in_process(directory, barrier, results, seed):
    barrier.wait()

    def build():
        time.sleep(0.05)  # widen the race window
        return payload(7, 1 << 20), {"k": "_Z1kv"}, f"built by {seed}"

    entry = KernelCache(directory).get_or_build(PARTS, build)
    results.put(hashlib.sha256(entry.binary).hexdigest())


def test_concurrent_processes_leave_one_valid_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    n = 6
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path), barrier, results, i))
             for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    digests = {results.get(timeout=10) for _ in range(n)}
    assert digests == {hashlib.sha256(payload(7, 1 << 20)).hexdigest()}
    files = list((tmp_path / "kernels-v1").iterdir())
    assert [f.name for f in files] == [f"{make_key(PARTS)}.qlk"], files
    entry = KernelCache(tmp_path).get(make_key(PARTS))
    assert entry is not None and entry.binary == payload(7, 1 << 20)
    assert entry.log.startswith("built by ")


def test_threads_build_a_key_once(tmp_path):
    import threading

    build = Builder()
    cache = KernelCache(tmp_path)
    slow = lambda: (time.sleep(0.05), build())[1]  # noqa: E731
    threads = [threading.Thread(target=cache.get_or_build, args=(PARTS, slow)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build.calls == 1


def test_entry_is_immutable():
    e = CacheEntry("k", b"x")
    with pytest.raises(Exception):  # noqa: B017 - any refusal shows it immutable
        e.binary = b"y"


def test_cuda_compiles_go_through_the_cache(tmp_path, monkeypatch):
    qc = pytest.importorskip("qlinear.backends.cuda")
    try:
        qc.nvrtc_version()
    except Exception as e:
        pytest.skip(f"NVRTC unavailable: {e}")
    monkeypatch.setenv("QLINEAR_CACHE_DIR", str(tmp_path))
    from qlinear.dtypes import f16

    spec = qc.act_spec(f16, True, True)
    opts = qc.CompileOptions("sm_80")
    first = qc.compile_module(spec.source, [spec.name_expression], opts)
    assert first.source == "compiled"
    assert spec.name_expression in first.symbols
    assert first.binary[:4] == b"\x7fELF"
    assert dict(first.parts)["nvrtc"] == list(qc.nvrtc_version())
    # A new process would find it on disk: simulate with a fresh cache object.
    fresh = KernelCache(tmp_path)
    monkeypatch.setattr(qc.compile, "default_cache", lambda: fresh)
    again = qc.compile_module(spec.source, [spec.name_expression], opts)
    assert again.source == "disk" and again.binary == first.binary
    assert dict(again.symbols) == dict(first.symbols)
    # Another architecture is another key.
    other = qc.compile_module(spec.source, [spec.name_expression], qc.CompileOptions("sm_86"))
    assert other.key != first.key and other.source == "compiled"
    assert len(list(Path(tmp_path, "kernels-v1").glob("*.qlk"))) == 2

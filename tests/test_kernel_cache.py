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


# -- entries that are not what a writer leaves: ignored and rebuilt, never a hang ------

def _run_isolated(tmp_path, script: str, timeout: float = 30) -> str:
    """Run ``script`` in a fresh interpreter limited to 2 GiB of address space, so that a
    regression that blocks or reads without limit fails this test instead of hanging or
    exhausting the suite. Returns its stdout."""
    import subprocess
    import sys
    import textwrap

    prelude = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    """)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "QLINEAR_CACHE_DIR": str(tmp_path)}
    try:
        r = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)],
                           capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=Path(__file__).parent)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the cache read did not return within {timeout} s")
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


_REBUILD = """
    from qlinear.kernel_cache import KernelCache, make_key
    import test_kernel_cache as t

    cache = KernelCache({directory!r})
    key = make_key(t.PARTS)
    assert cache.get(key) is None
    print(cache.stats["rejected"])
    build = t.Builder()
    entry = cache.get_or_build(t.PARTS, build)
    assert build.calls == 1 and entry.source == "compiled"
"""


def _assert_rebuilt_as_a_file(tmp_path):
    path = KernelCache(tmp_path).path(make_key(PARTS))
    assert path.is_file() and not path.is_symlink()
    assert KernelCache(tmp_path).get(make_key(PARTS)).binary == payload()


def test_fifo_entry_does_not_hang(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: an entry path holding one
    is ignored (and replaced by the rebuilt entry), never waited on."""
    path = KernelCache(tmp_path).path(make_key(PARTS))
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    out = _run_isolated(tmp_path, _REBUILD.format(directory=str(tmp_path)))
    assert out.split() == ["1"]
    _assert_rebuilt_as_a_file(tmp_path)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_symlink_to_an_endless_file_is_not_followed(tmp_path):
    """A symlink to /dev/zero would be read forever: entries are regular files, never
    followed links, and the link is replaced by the rebuilt entry (its target untouched)."""
    path = KernelCache(tmp_path).path(make_key(PARTS))
    path.parent.mkdir(parents=True)
    os.symlink("/dev/zero", path)
    out = _run_isolated(tmp_path, _REBUILD.format(directory=str(tmp_path)))
    assert out.split() == ["1"]
    _assert_rebuilt_as_a_file(tmp_path)


def test_symlink_to_a_valid_entry_is_not_followed(tmp_path):
    """Even a link to a good entry is not an entry: only regular files are read."""
    good = KernelCache(tmp_path / "elsewhere").get_or_build(PARTS, Builder())
    target = KernelCache(tmp_path / "elsewhere").path(good.key)
    path = KernelCache(tmp_path).path(good.key)
    path.parent.mkdir(parents=True)
    os.symlink(target, path)
    cache = KernelCache(tmp_path)
    assert cache.get(good.key) is None and cache.stats["rejected"] == 1
    assert target.read_bytes()  # the target is left as it was


def test_directory_at_an_entry_path(tmp_path):
    path = KernelCache(tmp_path).path(make_key(PARTS))
    path.mkdir(parents=True)
    cache = KernelCache(tmp_path)
    build = Builder()
    entry = cache.get_or_build(PARTS, build)
    assert build.calls == 1 and entry.binary == payload()
    assert cache.stats["rejected"] == 1 and cache.stats["write_errors"] == 1


def _entry_bytes(header: bytes, binary: bytes = b"\x7fELF") -> bytes:
    """A file in the documented format around ``header`` (any bytes), with a valid digest:
    what a careless or hostile writer could leave."""
    body = kc._MAGIC + kc._LEN.pack(len(header)) + header + binary
    return body + hashlib.sha256(body).digest()


def _header(**changes) -> bytes:
    import json

    fields = {"format": 1, "key": make_key(PARTS), "parts": PARTS, "symbols": {"k": "_Z1kv"},
              "log": "", "size": 4} | changes
    return json.dumps(fields).encode()


DAMAGED_HEADERS = {
    "deeply-nested": b"[" * 200_000 + b"]" * 200_000,
    "deeply-nested-in-a-field": _header(log=None)[:-1] + b', "x": ' + b"[" * 200_000
    + b"]" * 200_000 + b"}",
    "symbols-not-strings": _header(symbols={"k": 5}),
    "symbols-a-list": _header(symbols=["k"]),
    "log-not-a-string": _header(log=["x"]),
    "size-a-bool": _header(size=True),
    "not-an-object": b"[1, 2]",
    "not-utf8": b"\xff\xfe",
}


@pytest.mark.parametrize("name", DAMAGED_HEADERS)
def test_damaged_header_is_rejected_not_raised(tmp_path, name):
    """A file whose digest holds but whose header is not one we write (nested too deep
    for the JSON parser, fields of the wrong types) is damaged: rejected and rebuilt."""
    cache = KernelCache(tmp_path)
    path = cache.path(make_key(PARTS))
    path.parent.mkdir(parents=True)
    path.write_bytes(_entry_bytes(DAMAGED_HEADERS[name]))
    assert cache.get(make_key(PARTS)) is None and cache.stats["rejected"] == 1
    build = Builder()
    assert cache.get_or_build(PARTS, build).binary == payload() and build.calls == 1
    assert KernelCache(tmp_path).get(make_key(PARTS)).binary == payload()


def test_header_that_verifies_is_loaded(tmp_path):
    """The hand-made format of the damaged-header cases is the real one: a good header
    in it loads (so the rejections above are for the header, not the framing)."""
    cache = KernelCache(tmp_path)
    path = cache.path(make_key(PARTS))
    path.parent.mkdir(parents=True)
    path.write_bytes(_entry_bytes(_header()))
    entry = cache.get(make_key(PARTS))
    assert entry is not None and entry.binary == b"\x7fELF" and entry.source == "disk"


def test_entry_beyond_the_size_cap_is_not_read(tmp_path, monkeypatch):
    """Entries are bounded: a file larger than the cap is refused without being read
    into memory (and a binary that large is kept in memory only)."""
    big = payload(3, 64 << 10)
    cache = KernelCache(tmp_path)
    entry = cache.get_or_build(PARTS, Builder(big))
    monkeypatch.setattr(kc, "_MAX_ENTRY", 32 << 10)
    fresh = KernelCache(tmp_path)
    assert fresh.get(entry.key) is None and fresh.stats["rejected"] == 1
    other = {**PARTS, "arch": "sm_75"}
    KernelCache(tmp_path).get_or_build(other, Builder(big))
    assert not KernelCache(tmp_path).path(make_key(other)).exists()


def _leftover(folder: Path, key: str, age_s: float) -> Path:
    """A temporary file as a writer killed between create and rename leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f".{key[:16]}.{os.getpid()}abc.tmp"
    p.write_bytes(b"half an entry")
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_stale_temporary_files_are_removed(tmp_path):
    """A killed writer's temporary file does not stay forever: one older than
    ``_STALE_TMP_S`` goes when the cache is next opened or written; a fresh one (a live
    writer's) and files that are not ours are left alone."""
    folder = tmp_path / "kernels-v1"
    stale = _leftover(folder, "a" * 64, kc._STALE_TMP_S + 60)
    fresh = _leftover(folder, "b" * 64, 0)
    foreign = folder / "notes.tmp"
    foreign.write_text("not the cache's")
    os.utime(foreign, (time.time() - 3600,) * 2)
    KernelCache(tmp_path)
    assert not stale.exists() and fresh.exists() and foreign.exists()

    cache = KernelCache(tmp_path)
    stale = _leftover(folder, "c" * 64, kc._STALE_TMP_S + 60)
    cache.get_or_build(PARTS, Builder())
    assert not stale.exists() and fresh.exists()
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".qlk") == \
        [f"{make_key(PARTS)}.qlk"]

"""qlinear prints nothing: importing it and creating every backend leaves stdout and
stderr empty at the file-descriptor level (what C libraries write included), with
``XDG_RUNTIME_DIR`` unset as on a server; the environment is as it was afterwards; and
driver noise that wgpu logs while an adapter is made is kept out of the user's logs."""

import logging
import os
import stat
import subprocess
import sys

import pytest

from qlinear.backends.wgpu import quiet

SCRIPT = """
import os, sys
import numpy as np
import qlinear as ql
ql.backend('wgpu'); ql.backend('cpu'); ql.backend()
if 'XDG_RUNTIME_DIR' in os.environ:
    sys.exit(3)
be = ql.backend('wgpu')
be.info()  # runs the dot4 probe
layer = ql.QuantizedLinear.from_float(np.ones((4, 8), np.float32), backend=be)
y = layer(np.ones((2, 8), np.float32))
if 'XDG_RUNTIME_DIR' in os.environ or y.shape != (2, 4):
    sys.exit(4)
"""


def test_import_and_backend_creation_print_nothing(wgpu_be, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(tmp_path)  # where the private runtime directory is made
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          timeout=120, cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    assert list(tmp_path.iterdir()) == []  # the private directory is gone


def test_the_runtime_dir_is_private_and_only_set_inside(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    with quiet.quiet_creation():
        path = os.environ["XDG_RUNTIME_DIR"]
        assert os.path.dirname(path) == str(tmp_path) and os.listdir(path) == []
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert "XDG_RUNTIME_DIR" not in os.environ and not os.path.exists(path)
    # Not an absolute path: replaced inside, given back as it was.
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative")
    with quiet.quiet_creation():
        assert os.environ["XDG_RUNTIME_DIR"].startswith(str(tmp_path))
    assert os.environ["XDG_RUNTIME_DIR"] == "relative"
    # A usable value is the user's: left alone.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with quiet.quiet_creation():
        assert os.environ["XDG_RUNTIME_DIR"] == str(tmp_path)
    assert os.environ["XDG_RUNTIME_DIR"] == str(tmp_path) and os.listdir(tmp_path) == []


def test_the_environment_is_restored_when_creation_fails(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    with pytest.raises(RuntimeError, match="no adapter"):
        with quiet.quiet_creation():
            raise RuntimeError("no adapter")
    assert "XDG_RUNTIME_DIR" not in os.environ


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen = []

    def emit(self, record):
        self.seen.append((record.levelname, record.getMessage()))


def test_driver_noise_is_kept_out_of_the_users_logs_during_creation_only(caplog):
    wgpu_log = logging.getLogger("wgpu")
    records = _Records()
    wgpu_log.addHandler(records)
    noise = "EGL_MESA_platform_surfaceless not available. Using default platform"
    try:
        with caplog.at_level(logging.DEBUG, logger="qlinear.wgpu"):
            with quiet.quiet_creation():
                wgpu_log.warning(noise)
                wgpu_log.warning("Adapter is not Vulkan compliant, hiding adapter: llvmpipe")
                wgpu_log.warning("Device lost: something the user must see")
                wgpu_log.error("EGL context creation failed")  # errors always pass
        wgpu_log.warning(noise)  # after creation nothing is filtered
    finally:
        wgpu_log.removeHandler(records)
    assert records.seen == [("WARNING", "Device lost: something the user must see"),
                            ("ERROR", "EGL context creation failed"), ("WARNING", noise)]
    routed = [r.getMessage() for r in caplog.records if r.name == "qlinear.wgpu"]
    assert len(routed) == 2 and noise in routed[0] and "Vulkan compliant" in routed[1]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "qlinear.wgpu")
    assert wgpu_log.filters == []

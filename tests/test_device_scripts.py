"""The prepared GPU-machine scripts stay runnable: tried here on the backends we have."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_device_check_script_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_check.sh")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_device_check_names_files_that_exist():
    """The GPU run gets one try: every test file or script it names must be there."""
    text = (ROOT / "benchmarks" / "device_check.sh").read_text()
    names = set(re.findall(r"\b((?:tests|benchmarks)/[\w*]+\.(?:py|sh))", text))
    assert len(names) >= 4
    missing = sorted(n for n in names if not list(ROOT.glob(n)))
    assert not missing, f"device_check.sh names files that do not exist: {missing}"


@pytest.mark.parametrize("backend", ["cpu"])
def test_sanitize_cases_run_and_check(backend):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sanitize_cases.py"),
                        "--backend", backend, "--quick"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all ok" in r.stdout and "BAD" not in r.stdout

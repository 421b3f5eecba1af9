"""The examples run, offline and quickly, and say what they promise."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(script, *args, timeout=180):
    env = dict(os.environ)
    # From the source tree (PYTHONPATH=.) as well as from an installed qlinear.
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + rest)
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_quantize_model_example(record_property):
    pytest.importorskip("torch", reason="examples/quantize_model.py needs torch: "
                                        "pip install torch==2.13.0")
    r = _run("quantize_model.py", "--runs", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    print("\n" + out)
    assert "swapped 10 nn.Linear" in out
    for row in ("median forward ms", "speed vs float", "cosine vs float", "state_dict MB"):
        assert row in out, out
    cos_min = float(re.search(r"cosine vs float, min / mean\s+1\s+([0-9.]+)", out).group(1))
    record_property("example_cosine_min", cos_min)
    assert cos_min > 0.99
    mb = re.search(r"state_dict MB\s+([0-9.]+)\s+([0-9.]+)", out)
    assert float(mb.group(2)) < float(mb.group(1))

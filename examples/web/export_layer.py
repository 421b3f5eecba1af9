"""Export one W8A8 quantized linear layer for the browser example (index.html).

Builds the layer (random float weights, or ``weight`` / ``bias`` / ``activation`` arrays
from an .npz), quantizes its weight per output channel, exports the program the wgpu
backend would run for it on a browser adapter (WGSL composed for Dawn's Tint), and writes
``layer.json``: the program, the inputs as base64, and the cpu backend's output for them,
which the page compares with what the browser computes.

The adapter is described by ``--adapter-facts facts.json`` (the page shows its own
adapter's facts and offers them as a download). Without it the program is made for any
WebGPU adapter: a GPU with WebGPU's default limits (256 invocations per workgroup, 16 KiB
of workgroup memory, 128 MiB storage bindings), which every adapter offers, and no
optional feature (no ``shader-f16``: f16 is held two per u32 word; no ``subgroups``: the
reductions go through workgroup memory), so the same file runs in every WebGPU browser.

Run from the repository root:  python examples/web/export_layer.py [--m 4 --k 384 ...]
"""

from __future__ import annotations

import argparse
import base64
import json
import pathlib
import sys

import numpy as np

import qlinear as ql
from qlinear.backends.wgpu.choose import AdapterFacts
from qlinear.backends.wgpu.options import WgpuOptions
from qlinear.backends.wgpu.program import browser_facts, linear_program

HERE = pathlib.Path(__file__).resolve().parent

#: WebGPU's default limits (the ones the choosers read): every adapter has at least these.
DEFAULT_LIMITS = {
    "max-compute-invocations-per-workgroup": 256,
    "max-compute-workgroup-size-x": 256,
    "max-compute-workgroup-size-y": 256,
    "max-compute-workgroup-size-z": 64,
    "max-compute-workgroup-storage-size": 16384,
    "max-compute-workgroups-per-dimension": 65535,
    "max-storage-buffer-binding-size": 134217728,
    "max-buffer-size": 268435456,
    "min-storage-buffer-offset-alignment": 256,
}
DEFAULT_FACTS = {"vendor": "", "architecture": "", "device": "", "description": "",
                 "is_fallback": False, "features": [], "limits": DEFAULT_LIMITS}
DTYPES = {"f32": ql.f32, "f16": ql.f16, "bf16": ql.bf16}


def adapter_facts(facts: dict) -> tuple[AdapterFacts, dict]:
    """(AdapterFacts, limits) of a browser adapter, as the page's adapterFacts() gives it,
    with WebGPU's defaults for the limits it does not name."""
    limits = dict(DEFAULT_LIMITS, **facts.get("limits", {}))
    return browser_facts({**facts, "limits": limits}), limits


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=4, help="rows of the activation (tokens)")
    p.add_argument("--k", type=int, default=384, help="input features")
    p.add_argument("--n", type=int, default=1536, help="output features")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    p.add_argument("--scheme", choices=[s.value for s in ql.ActivationScheme],
                   default="dynamic", help="activation quantization scheme")
    p.add_argument("--bias", action="store_true", help="give the layer a random bias")
    p.add_argument("--weights", type=pathlib.Path,
                   help=".npz with 'weight' [N, K] floats, optional 'bias' [N] and "
                        "'activation' [M, K] (its shapes then override --m/--k/--n)")
    p.add_argument("--adapter-facts", type=pathlib.Path,
                   help="facts.json of the browser's adapter, as the page shows it")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.add_argument("--out", type=pathlib.Path, default=HERE / "layer.json")
    return p.parse_args(argv)


def layer_data(args, rng):
    """(x, w, bias) as float64 arrays: from --weights, else random."""
    if args.weights:
        with np.load(args.weights) as z:
            w = np.asarray(z["weight"], np.float64)
            bias = np.asarray(z["bias"], np.float64) if "bias" in z else None
            x = np.asarray(z["activation"], np.float64) if "activation" in z else None
        if x is None:
            x = rng.standard_normal((args.m, w.shape[1]))
        return x, w, bias
    w = rng.standard_normal((args.n, args.k)) / np.sqrt(args.k)
    x = rng.standard_normal((args.m, args.k))
    bias = rng.standard_normal(args.n) * 0.1 if args.bias else None
    return x, w, bias


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    dtype = DTYPES[args.dtype]
    scheme = ql.ActivationScheme(args.scheme)
    facts_doc = (json.loads(args.adapter_facts.read_text()) if args.adapter_facts
                 else DEFAULT_FACTS)
    facts, limits = adapter_facts(facts_doc)
    x64, w64, b64 = layer_data(args, rng)
    x = x64.astype(dtype.numpy)
    wq, ws = ql.quantize_weight(w64.astype(dtype.numpy))
    bias = None if b64 is None else b64.astype(dtype.numpy)
    m, k = x.shape
    n = wq.shape[0]
    scalars = {}
    if scheme.static:
        # A calibrated scale: the batch's own range (as a calibration pass would find it).
        lo, hi = float(x64.min()), float(x64.max())
        if scheme.static_zero_point:
            scalars = {"input_scale": (hi - lo) / 255, "input_zero_point":
                       int(np.clip(np.rint(-128 - lo / ((hi - lo) / 255)), -128, 127))}
        else:
            scalars = {"input_scale": max(abs(lo), abs(hi)) / 127}
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype, scheme=scheme)
    program = linear_program(desc, facts, WgpuOptions.from_limits(limits),
                             bias=bias is not None, target="tint", **scalars)
    arrays = {"activation": x, "weight_q": wq, "weight_scale": ws, "bias": bias}
    if scheme.asymmetric:
        arrays["weight_colsum"] = ql.weight_colsum(wq)
    # The expected output: the cpu backend's plan, on the same arguments.
    cpu = ql.backend("cpu")
    plan = ql.QuantizedLinearPlan.select(cpu, desc)
    y = np.empty((m, n), dtype.numpy)
    extra = {}
    if scheme.asymmetric:
        extra = {"act_zp_scratch": np.empty(m, np.int32), "weight_colsum": arrays["weight_colsum"]}
    plan.run(ql.QuantizedLinearArgs(
        activation=x, weight_q=wq, weight_scale=ws, bias=bias, output=y,
        act_q_scratch=np.empty((m, k), np.int8), act_scale_scratch=np.empty(m, dtype.numpy),
        **extra, **scalars))
    doc = {
        "layer": {"m": m, "k": k, "n": n, "dtype": dtype.name, "scheme": scheme.value,
                  "bias": bias is not None,
                  "weights": str(args.weights) if args.weights else "random",
                  "adapter": str(args.adapter_facts) if args.adapter_facts
                  else "any WebGPU adapter (default limits, no optional features)"},
        "program": program.to_json(),
        "inputs": {name: base64.b64encode(program.input_bytes(name, arrays[name])).decode()
                   for name, spec in program.tensors.items() if spec.role == "input"},
        "expected": {"output": base64.b64encode(y.tobytes()).decode()},
    }
    args.out.write_text(json.dumps(doc))
    print(f"wrote {args.out}: {m} x {k} -> {n} {dtype.name} {scheme.value}, "
          f"sku {program.sku}, {len(doc['program']['dispatches'])} dispatches")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Exported programs (qlinear/backends/wgpu/program.py): the JSON document a browser page
runs holds exactly the plan the wgpu backend runs. Here a program is run through wgpu
itself, read only from its JSON (as examples/web/qlinear.js reads it), on lavapipe, and
compared bit for bit with the backend's own plan and the int64 oracle; and the document's
form is checked."""

import base64
import json

import numpy as np
import pytest

import qlinear as ql
from qlinear.backends.wgpu.choose import AdapterFacts
from qlinear.backends.wgpu.options import WgpuOptions
from qlinear.backends.wgpu.program import FORMAT, linear_program, quantize_program
from qlinear.errors import InvalidProblem
from qltest import (
    assert_bitwise_equal,
    oracle_linear_scheme,
    oracle_quantize_scheme,
    random_activation,
    random_scale,
    random_weight,
    shifted_activation,
)

POISON = 0xAB


def run_json(be, doc, inputs):
    """Run program ``doc`` (its JSON text parsed) on ``be``'s device from the document
    alone; ``inputs``: bytes by tensor name. Returns the bytes of every output and
    scratch tensor."""
    wgpu = be._wgpu
    dev = be.device
    u = wgpu.BufferUsage
    bufs = {}
    for name, t in doc["tensors"].items():
        size = max(16, -(-t["nbytes"] // 4) * 4)
        buf = dev.create_buffer(size=size, usage=u.STORAGE | u.COPY_SRC | u.COPY_DST)
        data = inputs[name] if t["role"] == "input" else bytes([POISON]) * t["nbytes"]
        data = data + bytes(-len(data) % 4)
        if data:
            dev.queue.write_buffer(buf, 0, data)
        bufs[name] = buf
    dummies = {}  # one per variable: writable bindings of a dispatch may not alias
    params = base64.b64decode(doc["params"])
    pbuf = dev.create_buffer(size=max(16, len(params)), usage=u.UNIFORM | u.COPY_DST)
    dev.queue.write_buffer(pbuf, 0, params)
    vis = wgpu.ShaderStage.COMPUTE
    layouts = {}
    for name, lay in doc["layouts"].items():
        entries = [{"binding": b, "visibility": vis, "buffer": {"type": "storage"}}
                   for b in sorted(lay["storage"].values())]
        if lay["params"] is not None:
            entries.append({"binding": lay["params"], "visibility": vis,
                            "buffer": {"type": "uniform"}})
        bgl = dev.create_bind_group_layout(entries=entries)
        layouts[name] = (bgl, dev.create_pipeline_layout(bind_group_layouts=[bgl]))
    modules = [dev.create_shader_module(code=m) for m in doc["modules"]]
    pipes = [dev.create_compute_pipeline(
        layout=layouts[p["layout"]][1],
        compute={"module": modules[p["module"]], "entry_point": p["entry"],
                 "constants": p["constants"]}) for p in doc["pipelines"]]
    enc = dev.create_command_encoder()
    cp = enc.begin_compute_pass()
    for d in doc["dispatches"]:
        pipe = doc["pipelines"][d["pipeline"]]
        lay = doc["layouts"][pipe["layout"]]
        entries = []
        for var, b in d["bindings"].items():
            if b["tensor"] is None:
                buf = dummies.setdefault(var, dev.create_buffer(size=16, usage=u.STORAGE))
            else:
                buf = bufs[b["tensor"]]
            entries.append({"binding": lay["storage"][var], "resource": {
                "buffer": buf, "offset": b["offset"], "size": b["size"]}})
        entries.append({"binding": lay["params"], "resource": {
            "buffer": pbuf, "offset": d["params"] * doc["param_stride"],
            "size": lay["params_size"]}})
        cp.set_pipeline(pipes[d["pipeline"]])
        cp.set_bind_group(0, dev.create_bind_group(layout=layouts[pipe["layout"]][0],
                                                   entries=entries))
        cp.dispatch_workgroups(*d["grid"])
    cp.end()
    dev.queue.submit([enc.finish()])
    return {n: bytes(dev.queue.read_buffer(bufs[n]))
            for n, t in doc["tensors"].items() if t["role"] != "input"}


def facts_options(be, **settings):
    return be.facts, be.options.replaced(**settings)


CASES = [  # (m, k, n, dtype, scheme, bias, settings)
    (1, 37, 9, ql.f32, "dynamic", True, {}),
    (5, 130, 33, ql.f16, "static_asym", False, {"f16_storage": "packed"}),
    (16, 67, 17, ql.bf16, "dynamic_asym", True, {"inner_product": "fma"}),
    (70, 258, 67, ql.f16, "static", True, {}),
    (90, 64, 40, ql.f32, "dynamic", False, {"max_storage_binding": 4096,
                                            "max_workgroups_per_dim": 2}),
]


def _data(rng, m, k, n, dtype, scheme):
    x = (shifted_activation if ql.ActivationScheme(scheme).asymmetric else random_activation)(
        rng, m, k, dtype)
    return x, random_weight(rng, n, k), random_scale(rng, n, dtype), random_scale(rng, n, dtype)


@pytest.mark.parametrize("m,k,n,dtype,scheme,bias,settings", CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}-{c[3].name}-{c[4]}" for c in CASES])
def test_linear_program_runs_as_the_plan(wgpu_be, rng, m, k, n, dtype, scheme, bias, settings):
    be = wgpu_be
    s = ql.ActivationScheme(scheme)
    x, wq, ws, b = _data(rng, m, k, n, dtype, scheme)
    b = b if bias else None
    in_scale = float(np.abs(x).max()) / 100 if s.static else None
    in_zp = 7 if s.static_zero_point else None
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype, scheme=s)
    facts, opts = facts_options(be, **settings)
    prog = linear_program(desc, facts, opts, bias=bias, target="naga", input_scale=in_scale,
                          input_zero_point=in_zp)
    with be.configured(**settings):
        plan = ql.QuantizedLinearPlan.select(be, desc)
    assert prog.sku == plan.sku
    doc = json.loads(json.dumps(prog.to_json()))
    assert doc["format"] == FORMAT and doc["kind"] == "linear" and doc["sku"] == plan.sku
    inputs = {"activation": x, "weight_q": wq, "weight_scale": ws}
    if bias:
        inputs["bias"] = b
    if s.asymmetric:
        inputs["weight_colsum"] = ql.weight_colsum(wq)
    out = run_json(be, doc, {k_: prog.input_bytes(k_, v) for k_, v in inputs.items()})
    want_y, want_q, want_s, want_zp = oracle_linear_scheme(
        x, wq, ws, b, dtype, s, prog_scale(in_scale, dtype), in_zp)
    assert_bitwise_equal(prog.read("output", out["output"]), want_y, f"output [{prog.sku}]")
    assert_bitwise_equal(prog.read("act_q_scratch", out["act_q_scratch"]).astype(np.int64),
                         want_q, "act_q_scratch")
    assert_bitwise_equal(prog.read("act_scale_scratch", out["act_scale_scratch"]), want_s,
                         "act_scale_scratch")
    if s.asymmetric:
        assert_bitwise_equal(prog.read("act_zp_scratch", out["act_zp_scratch"]).astype(
            np.int64), want_zp, "act_zp_scratch")
    if "max_workgroups_per_dim" in settings:
        assert len(doc["dispatches"]) > 2  # split: several activation and GEMM blocks


def prog_scale(in_scale, dtype):
    return None if in_scale is None else float(np.array(in_scale, dtype.numpy))


@pytest.mark.parametrize("scheme", [s.value for s in ql.ActivationScheme])
def test_quantize_program_runs_as_the_plan(wgpu_be, rng, scheme):
    be = wgpu_be
    s = ql.ActivationScheme(scheme)
    m, k, dtype = 6, 45, ql.bf16
    x = shifted_activation(rng, m, k, dtype)
    in_scale = float(np.abs(x).astype(np.float32).max()) / 90 if s.static else None
    in_zp = -5 if s.static_zero_point else None
    desc = ql.DynamicRangeQuantizeDescriptor(m=m, k=k, dtype=dtype, scheme=s)
    prog = quantize_program(desc, be.facts, be.options, target="naga", input_scale=in_scale,
                            input_zero_point=in_zp)
    assert prog.sku == ql.DynamicRangeQuantizePlan.select(be, desc).sku
    doc = prog.to_json()
    out = run_json(be, doc, {"activation": prog.input_bytes("activation", x)})
    want_q, want_s, want_zp = oracle_quantize_scheme(x, dtype, s, prog_scale(in_scale, dtype),
                                                     in_zp)
    assert_bitwise_equal(prog.read("act_q", out["act_q"]).astype(np.int64), want_q, "act_q")
    assert_bitwise_equal(prog.read("act_scale", out["act_scale"]), want_s, "act_scale")
    if s.asymmetric:
        assert_bitwise_equal(prog.read("act_zp", out["act_zp"]).astype(np.int64), want_zp,
                             "act_zp")


def _browser_facts(features=()):
    return AdapterFacts.from_adapter("CPU", "WebGPU", features, {
        "max-compute-invocations-per-workgroup": 256, "max-compute-workgroup-size-x": 256,
        "max-compute-workgroup-size-y": 256})


def _browser_options():
    return WgpuOptions(max_storage_binding=128 << 20, max_workgroups_per_dim=65535,
                       max_workgroup_storage=16384)


def test_document_form():
    desc = ql.QuantizedLinearDescriptor(m=3, c_out=5, k=10, dtype=ql.f16)
    prog = linear_program(desc, _browser_facts(), _browser_options(), bias=True)
    doc = prog.to_json()
    assert set(doc) == {"format", "kind", "sku", "target", "features", "modules", "pipelines",
                        "layouts", "tensors", "param_stride", "params", "dispatches"}
    assert doc["target"] == "tint" and doc["features"] == []  # f16 packed: no shader-f16
    assert {n: t["role"] for n, t in doc["tensors"].items()} == {
        "activation": "input", "weight_q": "input", "weight_scale": "input", "bias": "input",
        "output": "output", "act_q_scratch": "scratch", "act_scale_scratch": "scratch"}
    assert doc["tensors"]["weight_q"]["nbytes"] == 5 * 12  # rows padded to 4 bytes
    assert [p["label"] for p in doc["pipelines"]] == ["rowquant", "gemv"]
    assert len(base64.b64decode(doc["params"])) == len(doc["dispatches"]) * doc["param_stride"]
    # Absent optional tensors bind the dummy, and every bound range is inside its tensor.
    for d in doc["dispatches"]:
        for b in d["bindings"].values():
            if b["tensor"] is None:
                assert (b["offset"], b["size"]) == (0, 16)
            else:
                nb = -(-doc["tensors"][b["tensor"]]["nbytes"] // 4) * 4
                assert b["offset"] % 256 == 0 and b["offset"] + b["size"] <= max(16, nb)
    native = linear_program(desc, _browser_facts(["shader-f16"]), _browser_options(),
                            bias=False)
    assert native.features == ["shader-f16"] and "enable f16;" in native.modules()[0]


def test_absent_tensors_bind_a_dummy_of_their_own(wgpu_be):
    # Dawn refuses one buffer bound to two writable bindings of a dispatch (bias, act_zp
    # and colsum are all absent in a dynamic, bias-less run).
    gpu = wgpu_be.gpu
    dummies = {v: gpu.dummy_for(v) for v in ("bias", "act_zp", "colsum")}
    assert len({id(b) for b in dummies.values()}) == 3
    assert all(gpu.dummy_for(v) is b for v, b in dummies.items())


def test_bad_arguments():
    desc = ql.QuantizedLinearDescriptor(m=3, c_out=5, k=10, dtype=ql.f32, scheme="static")
    with pytest.raises(InvalidProblem, match="target"):
        linear_program(desc, _browser_facts(), _browser_options(), bias=False, target="glsl",
                       input_scale=0.5)
    with pytest.raises(InvalidProblem, match="input_scale"):
        linear_program(desc, _browser_facts(), _browser_options(), bias=False)
    prog = linear_program(desc, _browser_facts(), _browser_options(), bias=False,
                          input_scale=0.5)
    with pytest.raises(InvalidProblem, match="activation: expected f32 of shape"):
        prog.input_bytes("activation", np.zeros((3, 9), np.float32))
    with pytest.raises(InvalidProblem, match="name: expected one of"):
        prog.read("nope", b"")
    with pytest.raises(InvalidProblem, match="data: expected at least 60 bytes"):
        prog.read("output", bytes(8))

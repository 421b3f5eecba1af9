"""The wgpu backend's WGSL on the other WebGPU implementation: Dawn (Tint) in headless
Chromium, on its SwiftShader adapter. Programs exported for the browser's own adapter
facts (qlinear/backends/wgpu/program.py) run through the browser example's module
(examples/web/qlinear.js) on fresh random data with poisoned outputs and scratches; every
element is compared bit for bit with the cpu backend and the int64 oracle.

Needs a Chromium binary (chromium, chromium-browser, google-chrome, or
``QLINEAR_CHROMIUM``); without one every test here is skipped with that reason.
"""

import base64
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from dawn.cases import (
    CASES,
    Case,
    build,
    cpu_outputs,
    oracle_outputs,
)
from dawn.driver import BrowserError, find_chromium, with_browser

import qlinear as ql
from qlinear.backends.wgpu.program import browser_facts
from qltest import assert_bitwise_equal

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Cases per page call: a hung GPU call fails its batch after BATCH_TIMEOUT seconds.
BATCH = 16
BATCH_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """(server, browser, data directory): Chromium on tests/dawn/harness.html, which
    imports /web/qlinear.js; the tests write case documents into /data/."""
    binary, why = find_chromium()
    if binary is None:
        pytest.skip(why)
    data = tmp_path_factory.mktemp("dawn-data")
    roots = {"web": ROOT / "examples" / "web", "dawn": ROOT / "tests" / "dawn", "data": data}
    server, br = with_browser(roots, ("dawn", "harness.html"))
    try:
        yield server, br, data
    finally:
        br.close()
        server.stop()


@pytest.fixture(scope="module")
def page_facts(browser):
    """The page's adapterFacts() and user agent."""
    _, br, _ = browser
    got = br.evaluate("qlHarness.facts()")
    return got["facts"], got["userAgent"]


def test_the_adapter_is_dawn_on_swiftshader(page_facts):
    facts, agent = page_facts
    assert "Chrome/" in agent, agent
    assert facts["vendor"] == "google" and facts["architecture"] == "swiftshader", facts
    limits = facts["limits"]
    # Every limit, named as wgpu names them (camelCase -> kebab-case).
    assert {"max-compute-workgroup-size-x", "max-texture-dimension2-d",
            "min-storage-buffer-offset-alignment"} <= set(limits), sorted(limits)
    assert limits["max-compute-invocations-per-workgroup"] >= 256
    assert limits["max-storage-buffer-binding-size"] >= 128 << 20
    adapter = browser_facts(facts)
    assert not adapter.is_gpu and adapter.backend_type == "WebGPU"


@pytest.fixture(scope="module")
def results(request, browser, page_facts):
    """Every selected case of the matrix built, run in the browser in batches, and kept by
    id with its result ({"outputs": {name: base64}, "build_ms", "run_ms"} or {"error":
    text}) or why it was not run."""
    _, br, data = browser
    facts, _ = page_facts
    adapter, limits = browser_facts(facts), facts["limits"]
    rng = np.random.default_rng()
    # This module's selected cases (other modules have parameters named "case" too).
    selected = {item.callspec.params["case"].id for item in request.session.items
                if isinstance(getattr(item, "callspec", None) and
                              item.callspec.params.get("case"), Case)}
    built, skipped = {}, {}
    for case in CASES:
        if case.id not in selected:
            continue
        try:
            b = build(case, adapter, limits, rng)
        except ql.Unsupported as e:
            skipped[case.id] = f"not exportable for this adapter: {e}"
            continue
        (data / f"{case.id}.json").write_text(json.dumps(b.document))
        built[case.id] = b
    ran = {}
    names = list(built)
    for i in range(0, len(names), BATCH):
        chunk = names[i:i + BATCH]
        ran.update(br.evaluate(f"qlHarness.runCases({json.dumps(chunk)})",
                               timeout=BATCH_TIMEOUT))
    return built, ran, skipped, rng


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_program_matches_cpu_and_oracle(results, case, record_property):
    built, ran, skipped, rng = results
    if case.id in skipped:
        pytest.skip(skipped[case.id])
    b = built[case.id]
    sku = b.program.sku
    for want in case.expect:
        assert want in sku, f"{case.id}: the sku {sku!r} lacks {want!r}: not the forced kernel"
    for bad in case.refuse:
        assert bad not in sku, f"{case.id}: the sku {sku!r} holds {bad!r}"
    r = ran[case.id]
    assert "error" not in r, f"{case.id} [{sku}] failed in the browser: {r['error']}"
    record_property("sku", sku)
    record_property("browser_build_ms", round(r["build_ms"]))
    record_property("browser_run_ms", round(r["run_ms"]))
    outputs = {n: s for n, s in b.program.tensors.items() if s.role != "input"}
    assert set(r["outputs"]) == set(outputs)
    got = {n: b.program.read(n, base64.b64decode(v)) for n, v in r["outputs"].items()}
    cpu = cpu_outputs(b, rng)
    oracle = oracle_outputs(b)
    assert set(cpu) == set(oracle) == set(got)
    for name in got:
        assert_bitwise_equal(got[name], cpu[name], f"{name} vs cpu [{sku}]")
        want = oracle[name]
        assert_bitwise_equal(got[name].astype(want.dtype) if want.dtype == np.int64
                             else got[name], want, f"{name} vs oracle [{sku}]")


def _copy_program(code, n, offset=0):
    """A hand-written program: shaders/micro.wgsl's copy of n vec4<u32> words."""
    size = n * 16
    binding = {"dst": {"tensor": "dst", "offset": offset, "size": size - offset},
               "src": {"tensor": "src", "offset": 0, "size": size}}
    return {"format": "qlinear.wgsl-program/1", "kind": "copy", "sku": "micro.copy",
            "target": "tint", "features": [], "modules": [code],
            "pipelines": [{"module": 0, "entry": "copy", "constants": {"WG": 64.0},
                           "layout": "micro", "label": "copy"}],
            "layouts": {"micro": {"storage": {"dst": 0, "src": 1}, "params": None,
                                  "params_size": 0}},
            "tensors": {"src": {"shape": [n * 4], "dtype": "u32", "nbytes": size,
                                "role": "input"},
                        "dst": {"shape": [n * 4], "dtype": "u32", "nbytes": size,
                                "role": "output"}},
            "param_stride": 256, "params": "",
            "dispatches": [{"pipeline": 0, "params": 0, "grid": [-(-n // 64), 1, 1],
                            "bindings": binding}]}


def _run_case(browser, program, inputs, poison=None):
    _, br, _ = browser
    doc = {"program": program,
           "inputs": {k: base64.b64encode(v).decode() for k, v in inputs.items()},
           "poison": {k: base64.b64encode(v).decode() for k, v in (poison or {}).items()}}
    return br.evaluate(f"qlHarness.runCase({json.dumps(doc)})", timeout=60)


MICRO = (ROOT / "shaders" / "micro.wgsl").read_text()


def test_a_hand_written_program_runs_and_poison_stays_where_unwritten(browser, rng):
    """The page alone (no qlinear program): a copy, then a copy into all but the first 64
    words of the output, whose untouched bytes must still hold the poison: the default
    0xAB bytes, or the pattern given."""
    n = 300
    x = rng.integers(0, 2**32, n * 4, dtype=np.uint32)
    r = _run_case(browser, _copy_program(MICRO, n), {"src": x.tobytes()})
    assert "error" not in r, r
    got = np.frombuffer(base64.b64decode(r["outputs"]["dst"]), np.uint32)
    assert np.array_equal(got, x)
    # Bound from byte 256 on: the kernel copies src[i] into dst[i] of the bound range.
    for poison in (None, rng.integers(0, 2**32, 3, dtype=np.uint32)):
        given = None if poison is None else {"dst": poison.tobytes()}
        r = _run_case(browser, _copy_program(MICRO, n, offset=256), {"src": x.tobytes()}, given)
        assert "error" not in r, r
        got = np.frombuffer(base64.b64decode(r["outputs"]["dst"]), np.uint32)
        want = np.full(64, 0xABABABAB, np.uint32) if poison is None else np.resize(poison, 64)
        assert np.array_equal(got[:64], want)
        assert np.array_equal(got[64:], x[:n * 4 - 64])


def test_a_compile_error_is_a_clear_message(browser):
    broken = MICRO.replace("dst[i] = src[i];", "dst[i] = src[i] + 1.5;")
    assert broken != MICRO
    r = _run_case(browser, _copy_program(broken, 4), {"src": bytes(64)})
    err = r.get("error", "")
    assert "WGSL compilation of module 0 failed" in err, r
    line = 1 + MICRO[:MICRO.index("dst[i] = src[i];")].count("\n")
    assert f"line {line}:" in err and "operator +" in err, err


def test_a_validation_error_is_a_clear_message(browser):
    """A storage binding at an offset the adapter does not allow (256-byte alignment)."""
    r = _run_case(browser, _copy_program(MICRO, 8, offset=4), {"src": bytes(128)})
    err = r.get("error", "")
    assert err.startswith("building the program: validation error:"), r
    assert "offset" in err.lower() and "256" in err, err


def test_a_program_needing_a_missing_feature_is_refused(browser, page_facts):
    facts, _ = page_facts
    if "shader-f16" in facts["features"]:
        pytest.skip("this adapter has shader-f16: no feature to miss")
    prog = dict(_copy_program(MICRO, 4), features=["shader-f16"])
    r = _run_case(browser, prog, {"src": bytes(64)})
    assert 'lacks ["shader-f16"]' in r.get("error", ""), r


def test_a_hung_page_call_times_out(browser):
    """A page call that never answers fails with a timeout, not a hang."""
    _, br, _ = browser
    with pytest.raises(BrowserError, match="no answer from Chromium in time"):
        br.evaluate("new Promise(() => {})", timeout=1.0)
    assert br.evaluate("1 + 1") == 2  # the browser still answers afterwards


def test_the_example_page_runs_its_exported_layer(browser, tmp_path):
    """examples/web: export_layer.py writes layer.json; index.html runs it (through the
    same qlinear.js) and finds every output element bit-identical to the cpu backend's."""
    server, br, data = browser
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    out = data / "layer.json"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "web" / "export_layer.py"),
                        "--m", "5", "--k", "67", "--n", "48", "--dtype", "bf16", "--bias",
                        "--out", str(out)], capture_output=True, text=True, timeout=120,
                       env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    session = br.open(server.url("web", "index.html?layer=/data/layer.json&runs=3"))
    result = br.evaluate("window.qlinearReady", session=session, timeout=120)
    assert not result.get("error"), result
    layer = json.loads(out.read_text())
    assert result["sku"] == layer["program"]["sku"]
    assert result["elements"] == 5 * 48 and result["identical"] == result["elements"], result
    assert result["max_abs_diff"] == 0

"""Public API: docstrings, registry, plans, layer, weight quantization."""

import importlib
import inspect
import pickle
import pkgutil

import numpy as np
import pytest

import qlinear as ql
from qltest import assert_bitwise_equal, oracle_linear, random_activation

# Every module of the package, found by walking it: a new module is covered without
# being listed. Those needing an optional dependency skip where it is missing.
MODULES = sorted(m.name for m in pkgutil.walk_packages(ql.__path__, "qlinear."))


def _public(obj):
    for name in getattr(obj, "__all__", [n for n in dir(obj) if not n.startswith("_")]):
        yield name, getattr(obj, name)


@pytest.mark.parametrize("modname", MODULES)
def test_every_public_name_has_a_docstring(modname):
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        pytest.skip(f"{modname} not importable here: {e}")
    assert mod.__doc__, f"{modname} has no module docstring"
    missing = []
    for name, obj in _public(mod):
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not inspect.getdoc(obj):
                missing.append(name)
            if inspect.isclass(obj) and obj.__module__.startswith("qlinear"):
                for mname, member in vars(obj).items():
                    if mname.startswith("_"):
                        continue
                    fn = member.fget if isinstance(member, property) else member
                    if isinstance(fn, (staticmethod, classmethod)):
                        fn = fn.__func__
                    if inspect.isfunction(fn) and not inspect.getdoc(fn):
                        missing.append(f"{name}.{mname}")
    assert not missing, f"{modname}: no docstring on {missing}"


def test_all_names_exist():
    for name in ql.__all__:
        assert hasattr(ql, name), name


def test_error_hierarchy():
    assert issubclass(ql.InvalidProblem, ql.QlinearError)
    assert issubclass(ql.InvalidProblem, ValueError)
    for cls in (ql.Unsupported, ql.BackendUnavailable, ql.DeviceError):
        assert issubclass(cls, ql.QlinearError)
    e = ql.BackendUnavailable("x", "no adapter", "apt-get install y")
    assert "no adapter" in str(e) and "apt-get install y" in str(e)
    d = ql.DeviceError("compile failed", native="line 3: error")
    assert "line 3: error" in str(d) and d.native == "line 3: error"


def test_dtypes():
    assert ql.bf16.numpy.name == "bfloat16"
    assert ql.dtypes.as_dtype(np.float16) is ql.f16
    assert ql.dtypes.as_dtype("float32") is ql.f32
    assert pickle.loads(pickle.dumps(ql.bf16)) is ql.bf16
    assert ql.dtypes.as_dtype("int32") is ql.s32
    with pytest.raises(ql.InvalidProblem, match="dtype"):
        ql.dtypes.as_dtype("int16")


def test_backend_registry():
    assert ql.backend_names()[-1] == "cpu"
    assert set(ql.backend_names()) >= {"cpu", "wgpu", "cuda"}
    assert ql.backend("cpu").name == "cpu"
    assert ql.backend() is not None
    statuses = {s.name: s for s in ql.backend_status()}
    assert statuses["cpu"].available
    for s in statuses.values():
        assert s.available or s.reason, f"{s.name}: unavailable without a reason"
    with pytest.raises(ql.InvalidProblem, match="backend"):
        ql.backend("tpu")


def test_best_backend_prefers_gpus():
    best = ql.backend()
    gpus = [s.backend for s in ql.backend_status() if s.available and s.backend.is_gpu]
    assert best.is_gpu == bool(gpus)


def test_plan_surface(qlinear_backend):
    be = qlinear_backend
    desc = ql.QuantizedLinearDescriptor(m=3, c_out=5, k=7, dtype=ql.f32)
    plan = ql.QuantizedLinearPlan.select(be, desc)
    assert plan.workspace_size() == 0
    assert isinstance(plan.sku, str) and plan.sku
    g = plan.precision_guarantee
    assert g.exact_int32 and isinstance(g.bit_identical, bool)
    assert plan.backend is be and plan.descriptor == desc
    qdesc = desc.activation_pass
    qplan = ql.DynamicRangeQuantizePlan.select(be, qdesc)
    assert qplan.workspace_size() == 0 and qplan.sku
    with pytest.raises(ql.InvalidProblem, match="descriptor"):
        ql.QuantizedLinearPlan.select(be, qdesc)


def test_quantize_weight_matches_contract():
    rng = np.random.default_rng()
    w = rng.standard_normal((6, 10)).astype(np.float32)
    w[2] = 0
    wq, ws = ql.quantize_weight(w)
    assert wq.dtype == np.int8 and ws.dtype == np.float32
    amax = np.abs(w).max(axis=1)
    want_s = (amax / np.float32(127)).astype(np.float32)
    want_s[2] = 1
    assert_bitwise_equal(ws, want_s, "weight_scale")
    want_q = np.clip(np.rint(w / want_s[:, None]), -127, 127).astype(np.int8)
    assert (wq == want_q).all() and np.abs(wq).max() == 127 and not wq[2].any()
    wq16, ws16 = ql.quantize_weight(w, dtype=ql.bf16)
    assert ws16.dtype == ql.bf16.numpy
    with pytest.raises(ql.InvalidProblem, match="weight"):
        ql.quantize_weight(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ql.InvalidProblem, match="weight"):
        ql.quantize_weight(np.ones(3, np.float32))


@pytest.mark.parametrize("dtype", [ql.f32, ql.f16, ql.bf16], ids=["f32", "f16", "bf16"])
def test_layer_numpy_in_numpy_out(qlinear_backend, dtype):
    rng = np.random.default_rng()
    k, n = 24, 10
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(dtype.numpy)
    try:
        layer = ql.QuantizedLinear.from_float(w, bias, backend=qlinear_backend, dtype=dtype)
        layer(np.ones((1, k), dtype.numpy))
    except ql.Unsupported as e:
        pytest.skip(str(e))
    wq, ws = ql.quantize_weight(w, dtype=dtype)
    assert "QuantizedLinear" in repr(layer) and layer.in_features == k
    # Leading dims flatten into M; M grows (scratch grows) and shrinks (scratch reused).
    for shape in [(2, 3, k), (5, k), (40, k), (1, k), (k,)]:
        x = random_activation(rng, int(np.prod(shape[:-1])), k, dtype).reshape(shape)
        y = layer(x)
        assert y.shape == shape[:-1] + (n,) and y.dtype == dtype.numpy
        want, _, _ = oracle_linear(x.reshape(-1, k), wq, ws, bias, dtype)
        assert_bitwise_equal(y.reshape(-1, n), want, f"layer output for x{shape}")
    with pytest.raises(ql.InvalidProblem, match="x"):
        layer(np.ones((2, k + 1), dtype.numpy))
    with pytest.raises(ql.InvalidProblem, match="x"):
        layer(np.ones((2, k), np.float64))


def test_layer_scratch_grows_and_is_reused():
    be = ql.backend("cpu")
    layer = ql.QuantizedLinear.from_float(np.ones((4, 8), np.float32), backend=be)
    layer(np.ones((3, 8), np.float32))
    first = layer._scratch
    layer(np.ones((2, 8), np.float32))
    assert layer._scratch is first
    layer(np.ones((9, 8), np.float32))
    assert layer._scratch[0].shape[0] == 9


def test_layer_device_tensor_in_device_tensor_out(qlinear_backend):
    be = qlinear_backend
    rng = np.random.default_rng()
    w = rng.standard_normal((6, 12)).astype(np.float32)
    layer = ql.QuantizedLinear.from_float(w, backend=be)
    x = random_activation(rng, 4, 12, ql.f32)
    y = layer.forward(be.from_numpy(x))
    assert isinstance(y, ql.Tensor) and y.shape == (4, 6)
    wq, ws = ql.quantize_weight(w)
    want, _, _ = oracle_linear(x, wq, ws, None, ql.f32)
    assert_bitwise_equal(be.to_numpy(y), want, "forward output")


def test_cpu_weight_cache_only_for_readonly_tensors():
    be = ql.backend("cpu")
    rng = np.random.default_rng()
    wq = rng.integers(-127, 128, size=(4, 8), dtype=np.int8)
    ro, rw = be.from_numpy(wq, readonly=True), be.from_numpy(wq)
    assert not ro.handle.flags.writeable
    desc = ql.QuantizedLinearDescriptor(m=2, c_out=4, k=8, dtype=ql.f32)
    plan = ql.QuantizedLinearPlan.select(be, desc)
    x = random_activation(rng, 2, 8, ql.f32)
    for w in (ro, rw):
        plan.run(ql.QuantizedLinearArgs(x, w, np.ones(4, np.float32), np.empty((2, 4), np.float32),
                                        np.empty((2, 8), np.int8), np.empty(2, np.float32)))
    # Data derived from the contents only for the read-only one; the oneDNN engine keeps a
    # torch view ("torch") with any tensor, which aliases its memory and derives nothing.
    assert ro.cache and set(rw.cache) <= {"torch"}
    # A changed writable weight is seen by the next run.
    rw.handle[:] = 1
    out = np.empty((2, 4), np.float32)
    plan.run(ql.QuantizedLinearArgs(x, rw, np.ones(4, np.float32), out,
                                    np.empty((2, 8), np.int8), np.empty(2, np.float32)))
    want, _, _ = oracle_linear(x, np.ones((4, 8), np.int8), np.ones(4, np.float32), None, ql.f32)
    assert_bitwise_equal(out, want, "output after weight change")


def test_resources_found():
    from qlinear import resources
    assert resources.resource_dir("shaders").is_dir()
    assert resources.resource_dir("cuda").is_dir()
    with pytest.raises(ql.InvalidProblem, match="kind"):
        resources.resource_dir("nope")


def test_bundles_mirror_their_args_and_are_frozen():
    """Validation returns a frozen bundle with exactly the Args' fields, in order."""
    import dataclasses

    from qlinear.problem import LinearTensors, QuantizeTensors

    for bundle in (LinearTensors, QuantizeTensors):
        args = [f.name for f in dataclasses.fields(bundle.args_type)]
        assert [f.name for f in dataclasses.fields(bundle)] == args
    be = ql.backend("cpu")
    desc = ql.QuantizedLinearDescriptor(m=2, c_out=3, k=5, dtype=ql.f32)
    rng = np.random.default_rng()
    args = ql.QuantizedLinearArgs(
        activation=rng.standard_normal((2, 5)).astype(np.float32),
        weight_q=rng.integers(-127, 128, (3, 5), dtype=np.int8),
        weight_scale=np.ones(3, np.float32), output=np.empty((2, 3), np.float32),
        act_q_scratch=np.empty((2, 5), np.int8), act_scale_scratch=np.empty(2, np.float32))
    t = ql.validate.linear_args(be, desc, args)
    assert isinstance(t, LinearTensors) and t.bias is None
    assert all(isinstance(getattr(t, f), ql.Tensor) for f in ("activation", "output"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.output = t.activation


def test_a_tensor_says_where_it_is_in_one_way():
    with pytest.raises(ql.InvalidProblem, match="data_ptr, buffer_offset"):
        ql.Tensor("cpu", "cpu", (1,), ql.f32, (1,), None, "host")
    with pytest.raises(ql.InvalidProblem, match="data_ptr, buffer_offset"):
        ql.Tensor("cpu", "cpu", (1,), ql.f32, (1,), None, "host", data_ptr=0, buffer_offset=0)
    t = ql.Tensor("wgpu", "wgpu:0", (4, 2), ql.f32, (2, 1), None, "buf", buffer_offset=64)
    assert t.data_ptr is None and t.origin == 64 and t.byte_span() == (64, 96)
    assert t.view((2, 2)).byte_span() == (64, 80)


def test_typical_plans_checks_its_integers():
    """k, n and every M follow the one integer rule: a bad one is an error naming it, not
    a table full of refusals; numpy integers are taken as they are."""
    for kwargs, message in [
            ({"k": 2.5}, "k: expected a non-negative integer, got 2.5"),
            ({"n": True}, "n: expected a non-negative integer, got True"),
            ({"k": -64}, "k: expected a non-negative integer, got -64"),
            ({"ms": (1, 1.5)}, "ms[1]: expected a non-negative integer, got 1.5"),
            ({"ms": ("16",)}, "ms[0]: expected a non-negative integer, got '16'")]:
        with pytest.raises(ql.InvalidProblem) as exc:
            ql.plans.typical_plans("cpu", **kwargs)
        assert str(exc.value) == message
    table = ql.plans.typical_plans("cpu", k=np.int64(64), n=np.int32(32), ms=(np.uint8(1),),
                                   dtypes=(ql.f32,))
    assert list(table) == ["M=1 K=64 N=32 f32"]
    assert not table["M=1 K=64 N=32 f32"].startswith("unsupported")


def test_cpu_empty_beyond_memory_is_a_device_error():
    """A tensor the host cannot hold is a DeviceError saying so, not numpy's MemoryError."""
    with pytest.raises(ql.DeviceError, match="allocating 4611686018427387904 bytes"):
        ql.backend("cpu").empty((2**31, 2**31), ql.s8)

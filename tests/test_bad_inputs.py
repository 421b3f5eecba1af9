"""The bad-input table: each row is its own test, on every backend.

Each row breaks one thing; the plan must raise the named error class with a message
naming the argument, and must leave output and both scratches as they were.
"""

import numpy as np
import pytest

import qlinear as ql
from qltest import random_activation, random_scale, random_weight

M = N = K = 8  # equal sizes, so that any two tensors of one dtype can alias
DT = ql.f32
SHAPES = {"activation": (M, K), "weight_q": (N, K), "weight_scale": (N,), "output": (M, N),
          "act_q_scratch": (M, K), "act_scale_scratch": (M,), "bias": (N,)}
DTYPES = {name: (ql.s8 if name in ("weight_q", "act_q_scratch") else DT) for name in SHAPES}
WRITTEN = ("output", "act_q_scratch", "act_scale_scratch")


def host(name, shape=None, dtype=None, rng=None):
    rng = rng or np.random.default_rng()
    shape = shape or SHAPES[name]
    dtype = dtype or DTYPES[name]
    if dtype == ql.s8:
        return random_weight(rng, *shape) if len(shape) == 2 else \
            rng.integers(1, 100, size=shape).astype(np.int8)
    if len(shape) == 2:
        return random_activation(rng, *shape, dtype)
    return random_scale(rng, shape[0], dtype)


def view(t, *, shape=None, strides=None, offset=0, backend=None, dtype=None):
    """Another qlinear view of ``t``'s memory (shape, strides in elements, element offset)."""
    where = {"data_ptr" if t.data_ptr is not None else "buffer_offset":
             t.origin + offset * t.dtype.itemsize}
    return ql.Tensor(backend or t.backend, t.device, shape or t.shape, dtype or t.dtype,
                     strides or t.strides, t.handle, t.memory, owner=t, **where)


def strided(be, name):
    """A non-contiguous view with the right shape and dtype: every other element."""
    shape = SHAPES[name]
    big_shape = shape[:-1] + (2 * shape[-1],)
    big = be.from_numpy(host(name, big_shape))
    strides = tuple(s * 2 if i == len(shape) - 1 else s for i, s in enumerate(big.strides))
    return view(big, shape=shape, strides=strides)


def other_dtype(name):
    return ql.f32 if DTYPES[name] == ql.s8 else (ql.f16 if DT != ql.f16 else ql.f32)


ROWS = []  # (id, argument named in the message, mutate(be, tensors))
for _name in SHAPES:
    ROWS.append((f"{_name}-wrong-dtype", _name,
                 lambda be, t, n=_name: t.__setitem__(n, be.from_numpy(
                     host(n, dtype=other_dtype(n))))))
    ROWS.append((f"{_name}-wrong-shape", _name,
                 lambda be, t, n=_name: t.__setitem__(n, be.from_numpy(
                     host(n, shape=(SHAPES[n][0] + 1,) + SHAPES[n][1:])))))
    ROWS.append((f"{_name}-transposed-shape", _name,
                 lambda be, t, n=_name: t.__setitem__(n, be.from_numpy(
                     host(n, shape=(SHAPES[n][0] + 1,) + SHAPES[n][1:]).T.copy()
                     if len(SHAPES[n]) == 2 else host(n, shape=(1, SHAPES[n][0]))))))
    ROWS.append((f"{_name}-non-contiguous", _name,
                 lambda be, t, n=_name: t.__setitem__(n, strided(be, n))))
    ROWS.append((f"{_name}-foreign-backend", _name,
                 lambda be, t, n=_name: t.__setitem__(n, view(t[n], backend="elsewhere"))))
    ROWS.append((f"{_name}-not-a-tensor", _name,
                 lambda be, t, n=_name: t.__setitem__(n, [[1, 2], [3, 4]])))
    if _name != "bias":
        ROWS.append((f"{_name}-missing", _name, lambda be, t, n=_name: t.__setitem__(n, None)))
for _name in WRITTEN:
    ROWS.append((f"{_name}-read-only", _name,
                 lambda be, t, n=_name: t.__setitem__(n, be.from_numpy(host(n), readonly=True))))
ROWS += [
    ("output-is-activation", "output", lambda be, t: t.__setitem__("output", t["activation"])),
    ("output-overlaps-bias", "output",
     lambda be, t: t.__setitem__("bias", view(t["output"], shape=(N,), strides=(1,), offset=N))),
    ("output-overlaps-act-scale", "output",
     lambda be, t: t.__setitem__("act_scale_scratch",
                                 view(t["output"], shape=(M,), strides=(1,), offset=3))),
    ("act-q-is-weight-q", "act_q_scratch",
     lambda be, t: t.__setitem__("act_q_scratch", t["weight_q"])),
    ("act-scale-is-weight-scale", "act_scale_scratch",
     lambda be, t: t.__setitem__("act_scale_scratch", t["weight_scale"])),
    ("act-scale-is-output-row", "output",
     lambda be, t: t.__setitem__("act_scale_scratch", view(t["output"], shape=(M,),
                                                           strides=(1,)))),
    ("everything-f16-for-f32-descriptor", "activation",
     lambda be, t: [t.__setitem__(n, be.from_numpy(host(n, dtype=ql.f16)))
                    for n in SHAPES if DTYPES[n] != ql.s8]),
    ("act-q-as-uint-view", "act_q_scratch",
     lambda be, t: t.__setitem__("act_q_scratch", view(t["act_q_scratch"], dtype=ql.f16,
                                                       shape=(M, K // 2), strides=(K // 2, 1)))),
]


@pytest.fixture
def problem(qlinear_backend):
    be = qlinear_backend
    desc = ql.QuantizedLinearDescriptor(m=M, c_out=N, k=K, dtype=DT)
    plan = ql.QuantizedLinearPlan.select(be, desc)
    tensors = {name: be.from_numpy(host(name)) for name in SHAPES}
    return be, plan, tensors


@pytest.mark.parametrize("row_id,argname,mutate", ROWS, ids=[r[0] for r in ROWS])
def test_bad_linear_argument(problem, row_id, argname, mutate):
    be, plan, t = problem
    written = {n: t[n] for n in WRITTEN}
    before = {n: be.to_numpy(v).tobytes() for n, v in written.items()}
    mutate(be, t)
    args = ql.QuantizedLinearArgs(**t)
    with pytest.raises(ql.InvalidProblem) as exc:
        plan.can_implement(args)
    assert argname in str(exc.value), f"message does not name {argname!r}: {exc.value}"
    with pytest.raises(ql.InvalidProblem) as exc:
        plan.run(args)
    assert argname in str(exc.value)
    be.synchronize()
    for n, v in written.items():
        assert be.to_numpy(v).tobytes() == before[n], f"{n} was written by a failed run"


def test_valid_problem_passes(problem):
    """The table's base problem is valid: every row breaks exactly one thing."""
    be, plan, t = problem
    assert plan.can_implement(ql.QuantizedLinearArgs(**t))


def test_args_of_wrong_type(problem):
    be, plan, t = problem
    with pytest.raises(ql.InvalidProblem, match="args"):
        plan.run(dict(t))


def test_bad_quantize_arguments(qlinear_backend):
    be = qlinear_backend
    desc = ql.DynamicRangeQuantizeDescriptor(m=M, k=K, dtype=DT)
    plan = ql.DynamicRangeQuantizePlan.select(be, desc)
    x = be.from_numpy(host("activation"))
    q = be.from_numpy(host("act_q_scratch"))
    s = be.from_numpy(host("act_scale_scratch"))
    before = (be.to_numpy(q).tobytes(), be.to_numpy(s).tobytes())
    cases = [
        (ql.DynamicRangeQuantizeArgs(x, q, be.from_numpy(host("act_scale_scratch", (M + 1,)))),
         "act_scale"),
        (ql.DynamicRangeQuantizeArgs(x, be.from_numpy(host("activation")), s), "act_q"),
        (ql.DynamicRangeQuantizeArgs(be.from_numpy(host("activation", dtype=ql.f16)), q, s),
         "activation"),
        (ql.DynamicRangeQuantizeArgs(x, q, view(q, shape=(M,), dtype=DT, strides=(1,))),
         "act_q"),
    ]
    for args, name in cases:
        with pytest.raises(ql.InvalidProblem, match=name):
            plan.run(args)
    assert (be.to_numpy(q).tobytes(), be.to_numpy(s).tobytes()) == before


DESCRIPTOR_ROWS = [
    (dict(q_min=-129), "q_min"), (dict(q_max=128), "q_max"), (dict(q_min=0), "q_min"),
    (dict(q_max=0), "q_max"), (dict(q_min=5, q_max=100), "q_min"),
    (dict(q_min=-3.5), "q_min"), (dict(q_max="7"), "q_max"),
    (dict(m=-1), "m"), (dict(c_out=-4), "c_out"), (dict(k=-2), "k"),
    (dict(m=1.5), "m"), (dict(c_out="3"), "c_out"), (dict(k=True), "k"),
    (dict(k=ql.max_exact_k() + 1), "k"), (dict(k=ql.max_exact_k(-128, 127) + 1, q_min=-128), "k"),
    (dict(dtype=ql.s8), "dtype"), (dict(dtype="int32"), "dtype"), (dict(dtype=None), "dtype"),
]


@pytest.mark.parametrize("change,argname", DESCRIPTOR_ROWS,
                         ids=[f"{a}-{list(c.values())[0]!r}" for c, a in DESCRIPTOR_ROWS])
def test_bad_descriptor(change, argname):
    params = dict(m=4, c_out=4, k=4, dtype=ql.f32) | change
    with pytest.raises(ql.InvalidProblem) as exc:
        ql.QuantizedLinearDescriptor(**params)
    assert argname in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_largest_k_is_accepted():
    assert ql.QuantizedLinearDescriptor(m=1, c_out=1, k=ql.max_exact_k(), dtype=ql.f32)
    assert ql.max_exact_k() * 127 * 128 < 2**31
    assert (ql.max_exact_k() + 1) * 127 * 128 >= 2**31


def test_numpy_views_on_cpu():
    """On cpu, plain numpy arrays are arguments: strided and foreign-dtype ones are refused."""
    be = ql.backend("cpu")
    plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(M, N, K, DT))
    t = {name: host(name) for name in SHAPES}
    assert plan.can_implement(ql.QuantizedLinearArgs(**t))
    big = host("activation", (M, 2 * K))
    with pytest.raises(ql.InvalidProblem, match="activation.*contiguous"):
        plan.run(ql.QuantizedLinearArgs(**(t | {"activation": big[:, ::2]})))
    with pytest.raises(ql.InvalidProblem, match="output.*int16"):
        plan.run(ql.QuantizedLinearArgs(**(t | {"output": np.zeros((M, N), np.int16)})))
    with pytest.raises(ql.InvalidProblem, match="output: expected dtype f32, got s32"):
        plan.run(ql.QuantizedLinearArgs(**(t | {"output": np.zeros((M, N), np.int32)})))
    raw = np.zeros(M * 6 * 2 + 8, np.uint8)
    odd = np.lib.stride_tricks.as_strided(raw.view(np.float32)[:1], shape=(N,), strides=(6,))
    with pytest.raises(ql.InvalidProblem, match="weight_scale.*contiguous"):
        plan.run(ql.QuantizedLinearArgs(**(t | {"weight_scale": odd})))
    out = t["output"]
    with pytest.raises(ql.InvalidProblem, match="output"):
        plan.run(ql.QuantizedLinearArgs(**(t | {"activation": out})))


def test_real_tensors_from_other_backends(qlinear_backend):
    """Every tensor made by another available backend is refused, by name, on this one."""
    be = qlinear_backend
    others = [s.backend for s in ql.backend_status() if s.available and s.name != be.name]
    if not others:
        pytest.skip("no other backend is available here")
    plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(M, N, K, DT))
    t = {name: be.from_numpy(host(name)) for name in SHAPES}
    before = {n: be.to_numpy(t[n]).tobytes() for n in WRITTEN}
    for other in others:
        for name in SHAPES:
            foreign = other.from_numpy(host(name))
            with pytest.raises(ql.InvalidProblem) as exc:
                plan.run(ql.QuantizedLinearArgs(**(t | {name: foreign})))
            assert name in str(exc.value)
    for n in WRITTEN:
        assert be.to_numpy(t[n]).tobytes() == before[n]

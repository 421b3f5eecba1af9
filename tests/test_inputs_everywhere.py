"""Inputs of every shape of wrong, on every backend, with one answer.

Each case is run on every available backend (the ``qlinear_backend`` fixture; an
unavailable backend is skipped with its reason) and must raise :class:`InvalidProblem`
with the exact message written here: the checks are shared code, so the wording is the
same everywhere. Where a run is refused, the output and both scratches were poisoned
first and must hold the same bytes after. The cuda backend cannot run here, so its
checks are exercised on a backend object that has no device: they must fire before any
device call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest

import qlinear as ql
from qltest import (
    assert_bitwise_equal,
    oracle_linear,
    poisoned,
    random_activation,
    random_scale,
    random_weight,
)

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")

M, N, K = 5, 6, 12
DT = ql.f32
SHAPES = {"activation": (M, K), "weight_q": (N, K), "weight_scale": (N,), "output": (M, N),
          "act_q_scratch": (M, K), "act_scale_scratch": (M,), "bias": (N,)}
WRITTEN = ("output", "act_q_scratch", "act_scale_scratch")
INT8 = ("weight_q", "act_q_scratch")


class UserArray(np.ndarray):
    """A user's own ndarray subclass."""


SUBCLASSES = {
    "masked": lambda a: np.ma.masked_array(a, mask=np.arange(a.size).reshape(a.shape) % 2 == 0),
    "matrix": lambda a: np.matrix(a),
    "user": lambda a: a.view(UserArray),
}


def subclass_message(name: str, obj: object) -> str:
    return (f"{name}: expected an array that is not a numpy.ndarray subclass, got "
            f"{type(obj).__name__} (its mask or semantics would be silently lost)")


def host(name: str, rng: np.random.Generator) -> np.ndarray:
    shape = SHAPES[name]
    if name in INT8:
        return random_weight(rng, *shape)
    if len(shape) == 2:
        return random_activation(rng, *shape, DT)
    return random_scale(rng, shape[0], DT)


def linear_problem(be: ql.Backend, rng: np.random.Generator) -> dict:
    """Valid arguments on ``be``: inputs random, output and scratches poisoned."""
    t = {n: be.from_numpy(host(n, rng)) for n in SHAPES if n not in WRITTEN}
    t["output"] = poisoned(be, SHAPES["output"], DT, rng)
    t["act_q_scratch"] = poisoned(be, SHAPES["act_q_scratch"], ql.s8, rng)
    t["act_scale_scratch"] = poisoned(be, SHAPES["act_scale_scratch"], DT, rng)
    return t


def snapshot(be: ql.Backend, t: dict) -> dict:
    be.synchronize()
    return {n: (be.to_numpy(v) if isinstance(v, ql.Tensor) else np.asarray(v)).tobytes()
            for n, v in t.items()}


@contextlib.contextmanager
def refused(message: str) -> Iterator[None]:
    """The block raises InvalidProblem with exactly ``message``."""
    with pytest.raises(ql.InvalidProblem) as exc:
        yield
    assert str(exc.value) == message


# -- numpy subclasses ------------------------------------------------------------------


@pytest.mark.parametrize("kind", SUBCLASSES)
@pytest.mark.parametrize("name", SHAPES)
def test_subclass_as_linear_argument(qlinear_backend, name, kind):
    """A masked array, a matrix or a user subclass in any argument is refused by name,
    on every backend, before anything is written (even when it is the output)."""
    be, rng = qlinear_backend, np.random.default_rng()
    plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(M, N, K, DT))
    t = linear_problem(be, rng)
    bad = SUBCLASSES[kind](host(name, rng))
    t[name] = bad
    before = snapshot(be, t)
    args = ql.QuantizedLinearArgs(**t)
    with refused(subclass_message(name, bad)):
        plan.can_implement(args)
    with refused(subclass_message(name, bad)):
        plan.run(args)
    assert snapshot(be, t) == before


@pytest.mark.parametrize("kind", SUBCLASSES)
@pytest.mark.parametrize("name", ["activation", "act_q", "act_scale"])
def test_subclass_as_quantize_argument(qlinear_backend, name, kind):
    be, rng = qlinear_backend, np.random.default_rng()
    plan = ql.DynamicRangeQuantizePlan.select(be, ql.DynamicRangeQuantizeDescriptor(M, K, DT))
    t = {"activation": be.from_numpy(random_activation(rng, M, K, DT)),
         "act_q": poisoned(be, (M, K), ql.s8, rng), "act_scale": poisoned(be, (M,), DT, rng)}
    source = {"activation": random_activation(rng, M, K, DT),
              "act_q": random_weight(rng, M, K), "act_scale": random_scale(rng, M, DT)}[name]
    bad = SUBCLASSES[kind](source)
    t[name] = bad
    before = snapshot(be, t)
    with refused(subclass_message(name, bad)):
        plan.run(ql.DynamicRangeQuantizeArgs(**t))
    assert snapshot(be, t) == before


@pytest.mark.parametrize("kind", SUBCLASSES)
def test_subclass_to_from_numpy(qlinear_backend, kind):
    be = qlinear_backend
    bad = SUBCLASSES[kind](random_activation(np.random.default_rng(), M, K, DT))
    with refused(subclass_message("array", bad)):
        be.from_numpy(bad)
    with refused(subclass_message("array", bad)):
        be.from_numpy(bad, readonly=True)


@pytest.mark.parametrize("kind", SUBCLASSES)
def test_subclass_to_a_layer_call(qlinear_backend, kind):
    be, rng = qlinear_backend, np.random.default_rng()
    layer = ql.QuantizedLinear.from_float(rng.standard_normal((N, K)).astype(np.float32),
                                          backend=be)
    bad = SUBCLASSES[kind](random_activation(rng, M, K, DT))
    before = np.asarray(bad).tobytes()
    with refused(subclass_message("x", bad)):
        layer(bad)
    assert np.asarray(bad).tobytes() == before


def test_cpu_wrap_refuses_subclasses_but_keeps_memmaps(tmp_path):
    """Arrays enter the cpu backend through ``wrap`` too (``layer.forward``, ``narrow``):
    subclasses are refused there; ``np.memmap`` changes nothing about its elements and is
    used in place."""
    be, rng = ql.backend("cpu"), np.random.default_rng()
    x = random_activation(rng, M, K, DT)
    for make in SUBCLASSES.values():
        bad = make(x)
        with refused(subclass_message("activation", bad)):
            be.wrap(bad, name="activation")
        with refused(subclass_message("tensor", bad)):
            be.narrow(bad, 1)
    mm = np.memmap(tmp_path / "x.bin", dtype=np.float32, mode="w+", shape=(M, K))
    mm[...] = x
    t = be.wrap(mm)
    assert t.handle is mm and t.shape == (M, K)


# -- be.empty ----------------------------------------------------------------------------

BAD_SHAPES = [
    ((-1, 3), "shape[0]: expected a non-negative integer, got -1"),
    ((2, -3), "shape[1]: expected a non-negative integer, got -3"),
    ((2.5, 3), "shape[0]: expected a non-negative integer, got 2.5"),
    ((3, 2.0), "shape[1]: expected a non-negative integer, got 2.0"),
    ((True, 3), "shape[0]: expected a non-negative integer, got True"),
    ((np.bool_(True),), "shape[0]: expected a non-negative integer, got np.True_"),
    (("3", 2), "shape[0]: expected a non-negative integer, got '3'"),
    ((None, 2), "shape[0]: expected a non-negative integer, got None"),
    ((2, np.float32(3)), "shape[1]: expected a non-negative integer, got np.float32(3.0)"),
    (5, "shape: expected a sequence of non-negative integers, got 5"),
    (None, "shape: expected a sequence of non-negative integers, got None"),
    ("34", "shape: expected a sequence of non-negative integers, got '34'"),
    ({2: 3}, "shape: expected a sequence of non-negative integers, got {2: 3}"),
    (2.5, "shape: expected a sequence of non-negative integers, got 2.5"),
    ((2**40, 2**40), "shape: expected a tensor of at most 2**63 - 1 bytes, got shape "
                     "(1099511627776, 1099511627776) of f32"),
]


@pytest.mark.parametrize("shape,message", BAD_SHAPES, ids=[repr(s) for s, _ in BAD_SHAPES])
def test_empty_with_a_bad_shape(qlinear_backend, shape, message):
    with refused(message):
        qlinear_backend.empty(shape, DT)


BAD_DTYPES = [
    ("int16", "dtype: expected one of f32, f16, bf16, f64, s8, s32 (or their numpy dtypes), "
              "got 'int16'"),
    (None, "dtype: expected one of f32, f16, bf16, f64, s8, s32 (or their numpy dtypes), "
           "got None"),
    (5, "dtype: expected one of f32, f16, bf16, f64, s8, s32 (or their numpy dtypes), got 5"),
    (np.int16, "dtype: expected one of f32, f16, bf16, f64, s8, s32 (or their numpy dtypes), "
               "got <class 'numpy.int16'>"),
]


@pytest.mark.parametrize("dtype,message", BAD_DTYPES, ids=[repr(d) for d, _ in BAD_DTYPES])
def test_empty_with_a_bad_dtype(qlinear_backend, dtype, message):
    with refused(message):
        qlinear_backend.empty((2, 3), dtype)


def test_empty_takes_numpy_integers(qlinear_backend):
    be = qlinear_backend
    t = be.empty((np.int64(3), np.uint8(4)), "f16")
    assert t.shape == (3, 4) and all(type(n) is int for n in t.shape) and t.dtype is ql.f16
    assert be.empty([0, 2], ql.s8).shape == (0, 2)
    assert be.empty((), ql.f32).shape == ()


# -- be.narrow ---------------------------------------------------------------------------

BAD_ROWS = [
    (-1, "rows: expected an integer in 0..5, got -1"),
    (6, "rows: expected an integer in 0..5, got 6"),
    (2.5, "rows: expected an integer in 0..5, got 2.5"),
    (2.0, "rows: expected an integer in 0..5, got 2.0"),
    (True, "rows: expected an integer in 0..5, got True"),
    ("2", "rows: expected an integer in 0..5, got '2'"),
    (None, "rows: expected an integer in 0..5, got None"),
]


@pytest.mark.parametrize("rows,message", BAD_ROWS, ids=[repr(r) for r, _ in BAD_ROWS])
def test_narrow_with_bad_rows(qlinear_backend, rows, message):
    be = qlinear_backend
    t = be.from_numpy(random_activation(np.random.default_rng(), M, K, DT))
    with refused(message):
        be.narrow(t, rows)


def test_narrow_of_a_scalar_tensor(qlinear_backend):
    be = qlinear_backend
    t = be.from_numpy(np.array(1.5, np.float32))
    assert t.shape == ()
    with refused("tensor: expected a tensor with at least one dimension, got shape ()"):
        be.narrow(t, 0)


def test_narrow_takes_numpy_integers(qlinear_backend):
    be = qlinear_backend
    x = random_activation(np.random.default_rng(), M, K, DT)
    t = be.from_numpy(x)
    v = be.narrow(t, np.int64(3))
    assert v.shape == (3, K) and type(v.shape[0]) is int
    assert_bitwise_equal(be.to_numpy(v), x[:3], "narrowed rows")
    assert be.narrow(t, np.uint8(0)).shape == (0, K)


# -- Plan.select -------------------------------------------------------------------------

BAD_DESCRIPTORS = [[M, N, K], {"m": M, "c_out": N, "k": K}, None, "desc", 3]


@pytest.mark.parametrize("desc", BAD_DESCRIPTORS, ids=repr)
def test_select_with_a_bad_descriptor(qlinear_backend, desc):
    be = qlinear_backend
    for plan_type, want in ((ql.QuantizedLinearPlan, "QuantizedLinearDescriptor"),
                            (ql.DynamicRangeQuantizePlan, "DynamicRangeQuantizeDescriptor")):
        with refused(f"descriptor: expected {want}, got {type(desc).__name__}"):
            plan_type.select(be, desc)


def test_select_with_the_other_descriptor_type(qlinear_backend):
    be = qlinear_backend
    linear = ql.QuantizedLinearDescriptor(M, N, K, DT)
    with refused("descriptor: expected QuantizedLinearDescriptor, "
                 "got DynamicRangeQuantizeDescriptor"):
        ql.QuantizedLinearPlan.select(be, linear.activation_pass)
    with refused("descriptor: expected DynamicRangeQuantizeDescriptor, "
                 "got QuantizedLinearDescriptor"):
        ql.DynamicRangeQuantizePlan.select(be, linear)


@pytest.mark.parametrize("bad", ["nope", 3, True, ["cpu"], {"cpu": 1}, ql.Backend],
                         ids=repr)
def test_select_with_a_bad_backend(bad):
    desc = ql.QuantizedLinearDescriptor(M, N, K, DT)
    for plan_type, d in ((ql.QuantizedLinearPlan, desc),
                         (ql.DynamicRangeQuantizePlan, desc.activation_pass)):
        with refused(f"backend: expected one of {ql.backend_names()}, got {bad!r}"):
            plan_type.select(bad, d)


# -- integer-like parameters -------------------------------------------------------------


def test_numpy_integer_descriptor_runs(qlinear_backend):
    """Descriptors made of numpy integers select and run like Python ones (bools refused)."""
    be, rng = qlinear_backend, np.random.default_rng()
    desc = ql.QuantizedLinearDescriptor(m=np.int64(M), c_out=np.int32(N), k=np.uint16(K),
                                        dtype=DT, q_min=np.int8(-127), q_max=np.int16(127))
    assert desc == ql.QuantizedLinearDescriptor(M, N, K, DT)
    plan = ql.QuantizedLinearPlan.select(be, desc)
    x, wq, ws = host("activation", rng), host("weight_q", rng), host("weight_scale", rng)
    t = linear_problem(be, rng) | {"activation": be.from_numpy(x), "weight_q": be.from_numpy(wq),
                                   "weight_scale": be.from_numpy(ws), "bias": None}
    plan.run(ql.QuantizedLinearArgs(**t))
    want, want_q, want_s = oracle_linear(x, wq, ws, None, DT)
    assert_bitwise_equal(be.to_numpy(t["output"]), want, "output")
    assert_bitwise_equal(be.to_numpy(t["act_q_scratch"]).astype(np.int64), want_q, "act_q")
    assert_bitwise_equal(be.to_numpy(t["act_scale_scratch"]), want_s, "act_scale")
    for name in ("m", "c_out", "k"):
        with refused(f"{name}: expected a non-negative integer, got np.True_"):
            ql.QuantizedLinearDescriptor(**({"m": M, "c_out": N, "k": K, "dtype": DT}
                                            | {name: np.bool_(True)}))


def test_tensor_shape_is_integers():
    """A hand-made Tensor takes the same dimensions as ``be.empty`` (numpy ints, never
    fractions, bools or negatives)."""
    def make(shape):
        return ql.Tensor("cpu", "cpu", shape, DT, (1,) * len(shape), None, "host", data_ptr=0)

    assert make((np.int64(2), 3)).shape == (2, 3)
    with refused("shape[0]: expected a non-negative integer, got 2.5"):
        make((2.5,))
    with refused("shape[1]: expected a non-negative integer, got True"):
        make((2, True))
    with refused("shape[0]: expected a non-negative integer, got -2"):
        make((-2,))
    t = make((4, 2))
    with refused("shape[0]: expected a non-negative integer, got 1.5"):
        t.view((1.5, 2))


# -- streams -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [object(), 0, 7, "default"],
                         ids=["object", "int-0", "int-7", "str"])
def test_a_stream_the_backend_cannot_use(qlinear_backend, stream):
    """Refused as ``stream: expected <what>, got <type name>``, nothing written."""
    be, rng = qlinear_backend, np.random.default_rng()
    if be.name == "cuda" and isinstance(stream, int):
        pytest.skip("an int is a raw CUstream handle on cuda")
    plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(M, N, K, DT))
    t = linear_problem(be, rng)
    before = snapshot(be, t)
    with pytest.raises(ql.InvalidProblem) as exc:
        plan.run(ql.QuantizedLinearArgs(**t), stream=stream)
    assert str(exc.value).startswith("stream: expected ")
    assert str(exc.value).endswith(f", got {type(stream).__name__}")
    if be.name == "cpu":
        assert str(exc.value) == f"stream: expected None on the cpu backend, got " \
                                 f"{type(stream).__name__}"
    assert snapshot(be, t) == before


def test_the_stream_of_an_empty_problem_is_checked(qlinear_backend):
    """An empty problem still validates everything it is given, the stream included."""
    be = qlinear_backend
    up = lambda a: be.from_numpy(a)  # noqa: E731
    for desc, plan_type, args in (
            (ql.QuantizedLinearDescriptor(0, N, K, DT), ql.QuantizedLinearPlan,
             ql.QuantizedLinearArgs(up(np.ones((0, K), np.float32)),
                                    up(np.ones((N, K), np.int8)), up(np.ones(N, np.float32)),
                                    up(np.ones((0, N), np.float32)),
                                    up(np.ones((0, K), np.int8)), up(np.ones(0, np.float32)))),
            (ql.DynamicRangeQuantizeDescriptor(0, K, DT), ql.DynamicRangeQuantizePlan,
             ql.DynamicRangeQuantizeArgs(up(np.ones((0, K), np.float32)),
                                         up(np.ones((0, K), np.int8)),
                                         up(np.ones(0, np.float32))))):
        plan = plan_type.select(be, desc)
        plan.run(args)
        with pytest.raises(ql.InvalidProblem) as exc:
            plan.run(args, stream=object())
        assert str(exc.value).startswith("stream: expected ")
        assert str(exc.value).endswith(", got object")


# -- cuda: the same checks, before any device call --------------------------------------


@pytest.fixture
def deviceless_cuda():
    """A cuda backend object without a device: any device call fails with AttributeError,
    so a check that is reached first shows it runs before the device is touched."""
    from qlinear.backends.cuda.backend import CudaBackend

    be = object.__new__(CudaBackend)
    be.device_id = "cuda:0"
    return be


@pytest.mark.parametrize("shape,message", BAD_SHAPES, ids=[repr(s) for s, _ in BAD_SHAPES])
def test_cuda_empty_with_a_bad_shape(deviceless_cuda, shape, message):
    with refused(message):
        deviceless_cuda.empty(shape, DT)


@pytest.mark.parametrize("dtype,message", BAD_DTYPES, ids=[repr(d) for d, _ in BAD_DTYPES])
def test_cuda_empty_with_a_bad_dtype(deviceless_cuda, dtype, message):
    with refused(message):
        deviceless_cuda.empty((2, 3), dtype)


@pytest.mark.parametrize("kind", SUBCLASSES)
def test_cuda_from_numpy_refuses_subclasses(deviceless_cuda, kind):
    bad = SUBCLASSES[kind](random_activation(np.random.default_rng(), M, K, DT))
    with refused(subclass_message("array", bad)):
        deviceless_cuda.from_numpy(bad)


@pytest.mark.parametrize("rows,message", BAD_ROWS, ids=[repr(r) for r, _ in BAD_ROWS])
def test_cuda_narrow_with_bad_rows(deviceless_cuda, rows, message):
    t = ql.Tensor("cuda", "cuda:0", (M, K), DT, (K, 1), None, "cuda:0", data_ptr=4096)
    with refused(message):
        deviceless_cuda.narrow(t, rows)
    scalar = ql.Tensor("cuda", "cuda:0", (), DT, (), None, "cuda:0", data_ptr=4096)
    with refused("tensor: expected a tensor with at least one dimension, got shape ()"):
        deviceless_cuda.narrow(scalar, 0)

"""The wgpu backend under threads: each thread's batches are its own (a read or a
synchronize in one thread never submits another thread's open batch), and concurrent
runs, uploads and read-backs on one backend give, bit for bit, what the same inputs give
on one thread, whether each thread has its own layer or all share one; and threads
asking the registry for the wgpu backend at once get one object.

Iteration counts are fixed; nothing here measures time."""

import threading

import numpy as np
import pytest

import qlinear as ql
from qltest import POISON, assert_bitwise_equal, oracle_linear, random_activation
from wgpu_helpers import small_linear

THREADS = 4
RUNS = 300  # per thread
PER_BATCH = 5
INPUTS = 6  # distinct activations per thread, cycled
M, K, N = 3, 24, 8
DTYPE = ql.f32


def _layer(rng, backend):
    w = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    return ql.QuantizedLinear.from_float(w, bias, backend=backend)


def _inputs(rng):
    return [random_activation(rng, M, K, DTYPE) for _ in range(INPUTS)]


def _expected(layer, xs):
    """Single-threaded results of ``layer`` on ``xs``, each checked against the oracle."""
    out = []
    for x in xs:
        y = layer(x)
        be = layer.backend
        want, _, _ = oracle_linear(x, be.to_numpy(layer.weight_q), be.to_numpy(layer.weight_scale),
                                   be.to_numpy(layer.bias), DTYPE)
        assert_bitwise_equal(y, want, "single-threaded")
        out.append(y)
    return out


def _run_threads(work):
    """Run ``work(i)`` on THREADS threads started together; re-raise the first failure."""
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def body(i):
        try:
            start.wait()
            work(i)
        except BaseException as e:  # noqa: BLE001 (reported on the main thread)
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _batched_work(be, layers, inputs, expected, rng_seeds):
    """Per thread: RUNS runs, PER_BATCH to a batch, each into a fresh poisoned output;
    every output read back after its batch and compared with the expected bits."""

    def work(i):
        layer, xs, want = layers[i], inputs[i], expected[i]
        rng = np.random.default_rng(rng_seeds[i])
        poison = np.full((M, N), POISON, np.float32)
        done = 0
        while done < RUNS:
            picks = rng.integers(0, INPUTS, PER_BATCH)
            outs = []
            with be.batch() as b:
                for j in picks:
                    y = be.from_numpy(poison)
                    layer.forward(be.from_numpy(xs[j]), out=y, stream=b)
                    outs.append(y)
                assert b.pending == PER_BATCH
            for j, y in zip(picks, outs, strict=True):
                assert_bitwise_equal(be.to_numpy(y), want[j], f"thread {i}")
            done += PER_BATCH

    return work


def test_batched_runs_on_four_threads_with_their_own_layers(wgpu_be, rng):
    layers = [_layer(rng, wgpu_be) for _ in range(THREADS)]
    inputs = [_inputs(rng) for _ in range(THREADS)]
    expected = [_expected(layer, xs) for layer, xs in zip(layers, inputs, strict=True)]
    seeds = rng.integers(0, 2**32, THREADS)
    _run_threads(_batched_work(wgpu_be, layers, inputs, expected, seeds))


def test_batched_runs_on_four_threads_sharing_one_layer(wgpu_be, rng):
    layer = _layer(rng, wgpu_be)
    inputs = [_inputs(rng) for _ in range(THREADS)]
    expected = [_expected(layer, xs) for xs in inputs]
    seeds = rng.integers(0, 2**32, THREADS)
    _run_threads(_batched_work(wgpu_be, [layer] * THREADS, inputs, expected, seeds))


@pytest.mark.parametrize("shared", [False, True], ids=["own_layers", "one_layer"])
def test_unbatched_layer_calls_on_four_threads(wgpu_be, rng, shared):
    layers = [_layer(rng, wgpu_be)] * THREADS if shared else [
        _layer(rng, wgpu_be) for _ in range(THREADS)]
    inputs = [_inputs(rng) for _ in range(THREADS)]
    expected = [_expected(layer, xs) for layer, xs in zip(layers, inputs, strict=True)]

    def work(i):
        for r in range(RUNS // 2):
            j = r % INPUTS
            assert_bitwise_equal(layers[i](inputs[i][j]), expected[i][j], f"thread {i}")

    _run_threads(work)


def test_a_read_on_one_thread_leaves_another_threads_batch_open(wgpu_be, rng):
    plan, args, x, wq, ws = small_linear(wgpu_be, rng)
    encoded, read_done = threading.Event(), threading.Event()
    seen = {}

    def other():
        with wgpu_be.batch() as b:
            plan.run(args, stream=b)
            encoded.set()
            read_done.wait(30)
            seen["submitted_before_exit"] = b.submitted
            plan.run(args, stream=b)  # still encodable: nobody ended its encoder
        seen["submitted"] = b.submitted

    t = threading.Thread(target=other)
    t.start()
    assert encoded.wait(30)
    # This thread's read and synchronize submit this thread's batches, not the other's.
    wgpu_be.synchronize()
    assert (wgpu_be.to_numpy(args.output) == np.float32(POISON)).all()
    read_done.set()
    t.join()
    assert seen == {"submitted_before_exit": 0, "submitted": 2}
    assert_bitwise_equal(wgpu_be.to_numpy(args.output), oracle_linear(x, wq, ws, None, DTYPE)[0],
                         "after the other thread's batch")


def test_a_batch_is_refused_on_another_thread(wgpu_be, rng):
    plan, args, x, wq, ws = small_linear(wgpu_be, rng)
    caught = []
    with wgpu_be.batch() as b:
        def other():
            try:
                plan.run(args, stream=b)
            except ql.InvalidProblem as e:
                caught.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert b.pending == 0
    assert len(caught) == 1 and caught[0].startswith("stream: expected a batch opened by")


def test_concurrent_first_calls_get_one_backend_object(wgpu_be, monkeypatch):
    import qlinear.backends as registry
    from qlinear.backends import wgpu as wgpu_backend

    # A registry that has not made its wgpu backend yet; monkeypatch puts the test
    # session's entries back afterwards.
    monkeypatch.delitem(registry._instances, "wgpu", raising=False)
    monkeypatch.delitem(registry._failures, "wgpu", raising=False)
    made = []
    real_create = wgpu_backend.create
    inside = threading.Event()

    def slow_create():
        inside.set()  # the other threads are released while this one creates
        be = real_create()
        made.append(be)
        return be

    monkeypatch.setattr(wgpu_backend, "create", slow_create)
    got = [None] * THREADS

    def work(i):
        if i:
            inside.wait(30)  # arrive while the first caller is inside create()
        got[i] = ql.backend("wgpu")

    _run_threads(work)
    assert len(made) == 1 and all(be is made[0] for be in got)
    assert ql.backend("wgpu") is made[0]

"""Helpers shared by the wgpu tests (``tests/test_wgpu_*.py``; their fixtures ``wgpu_be``
and ``rng`` are in ``conftest.py``): plans selected under options, argument bundles of
fresh device tensors, and how many dispatches a plan's run encoded."""

import qlinear as ql
from qltest import check_linear, poisoned, random_activation, random_scale, random_weight

DTYPES = [ql.f32, ql.f16, ql.bf16]
# (m, k, n): small-M kernel, tiled kernel; odd K and odd N (f16 words shared across rows).
SHAPES = [(1, 13, 7), (16, 130, 33), (17, 37, 9), (70, 258, 67)]


def linear(be, x, wq, ws, bias, dtype, rng, q_min=-127, q_max=127):
    """Run a linear plan on ``be`` and check every output against the oracle."""
    return check_linear(be, x, wq, ws, bias, dtype, q_min, q_max, rng=rng)


def select_plan(be, m, n, k, dtype, **settings):
    """The linear plan selected under ``be.configured(**settings)``."""
    with be.configured(**settings):
        return ql.QuantizedLinearPlan.select(
            be, ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype))


def dispatch_count(plan):
    """The dispatches of the one set of tensors ``plan`` has run on."""
    (d,) = plan._executable._runs.entries.values()
    return len(d.items)


def linear_args(be, rng, x, wq, ws, bias, dtype):
    """Arguments of fresh device tensors holding ``x``, ``wq``, ``ws``, ``bias``, with
    poisoned outputs and scratches."""
    m, k = x.shape
    n = wq.shape[0]
    return ql.QuantizedLinearArgs(
        activation=be.from_numpy(x), weight_q=be.from_numpy(wq), weight_scale=be.from_numpy(ws),
        output=poisoned(be, (m, n), dtype, rng), act_q_scratch=poisoned(be, (m, k), ql.s8, rng),
        act_scale_scratch=poisoned(be, (m,), dtype, rng),
        bias=None if bias is None else be.from_numpy(bias))


def small_linear(be, rng, m=2, k=8, n=4, dtype=ql.f32):
    """A small f32 linear plan, fresh host data ``(x, wq, ws)`` and poisoned bias-less
    arguments holding it: ``(plan, args, x, wq, ws)``."""
    plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(m, n, k, dtype))
    x = random_activation(rng, m, k, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    return plan, linear_args(be, rng, x, wq, ws, None, dtype), x, wq, ws

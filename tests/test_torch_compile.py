"""A quantized model under torch's compilers: ``torch.compile`` and ``torch.export`` call
each QLinear as the operator ``torch.ops.qlinear.linear`` and give the eager result bit
for bit, on every backend; ``torch.jit.trace`` raises Unsupported instead of recording a
constant. Models are small so that each compile takes a few seconds."""

import shutil

import pytest

torch = pytest.importorskip(
    "torch", reason="the torch adapter's tests need torch: pip install torch==2.13.0 "
                    "(or pip install 'qlinear[torch]')")
from torch import nn  # noqa: E402

import qlinear as ql  # noqa: E402
import qlinear.torch as qlt  # noqa: E402


def _model(be, seed=0, dtype=torch.float32):
    """QLinear, ReLU, QLinear, and a float Linear: ReLU and the float layer are
    bit-exact under inductor too, so any difference would be qlinear's."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 56), nn.ReLU(), nn.Linear(56, 24), nn.Linear(24, 8))
    model = model.to(dtype).eval()
    try:
        assert qlt.quantize_linears(model, backend=be, skip="3") == 2
    except ql.Unsupported as e:
        pytest.skip(f"{be.name}: {e}")
    return model


def _inductor_skip_reason():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "inductor on CPU compiles C++: no g++/c++ here (aot_eager covers the same graph)"
    return None


BACKENDS = ["eager", "aot_eager", "inductor"]


@pytest.mark.parametrize("compiler", BACKENDS)
def test_compile_equals_eager(qlinear_backend, compiler):
    if compiler == "inductor" and _inductor_skip_reason():
        pytest.skip(_inductor_skip_reason())
    torch._dynamo.reset()
    model = _model(qlinear_backend)
    compiled = torch.compile(model, backend=compiler)
    with torch.no_grad():
        for shape in [(3, 40), (2, 5, 40), (3, 40)]:
            x = torch.randn(*shape)
            want = model(x)
            got = compiled(x)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(got, want), f"{compiler}: compiled output differs from eager"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_compile_fullgraph_half_dtypes(qlinear_backend, dtype):
    """No graph break: the whole model is one graph with the qlinear operator in it."""
    torch._dynamo.reset()
    model = _model(qlinear_backend, seed=1, dtype=dtype)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        x = torch.randn(7, 40).to(dtype)
        assert torch.equal(compiled(x), model(x))


def test_compile_sees_state_changes_and_backward_still_fails():
    torch._dynamo.reset()
    model = _model("cpu", seed=2)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 40)
    with torch.no_grad():
        first = compiled(x)
        # New weights through load_state_dict: the compiled model runs them, as eager does.
        model.load_state_dict(_model("cpu", seed=3).state_dict())
        again = compiled(x)
        assert torch.equal(again, model(x)) and not torch.equal(again, first)
    xg = torch.randn(4, 40, requires_grad=True)
    y = compiled(xg)
    assert torch.equal(y.detach(), model(xg.detach()))
    with pytest.raises(ql.Unsupported, match="inference-only"):
        y.sum().backward()


def test_export_calls_the_operator():
    model = _model("cpu", seed=4)
    x = torch.randn(3, 40)
    ep = torch.export.export(model, (x,))
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.qlinear.linear.default) == 2
    x2 = torch.randn(3, 40)
    assert torch.equal(ep.module()(x2), model(x2))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_jit_trace_raises_unsupported(qlinear_backend):
    model = _model(qlinear_backend, seed=5)
    with pytest.raises(ql.Unsupported, match="torch.jit.trace"):
        torch.jit.trace(model, torch.randn(3, 40))
    # The module still runs eagerly afterwards.
    x = torch.randn(2, 40)
    assert model(x).shape == (2, 8)


def test_operator_refuses_a_stale_key():
    with pytest.raises(ql.InvalidProblem, match="qlinear::linear: expected the key"):
        torch.ops.qlinear.linear(torch.randn(2, 4), 10**12)

"""``qlinear.torch.quantize_linears``: which ``nn.Linear`` modules are swapped for
W8A8 ones, and which are kept."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the torch adapter's tests need torch: pip install torch==2.13.0 "
                    "(or pip install 'qlinear[torch]')")
from torch import nn  # noqa: E402

import qlinear as ql  # noqa: E402
import qlinear.torch as qlt  # noqa: E402
from torch_helpers import FF, LAYERS, mlp  # noqa: E402

# -- quantize_linears: what is swapped ---------------------------------------------------------

def test_quantize_linears_counts_and_swaps(float_encoder):
    model = copy.deepcopy(float_encoder)
    n = qlt.quantize_linears(model, backend="cpu")
    # embed, head, and linear1/linear2 of each layer; attention's out_proj stays float.
    assert n == 2 + 2 * LAYERS
    q = [name for name, m in model.named_modules() if isinstance(m, qlt.QLinear)]
    assert len(q) == n
    assert sorted(q) == sorted(["embed", "head"] + [f"encoder.layers.{i}.linear{j}"
                                                   for i in range(LAYERS) for j in (1, 2)])
    for i in range(LAYERS):
        out_proj = model.encoder.layers[i].self_attn.out_proj
        assert type(out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert not any(type(m) is nn.Linear for m in model.modules())
    # Quantizing again finds nothing left to swap.
    assert qlt.quantize_linears(model) == 0


def test_quantize_linears_keeps_buffers_and_training_flag():
    model = mlp().eval()
    w0 = model[0].weight.detach().clone()
    assert qlt.quantize_linears(model) == 2
    q = model[0]
    assert not q.training
    assert q.weight_q.dtype == torch.int8 and q.weight_q.shape == (96, 64)
    assert q.weight_scale.dtype == torch.float32 and q.weight_scale.shape == (96,)
    assert q.bias.dtype == torch.float32
    assert q.dtype == torch.float32
    # Per output channel, symmetric, round half to even on the f32 quotient.
    scale = (w0.abs().amax(dim=1) / 127)
    assert torch.equal(q.weight_scale, scale)
    want_q = torch.clamp(torch.round(w0 / scale[:, None]), -127, 127).to(torch.int8)
    assert torch.equal(q.weight_q, want_q)
    assert not list(model.parameters())


@pytest.mark.parametrize("skip,kept", [
    (["head"], {"head"}),
    ("head", {"head"}),
    (["encoder.layers.0"], {"encoder.layers.0.linear1", "encoder.layers.0.linear2"}),
    (("*.linear2",), {f"encoder.layers.{i}.linear2" for i in range(LAYERS)}),
    ({"embed", "encoder.layers.[12].linear1"},
     {"embed", "encoder.layers.1.linear1", "encoder.layers.2.linear1"}),
    (lambda name, m: m.out_features == FF, {f"encoder.layers.{i}.linear1" for i in range(LAYERS)}),
    ([], set()),
], ids=["list", "str", "parent", "glob", "set", "callable", "empty"])
def test_skip_filter(float_encoder, skip, kept):
    model = copy.deepcopy(float_encoder)
    n = qlt.quantize_linears(model, skip=skip)
    assert n == 2 + 2 * LAYERS - len(kept)
    floats = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    assert floats == kept


def test_skip_filter_rejects_non_names():
    with pytest.raises(ql.InvalidProblem, match="skip"):
        qlt.quantize_linears(mlp(), skip=[3])


def test_shared_and_nested_linears():
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared, nn.ReLU()),
                           "c": nn.Sequential(nn.Sequential(nn.Linear(8, 4, bias=False)))})
    assert qlt.quantize_linears(model) == 2
    assert model["a"] is model["b"][0] and isinstance(model["a"], qlt.QLinear)
    assert isinstance(model["c"][0][0], qlt.QLinear) and model["c"][0][0].bias is None


def test_subclass_with_own_forward_is_kept():
    class Lora(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class Plain(nn.Linear):
        pass

    model = nn.Sequential(Lora(8, 8), Plain(8, 8))
    assert qlt.quantize_linears(model) == 1
    assert type(model[0]) is Lora and isinstance(model[1], qlt.QLinear)


def test_bad_arguments():
    with pytest.raises(ql.InvalidProblem, match="from_linear"):
        qlt.quantize_linears(nn.Linear(4, 4))
    with pytest.raises(ql.InvalidProblem, match="module"):
        qlt.quantize_linears("not a module")
    with pytest.raises(ql.InvalidProblem, match="dtype"):
        qlt.quantize_linears(mlp(), dtype=torch.int8)
    with pytest.raises(ql.InvalidProblem, match="backend"):
        qlt.quantize_linears(mlp(), backend="tpu")
    layer = qlt.QLinear.from_linear(nn.Linear(16, 4))
    with pytest.raises(ql.InvalidProblem, match=r"\[\.\.\., 16\]"):
        layer(torch.randn(3, 15))
    with pytest.raises(ql.InvalidProblem, match="int32"):
        layer(torch.ones(3, 16, dtype=torch.int32))
    with pytest.raises(ql.InvalidProblem, match="torch.Tensor"):
        layer(np.ones((3, 16), np.float32))


# -- all or nothing ----------------------------------------------------------------------------

def _four_linears(third):
    """a, b.0, b.1, c: four linears whose third (``b.1``) is ``third``."""
    from collections import OrderedDict

    torch.manual_seed(12)
    return nn.Sequential(OrderedDict(a=nn.Linear(8, 16), b=nn.Sequential(nn.Linear(16, 16), third),
                                     c=nn.Linear(16, 4)))


def _nan_weight():
    lin = nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight[3, 5] = float("nan")
    return lin


def _inf_bias():
    lin = nn.Linear(16, 16)
    with torch.no_grad():
        lin.bias[2] = float("inf")
    return lin


def _big_for_f16():
    lin = nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight[0, 0] = 1e7  # max |w| / 127 > 65504: no f16 scale holds it
    return lin


BAD_THIRD = {
    "nan_weight": (_nan_weight, {}, ql.InvalidProblem, "weight: expected finite"),
    "inf_bias": (_inf_bias, {}, ql.InvalidProblem, "bias: expected finite"),
    "scale_overflows_f16": (_big_for_f16, {"dtype": torch.float16}, ql.InvalidProblem,
                            "f16's range"),
    "complex_dtype": (lambda: nn.Linear(16, 16, dtype=torch.complex64), {}, ql.InvalidProblem,
                      "dtype: expected"),
    "k_too_large": (lambda: nn.Linear(ql.max_exact_k() + 1, 16), {}, ql.InvalidProblem,
                    "k: expected at most"),
    "f64_on_wgpu": (lambda: nn.Linear(16, 16, dtype=torch.float64), {"backend": "wgpu"},
                    ql.Unsupported, "f64"),
}


def _bits(t):
    t = t.detach()
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("case", list(BAD_THIRD))
def test_quantize_linears_is_all_or_nothing(case):
    make, kwargs, error, match = BAD_THIRD[case]
    if kwargs.get("backend") == "wgpu":
        try:
            ql.backend("wgpu")
        except ql.BackendUnavailable as e:
            pytest.skip(f"wgpu unavailable: {e.reason}")
    model = _four_linears(make())
    before = dict(model.named_modules())
    state = {k: _bits(v).clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as info:
        qlt.quantize_linears(model, **kwargs)
    assert "module 'b.1'" in str(info.value) and match in str(info.value), str(info.value)
    # Nothing swapped, nothing written: the same modules, the same bits.
    assert dict(model.named_modules()) == before
    assert all(type(m) is nn.Linear for m in (model.a, model.b[0], model.b[1], model.c))
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(_bits(after[k]), v), k
    assert not any(isinstance(m, qlt.QLinear) for m in model.modules())


def test_quantize_linears_after_a_fix_swaps_all():
    model = _four_linears(_nan_weight())
    with pytest.raises(ql.InvalidProblem):
        qlt.quantize_linears(model)
    with torch.no_grad():
        model.b[1].weight[3, 5] = 0.1
    assert qlt.quantize_linears(model) == 4

"""``qlinear.torch.QLinear``: one layer against the float64 contract, on CPU tensors
(cpu backend) and CUDA tensors (cuda backend, zero-copy on torch's current stream) where
both are available; dtypes, state, copies, autograd, backends."""

import copy
import io
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the torch adapter's tests need torch: pip install torch==2.13.0 "
                    "(or pip install 'qlinear[torch]')")
from torch import nn  # noqa: E402

import qlinear as ql  # noqa: E402
import qlinear.torch as qlt  # noqa: E402
from torch_helpers import TD_IDS, TDTYPES, Encoder, batch, check_contract, mlp, sync  # noqa: E402

# -- one layer against the float64 contract -----------------------------------------------------

@pytest.mark.parametrize("tdtype", TDTYPES, ids=TD_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_matches_contract(device, tdtype, bias):
    torch.manual_seed(3)
    lin = nn.Linear(200, 72, bias=bias).to(device, tdtype)
    q = qlt.QLinear.from_linear(lin)
    assert q.dtype == tdtype
    x = (torch.randn(3, 5, 200) * 4).to(device, tdtype)
    y = q(x)
    sync(device)
    assert y.shape == (3, 5, 72) and y.dtype == tdtype and y.device == x.device
    check_contract(y.reshape(-1, 72), x.reshape(-1, 200), q.weight_q, q.weight_scale, q.bias)


@pytest.mark.parametrize("shape", [(200,), (1, 200), (7, 200), (2, 3, 4, 200), (0, 200),
                                   (3, 0, 200)],
                         ids=lambda s: "x".join(map(str, s)))
def test_shapes(device, shape):
    torch.manual_seed(4)
    q = qlt.QLinear.from_linear(nn.Linear(200, 24)).to(device)
    x = torch.randn(*shape, device=device)
    y = q(x)
    sync(device)
    assert y.shape == (*shape[:-1], 24) and y.dtype == x.dtype and y.device == x.device
    if x.numel():
        check_contract(y.reshape(-1, 24), x.reshape(-1, 200), q.weight_q, q.weight_scale, q.bias)


def test_non_contiguous_input(device):
    torch.manual_seed(5)
    q = qlt.QLinear.from_linear(nn.Linear(32, 16)).to(device)
    base = torch.randn(32, 10, device=device)
    x = base.T  # [10, 32], not contiguous
    assert not x.is_contiguous()
    y = q(x)
    assert torch.equal(y, q(x.contiguous()))


def test_scratch_is_reused_and_grows(device):
    torch.manual_seed(6)
    q = qlt.QLinear.from_linear(nn.Linear(64, 32)).to(device)
    q(torch.randn(4, 64, device=device))
    layer = q.backend_layer(torch.float32, device)
    q(torch.randn(100, 64, device=device))
    scratch = layer._scratch
    assert scratch[0].shape[0] >= 100
    q(torch.randn(3, 64, device=device))
    assert q.backend_layer(torch.float32, device) is layer and layer._scratch is scratch


def test_cpu_path_is_zero_copy(monkeypatch):
    torch.manual_seed(7)
    q = qlt.QLinear.from_linear(nn.Linear(64, 32), backend="cpu")
    seen = {}
    layer = q.backend_layer(torch.float32, "cpu")
    real = layer.forward

    def spy(x, out=None, stream=None):
        seen["x"], seen["out"] = x, out
        return real(x, out=out, stream=stream)

    monkeypatch.setattr(layer, "forward", spy)
    for tdtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 64).to(tdtype)
        if tdtype != torch.float32:
            layer = q.backend_layer(tdtype, "cpu")
            real = layer.forward
            monkeypatch.setattr(layer, "forward", spy)
        y = q(x)
        assert seen["x"].__array_interface__["data"][0] == x.data_ptr()
        assert seen["out"].__array_interface__["data"][0] == y.data_ptr()


# -- dtypes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_dtype", TDTYPES, ids=TD_IDS)
@pytest.mark.parametrize("input_dtype", TDTYPES, ids=TD_IDS)
def test_input_dtype_other_than_layer_dtype(device, layer_dtype, input_dtype):
    """Like torchao's dynamic int8: the output has the input's dtype; the same int8 weight
    is used with its scales (and bias) rounded to the input's dtype."""
    torch.manual_seed(8)
    q = qlt.QLinear.from_linear(nn.Linear(96, 40), dtype=layer_dtype).to(device)
    assert q.dtype == layer_dtype and q.weight_scale.dtype == layer_dtype
    x = torch.randn(6, 96).to(device, input_dtype)
    y = q(x)
    sync(device)
    assert y.dtype == input_dtype and y.device == x.device
    check_contract(y, x, q.weight_q, q.weight_scale.to(input_dtype), q.bias.to(input_dtype))


def test_f64_input_on_cpu():
    q = qlt.QLinear.from_linear(nn.Linear(48, 8).double())
    x = torch.randn(5, 48, dtype=torch.float64)
    y = q(x)
    assert y.dtype == torch.float64
    check_contract(y, x, q.weight_q, q.weight_scale, q.bias)


def test_scale_not_representable_in_input_dtype():
    lin = nn.Linear(8, 2)
    with torch.no_grad():
        lin.weight[0] = 1e8  # scale ~8e5: beyond float16's 65504
    q = qlt.QLinear.from_linear(lin)
    with pytest.raises(ql.InvalidProblem, match="float16"):
        q(torch.randn(2, 8, dtype=torch.float16))


def test_module_dtype_conversion_follows(device):
    torch.manual_seed(9)
    model = mlp().to(device)
    qlt.quantize_linears(model)
    model.to(torch.bfloat16)
    assert model[0].weight_scale.dtype == torch.bfloat16 and model[0].weight_q.dtype == torch.int8
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    assert model(x).dtype == torch.bfloat16
    model.half()
    assert model(x.half()).dtype == torch.float16


# -- state_dict, copies, repr, autograd ------------------------------------------------------------

def test_state_dict_round_trip(device):
    torch.manual_seed(10)
    model = Encoder(seed=0, layers=2).to(device).eval()
    qlt.quantize_linears(model)
    sd = model.state_dict()
    assert "embed.weight" not in sd and "encoder.layers.0.linear1.weight" not in sd
    assert sd["embed.weight_q"].dtype == torch.int8
    assert sd["embed.weight_scale"].dtype == torch.float32 and "embed.bias" in sd
    # Float weights are kept only where nothing was swapped (attention).
    floats = {k for k, v in sd.items() if v.is_floating_point() and v.dim() == 2}
    assert all("self_attn" in k for k in floats)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True, map_location=device)

    fresh = Encoder(seed=123, layers=2).to(device).eval()
    qlt.quantize_linears(fresh)
    x = batch(b=2, s=16).to(device)
    with torch.inference_mode():
        want = model(x)
        assert not torch.equal(fresh(x), want)
        fresh.load_state_dict(loaded)
        got = fresh(x)
    sync(device)
    assert torch.equal(got, want)


def test_quantize_and_load_under_inference_mode():
    """Buffers made under inference_mode have no version counter: loading still refreshes."""
    x = torch.randn(3, 64)
    with torch.inference_mode():
        model = mlp(seed=1)
        qlt.quantize_linears(model)
        before = model(x)
        src = mlp(seed=2)
        qlt.quantize_linears(src)
        model.load_state_dict(src.state_dict())
        assert torch.equal(model(x), src(x)) and not torch.equal(model(x), before)


def test_empty_qlinear_loads_state():
    src = qlt.QLinear.from_linear(nn.Linear(24, 10))
    dst = qlt.QLinear(24, 10)
    x = torch.randn(3, 24)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(x), src(x))


def test_deepcopy_and_pickle():
    model = mlp()
    qlt.quantize_linears(model)
    x = torch.randn(3, 64)
    y = model(x)
    assert torch.equal(copy.deepcopy(model)(x), y)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)


def test_repr():
    model = mlp()
    qlt.quantize_linears(model, backend="cpu", dtype=torch.bfloat16)
    r = repr(model[0])
    for part in ("QLinear(", "in_features=64", "out_features=96", "bias=True", "dtype=bfloat16",
                 "backend=cpu", "W8A8"):
        assert part in r, r
    auto = qlt.QLinear.from_linear(nn.Linear(4, 2, bias=False))
    assert "backend=auto (cpu)" in repr(auto) and "bias=False" in repr(auto)


def test_inference_only():
    model = mlp()
    qlt.quantize_linears(model)
    x = torch.randn(3, 64, requires_grad=True)
    y = model(x)  # forward works with grad enabled
    assert y.requires_grad
    with pytest.raises(ql.Unsupported, match="inference-only"):
        y.sum().backward()
    with torch.inference_mode():
        assert not model(x.detach()).requires_grad


def test_cpu_tensors_on_every_backend(qlinear_backend):
    torch.manual_seed(11)
    q = qlt.QLinear.from_linear(nn.Linear(40, 12), backend=qlinear_backend)
    x = torch.randn(2, 3, 40)
    y = q(x)
    assert y.device.type == "cpu" and y.shape == (2, 3, 12)
    check_contract(y.reshape(-1, 12), x.reshape(-1, 40), q.weight_q, q.weight_scale, q.bias)


def test_cuda_tensor_needs_cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch here (torch.cuda.is_available() is False)")
    q = qlt.QLinear.from_linear(nn.Linear(16, 8), backend="cpu").cuda()
    with pytest.raises(ql.InvalidProblem, match="backend"):
        q(torch.randn(2, 16, device="cuda"))


def test_core_does_not_import_torch():
    """Neither importing qlinear nor running a cpu layer on the numpy engine imports torch
    (the oneDNN engine imports it when it is chosen: tests/test_cpu_engine.py)."""
    code = ("import sys, numpy as np, qlinear, qlinear.bench.peers, qlinear.cli\n"
            "layer = qlinear.QuantizedLinear.from_float(np.eye(4, dtype=np.float32), "
            "backend='cpu')\n"
            "layer(np.ones((3, 4), np.float32))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), QLINEAR_CPU_ENGINE="numpy")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_k_zero_gives_the_bias(qlinear_backend, bias):
    """K = 0 through the adapter: y is the bias broadcast, or zeros without one."""
    lin = nn.Linear(0, 5, bias=bias)
    if bias:
        with torch.no_grad():
            lin.bias.copy_(torch.randn(5))
    q = qlt.QLinear.from_linear(lin, backend=qlinear_backend)
    want_row = lin.bias.detach() if bias else torch.zeros(5)
    for shape in [(3, 0), (2, 4, 0), (0,), (0, 0)]:
        y = q(torch.empty(shape))
        assert y.shape == (*shape[:-1], 5) and y.dtype == torch.float32
        assert torch.equal(y, want_row.expand(y.shape)), shape


def test_constructor_checks_sizes_now():
    for bad in (True, 2.0, "8", -1):
        with pytest.raises(ql.InvalidProblem, match="^in_features: expected"):
            qlt.QLinear(bad, 4)
    with pytest.raises(ql.InvalidProblem, match="^out_features: expected"):
        qlt.QLinear(4, False)
    with pytest.raises(ql.InvalidProblem, match="^k: expected at most"):
        qlt.QLinear(ql.max_exact_k() + 1, 2)
    assert qlt.QLinear(np.int64(4), np.int32(3)).weight_q.shape == (3, 4)

"""The torch adapter (``qlinear.torch``) and the torch peers (``qlinear.bench.peers``).

Device-parametrised tests run on CPU tensors (cpu backend) and on CUDA tensors (cuda
backend, zero-copy on torch's current stream) where both torch CUDA and qlinear's cuda
backend are available; elsewhere the CUDA cases skip with the reason.
"""

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
from qlinear.bench.peers import TORCH_MATMUL, TORCH_W8A8, torch_peers  # noqa: E402

TDTYPES = [torch.float32, torch.float16, torch.bfloat16]
TD_IDS = ["f32", "f16", "bf16"]
D_MODEL, HEADS, FF, LAYERS = 384, 6, 1536, 4


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device for torch here (torch.cuda.is_available() is False)"
    try:
        ql.backend("cuda")
    except ql.BackendUnavailable as e:
        return f"qlinear cuda backend unavailable: {e.reason}"
    return None


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """A torch device whose tensors the adapter runs with backend=None."""
    if request.param == "cuda":
        reason = _cuda_skip_reason()
        if reason:
            pytest.skip(reason)
    return torch.device(request.param)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the numerical contract in float64, independent of qlinear's code ----------------------

def _contract(x, weight_q, weight_scale, bias, q_max=127):
    """Steps 1-5 in float64: ``(y64 before rounding to TIn, t = x / scale, scale, acc)``."""
    x64 = x.detach().cpu().double()
    amax = x64.abs().amax(dim=1) if x64.shape[1] else torch.zeros(x64.shape[0], dtype=torch.float64)
    # The f64 quotient rounded to TIn is the correctly rounded f32 quotient (53 >= 2*24 + 2).
    scale = (amax / q_max).to(x.dtype).double()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    t = x64 / scale[:, None]
    q = torch.clamp(torch.round(t), -q_max, q_max)  # round half to even
    acc = q @ weight_q.detach().cpu().double().T  # exact: |acc| < 2**53
    y = acc * scale[:, None] * weight_scale.detach().cpu().double()[None, :]
    if bias is not None:
        y = y + bias.detach().cpu().double()[None, :]
    return y, t, scale, acc


def contract_w8a8(x, weight_q, weight_scale, bias, q_max=127):
    """``y`` for ``x[M, K]`` (TIn) per the numerical contract, computed in float64 and
    rounded once to TIn; ``weight_scale``/``bias`` are used as stored, in TIn."""
    return _contract(x, weight_q, weight_scale, bias, q_max)[0].to(x.dtype)


class ContractLinear(nn.Module):
    """The float64 contract in place of a QLinear, with the same buffers."""

    def __init__(self, q: qlt.QLinear):
        super().__init__()
        self.weight_q = q.weight_q.detach().cpu().clone()
        self.weight_scale = q.weight_scale.detach().cpu().clone()
        self.bias = None if q.bias is None else q.bias.detach().cpu().clone()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        x2 = x.reshape(-1, x.shape[-1])
        tdt = x.dtype
        y = contract_w8a8(x2, self.weight_q, self.weight_scale.to(tdt),
                          None if self.bias is None else self.bias.to(tdt))
        return y.to(x.device).reshape(*x.shape[:-1], -1)


def contract_copy(model: nn.Module) -> nn.Module:
    """A copy of a quantized ``model`` with every QLinear replaced by ContractLinear."""
    ref = copy.deepcopy(model)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, qlt.QLinear):
            parent_name, _, attr = name.rpartition(".")
            parent = ref.get_submodule(parent_name) if parent_name else ref
            setattr(parent, attr, ContractLinear(mod))
    return ref


class fastpath_off:
    """Torch's fused encoder path reads ``linear.weight``, which ContractLinear lacks."""

    def __enter__(self):
        self.was = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.was)


def check_contract(y, x, weight_q, weight_scale, bias):
    """Assert that ``y[M, N]`` for ``x[M, K]`` is as close to the float64 contract as a
    conforming backend must be, per element:

    * step 5 in f32 (three roundings) instead of f64 rounded once: 4 f32 epsilons of the
      terms' magnitude ``|acc * scale * weight_scale| + |bias|``;
    * for f16/bf16, that difference may cross a rounding boundary of TIn: one unit in the
      last place of TIn of the result;
    * step 3 through a rounded quotient (or a reciprocal): a q whose ``x / scale`` lies
      within 3e-5 of a rounding edge (n + 1/2) may land on either side, moving y by
      ``scale * weight_scale * |w_q|``.

    Returns figures: the largest error, the largest error / bound, the largest error in
    rows with no q on a rounding edge (step 5's rounding alone), the count of edge q."""
    tdt = x.dtype
    y64, t, scale, acc = _contract(x, weight_q, weight_scale, bias)
    want = y64.to(tdt).double()
    ws = weight_scale.detach().cpu().double()
    mag = (acc * scale[:, None] * ws[None, :]).abs()
    if bias is not None:
        mag = mag + bias.detach().cpu().double().abs()[None, :]
    bound = 4 * torch.finfo(torch.float32).eps * mag
    if tdt != torch.float32:
        bound += torch.clamp(want.abs(), min=torch.finfo(tdt).tiny) * torch.finfo(tdt).eps
    edge = (t - torch.floor(t) - 0.5).abs() < 3e-5
    rows = edge.any(dim=1)
    if rows.any():
        # Where a flip happened the error is this term exactly: 1.001 leaves room for step 5.
        flip = edge[rows].double() @ weight_q.detach().cpu().double().abs().T
        bound[rows] += 1.001 * flip * scale[rows, None] * ws[None, :]
    err = (y.detach().cpu().double().reshape(want.shape) - want).abs()
    if not err.numel():
        return {"max_err": 0.0, "max_err_over_bound": 0.0, "max_err_no_edge": 0.0, "edge_q": 0}
    bad = err > bound
    ratio = float((err / bound).max())
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} outputs beyond the contract's bound; worst "
        f"error / bound {ratio:.3g}")
    return {"max_err": float(err.max()), "max_err_over_bound": ratio,
            "max_err_no_edge": float(err[~rows].max()) if (~rows).any() else 0.0,
            "edge_q": int(edge.sum())}


# -- models ------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """A small transformer encoder from torch.nn: input projection, LAYERS post-norm
    encoder layers (batch first, so eval + no_grad meets torch's fused fast path), head."""

    def __init__(self, seed=0, layers=LAYERS):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(D_MODEL, D_MODEL)
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, dropout=0.0, activation="gelu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=True)
        self.head = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x, src_key_padding_mask=None):
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=src_key_padding_mask))


def mlp(seed=0, k=64, hidden=96, n=48, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, hidden, bias=bias), nn.GELU(),
                         nn.Linear(hidden, n, bias=bias))


def batch(seed=1, b=8, s=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, D_MODEL, generator=g)


@pytest.fixture(scope="module")
def float_encoder():
    return Encoder(seed=0).eval()


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
    _sync(device)
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
    _sync(device)
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
    _sync(device)
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
    _sync(device)
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
    code = ("import sys, numpy as np, qlinear, qlinear.bench.peers, qlinear.cli\n"
            "qlinear.QuantizedLinear.from_float(np.eye(4, dtype=np.float32), backend='cpu')\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# -- fidelity: a transformer encoder ---------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("padding", [False, True], ids=["dense", "padding_mask"])
def test_encoder_fidelity(device, float_encoder, padding, record_property, monkeypatch):
    """The quantized encoder against the float model and against the float64 contract.

    * vs float: cosine per sequence (the quantization error itself);
    * each W8A8 linear, on the activations it really received inside the model, against
      the float64 contract: within :func:`check_contract`'s bound (a few f32 epsilons,
      plus one LSB step where a q sits on a rounding edge);
    * the whole model against a copy with the float64 contract swapped in for every W8A8
      linear. This one cannot be bit-tight: two conforming implementations may differ by
      one f32 rounding in step 5, and the next layers' quantizers turn such a difference
      into whole-LSB steps wherever a value sits near a rounding edge. It is asserted to
      be a small fraction of the quantization error.
    """
    n_linears = 2 + 2 * LAYERS
    fmodel = copy.deepcopy(float_encoder).to(device)
    qmodel = copy.deepcopy(float_encoder).to(device)
    assert qlt.quantize_linears(qmodel) == n_linears
    ref = contract_copy(qmodel)
    x = batch(b=8, s=64).to(device)
    mask = None
    if padding:
        # Left-aligned padding: torch's nested-tensor encoder path would apply.
        lengths = torch.tensor([64, 60, 48, 64, 33, 64, 12, 64])
        mask = (torch.arange(64)[None, :] >= lengths[:, None]).to(device)

    calls = []
    orig_run = qlt.QLinear._run

    def spy(self, layer, x2):
        y = orig_run(self, layer, x2)
        calls.append((self, x2.clone(), y.clone()))
        return y

    monkeypatch.setattr(qlt.QLinear, "_run", spy)
    with torch.inference_mode():
        yf = fmodel(x, src_key_padding_mask=mask)
        yq = qmodel(x, src_key_padding_mask=mask)
        with fastpath_off():
            yr = ref(x, src_key_padding_mask=mask)
    _sync(device)
    # Every swapped linear ran through qlinear: torch's fused path bypassed none.
    assert len(calls) == n_linears
    assert sum(m.calls for m in ref.modules() if isinstance(m, ContractLinear)) == n_linears

    layer = {"max_err": 0.0, "max_err_over_bound": 0.0, "max_err_no_edge": 0.0, "edge_q": 0}
    for mod, x2, y in calls:
        got = check_contract(y, x2, mod.weight_q, mod.weight_scale, mod.bias)
        for key, value in got.items():
            layer[key] = layer[key] + value if key == "edge_q" else max(layer[key], value)

    valid = torch.ones(8, 64, dtype=torch.bool) if mask is None else ~mask.cpu()
    yf, yq, yr = (t.detach().cpu().double() * valid[..., None] for t in (yf, yq, yr))
    cos = torch.nn.functional.cosine_similarity(yq.flatten(1), yf.flatten(1), dim=1)
    cos_ref = torch.nn.functional.cosine_similarity(yq.flatten(1), yr.flatten(1), dim=1)
    err_float = float((yq - yf).abs().max())
    err_model = float((yq - yr).abs().max())
    figures = {"cosine_vs_float_min": float(cos.min()), "cosine_vs_float_mean": float(cos.mean()),
               "max_abs_err_vs_float": err_float,
               "layer_max_abs_err_vs_f64_contract": layer["max_err"],
               "layer_max_err_over_bound": layer["max_err_over_bound"],
               "layer_max_abs_err_rows_without_edge_q": layer["max_err_no_edge"],
               "q_on_rounding_edge": layer["edge_q"],
               "model_max_abs_err_vs_f64_contract_copy": err_model,
               "model_cosine_vs_f64_contract_copy_min": float(cos_ref.min()),
               "output_max_abs": float(yr.abs().max())}
    for key, value in figures.items():
        record_property(key, value)
    print(f"\n[{device.type}, {'padding mask' if padding else 'dense'}] "
          + ", ".join(f"{k} {v:.6g}" for k, v in figures.items()))
    assert float(cos.min()) > 0.99
    assert float(cos_ref.min()) > 0.99999
    assert err_model < err_float / 2


def test_encoder_fidelity_bf16(device, float_encoder, record_property):
    """A bf16 model: quantized (bf16 scales, bf16 in and out) vs the float32 model."""
    fmodel = copy.deepcopy(float_encoder).to(device)
    qmodel = copy.deepcopy(float_encoder).to(device, torch.bfloat16)
    qlt.quantize_linears(qmodel)
    x = batch(b=4, s=32).to(device)
    with torch.inference_mode():
        yf = fmodel(x)
        yq = qmodel(x.bfloat16())
    assert yq.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(yq.float().flatten(1), yf.flatten(1), dim=1)
    record_property("cosine_min_bf16", float(cos.min()))
    print(f"\n[{device.type}, bf16] cosine vs float32 model per sequence: "
          f"min {float(cos.min()):.6f}")
    assert float(cos.min()) > 0.99


# -- peers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f32", "bf16", ql.f16], ids=["f32", "bf16", "f16"])
def test_torch_peers_run(dtype):
    peers = torch_peers(24, 64, 40, dtype)
    assert set(peers) == {TORCH_MATMUL, TORCH_W8A8}
    for fn in peers.values():
        assert fn() is None
        assert fn.detail
    # torch 2.13 has _int_mm on CPU; the peer uses it rather than a fallback.
    assert "torch._int_mm" in peers[TORCH_W8A8].detail


def test_torch_peers_without_torch_or_device(monkeypatch):
    assert torch_peers(4, 8, 8, "f32", device="no-such-device") == {}
    if not torch.cuda.is_available():
        assert torch_peers(4, 8, 8, "f32", device="cuda") == {}
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    assert torch_peers(4, 8, 8, "f32") == {}
    with pytest.raises(ql.InvalidProblem, match="m"):
        torch_peers(0, 8, 8, "f32")

"""What the torch adapter's tests share: the numerical contract restated in float64 torch
ops (independent of qlinear's code), small models, and device helpers. Import it only
after ``pytest.importorskip("torch")``."""

import copy

import torch
from torch import nn

import qlinear as ql
import qlinear.torch as qlt

TDTYPES = [torch.float32, torch.float16, torch.bfloat16]
TD_IDS = ["f32", "f16", "bf16"]
D_MODEL, HEADS, FF, LAYERS = 384, 6, 1536, 4


def cuda_skip_reason():
    """Why CUDA tensors cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device for torch here (torch.cuda.is_available() is False)"
    try:
        ql.backend("cuda")
    except ql.BackendUnavailable as e:
        return f"qlinear cuda backend unavailable: {e.reason}"
    return None


def sync(device):
    """Wait for the work on ``device`` (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the numerical contract in float64, independent of qlinear's code ----------------------

def contract64(x, weight_q, weight_scale, bias, q_max=127):
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
    return contract64(x, weight_q, weight_scale, bias, q_max)[0].to(x.dtype)


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
    y64, t, scale, acc = contract64(x, weight_q, weight_scale, bias)
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

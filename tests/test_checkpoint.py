"""compressed-tensors W8A8 checkpoints, written by compressed-tensors itself, run by qlinear:
``qlinear.torch.load_compressed`` and the torch-free ``qlinear.checkpoint`` reader.

Each swapped layer is checked three ways: (a) bit for bit against an independent oracle
of the numerical contract fed with the checkpoint's own int8 weight and scales (read
here with safetensors, poisoned outputs); (b) against compressed-tensors' own
fake-quantized layer on the same input, in units of one activation quantization step
(its dynamic rule is amax / 127.5 and includes 0 in an asymmetric range, qlinear's and
vLLM's amax / 127 and min..max); (c) the whole model against the fake-quantized and the
float model (cosine, reported)."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the checkpoint tests need torch==2.13.0")
pytest.importorskip("transformers", reason="the checkpoint tests need transformers")
pytest.importorskip("compressed_tensors",
                    reason="the checkpoint tests need compressed-tensors (pip install "
                           "compressed-tensors)")

import checkpoint_helpers as ch  # noqa: E402

import qlinear as ql  # noqa: E402
import qlinear.torch as qlt  # noqa: E402
from qlinear.checkpoint import load_quantized_linears, open_compressed  # noqa: E402
from qltest import assert_bitwise_equal, oracle_linear_scheme, poisoned  # noqa: E402

KINDS = list(ch.INPUTS)
N_SWAPPED = 2 * 6 - 1  # two layers of six linears, one ignored
IGNORED = "encoder.layer.1.output.dense"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Checkpoints by (kind, weight strategy, dtype, sharded), written once per module."""
    cache = {}

    def get(kind, strategy="channel", dtype=torch.float32, shard=None):
        key = (kind, strategy, dtype, shard)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"ckpt-{kind}-{strategy}")
            fmodel, fake = ch.write_checkpoint(path, kind, dtype=dtype,
                                               weight_strategy=strategy, shard=shard)
            cache[key] = (path, fmodel, fake)
        return cache[key]

    return get


def _capture(model, cls):
    """Forward hooks recording ``name -> (input, output)`` of every ``cls`` module."""
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, cls):
            def hook(mod, args, out, name=name):
                seen[name] = (args[0].detach().clone(), out.detach().clone())
            hooks.append(mod.register_forward_hook(hook))
    return seen, hooks


def _oracle(tensors, name, x2, kind, dtype):
    """The contract's output for ``x2`` from the checkpoint's own tensors (per-tensor weight
    scales broadcast), and the row scales it used."""
    wq = tensors[f"{name}.weight"]
    n = wq.shape[0]
    ws = np.broadcast_to(tensors[f"{name}.weight_scale"].reshape(-1), (n,)).copy()
    bias = tensors.get(f"{name}.bias")
    s = tensors.get(f"{name}.input_scale")
    z = tensors.get(f"{name}.input_zero_point")
    q_min, q_max = ch.Q_RANGE[kind]
    y, _, scale, _ = oracle_linear_scheme(
        x2, wq, ws, bias, dtype, kind, None if s is None else float(s.reshape(())),
        None if z is None or kind != "static_asym" else int(z.reshape(())), q_min, q_max)
    return y, scale


def _ct_step(x2, kind):
    """compressed-tensors' activation step per row (its dynamic rules), or None."""
    if kind == "dynamic":
        return np.abs(x2).max(axis=1) / 127.5
    if kind == "dynamic_asym":
        return (np.maximum(x2.max(axis=1), 0) - np.minimum(x2.min(axis=1), 0)) / 255
    return None


def _cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_runs_as_quantized(written, kind, record_property):
    path, fmodel, fake = written(kind)
    tensors = ch.read_all(path)
    model = ch.float_model(seed=7)  # other weights: everything must come from the file
    assert qlt.load_compressed(model, path, backend="cpu") == N_SWAPPED
    swapped = {n for n, m in model.named_modules() if isinstance(m, qlt.QLinear)}
    assert swapped == set(ch.quantized_layers(tensors))
    assert IGNORED not in swapped  # ignored: float, from the file
    ign = model.encoder.layer[1].output.dense
    assert torch.equal(ign.weight, torch.from_numpy(tensors[f"{IGNORED}.weight"]))
    for name, t in model.state_dict().items():
        if name.rpartition(".")[0] not in swapped:
            assert torch.equal(t, torch.from_numpy(tensors[name])), name
    ids = ch.tokens(5)
    q_seen, q_hooks = _capture(model, qlt.QLinear)
    ct_seen, ct_hooks = _capture(fake, torch.nn.Linear)
    with torch.no_grad():
        yq = model(ids).last_hidden_state
        yc = fake(ids).last_hidden_state
        yf = fmodel(ids).last_hidden_state
    for h in q_hooks + ct_hooks:
        h.remove()
    assert set(q_seen) == swapped
    rng = np.random.default_rng()
    worst = 0.0
    for name in sorted(swapped):
        mod = model.get_submodule(name)
        # (a) on the input this layer saw in the qlinear model: exact, poisoned output.
        x, y = q_seen[name]
        x2 = x.reshape(-1, x.shape[-1]).numpy()
        want, _ = _oracle(tensors, name, x2, kind, ql.f32)
        assert_bitwise_equal(y.reshape(want.shape).numpy(), want, f"{name} (QLinear)")
        layer = mod.backend_layer(torch.float32, "cpu")
        out = poisoned(layer.backend, want.shape, ql.f32, rng)
        layer.forward(x2, out=out)
        assert_bitwise_equal(layer.backend.to_numpy(out), want, f"{name} (poisoned output)")
        # (b) on the input compressed-tensors' layer saw: within one step of its output.
        xc, yct = ct_seen[name]
        xc2 = xc.reshape(-1, xc.shape[-1]).numpy()
        with torch.no_grad():
            yql = mod(xc).reshape(-1, mod.out_features).double().numpy()
        yct = yct.reshape(yql.shape).double().numpy()
        w_abs = np.abs(tensors[f"{name}.weight"].astype(np.float64)) * np.broadcast_to(
            tensors[f"{name}.weight_scale"].reshape(-1), (mod.out_features,))[:, None]
        _, ours = _oracle(tensors, name, xc2, kind, ql.f32)
        ct = _ct_step(xc2, kind)
        step = ours.astype(np.float64) if ct is None else (ours + ct) / 2
        bound = step[:, None] * w_abs.sum(axis=1)[None, :] + 1e-5 * (np.abs(yct) + 1e-3)
        ratio = np.abs(yql - yct) / bound
        worst = max(worst, float(ratio.max()))
        # Static inputs follow the same rule in both: only float rounding may differ.
        assert ratio.max() <= (1 if kind.startswith("dynamic") else 0.05), (name, worst)
    # (c) the whole model, reported.
    cos_ct, cos_f = _cosine(yq, yc), _cosine(yq, yf)
    record_property(f"cosine_vs_fake_quant_{kind}", cos_ct)
    record_property(f"cosine_vs_float_{kind}", cos_f)
    record_property(f"layer_error_in_steps_{kind}", worst)
    print(f"\n{kind}: 1 - cosine vs compressed-tensors fake-quant {1 - cos_ct:.2e}, vs float "
          f"{1 - cos_f:.2e}; worst layer error {worst:.3f} of the one-step bound")
    assert cos_ct > 0.99 and cos_f > 0.98


@pytest.mark.parametrize("kind", ["static_asym", "dynamic"])
def test_torch_free_reader_gives_the_checkpoints_layers(written, kind):
    path, _, _ = written(kind)
    tensors = ch.read_all(path)
    layers = load_quantized_linears(path, backend="cpu")
    assert sorted(layers) == ch.quantized_layers(tensors)
    rng = np.random.default_rng()
    q_min, q_max = ch.Q_RANGE[kind]
    for name, layer in layers.items():
        wq, ws, bias = layer.host_arrays()
        assert_bitwise_equal(wq, tensors[f"{name}.weight"], f"{name}.weight")
        assert_bitwise_equal(ws, tensors[f"{name}.weight_scale"].reshape(-1), "weight_scale")
        assert_bitwise_equal(bias, tensors[f"{name}.bias"], f"{name}.bias")
        assert (layer.scheme.value, layer.q_min, layer.q_max) == (kind, q_min, q_max)
        if kind == "static_asym":
            assert layer.input_scale == float(tensors[f"{name}.input_scale"][0])
            assert layer.input_zero_point == int(tensors[f"{name}.input_zero_point"][0])
        x = (rng.standard_normal((5, layer.in_features)) * 2).astype(np.float32)
        out = poisoned(layer.backend, (5, layer.out_features), ql.f32, rng)
        layer.forward(x, out=out)
        want = _oracle(tensors, name, x, kind, ql.f32)[0]
        assert_bitwise_equal(layer.backend.to_numpy(out), want, name)
    # What is not part of a quantized layer stays readable.
    ckpt = open_compressed(path)
    emb = "embeddings.word_embeddings.weight"
    assert_bitwise_equal(ckpt.tensor(emb), tensors[emb], emb)


def test_per_tensor_weights_bf16_and_shards(written):
    """Per-tensor weight scales ([1], broadcast), a bf16 model, a sharded checkpoint."""
    path, _, fake = written("static", "tensor", torch.bfloat16, "40KB")
    assert (path / "model.safetensors.index.json").exists()
    tensors = ch.read_all(path)
    model = ch.float_model(seed=3, dtype=torch.bfloat16)
    assert qlt.load_compressed(model, path) == N_SWAPPED
    q = model.encoder.layer[0].attention.self.query
    assert q.dtype == torch.bfloat16 and q.weight_scale.shape == (q.out_features,)
    name = "encoder.layer.0.attention.self.query"
    assert tensors[f"{name}.weight_scale"].shape == (1,)
    rng = np.random.default_rng()
    x = torch.randn(4, q.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
    want, _ = _oracle(tensors, name, qlt.to_numpy_view(x), "static", ql.bf16)
    assert_bitwise_equal(qlt.to_numpy_view(y), want, name)
    layer = load_quantized_linears(path)[name]
    out = poisoned(layer.backend, want.shape, ql.bf16, rng)
    layer.forward(qlt.to_numpy_view(x), out=out)
    assert_bitwise_equal(layer.backend.to_numpy(out), want, f"{name} (torch-free)")
    with torch.no_grad():
        cos = _cosine(model(ch.tokens(9)).last_hidden_state.float(),
                      fake(ch.tokens(9)).last_hidden_state.float())
    assert cos > 0.98


# -- bad checkpoints: named errors, the model untouched ------------------------------------

def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    from safetensors.numpy import save_file

    tensors = ch.read_all(path)
    fn(tensors)
    (path / "model.safetensors").unlink()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _group(qc):
    return qc["config_groups"]["group_0"]


LAYER = "encoder.layer.0.attention.self.key"
BAD = {
    "packed_int4": (lambda p: _edit_config(p, lambda qc: _group(qc).update(
        format="pack-quantized")), ql.Unsupported, r"config_groups\.group_0\.format"),
    "group_strategy": (lambda p: _edit_config(p, lambda qc: _group(qc)["weights"].update(
        strategy="group", group_size=32)), ql.Unsupported, r"weights\.group_size"),
    "four_bits": (lambda p: _edit_config(p, lambda qc: _group(qc)["weights"].update(
        num_bits=4)), ql.Unsupported, r"weights\.num_bits"),
    "float8": (lambda p: _edit_config(p, lambda qc: _group(qc)["input_activations"].update(
        type="float")), ql.Unsupported, r"input_activations\.type"),
    "weight_only": (lambda p: _edit_config(p, lambda qc: _group(qc).update(
        input_activations=None)), ql.Unsupported, r"group_0\.input_activations"),
    "dynamic_per_tensor": (lambda p: _edit_config(p, lambda qc: _group(qc)[
        "input_activations"].update(strategy="tensor")), ql.Unsupported, "input_activations"),
    "other_method": (lambda p: _edit_config(p, lambda qc: qc.update(quant_method="gptq")),
                     ql.Unsupported, "quant_method"),
    "missing_norm": (lambda p: _edit_tensors(p, lambda t: t.pop(
        "encoder.layer.0.output.LayerNorm.bias")), ql.InvalidProblem,
        "encoder.layer.0.output.LayerNorm.bias"),
    "missing_scale": (lambda p: _edit_tensors(p, lambda t: t.pop(f"{LAYER}.weight_scale")),
                      ql.InvalidProblem, f"{LAYER}.weight_scale"),
    "unexpected": (lambda p: _edit_tensors(p, lambda t: t.update(
        {"encoder.extra": np.ones(3, np.float32)})), ql.InvalidProblem, "encoder.extra"),
    "embedding_shape": (lambda p: _edit_tensors(p, lambda t: t.update(
        {"embeddings.word_embeddings.weight": np.ones((7, ch.HIDDEN), np.float32)})),
        ql.InvalidProblem, "embeddings.word_embeddings.weight"),
    "weight_shape": (lambda p: _edit_tensors(p, lambda t: t.update(
        {f"{LAYER}.weight": t[f"{LAYER}.weight"][:, :-1].copy()})), ql.InvalidProblem,
        f"{LAYER}.weight"),
    "float_weight": (lambda p: _edit_tensors(p, lambda t: t.update(
        {f"{LAYER}.weight": t[f"{LAYER}.weight"].astype(np.float32)})), ql.InvalidProblem,
        f"{LAYER}.weight"),
    "scale_shape": (lambda p: _edit_tensors(p, lambda t: t.update(
        {f"{LAYER}.weight_scale": t[f"{LAYER}.weight_scale"][:5].copy()})), ql.InvalidProblem,
        f"{LAYER}.weight_scale"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_named_and_leaves_the_model(written, tmp_path, case):
    src, _, _ = written("dynamic")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    edit, error, match = BAD[case]
    edit(path)
    model = ch.float_model(seed=11)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        qlt.load_compressed(model, path)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, qlt.QLinear) for m in model.modules())
    if error is ql.Unsupported or case.startswith(("float_weight", "scale_shape")):
        with pytest.raises(error, match=match):
            load_quantized_linears(path)


def test_zero_input_scale_is_named(written, tmp_path):
    src, _, _ = written("static_asym")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    _edit_tensors(path, lambda t: t.update(
        {f"{LAYER}.input_zero_point": np.array([3], np.int8),
         f"{LAYER}.input_scale": np.array([0.0], np.float32)}))
    with pytest.raises(ql.InvalidProblem, match=f"module '{LAYER}'.*input_scale"):
        qlt.load_compressed(ch.float_model(), path)


def test_checkpoint_with_a_head_loads_into_the_base_model(tmp_path):
    """transformers saves a model with a head under its base prefix (``bert.``)."""
    from transformers import BertForMaskedLM

    path = tmp_path / "mlm"
    base = tmp_path / "base"
    ch.write_checkpoint(base, "dynamic")
    tensors = ch.read_all(base)
    shutil.copytree(base, path)
    prefixed = {f"bert.{k}": v for k, v in tensors.items()}
    prefixed["cls.predictions.bias"] = np.zeros(ch.VOCAB, np.float32)
    (path / "model.safetensors").unlink()
    from safetensors.numpy import save_file

    save_file(prefixed, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = ch.float_model(seed=4)
    assert qlt.load_compressed(model, path) == N_SWAPPED
    mlm = BertForMaskedLM(ch.config())
    with pytest.raises(ql.InvalidProblem, match="expected in the checkpoint"):
        qlt.load_compressed(mlm, base)  # the head's tensors are missing


def test_config_groups_with_different_schemes(tmp_path):
    """Two config groups, each with its own scheme and targets (attention static with a
    zero point, the MLP dynamic per token), as llm-compressor writes mixed recipes: each
    layer runs its own group's scheme, exactly as its tensors mean."""
    groups = {"attention": ("static_asym", ("re:.*attention.*",)),
              "mlp": ("dynamic", ("re:.*intermediate.dense$", r"re:.*layer\.\d+\.output.dense$"))}
    _, fake = ch.write_checkpoint(tmp_path, "dynamic", groups=groups, ignore=())
    tensors = ch.read_all(tmp_path)
    model = ch.float_model(seed=3)
    assert qlt.load_compressed(model, tmp_path, backend="cpu") == 12
    seen, hooks = _capture(model, qlt.QLinear)
    ids = ch.tokens(11)
    with torch.no_grad():
        yq = model(ids).last_hidden_state
        yc = fake(ids).last_hidden_state
    for h in hooks:
        h.remove()
    kinds = {}
    for name, (x, y) in seen.items():
        kind = "static_asym" if ".attention." in name else "dynamic"
        kinds[kind] = kinds.get(kind, 0) + 1
        assert model.get_submodule(name).scheme == kind, name
        x2 = x.reshape(-1, x.shape[-1]).numpy()
        want, _ = _oracle(tensors, name, x2, kind, ql.f32)
        assert_bitwise_equal(y.reshape(want.shape).numpy(), want, name)
    assert kinds == {"static_asym": 8, "dynamic": 4}
    assert _cosine(yq, yc) > 0.99

"""The torch peers of ``qlinear bench`` (``qlinear.bench.peers``)."""

import sys

import pytest

torch = pytest.importorskip(
    "torch", reason="the torch adapter's tests need torch: pip install torch==2.13.0 "
                    "(or pip install 'qlinear[torch]')")

import qlinear as ql  # noqa: E402
from qlinear.bench.peers import TORCH_MATMUL, TORCH_W8A8, torch_peers  # noqa: E402

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

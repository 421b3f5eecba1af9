"""The decode kernel's block width, chosen without a device (the selection is pure).

A decode block (8 x NG columns) reads all of its activation rows, ``min(m, 16) * k``
bytes, for ``8 * NG * k`` weight bytes; the selection keeps that ratio at or below one
half where the grid still reaches the SMs, and never changes the ``m = 1`` choice.
"""

from __future__ import annotations

import pytest

from qlinear.backends.cuda.select import select_linear
from qlinear.backends.cuda.specs import GEMV_NGROUPS
from qlinear.problem import DECODE_MAX_M

K = 4096
#: SM counts of real sm_80+ parts (A100, H100 PCIe, H100/H200 SXM, A10/A40-class, L4).
SM_COUNTS = (108, 114, 132, 84, 58)
WIDTHS = (8, 40, 512, 1024, 1536, 2048, 3072, 4096, 5120, 8192, 11008, 14336, 28672)


def _cdiv(a, b):
    return -(-a // b)


def _decode(m, n, sm_count, arch="sm_90a"):
    sel = select_linear(m, n, K, "f16", arch, sm_count)
    assert sel.gemm.source == "gemv_mma.cu", sel.sku
    ng = int(sel.gemm.args[2])
    assert ng in GEMV_NGROUPS and sel.gemm_fallback.args[2] == sel.gemm.args[2]
    assert sel.gemm_grid == (_cdiv(n, 8 * ng), _cdiv(m, 16)), (m, n, sm_count, sel.gemm_grid)
    return ng, sel.gemm_grid[0]


def _activation_to_weight_bytes(m, ng):
    return (min(m, 16) * K) / (8 * ng * K)


@pytest.mark.parametrize("sm_count", SM_COUNTS)
@pytest.mark.parametrize("n", [4096, 14336])
def test_m16_reads_at_most_half_as_many_activation_as_weight_bytes(n, sm_count):
    ng, blocks = _decode(16, n, sm_count)
    assert _activation_to_weight_bytes(16, ng) <= 0.5, (n, sm_count, ng)
    # Every SM gets a block where the widths that keep the ratio allow it.
    allowed = max(_cdiv(n, 8 * g) for g in GEMV_NGROUPS
                  if _activation_to_weight_bytes(16, g) <= 0.5)
    assert blocks >= min(sm_count, allowed), (n, sm_count, ng, blocks)


def test_h200_decode_widths():
    # 132 SMs: 32 columns per block at m = 16 (128 blocks at N = 4096, 448 at 14336);
    # m = 1 keeps 8 columns at N = 4096 (512 blocks, two or more per SM).
    assert _decode(16, 4096, 132) == (4, 128)
    assert _decode(16, 14336, 132) == (4, 448)
    assert _decode(1, 4096, 132) == (1, 512)
    assert _decode(1, 14336, 132) == (4, 448)


def _old_rule(n, sm_count):
    """The width before the activation traffic counted: the widest block that gives
    every SM two, else the narrowest."""
    return next((g for g in sorted(GEMV_NGROUPS, reverse=True)
                 if _cdiv(n, 8 * g) >= 2 * sm_count), min(GEMV_NGROUPS))


@pytest.mark.parametrize("sm_count", SM_COUNTS + (1, 7, 500))
def test_one_row_keeps_its_width(sm_count):
    for n in WIDTHS + tuple(range(1, 3000, 37)):
        assert _decode(1, n, sm_count)[0] == _old_rule(n, sm_count), (n, sm_count)


@pytest.mark.parametrize("sm_count", SM_COUNTS)
def test_every_decode_shape_keeps_the_sms_busy_or_the_traffic_low(sm_count):
    for m in range(1, DECODE_MAX_M + 1):
        lean = [g for g in GEMV_NGROUPS if _activation_to_weight_bytes(m, g) <= 0.5]
        assert lean, m
        for n in WIDTHS:
            ng, blocks = _decode(m, n, sm_count, arch="sm_80")
            two_per_sm = [g for g in lean if _cdiv(n, 8 * g) >= 2 * sm_count]
            if two_per_sm:
                # The widest lean block that still gives every SM two.
                assert ng == max(two_per_sm), (m, n, ng)
            elif 2 * _cdiv(n, 8 * min(lean)) >= sm_count:
                assert ng == min(lean), (m, n, ng)
            else:
                # The ratio gives way only to keep at least half of the SMs busy, or
                # as many as any width could.
                most = max(_cdiv(n, 8 * g) for g in GEMV_NGROUPS)
                assert 2 * blocks >= sm_count or blocks == most, (m, n, ng, blocks)
                busy = [g for g in GEMV_NGROUPS
                        if g <= min(lean) and 2 * _cdiv(n, 8 * g) >= sm_count]
                assert ng == max(busy, default=min(GEMV_NGROUPS)), (m, n, ng)

"""The wgpu benchmark kernels: the f32 matmul baseline computes a matmul, and the micro
kernels run."""

import numpy as np

import qlinear as ql
from qlinear.bench import float_matmul
from qlinear.bench.wgpu_kernels import micro_kernels


def test_float_matmul_and_micro_kernels(wgpu_be):
    run = float_matmul(wgpu_be, 64, 32, 48, ql.f16)
    run()
    micro = micro_kernels(wgpu_be, words=1 << 12, iters=4)
    for name in ("dot4", "copy"):
        f, amount = micro[name]
        f()
        assert amount > 0


def test_float_matmul_is_a_matmul(wgpu_be, rng):
    """The benchmark baseline computes what it claims (f32, edges of the 128 blocks)."""
    m, k, n = 130, 37, 129
    run = float_matmul(wgpu_be, m, k, n, ql.f32)
    run()
    a_t, b_t, c_t, _ = run.keep
    a, b = wgpu_be.to_numpy(a_t), wgpu_be.to_numpy(b_t)
    np.testing.assert_allclose(wgpu_be.to_numpy(c_t), a @ b, rtol=1e-4, atol=1e-4)


def test_qlinear_bench_on_wgpu_names_its_baseline(wgpu_be, capsys):
    """On wgpu the float baseline is qlinear's own WGSL f32 matmul, and the table says so;
    every timing has its spread."""
    from qlinear import cli

    assert cli.main(["bench", "--backend", "wgpu", "--m", "3", "--k", "40", "--n", "24",
                     "--dtype", "f16", "--min-seconds", "0", "--max-reps", "3",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"qlinear bench on wgpu: {wgpu_be.device_name}, chosen with --backend")
    assert "x float mm: qlinear's own WGSL f32 tiled matmul" in out
    assert "ratio = baseline time / qlinear time" in out
    line = next(ln for ln in out.splitlines() if ln.split()[:4] == ["f16", "3", "40", "24"])
    cells = line.split()
    assert cells[4] == "ok" and float(cells[5]) <= float(cells[6]) <= float(cells[7])

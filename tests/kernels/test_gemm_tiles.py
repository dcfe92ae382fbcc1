"""The cupy backend's GEMM tile choice (kernels.cupy_backend.gemm_tile) and every tile's
kernels on the CUDA C emulator, through the CuPy stand-in (tests/fake_cupy.py)."""
from __future__ import annotations

import numpy as np
import pytest

import kernels.cupy_backend as cb
from kernels import reference as ref
from kernels.checks import resolve_padding


def _padding(M, N, tile):
    bm, bn = tile
    return 1 - M * N / (-(-M // bm) * bm * -(-N // bn) * bn)


def test_tile_follows_both_output_extents():
    # the 2C2F first conv's weight gradient (M = 16 filters, N = 1*4*4): a 16x128 tile
    # chosen from M alone made 87.5% of its multiply-adds padding
    assert _padding(16, 16, (16, 128)) == 0.875
    assert cb.gemm_tile(16, 16)[0] == (16, 16)
    # a 10-unit dense layer at batch 256 (M = 256, N = 10): 84% padding with 64x64
    assert cb.gemm_tile(256, 10)[0] == (128, 16) and _padding(256, 10, (128, 16)) < 0.4
    # large outputs keep the big tiles
    assert cb.gemm_tile(16, 200704)[0] == (16, 128)
    assert cb.gemm_tile(512, 512)[0] == (64, 64)
    assert cb.gemm_tile(32, 256)[0] == (32, 128)
    for M in (1, 7, 16, 33, 100, 256, 1000):
        for N in (1, 10, 16, 100, 784, 5000):
            (bm, bn), gm, gn = cb.gemm_tile(M, N)
            assert (bm, bn) in cb.TILES and gm * bm >= M > (gm - 1) * bm and gn * bn >= N > (gn - 1) * bn


def test_tile_respects_the_grid_row_limit():
    (bm, _), gm, _ = cb.gemm_tile(65535 * 16 + 1, 8)
    assert gm <= 65535 and bm > 16
    with pytest.raises(ValueError, match="y limit"):
        cb.gemm_tile(65535 * 128 + 1, 8)


# (op, shapes) whose GEMM selects each tile: dense fwd is (M, N, K) = (n, o, i)
TILE_CASES = {
    (64, 64): (128, 128, 20),
    (32, 128): (30, 300, 20),
    (16, 128): (9, 500, 33),
    (128, 16): (300, 10, 50),
    (16, 16): (12, 9, 70),
}


@pytest.mark.gpu_emulated
@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("tile", sorted(TILE_CASES))
def test_every_tile_on_the_emulator(fake_gpu, tile, dt):
    n, o, i = TILE_CASES[tile]
    assert cb.gemm_tile(n, o)[0] == tile
    rng = np.random.default_rng()
    x, w, b = (rng.standard_normal(s).astype(dt) for s in ((n, i), (o, i), (o,)))
    got = cb.dense(fake_gpu.asarray(x), fake_gpu.asarray(w), fake_gpu.asarray(b)).get()
    assert any(f"dense_fwd<{cb.CTYPE[dt]},{tile[0]},{tile[1]}>" == k for k in fake_gpu.emulator.launches)
    tol = 2e-5 if dt == "float32" else 1e-12
    np.testing.assert_allclose(got, ref.dense(x, w, b), rtol=tol, atol=tol * np.abs(x).sum(1).max())


@pytest.mark.gpu_emulated
def test_first_conv_weight_gradient_uses_the_small_tile(fake_gpu):
    """The 2C2F first layer's grad-weight (16 filters, 1x4x4) runs the 16x16 tile, split-K."""
    rng = np.random.default_rng()
    x = rng.standard_normal((4, 1, 12, 12)).astype(np.float32)
    gy = rng.standard_normal((4, 16, 6, 6)).astype(np.float32)
    pads = resolve_padding("same", (12, 12), (4, 4), (2, 2))
    got = cb.conv2d_grad_weight(fake_gpu.asarray(x), fake_gpu.asarray(gy), (16, 1, 4, 4), (2, 2), pads).get()
    assert fake_gpu.emulator.launches[-1] == "conv2d_bwd_weight<float,16,16>"
    np.testing.assert_allclose(got, ref.conv2d_grad_weight(x, gy, (16, 1, 4, 4), (2, 2), pads), rtol=2e-5, atol=1e-4)

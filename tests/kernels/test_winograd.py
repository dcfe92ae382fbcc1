"""Winograd F(2x2, 3x3) (kernels/winograd.py) against the reference oracle on fresh random
inputs: float64 to rounding, float32 within the im2col path's tolerance; pads, odd channel
counts, ragged chunks and both worker threads; and the numba backend taking it where
``applies`` says so."""
from __future__ import annotations

import numpy as np
import pytest

from kernels import numba_backend, reference, winograd

pytestmark = pytest.mark.skipif(winograd.njit is None, reason="numba is not importable")

# (n, c, h, w, o, pads): even outputs; pads of 0 and 1 in every position
CASES = [
    (3, 16, 8, 8, 5, (1, 1, 1, 1)),
    (2, 17, 10, 6, 4, (0, 0, 1, 1)),
    (4, 16, 9, 9, 3, (0, 1, 1, 0)),
    (5, 19, 7, 7, 3, (1, 0, 0, 1)),
    (7, 16, 4, 4, 8, (1, 1, 1, 1)),
    (2, 32, 32, 32, 6, (1, 1, 1, 1)),
]


@pytest.fixture
def any_size(monkeypatch):
    """Let the small test shapes through the junk-tile rule (it is about speed only)."""
    monkeypatch.setattr(winograd, "MAX_TILE_RATIO", 1e9)


def _inputs(rng, case, dtype):
    n, c, h, w, o, pads = case
    return (rng.standard_normal((n, c, h, w)).astype(dtype), rng.standard_normal((o, c, 3, 3)).astype(dtype),
            rng.standard_normal(o).astype(dtype), pads)


CHUNKS = pytest.mark.parametrize("chunk_cols", [1, 10 ** 6], ids=["1-sample-chunks", "one-chunk"])
DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
SHAPES = pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])


def _tol(dtype):
    return 2e-6 if dtype == np.float32 else 1e-13


@CHUNKS
@DTYPES
@SHAPES
def test_winograd_matches_the_oracle(rng, case, dtype, chunk_cols, workers, any_size, monkeypatch):
    monkeypatch.setattr(winograd, "CHUNK_COLS", chunk_cols)
    x, w, b, pads = _inputs(rng, case, dtype)
    assert winograd.applies(x.shape, w.shape, (1, 1), pads)
    mag = reference.conv2d(np.abs(x), np.abs(w), np.abs(b), (1, 1), pads).astype(np.float64)
    for bias in (b, None):
        want = reference.conv2d(x.astype(np.float64), w.astype(np.float64),
                                None if bias is None else bias.astype(np.float64), (1, 1), pads)
        for relu in (False, True):
            got = winograd.conv2d(x, w, bias, pads, relu)
            ref = np.maximum(want, 0) if relu else want
            assert got.shape == want.shape and got.dtype == dtype
            err = np.abs(got - ref) / (mag + 1e-30)
            assert err.max() <= _tol(dtype), err.max()


@CHUNKS
@DTYPES
@SHAPES
def test_winograd_weight_gradient_matches_the_oracle(rng, case, dtype, chunk_cols, workers, any_size, monkeypatch):
    monkeypatch.setattr(winograd, "CHUNK_COLS", chunk_cols)
    x, w, _, pads = _inputs(rng, case, dtype)
    gy = rng.standard_normal(reference.conv2d(x, w, None, (1, 1), pads).shape).astype(dtype)
    got = winograd.grad_weight(x, gy, pads)
    want = reference.conv2d_grad_weight(x.astype(np.float64), gy.astype(np.float64), w.shape, (1, 1), pads)
    mag = reference.conv2d_grad_weight(np.abs(x).astype(np.float64), np.abs(gy).astype(np.float64), w.shape,
                                       (1, 1), pads)
    assert got.shape == w.shape and got.dtype == dtype
    err = np.abs(got - want) / (mag + 1e-30)
    assert err.max() <= _tol(dtype), err.max()


def test_applies_only_where_it_is_meant_to():
    ok = ((8, 32, 32, 32), (32, 32, 3, 3), (1, 1), (1, 1, 1, 1))
    assert winograd.applies(*ok)  # 6C2F.c2
    assert not winograd.applies((8, 32, 16, 16), (64, 32, 3, 3), (1, 1), (1, 1, 1, 1))  # junk tiles 27%
    assert not winograd.applies((8, 8, 32, 32), (32, 8, 3, 3), (1, 1), (1, 1, 1, 1))  # C < MIN_CHANNELS
    assert not winograd.applies((8, 32, 32, 32), (32, 32, 3, 3), (2, 2), (1, 1, 1, 1))  # stride 2
    assert not winograd.applies((8, 32, 32, 32), (32, 32, 4, 4), (1, 1), (1, 2, 1, 2))  # 4x4
    assert not winograd.applies((8, 32, 33, 32), (32, 32, 3, 3), (1, 1), (1, 1, 1, 1))  # odd output
    assert not winograd.applies((8, 32, 32, 32), (32, 32, 3, 3), (1, 1), (2, 2, 1, 1))  # pad 2


def test_the_numba_backend_runs_it_for_the_shapes_it_applies_to(rng, monkeypatch):
    calls = []
    real = winograd.conv2d
    monkeypatch.setattr(winograd, "conv2d", lambda *a: calls.append(1) or real(*a))
    x = rng.standard_normal((3, 32, 32, 32)).astype(np.float32)
    w = rng.standard_normal((16, 32, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    y = numba_backend.conv2d_relu(x, w, b, (1, 1), (1, 1, 1, 1))
    assert calls, "the 32x32 3x3 layer did not take the Winograd path"
    want = np.maximum(reference.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), (1, 1), (1, 1, 1, 1)), 0)
    mag = reference.conv2d(np.abs(x), np.abs(w), np.abs(b), (1, 1), (1, 1, 1, 1))
    assert (np.abs(y - want) / mag).max() < 2e-6
    # and its grad_input (a stride-1 flipped-kernel conv of gy with O = 16 >= MIN_CHANNELS)
    calls.clear()
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx = numba_backend.conv2d_grad_input(gy, w, x.shape, (1, 1), (1, 1, 1, 1))
    assert calls
    want = reference.conv2d_grad_input(gy.astype(np.float64), w.astype(np.float64), x.shape, (1, 1), (1, 1, 1, 1))
    mag = reference.conv2d_grad_input(np.abs(gy), np.abs(w), x.shape, (1, 1), (1, 1, 1, 1))
    assert (np.abs(gx - want) / mag).max() < 2e-6
    # and its weight gradient
    real_gw, gw_calls = winograd.grad_weight, []
    monkeypatch.setattr(winograd, "grad_weight", lambda *a: gw_calls.append(1) or real_gw(*a))
    gw = numba_backend.conv2d_grad_weight(x, gy, w.shape, (1, 1), (1, 1, 1, 1))
    assert gw_calls
    want = reference.conv2d_grad_weight(x.astype(np.float64), gy.astype(np.float64), w.shape, (1, 1), (1, 1, 1, 1))
    mag = reference.conv2d_grad_weight(np.abs(x), np.abs(gy), w.shape, (1, 1), (1, 1, 1, 1))
    assert (np.abs(gw - want) / mag).max() < 2e-6


def test_junk_tiles_never_reach_the_output_from_a_nan_dirty_scratch(rng, any_size):
    """The scratch buffers are reused uninitialised: fill them with NaN first."""
    from kernels import numpy_backend

    x, w, b, pads = _inputs(rng, CASES[2], np.float32)
    winograd.conv2d(x, w, b, pads, False)  # allocates this thread's scratch
    for (slot, _), buf in numpy_backend._local.pool.items():
        if slot.startswith("wg_"):
            buf.fill(np.nan)
    assert np.all(np.isfinite(winograd.conv2d(x, w, b, pads, False)))
    gy = rng.standard_normal((x.shape[0], w.shape[0], 8, 8)).astype(np.float32)
    for (slot, _), buf in numpy_backend._local.pool.items():
        if slot.startswith("wg_"):
            buf.fill(np.nan)
    assert np.all(np.isfinite(winograd.grad_weight(x, gy, pads)))

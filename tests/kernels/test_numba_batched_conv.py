"""The numba backend's batched convs: the numpy backend's wide-row GEMMs with jitted output
passes (kernels/numba_backend.py, "batched convs"). On fresh random inputs they must equal
the numpy backend bit for bit where both run the same wide GEMMs (only the data movement
differs) and the reference oracle within float tolerance everywhere, over many chunks, both worker threads, ragged
last chunks, and stride-s pads that leave input pixels unreached."""
from __future__ import annotations

import numpy as np
import pytest

from kernels import numba_backend as nbb
from kernels import numpy_backend as npb
from kernels import reference
from kernels.checks import check_conv

pytestmark = pytest.mark.skipif(nbb.availability() is not None, reason=str(nbb.availability()))

# (n, c, h, w, o, kh, kw, stride, padding). K = C*kh*kw > numpy_backend.PER_SAMPLE_MAX_K
# except the last two cases (numpy: per-sample GEMMs; numba: the wide path); stride 1 with
# C >= FLIP_MIN_CHANNELS takes the flipped-kernel route, stride s | kernel the s2d route.
CASES = [
    (7, 16, 14, 14, 32, 4, 4, 2, "same"),     # 2C2F.c2
    (5, 16, 9, 11, 12, 3, 3, 1, "same"),      # stride 1, flipped-kernel grad_input
    (6, 17, 10, 7, 5, 3, 2, 1, 1),            # odd channels, non-square kernel
    (5, 5, 9, 7, 4, 4, 4, 2, "same"),         # s2d with few channels
    (4, 4, 10, 9, 3, 6, 4, (3, 2), 1),        # s2d, non-square stride
    (3, 6, 11, 11, 3, 2, 2, 2, "valid"),      # s2d, the last row and column unreached
    (4, 3, 9, 11, 2, 6, 6, 3, "same"),        # s2d, stride 3
    (5, 8, 9, 9, 6, 3, 3, 2, "same"),         # stride 2, 3x3: numpy's col2im route
    (4, 1, 12, 12, 8, 4, 4, 2, "same"),       # K = 16: per-sample path
    (3, 3, 8, 8, 4, 3, 3, 1, "same"),         # K = 27: per-sample path
]
IDS = [str(i) for i in range(len(CASES))]


def _inputs(rng, case, dtype):
    n, c, h, w, o, kh, kw, s, p = case
    wt = rng.standard_normal((o, c, kh, kw)).astype(dtype)
    st, pads, ohw = check_conv((n, c, h, w), wt, s, p)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    gy = rng.standard_normal((n, o) + tuple(ohw)).astype(dtype)
    return x, wt, b, gy, st, pads


@pytest.fixture(params=[False, True], ids=["cache-chunks", "1-sample-chunks"])
def chunks(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(npb, "CHUNK_BYTES", 1)
        monkeypatch.setattr(npb, "MIN_CHUNK_SAMPLES", 1)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batched_conv_ops_equal_numpy_and_the_oracle(rng, case, dtype, workers, chunks):
    x, w, b, gy, st, pads = _inputs(rng, case, dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-10

    def close(got, want, mag, what):
        assert got.shape == want.shape and got.dtype == dtype, what
        assert np.all(np.abs(got - want) <= tol * (mag + 1e-30)), (what, np.abs(got - want).max())

    # numpy's per-sample GEMMs (few patch rows) sum in another order than the wide GEMM
    _, c, _, _, o, kh, kw, _, _ = case
    same_gemms = c * kh * kw > npb.PER_SAMPLE_MAX_K
    for bias in (b, None):
        y = nbb.conv2d(x, w, bias, st, pads)
        assert not same_gemms or np.array_equal(y, npb.conv2d(x, w, bias, st, pads)), "conv2d differs from numpy's"
        ref = reference.conv2d(x, w, bias, st, pads)
        close(y, ref, reference.conv2d(np.abs(x), np.abs(w), None if bias is None else np.abs(bias), st, pads),
              "conv2d")
        yr = nbb.conv2d_relu(x, w, bias, st, pads)
        assert not same_gemms or np.array_equal(yr, npb.conv2d_relu(x, w, bias, st, pads)), \
            "conv2d_relu differs from numpy's"
        assert np.array_equal(yr, np.maximum(y, 0)), "conv2d_relu is not max(conv2d, 0)"

    gx = nbb.conv2d_grad_input(gy, w, x.shape, st, pads)
    # grad_input's inner conv has O*kh*kw/(s*s) patch rows (s2d) or O*kh*kw (flip)
    inner_k = o * kh * kw // (st[0] * st[1]) if st != (1, 1) else o * kh * kw
    if inner_k > npb.PER_SAMPLE_MAX_K:
        assert np.array_equal(gx, npb.conv2d_grad_input(gy, w, x.shape, st, pads)), "grad_input differs from numpy's"
    close(gx, reference.conv2d_grad_input(gy, w, x.shape, st, pads),
          reference.conv2d_grad_input(np.abs(gy), np.abs(w), x.shape, st, pads), "grad_input")


def test_unreached_input_pixels_get_a_zero_gradient_in_a_dirty_buffer(rng, monkeypatch):
    """'valid' 2x2/2 on 11x11: row and column 10 are read by no window. gx comes from the
    buffer pool (made to serve arrays this small), so first fill the pool with NaN-laden
    arrays of the same shape."""
    from kernels import buffers

    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    x, w, _, gy, st, pads = _inputs(rng, (3, 6, 11, 11, 3, 2, 2, 2, "valid"), np.float32)
    for _ in range(3):
        junk = buffers.empty(x.shape, np.float32)
        junk.fill(np.nan)
        del junk
    gx = nbb.conv2d_grad_input(gy, w, x.shape, st, pads)
    assert np.all(gx[:, :, 10, :] == 0) and np.all(gx[:, :, :, 10] == 0)
    assert np.all(np.isfinite(gx))


def test_relu_keeps_nan_and_gives_plus_zero(rng):
    x, w, b, _, st, pads = _inputs(rng, CASES[0], np.float32)
    x[1, 3, 5, 5] = np.nan
    y = nbb.conv2d_relu(x, w, b, st, pads)
    want = npb.conv2d_relu(x, w, b, st, pads)
    assert np.isnan(y[1]).any() and np.array_equal(np.isnan(y), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(y[ok], want[ok]) and not np.signbit(y[ok & (want == 0)]).any()


def test_batched_numba_convs_are_the_cpu_default():
    from kernels import registry

    x = np.zeros((256, 16, 14, 14), np.float32)
    for op in ("conv2d", "conv2d_grad_input"):
        assert registry.select(op, x) == "numba"


def test_non_contiguous_inputs(rng):
    """x as a channel slice and gy as a transposed view reach the same results."""
    x, w, b, gy, st, pads = _inputs(rng, (4, 20, 14, 14, 16, 4, 4, 2, "same"), np.float32)
    xv = x[:, 2:18]
    wv = np.ascontiguousarray(w[:, 2:18])
    gyt = np.ascontiguousarray(gy.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert not xv.flags.c_contiguous and not gyt.flags.c_contiguous
    assert np.array_equal(nbb.conv2d_relu(xv, wv, b, st, pads), nbb.conv2d_relu(np.ascontiguousarray(xv), wv, b, st, pads))
    gx = nbb.conv2d_grad_input(gyt, wv, xv.shape, st, pads)
    assert np.array_equal(gx, nbb.conv2d_grad_input(np.ascontiguousarray(gyt), wv, xv.shape, st, pads))
    gw = nbb.conv2d_grad_weight(xv, gyt, wv.shape, st, pads)
    assert np.array_equal(gw, nbb.conv2d_grad_weight(np.ascontiguousarray(xv), np.ascontiguousarray(gyt), wv.shape, st, pads))

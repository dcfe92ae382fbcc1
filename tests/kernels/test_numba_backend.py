"""Numba-backend specifics the shared oracle test does not cover: the conv adjoint
identity across im2col chunk boundaries, and float32 staying float32 in every op."""
import numpy as np
import pytest

import kernels
from kernels import numba_backend, registry

pytestmark = pytest.mark.skipif(
    registry.availability()["numba"] is not None, reason=f"numba backend unavailable: {registry.availability()['numba']}"
)


@pytest.mark.parametrize(
    "shape, o, k, stride, padding",
    [
        ((5, 3, 9, 7), 4, 3, 1, "same"),
        ((4, 2, 10, 9), 3, 4, 2, "same"),
        ((3, 2, 8, 8), 5, 3, 2, "valid"),
    ],
)
@pytest.mark.parametrize("per_chunk", [1, 2, 64])  # samples per im2col chunk: in-place, ragged, whole batch
@pytest.mark.parametrize("par_min", [0, 1 << 62], ids=["parallel", "serial"])  # which compiled twin runs
def test_conv_adjoint_identity(monkeypatch, shape, o, k, stride, padding, per_chunk, par_min):
    """<A x, y> == <x, A^T y> and <dA/dw . x, y> == <w, grad_weight> in float64."""
    monkeypatch.setattr(numba_backend, "_chunk", lambda n, k_sz, p_sz: min(n, per_chunk))
    monkeypatch.setattr(numba_backend, "_PAR_MIN_ELEMS", par_min)
    rng = np.random.default_rng()
    x = rng.standard_normal(shape)
    w = rng.standard_normal((o, shape[1], k, k))
    y = kernels.conv2d(x, w, None, stride, padding, backend="numba")
    gy = rng.standard_normal(y.shape)
    gx = kernels.conv2d_grad_input(gy, w, x.shape, stride, padding, backend="numba")
    gw = kernels.conv2d_grad_weight(x, gy, (k, k), stride, padding, backend="numba")
    lhs = np.vdot(y, gy)
    assert np.isfinite(lhs)
    assert np.vdot(x, gx) == pytest.approx(lhs, rel=1e-12, abs=1e-12)
    assert np.vdot(w, gw) == pytest.approx(lhs, rel=1e-12, abs=1e-12)
    # and the same numbers as the oracle
    ref = kernels.conv2d(x, w, None, stride, padding, backend="reference")
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_float32_stays_float32():
    rng = np.random.default_rng()
    f = np.float32
    x = rng.standard_normal((3, 4, 6, 5)).astype(f)
    w = rng.standard_normal((6, 4, 3, 3)).astype(f)
    b = rng.standard_normal(6).astype(f)
    y = kernels.conv2d(x, w, b, 2, "same", backend="numba")
    gy = rng.standard_normal(y.shape).astype(f)
    xd = rng.standard_normal((3, 8)).astype(f)
    wd = rng.standard_normal((4, 8)).astype(f)
    gd = rng.standard_normal((3, 4)).astype(f)
    outs = {
        "conv2d": y,
        "conv2d_grad_input": kernels.conv2d_grad_input(gy, w, x.shape, 2, "same", backend="numba"),
        "conv2d_grad_weight": kernels.conv2d_grad_weight(x, gy, (3, 3), 2, "same", backend="numba"),
        "dense": kernels.dense(xd, wd, wd[:, 0].copy(), backend="numba"),
        "dense_grad_input": kernels.dense_grad_input(gd, wd, backend="numba"),
        "dense_grad_weight": kernels.dense_grad_weight(xd, gd, backend="numba"),
        "minmax": kernels.minmax(x, backend="numba"),
        "minmax_grad": kernels.minmax_grad(x, x[::-1].copy(), backend="numba"),
    }
    for op, out in outs.items():
        assert out.dtype == np.float32, op
        assert np.all(np.isfinite(out)), op
    # float32 results agree with the float64 oracle to float32 accuracy
    ref = kernels.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 2, "same", backend="reference")
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("par_min", [0, 1 << 62], ids=["parallel", "serial"])
def test_minmax_nan_and_ties(monkeypatch, par_min):
    """A NaN in a pair poisons both outputs (as np.minimum/np.maximum); ties route in order."""
    monkeypatch.setattr(numba_backend, "_PAR_MIN_ELEMS", par_min)
    x = np.array([[1.0, np.nan, 2.0, 2.0, 3.0, -1.0]])
    y = kernels.minmax(x, backend="numba")
    assert np.isnan(y[0, :2]).all()
    np.testing.assert_array_equal(y[0, 2:], [2.0, 2.0, -1.0, 3.0])
    gy = np.array([[10.0, 20.0, 30.0, 40.0, 50.0, 60.0]])
    gx = kernels.minmax_grad(x, gy, backend="numba")
    np.testing.assert_array_equal(gx[0, 2:], [30.0, 40.0, 60.0, 50.0])

"""Initialisers: Glorot range and moments, orthogonality, fans, dtypes."""
import numpy as np
import pytest

from nn import init


def test_fans():
    assert init.fans((10, 20)) == (20, 10)
    assert init.fans((8, 3, 4, 4)) == (48, 128)
    with pytest.raises(ValueError):
        init.fans((5,))


@pytest.mark.parametrize("shape", [(64, 32), (32, 16, 3, 3), (10, 1, 4, 4)])
def test_glorot_uniform_range_and_variance(rng, shape):
    w = init.glorot_uniform(shape, rng, dtype=np.float64)
    fan_in, fan_out = init.fans(shape)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    assert w.shape == shape and w.dtype == np.float64
    assert np.abs(w).max() <= limit
    # U(-l, l): variance l^2/3 = 2/(fan_in+fan_out); the max comes close to l
    n = w.size
    var = limit**2 / 3
    assert abs(w.var() - var) < 6 * var * np.sqrt(0.8 / n)  # sd of the sample variance: var*sqrt(0.8/n)
    assert np.abs(w).max() > limit * (1 - 20.0 / n)
    assert abs(w.mean()) < 6 * np.sqrt(var / n)


def test_glorot_normal_truncated_variance(rng):
    shape = (200, 100)
    w = init.glorot_normal(shape, rng, dtype=np.float64)
    var = 2.0 / 300
    assert np.abs(w).max() <= 2 * np.sqrt(var) / 0.87962566103423978 + 1e-12
    assert abs(w.var() - var) < 0.03 * var


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (8, 3, 3, 3), (64, 2, 2, 2), (5, 5)])
@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_orthogonal(rng, shape, gain):
    w = init.orthogonal(shape, rng, gain=gain, dtype=np.float64)
    assert w.shape == shape
    m = w.reshape(shape[0], -1) / gain  # the (out, in*kh*kw) operator matrix
    if m.shape[0] <= m.shape[1]:
        np.testing.assert_allclose(m @ m.T, np.eye(m.shape[0]), atol=1e-12)
    else:
        np.testing.assert_allclose(m.T @ m, np.eye(m.shape[1]), atol=1e-12)
    # spectral norm = gain (all singular values equal)
    s = np.linalg.svd(w.reshape(shape[0], -1), compute_uv=False)
    np.testing.assert_allclose(s, gain, rtol=1e-12)


def test_orthogonal_is_random_and_dtype(rng):
    a = init.orthogonal((8, 8), rng)
    b = init.orthogonal((8, 8), rng)
    assert a.dtype == np.float32 and not np.allclose(a, b)
    # seeded: reproducible
    np.testing.assert_array_equal(init.orthogonal((4, 6), 3), init.orthogonal((4, 6), 3))


def test_get():
    assert init.get("glorot_uniform") is init.glorot_uniform
    assert init.get("Orthogonal") is init.orthogonal
    f = lambda shape, rng, dtype: np.ones(shape, dtype)  # noqa: E731
    assert init.get(f) is f
    with pytest.raises(ValueError, match="unknown"):
        init.get("he_banana")


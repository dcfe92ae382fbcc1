"""Layer norms: power method <= exact SVD of the explicit operator <= provable bound."""
import numpy as np
import pytest

from gloro_core import bounds
from gloro_core.layers import Conv, Dense
from gloro_core.lipschitz import converge, init_iterate, power_steps

# (O, C, k, stride, padding, H, W): strides 1 and 2 (and 3), SAME and VALID, odd and even
CASES = [
    (3, 2, 3, 1, "same", 7, 6),
    (4, 3, 4, 2, "same", 8, 8),
    (4, 2, 4, 2, "same", 9, 7),
    (3, 3, 3, 2, "valid", 9, 8),
    (5, 2, 3, 1, "valid", 6, 7),
    (2, 3, 4, 1, "same", 6, 6),
    (3, 2, 3, 3, "same", 10, 7),
    (4, 2, 2, 2, "valid", 7, 7),
]


def _glorot(rng, shape):
    fan_in, fan_out = np.prod(shape[1:]), shape[0] * np.prod(shape[2:])
    lim = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-lim, lim, shape).astype(np.float32)


@pytest.mark.parametrize("o,c,k,s,pad,h,w", CASES)
def test_conv_bounds_vs_explicit_svd(o, c, k, s, pad, h, w):
    rng = np.random.default_rng([o, c, k, s, h, w])
    wt = _glorot(rng, (o, c, k, k))
    # the explicit operator, from the conv kernel applied to every basis vector
    a = bounds.conv_operator_matrix(wt, (c, h, w), s, pad)
    # ... and from index arithmetic: two independent constructions agree exactly
    np.testing.assert_array_equal(a, bounds.conv_matrix_direct(wt, (h, w), s, pad))
    exact = bounds.matrix_norm(a)
    op = Conv((c, h, w), o, k, s, pad)
    assert a.shape == (int(np.prod(op.out_shape)), c * h * w)
    v0 = init_iterate(op, rng, np.float32)
    _, p_few = power_steps(op, wt, v0, 3)
    _, p_conv, _, ok = converge(op, wt, v0, tol=1e-10, max_iter=3000)
    fft = bounds.conv_circular_bound(wt, (h, w), s, pad)
    auto, method = bounds.conv_provable_bound(wt, (h, w), s, pad)
    assert np.isfinite([exact, p_few, p_conv, fft, auto]).all()
    assert p_few <= exact * (1 + 1e-6)
    assert p_conv <= exact * (1 + 1e-6)
    assert exact <= fft and exact <= auto
    assert auto <= fft
    # auto = min(fft, explicit): exact up to the float64 safety factor
    assert auto <= exact * (1 + 1e-8) and method in ("explicit", "fft")
    # the circular bound is close on these tiny grids (boundary effects ~ k / H)
    assert fft <= exact * 1.25, (fft, exact)
    # the converged power method finds the norm
    assert p_conv >= exact * (1 - 1e-4)


@pytest.mark.parametrize("s,pad,h", [(1, "same", 12), (2, "same", 14), (2, "valid", 13), (1, "valid", 11)])
def test_fft_bound_within_few_percent_on_moderate_grids(s, pad, h):
    rng = np.random.default_rng(h + s)
    wt = _glorot(rng, (4, 2, 3 + s - 1, 3 + s - 1))
    exact = bounds.matrix_norm_gram(bounds.conv_matrix_direct(wt, (h, h), s, pad))
    fft = bounds.conv_circular_bound(wt, (h, h), s, pad)
    assert exact <= fft <= exact * 1.05, (fft / exact)


def test_dense_bounds():
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (3, 11), (10, 10)]:
        w = rng.standard_normal(shape).astype(np.float32)
        exact = bounds.matrix_norm(bounds.dense_operator_matrix(w))
        np.testing.assert_allclose(exact, np.linalg.norm(w.astype(np.float64), 2), rtol=1e-12)
        op = Dense(shape[1], shape[0])
        _, p, _, _ = converge(op, w, init_iterate(op, rng), tol=1e-12, max_iter=5000)
        prov = bounds.dense_norm(w)
        assert p <= exact * (1 + 1e-6) <= prov * (1 + 1e-6)
        assert exact <= prov <= exact * (1 + 1e-8)


def test_power_method_tiny_and_zero_weights_unbiased():
    """No epsilon bias: a weight scaled by 1e-30 has a norm scaled by 1e-30 (float32)."""
    rng = np.random.default_rng(1)
    w = _glorot(rng, (4, 2, 3, 3))
    op = Conv((2, 6, 6), 4, 3, 1, "same")
    v = init_iterate(op, rng)
    _, big = power_steps(op, w, v, 30)
    _, tiny = power_steps(op, (w * np.float32(1e-30)).astype(np.float32), v, 30)
    assert tiny > 0
    np.testing.assert_allclose(tiny / 1e-30, big, rtol=1e-4)
    vz, z = power_steps(op, np.zeros_like(w), v, 5)
    assert z == 0.0 and np.all(np.isfinite(vz)) and np.linalg.norm(vz) > 0.99


def test_provable_bound_is_float64_and_rejects_bad_input():
    with pytest.raises(ValueError):
        bounds.conv_circular_bound(np.ones((2, 2, 3)), (5, 5))
    with pytest.raises(ValueError):
        bounds.dense_norm(np.ones(3))
    with pytest.raises(ValueError):  # kernel larger than the VALID input
        bounds.conv_circular_bound(np.ones((1, 1, 5, 5)), (3, 3), 1, "valid")


def test_forced_explicit_bound_refuses_huge_operators():
    w = np.ones((64, 32, 3, 3))
    with pytest.raises(ValueError, match="operator matrix"):
        bounds.conv_provable_bound(w, (32, 32), 1, "same", "explicit")


def test_scale_helpers_round_up_at_any_scale(rng):
    """ldexp_up, product_up and row_norms_up are upper bounds in exact arithmetic, also
    where float64 underflows or overflows (np.prod([1e-200, 1e-200]) is 0)."""
    from fractions import Fraction

    for _ in range(300):
        x, e = float(rng.random()) + 0.5, int(rng.integers(-2200, 1100))
        r = bounds.ldexp_up(x, e)
        exact = Fraction(x) * Fraction(2) ** e
        assert r == float("inf") or Fraction(r) >= exact
        assert r == float("inf") or r <= 2 * float(exact) + 5e-324      # and not loose
    assert bounds.ldexp_up(1.797e308, -2080) > 0 and bounds.ldexp_up(0.5, 2000) == float("inf")
    for _ in range(200):
        vals = [float(v) for v in 10.0 ** rng.uniform(-300, 300, size=int(rng.integers(1, 6)))]
        m, e = bounds.product_up(vals)
        exact = np.prod([Fraction(v) for v in vals])
        assert 0.5 <= m < 1 and Fraction(m) * Fraction(2) ** e >= exact
        assert Fraction(m) * Fraction(2) ** e <= exact * Fraction(1 + 1e-12)
    assert bounds.product_up([1e-200, 1e-200])[0] > 0 and bounds.product_up([0.0, 5.0]) == (0.0, 0)
    a = rng.standard_normal((4, 7)) * 10.0 ** rng.uniform(-320, 300, size=(4, 1))
    up = bounds.row_norms_up(a)
    for row, u in zip(a, up):
        sq = sum(Fraction(float(v)) ** 2 for v in row)
        assert Fraction(float(u)) ** 2 >= sq and u > 0

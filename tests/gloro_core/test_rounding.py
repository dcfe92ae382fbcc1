"""The cheap norm-wise rounding bound: it covers the real float32 error, and
certification built on it decides exactly as (or better than) the tight bound."""
import numpy as np
import pytest

from gloro_core import GloroNet, bounds, decision, rounding

CONV = [{"type": "conv", "filters": 6, "kernel": 3, "stride": 2, "padding": "same"},
        {"type": "conv", "filters": 8, "kernel": 3, "stride": 1, "padding": "valid"},
        {"type": "dense", "units": 12}, {"type": "dense", "units": 4}]


def _twin64(net):
    """The same weights in a float64 net: its logits stand in for exact arithmetic."""
    twin = GloroNet(net.input_shape, net.num_classes, net.specs, activation=net.activation, eps=net.eps,
                    dtype=np.float64)
    for (w, b), (w2, b2) in zip(net.params, twin.params):
        w2.data[...] = w.data.astype(np.float64)
        b2.data[...] = b.data.astype(np.float64)
    return twin


@pytest.mark.parametrize("activation", ["relu", "minmax"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_cheap_bound_covers_the_float32_error(rng, activation, scale):
    net = GloroNet((2, 9, 8), 4, CONV, activation=activation, eps=0.1, seed=int(rng.integers(1 << 30)))
    for w, b in net.params:   # non-zero biases so their term is exercised
        b.data[...] = rng.normal(size=b.shape).astype(np.float32)
    x64 = rng.random((30, 2, 9, 8)) * scale             # float64 input: the cast is a rounding too
    fr = net._fresh_frozen()
    y32, err = net._forward_norm_error(x64, fr)
    exact = _twin64(net).logits(x64)
    actual = np.abs(y32.astype(np.float64) - exact)
    assert np.all(actual <= err), (actual / err).max()
    assert np.any(actual > 0)                          # float32 really rounds here
    # and a usable one: within two orders of magnitude of the tight per-coordinate bound
    _, tight = net._forward_with_error(x64)
    assert np.all(actual <= tight)
    assert err.max() < 100 * tight.max(), err.max() / tight.max()


def test_abs_operator_bound_vs_explicit_matrix(rng):
    for stride, pad in [(1, "same"), (2, "same"), (2, "valid"), (3, "same")]:
        w = rng.normal(size=(5, 3, 3, 3))
        m = np.abs(bounds.conv_matrix_direct(np.abs(w), (7, 6), stride, pad))
        exact = np.linalg.norm(m, 2)
        assert exact <= rounding.abs_operator_bound(w)
    wd = rng.normal(size=(7, 11))
    assert np.linalg.norm(np.abs(wd), 2) <= rounding.abs_operator_bound(wd)


def test_fast_and_tight_paths_decide_alike(rng):
    net = GloroNet((2, 9, 8), 4, CONV, eps=0.02, seed=3)
    x = rng.random((200, 2, 9, 8)).astype(np.float32)
    fast_pred, fast_r = net.certify(x, tight_radius=False)
    pred, r = net.certify(x)
    assert np.array_equal(fast_pred, pred)
    # up to the float32 rounding of logits recomputed on a sub-batch
    assert np.all(fast_r <= r * (1 + 1e-5) + 1e-9)
    gl = net.gloro_logits(x)
    am = gl.argmax(axis=1)
    assert np.array_equal(np.where(am == 4, -1, am), pred)
    # the tight bound alone never certifies a point the combined decision rejects
    y, err = net._forward_with_error(x)
    k_pair = net._pair_k(net.lipschitz()["k_sub"])
    _, _, tight_cert, _, _ = decision.decide(y.astype(np.float64), err, k_pair, net.eps)
    assert np.all(~tight_cert | (pred != -1))
    assert 0 < (pred != -1).sum() < len(x)              # a mix, so the comparison says something


def test_sq_norms_upper_bound(rng):
    x = rng.random((6, 1000)).astype(np.float32)
    exact = (x.astype(np.float64) ** 2).sum(axis=1)
    got = rounding.sq_norms(x)
    assert np.all(got >= exact) and np.all(got <= exact * (1 + 1e-3))


def test_bias_change_refreshes_the_rounding_constants(rng):
    """Biases do not enter K but do enter the rounding bound: a cached bound must follow them."""
    net = GloroNet((2, 9, 8), 4, CONV, eps=0.02, seed=5)
    x = rng.random((5, 2, 9, 8)).astype(np.float32)
    _, err_before = net._forward_norm_error(x, net._fresh_frozen())
    net.params[0][1].data[...] = np.float32(50.0)
    _, err_after = net._forward_norm_error(x, net._fresh_frozen())
    assert np.all(err_after > 2 * err_before)


@pytest.mark.parametrize("scale_exp", [-80, -140])
def test_tiny_inputs_keep_a_valid_bound(rng, scale_exp):
    """Scaling the input by 2^-80 (squares underflow in float32) or 2^-140 (subnormal
    inputs, products underflow) must not make the rounding bound vanish or too small."""
    net = GloroNet((1, 8, 8), 10, [{"type": "conv", "filters": 4, "kernel": 3, "stride": 2},
                                   {"type": "dense", "units": 10}], seed=1)
    x = (rng.random((16, 1, 8, 8)) * 2.0 ** scale_exp).astype(np.float32)
    assert np.any(x > 0)
    exact = _twin64(net).logits(x.astype(np.float64))
    fr = net._fresh_frozen()
    y, cheap = net._forward_norm_error(x, fr)
    _, tight = net._forward_with_error(x)
    actual = np.abs(y.astype(np.float64) - exact)
    assert np.all(cheap > 0) and np.all(actual <= cheap)
    assert np.all(actual <= tight)


def test_certify_accepts_lists_when_rows_are_open(rng):
    """An eps between a point's slack-free radius and its cheap-bound radius leaves the
    point open, so the tight pass runs on a sub-batch sliced from the input."""
    net = GloroNet((2, 9, 8), 4, CONV, eps=0.02, seed=3)
    x = rng.random((40, 2, 9, 8)).astype(np.float32)
    y = net.logits(x).astype(np.float64)
    k_pair = net._pair_k(net.lipschitz()["k_sub"])
    r0 = decision.decide(y, np.zeros_like(y), k_pair, 0.0)[3]
    _, r_cheap = net.certify(x, eps=0.0, tight_radius=False)
    i = int(np.argmax(r0))
    eps = float(r0[i] + r_cheap[i]) / 2
    assert r_cheap[i] < eps < r0[i]
    pred = net.certify(x, eps=eps)[0]
    assert np.array_equal(net.certify(x.tolist(), eps=eps, tight_radius=False)[0], pred)
    assert np.array_equal(net.certify(x.tolist(), eps=eps)[0], pred)


@pytest.mark.skipif(rounding._bound_rows is None, reason="numba not importable")
@pytest.mark.parametrize("layers", [1, 2, 4])
def test_jitted_error_bound_equals_the_numpy_form(rng, layers):
    """The row loop does the reference's float64 operations in its order: same bits."""
    for _ in range(10):
        m = int(rng.integers(1, 12))
        # limits of 1e3 make some rows overflow (inf), 1e300 none
        consts = [rounding.LayerConstants(*(rng.random(5) * rng.choice([1e-30, 1.0, 1e8], size=5)),
                                          limit=rng.choice([1e3, 1e300]))
                  for _ in range(layers - 1)]
        consts.append(rounding.LayerConstants(*rng.random(5), row_norms=rng.random(m), abs_bias=rng.random(m),
                                              limit=rng.choice([1e3, 1e300])))
        n = int(rng.integers(1, 50))
        sq = rng.random(n) * 1e3
        sq[rng.random(n) < 0.2] = 0.0
        for e_in in (np.zeros(n), rng.random(n) * 1e-6):
            got = rounding.logit_error_bound(consts, sq, e_in)
            ref = rounding.logit_error_bound_reference(consts, sq, e_in)
            assert got.shape == ref.shape == (n, m)
            np.testing.assert_array_equal(got, ref)
    # a layer whose sums may pass the dtype's largest value makes the whole row inf
    consts[-1].limit = 1.0
    got = rounding.logit_error_bound(consts, np.full(3, 1e6), np.zeros(3))
    assert np.all(np.isinf(got))
    np.testing.assert_array_equal(got, rounding.logit_error_bound_reference(consts, np.full(3, 1e6), np.zeros(3)))


def test_sq_norms_jitted_and_einsum_paths_agree(rng, monkeypatch):
    """Both paths bound the squared norms from above, also for rows of subnormal float32
    values whose squares would underflow in float32."""
    x = (rng.standard_normal((7, 3001)) * np.exp2(rng.integers(-140, 60, size=(7, 3001)))).astype(np.float32)
    x[3] *= np.float32(2.0 ** -100)
    exact = (x.astype(np.float64) ** 2).sum(axis=1)
    got = rounding.sq_norms(x[:, ::-1])                  # a strided view, too
    monkeypatch.setattr(rounding, "_sq_rows", None)
    ref = rounding.sq_norms(x)
    assert np.all(exact > 0)
    assert np.all(got >= exact) and np.all(ref >= exact)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_sq_norms_bound_float64_rows_whose_squares_underflow(rng, monkeypatch):
    """float64 values below ~1e-154 square to subnormals or 0: the bound must still hold."""
    from fractions import Fraction

    x = rng.standard_normal((6, 50)) * 10.0 ** rng.integers(-200, -150, size=(6, 50))
    x[0] = 1e-170
    x[1, 1:] = 0.0
    exact = [sum(Fraction(float(v)) ** 2 for v in row) for row in x]
    for jit in (True, False):
        if not jit:
            monkeypatch.setattr(rounding, "_sq_rows", None)
        got = rounding.sq_norms(x)
        assert all(Fraction(float(g)) >= e for g, e in zip(got, exact)), jit


def test_no_false_certificate_from_tiny_float64_inputs():
    """A float64 net whose logits differ at the 1e-187 scale, where the rounding error of
    the first layer is all that separates them: never certify the wrong class (the input
    norm once underflowed to 0, and the rounding bound with it)."""
    import itertools
    from fractions import Fraction

    x0 = 1.0e-170
    ulp = float(np.spacing(x0))
    for a, b, c in itertools.permutations(range(3)):
        x = np.zeros(4)
        x[a], x[b], x[c], x[3] = x0, 0.4 * ulp, 0.2 * ulp, x0
        w0, w1 = np.zeros(4), np.zeros(4)
        w0[a], w0[b], w0[3] = 1.0, 1.0, -1.0       # exactly 0.4 ulp, computed as 0 or 1 ulp
        w1[c] = 1.0                                # exactly 0.2 ulp
        for w in (np.stack([w0, w1]), np.stack([w1, w0])):
            net = GloroNet((4,), 2, [{"type": "dense", "units": 2}], dtype=np.float64, eps=0.0)
            net.params[0][0].data[...] = w
            net.params[0][1].data[...] = 0.0
            exact = [sum(Fraction(float(p)) * Fraction(float(v)) for p, v in zip(row, x)) for row in w]
            true = int(np.argmax([float(e) for e in exact]))
            pred, _ = net.certify(x[None], eps=0.0)
            assert pred[0] in (-1, true), (a, b, c)

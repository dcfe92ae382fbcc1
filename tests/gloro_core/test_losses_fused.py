"""The margin y_⊥ as one fused node equals the op-by-op autodiff form: the same values, and
gradients that both lie within a proven rounding bound of a float64 oracle (also with two
identical weight rows, a zero distance, and with tied top logits)."""
import numpy as np
import pytest

from gloro_core import losses
from nn.tensor import Tensor

EPS = 0.3


def _run(yd, wd, k, gup, fused, monkeypatch):
    monkeypatch.setattr(losses, "_FUSED_PAIRS_MAX", 1 << 22 if fused else -1)
    y, w = Tensor(yd, requires_grad=True), Tensor(wd, requires_grad=True)
    kt = Tensor(np.asarray(k, dtype=yd.dtype), requires_grad=True) if k is not None else 1.25
    b = losses.bot_logit(y, w, kt, EPS)
    b.backward(gup)
    return b.data, y.grad, w.grad, (kt.grad if k is not None else None)


def _oracle(yd, wd, k, gup, istar):
    """float64 gradients for w and K, one example at a time, given the chosen runner-up
    classes istar (n,); with the magnitudes the rounding bounds are built from: per class,
    the summed |coefficient| of each update (signed per pair, and over examples), and the
    summed |term| of K's gradient."""
    n, m = yd.shape
    w = wd.astype(np.float64)
    kk = 1.25 if k is None else float(np.asarray(k, dtype=yd.dtype))
    j = yd.argmax(axis=1)
    gw = np.zeros_like(w)
    pair = np.zeros((m, m))                  # signed coefficient summed per (j, i*) pair
    per_example = np.zeros(m)                # sum over examples of |coefficient|, per class
    gk = gk_abs = 0.0
    for t in range(n):
        a, b = j[t], istar[t]
        d = w[a] - w[b]
        dist = np.sqrt(d @ d)
        c = float(gup[t]) * EPS * kk
        gk += float(gup[t]) * EPS * dist
        gk_abs += abs(float(gup[t]) * EPS * dist)
        if dist > 0:                         # l2_norm's gradient at 0 is 0
            gw[a] += c * d / dist
            gw[b] -= c * d / dist
        pair[a, b] += c
        per_example[a] += abs(c)
        per_example[b] += abs(c)
    per_pair = np.abs(pair).sum(axis=1) + np.abs(pair).sum(axis=0)
    return gw, gk, per_pair, per_example, gk_abs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["random", "duplicate_rows", "ties", "k_constant"])
def test_fused_margin_bot_matches_op_by_op(monkeypatch, dtype, case):
    rng = np.random.default_rng()
    n, m, d = 33, 6, 9
    yd = rng.standard_normal((n, m)).astype(dtype)
    wd = rng.standard_normal((m, d)).astype(dtype)
    if case == "duplicate_rows":
        wd[4] = wd[1]
    if case == "ties":
        top = yd.max(axis=1) + 1
        yd[:, 0] = yd[:, 2] = top  # tied top logits: j = 0, and y_⊥ must still count class 2
    k = None if case == "k_constant" else 1.7
    gup = rng.standard_normal(n).astype(dtype)
    fused = _run(yd, wd, k, gup, True, monkeypatch)
    plain = _run(yd, wd, k, gup, False, monkeypatch)
    np.testing.assert_array_equal(fused[0], plain[0])
    np.testing.assert_array_equal(fused[1], plain[1])   # same runner-up class per example
    istar = np.abs(fused[1]).argmax(axis=1)              # g_n sits at y[n, i*_n]
    gw, gk, per_pair, per_example, gk_abs = _oracle(yd, wd, k, gup, istar)
    u = np.finfo(dtype).eps
    # Each update term c * (w_a - w_b) / ||w_a - w_b|| is off by a few ulps of |c| (its unit
    # vector has entries <= 1). The fused node rounds each c_n once in dtype, sums them per pair
    # in float64, then adds up m pairs in dtype; the op-by-op form adds up all n examples in
    # dtype: gamma_k-style bounds.
    tol_fused = u * ((2 * m + 8) * per_pair + 2 * per_example)[:, None]
    tol_plain = (2 * n + 8) * u * per_example[:, None]
    assert np.all(np.abs(fused[2] - gw) <= tol_fused), np.abs(fused[2] - gw).max()
    assert np.all(np.abs(plain[2] - gw) <= tol_plain), np.abs(plain[2] - gw).max()
    if k is not None:
        tol_k = (n + 8) * u * gk_abs
        assert abs(float(fused[3]) - gk) <= tol_k
        assert abs(float(plain[3]) - gk) <= tol_k
    if case == "ties":  # never certified: y_⊥ >= y_j where the top two tie
        j = yd.argmax(axis=1)
        assert np.all(fused[0] >= yd[np.arange(n), j])

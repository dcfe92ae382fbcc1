"""EMMA and TRADES against NumPy references; EMMA's backward by float64 finite differences."""
import numpy as np
import pytest

from gloro_core import losses
from nn.gradcheck import check_backward
from nn.tensor import Tensor

EPS = 0.3


def _case(rng, n=9, m=5, d=7, dtype=np.float64):
    y = rng.standard_normal((n, m)).astype(dtype)
    w = rng.standard_normal((m, d)).astype(dtype)
    lab = rng.integers(0, m, n)
    return y, w, 0.8, lab


def _emma_ref(y, w, k, eps, lab):
    """Loop form of hukkai/liresnet's emma_loss, float64."""
    n, m = y.shape
    total = 0.0
    for t in range(n):
        l = lab[t]
        z = np.empty(m)
        for i in range(m):
            kli = k * np.linalg.norm(w[l] - w[i]) if i != l else 0.0
            r = np.clip((y[t, l] - y[t, i]) / max(eps * kli, 1e-8), 0.01, 1.0)
            z[i] = y[t, i] + r * eps * kli
        z = z - z.max()
        total += -(z[l] - np.log(np.exp(z).sum()))
    return total / n


@pytest.mark.parametrize("eps", [0.0, 0.05, EPS, 5.0])
def test_emma_matches_numpy_reference(eps):
    rng = np.random.default_rng(1)
    y, w, k, lab = _case(rng)
    got = losses.emma(Tensor(y), Tensor(w), k, eps, lab).item()
    assert got == pytest.approx(_emma_ref(y, w, k, eps, lab), rel=1e-12)
    # float32 within float32 rounding of the float64 reference
    got32 = losses.emma(Tensor(y.astype(np.float32)), Tensor(w.astype(np.float32)), k, eps,
                        lab).item()
    assert got32 == pytest.approx(_emma_ref(y, w, k, eps, lab), rel=1e-5)


def test_emma_fraction_is_each_class_own_distance_clipped():
    """A class beyond eps gets eps; one within it its own distance; a winner 0.01 eps."""
    w = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])          # K_0i = 1, 2 (k = 1)
    y = np.array([[1.0, 0.95, -5.0]])                            # label 0
    kli = np.array([[0.0, 1.0, 2.0]])
    frac = losses.emma_fraction(y, kli, 0.1, np.array([0]))
    assert frac[0, 1] == pytest.approx(0.5) and frac[0, 2] == 1.0
    y2 = np.array([[1.0, 1.5, 0.0]])                             # class 1 wins: clipped low
    assert losses.emma_fraction(y2, kli, 0.1, np.array([0]))[0, 1] == 0.01
    z = losses.emma_logits(Tensor(y), Tensor(w), 1.0, 0.1, np.array([0])).data
    assert np.allclose(z, [[1.0, 0.95 + 0.05, -5.0 + 0.2]])    # label logit untouched


def test_emma_uses_the_label_not_the_prediction():
    rng = np.random.default_rng(2)
    y, w, k, lab = _case(rng)
    pred = y.argmax(1)
    other = (pred + 1) % y.shape[1]
    a = losses.emma(Tensor(y), Tensor(w), k, EPS, pred).item()
    b = losses.emma(Tensor(y), Tensor(w), k, EPS, other).item()
    assert a != pytest.approx(b)


@pytest.mark.parametrize("seed", range(3))
def test_emma_gradient_finite_differences(seed):
    """Backward of y, W and K with the clipped fraction held constant (it is detached)."""
    rng = np.random.default_rng(seed)
    y, w, k, lab = _case(rng)
    kt = np.asarray(k)
    kli = k * np.linalg.norm(w[lab][:, None, :] - w[None], axis=2)
    frac = losses.emma_fraction(y, kli, EPS, lab)
    assert ((frac > 0.01) & (frac < 1)).any()      # the fraction matters at this point

    def fn(yt, wt, kk):
        return losses.cross_entropy(losses.emma_logits(yt, wt, kk, EPS, lab, frac=frac), lab)

    check_backward(fn, [y, w, kt], eps=1e-6, rtol=1e-6, atol=1e-10, rng=seed)
    # and the real loss's gradient is that of the fixed-fraction one
    ts = [Tensor(a, requires_grad=True) for a in (y, w, kt)]
    losses.emma(*ts, EPS, lab).backward()
    ref = [Tensor(a, requires_grad=True) for a in (y, w, kt)]
    fn(*ref).backward()
    for a, b in zip(ts, ref):
        np.testing.assert_allclose(a.grad, b.grad, rtol=1e-12, atol=1e-15)


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("form", ["kl", "ce"])
def test_trades_matches_numpy_reference(form):
    rng = np.random.default_rng(3)
    y, w, k, lab = _case(rng)
    gl = losses.gloro_logits(Tensor(y), Tensor(w), k, EPS).data
    p = _softmax(y)
    q = _softmax(gl)[:, :-1]
    clean = -np.log(p[np.arange(len(lab)), lab]).mean()
    rob = ((p * (np.log(p) - np.log(q))).sum(1) if form == "kl" else -(p * np.log(q)).sum(1)).mean()
    got = losses.trades(Tensor(y), Tensor(gl), lab, 0.7, form).item()
    assert got == pytest.approx(clean + 0.7 * rob, rel=1e-12)

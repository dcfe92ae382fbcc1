"""Losses against direct NumPy formulas, their gradients, -inf logits, bad input."""
import numpy as np
import pytest

import nn
from nn import Tensor
from nn.gradcheck import check_backward_elementwise
from nn.losses import kl_divergence, softmax_cross_entropy


def np_log_softmax(z):
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def probs(rng, n, m, zeros=False):
    p = rng.random((n, m)) + 0.05
    if zeros:
        p[rng.random((n, m)) < 0.3] = 0.0
        p[:, 0] += 0.1  # every row keeps some mass
    return p / p.sum(axis=1, keepdims=True)


def test_cross_entropy_int_labels_value_and_grad(rng):
    z = rng.standard_normal((5, 4)) * 2
    y = rng.integers(0, 4, 5)
    want = -np.mean(np_log_softmax(z)[np.arange(5), y])
    np.testing.assert_allclose(softmax_cross_entropy(Tensor(z), y).item(), want, rtol=1e-13)
    check_backward_elementwise(lambda t: softmax_cross_entropy(t, y), [z], rng=rng)
    # analytic form: (softmax - onehot) / N
    x = Tensor(z, requires_grad=True)
    softmax_cross_entropy(x, y).backward()
    onehot = np.eye(4)[y]
    np.testing.assert_allclose(x.grad, (np.exp(np_log_softmax(z)) - onehot) / 5, rtol=1e-12, atol=1e-15)


def test_cross_entropy_prob_targets(rng):
    z = rng.standard_normal((3, 5))
    t = probs(rng, 3, 5, zeros=True)
    want = -np.mean((t * np_log_softmax(z)).sum(axis=1))
    np.testing.assert_allclose(softmax_cross_entropy(Tensor(z), t).item(), want, rtol=1e-13)
    check_backward_elementwise(lambda a: softmax_cross_entropy(a, t), [z], rng=rng)
    # a Tensor target gets a gradient too
    check_backward_elementwise(lambda a, b: softmax_cross_entropy(a, b), [z, t], rng=rng)
    # one-hot probabilities equal integer labels
    y = rng.integers(0, 5, 3)
    np.testing.assert_allclose(softmax_cross_entropy(Tensor(z), np.eye(5)[y]).item(),
                               softmax_cross_entropy(Tensor(z), y).item(), rtol=1e-14)


def test_cross_entropy_with_minus_inf_logit_zero_target(rng):
    z = rng.standard_normal((3, 4))
    z[:, 3] = -np.inf  # e.g. a masked class with target probability 0
    t = probs(rng, 3, 4)
    t[:, 3] = 0.0
    t /= t.sum(axis=1, keepdims=True)
    x = Tensor(z, requires_grad=True)
    tt = Tensor(t, requires_grad=True)
    loss = softmax_cross_entropy(x, tt)
    want = -np.mean((t[:, :3] * np_log_softmax(z[:, :3])).sum(axis=1))
    np.testing.assert_allclose(loss.item(), want, rtol=1e-13)
    loss.backward()
    assert np.isfinite(x.grad).all() and np.isfinite(tt.grad).all()
    np.testing.assert_array_equal(x.grad[:, 3], 0.0)


def test_cross_entropy_float32(rng):
    z = Tensor((rng.standard_normal((4, 3)) * 50).astype(np.float32), requires_grad=True)
    loss = softmax_cross_entropy(z, rng.integers(0, 3, 4))
    assert loss.dtype == np.float32 and np.isfinite(loss.item())
    loss.backward()
    assert z.grad.dtype == np.float32


def test_cross_entropy_bad_input(rng):
    z = Tensor(rng.standard_normal((3, 4)))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        softmax_cross_entropy(z, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="shape"):
        softmax_cross_entropy(z, np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        softmax_cross_entropy(z, np.ones((3, 5)) / 5)
    with pytest.raises(ValueError, match=r"\(N, m\)"):
        softmax_cross_entropy(Tensor(rng.standard_normal(4)), np.array([1]))
    with pytest.raises(TypeError):
        softmax_cross_entropy(z, np.ones(3, dtype=bool))


def test_kl_value_and_grads(rng):
    z = rng.standard_normal((4, 5))
    p = probs(rng, 4, 5, zeros=True)
    logq = np_log_softmax(z)
    pos = p > 0
    want = np.mean(np.where(pos, p * (np.log(np.where(pos, p, 1.0)) - logq), 0.0).sum(axis=1))
    np.testing.assert_allclose(kl_divergence(p, Tensor(z)).item(), want, rtol=1e-12)
    assert kl_divergence(p, Tensor(z)).item() >= 0
    check_backward_elementwise(lambda a: kl_divergence(p, a), [z], rng=rng)
    # gradient through p too when it is a Tensor; entries with p = 0 are constants (0 log 0 = 0)
    nz = probs(rng, 4, 5)
    check_backward_elementwise(lambda a, b: kl_divergence(a, b), [nz, z], rng=rng)
    pt = Tensor(p, requires_grad=True)
    kl_divergence(pt, Tensor(z)).backward()
    assert np.isfinite(pt.grad).all()


def test_kl_zero_when_equal(rng):
    z = rng.standard_normal((3, 4))
    p = np.exp(np_log_softmax(z))
    assert abs(kl_divergence(p, Tensor(z)).item()) < 1e-14


def test_kl_against_cross_entropy_identity(rng):
    # KL(p || q) = CE(p, q) - H(p)
    z = rng.standard_normal((3, 4))
    p = probs(rng, 3, 4)
    h = -np.mean((p * np.log(p)).sum(axis=1))
    np.testing.assert_allclose(kl_divergence(p, Tensor(z)).item(),
                               softmax_cross_entropy(Tensor(z), p).item() - h, rtol=1e-12)


def test_kl_with_minus_inf_logit(rng):
    z = rng.standard_normal((2, 3))
    z[:, 2] = -np.inf
    p = np.array([[0.3, 0.7, 0.0], [1.0, 0.0, 0.0]])
    x = Tensor(z, requires_grad=True)
    pt = Tensor(p, requires_grad=True)
    loss = kl_divergence(pt, x)
    assert np.isfinite(loss.item())
    loss.backward()
    assert np.isfinite(x.grad).all() and np.isfinite(pt.grad).all()


def test_kl_bad_shape(rng):
    with pytest.raises(ValueError, match="p_target"):
        kl_divergence(np.ones((2, 3)) / 3, Tensor(rng.standard_normal((2, 4))))


def test_accuracy(rng):
    z = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]])
    assert nn.losses.accuracy(Tensor(z), np.array([1, 0, 0])) == 1.0
    assert nn.losses.accuracy(z, np.array([1, 1, 1])) == pytest.approx(1 / 3)

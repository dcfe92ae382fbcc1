"""Adam against a hand-written float64 sequence (Keras form), state save/restore, errors."""
import numpy as np
import pytest

import nn
from nn import Tensor


def adam_by_hand(p, grads, lr, b1, b2, eps):
    """Independent of kernels.adam_update: plain float64 formulas, step by step."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - lr_t * m / (np.sqrt(v) + eps)
        out.append(p.copy())
    return out


def test_adam_matches_hand_sequence_float64(rng):
    p0 = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(4)]
    lr, b1, b2, eps = 0.01, 0.8, 0.95, 1e-3  # non-default, so each constant matters
    want = adam_by_hand(p0, grads, lr, b1, b2, eps)
    p = nn.Parameter(p0.copy())
    opt = nn.Adam([p], lr=lr, beta1=b1, beta2=b2, epsilon=eps)
    for t, g in enumerate(grads):
        p.grad = g.copy()
        opt.step()
        assert opt.t == t + 1
        np.testing.assert_allclose(p.data, want[t], rtol=1e-14, atol=1e-15)


def test_adam_first_step_numbers():
    # written out: t=1, m = 0.1 g, v = 0.001 g^2, lr_t = lr sqrt(0.001)/0.1
    p = nn.Parameter(np.array([1.0, -2.0]))
    opt = nn.Adam([p])  # Keras defaults
    assert (opt.lr, opt.beta1, opt.beta2, opt.epsilon) == (1e-3, 0.9, 0.999, 1e-7)
    p.grad = np.array([0.5, -4.0])
    opt.step()
    lr_t = 1e-3 * np.sqrt(1 - 0.999) / (1 - 0.9)
    m = 0.1 * np.array([0.5, -4.0])
    v = 0.001 * np.array([0.25, 16.0])
    np.testing.assert_allclose(p.data, np.array([1.0, -2.0]) - lr_t * m / (np.sqrt(v) + 1e-7), rtol=1e-15)
    # first Adam step moves each entry by about lr (sign of the gradient)
    np.testing.assert_allclose(p.data, [1.0 - 1e-3, -2.0 + 1e-3], rtol=1e-6)


def test_adam_float32_in_place_and_lr_change(rng):
    p = nn.Parameter(rng.standard_normal(5).astype(np.float32))
    buf = p.data
    opt = nn.Adam([p], lr=0.1)
    grads = [rng.standard_normal(5).astype(np.float32) for _ in range(3)]
    ref = p.data.astype(np.float64)
    for i, g in enumerate(grads):
        if i == 2:
            opt.lr = 0.05  # schedules set lr between steps
        p.grad = g
        opt.step()
    assert p.data is buf and p.data.dtype == np.float32  # updated in place
    assert opt.m[0].dtype == np.float32
    # same as the float64 sequence, with lr 0.1, 0.1, 0.05
    m = v = 0
    for t, g in enumerate(grads, 1):
        g = g.astype(np.float64)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        lr = 0.1 if t < 3 else 0.05
        ref = ref - lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(p.data, ref, rtol=1e-5, atol=1e-6)


def test_adam_skips_params_without_grad(rng):
    a, b = nn.Parameter(rng.standard_normal(2)), nn.Parameter(rng.standard_normal(2))
    b0 = b.data.copy()
    opt = nn.Adam([a, b])
    a.grad = np.ones(2)
    opt.step()
    np.testing.assert_array_equal(b.data, b0)
    assert opt.m[1] is None and opt.t == 1


def test_adam_zero_grad_and_minimises_quadratic(rng):
    target = rng.standard_normal(4)
    p = nn.Parameter(np.zeros(4))
    opt = nn.Adam([p], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        loss = ((p - target) ** 2).sum()
        loss.backward()
        opt.step()
    assert p.grad is not None
    opt.zero_grad()
    assert p.grad is None
    np.testing.assert_allclose(p.data, target, atol=1e-3)


def test_adam_state_dict_resume_is_exact(rng):
    p0 = rng.standard_normal((2, 3))
    grads = [rng.standard_normal((2, 3)) for _ in range(4)]
    # uninterrupted
    p = nn.Parameter(p0.copy())
    opt = nn.Adam([p], lr=0.01)
    for g in grads:
        p.grad = g
        opt.step()
    # interrupted after 2 steps, state through a npz-style copy
    q = nn.Parameter(p0.copy())
    o1 = nn.Adam([q], lr=0.01)
    for g in grads[:2]:
        q.grad = g
        o1.step()
    state = {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in o1.state_dict().items()}
    assert state["t"] == 2 and "m.0" in state and "v.0" in state
    q2 = nn.Parameter(q.data.copy())
    o2 = nn.Adam([q2], lr=0.5)
    o2.load_state_dict(state)
    assert o2.lr == 0.01 and o2.t == 2
    for g in grads[2:]:
        q2.grad = g
        o2.step()
    np.testing.assert_array_equal(q2.data, p.data)


def test_adam_bad_input(rng):
    with pytest.raises(ValueError, match="empty"):
        nn.Adam([])
    with pytest.raises(TypeError, match="does not require"):
        nn.Adam([Tensor(np.ones(2))])
    with pytest.raises(ValueError, match="betas"):
        nn.Adam([nn.Parameter(np.ones(2))], beta1=1.0)
    p = nn.Parameter(np.ones(2))
    opt = nn.Adam([p])
    p.grad = np.ones(3)
    with pytest.raises(ValueError, match="grad shape"):
        opt.step()
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict({**opt.state_dict(), "n_params": 2})

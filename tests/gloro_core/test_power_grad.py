"""--power-grad: K_sub differentiated through each step's power iterations (the authors'
TensorFlow code), against the default that holds the iterates fixed in the gradient."""
import copy

import numpy as np
import pytest

from gloro_core.model import GloroNet
from gloro_core.train import TrainConfig, train
from nn import functions as F
from nn.gradcheck import check_backward

# a conv, a strided conv, a linear residual block, invertible downsampling, dense layers
SPECS = [
    {"type": "conv", "filters": 4, "kernel": 3, "stride": 1, "padding": "same"},
    {"type": "conv", "filters": 4, "kernel": 4, "stride": 2, "padding": "same"},
    {"type": "liresnet", "kernel": 3},
    {"type": "invdown"},
    {"type": "dense", "units": 12},
    {"type": "dense", "units": 5, "normalize": True},
]


def _net(seed=0):
    return GloroNet((2, 8, 8), 5, SPECS, activation="minmax", eps=0.1, seed=seed, dtype="float64")


@pytest.mark.parametrize("iters", [1, 3, 10])
def test_unrolled_k_sub_has_the_value_of_the_fixed_iterate_path(iters):
    """Same steps, same numbers: power steps then sigma, or the steps in the graph."""
    a = _net()
    b = copy.deepcopy(a)
    a.power_update(iters)
    ka = float(a.k_sub_tensor().data)
    kb = float(b.k_sub_tensor(unrolled=iters).data)
    assert kb == pytest.approx(ka, rel=1e-12)
    for va, vb in zip(a.iterates[:-1], b.iterates[:-1]):   # the last layer's is not K_sub's
        np.testing.assert_allclose(vb, va, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("index", [0, 1, 2, 4])
@pytest.mark.parametrize("iters", [1, 4])
def test_sigma_unrolled_gradient_matches_finite_differences(rng, index, iters):
    """d sigma / d W through the steps, float64 central differences from the same iterate."""
    layer = _net().layers[index]
    v0 = layer.iterate.copy()

    def fn(w):
        layer.weight, layer.iterate = w, v0.copy()
        return layer.sigma_unrolled(iters)

    check_backward(fn, [layer.weight.data.copy()], rng=rng)


def _grads(net, unrolled):
    for p in net.parameters():
        p.grad = None
    net.k_sub_tensor(unrolled=unrolled).backward()
    return np.concatenate([np.ravel(p.grad) for p in net.parameters() if p.grad is not None])


def test_the_gradients_agree_at_a_converged_iterate_and_differ_far_from_one():
    """sigma(v) = ||A v|| is stationary in v at the top singular vector, so the term through
    the iterates vanishes there (to first order) and the two gradients agree; from a random
    iterate one step is far from converged and the extra term is large."""
    far = _net()
    g_fixed = _grads(copy.deepcopy(far), None)
    g_unrolled = _grads(copy.deepcopy(far), 1)
    assert np.linalg.norm(g_unrolled - g_fixed) > 1e-2 * np.linalg.norm(g_fixed)

    near = _net()
    near.power_update(3000)
    g_fixed = _grads(copy.deepcopy(near), 0)
    g_unrolled = _grads(copy.deepcopy(near), 1)
    assert np.linalg.norm(g_unrolled - g_fixed) < 1e-4 * np.linalg.norm(g_fixed)


def test_conv2d_transpose_is_the_adjoint_and_differentiates(rng):
    x_shape, w = (2, 3, 7, 6), rng.standard_normal((4, 3, 4, 4))
    u = rng.standard_normal((2, 4, 4, 3))
    x = rng.standard_normal(x_shape)
    at_u = F.conv2d_transpose(u, w, x_shape, 2, "same").data
    a_x = F.conv2d(x, w, None, 2, "same").data
    assert float((at_u * x).sum()) == pytest.approx(float((u * a_x).sum()), rel=1e-12)
    check_backward(lambda u, w: F.conv2d_transpose(u, w, x_shape, 2, "same"), [u, w], rng=rng)
    check_backward(lambda u, w: F.conv2d_transpose(u, w, (1, 3, 5, 5), 1, 1),
                   [rng.standard_normal((1, 4, 4, 4)), w], rng=rng)


def test_train_with_power_grad(tmp_path):
    tiny = dict(dataset="synthetic", arch="c(4,3,2),r(3),d(16)", synthetic_shape=(1, 10, 10),
                synthetic_n=(96, 48), batch=32, power_iters=2, eps=0.1, train_eps=0.15,
                lipschitz_max_iter=300, progress=False, eval_batch=64, val=16, lr=3e-3)
    a = train(TrainConfig(out=str(tmp_path / "a"), epochs=2, power_grad=True, **tiny), log=lambda *a: None)
    b = train(TrainConfig(out=str(tmp_path / "b"), epochs=2, **tiny), log=lambda *a: None)
    assert all(np.isfinite(m["loss"]) for m in a) and a[1]["loss"] < a[0]["loss"]
    assert a[0]["loss"] != b[0]["loss"]    # the option reaches the step


def test_a_zero_operator_gives_zero_and_keeps_the_iterate():
    """As power_steps: A v = 0 stops the steps, the estimate is 0 (no NaN), v is kept."""
    net = _net()
    layer = net.layers[0]
    layer.weight.data[...] = 0.0
    v0 = layer.iterate.copy()
    s = layer.sigma_unrolled(3)
    s.backward()
    assert float(s.data) == 0.0 and np.isfinite(layer.weight.grad).all()
    np.testing.assert_array_equal(layer.iterate, v0)

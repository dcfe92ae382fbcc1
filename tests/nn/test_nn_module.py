"""Module: parameter registration and naming, nesting, gradients through a whole model of
nn ops, train/eval, state dicts, devices (nn has no layer classes: ``small_net`` is a
Module subclass of the tests, tests/nn/conftest.py)."""
import numpy as np
import pytest

import nn
from nn import Tensor
from nn.gradcheck import check_backward

NAMES = ["conv1_w", "conv1_b", "conv2_w", "conv2_b", "dense_w", "dense_b"]


class Affine(nn.Module):
    """x (N, n_in) -> x W^T + b (N, n_out): a sub-module for the nesting tests."""

    def __init__(self, n_in, n_out, rng):
        super().__init__()
        self.weight = nn.Parameter(rng.standard_normal((n_out, n_in)))
        self.bias = nn.Parameter(np.zeros(n_out))

    def forward(self, x):
        return nn.F.dense(x, self.weight, self.bias)


def test_named_parameters_order_and_names(rng, small_net):
    net = small_net(rng)
    assert [n for n, _ in net.named_parameters()] == NAMES
    assert [p.name for p in net.parameters()] == NAMES   # a Parameter takes its attribute's name
    assert [p.shape for p in net.parameters()] == [(4, 2, 3, 3), (4,), (6, 4, 4, 4), (6,), (3, 54), (3,)]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in net.parameters())
    assert net.modules() == [net]


def test_nested_modules_register_in_order(rng):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(np.ones(1))
            self.inner = Affine(4, 4, rng)
            self.out = Affine(4, 2, rng)

        def forward(self, x):
            return self.out(self.inner(x)) * self.scale

    b = Block()
    assert [n for n, _ in b.named_parameters()] == ["scale", "inner.weight", "inner.bias", "out.weight", "out.bias"]
    assert b.modules() == [b, b.inner, b.out]
    assert b(Tensor(rng.standard_normal((3, 4)))).shape == (3, 2)
    first = b.out.weight
    b.out = Affine(4, 2, rng)            # re-assignment replaces, keeps the count
    assert len(b.parameters()) == 5 and all(p is not first for p in b.parameters())
    b.inner = None                       # assigning a non-module drops the registration
    assert [n for n, _ in b.named_parameters()] == ["scale", "out.weight", "out.bias"]


def test_assigning_before_init_is_an_error():
    class Forgot(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(2))

    with pytest.raises(RuntimeError, match="Module.__init__"):
        Forgot()


@pytest.mark.parametrize("act", ["relu", "minmax"])
def test_whole_model_gradients(rng, small_net, act):
    net = small_net(rng, act=act, dtype=np.float64)
    x = rng.standard_normal((2, 2, 6, 6))
    params = net.parameters()
    # random biases so no pre-activation sits at the bias-zero symmetric point
    for p in params:
        p.data = rng.standard_normal(p.shape) * 0.5
    # the network as a function of (x, *parameters), for the checker's float64 leaves
    check_backward(net.apply, [x] + [p.data for p in params], rng=rng)
    # and the Module path gives the same parameter gradients as the functional path
    net.zero_grad()
    gy = rng.standard_normal((2, 3))
    net(Tensor(x)).backward(gy)
    leaves = [Tensor(p.data, requires_grad=True) for p in params]
    net.apply(Tensor(x), *leaves).backward(gy)
    for p, t in zip(params, leaves):
        np.testing.assert_allclose(p.grad, t.grad, rtol=1e-12, atol=1e-14)
    net.zero_grad()
    assert all(p.grad is None for p in params)


def test_model_float32_end_to_end_dtypes(rng, small_net):
    net = small_net(rng, act="minmax")
    x = Tensor(rng.standard_normal((3, 2, 6, 6)).astype(np.float32), requires_grad=True)
    loss = nn.losses.softmax_cross_entropy(net(x), rng.integers(0, 3, 3))
    assert loss.dtype == np.float32
    loss.backward()
    assert x.grad.dtype == np.float32
    assert all(p.grad.dtype == np.float32 and np.isfinite(p.grad).all() for p in net.parameters())


def test_train_eval_flags(rng):
    b = Affine(2, 2, rng)
    outer = nn.Module()
    outer.inner = b
    assert outer.training and b.training
    assert outer.eval() is outer
    assert not outer.training and not b.training
    outer.train()
    assert outer.training and b.training


def test_state_dict_roundtrip(rng, small_net):
    a, b = small_net(rng), small_net(rng)
    for p in a.parameters() + b.parameters():   # nonzero biases, so they matter too
        p.data += rng.standard_normal(p.shape).astype(np.float32)
    x = Tensor(rng.standard_normal((2, 2, 6, 6)).astype(np.float32))
    assert not np.allclose(a(x).data, b(x).data)
    sd = a.state_dict()
    assert list(sd) == NAMES
    b.load_state_dict(sd)
    np.testing.assert_array_equal(a(x).data, b(x).data)
    sd["conv1_w"][...] = 0.0  # a copy: the model is untouched
    assert np.abs(a.conv1_w.data).sum() > 0 and np.abs(b.conv1_w.data).sum() > 0
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({k: v for k, v in sd.items() if k != "conv1_b"})
    with pytest.raises(KeyError, match="unexpected"):
        b.load_state_dict({**sd, "extra": np.zeros(1)})
    bad = dict(sd)
    bad["conv1_b"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict(bad)
    b.load_state_dict({k: v.astype(np.float64) for k, v in sd.items()})   # cast to the parameter's dtype
    assert all(p.dtype == np.float32 for p in b.parameters())


def test_module_to_cpu_and_bad_device(rng, small_net):
    net = small_net(rng)
    before = [p.data.copy() for p in net.parameters()]
    net(Tensor(rng.standard_normal((1, 2, 6, 6)).astype(np.float32))).sum().backward()
    assert net.to("CPU") is net
    for p, b in zip(net.parameters(), before):
        assert isinstance(p.data, np.ndarray) and p.grad is None
        np.testing.assert_array_equal(p.data, b)
    with pytest.raises(ValueError, match="device"):
        net.to("tpu")

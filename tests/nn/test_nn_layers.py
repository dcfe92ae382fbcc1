"""Layers: shapes, parameter registration/naming, gradients through a whole model, state dicts."""
import numpy as np
import pytest

import nn
from nn import F, Tensor
from nn.gradcheck import check_backward


def small_net(rng, act=nn.ReLU, dtype=np.float32):
    return nn.Sequential(
        nn.Conv2D(2, 4, 3, rng=rng, dtype=dtype), act(),
        nn.Conv2D(4, 6, 4, stride=2, rng=rng, dtype=dtype), act(),
        nn.Flatten(),
        nn.Dense(6 * 3 * 3, 3, rng=rng, dtype=dtype),
    )


def test_conv2d_layer_shapes_and_attributes(rng):
    layer = nn.Conv2D(3, 8, 4, stride=2, padding="same", rng=rng)
    assert layer.weight.shape == (8, 3, 4, 4) and layer.bias.shape == (8,)
    assert layer.kernel == (4, 4) and layer.stride == (2, 2) and layer.padding == "same"
    assert layer.weight.dtype == np.float32 and layer.bias.dtype == np.float32
    np.testing.assert_array_equal(layer.bias.data, 0.0)
    y = layer(Tensor(rng.standard_normal((2, 3, 9, 7)).astype(np.float32)))
    assert y.shape == (2, 8, 5, 4) and y.dtype == np.float32
    valid = nn.Conv2D(3, 5, (3, 2), padding="valid", rng=rng, dtype=np.float64)
    assert valid(Tensor(rng.standard_normal((1, 3, 6, 6)))).shape == (1, 5, 4, 5)
    assert valid.kernel == (3, 2)


def test_dense_layer(rng):
    layer = nn.Dense(7, 3, rng=rng)
    assert layer.weight.shape == (3, 7) and layer.bias.shape == (3,)
    x = rng.standard_normal((4, 7)).astype(np.float32)
    y = layer(Tensor(x))
    np.testing.assert_allclose(y.data, x @ layer.weight.data.T, rtol=1e-5, atol=1e-6)
    nb = nn.Dense(7, 3, rng=rng, use_bias=False)
    assert nb.bias is None and len(nb.parameters()) == 1


def test_bad_layer_args():
    with pytest.raises(ValueError):
        nn.Conv2D(3, 0, 3)
    with pytest.raises(ValueError):
        nn.Dense(0, 3)
    with pytest.raises(ValueError, match="unknown initialiser"):
        nn.Dense(3, 3, init="nope")
    with pytest.raises(TypeError):
        nn.Sequential(nn.ReLU(), "not a layer")


def test_named_parameters_order_and_names(rng):
    net = small_net(rng)
    names = [n for n, _ in net.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias"]
    assert [p.shape for p in net.parameters()] == [(4, 2, 3, 3), (4,), (6, 4, 4, 4), (6,), (3, 54), (3,)]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in net.parameters())


def test_sequential_container(rng):
    net = small_net(rng)
    assert len(net) == 6
    assert isinstance(net[0], nn.Conv2D) and isinstance(net[-1], nn.Dense)
    assert [type(m).__name__ for m in net] == ["Conv2D", "ReLU", "Conv2D", "ReLU", "Flatten", "Dense"]
    head = net[:2]
    assert isinstance(head, nn.Sequential) and len(head) == 2
    assert "Conv2D" in repr(net)


def test_train_eval_flags(rng):
    net = small_net(rng)
    assert all(m.training for m in net.modules())
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_nested_modules_register(rng):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Dense(4, 4, rng=rng), nn.ReLU())
            self.out = nn.Dense(4, 2, rng=rng)

        def forward(self, x):
            return self.out(self.inner(x))

    b = Block()
    assert [n for n, _ in b.named_parameters()] == ["inner.0.weight", "inner.0.bias", "out.weight", "out.bias"]
    b.out = nn.Dense(4, 2, rng=rng)  # re-assignment replaces, keeps order
    assert len(b.parameters()) == 4


@pytest.mark.parametrize("act", [nn.ReLU, nn.MinMax])
def test_whole_model_gradients(rng, act):
    net = small_net(rng, act=act, dtype=np.float64)
    x = rng.standard_normal((2, 2, 6, 6))
    params = net.parameters()
    # random biases so no pre-activation sits at the bias-zero symmetric point
    for p in params:
        p.data = rng.standard_normal(p.shape) * 0.5

    # the same network as a function of (x, *parameters), for the checker's float64 leaves
    def functional(xx, *ps):
        h = xx
        k = 0
        for layer in net:
            if isinstance(layer, nn.Conv2D):
                h = F.conv2d(h, ps[k], ps[k + 1], layer.stride, layer.padding)
                k += 2
            elif isinstance(layer, nn.Dense):
                h = F.dense(h, ps[k], ps[k + 1])
                k += 2
            else:
                h = layer(h)
        return h

    check_backward(functional, [x] + [p.data for p in params], rng=rng)
    # and the Module path gives the same parameter gradients as the functional path
    net.zero_grad()
    gy = rng.standard_normal((2, 3))
    net(Tensor(x)).backward(gy)
    leaves = [Tensor(p.data, requires_grad=True) for p in params]
    functional(Tensor(x), *leaves).backward(gy)
    for p, t in zip(params, leaves):
        np.testing.assert_allclose(p.grad, t.grad, rtol=1e-12, atol=1e-14)


def test_model_float32_end_to_end_dtypes(rng):
    net = small_net(rng, act=nn.MinMax)
    x = Tensor(rng.standard_normal((3, 2, 6, 6)).astype(np.float32), requires_grad=True)
    loss = nn.losses.softmax_cross_entropy(net(x), rng.integers(0, 3, 3))
    assert loss.dtype == np.float32
    loss.backward()
    assert x.grad.dtype == np.float32
    assert all(p.grad.dtype == np.float32 and np.isfinite(p.grad).all() for p in net.parameters())


def test_state_dict_roundtrip(rng):
    a, b = small_net(rng), small_net(rng)
    x = Tensor(rng.standard_normal((2, 2, 6, 6)).astype(np.float32))
    assert not np.allclose(a(x).data, b(x).data)
    sd = a.state_dict()
    assert list(sd) == [n for n, _ in a.named_parameters()]
    b.load_state_dict(sd)
    np.testing.assert_array_equal(a(x).data, b(x).data)
    sd["0.weight"][...] = 0.0  # a copy: the model is untouched
    assert np.abs(a[0].weight.data).sum() > 0
    with pytest.raises(KeyError):
        b.load_state_dict({k: v for k, v in sd.items() if k != "0.bias"})
    bad = dict(sd)
    bad["0.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict(bad)


def test_flatten_layer(rng):
    x = Tensor(rng.standard_normal((3, 2, 2, 2)))
    assert nn.Flatten()(x).shape == (3, 8)


def test_module_to_bad_device(rng):
    with pytest.raises(ValueError, match="device"):
        nn.Dense(2, 2, rng=rng).to("tpu")

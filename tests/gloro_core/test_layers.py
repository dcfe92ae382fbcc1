"""The layer classes: spec round trip, operator adjoints, sound bounds, the PyTorch export."""
import numpy as np
import pytest

import kernels
from gloro_core import layers as L
from gloro_core.model import GloroNet

SPECS = [{"type": "conv", "filters": 4, "kernel": 3, "stride": 2, "padding": "same"},
         {"type": "conv", "filters": 2, "kernel": 2, "stride": 1, "padding": "valid"},
         {"type": "dense", "units": 6}, {"type": "dense", "units": 3}]


def test_specs_round_trip_and_shapes():
    layers = L.build(SPECS, (2, 7, 6), 3, L.ReLU())
    assert [layer.spec for layer in layers] == SPECS
    assert [layer.out_shape for layer in layers] == [(4, 4, 3), (2, 3, 2), (6,), (3,)]
    assert layers[2].in_shape == (12,) and layers[2].iterate_shape == (1, 12)
    again = [type(layer).from_spec(layer.spec, i, layer.in_shape) for i, layer in enumerate(layers)]
    assert [layer.w_shape for layer in again] == [layer.w_shape for layer in layers]


@pytest.mark.parametrize("i", range(4))
def test_adjoint_and_provable_bound_against_the_explicit_matrix(i):
    rng = np.random.default_rng(i)
    layer = L.build(SPECS, (2, 7, 6), 3, L.ReLU())[i]
    w = rng.standard_normal(layer.w_shape)
    v = rng.standard_normal((1,) + layer.in_shape)
    u = rng.standard_normal((1,) + layer.out_shape)
    np.testing.assert_allclose((layer.apply(w, v) * u).sum(), (v * layer.adjoint(w, u)).sum(), rtol=1e-10)
    n = int(np.prod(layer.in_shape))
    a = layer.apply(w, np.eye(n).reshape((n,) + layer.in_shape)).reshape(n, -1).T
    exact = np.linalg.norm(a, 2)
    bound, _ = layer.provable(w)
    assert exact <= bound <= exact * (1 + 1e-6)   # small convs get the explicit matrix's norm
    assert np.linalg.norm(np.abs(a), 2) <= layer.abs_bound(w)


def _run_torch_layout(modules, x):
    """The exported (torch.nn name, kwargs, state) list, run with NumPy and our kernels."""
    for name, kw, state in modules:
        if name == "ZeroPad2d":
            pl, pr, pt, pb = kw["padding"]
            x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        elif name == "Conv2d":
            assert kw["padding"] == 0 and state["weight"].shape[2:] == kw["kernel_size"]
            x = kernels.conv2d(x, state["weight"], state["bias"], kw["stride"], "valid")
        elif name == "Flatten":
            x = x.reshape(len(x), -1)
        elif name == "Linear":
            assert state["weight"].shape == (kw["out_features"], kw["in_features"])
            x = x @ state["weight"].T + state["bias"]
        elif name == "ReLU":
            x = np.maximum(x, 0)
        else:
            raise AssertionError(name)
    return x


def test_torch_layout_export_computes_the_net():
    net = GloroNet((2, 7, 6), 3, SPECS, dtype=np.float64, seed=3)
    for _, b in net.params:
        b.data[:] = np.random.default_rng(1).normal(0, 0.1, b.shape)
    modules = []
    for i, layer in enumerate(net.layers):
        modules += layer.torch_modules() + (net.act.torch_modules() if i < net.num_layers - 1 else [])
    x = np.random.default_rng(2).random((5, 2, 7, 6))
    np.testing.assert_allclose(_run_torch_layout(modules, x), net.logits(x), rtol=1e-12, atol=1e-12)


def test_minmax_error_propagation_takes_the_pair_max():
    e = np.array([[1.0, 3.0, 2.0, 0.5]])
    np.testing.assert_array_equal(L.MinMax().propagate_error(e), [[3.0, 3.0, 2.0, 2.0]])
    np.testing.assert_array_equal(L.ReLU().propagate_error(e), e)
    with pytest.raises(ValueError, match="even"):
        L.build([{"type": "dense", "units": 3}, {"type": "dense", "units": 2}], (4,), 2, L.MinMax())

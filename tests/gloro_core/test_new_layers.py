"""The layer types of issue 12 section 3: each against a plain NumPy reference, its gradient
by float64 finite differences, its provable bound against the explicit matrix (built by
applying the layer to basis vectors), its spec and its certification hooks."""
from fractions import Fraction

import numpy as np
import pytest

from gloro_core import layers as L
from gloro_core.model import GloroNet, load
from nn.gradcheck import check_backward
from nn.tensor import Tensor


def _explicit(layer, w):
    """The layer's operator A (no bias) as a float64 matrix (out, in), from basis vectors."""
    n = int(np.prod(layer.in_shape))
    basis = np.eye(n).reshape((n,) + layer.in_shape)
    return np.asarray(layer.apply(w, basis), dtype=np.float64).reshape(n, -1).T


def _gradcheck_layer(layer, x, rng):
    """Finite differences of the layer's autodiff forward in its input and parameters."""
    def fn(xt, *params):
        if params:
            layer.weight, layer.bias = params
        return layer.forward(xt)

    params = [rng.standard_normal(layer.w_shape), rng.standard_normal(layer.w_shape[0])] if layer.parametric else []
    check_backward(fn, [x] + params, rng=rng)


def _params(layer, rng, dtype=np.float64):
    layer.init_parameters(0, lambda shape, rng, dtype: rng.standard_normal(shape).astype(dtype), rng, dtype)
    layer.bias.data = rng.standard_normal(layer.bias.shape).astype(dtype)
    return layer


# ---------------------------------------------------------------- last-layer normalisation

NORM_SPECS = [{"type": "dense", "units": 6}, {"type": "dense", "units": 3, "normalize": True}]


def test_normalized_dense_against_numpy():
    rng = np.random.default_rng(0)
    layer = _params(L.build(NORM_SPECS, (5,), 3, L.ReLU())[1], rng)
    assert isinstance(layer, L.NormalizedDense) and layer.spec == NORM_SPECS[1]
    x = rng.standard_normal((4, 6))
    w, b = layer.weight.data, layer.bias.data
    ref = x @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T + b
    np.testing.assert_allclose(layer.forward(Tensor(x)).data, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(layer.effective_weight(), axis=1), 1.0, rtol=1e-14)
    # a zero row stays zero (no NaN)
    layer.weight.data[1] = 0.0
    assert np.all(layer.effective_weight()[1] == 0) and np.all(np.isfinite(layer.forward(Tensor(x)).data))


def test_normalized_dense_gradients_by_finite_differences():
    rng = np.random.default_rng(1)
    layer = _params(L.build(NORM_SPECS, (5,), 3, L.ReLU())[1], rng)
    _gradcheck_layer(layer, rng.standard_normal((4, 6)), rng)
    # and through the whole GloRo loss: the ⊥ head's K_ij uses the normalised rows
    net = GloroNet((5,), 3, NORM_SPECS, dtype=np.float64, eps=0.5, seed=2)
    x, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
    last = net.layers[-1]

    def loss(w):
        last.weight = w
        return net.loss(x, y, power_iters=0)

    check_backward(loss, [last.weight.data], rng=rng)


def test_normalized_dense_bound_and_certification_use_the_effective_weight():
    rng = np.random.default_rng(3)
    net = GloroNet((5,), 3, NORM_SPECS, dtype=np.float32, eps=0.1, seed=4)
    last = net.layers[-1]
    last.weight.data *= 7.0
    v = last.effective_weight()
    assert v.dtype == np.float32
    # the forward pass multiplies by exactly these float32 rows (x = basis vectors: exact)
    eye = np.eye(6, dtype=np.float32)
    np.testing.assert_array_equal(last.forward(Tensor(eye), bias=False).data.T, v)
    bound, _ = last.provable(v.astype(np.float64))
    exact = np.linalg.norm(_explicit(last, v.astype(np.float64)), 2)
    assert exact <= bound <= exact * (1 + 1e-6)
    k = net.certifier.pair_k(1.0)
    v64 = v.astype(np.float64)
    for i in range(3):
        for j in range(3):
            if i != j:
                assert np.linalg.norm(v64[i] - v64[j]) <= k[i, j] <= np.linalg.norm(v64[i] - v64[j]) * (1 + 1e-6)
    x = rng.random((16, 5)).astype(np.float32)
    y, err = net._forward_with_error(x)
    np.testing.assert_array_equal(y, net.logits(x))
    pred, radius = net.certify(x)
    assert np.all(radius >= 0)


def test_normalize_only_on_the_last_layer_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="layer 0: 'normalize' is for the last"):
        L.build([{"type": "dense", "units": 4, "normalize": True}, {"type": "dense", "units": 2}], (3,), 2, L.ReLU())
    with pytest.raises(ValueError, match="'normalize' must be true or false"):
        L.build([{"type": "dense", "units": 2, "normalize": 1}], (3,), 2, L.ReLU())
    net = GloroNet((5,), 3, NORM_SPECS, seed=5)
    net.save(tmp_path / "n.npz")
    back = load(tmp_path / "n.npz")
    assert back.specs == NORM_SPECS and isinstance(back.layers[-1], L.NormalizedDense)
    x = np.random.default_rng(6).random((4, 5)).astype(np.float32)
    np.testing.assert_array_equal(back.logits(x), net.logits(x))


def test_compact_architecture_syntax():
    from gloro_core.architectures import layer_specs

    assert layer_specs("d(5),n", 3) == [{"type": "dense", "units": 5}, {"type": "dense", "units": 3, "normalize": True}]
    with pytest.raises(ValueError, match="must come last"):
        layer_specs("n,d(5)", 3)


# ---------------------------------------------------------------- invertible downsampling

def _space_to_depth(x):
    """Plain NumPy reference, channel 4c + 2i + j = pixel (2a + i, 2b + j) of channel c."""
    n, c, h, w = x.shape
    out = np.empty((n, 4 * c, h // 2, w // 2), dtype=x.dtype)
    for ch in range(c):
        for i in range(2):
            for j in range(2):
                out[:, 4 * ch + 2 * i + j] = x[:, ch, i::2, j::2]
    return out


def test_invdown_against_numpy_and_its_gradient():
    rng = np.random.default_rng(7)
    layer = L.build([{"type": "invdown"}, {"type": "dense", "units": 2}], (3, 4, 6), 2, L.MinMax())[0]
    assert layer.out_shape == (12, 2, 3) and not layer.parametric and layer.spec == {"type": "invdown"}
    x = rng.standard_normal((2, 3, 4, 6))
    np.testing.assert_array_equal(layer.forward(Tensor(x)).data, _space_to_depth(x))
    np.testing.assert_array_equal(layer.adjoint(None, layer.apply(None, x)), x)   # orthogonal: A^T = A^-1
    _gradcheck_layer(layer, x, rng)


def test_invdown_bound_is_the_exact_norm_and_its_errors_are_permuted():
    layer = L.InvDown((2, 4, 2))
    a = _explicit(layer, None)
    np.testing.assert_array_equal(a @ a.T, np.eye(a.shape[0]))   # a permutation matrix
    bound, method = layer.provable()
    assert method == "exact" and abs(bound - np.linalg.norm(a, 2)) <= 1e-12 and bound >= np.linalg.norm(a, 2)
    h = np.random.default_rng(8).standard_normal((1, 2, 4, 2)).astype(np.float32)
    e = np.random.default_rng(9).random((1, 2, 4, 2))
    out, e_out, fine = layer.forward_error(h, e, np.float32)
    np.testing.assert_array_equal(out, _space_to_depth(h))
    np.testing.assert_array_equal(e_out, _space_to_depth(e))
    assert fine.all()


def test_invdown_odd_size_is_a_clear_error_and_nothing_is_stored(tmp_path):
    with pytest.raises(ValueError, match="layer 0: invdown needs an even height and width"):
        L.build([{"type": "invdown"}, {"type": "dense", "units": 2}], (1, 5, 4), 2, L.ReLU())
    with pytest.raises(ValueError, match="layer 1: invdown needs a \\(C, H, W\\) input"):
        L.build([{"type": "dense", "units": 4}, {"type": "invdown"}, {"type": "dense", "units": 2}], (4,), 2, L.ReLU())
    specs = [{"type": "conv", "filters": 2, "kernel": 3}, {"type": "invdown"}, {"type": "dense", "units": 3}]
    net = GloroNet((1, 4, 4), 3, specs, seed=1)
    assert len(net.params) == 2 and len(net.iterates) == 2 and len(net.parameters()) == 4
    assert not any(k.endswith(".1") or ".1." in k for k in net.state_arrays())
    lip = net.update_lipschitz()
    assert lip["layers"][1]["power"] == lip["layers"][1]["provable"] == 1.0
    net.save(tmp_path / "i.npz")
    back = load(tmp_path / "i.npz")
    x = np.random.default_rng(2).random((5, 1, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(back.logits(x), net.logits(x))
    np.testing.assert_array_equal(back.certify(x, eps=0.1)[1], net.certify(x, eps=0.1)[1])


def test_compact_architecture_syntax_invdown():
    from gloro_core.architectures import layer_specs

    assert layer_specs("c(4,3,1),i,d(8)", 2)[1] == {"type": "invdown"}
    assert layer_specs("i,d(8),n", 2)[0] == {"type": "invdown"}


# ---------------------------------------------------------------- average pooling

def _avgpool(x, s):
    n, c, h, w = x.shape
    out = np.zeros((n, c, h // s, w // s))
    for a in range(h // s):
        for b in range(w // s):
            out[:, :, a, b] = x[:, :, a * s:(a + 1) * s, b * s:(b + 1) * s].mean(axis=(2, 3))
    return out


@pytest.mark.parametrize("s", [2, 3])
def test_avgpool_against_numpy_gradient_and_exact_bound(s):
    rng = np.random.default_rng(10 + s)
    layer = L.build([{"type": "avgpool", "size": s}, {"type": "dense", "units": 2}], (2, 2 * s, 3 * s), 2,
                    L.ReLU())[0]
    assert layer.out_shape == (2, 2, 3) and layer.spec == {"type": "avgpool", "size": s}
    x = rng.standard_normal((3, 2, 2 * s, 3 * s))
    np.testing.assert_allclose(layer.forward(Tensor(x)).data, _avgpool(x, s), rtol=1e-14, atol=1e-15)
    u = rng.standard_normal((3,) + layer.out_shape)
    np.testing.assert_allclose((layer.apply(None, x) * u).sum(), (x * layer.adjoint(None, u)).sum(), rtol=1e-12)
    _gradcheck_layer(layer, x, rng)
    a = _explicit(layer, None)
    exact = np.linalg.norm(a, 2)
    bound, method = layer.provable()
    assert method == "exact" and exact <= bound and abs(bound - exact) <= 1e-12 and bound != 1.0
    assert np.linalg.norm(np.abs(a), 2) <= layer.abs_bound() + 1e-15


def test_avgpool_rounding_bound_covers_float32():
    from fractions import Fraction

    rng = np.random.default_rng(13)
    layer = L.AvgPool((1, 6, 6), 3)
    h = (rng.standard_normal((2, 1, 6, 6)) * 1e3).astype(np.float32)
    out, err, fine = layer.forward_error(h, np.zeros(h.shape), np.float32)
    assert fine.all()
    for idx in np.ndindex(out.shape):
        n, c, a, b = idx
        window = h[n, c, 3 * a:3 * a + 3, 3 * b:3 * b + 3].ravel()
        exact = sum(Fraction(float(v)) for v in window) / 9
        assert abs(Fraction(float(out[idx])) - exact) <= Fraction(float(err[idx]))
    with pytest.raises(ValueError, match="layer 0: avgpool of size 4 needs a height and width that are multiples"):
        L.build([{"type": "avgpool", "size": 4}, {"type": "dense", "units": 2}], (1, 6, 8), 2, L.ReLU())


def test_compact_architecture_syntax_avgpool():
    from gloro_core.architectures import layer_specs

    assert layer_specs("c(4,3,1),p(2),d(8)", 2)[1] == {"type": "avgpool", "size": 2}


# ---------------------------------------------------------------- linear residual block

def _conv_same(x, w):
    """Plain NumPy SAME conv (stride 1, odd kernel): out[o,i,j] = sum w[o,c,p,q] x[c,i+p-r,j+q-r]."""
    n, c, h, wd = x.shape
    k = w.shape[2]
    r = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)))
    out = np.zeros((n, w.shape[0], h, wd))
    for p in range(k):
        for q in range(k):
            out += np.einsum("oc,nchw->nohw", w[:, :, p, q], xp[:, :, p:p + h, q:q + wd])
    return out


@pytest.mark.parametrize("k", [1, 3])
def test_liresnet_against_numpy_gradient_and_bound(k):
    rng = np.random.default_rng(20 + k)
    layer = _params(L.build([{"type": "liresnet", "kernel": k}, {"type": "dense", "units": 2}], (2, 4, 3), 2,
                            L.ReLU())[0], rng)
    assert layer.out_shape == (2, 4, 3) and layer.w_shape == (2, 2, k, k) and layer.fan_in == 2 * k * k + 1
    x = rng.standard_normal((3, 2, 4, 3))
    w, b = layer.weight.data, layer.bias.data
    ref = x + _conv_same(x, w) + b[None, :, None, None]
    np.testing.assert_allclose(layer.forward(Tensor(x)).data, ref, rtol=1e-12, atol=1e-12)
    _gradcheck_layer(layer, x, rng)
    w = rng.standard_normal(layer.w_shape) * 0.3
    a = _explicit(layer, w)
    np.testing.assert_allclose(a, np.eye(a.shape[0]) + _explicit(L.Conv((2, 4, 3), 2, k), w), atol=1e-15)
    exact = np.linalg.norm(a, 2)
    for method in ("auto", "fft", "explicit"):
        bound, _ = layer.provable(w, method)
        assert exact <= bound, method
    assert layer.provable(w)[0] <= exact * (1 + 1e-6)      # small: the explicit matrix's norm
    assert np.linalg.norm(np.abs(a), 2) <= layer.abs_bound(w)
    # the power method converges to the same norm of I + A
    from gloro_core.lipschitz import converge
    _, sigma, _, ok = converge(layer, w, rng.standard_normal((1, 2, 4, 3)), tol=1e-10, max_iter=5000)
    assert ok and sigma == pytest.approx(exact, rel=1e-6)


def test_liresnet_bound_covers_the_rounding_of_w_plus_one():
    """w + 1 of a centre weight 2^-60 rounds to 1 in float64: the rounded-away 2^-60 is
    found exactly (TwoSum) and added to the bound."""
    layer = L.LiResNet((1, 1, 1), 1)
    w = np.array([[[[2.0 ** -60]]]])
    w2, err = layer._with_identity(w)
    assert w2[0, 0, 0, 0] == 1.0 and err == 2.0 ** -60
    assert layer.provable(w)[0] >= Fraction(1) + Fraction(2) ** -60
    with pytest.raises(ValueError, match="layer 0: liresnet needs an odd kernel"):
        L.build([{"type": "liresnet", "kernel": 2}, {"type": "dense", "units": 2}], (1, 4, 4), 2, L.ReLU())


def test_liresnet_training_sigma_is_the_residual_norm():
    net = GloroNet((2, 4, 4), 2, [{"type": "liresnet", "kernel": 3}, {"type": "dense", "units": 2}],
                   dtype=np.float64, seed=3)
    layer = net.layers[0]
    net.power_update(200)
    v = layer.iterate
    np.testing.assert_allclose(float(layer.sigma().data), np.linalg.norm(layer.apply(layer.weight.data, v)))
    lip = net.update_lipschitz()
    assert lip["layers"][0]["power"] <= lip["layers"][0]["provable"] * (1 + 1e-9)
    assert lip["layers"][0]["power"] == pytest.approx(float(layer.sigma().data), rel=1e-4)


def test_compact_architecture_syntax_liresnet():
    from gloro_core.architectures import layer_specs

    assert layer_specs("c(4,3,1),r(3),d(8)", 2)[1] == {"type": "liresnet", "kernel": 3}


# ---------------------------------------------------------------- every new layer, end to end

def test_end_to_end_every_new_layer_from_json(tmp_path, capsys):
    """A net with liresnet, invdown, avgpool and a normalised last dense, from a JSON
    architecture: one epoch on synthetic data, certify, and PGD flips no certified point."""
    import json

    from gloro_core.cli import main

    specs = [{"type": "conv", "filters": 4, "kernel": 3, "stride": 1, "padding": "same"},
             {"type": "liresnet", "kernel": 3}, {"type": "invdown"}, {"type": "avgpool", "size": 2},
             {"type": "dense", "units": 16}, {"type": "dense", "units": 10, "normalize": True}]
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(specs))
    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--limit", "1024",
                 "--arch", str(arch), "--eps", "0.02", "--epochs", "1", "--batch", "32", "--power-iters", "2",
                 "--lr", "0.01", "--no-progress", "--out", str(out), "--val", "128"]) == 0
    net = load(out / "last.npz")
    assert net.specs == specs and [layer.parametric for layer in net.layers] == [True, True, False, False, True, True]
    assert main(["certify", str(out), "--json", "--limit", "64"]) == 0
    cert = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= cert["vra"] <= cert["clean_acc"] <= 1
    assert main(["attack", str(out), "--json", "--limit", "64", "--steps", "10"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["certified"] > 0 and res["certified_flipped"] == 0

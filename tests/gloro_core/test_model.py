"""GloroNet: construction, bad input, ties, gradients of the full loss, rounding slack."""
import numpy as np
import pytest

from gloro_core import losses
from gloro_core.model import GloroNet
from nn.gradcheck import check_backward
from nn.tensor import Tensor

CONV = [{"type": "conv", "filters": 4, "kernel": 3, "stride": 2, "padding": "same"},
        {"type": "conv", "filters": 4, "kernel": 3, "stride": 1, "padding": "valid"},
        {"type": "dense", "units": 6}, {"type": "dense", "units": 3}]


def _net(**kw):
    kw.setdefault("eps", 0.1)
    return GloroNet((1, 7, 8), 3, CONV, **kw)


def _x(rng, n=5, shape=(1, 7, 8)):
    return rng.random((n,) + shape).astype(np.float32)


# ------------------------------------------------------------------ construction

@pytest.mark.parametrize("layers,msg", [
    (CONV[:-1] + [{"type": "dense", "units": 4}], "num_classes"),
    (CONV[:2], "last layer must be dense"),
    ([{"type": "dense", "units": 4}, CONV[0], {"type": "dense", "units": 3}], "cannot follow"),
    ([{"type": "pool"}, {"type": "dense", "units": 3}], "unknown layer type"),
    ([{"type": "dense", "units": 3, "bias": False}], "unknown dense keys"),
    ([], "non-empty"),
])
def test_bad_specs(layers, msg):
    with pytest.raises(ValueError, match=msg):
        GloroNet((1, 7, 8), 3, layers)


def test_minmax_odd_width_and_bad_options():
    with pytest.raises(ValueError, match="even"):
        GloroNet((1, 6, 6), 3, [{"type": "conv", "filters": 3, "kernel": 3}, {"type": "dense", "units": 3}],
                 activation="minmax")
    with pytest.raises(ValueError, match="even"):
        GloroNet((4,), 3, [{"type": "dense", "units": 5}, {"type": "dense", "units": 3}], activation="minmax")
    GloroNet((4,), 3, [{"type": "dense", "units": 6}, {"type": "dense", "units": 3}], activation="minmax")
    for kw in [{"activation": "tanh"}, {"init": "he"}, {"variant": "fancy"}]:
        with pytest.raises(ValueError):
            _net(**kw)
    for eps in [-0.1, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="eps"):
            _net(eps=eps)


@pytest.mark.parametrize("init", ["orthogonal", "glorot"])
def test_init_reaches_every_layer(init):
    """The layers take their weights from nn.init: orthonormal rows or columns of the
    (out, in*kh*kw) matrix, or Glorot's U(-l, l); biases start at zero."""
    net = _net(init=init)
    for w, b in net.params:
        m = w.data.reshape(w.shape[0], -1).astype(np.float64)
        if init == "orthogonal":
            gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
            np.testing.assert_allclose(gram, np.eye(min(m.shape)), atol=1e-5)
        else:
            taps = int(np.prod(w.shape[2:]))   # 1 for a dense weight
            limit = np.sqrt(6.0 / ((w.shape[0] + w.shape[1]) * taps))
            assert np.abs(m).max() <= limit and np.abs(m).max() > 0.5 * limit
        np.testing.assert_array_equal(b.data, 0.0)


def test_bad_inputs():
    rng = np.random.default_rng(0)
    net = _net()
    x, y = _x(rng), np.array([0, 1, 2, 0, 1])
    for eps in [-1e-3, float("nan")]:
        with pytest.raises(ValueError, match="eps"):
            net.certify(x, eps=eps)
        with pytest.raises(ValueError, match="eps"):
            net.gloro_logits(x, eps=eps)
        with pytest.raises(ValueError, match="eps"):
            net.loss(x, y, eps=eps)
    bad = x.copy()
    bad[2, 0, 3, 3] = np.nan
    for fn in (net.logits, net.certify, net.gloro_logits, lambda a: net.loss(a, y)):
        with pytest.raises(ValueError, match="NaN"):
            fn(bad)
        with pytest.raises(ValueError, match="shape"):
            fn(x[:, :, :, :7])
        with pytest.raises(ValueError, match="shape"):
            fn(x[0])
    with pytest.raises(ValueError, match="labels"):
        net.loss(x, np.array([0, 1, 3, 0, 1]))
    with pytest.raises(ValueError, match="labels"):
        net.loss(x, y[:4])
    with pytest.raises(ValueError, match="loss"):
        net.loss(x, y, loss="hinge")


# ------------------------------------------------------------------ ties

def _tied_net(identical_rows):
    """A dense net whose last layer makes logits 0 and 1 tie exactly."""
    net = GloroNet((4,), 3, [{"type": "dense", "units": 6}, {"type": "dense", "units": 3}], eps=0.1, seed=3)
    w = net.params[1][0].data
    if identical_rows:
        w[1] = w[0]                    # y_0 == y_1 for every input, ||w_0 - w_1|| = 0
        net.params[1][1].data[:] = [2.0, 2.0, -5.0]
    else:
        net.params[1][1].data[:] = [1.0, 1.0, 0.0]   # at x = 0 all hidden units are 0
    return net


@pytest.mark.parametrize("identical_rows", [True, False])
@pytest.mark.parametrize("variant", ["margin", "basic"])
def test_ties_never_certify(identical_rows, variant):
    net = _tied_net(identical_rows)
    net.variant = variant
    x = np.zeros((4, 4), np.float32) if not identical_rows else np.random.default_rng(1).random((4, 4)).astype(np.float32)
    y = net.logits(x)
    assert np.all(y[:, 0] == y[:, 1]) and np.all(y[:, 0] > y[:, 2])
    for eps in [0.0, 0.1]:
        for bound in ["provable", "power"]:
            gl = net.gloro_logits(x, eps=eps, bound=bound)
            assert np.all(gl.argmax(axis=1) == 3), gl
            pred, radius = net.certify(x, eps=eps, bound=bound)
            assert np.all(pred == -1) and np.all(radius == 0)
        # the training path: y_⊥ is finite and at least y_j (never -inf), gradients finite
        glt = net.gloro_logits_tensor(x, eps=eps).data
        assert np.all(np.isfinite(glt)) and np.all(glt[:, 3] >= glt[:, 0])
        val, grads = net.gradients(x, np.zeros(4, np.int64), eps=eps)
        assert np.isfinite(val) and val >= np.log(2) - 1e-6
        assert all(np.all(np.isfinite(g)) for g in grads.values())


def test_by_value_masking_would_have_certified():
    """Guard the test itself: with j masked by value both tied logits vanish."""
    y = Tensor(np.array([[1.0, 1.0, 0.0]]))
    w = Tensor(np.eye(3))
    yb = losses.bot_logit(y, w, 1.0, 0.0).data
    assert yb[0] == 1.0                  # by index: the other tied logit remains
    by_value = np.where(y.data == y.data.max(), -np.inf, y.data).max()
    assert by_value == 0.0               # the reference-code pitfall


# ------------------------------------------------------------------ gradients

def _with_params(net, flat):
    net.params = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]


@pytest.mark.parametrize("loss,form", [("ce", "kl"), ("trades", "kl"), ("trades", "ce")])
@pytest.mark.parametrize("variant", ["margin", "basic"])
@pytest.mark.parametrize("activation", ["relu", "minmax"])
def test_full_loss_gradient_finite_differences(loss, form, variant, activation):
    rng = np.random.default_rng([len(loss), len(form), len(variant), len(activation)])
    layers = [{"type": "conv", "filters": 4, "kernel": 3, "stride": 2, "padding": "same"},
              {"type": "dense", "units": 6}, {"type": "dense", "units": 4}]
    net = GloroNet((2, 5, 6), 4, layers, activation=activation, variant=variant, eps=0.3,
                   seed=int(rng.integers(1 << 30)), dtype=np.float64)
    for _, b in net.params:
        b.data[:] = rng.normal(0, 0.1, b.shape)
    net.power_update(3)                  # iterates are then held fixed (power_iters=0)
    x = rng.random((6, 2, 5, 6))
    y = rng.integers(0, 4, 6)
    orig = [p for pair in net.params for p in pair]

    def fn(*ps):
        _with_params(net, ps)
        try:
            return net.loss(x, y, loss=loss, power_iters=0, lam=0.7, trades_form=form)
        finally:
            _with_params(net, orig)

    for k in range(3):
        check_backward(fn, [p.data for p in orig], eps=1e-6, rtol=1e-5, atol=1e-9, rng=k)
    # the same through gradients(): matches the Parameters' autodiff gradient
    val, grads = net.gradients(x, y, loss=loss, lam=0.7, trades_form=form)
    assert np.isfinite(val) and set(grads) == {n for n, _ in net.named_parameters()}


def test_gradient_with_respect_to_input_and_k_sub():
    """d loss / d x and the K_sub path: sigma gradient with v fixed equals the FD of ||A v||."""
    rng = np.random.default_rng(7)
    net = _net(dtype=np.float64)
    net.power_update(4)
    v = net.iterates[0].copy()
    op = net.ops[0]

    def sigma(w):
        from nn import functions as F
        return F.l2_norm(F.conv2d(Tensor(v), w, None, op.stride, op.padding))

    check_backward(sigma, [net.params[0][0].data], rng=1)
    x = rng.random((4, 1, 7, 8))
    y = rng.integers(0, 3, 4)

    check_backward(lambda xt: _loss_x(net, xt, y), [x], rng=2)


def _loss_x(net, xt, y):
    f = net.forward(xt)
    gl = losses.gloro_logits(f, net.params[-1][0], net.k_sub_tensor(), net.eps, net.variant)
    return losses.gloro_ce(gl, y)


def test_power_iters_update_iterates_and_training_k_below_frozen():
    rng = np.random.default_rng(3)
    net = _net()
    x, y = _x(rng), rng.integers(0, 3, 5)
    before = [v.copy() for v in net.iterates]
    net.gradients(x, y, power_iters=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, net.iterates))
    net.loss(x, y, power_iters=2)
    assert not np.array_equal(before[0], net.iterates[0])
    k_train = float(net.k_sub_tensor().item())
    lip = net.update_lipschitz()
    assert k_train <= lip["k_sub_power"] * (1 + 1e-5) <= lip["k_sub_provable"] * (1 + 1e-5)
    assert lip["bound"] == "provable" and lip["k_sub"] == lip["k_sub_provable"]
    assert len(lip["layers"]) == 4 and all(0 < d["ratio"] <= 1 + 1e-6 for d in lip["layers"])


def test_frozen_k_follows_weight_changes():
    rng = np.random.default_rng(4)
    net = _net()
    x = _x(rng)
    k0 = net.lipschitz()["k_sub"]
    net.params[0][0].data *= np.float32(2.0)      # the way an optimizer changes weights: in place
    k1 = net.lipschitz()["k_sub"]
    np.testing.assert_allclose(k1, 2 * k0, rtol=1e-6)
    net.params[0][1].data += 1.0                   # biases do not enter K
    assert net.lipschitz()["version"] == net.weights_version()
    pred, radius = net.certify(x)
    assert pred.shape == (5,) and radius.shape == (5,) and np.all(radius >= 0)


# ------------------------------------------------------------------ certification arithmetic

@pytest.mark.parametrize("activation", ["relu", "minmax"])
def test_rounding_error_bound_covers_float64_forward(activation):
    rng = np.random.default_rng(5)
    net = _net(activation=activation)
    for _, b in net.params:
        b.data[:] = rng.normal(0, 0.3, b.shape).astype(np.float32)
    x = rng.random((16, 1, 7, 8))                  # float64 input: its float32 cast is covered too
    y32, err = net._forward_with_error(x)
    n64 = _net(activation=activation, dtype=np.float64)
    for (w, b), (w32, b32) in zip(n64.params, net.params):
        w.data = w32.data.astype(np.float64)
        b.data = b32.data.astype(np.float64)
    y64 = n64.logits(x)
    gap = np.abs(y32.astype(np.float64) - y64)
    assert np.all(gap <= err) and np.all(err < 1e-3)  # worst-case gamma_n bound: ~n u
    assert gap.max() > 0                           # the check is not vacuous


def test_certify_matches_gloro_logits_and_radius():
    rng = np.random.default_rng(6)
    net = _net(eps=0.05)
    x = _x(rng, 40)
    for variant in ["margin", "basic"]:
        net.variant = variant
        for bound in ["provable", "power"]:
            pred, radius = net.certify(x, bound=bound)
            gl = net.gloro_logits(x, bound=bound)
            am = gl.argmax(axis=1)
            assert np.array_equal(np.where(am == 3, -1, am), pred)
            clean = net.logits(x).argmax(axis=1)
            assert np.all((pred == -1) | (pred == clean))
            assert np.array_equal(pred != -1, radius > net.eps)
            # radius from the definition, without slack: slightly larger
            y = net.logits(x).astype(np.float64)
            w = net.params[-1][0].data.astype(np.float64)
            k = net.lipschitz(bound)["k_sub"]
            for n in range(len(x)):
                j = clean[n]
                others = [i for i in range(3) if i != j]
                if variant == "margin":
                    kij = [k * np.linalg.norm(w[j] - w[i]) for i in others]
                else:
                    kij = [k * (np.linalg.norm(w[j]) + np.linalg.norm(w[i])) for i in others]
                r = min((y[n, j] - y[n, i]) / kk for i, kk in zip(others, kij))
                assert radius[n] <= r and radius[n] >= r - 1e-4


def test_power_bound_is_labelled_and_not_larger():
    net = _net()
    lp, lw = net.lipschitz("provable"), net.lipschitz("power")
    assert lp["bound"] == "provable" and lw["bound"] == "power"
    x = np.random.default_rng(9).random((3, 1, 7, 8)).astype(np.float32)
    net.certify(x)
    assert net.last_certification["bound"] == "provable" and net.last_certification["proof"]
    net.certify(x, bound="power")
    assert net.last_certification["bound"] == "power" and not net.last_certification["proof"]
    with pytest.raises(ValueError, match="bound"):
        net.certify(x, bound="guess")
    assert lw["k_sub"] <= lp["k_sub"]
    for d in lp["layers"]:
        assert d["power"] <= d["provable"] and d["method"] in ("svd", "explicit", "fft")


def test_margin_below_rounding_slack_is_not_certified():
    """A float32 margin that is positive but smaller than the forward pass's rounding
    error bound is not a proof (eps = 0, so only the slack stands in the way)."""
    rng = np.random.default_rng(8)
    net = _net()
    x = _x(rng, 1)
    y, err = net._forward_with_error(x)
    j = int(y[0].argmax())
    i = (j + 1) % 3
    b = net.params[-1][1].data
    k = 3 - i - j
    b[k] -= np.float32(10.0)                              # the third class far below
    for delta, expect in [(3e-6, -1), (3e-2, j)]:
        y1, _ = net._forward_with_error(x)
        b[i] += np.float32(y1[0, j] - y1[0, i] - delta)   # y_j - y_i becomes about delta
        y2, err2 = net._forward_with_error(x)
        margin = float(y2[0, j]) - float(y2[0, i])
        assert int(y2[0].argmax()) == j and 0 < margin
        assert (margin < err2[0, i] + err2[0, j]) == (expect == -1)
        pred, radius = net.certify(x, eps=0.0)
        assert pred[0] == expect
        assert net.gloro_logits(x, eps=0.0)[0].argmax() == (3 if expect == -1 else j)


def test_provable_method_choice():
    net = _net()
    auto = net.update_lipschitz(provable_method="auto")
    fft = net.update_lipschitz(provable_method="fft")
    assert [d["method"] for d in fft["layers"]] == ["fft", "fft", "svd", "svd"]
    assert fft["k_sub_provable"] >= auto["k_sub_provable"] >= auto["k_sub_power"]
    assert net.lipschitz()["layers"][0]["method"] == "fft"      # sticks for refreshes
    with pytest.raises(ValueError):
        net.update_lipschitz(provable_method="svd")

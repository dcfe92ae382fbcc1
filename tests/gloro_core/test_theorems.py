"""Theorems 1 and 2 on a small trained GloRo net (synthetic separable data, 1x8x8)."""
import numpy as np
import pytest

from gloro_core import attacks, metrics
from gloro_core.model import GloroNet
from nn.optim import Adam

EPS = 0.3
LAYERS = [{"type": "conv", "filters": 8, "kernel": 3, "stride": 2, "padding": "same"},
          {"type": "dense", "units": 32}, {"type": "dense", "units": 3}]


def _data(rng, protos, n, noise=0.08):
    y = rng.integers(0, len(protos), n)
    x = np.clip(protos[y] + rng.normal(0, noise, (n,) + protos.shape[1:]), 0, 1)
    return x.astype(np.float32), y


@pytest.fixture(scope="module", params=["relu", "minmax"])
def trained(request):
    rng = np.random.default_rng(0)
    protos = rng.random((3, 1, 8, 8))
    net = GloroNet((1, 8, 8), 3, LAYERS, activation=request.param, eps=EPS, seed=1)
    opt = Adam(net.parameters(), lr=3e-3)
    for _ in range(250):
        x, y = _data(rng, protos, 64)
        loss = net.loss(x, y, eps=1.5 * EPS, power_iters=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.update_lipschitz()
    xt, yt = _data(np.random.default_rng(1), protos, 200)
    return net, xt, yt, protos


def test_trained_model_certifies_most_points(trained):
    net, xt, yt, _ = trained
    res = {b: metrics.evaluate(net, xt, yt, bound=b) for b in ("provable", "power")}
    assert res["provable"]["clean_acc"] > 0.95
    assert res["provable"]["vra"] > 0.8                 # the tests below are not vacuous
    assert res["provable"]["vra"] <= res["power"]["vra"]
    lip = net.lipschitz()
    for d in lip["layers"]:
        assert d["power"] <= d["provable"] and d["ratio"] > 0.95 and d["converged"]


def test_theorem1_pgd_and_sampling_never_flip_certified_points(trained):
    net, xt, _, _ = trained
    pred, radius = net.certify(xt)
    cert = pred >= 0
    xs, ps = xt[cert][:60], pred[cert][:60]
    assert len(xs) >= 30
    adv = attacks.pgd_l2(net, xs, ps, EPS, steps=30, restarts=2, rng=np.random.default_rng(2), clip=None)
    dist = np.sqrt(((adv.astype(np.float64) - xs) ** 2).reshape(len(xs), -1).sum(1))
    assert np.all(dist <= EPS)
    assert np.array_equal(net.logits(adv).argmax(1), ps)
    # dense random sampling: on the sphere of radius eps and inside the ball
    rng = np.random.default_rng(3)
    for k in range(len(xs)):
        g = rng.standard_normal((400,) + xs.shape[1:])
        g /= np.sqrt((g.reshape(400, -1) ** 2).sum(1)).reshape(-1, 1, 1, 1)
        r = EPS * np.concatenate([np.full(200, 1 - 1e-6), rng.random(200) ** (1 / 64)])
        pts = (xs[k][None].astype(np.float64) + g * r.reshape(-1, 1, 1, 1)).astype(np.float32)
        assert np.all(net.logits(pts).argmax(1) == ps[k])


def test_theorem1_at_each_points_certified_radius(trained):
    """Stronger: no flip anywhere within the certified radius itself (not just eps)."""
    net, xt, _, _ = trained
    pred, radius = net.certify(xt)
    cert = pred >= 0
    xs, ps, rs = xt[cert][:60], pred[cert][:60], radius[cert][:60]
    adv = attacks.pgd_l2(net, xs, ps, rs, steps=40, restarts=2, rng=np.random.default_rng(6), clip=None)
    dist = np.sqrt(((adv.astype(np.float64) - xs) ** 2).reshape(len(xs), -1).sum(1))
    assert np.all(dist <= rs)
    assert np.array_equal(net.logits(adv).argmax(1), ps)
    # the attack does get somewhere: the margin shrinks
    m0 = np.sort(net.logits(xs), 1)
    m1 = np.sort(net.logits(adv), 1)
    assert np.mean((m1[:, -1] - m1[:, -2]) < (m0[:, -1] - m0[:, -2])) > 0.9


def test_attack_is_strong_enough_to_flip_unprotected_points(trained):
    """The same PGD flips points at a radius beyond the certified one (the check above can fail)."""
    net, xt, yt, protos = trained
    pred, radius = net.certify(xt)
    pick = np.argsort(radius)[:40]
    big = float(np.median(radius[pick])) * 4 + 0.5
    adv = attacks.pgd_l2(net, xt[pick], net.predict(xt[pick]), big, steps=40, restarts=1,
                         rng=np.random.default_rng(4), clip=None)
    assert (net.logits(adv).argmax(1) != net.predict(xt[pick])).mean() > 0.5


def test_theorem2_pairs_within_eps_agree_at_half_eps(trained):
    net, xt, yt, protos = trained
    rng = np.random.default_rng(5)
    # pairs (a, b), ||a - b|| <= eps, along segments between points of different classes
    a_list, b_list = [], []
    for _ in range(60):
        i, j = rng.choice(len(xt), 2, replace=False)
        if yt[i] == yt[j]:
            continue
        d = xt[j].astype(np.float64) - xt[i]
        length = np.sqrt((d ** 2).sum())
        unit = d / length
        for t in np.linspace(0, length - EPS, 25):
            a = xt[i] + t * unit
            b = a + EPS * (1 - 1e-6) * unit
            a_list.append(a)
            b_list.append(b)
    a = np.array(a_list, np.float32)
    b = np.array(b_list, np.float32)
    assert np.all(np.sqrt(((b.astype(np.float64) - a) ** 2).reshape(len(a), -1).sum(1)) <= EPS)
    pa, _ = net.certify(a, eps=EPS / 2)
    pb, _ = net.certify(b, eps=EPS / 2)
    both = (pa >= 0) & (pb >= 0)
    assert both.sum() > 100
    assert np.array_equal(pa[both], pb[both])
    # non-vacuous: many pairs straddle the decision boundary of f itself
    assert (net.predict(a) != net.predict(b)).sum() > 10

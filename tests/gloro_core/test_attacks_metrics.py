"""PGD stays in the ball and the box and finds adversarial points; metrics by hand."""
import numpy as np
import pytest

from gloro_core import attacks, metrics
from gloro_core.model import GloroNet


def _net():
    return GloroNet((1, 6, 6), 3, [{"type": "conv", "filters": 4, "kernel": 3, "stride": 1},
                                   {"type": "dense", "units": 3}], eps=0.1, seed=2)


def test_pgd_respects_ball_and_box_and_increases_loss():
    rng = np.random.default_rng(0)
    net = _net()
    x = rng.random((8, 1, 6, 6)).astype(np.float32)
    y = net.predict(x)
    for eps in [0.05, 0.5, np.linspace(0.1, 2.0, 8)]:
        adv = attacks.pgd_l2(net, x, y, eps, steps=10, restarts=2, rng=rng)
        d = np.sqrt(((adv.astype(np.float64) - x) ** 2).reshape(8, -1).sum(1))
        assert np.all(d <= eps) and adv.min() >= 0 and adv.max() <= 1 and adv.dtype == np.float32
    lo = net.standard_loss(x, y).item()
    adv = attacks.pgd_l2(net, x, y, 0.5, steps=10, rng=rng)
    assert net.standard_loss(adv, y).item() > lo
    # a large radius flips the (untrained) prediction of most points
    adv = attacks.pgd_l2(net, x, y, 20.0, steps=30, rng=rng, clip=None)
    assert (net.predict(adv) != y).mean() >= 0.75
    assert np.array_equal(attacks.pgd_l2(net, x, y, 0.0, steps=3, rng=rng), x)


def test_pgd_bad_input():
    net = _net()
    x = np.zeros((2, 1, 6, 6), np.float32)
    for eps in [-1.0, float("nan")]:
        with pytest.raises(ValueError):
            attacks.pgd_l2(net, x, np.array([0, 1]), eps)
    with pytest.raises(ValueError):
        attacks.pgd_l2(net, x, np.array([0, 1]), np.ones(3))
    with pytest.raises(ValueError):
        attacks.pgd_l2(net, x[:, :, :5], np.array([0, 1]), 0.1)


def test_metrics_by_hand():
    y = np.array([0, 1, 2, 1, 0])
    clean = np.array([0, 1, 1, 1, 2])
    cert = np.array([0, -1, -1, 1, 2])
    assert metrics.clean_accuracy(clean, y) == 0.6
    assert metrics.vra(cert, y) == 0.4
    assert metrics.rejection_rate(cert) == 0.4
    r = np.array([0.5, 0.0, 0.0, 0.2, 0.3])
    st = metrics.radius_stats(r, clean == y)
    assert st["n"] == 3 and st["median"] == 0.2 and st["max"] == 0.5
    assert metrics.vra_at(r, clean == y, [0.0, 0.25, 1.0]) == [0.4, 0.2, 0.0]
    with pytest.raises(ValueError):
        metrics.vra(cert, y[:4])


def test_evaluate_consistent_with_certify():
    rng = np.random.default_rng(1)
    net = _net()
    x = rng.random((30, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    res = metrics.evaluate(net, x, y, eps=0.01, batch=7)
    pred, _ = net.certify(x, eps=0.01)
    assert res["vra"] == ((pred == y) & (pred >= 0)).mean()
    assert res["rejection"] == (pred == -1).mean() and res["bound"] == "provable"

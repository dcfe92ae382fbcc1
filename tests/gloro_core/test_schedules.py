"""Each schedule's values at chosen epochs."""
import math

import pytest

from gloro_core import schedules as S


def test_eps_single():
    s = S.eps_schedule("single", 0.45, 100)
    assert s(0) == 0.45 and s(37.5) == 0.45 and s(100) == 0.45


def test_eps_linear():
    s = S.eps_schedule("0.1,0.5,10", 0.45, 100)
    assert s(0) == pytest.approx(0.1)
    assert s(5) == pytest.approx(0.3)
    assert s(2.5) == pytest.approx(0.2)  # per-step interpolation
    assert s(10) == pytest.approx(0.5)
    assert s(10.01) == 0.45 and s(80) == 0.45  # then eps_train


def test_eps_log():
    s = S.eps_schedule("log", 1.0, 20)
    assert s(0) == 0.0
    assert s(10) == pytest.approx(1.0) and s(15) == 1.0
    vals = [s(t) for t in (0.5, 1, 2, 4, 8)]
    assert all(a < b for a, b in zip(vals, vals[1:]))  # increasing
    assert s(5) > 0.5  # concave: more than linear at the midpoint
    assert s(5) == pytest.approx(math.log(5.5) / math.log(10))


def test_lam():
    assert S.lam_schedule("2.5")(7) == 2.5
    assert S.lam_schedule(3)(0) == 3.0
    s = S.lam_schedule("0,4,8")
    assert s(0) == 0 and s(2) == pytest.approx(1.0) and s(8) == 4 and s(50) == 4


def test_lr_decay_to_lb():
    s = S.lr_schedule("decay_to_lb", 1e-3, 100, lb=1e-6)
    assert s(0) == 1e-3 and s(50) == 1e-3
    assert s(75) == pytest.approx(math.sqrt(1e-3 * 1e-6))  # geometric midpoint
    assert s(100) == pytest.approx(1e-6)
    assert s(120) == pytest.approx(1e-6)
    assert S.lr_schedule("fixed", 2e-3, 10)(9) == 2e-3


def test_plan_warmup():
    p = S.Plan(epochs=10, warmup=2, eps_train=0.3, eps_spec="0,0.3,4", lam_spec="1,3,4",
               lr=1e-3, lr_spec="decay_to_lb", lr_lb=1e-5)
    a = p.at(1)
    assert a["warmup"] and a["eps"] == 0.0
    b = p.at(4)
    assert not b["warmup"] and b["eps"] == pytest.approx(0.15) and b["lam"] == pytest.approx(2)
    assert p.at(10)["lr"] == pytest.approx(1e-5) and p.at(5)["lr"] == 1e-3


@pytest.mark.parametrize("bad", ["1,2", "a,b,c", "0,1,0"])
def test_bad_specs(bad):
    with pytest.raises(ValueError):
        S.eps_schedule(bad, 0.3, 10)
    with pytest.raises(ValueError):
        S.lam_schedule(bad)


def test_bad_values():
    with pytest.raises(ValueError):
        S.lr_schedule("cosine_restarts", 1e-3, 10)
    with pytest.raises(ValueError):
        S.lr_schedule("decay_to_lb", 1e-3, 10, lb=1e-2)
    with pytest.raises(ValueError):
        S.Plan(epochs=3, warmup=5, eps_train=0.1)
    with pytest.raises(ValueError):
        S.eps_schedule("single", 0.3, 10)(-1)


def test_lr_cosine():
    s = S.lr_schedule("cosine", 1e-3, 100, lb=1e-5)
    assert s(0) == pytest.approx(1e-3) and s(100) == pytest.approx(1e-5)
    assert s(50) == pytest.approx((1e-3 + 1e-5) / 2)
    assert s(25) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)
    assert s(150) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="--lr-lb"):
        S.lr_schedule("cosine", 1e-3, 10, lb=2e-3)


def test_lr_step_with_percentages_and_epochs():
    s = S.lr_schedule("step", 1e-3, 20, steps="50%,75%", gamma=0.1)
    assert s(9.99) == 1e-3 and s(10) == pytest.approx(1e-4) and s(15) == pytest.approx(1e-5)
    assert S.lr_schedule("step", 1e-3, 20, steps="5", gamma=0.5)(5) == pytest.approx(5e-4)
    for bad in ("75%,50%", "0", "30", "x"):
        with pytest.raises(ValueError, match="--lr-steps"):
            S.lr_schedule("step", 1e-3, 20, steps=bad)
    with pytest.raises(ValueError, match="--lr-gamma"):
        S.lr_schedule("step", 1e-3, 20, gamma=0)


def test_lr_lag_and_warmup():
    base = S.lr_schedule("decay_to_lb", 1e-3, 20, lb=1e-5)
    lag = S.lr_schedule("decay_to_lb", 1e-3, 20, lb=1e-5, lag=1)
    # the authors' Keras callback: the decay starts one epoch late and ends short of lb
    assert lag(10.5) == 1e-3 and base(10.5) < 1e-3
    assert lag(20) == pytest.approx(base(19)) and lag(20) > 1.5e-5
    assert lag(0.5) == base(0) == 1e-3
    warm = S.lr_schedule("cosine", 1e-3, 20, lb=0.0, warmup=2)
    assert warm(0) == 0.0 and warm(1) == pytest.approx(0.5 * S.lr_schedule("cosine", 1e-3, 20, lb=0.0)(1))
    assert warm(3) == S.lr_schedule("cosine", 1e-3, 20, lb=0.0)(3)
    with pytest.raises(ValueError, match="--lr-lag"):
        S.lr_schedule("fixed", 1e-3, 20, lag=30)


def test_percent_epochs_in_linear_schedules():
    s = S.eps_schedule("0,0.3,50%", 0.3, 40)
    assert s(10) == pytest.approx(0.15) and s(20) == pytest.approx(0.3)
    p = S.Plan(epochs=10, warmup=2, eps_train=0.3, eps_spec="0,0.3,50%", lam_spec="1,3,50%")
    assert p.at(4)["eps"] == pytest.approx(0.15) and p.at(4)["lam"] == pytest.approx(2)

"""The training options of issue 13 reach the loop: EMMA, weight decay, clipping, lr lag,
converging the iterates at the start."""
import numpy as np
import pytest

from gloro_core import train as train_mod
from gloro_core.model import GloroNet
from gloro_core.train import TrainConfig, load_checkpoint, train

TINY = dict(dataset="synthetic", arch="c(4,3,2),d(16)", synthetic_shape=(1, 10, 10),
            synthetic_n=(96, 48), batch=32, power_iters=2, eps=0.1, train_eps=0.15,
            lipschitz_max_iter=300, progress=False, eval_batch=64, val=16)


def _quiet(*a, **k):
    pass


def _weights(path):
    net, _ = load_checkpoint(str(path))
    return [np.array(p.data) for p in net.parameters()]


def test_emma_trains(tmp_path):
    hist = train(TrainConfig(out=str(tmp_path), epochs=2, loss="emma", lr=3e-3, **TINY),
                 log=_quiet)
    assert all(np.isfinite(m["loss"]) for m in hist) and hist[1]["loss"] < hist[0]["loss"]


def test_weight_decay_shrinks_the_weights(tmp_path):
    train(TrainConfig(out=str(tmp_path / "a"), epochs=1, **TINY), log=_quiet)
    train(TrainConfig(out=str(tmp_path / "b"), epochs=1, weight_decay=50.0, **TINY), log=_quiet)
    a, b = _weights(tmp_path / "a" / "last.npz"), _weights(tmp_path / "b" / "last.npz")
    assert sum(float((w ** 2).sum()) for w in b) < 0.9 * sum(float((w ** 2).sum()) for w in a)


def test_grad_clip_is_applied_each_step(tmp_path, monkeypatch):
    seen = []
    real = train_mod.clip_grad_norm
    monkeypatch.setattr(train_mod, "clip_grad_norm",
                        lambda ps, c: seen.append(c) or real(ps, c))
    train(TrainConfig(out=str(tmp_path), epochs=1, grad_clip=0.5, **TINY), log=_quiet)
    assert seen == [0.5] * 3                   # 80 training points / batch 32


def test_lr_lag_delays_the_decay(tmp_path):
    kw = dict(epochs=2, lr_schedule="decay_to_lb", lr_lb=1e-5, **TINY)
    a = train(TrainConfig(out=str(tmp_path / "a"), **kw), log=_quiet)
    b = train(TrainConfig(out=str(tmp_path / "b"), lr_lag=1, **kw), log=_quiet)
    assert a[1]["lr"] < 1e-4 and b[1]["lr"] > 5e-4   # the last step's lr


def test_converge_start(tmp_path, monkeypatch):
    calls = []
    real = GloroNet.update_lipschitz

    def spy(self, tol=1e-5, max_iter=2000, provable=True, provable_method=None):
        calls.append((tol, provable))
        return real(self, tol, max_iter, provable, provable_method)
    monkeypatch.setattr(GloroNet, "update_lipschitz", spy)
    train(TrainConfig(out=str(tmp_path / "a"), epochs=1, converge_start=True, **TINY), log=_quiet)
    assert calls[0] == (1e-2, False) and calls[1] == (1e-5, True)
    calls.clear()
    train(TrainConfig(out=str(tmp_path / "b"), epochs=1, **TINY), log=_quiet)
    assert calls[0] == (1e-5, True)


@pytest.mark.parametrize("field,value,flag", [("weight_decay", -1.0, "--weight-decay"),
                                              ("lr_lag", float("nan"), "--lr-lag"),
                                              ("grad_clip", 0.0, "--grad-clip"),
                                              ("val", -5, "--val"), ("loss", "hinge", "loss")])
def test_bad_options(tmp_path, field, value, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(out=str(tmp_path), **{**TINY, field: value})

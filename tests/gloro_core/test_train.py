"""Training loop: resume equivalence, NaN stop, metrics files, warm-up/TRADES; architectures."""
import csv
import dataclasses
import json
import re

import numpy as np
import pytest

from gloro_core import architectures as A
from gloro_core import data
from gloro_core.train import TrainConfig, TrainingDiverged, load_checkpoint, train

TINY = dict(dataset="synthetic", arch="c(4,3,2),d(16)", synthetic_shape=(1, 10, 10),
            synthetic_n=(96, 48), batch=32, power_iters=2, eps=0.1, train_eps=0.15,
            lipschitz_max_iter=300, progress=False, eval_batch=64, val=16)


def _quiet(*a, **k):
    pass


def _params(path):
    net, extra = load_checkpoint(path)
    return [np.array(p.data) for p in net.parameters()], extra


# ---------------------------------------------------------------- architectures

def test_arch_2c2f_exact():
    specs = A.layer_specs("2C2F", 10)
    assert specs == [
        {"type": "conv", "filters": 16, "kernel": 4, "stride": 2, "padding": "same"},
        {"type": "conv", "filters": 32, "kernel": 4, "stride": 2, "padding": "same"},
        {"type": "dense", "units": 100},
        {"type": "dense", "units": 10},
    ]


@pytest.mark.parametrize("name,convs,dense", [
    ("4C3F", [(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], [512, 512, 10]),
    ("6C2F", [(32, 3, 1), (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 3, 1), (64, 4, 2)],
     [512, 10]),
    ("7C1F", [(64, 3, 1), (64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 4, 2), (256, 3, 1),
              (256, 4, 2)], [200]),
])
def test_arch_tables(name, convs, dense):
    nc = dense[-1]
    specs = A.layer_specs(name, nc)
    got_c = [(s["filters"], s["kernel"], s["stride"]) for s in specs if s["type"] == "conv"]
    got_d = [s["units"] for s in specs if s["type"] == "dense"]
    assert got_c == convs and got_d == dense
    assert all(s["padding"] == "same" for s in specs if s["type"] == "conv")
    assert specs[-1] == {"type": "dense", "units": nc}


def test_arch_compact_and_errors(tmp_path):
    assert A.layer_specs("c(8,3,1), d(20)", 5) == [A.conv(8, 3, 1), A.dense(20), A.dense(5)]
    p = tmp_path / "a.json"
    p.write_text(json.dumps([A.dense(7), A.dense(3)]))
    assert A.layer_specs(str(p), 3) == [A.dense(7), A.dense(3)]
    for bad in ("9C9F", "c(8,3),d(2)", "c(0,3,1)"):
        with pytest.raises(ValueError):
            A.layer_specs(bad, 10)


def test_build_runs():
    net = A.build("2C2F", (1, 28, 28), 10, eps=0.3, seed=1)
    x = np.random.default_rng().random((2, 1, 28, 28)).astype(np.float32)
    out = np.asarray(net.logits(x).data if hasattr(net.logits(x), "data") else net.logits(x))
    assert out.shape == (2, 10) and np.isfinite(out).all()


# ---------------------------------------------------------------- training

def test_resume_equivalence(tmp_path):
    """Interrupt after epoch 1 of 2, resume: parameters and Adam state bitwise equal."""
    full = tmp_path / "full"
    part = tmp_path / "part"
    h_full = train(TrainConfig(out=str(full), epochs=2, seed=5, **TINY), log=_quiet)
    h1 = train(TrainConfig(out=str(part), epochs=2, seed=5, stop_after=1, **TINY), log=_quiet)
    assert len(h1) == 1
    _, extra1 = load_checkpoint(str(part / "last.npz"))
    assert extra1["train_state"]["epoch"] == 0
    h2 = train(TrainConfig(out=str(part), epochs=2, seed=5, **TINY), resume=True, log=_quiet)
    assert [m["epoch"] for m in h2] == [1, 2]
    pa, ea = _params(full / "last.npz")
    pb, eb = _params(part / "last.npz")
    assert len(pa) == len(pb) > 0
    for a, b in zip(pa, pb):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    oa, ob = ea["train_state"]["optimizer"], eb["train_state"]["optimizer"]
    assert oa["t"] == ob["t"] == 2 * 3  # 96 / 32 steps per epoch
    for k in oa:
        if isinstance(oa[k], np.ndarray):
            assert np.array_equal(oa[k], ob[k]), k
    for key in ("loss", "val_clean_acc", "val_vra", "val_rejection", "k_sub"):
        assert h_full[-1][key] == h2[-1][key], key
    # the split is the same on resume, and recorded
    assert ea["train_state"]["split"] == eb["train_state"]["split"]
    assert ea["train_state"]["split"]["n_val"] == 16
    # a different seed gives different weights: the comparison above can fail
    other = tmp_path / "other"
    train(TrainConfig(out=str(other), epochs=1, seed=6, **TINY), log=_quiet)
    pc, _ = _params(other / "last.npz")
    assert not all(np.array_equal(a, c) for a, c in zip(pa, pc))
    # metrics files: one row per epoch, rewritten correctly after the resume
    lines = (part / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2]
    rows = list(csv.DictReader(open(part / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["loss"]) == pytest.approx(h_full[1]["loss"])
    assert (part / "best.npz").exists()


def test_metrics_content_and_learning(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), epochs=4, seed=1, lr=3e-3,
                      **{**TINY, "eps": 0.05, "train_eps": 0.05, "synthetic_n": (512, 128)})
    hist = train(cfg, log=_quiet)
    for m in hist:
        for k in ("loss", "val_clean_acc", "val_vra", "val_rejection", "k_sub", "lr", "eps",
                  "lam", "samples_per_s", "epoch_s", "peak_mem_mb"):
            assert np.isfinite(m[k]), (k, m[k])
        assert 0 <= m["val_vra"] <= m["val_clean_acc"] <= 1
        assert 0 <= m["val_rejection"] <= 1 and m["k_sub"] > 0
        assert "test_vra" not in m      # the test set is not looked at per epoch
    assert hist[-1]["loss"] < hist[0]["loss"]
    # 10 well-separated classes: learnable, and certifiable at a small eps
    assert hist[-1]["val_clean_acc"] > 0.5 and hist[-1]["val_vra"] > 0.3
    final = json.loads((tmp_path / "test.json").read_text())
    assert final["selected_on"] == "val" and final["n_test"] == 128
    assert final["test_vra"] > 0.3 and final["epoch"] >= 1


def test_warmup_and_trades(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), epochs=2, warmup=1, loss="trades", lam="0.5,2,1",
                      lr_schedule="decay_to_lb", lr_lb=1e-4, **TINY)
    hist = train(cfg, log=_quiet)
    assert [m["phase"] for m in hist] == ["warmup", "gloro"]
    assert hist[0]["eps"] == 0.0 and hist[1]["eps"] == pytest.approx(0.15)
    assert hist[1]["lr"] < 1e-3  # decaying over the second half


def test_nan_stops_and_keeps_checkpoint(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), epochs=2, seed=2, stop_after=1, **TINY)
    train(cfg, log=_quiet)
    before = (tmp_path / "last.npz").read_bytes()
    ds = data.load_dataset("synthetic", seed=2, synthetic_shape=(1, 10, 10), synthetic_n=(96, 48))
    ds.x_train[:] = 3e38  # finite inputs whose activations overflow to inf / NaN
    cfg2 = TrainConfig(out=str(tmp_path), epochs=2, seed=2, **TINY)
    with pytest.raises(TrainingDiverged, match="loss is (nan|inf) at epoch 2.*last.npz"), \
            np.errstate(over="ignore", invalid="ignore"):
        train(cfg2, resume=True, log=_quiet, dataset=ds)
    assert (tmp_path / "last.npz").read_bytes() == before


def test_resume_rejects_other_config(tmp_path):
    train(TrainConfig(out=str(tmp_path), epochs=2, stop_after=1, **TINY), log=_quiet)
    with pytest.raises(ValueError, match="arch"):
        train(TrainConfig(out=str(tmp_path), epochs=2, **{**TINY, "arch": "c(4,3,1),d(16)"}),
              resume=True, log=_quiet)


def test_augment_default():
    assert TrainConfig(dataset="cifar10").augment_on()
    assert TrainConfig(dataset="tiny-imagenet").augment_on()
    assert not TrainConfig(dataset="fashion-mnist").augment_on()
    assert TrainConfig(dataset="mnist", augment=True).augment_on()
    with pytest.raises(ValueError):
        TrainConfig(loss="hinge")


def test_cifar_dir_with_augmentation(tmp_path):
    """CIFAR-10 batches on disk -> a training epoch with augmentation on by default."""
    import pickle

    rng = np.random.default_rng()
    src = tmp_path / "cifar"
    src.mkdir()
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 8)]:
        with open(src / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, n)]}, fh)
    cfg = TrainConfig(dataset="cifar10", data_dir=str(src), arch="d(8)", epochs=1,  # dense only: cheap exact bounds
                      batch=16, power_iters=1, eps=0.1, out=str(tmp_path / "run"),
                      progress=False, lipschitz_max_iter=200, val=8)
    assert cfg.augment_on()
    hist = train(cfg, log=_quiet)
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"])
    # augmentation changes the batches, hence the weights
    cfg2 = dataclasses.replace(cfg, augment=False, out=str(tmp_path / "run2"))
    train(cfg2, log=_quiet)
    pa, _ = _params(tmp_path / "run" / "last.npz")
    pb, _ = _params(tmp_path / "run2" / "last.npz")
    assert not all(np.array_equal(a, b) for a, b in zip(pa, pb))


def test_resume_without_config_in_train_state(tmp_path, capsys):
    from gloro_core.cli import main

    train(TrainConfig(out=str(tmp_path), epochs=2, stop_after=1, **TINY), log=_quiet)
    net, extra = load_checkpoint(str(tmp_path / "last.npz"))
    del extra["train_state"]["config"]
    net.save(str(tmp_path / "last.npz"), extra=extra)
    with pytest.raises(ValueError, match=r"last\.npz: train_state has no valid 'config'; "
                                         "cannot resume"):
        train(TrainConfig(out=str(tmp_path), epochs=2, **TINY), resume=True, log=_quiet)
    assert main(["train", "--dataset", "synthetic", "--synthetic-shape", "1,10,10", "--limit",
                 "64", "--out", str(tmp_path), "--resume", "--no-progress", "--val", "16"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'last.npz'}: train_state has no "
                                       "valid 'config'; cannot resume from it (start over with "
                                       "--overwrite or another --out)\n")


@pytest.mark.parametrize("field,value,message", [
    # negative from the start / only after a while / only after the warm-up epoch
    ("eps_schedule", "-1,0.1,2", "--eps-schedule '-1,0.1,2': values must be finite and >= 0 "
                                 "over the whole run, got x=-1"),
    ("eps_schedule", "0.1,-0.5,2", "got y=-0.5"),
    ("eps_schedule", "nan,0.1,2", "got x=nan"),
    ("eps_schedule", "0,0.1,inf", "e must be a finite number of epochs > 0, got inf"),
    ("lam", "-1", "--lam '-1': lambda must be finite and >= 0"),
    ("lam", "1,-2,3", "--lam '1,-2,3': values must be finite and >= 0 over the whole run, "
                      "got y=-2"),
    ("lr", float("nan"), "--lr must be finite and > 0, got nan"),
    ("eps", float("nan"), "eps must be finite and >= 0"),
])
def test_schedules_checked_before_training(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(out=str(tmp_path / "run"), epochs=3, warmup=1, **{**TINY, field: value})
    assert not (tmp_path / "run").exists()


def test_bad_schedule_on_the_command_line_trains_nothing(tmp_path, capsys):
    from gloro_core.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--synthetic-shape", "1,10,10", "--limit",
                 "64", "--epochs", "2", "--warmup", "1", "--eps-schedule=-1,0.1,2",
                 "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("error: --eps-schedule '-1,0.1,2': values must be finite and >= 0 "
                            "over the whole run, got x=-1\n")
    assert "epoch" not in captured.out and not out.exists()

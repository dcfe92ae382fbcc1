"""The validation split and model selection on it: best.npz never looks at the test set."""
import json

import numpy as np
import pytest

from gloro_core import split as S
from gloro_core import train as train_mod
from gloro_core.cli import main
from gloro_core.train import TrainConfig, load_checkpoint, train

TINY = dict(dataset="synthetic", arch="c(4,3,2),d(16)", synthetic_shape=(1, 10, 10),
            synthetic_n=(96, 48), batch=32, power_iters=2, eps=0.1, train_eps=0.15,
            lipschitz_max_iter=300, progress=False, eval_batch=64, val=16)


def _quiet(*a, **k):
    pass


def test_holdout_is_stratified_deterministic_and_disjoint():
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    np.random.default_rng(0).shuffle(y)
    sp = S.holdout(y, 20, seed=3)
    assert len(sp.val) == 20 and len(sp.train) == 80
    assert np.array_equal(np.sort(np.concatenate([sp.train, sp.val])), np.arange(100))
    assert np.bincount(y[sp.val], minlength=4).tolist() == [10, 6, 3, 1]   # the class shares
    again = S.holdout(y, 20, seed=3)
    assert np.array_equal(sp.val, again.val) and sp.digest == again.digest
    other = S.holdout(y, 20, seed=4)
    assert not np.array_equal(sp.val, other.val) and sp.digest != other.digest
    # largest remainders: the total is exact even when no share is whole
    odd = S.holdout(y, 7, seed=0)
    assert len(odd.val) == 7 and np.bincount(y[odd.val], minlength=4).tolist() == [4, 2, 1, 0]


@pytest.mark.parametrize("n_val", [0, 100, 101, -1, 2.5, True])
def test_holdout_bad_sizes(n_val):
    with pytest.raises(ValueError, match="--val"):
        S.holdout(np.zeros(100, int), n_val, seed=0)


def test_check_same():
    sp = S.holdout(np.arange(40) % 4, 8, seed=1)
    S.check_same(sp.record(1), sp, 1, "x")
    S.check_same(None, None, 1, "x")
    with pytest.raises(ValueError, match="split recomputed now differs"):
        S.check_same(sp.record(1), S.holdout(np.arange(40) % 4, 8, seed=2), 2, "x")
    with pytest.raises(ValueError, match=r"--val 8 differs from the checkpoint's \(none\)"):
        S.check_same(None, sp, 1, "x")


def _scripted_evaluate(monkeypatch, val_vras, test_vras):
    """evaluate() answers from a script: val peaks at one epoch, test at another."""
    calls = {"val": 0, "test": 0}

    def fake(net, x, y, eps, batch=500):
        kind = "test" if len(x) == 48 else "val"
        v = (val_vras if kind == "val" else test_vras)[calls[kind]]
        calls[kind] += 1
        return {"clean_acc": 0.9, "vra": v, "rejection": 0.05}
    monkeypatch.setattr(train_mod, "evaluate", fake)
    return calls


def test_best_is_chosen_on_validation_not_test(tmp_path, monkeypatch):
    calls = _scripted_evaluate(monkeypatch, [0.2, 0.5, 0.3], [0.6, 0.4, 0.7, 0.45])
    logs = []
    hist = train(TrainConfig(out=str(tmp_path), epochs=3, test_every_epoch=True, **TINY),
                 log=logs.append)
    assert [m["val_vra"] for m in hist] == [0.2, 0.5, 0.3]
    assert [m["test_vra"] for m in hist] == [0.6, 0.4, 0.7]           # curves only
    assert load_checkpoint(str(tmp_path / "best.npz"))[1]["train_state"]["epoch"] == 1
    res = json.loads((tmp_path / "test.json").read_text())
    assert res["epoch"] == 2 and res["selected_on"] == "val" and res["test_vra"] == 0.45
    assert calls == {"val": 3, "test": 4}                              # 3 epochs + the end
    assert any("chosen on the validation split" in s for s in logs)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_vra", "test_vra", "val_clean_acc", "test_rejection"} <= set(header)


def test_without_test_every_epoch_the_test_set_is_seen_once(tmp_path, monkeypatch):
    calls = _scripted_evaluate(monkeypatch, [0.2, 0.5], [0.45])
    hist = train(TrainConfig(out=str(tmp_path), epochs=2, **TINY), log=_quiet)
    assert calls == {"val": 2, "test": 1} and all("test_vra" not in m for m in hist)


def test_val_0_selects_on_test_with_a_warning(tmp_path, monkeypatch):
    _scripted_evaluate(monkeypatch, [], [0.6, 0.4, 0.6])
    logs = []
    train(TrainConfig(out=str(tmp_path), epochs=2, **{**TINY, "val": 0}), log=logs.append)
    assert logs[0].startswith("warning: --val 0: best.npz is chosen on the TEST set")
    res = json.loads((tmp_path / "test.json").read_text())
    assert res["selected_on"] == "test" and res["epoch"] == 1


def test_resume_keeps_the_split_and_refuses_another(tmp_path):
    train(TrainConfig(out=str(tmp_path), epochs=2, stop_after=1, **TINY), log=_quiet)
    saved = load_checkpoint(str(tmp_path / "last.npz"))[1]["train_state"]["split"]
    assert saved["n_val"] == 16 and saved["method"] == "stratified/1"
    with pytest.raises(ValueError, match="split recomputed now differs"):
        train(TrainConfig(out=str(tmp_path), epochs=2, **{**TINY, "val": 24}), resume=True,
              log=_quiet)
    hist = train(TrainConfig(out=str(tmp_path), epochs=2, **TINY), resume=True, log=_quiet)
    assert len(hist) == 2


def test_legacy_run_resumes_with_val_0(tmp_path):
    """A run saved before splits (rows with clean_acc/vra/rejection on the test set)."""
    train(TrainConfig(out=str(tmp_path), epochs=2, stop_after=1, **{**TINY, "val": 0}),
          log=_quiet)
    net, extra = load_checkpoint(str(tmp_path / "last.npz"))
    st = extra["train_state"]
    del st["split"], st["config"]["val"], st["config"]["test_every_epoch"]
    st["history"] = [{k.replace("test_", ""): v for k, v in m.items()} for m in st["history"]]
    net.save(str(tmp_path / "last.npz"), extra=extra)
    with pytest.raises(ValueError, match="--val 16 differs from the checkpoint's"):
        train(TrainConfig(out=str(tmp_path), epochs=2, **TINY), resume=True, log=_quiet)
    logs = []
    hist = train(TrainConfig(out=str(tmp_path), epochs=2, **{**TINY, "val": 0}), resume=True,
                 log=logs.append)
    assert [sorted(k for k in m if "vra" in k) for m in hist] == [["test_vra"]] * 2
    assert not any("differ from the checkpoint" in s for s in logs)


@pytest.mark.parametrize("bad", ["-1", "x", "1.5"])
def test_bad_val_flag(bad, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--val", bad])
    assert f"--val: expected a number of points >= 0, got '{bad}'" in capsys.readouterr().err

"""Recipes: every shipped preset parses into a valid config; the command line overrides it;
--epochs scales schedules written as fractions; bad names and bad recipe files are errors."""
import json

import pytest

from gloro_core import recipes
from gloro_core.cli import build_parser, main, train_config

SHIPPED = {"fashion-mnist-0.1", "fashion-mnist-0.3", "mnist-0.3", "mnist-1.58", "cifar10-0.141",
           "cifar10-0.141-liresnet", "tiny-imagenet-0.141"}


def _cfg(argv):
    tp = build_parser().train_parser
    args, note = recipes.apply(tp, argv)
    return train_config(args), note


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_recipe_is_a_valid_config(name):
    assert SHIPPED <= set(recipes.names())
    r = recipes.load(name)
    assert r["description"] and r["status"] and r["source"]
    cfg, note = _cfg(["--recipe", name])
    assert note == f"recipe {name} ({r['status']})"
    flags = r["flags"]
    assert cfg.dataset == flags["dataset"] and cfg.epochs == flags["epochs"]
    assert cfg.eps == flags["eps"] and cfg.loss == flags["loss"] and cfg.val == 5000
    if flags["dataset"] not in ("fashion-mnist",):
        assert r["status"].startswith("unverified")


def test_command_line_overrides_and_epochs_scale_fractions():
    cfg, note = _cfg(["--recipe", "cifar10-0.141-liresnet", "--epochs", "80", "--lr", "2e-3",
                      "--out", "x"])
    assert cfg.epochs == 80 and cfg.lr == 2e-3 and cfg.loss == "emma" and cfg.out == "x"
    assert note.endswith("overridden on the command line: epochs, lr")
    assert cfg.lr_warmup == pytest.approx(2.0)                 # 2.5% of 80
    plan = cfg.plan()
    assert plan.at(20)["eps"] == pytest.approx((0.0141 + 0.4235) / 2)   # ramp over 50%
    assert plan.at(41)["eps"] == pytest.approx(cfg.train_eps)
    full, _ = _cfg(["--recipe", "cifar10-0.141"])
    short, _ = _cfg(["--recipe", "cifar10-0.141", "--epochs", "40"])
    assert (full.warmup, short.warmup) == (20, 1)


def test_list_and_unknown(capsys):
    assert main(["train", "--recipe", "list"]) == 0
    out = capsys.readouterr().out
    for name in SHIPPED:
        assert f"\n{name}\n" in f"\n{out}"
    assert main(["train", "--recipe", "fashion-mnist-9"]) == 2
    assert capsys.readouterr().err.startswith("error: --recipe 'fashion-mnist-9': unknown recipe; "
                                              "choose one of cifar10-0.141, ")


def test_bad_recipe_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipes, "DIR", str(tmp_path))
    (tmp_path / "a.json").write_text(json.dumps({"flags": {"out": "/tmp/x"}}))
    (tmp_path / "b.json").write_text(json.dumps({"flags": {"epochs": "ten"}}))
    assert main(["train", "--recipe", "a"]) == 2
    assert "recipe a: 'out' is not a train option a recipe may set" in capsys.readouterr().err
    with pytest.raises(SystemExit):           # argparse checks a recipe's values too
        main(["train", "--recipe", "b"])
    assert "--epochs: invalid int value: 'ten'" in capsys.readouterr().err


def test_a_recipe_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipes, "DIR", str(tmp_path))
    (tmp_path / "tiny.json").write_text(json.dumps({
        "description": "d", "status": "s", "source": "t",
        "flags": {"dataset": "synthetic", "synthetic_shape": "1,10,10", "limit": 96,
                  "arch": "c(4,3,2),d(16)", "epochs": 3, "batch": 32, "power_iters": 2,
                  "val": 16, "eps": 0.05, "lr_decay": "cosine", "converge_start": True}}))
    assert main(["train", "--recipe", "tiny", "--epochs", "1", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "recipe tiny (s); overridden on the command line: epochs"
    cfg = json.loads(out[1][len("train: "):])
    assert cfg["epochs"] == 1 and cfg["converge_start"] and cfg["lr_schedule"] == "cosine"
    assert (tmp_path / "r" / "test.json").exists()

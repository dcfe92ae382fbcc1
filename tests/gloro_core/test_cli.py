"""The CLI end to end on synthetic data: train, certify --json, attack, lipschitz."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gloro_core.cli import build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = ["train", "--dataset", "synthetic", "--synthetic-shape", "1,10,10", "--limit", "128",
         "--arch", "c(4,3,2),d(16)", "--eps", "0.05", "--train-eps", "0.08", "--epochs", "2",
         "--batch", "32", "--power-iters", "2", "--lr", "0.003", "--no-progress", "--val", "32"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(TRAIN + ["--out", str(out), "--plot"]) == 0
    return out


def test_train_outputs(run_dir, capsys):
    for name in ("last.npz", "best.npz", "metrics.jsonl", "metrics.csv", "curves.png"):
        assert (run_dir / name).exists(), name
    rows = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["eps"] == 0.08 and rows[-1]["eps_test"] == 0.05
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_certify_json(run_dir, capsys, tmp_path):
    png = tmp_path / "vra.png"
    assert main(["certify", str(run_dir), "--json", "--limit", "40", "--plot", str(png)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 40 and res["eps"] == 0.05 and res["bound"] == "provable"
    for k in ("clean_acc", "vra", "rejection_rate", "radius_mean", "ms_per_instance",
              "peak_mb_per_instance"):
        assert k in res and res[k] == res[k], k  # present and not NaN
    assert 0 <= res["vra"] <= res["clean_acc"] <= 1
    assert res["vra"] + res["rejection_rate"] <= 1 + 1e-9
    assert png.read_bytes()[:4] == b"\x89PNG"
    # a much larger eps can only certify fewer points
    assert main(["certify", str(run_dir / "last.npz"), "--json", "--limit", "40", "--eps", "50",
                 "--bound", "power"]) == 0
    big = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert big["vra"] == 0.0 and big["rejection_rate"] == 1.0 and big["bound"] == "power"


def test_attack(run_dir, capsys):
    assert main(["attack", str(run_dir), "--json", "--limit", "24", "--steps", "5"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 24 and 0 <= res["pgd_acc"] <= res["clean_acc"] <= 1
    # what certify certified at this eps, PGD flipped none of (and some were certified)
    assert res["certified"] > 0 and res["certified_flipped"] == 0


def test_lipschitz(run_dir, capsys):
    assert main(["lipschitz", str(run_dir), "--json", "--limit", "16", "--pairs", "8",
                 "--points", "4", "--steps", "10"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["global_lower_bound"] > 0 and res["local_lower_bound_mean"] > 0
    # a lower bound can never exceed a provable upper bound of the same quantity
    assert res["global_lower_bound"] <= res["margin_upper_provable"] * (1 + 1e-5)
    assert res["local_lower_bound_max"] <= res["margin_upper_provable"] * (1 + 1e-5)
    assert res["margin_upper_power"] <= res["margin_upper_provable"] * (1 + 1e-6)
    assert len(res["layers"]) == 3 and res["global_upper_provable"] > 0
    # optimisation finds a good fraction of the bound on this small net
    assert res["global_lower_bound"] > 0.2 * res["margin_upper_provable"]


def test_resume_and_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(TRAIN + ["--out", str(out), "--stop-after", "1"]) == 0
    assert main(TRAIN + ["--out", str(out), "--resume"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "epoch   2/2" in text
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "data directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["certify", str(tmp_path / "missing.npz")])


def test_help_subprocess():
    for cmd in ("train", "certify", "attack", "lipschitz"):
        r = subprocess.run([sys.executable, "-m", "gloro_core", cmd, "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage" in r.stdout
    assert "--resume" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()


def test_backend_flag(tmp_path, monkeypatch):
    """--backend selects the kernels for the run without writing os.environ (which other
    libraries in the process read), and the default is back afterwards."""
    from kernels import registry

    monkeypatch.delenv("GLORO_BACKEND", raising=False)
    chosen = []
    select = registry.select
    monkeypatch.setattr(registry, "select", lambda op, like, backend=None: chosen.append(
        select(op, like, backend)) or chosen[-1])
    env = dict(os.environ)
    args = TRAIN[:]
    args[args.index("--epochs") + 1] = "1"
    assert main(args + ["--out", str(tmp_path / "b"), "--backend", "reference",
                        "--limit", "32", "--val", "8"]) == 0
    assert chosen and set(chosen) == {"reference"}
    assert dict(os.environ) == env and registry._DEFAULT is None
    x = np.zeros((2, 1, 4, 4), np.float32)
    assert registry.select("conv2d", x) == registry._default_cpu("conv2d", x) != "reference"


def test_device_gpu_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    import kernels

    if kernels.availability()["cupy"] is None:
        pytest.skip("a CUDA device is present: the gpu path is covered by the gpu-marked tests")
    args = TRAIN[:]
    args[args.index("--epochs") + 1] = "1"
    assert main(args + ["--out", str(tmp_path / "g"), "--device", "gpu", "--limit", "32", "--val", "8"]) == 2
    assert "--device gpu needs CuPy and a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "g" / "last.npz").exists()


def test_lipschitz_on_float64_and_dense_input_nets(tmp_path, capsys):
    """`lipschitz` assumed float32 and (C, H, W) inputs: a float64 net raised TypeError and
    a (features,) net ValueError. Both now give lower bounds below the provable upper one."""
    from gloro_core import lower_bounds
    from gloro_core.model import GloroNet

    net = GloroNet((1, 6, 6), 3, [{"type": "conv", "filters": 4, "kernel": 3, "stride": 2},
                                  {"type": "dense", "units": 3}], dtype=np.float64, eps=0.1, seed=3)
    p = tmp_path / "f64.npz"
    net.save(p, extra={"train_state": {"config": {"dataset": "synthetic", "synthetic_shape": [1, 6, 6],
                                                  "synthetic_n": [16, 8], "eps": 0.1}}})
    assert main(["lipschitz", str(p), "--json", "--pairs", "4", "--points", "2", "--steps", "5"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < res["global_lower_bound"] <= res["margin_upper_provable"] * (1 + 1e-9)
    dense = GloroNet((7,), 3, [{"type": "dense", "units": 6}, {"type": "dense", "units": 3}], eps=0.1, seed=4)
    x = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    upper = lower_bounds.upper_bounds(dense)["margin_upper_provable"]
    g = lower_bounds.global_lower_bound(dense, x, pairs=4, steps=5)
    loc = lower_bounds.local_lower_bound(dense, x, 0.1, steps=5)
    assert 0 < g <= upper * (1 + 1e-5) and loc.shape == (5,) and np.all(loc <= upper * (1 + 1e-5))

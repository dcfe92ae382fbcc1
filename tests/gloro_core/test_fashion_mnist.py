"""Integration: a short GloRo run on a Fashion-MNIST subset (real data)."""
import os

import numpy as np
import pytest

from gloro_core import data
from gloro_core.train import TrainConfig, train

FMNIST = data.DEFAULT_DIRS["fashion-mnist"][0]
pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")),
    reason=f"Fashion-MNIST not found at {FMNIST} (apt-get install dataset-fashion-mnist)")


def test_real_files_load():
    ds = data.load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.x_train.min() == 0 and ds.x_train.max() == 1
    assert np.bincount(ds.y_train).tolist() == [6000] * 10  # balanced classes
    assert np.bincount(ds.y_test).tolist() == [1000] * 10


def test_short_run(tmp_path):
    cfg = TrainConfig(dataset="fashion-mnist", arch="c(8,4,2),d(32)", eps=0.1, train_eps=0.15,
                      epochs=2, batch=64, limit=1024, test_limit=256, power_iters=5,
                      lr=2e-3, out=str(tmp_path), progress=False, lipschitz_max_iter=500,
                      val=256)
    hist = train(cfg, log=lambda s: None)
    assert len(hist) == 2
    last = hist[-1]
    assert last["loss"] < hist[0]["loss"] or last["val_clean_acc"] > hist[0]["val_clean_acc"]
    assert last["val_clean_acc"] > 0.4  # 10 classes: chance is 0.1
    assert 0 <= last["val_vra"] <= last["val_clean_acc"]
    assert (tmp_path / "last.npz").exists()

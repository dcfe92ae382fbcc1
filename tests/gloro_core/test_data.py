"""Loaders on small files written here: IDX (gz and raw), CIFAR batches, .npy; corrupt files."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from gloro_core import augment, data
from gloro_core.data import DataError


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + \
        arr.astype(np.uint8).tobytes()


def _write(path, payload: bytes, gz: bool):
    if gz:
        path = str(path) + ".gz"
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        with open(path, "wb") as fh:
            fh.write(payload)
    return path


def make_idx_dir(tmp_path, n_train=7, n_test=5, gz=True, rng=None, test_prefix="t10k"):
    rng = rng or np.random.default_rng()
    imgs = {s: rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            for s, n in (("train", n_train), (test_prefix, n_test))}
    labs = {s: rng.integers(0, 10, size=n, dtype=np.uint8)
            for s, n in (("train", n_train), (test_prefix, n_test))}
    for s in imgs:
        _write(tmp_path / f"{s}-images-idx3-ubyte", _idx_bytes(imgs[s], 2051), gz)
        _write(tmp_path / f"{s}-labels-idx1-ubyte", _idx_bytes(labs[s], 2049), gz)
    return imgs, labs


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    imgs, labs = make_idx_dir(tmp_path, gz=gz)
    ds = data.load_dataset("fashion-mnist", str(tmp_path))
    assert ds.x_train.shape == (7, 1, 28, 28) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(ds.x_train[:, 0], imgs["train"].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_test, labs["t10k"].astype(np.int64))
    assert ds.y_train.dtype == np.int64 and ds.num_classes == 10
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_idx_test_prefix_and_kmnist(tmp_path):
    make_idx_dir(tmp_path, gz=False, test_prefix="test")
    ds = data.load_dataset("kmnist", str(tmp_path))
    assert ds.x_test.shape[0] == 5 and ds.name == "kmnist"


def test_idx_missing(tmp_path):
    make_idx_dir(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        data.load_dataset("mnist", str(tmp_path))
    with pytest.raises(DataError, match="not found"):
        data.load_dataset("mnist", str(tmp_path / "nope"))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated(tmp_path, gz):
    make_idx_dir(tmp_path, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    p = tmp_path / name
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        data.load_dataset("mnist", str(tmp_path))


def test_idx_truncated_header(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*truncated"):
        data.load_dataset("mnist", str(tmp_path))


def test_idx_bad_magic(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    rng = np.random.default_rng()
    # labels magic where images are expected
    arr = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(arr, 2049)[:8] +
                                                         _idx_bytes(arr, 2051)[8:])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*magic"):
        data.load_dataset("mnist", str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x12\x34" + _idx_bytes(arr, 2051)[2:])
    with pytest.raises(DataError, match="magic"):
        data.load_dataset("mnist", str(tmp_path))


def test_idx_count_mismatch(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    labs = np.zeros(6, np.uint8)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labs, 2049), gz=True)
    with pytest.raises(DataError, match="count mismatch.*train-images.*7.*train-labels.*6"):
        data.load_dataset("mnist", str(tmp_path))


def _cifar_batch(path, n, rng, labels=None, key_bytes=True):
    d = {b"data" if key_bytes else "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"labels" if key_bytes else "labels":
             # Python ints, as in CIFAR's files: the restricted unpickler refuses numpy scalars
             [int(v) for v in rng.integers(0, 10, n)] if labels is None else labels}
    with open(path, "wb") as fh:
        pickle.dump(d, fh)
    return d


def make_cifar_dir(tmp_path, rng):
    batches = [_cifar_batch(tmp_path / f"data_batch_{i}", 3, rng) for i in range(1, 6)]
    test = _cifar_batch(tmp_path / "test_batch", 4, rng)
    return batches, test


def test_cifar_roundtrip(tmp_path):
    rng = np.random.default_rng()
    batches, test = make_cifar_dir(tmp_path, rng)
    ds = data.load_dataset("cifar10", str(tmp_path))
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.x_train.dtype == np.float32
    # channel-major layout: first 1024 bytes are the red plane
    np.testing.assert_array_equal(ds.x_train[3, 0].ravel(),
                                  batches[1][b"data"][0, :1024].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.x_test[2, 2].ravel(),
                                  test[b"data"][2, 2048:].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_train[:3], np.array(batches[0][b"labels"]))


def test_cifar_corrupt(tmp_path):
    rng = np.random.default_rng()
    make_cifar_dir(tmp_path, rng)
    p = tmp_path / "data_batch_3"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataError, match="data_batch_3"):
        data.load_dataset("cifar10", str(tmp_path))
    _cifar_batch(p, 3, rng, labels=[1, 2])
    with pytest.raises(DataError, match="count mismatch in .*data_batch_3"):
        data.load_dataset("cifar10", str(tmp_path))
    p.write_bytes(b"this is not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3"):
        data.load_dataset("cifar10", str(tmp_path))
    _cifar_batch(p, 3, rng)
    os.remove(tmp_path / "test_batch")
    with pytest.raises(DataError, match="missing file.*test_batch"):
        data.load_dataset("cifar10", str(tmp_path))


def test_npy_dir(tmp_path):
    rng = np.random.default_rng()
    xtr = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)  # NHWC uint8
    xte = rng.random((2, 3, 8, 8)).astype(np.float32)  # NCHW float in [0,1]
    np.save(tmp_path / "x_train.npy", xtr)
    np.save(tmp_path / "y_train.npy", rng.integers(0, 200, 6))
    np.save(tmp_path / "x_test.npy", xte)
    np.save(tmp_path / "y_test.npy", rng.integers(0, 200, 2))
    ds = data.load_dataset("tiny-imagenet", str(tmp_path))
    assert ds.x_train.shape == (6, 3, 8, 8) and ds.num_classes == 200
    np.testing.assert_array_equal(ds.x_train[1, 2], xtr[1, :, :, 2].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.x_test, xte)
    np.save(tmp_path / "y_test.npy", rng.integers(0, 200, 3))
    with pytest.raises(DataError, match="count mismatch.*x_test.npy.*y_test.npy"):
        data.load_dataset("tiny-imagenet", str(tmp_path))


def test_synthetic_seeded_and_learnable():
    a = data.load_dataset("synthetic", seed=3)
    b = data.load_dataset("synthetic", seed=3)
    c = data.load_dataset("synthetic", seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == (2048, 1, 28, 28) and a.x_train.dtype == np.float32
    # nearest-class-mean classifier is near perfect: the data is learnable
    means = np.stack([a.x_train[a.y_train == k].mean(0).ravel() for k in range(10)])
    d = ((a.x_test.reshape(len(a.x_test), -1)[:, None, :] - means[None]) ** 2).sum(-1)
    assert (d.argmin(1) == a.y_test).mean() > 0.95


def test_batches_seeded_cover_all():
    n, bs = 23, 5
    got = list(data.batches(n, bs, data.epoch_rng(7, 2)))
    again = list(data.batches(n, bs, data.epoch_rng(7, 2)))
    other = np.concatenate(list(data.batches(n, bs, data.epoch_rng(7, 3))))
    assert [len(b) for b in got] == [5, 5, 5, 5, 3]
    flat = np.concatenate(got)
    np.testing.assert_array_equal(np.sort(flat), np.arange(n))
    np.testing.assert_array_equal(flat, np.concatenate(again))
    assert not np.array_equal(flat, other)
    assert [len(b) for b in data.batches(n, bs, None, drop_last=True)] == [5] * 4


def test_augment_shapes_and_identity():
    rng = np.random.default_rng()
    x = rng.random((3, 3, 16, 16)).astype(np.float32)
    y = augment.augment_batch(x, np.random.default_rng(1))
    assert y.shape == x.shape and y.dtype == np.float32
    assert not np.allclose(x, y) and 0 <= y.min() and y.max() <= 1
    np.testing.assert_array_equal(y, augment.augment_batch(x, np.random.default_rng(1)))
    ident = augment.AugmentConfig(rotation=0, shift=0, shear=0, zoom=0, hflip=False)
    np.testing.assert_allclose(augment.augment_batch(x, rng, ident), x, atol=1e-6)
    # flip only: exact mirror image (same matrix for every channel)
    flip = augment.AugmentConfig(rotation=0, shift=0, shear=0, zoom=0, hflip=True)
    z = augment.augment_batch(x, np.random.default_rng(0), flip)
    for i in range(3):
        assert np.allclose(z[i], x[i]) or np.allclose(z[i], x[i, :, :, ::-1], atol=1e-6)

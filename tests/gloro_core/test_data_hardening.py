"""Hardening of the loaders: data files never run code, class counts, bad arrays, bad files.

Each test here failed on the loaders before the hardening (pickle.load on CIFAR batches,
max-label class counts, guessed layouts, nanmin messages, raw zlib errors).
"""
import builtins
import gzip
import os
import pickle
import re
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from gloro_core import data
from gloro_core.data import DataError

# ---------------------------------------------------------------- CIFAR-10 helpers


def _batch_dict(n, rng, labels=None):
    """A batch laid out like CIFAR-10's python files. data: (n, 3072) uint8."""
    return {b"batch_label": b"training batch 1 of 5",
            b"labels": [int(v) for v in rng.integers(0, 10, n)] if labels is None else labels,
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def _write_py_dir(directory, rng, n=3, protocol=2):
    directory.mkdir(exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        out[name] = _batch_dict(n, rng)
        (directory / name).write_bytes(pickle.dumps(out[name], protocol=protocol))
    return out


def _bin_bytes(d):
    """The binary version of a batch: per record, 1 label byte then 3072 pixel bytes."""
    labels = np.asarray(d[b"labels"], dtype=np.uint8)[:, None]
    return np.concatenate([labels, d[b"data"]], axis=1).tobytes()


def _write_bin_dir(directory, batches):
    directory.mkdir(parents=True, exist_ok=True)
    for name, d in batches.items():
        (directory / f"{name}.bin").write_bytes(_bin_bytes(d))


# A Python 2 style pickle (how CIFAR-10's own files were written): str is bytes under
# encoding="bytes", numpy under numpy.core, protocol 2 opcodes written out by hand.

def _s(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)


def _i(v: int) -> bytes:
    return (b"K" + bytes([v])) if 0 <= v < 256 else (b"J" + struct.pack("<i", v))


U1_STATE = b"(" + _i(3) + _s(b"|") + b"NNN" + _i(-1) + _i(-1) + _i(0) + b"t"


def _py2_array(raw, shape, spec=b"u1", dtype_state=U1_STATE, extra_build=b""):
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _i(0) + b"\x85"
            + _s(b"b") + b"\x87R"
            + b"(" + _i(1) + b"(" + b"".join(_i(s) for s in shape) + b"t"
            + b"cnumpy\ndtype\n" + _s(spec) + _i(0) + _i(1) + b"\x87R" + dtype_state + b"b"
            + b"\x89" + _s(raw) + b"tb" + extra_build)


def _py2_batch(d, array=None):
    return (b"\x80\x02}(" + _s(b"batch_label") + _s(d[b"batch_label"])
            + _s(b"data") + (array or _py2_array(d[b"data"].tobytes(), d[b"data"].shape))
            + _s(b"labels") + b"](" + b"".join(_i(v) for v in d[b"labels"]) + b"e"
            + _s(b"filenames") + b"](" + b"".join(_s(f) for f in d[b"filenames"]) + b"e"
            + b"u.")


def _expected(d):
    return (d[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255,
            np.asarray(d[b"labels"], dtype=np.int64))


# ---------------------------------------------------------------- 1. no code from data files

class _Reduce:
    """Pickles as a call of ``fn(*args)``: what a crafted data file does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker):
    return {
        "os.system": (_Reduce(os.system, f"touch {marker}"), r"refused global (posix|os)\.system"),
        "builtins.exec": (_Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
                          r"refused global (__builtin__|builtins)\.exec"),
        "builtins.eval": (_Reduce(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
                          r"refused global (__builtin__|builtins)\.eval"),
        "numpy.save": (_Reduce(np.save, str(marker), [1]), r"refused global numpy\.save"),
    }


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval", "numpy.save"])
def test_malicious_cifar_pickle_is_refused_and_runs_nothing(tmp_path, kind, protocol):
    rng = np.random.default_rng(0)
    _write_py_dir(tmp_path, rng)
    marker = tmp_path / "MARKER"
    payload, refused = _payloads(marker)[kind]
    # alone, and hidden inside an otherwise valid batch
    for obj in (payload, {**_batch_dict(3, rng), b"extra": [payload]}):
        (tmp_path / "data_batch_2").write_bytes(pickle.dumps(obj, protocol=protocol))
        with pytest.raises(DataError, match=r"data_batch_2: " + refused + ": a CIFAR-10 batch"):
            data.load_dataset("cifar10", str(tmp_path))
        assert not os.path.exists(marker) and not os.path.exists(str(marker) + ".npy")


def test_malicious_pickle_returning_a_valid_batch_is_refused(tmp_path, capsys):
    """The variant that runs code and then hands back a good batch, so training succeeded."""
    from gloro_core.cli import main

    rng = np.random.default_rng(1)
    _write_py_dir(tmp_path, rng)
    marker = tmp_path / "MARKER"
    expr = (f"(open({str(marker)!r}, 'w').close(), {{b'data': __import__('numpy').zeros("
            f"(3, 3072), 'uint8'), b'labels': [0, 1, 2]}})[1]")
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(_Reduce(builtins.eval, expr), protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: refused global __builtin__\.eval"):
        data.load_dataset("cifar10", str(tmp_path))
    assert not marker.exists()
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--arch", "d(8)",
                 "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data_batch_1: refused global __builtin__.eval" in err and len(err.splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("arr, refused", [
    (np.array([1, "x", None], dtype=object), r"numpy dtype 'O8'"),
    (np.zeros((3, 3072), dtype=np.int64), r"numpy dtype 'i8'"),
    (np.zeros(3, dtype=[("a", "u1")]), r"numpy dtype 'V1'"),
])
def test_cifar_pickle_refuses_arrays_other_than_uint8(tmp_path, arr, refused):
    rng = np.random.default_rng(2)
    _write_py_dir(tmp_path, rng)
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        d = {**_batch_dict(3, rng), b"data": arr}
        (tmp_path / "test_batch").write_bytes(pickle.dumps(d, protocol=protocol))
        with pytest.raises(DataError, match=r"test_batch: " + refused):
            data.load_dataset("cifar10", str(tmp_path))


def test_cifar_pickle_refuses_crafted_numpy_state(tmp_path):
    """What numpy's own pickles never hold: fields on uint8, a second BUILD, other codecs."""
    rng = np.random.default_rng(3)
    _write_py_dir(tmp_path, rng)
    d = _batch_dict(2, rng)
    raw = d[b"data"].tobytes()
    fields_state = b"(" + _i(3) + _s(b"|") + b"N(" + _s(b"a") + b"t}" + _i(-1) + _i(-1) + _i(0) + b"t"
    again = b"(" + _i(1) + b"(" + _i(2) + _i(3072) + b"tNN" + _s(raw) + b"tb"
    cases = {
        "dtype state": (_py2_array(raw, (2, 3072), dtype_state=fields_state),
                        r"numpy dtype state .* is not that of plain uint8"),
        "twice": (_py2_array(raw, (2, 3072), extra_build=again),
                  r"pickle sets the state of a numpy array twice"),
        "short data": (_py2_array(raw[:-1], (2, 3072)),
                       r"numpy array of shape \(2, 3072\) without its 6144 bytes of data"),
        "dtype spec": (_py2_array(raw, (2, 3072), spec=b"O8"), r"numpy dtype b'O8'"),
    }
    for what, (array, refused) in cases.items():
        (tmp_path / "data_batch_4").write_bytes(_py2_batch(d, array))
        with pytest.raises(DataError, match=r"data_batch_4: " + refused):
            data.load_dataset("cifar10", str(tmp_path))
    # _codecs.encode is allowed for protocol 2's bytes only: latin1, from a str
    rot = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    (tmp_path / "data_batch_4").write_bytes(rot)
    with pytest.raises(DataError, match=r"data_batch_4: _codecs.encode with str, 'rot13'"):
        data.load_dataset("cifar10", str(tmp_path))
    # state set on an allowed global (its __defaults__, say) is refused
    setattr_ = b"\x80\x02cnumpy\ndtype\nN}X\x0c\x00\x00\x00__defaults__)s\x86b."
    (tmp_path / "data_batch_4").write_bytes(setattr_)
    with pytest.raises(DataError, match=r"data_batch_4: pickle sets state on numpy.dtype"):
        data.load_dataset("cifar10", str(tmp_path))


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, pickle.HIGHEST_PROTOCOL])
def test_cifar_python_batches_load_with_every_protocol(tmp_path, protocol):
    rng = np.random.default_rng(4)
    batches = _write_py_dir(tmp_path, rng, protocol=protocol)
    ds = data.load_dataset("cifar10", str(tmp_path))
    x, y = _expected(batches["data_batch_2"])
    np.testing.assert_array_equal(ds.x_train[3:6], x)
    np.testing.assert_array_equal(ds.y_train[3:6], y)
    x, y = _expected(batches["test_batch"])
    np.testing.assert_array_equal(ds.x_test, x)
    np.testing.assert_array_equal(ds.y_test, y)
    assert ds.num_classes == 10 and ds.x_train.shape == (15, 3, 32, 32)
    # a Fortran-ordered array pickles its bytes in that order
    d = batches["data_batch_5"]
    (tmp_path / "data_batch_5").write_bytes(pickle.dumps(
        {**d, b"data": np.asfortranarray(d[b"data"])}, protocol=protocol))
    np.testing.assert_array_equal(data.load_dataset("cifar10", str(tmp_path)).x_train[12:],
                                  _expected(d)[0])


def test_cifar_python2_style_batch_loads(tmp_path):
    """Byte strings and numpy.core names, as in the files CIFAR-10 distributes."""
    rng = np.random.default_rng(5)
    batches = _write_py_dir(tmp_path, rng)
    for name, d in batches.items():
        (tmp_path / name).write_bytes(_py2_batch(d))
    ds = data.load_dataset("cifar10", str(tmp_path))
    np.testing.assert_array_equal(ds.x_test, _expected(batches["test_batch"])[0])
    np.testing.assert_array_equal(ds.y_train[:3], _expected(batches["data_batch_1"])[1])


@pytest.mark.parametrize("where", [".", "cifar-10-batches-bin"])
def test_cifar_binary_version_matches_python_version(tmp_path, where):
    rng = np.random.default_rng(6)
    batches = _write_py_dir(tmp_path / "py", rng)
    from_py = data.load_dataset("cifar10", str(tmp_path / "py"))
    _write_bin_dir(tmp_path / "bin" / where, batches)
    from_bin = data.load_dataset("cifar10", str(tmp_path / "bin"))
    for k in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(from_bin, k), getattr(from_py, k))
        assert getattr(from_bin, k).dtype == getattr(from_py, k).dtype
    assert from_bin.num_classes == 10
    # the binary files win over python batches in the same directory (those would be
    # refused: they name a global)
    for name in batches:
        (tmp_path / "bin" / name).write_bytes(pickle.dumps(_Reduce(os.system, "true")))
    np.testing.assert_array_equal(data.load_dataset("cifar10", str(tmp_path / "bin")).x_test,
                                  from_py.x_test)


def test_cifar_binary_bad_files(tmp_path):
    rng = np.random.default_rng(7)
    batches = _write_py_dir(tmp_path / "py", rng)
    _write_bin_dir(tmp_path, batches)
    p = tmp_path / "data_batch_3.bin"
    good = p.read_bytes()
    p.write_bytes(good[:-5])
    with pytest.raises(DataError, match=r"data_batch_3\.bin: size 9214 bytes is not a multiple "
                                        r"of 3073"):
        data.load_dataset("cifar10", str(tmp_path))
    bad = bytearray(good)
    bad[2 * 3073] = 10  # label byte of the third record
    p.write_bytes(bytes(bad))
    with pytest.raises(DataError, match=r"data_batch_3\.bin: label 10 at index 2 is outside "
                                        r"\[0, 10\)"):
        data.load_dataset("cifar10", str(tmp_path))
    p.write_bytes(b"")
    with pytest.raises(DataError, match=r"data_batch_3\.bin: holds no images"):
        data.load_dataset("cifar10", str(tmp_path))
    p.write_bytes(good)
    os.remove(tmp_path / "test_batch.bin")
    with pytest.raises(DataError, match=r"missing file: .*test_batch\.bin"):
        data.load_dataset("cifar10", str(tmp_path))


# ---------------------------------------------------------------- 1b. CLI says what it reads

def test_cli_notes_dataset_and_dir_taken_from_the_checkpoint(tmp_path, capsys):
    from gloro_core.cli import main
    from gloro_core.train import TrainConfig, train

    src = tmp_path / "cifar"
    _write_py_dir(src, np.random.default_rng(8), n=4)
    run = tmp_path / "run"
    train(TrainConfig(dataset="cifar10", data_dir=str(src), arch="d(8)", epochs=1, batch=16,
                      power_iters=1, eps=0.1, out=str(run), progress=False, augment=False,
                      lipschitz_max_iter=50, val=4), log=lambda *a, **k: None)
    ckpt = str(run / "best.npz")
    assert main(["certify", ckpt, "--json"]) == 0
    err = capsys.readouterr().err
    assert err == (f"note: reading cifar10 from {src} (dataset and data_dir saved in the "
                   f"checkpoint {ckpt})\n")
    assert main(["certify", ckpt, "--json", "--dataset", "cifar10"]) == 0
    assert capsys.readouterr().err == (f"note: reading cifar10 from {src} (data_dir saved in "
                                       f"the checkpoint {ckpt})\n")
    assert main(["certify", ckpt, "--json", "--dataset", "cifar10", "--data-dir", str(src)]) == 0
    assert "note:" not in capsys.readouterr().err


# ---------------------------------------------------------------- 2. class count from the dataset

def _idx(arr, magic):
    return struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + \
        arr.astype(np.uint8).tobytes()


def _write_idx_dir(d, n_train=6, n_test=4, train_labels=None):
    rng = np.random.default_rng(9)
    labs = {"train": rng.integers(0, 10, n_train) if train_labels is None else train_labels,
            "t10k": rng.integers(0, 10, n_test)}
    for s, lab in labs.items():
        imgs = rng.integers(0, 256, (len(lab), 28, 28), dtype=np.uint8)
        (d / f"{s}-images-idx3-ubyte").write_bytes(_idx(imgs, 2051))
        (d / f"{s}-labels-idx1-ubyte").write_bytes(_idx(np.asarray(lab), 2049))


def test_idx_class_count_is_the_datasets_own(tmp_path):
    _write_idx_dir(tmp_path, train_labels=np.array([0, 1, 2, 255, 4, 255]))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: label 255 at index 3 is "
                                        r"outside \[0, 10\) \(mnist has 10 classes\)"):
        data.load_dataset("mnist", str(tmp_path))
    _write_idx_dir(tmp_path, train_labels=np.array([0, 1, 2, 3, 4, 3]))
    assert data.load_dataset("kmnist", str(tmp_path)).num_classes == 10


def test_npy_class_count_is_the_datasets_own(tmp_path):
    rng = np.random.default_rng(10)
    np.save(tmp_path / "x_train.npy", rng.random((4, 3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "x_test.npy", rng.random((2, 3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "y_train.npy", np.array([0, 5, 10 ** 6, 1]))
    np.save(tmp_path / "y_test.npy", np.array([3, 1]))
    with pytest.raises(DataError, match=r"y_train\.npy: label 1000000 at index 2 is outside "
                                        r"\[0, 200\) \(tiny-imagenet has 200 classes\)"):
        data.load_dataset("tiny-imagenet", str(tmp_path))
    # checked before the cast to int64, which would wrap this one to -1
    np.save(tmp_path / "y_train.npy", np.array([0, 2 ** 64 - 1, 1, 1], dtype=np.uint64))
    with pytest.raises(DataError, match=r"y_train\.npy: label 18446744073709551615 at index 1"):
        data.load_dataset("tiny-imagenet", str(tmp_path))
    np.save(tmp_path / "y_train.npy", np.array([0, 5, 7, 1]))
    assert data.load_dataset("tiny-imagenet", str(tmp_path)).num_classes == 200


# ---------------------------------------------------------------- 3. bad datasets

def test_no_images_is_an_error(tmp_path):
    _write_idx_dir(tmp_path, n_train=0)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: holds no images"):
        data.load_dataset("mnist", str(tmp_path))
    _write_idx_dir(tmp_path, n_test=0)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: holds no images"):
        data.load_dataset("mnist", str(tmp_path))
    npy = tmp_path / "npy"
    npy.mkdir()
    for split in ("train", "test"):
        np.save(npy / f"x_{split}.npy", np.zeros((0 if split == "train" else 2, 8, 8, 3), np.uint8))
        np.save(npy / f"y_{split}.npy", np.zeros(0 if split == "train" else 2, np.int64))
    with pytest.raises(DataError, match=r"x_train\.npy: holds no images \(shape \(0, 8, 8, 3\)\)"):
        data.load_dataset("tiny-imagenet", str(npy))
    cifar = tmp_path / "cifar"
    rng = np.random.default_rng(11)
    batches = _write_py_dir(cifar, rng)
    empty = {**batches["test_batch"], b"data": np.zeros((0, 3072), np.uint8), b"labels": [],
             b"filenames": []}
    (cifar / "test_batch").write_bytes(pickle.dumps(empty, protocol=4))
    with pytest.raises(DataError, match=r"test_batch: holds no images"):
        data.load_dataset("cifar10", str(cifar))


def _npy_dir(d, x_train, y_train=None, x_test=None):
    np.save(d / "x_train.npy", x_train)
    np.save(d / "y_train.npy", np.zeros(len(x_train), np.int64) if y_train is None else y_train)
    x_test = np.zeros((2, 3, 8, 8), np.uint8) if x_test is None else x_test
    np.save(d / "x_test.npy", x_test)
    np.save(d / "y_test.npy", np.zeros(len(x_test), np.int64))


@pytest.mark.parametrize("shape, msg", [
    ((4, 8, 8, 5), r"x_train\.npy: images must have 1 or 3 channels, NCHW or NHWC; got shape "
                   r"\(4, 8, 8, 5\)"),
    ((4, 5, 8, 8), r"x_train\.npy: images must have 1 or 3 channels.*\(4, 5, 8, 8\)"),
    ((4, 3, 8, 3), r"x_train\.npy: ambiguous image layout \(4, 3, 8, 3\)"),
    ((4, 1, 8, 1), r"x_train\.npy: ambiguous image layout \(4, 1, 8, 1\)"),
    ((4, 3, 8), r"x_train\.npy: images must be 4-D"),
])
def test_npy_layout_is_decided_not_guessed(tmp_path, shape, msg):
    # test images alike, so that only the layout can be at fault (a 5-channel NHWC array
    # used to load as NCHW with 8 channels)
    _npy_dir(tmp_path, np.zeros(shape, np.uint8), x_test=np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match=msg):
        data.load_dataset("tiny-imagenet", str(tmp_path))


def test_npy_layouts_accepted(tmp_path):
    rng = np.random.default_rng(12)
    for x in (rng.integers(0, 256, (3, 8, 6, 1), dtype=np.uint8),  # NHWC grey
              rng.integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)):  # NHWC rgb
        _npy_dir(tmp_path, x, x_test=x[:2])
        got = data.load_dataset("tiny-imagenet", str(tmp_path)).x_train
        np.testing.assert_array_equal(got, x.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    x = rng.random((3, 1, 8, 6))  # NCHW grey, float64
    _npy_dir(tmp_path, x, x_test=x[:2])
    np.testing.assert_array_equal(data.load_dataset("tiny-imagenet", str(tmp_path)).x_train,
                                  x.astype(np.float32))


def test_float_labels_are_refused(tmp_path):
    rng = np.random.default_rng(13)
    _write_py_dir(tmp_path, rng)
    d = _batch_dict(3, rng, labels=[1, 1.7, 2])
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: labels must be integers, found float "
                                        r"1\.7 at index 1"):
        data.load_dataset("cifar10", str(tmp_path))
    d = _batch_dict(3, rng, labels=[1, 2, True])
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(DataError, match=r"labels must be integers, found bool True at index 2"):
        data.load_dataset("cifar10", str(tmp_path))
    d = _batch_dict(3, rng, labels=[1, 2, 12])
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: label 12 at index 2 is outside"):
        data.load_dataset("cifar10", str(tmp_path))
    # the .npy loader takes integer arrays only (it already did)
    npy = tmp_path / "npy"
    npy.mkdir()
    _npy_dir(npy, np.zeros((3, 3, 8, 8), np.uint8), np.array([1.0, 1.7, 2.0]))
    with pytest.raises(DataError, match=r"y_train\.npy: labels must be a 1-D integer array, "
                                        r"got float64"):
        data.load_dataset("tiny-imagenet", str(npy))


@pytest.mark.parametrize("bad, msg", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_float_pixels_nan_inf_named(tmp_path, bad, msg):
    x = np.full((3, 8, 8, 3), 0.5, np.float32)
    x[1, 2, 4, 0] = bad
    _npy_dir(tmp_path, x)
    with pytest.raises(DataError, match=r"x_train\.npy: contains " + msg +
                       r" at index \(1, 2, 4, 0\)$"):
        data.load_dataset("tiny-imagenet", str(tmp_path))


def test_float_pixels_out_of_range_and_dtypes(tmp_path):
    x = np.full((3, 3, 8, 8), 0.5, np.float64)
    x[2, 1, 0, 5] = 1.5
    _npy_dir(tmp_path, x)
    with pytest.raises(DataError, match=r"x_train\.npy: float images must lie in \[0, 1\]; "
                                        r"found 1\.5 at index \(2, 1, 0, 5\)"):
        data.load_dataset("tiny-imagenet", str(tmp_path))
    _npy_dir(tmp_path, np.full((3, 3, 8, 8), 7, np.int64))
    with pytest.raises(DataError, match=r"x_train\.npy: images must be uint8 \(0\.\.255\) or "
                                        r"float \(0\.\.1\), got dtype int64"):
        data.load_dataset("tiny-imagenet", str(tmp_path))
    np.savez(tmp_path / "x_train.npy", a=np.zeros(3))
    os.replace(tmp_path / "x_train.npy.npz", tmp_path / "x_train.npy")
    with pytest.raises(DataError, match=r"x_train\.npy: an \.npz archive, not a \.npy array"):
        data.load_dataset("tiny-imagenet", str(tmp_path))


# ---------------------------------------------------------------- 4. corrupt files

def test_corrupt_gzip_idx_is_a_data_error(tmp_path):
    _write_idx_dir(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(gzip.compress(p.read_bytes()))
    raw[12] ^= 0xFF  # inside the deflate stream: zlib.error, not an OSError
    os.remove(p)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: corrupt or truncated "
                                        r"gzip data \(Error -3 while decompressing"):
        data.load_dataset("mnist", str(tmp_path))


def test_gzip_bomb_is_refused_without_unpacking_it(tmp_path, monkeypatch):
    """A small .gz that unpacks past the limit is refused after reading only the limit
    (the limit is lowered here: the real one, 1 GiB, would take a while to reach)."""
    import tracemalloc

    _write_idx_dir(tmp_path)
    os.remove(tmp_path / "train-images-idx3-ubyte")
    bomb = gzip.compress(struct.pack(">IIII", 2051, 100000, 28, 28) + bytes(64 << 20), 9)
    assert len(bomb) < 100_000
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    monkeypatch.setattr(data, "MAX_GUNZIP_BYTES", 1 << 20)
    tracemalloc.start()
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: gzip data unpacks to more "
                                        r"than 1048576 bytes"):
        data.load_dataset("mnist", str(tmp_path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_idx_dims_whose_int64_product_wraps(tmp_path):
    """2^31 * 2^31 * 4 = 2^64, which np.prod(int64) made 0: an empty body then passed."""
    _write_idx_dir(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, 2 ** 31,
                                                                   2 ** 31, 4))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated: header promises "
                                        r"18446744073709551616 bytes"):
        data.load_dataset("mnist", str(tmp_path))


# ---------------------------------------------------------------- 5. crafted pickles that
# run no code but crash or exhaust the reader (a segfault, a huge memo, exponential repr)

_READER = """
import resource, sys, time
from gloro_core.data import _read_cifar_batch, DataError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    _read_cifar_batch(sys.argv[1])
    print("LOADED")
except DataError as exc:
    print("DataError:", str(exc)[:300])
print("seconds", time.perf_counter() - t)
print("grew_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def _read_in_subprocess(path, timeout=60):
    """Read a batch in a child: a segfault or a hang shows as a failure, not a dead pytest."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(data.__file__)))
    try:
        proc = subprocess.run([sys.executable, "-c", _READER, str(path)], cwd=root,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": root})
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} took over {timeout} s")
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    return out.get("DataError:", out.get("LOADED")), float(out["seconds"]), int(out["grew_kb"])


def _batch_prefix(n=2):
    """A protocol-4 batch with its dict still open on the stack, ready for more items."""
    raw = pickle.dumps({b"data": np.zeros((n, 3072), np.uint8)}, protocol=4)
    assert raw.endswith(b"s.")
    return raw[:-1]


def _labels_holding(item: bytes) -> bytes:
    """labels = [0, item]: SHORT_BINBYTES key, EMPTY_LIST, APPEND x2, SETITEM, STOP."""
    return _batch_prefix() + b"C\x06labels]K\x00a" + item + b"as."


def test_deep_tuple_dict_key_is_refused_not_a_segfault(tmp_path):
    """S1: hashing a 200,000-deep tuple key overflowed the C stack (exit 139)."""
    p = tmp_path / "data_batch_1"
    p.write_bytes(b"\x80\x04}" + b"N" + b"\x85" * 200000 + b"K\x00s.")
    msg, seconds, _ = _read_in_subprocess(p)
    assert msg.startswith(f"{p}: pickle nests deeper than 16"), msg
    assert seconds < 1


def test_huge_memo_index_is_refused_before_allocating(tmp_path):
    """S2: LONG_BINPUT 2**25 made the C unpickler allocate a 557 MB memo (2**30: 16 GiB)."""
    p = tmp_path / "data_batch_1"
    for idx in (2 ** 25, 2 ** 32 - 1):
        p.write_bytes(b"\x80\x02}r" + struct.pack("<I", idx) + b".")
        msg, seconds, grew_kb = _read_in_subprocess(p)
        assert msg == f"{p}: pickle memo index {idx} at byte 3 is out of range", msg
        assert seconds < 1 and grew_kb < 32 * 1024, (seconds, grew_kb)
    # a GET of an entry never PUT is refused too (the C unpickler's error, said by us)
    p.write_bytes(b"\x80\x02}h\x07.")
    with pytest.raises(DataError, match=r"pickle reads memo entry 7, never stored"):
        data._read_cifar_batch(str(p))


def test_deeply_nested_label_is_a_data_error(tmp_path):
    """S3: a 200,000-deep tuple among the labels: the message's repr raised RecursionError."""
    p = tmp_path / "data_batch_1"
    p.write_bytes(_labels_holding(b"N" + b"\x85" * 200000))
    with pytest.raises(DataError, match=r"data_batch_1: pickle nests deeper than 16 at byte"):
        data._read_cifar_batch(str(p))
    # 16 deep in all (dict > list > 14 tuples) passes the scan, then is refused as a
    # label, in a short message
    p.write_bytes(_labels_holding(b"N" + b"\x85" * 14))
    with pytest.raises(DataError, match=r"labels must be integers, found tuple \(\(\(\.\.\.\),\),\) "
                                        r"at index 1$"):
        data._read_cifar_batch(str(p))


def test_dag_labels_and_keys_are_refused_quickly(tmp_path):
    """S4: (x, x) pairs, 40 deep: repr and hash of that DAG take 2**40 steps."""
    d = 40
    p = tmp_path / "data_batch_1"
    dup_dag = b")" + b"2\x86" * d  # EMPTY_TUPLE, then d times DUP + TUPLE2
    # the same DAG through the memo: BINPUT i, BINGET i, BINGET i, TUPLE2
    memo_dag = b")" + b"".join(b"q" + bytes([i]) + (b"h" + bytes([i])) * 2 + b"\x86"
                               for i in range(16, 16 + d))
    cases = [(_labels_holding(dup_dag), r"pickle opcode DUP at byte \d+: a CIFAR-10 batch"),
             (_batch_prefix() + dup_dag + b"K\x00s.", r"pickle opcode DUP"),
             (_labels_holding(memo_dag), r"pickle shares a tuple of \d+ nodes at byte \d+"),
             (_batch_prefix() + memo_dag + b"K\x00s.", r"pickle shares a tuple of \d+ nodes")]
    for raw, refused in cases:
        p.write_bytes(raw)
        msg, seconds, _ = _read_in_subprocess(p, timeout=30)
        assert re.match(re.escape(f"{p}: ") + refused, msg), msg
        assert seconds < 0.5, seconds


@pytest.mark.parametrize("obj, refused2, refused4", [
    (frozenset([1]), r"refused global __builtin__\.frozenset", r"pickle opcode FROZENSET at byte"),
    ({1}, r"refused global __builtin__\.set", r"pickle opcode EMPTY_SET at byte"),
])
def test_opcodes_a_batch_never_holds_are_refused(tmp_path, obj, refused2, refused4):
    p = tmp_path / "data_batch_1"
    for protocol, refused in ((2, refused2), (4, refused4), (5, refused4)):
        p.write_bytes(pickle.dumps({**_batch_dict(2, np.random.default_rng(14)),
                                    b"labels": obj}, protocol=protocol))
        with pytest.raises(DataError, match=r"data_batch_1: " + refused):
            data._read_cifar_batch(str(p))
    for op in (b"\x81", b"i__main__\nX\n", b"\x92", b"0", b"P0\n"):  # NEWOBJ INST NEWOBJ_EX POP PERSID
        p.write_bytes(_batch_prefix() + op + b"s.")
        with pytest.raises(DataError, match=r"data_batch_1: pickle opcode [A-Z_]+ at byte \d+: "
                                            r"a CIFAR-10 batch never holds it"):
            data._read_cifar_batch(str(p))


def test_messages_about_file_values_stay_short(tmp_path):
    """A 10 MB label, or keys holding one, is named in a bounded message, quickly."""
    big = b"x" * 10_000_000
    p = tmp_path / "data_batch_1"
    p.write_bytes(_labels_holding(b"B" + struct.pack("<I", len(big)) + big))
    t = time.perf_counter()
    with pytest.raises(DataError, match=r"found bytes b'x{40}'\.\.\. at index 1$") as exc:
        data._read_cifar_batch(str(p))
    assert time.perf_counter() - t < 2 and len(str(exc.value)) < 200 + len(str(p))
    # no 'labels' entry: the keys are listed, each cut short
    p.write_bytes(b"\x80\x04}B" + struct.pack("<I", len(big)) + big + b"K\x00s.")
    with pytest.raises(DataError, match=r"missing 'data' or 'labels' entry \(keys: "
                                        r"\[b'x{40}'\.\.\.\]\)$"):
        data._read_cifar_batch(str(p))

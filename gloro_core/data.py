"""Datasets: loaders for real data on disk, a synthetic dataset, seeded minibatches.

Every loader returns a :class:`Dataset` holding

- ``x_train``, ``x_test``: float32, NCHW, pixels in [0, 1];
- ``y_train``, ``y_test``: int64 class indices in [0, num_classes).

Supported layouts (from a directory the user names):

- MNIST-format IDX (MNIST, Fashion-MNIST, KMNIST): ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
  each optionally gzipped (``.gz``). ``test-`` is accepted in place of ``t10k-``.
- CIFAR-10 python batches: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``
  (optionally inside a ``cifar-10-batches-py`` subdirectory).
- Tiny-ImageNet as NumPy arrays: ``x_train.npy``, ``y_train.npy``, ``x_test.npy``,
  ``y_test.npy``; images NHWC or NCHW, uint8 (0..255) or float (already in [0, 1]).
- ``synthetic``: made on the fly from a seed (class templates plus noise).

Broken files (missing, truncated, bad magic number, image/label count mismatch)
raise :class:`DataError` (a ``ValueError``) naming the file.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct

import numpy as np

DEFAULT_DIRS = {
    # Debian package dataset-fashion-mnist installs here.
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist"],
    "kmnist": ["/usr/share/datasets/kmnist"],
    "cifar10": ["/usr/share/datasets/cifar10", "/usr/share/datasets/cifar-10"],
    "tiny-imagenet": ["/usr/share/datasets/tiny-imagenet"],
}
DATASETS = ("synthetic", "mnist", "fashion-mnist", "kmnist", "cifar10", "tiny-imagenet")
ALIASES = {
    "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10",
    "cifar": "cifar10", "tiny_imagenet": "tiny-imagenet", "tinyimagenet": "tiny-imagenet",
    "k-mnist": "kmnist",
}
IDX_MAGIC_IMAGES = 2051  # 0x00000803: unsigned byte, 3 dims
IDX_MAGIC_LABELS = 2049  # 0x00000801: unsigned byte, 1 dim


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file."""


@dataclasses.dataclass
class Dataset:
    """Train/test arrays. x: (N, C, H, W) float32 in [0, 1]; y: (N,) int64."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x_train.shape[1:])

    def subset(self, limit: int | None, test_limit: int | None = None) -> "Dataset":
        """First ``limit`` train points and first ``test_limit`` (default: ``limit``) test points."""
        if limit is None and test_limit is None:
            return self
        if test_limit is None:
            test_limit = limit
        if limit is not None and limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        if test_limit is not None and test_limit <= 0:
            raise ValueError(f"test limit must be positive, got {test_limit}")
        return Dataset(self.name, self.x_train[:limit], self.y_train[:limit],
                       self.x_test[:test_limit], self.y_test[:test_limit], self.num_classes)

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 4:
                raise ValueError(f"{self.name}: x_{split} must be NCHW, got shape {x.shape}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: y_{split} shape {y.shape} does not match "
                                 f"x_{split} shape {x.shape}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train images {self.x_train.shape[1:]} and test "
                             f"images {self.x_test.shape[1:]} differ in shape")


# ---------------------------------------------------------------- IDX (MNIST family)

def _read_bytes(path: str) -> bytes:
    """Whole file, gunzipped if it is gzip (by magic bytes, not by name)."""
    if not os.path.isfile(path):
        raise DataError(f"missing file: {path}")
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, gzip.BadGzipFile) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    return raw


def read_idx(path: str, expect_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzipped) of unsigned bytes -> uint8 array of its dims."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated (only {len(raw)} bytes, no IDX header)")
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    magic = struct.unpack(">I", raw[:4])[0]
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08x} "
                        "(expected unsigned-byte data, 0x0000080N)")
    if expect_magic is not None and magic != expect_magic:
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08x}, "
                        f"expected 0x{expect_magic:08x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header < count:
        raise DataError(f"{path}: truncated: header promises {count} bytes of data "
                        f"(dims {dims}), file holds {len(raw) - header}")
    if len(raw) - header > count:
        raise DataError(f"{path}: {len(raw) - header - count} unexpected trailing bytes "
                        f"after data of dims {dims}")
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(dims)


def _find(directory: str, stems: list[str]) -> str:
    """First existing ``stem`` or ``stem.gz`` in directory; else the first candidate (to report)."""
    for stem in stems:
        for name in (stem, stem + ".gz"):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    return os.path.join(directory, stems[0] + ".gz")


def _idx_split(directory: str, prefixes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    img_path = _find(directory, [p + "-images-idx3-ubyte" for p in prefixes]
                     + [p + "-images.idx3-ubyte" for p in prefixes])
    lab_path = _find(directory, [p + "-labels-idx1-ubyte" for p in prefixes]
                     + [p + "-labels.idx1-ubyte" for p in prefixes])
    images = read_idx(img_path, IDX_MAGIC_IMAGES)
    labels = read_idx(lab_path, IDX_MAGIC_LABELS)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"count mismatch: {img_path} holds {images.shape[0]} images but "
                        f"{lab_path} holds {labels.shape[0]} labels")
    x = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    return x, labels.astype(np.int64)


def load_idx_dir(directory: str, name: str = "mnist") -> Dataset:
    """MNIST-format directory -> Dataset with x (N, 1, 28, 28) float32 in [0, 1]."""
    if not os.path.isdir(directory):
        raise DataError(f"{name}: data directory not found: {directory}")
    x_tr, y_tr = _idx_split(directory, ["train"])
    x_te, y_te = _idx_split(directory, ["t10k", "test"])
    num_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    return Dataset(name, x_tr, y_tr, x_te, y_te, max(num_classes, 10))


# ---------------------------------------------------------------- CIFAR-10

def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (x (N, 3, 32, 32) float32, y (N,) int64)."""
    if not os.path.isfile(path):
        raise DataError(f"missing file: {path}")
    # CIFAR-10 ships as pickled dicts; only these user-named files are unpickled.
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError) as exc:
        raise DataError(f"{path}: not a readable CIFAR-10 batch "
                        f"(truncated or corrupt pickle: {exc})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, found {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: missing 'data' or 'labels' entry (keys: {list(d)})")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be uint8 of shape (N, 3072), "
                        f"got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(f"count mismatch in {path}: {data.shape[0]} images but "
                        f"{labels.shape[0] if labels.ndim == 1 else labels.shape} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
    return x, labels.astype(np.int64)


def load_cifar10_dir(directory: str) -> Dataset:
    """CIFAR-10 python-batch directory -> Dataset with x (N, 3, 32, 32)."""
    if not os.path.isdir(directory):
        raise DataError(f"cifar10: data directory not found: {directory}")
    sub = os.path.join(directory, "cifar-10-batches-py")
    if not os.path.isfile(os.path.join(directory, "test_batch")) and os.path.isdir(sub):
        directory = sub
    parts = [_read_cifar_batch(os.path.join(directory, f"data_batch_{i}")) for i in range(1, 6)]
    x_te, y_te = _read_cifar_batch(os.path.join(directory, "test_batch"))
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    return Dataset("cifar10", x_tr, y_tr, x_te, y_te, 10)


# ---------------------------------------------------------------- Tiny-ImageNet (.npy)

def _load_npy(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"missing file: {path}")
    try:
        return np.load(path, allow_pickle=False, mmap_mode=None)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array (truncated or corrupt: {exc})") \
            from None


def _images_to_nchw(x: np.ndarray, path: str) -> np.ndarray:
    if x.ndim != 4:
        raise DataError(f"{path}: images must be 4-D (NHWC or NCHW), got shape {x.shape}")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise DataError(f"{path}: float images must lie in [0, 1] "
                        f"(found min {np.nanmin(x)}, max {np.nanmax(x)})")
    return x


def load_npy_dir(directory: str, name: str = "tiny-imagenet") -> Dataset:
    """Directory with x_train.npy, y_train.npy, x_test.npy, y_test.npy -> Dataset."""
    if not os.path.isdir(directory):
        raise DataError(f"{name}: data directory not found: {directory}")
    arrays = {}
    for split in ("train", "test"):
        xp = os.path.join(directory, f"x_{split}.npy")
        yp = os.path.join(directory, f"y_{split}.npy")
        x = _images_to_nchw(_load_npy(xp), xp)
        y = _load_npy(yp)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{yp}: labels must be a 1-D integer array, got {y.dtype} {y.shape}")
        if y.shape[0] != x.shape[0]:
            raise DataError(f"count mismatch: {xp} holds {x.shape[0]} images but "
                            f"{yp} holds {y.shape[0]} labels")
        if y.size and y.min() < 0:
            raise DataError(f"{yp}: negative label {y.min()}")
        arrays[split] = (x, y.astype(np.int64))
    num_classes = int(max(arrays["train"][1].max(initial=0), arrays["test"][1].max(initial=0))) + 1
    if name == "tiny-imagenet":
        num_classes = max(num_classes, 200)
    return Dataset(name, *arrays["train"], *arrays["test"], num_classes)


# ---------------------------------------------------------------- synthetic

def make_synthetic(n_train: int = 2048, n_test: int = 512, input_shape=(1, 28, 28),
                   num_classes: int = 10, noise: float = 0.15, seed: int = 0) -> Dataset:
    """Learnable synthetic data: one smooth random template per class plus pixel noise.

    Templates are separated by a wide l2 margin, so a small net learns them quickly and
    can certify a useful fraction at small eps. Same seed -> same arrays.
    """
    if len(input_shape) != 3 or min(input_shape) <= 0:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    c, h, w = input_shape
    # Coarse random patterns upsampled: smooth blobs, like digits more than white noise.
    gh, gw = max(2, h // 4), max(2, w // 4)
    coarse = rng.random((num_classes, c, gh, gw))
    ri = np.minimum((np.arange(h) * gh) // h, gh - 1)
    ci = np.minimum((np.arange(w) * gw) // w, gw - 1)
    templates = (coarse[:, :, ri][:, :, :, ci] > 0.5).astype(np.float64) * 0.8 + 0.1

    def draw(n):
        y = rng.integers(0, num_classes, size=n)
        x = templates[y] + noise * rng.standard_normal((n, c, h, w))
        return np.clip(x, 0.0, 1.0).astype(np.float32), y.astype(np.int64)

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return Dataset("synthetic", x_tr, y_tr, x_te, y_te, num_classes)


# ---------------------------------------------------------------- entry point

def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return key


def resolve_dir(name: str, data_dir: str | None) -> str:
    """The directory to read ``name`` from: ``data_dir`` if given, else a known default."""
    if data_dir:
        return data_dir
    for d in DEFAULT_DIRS.get(name, []):
        if os.path.isdir(d):
            return d
    hint = (" (install it with `apt-get install dataset-fashion-mnist`)"
            if name == "fashion-mnist" else "")
    raise DataError(f"{name}: no --data-dir given and none of the default locations "
                    f"{DEFAULT_DIRS.get(name, [])} exists{hint}")


def load_dataset(name: str, data_dir: str | None = None, *, seed: int = 0,
                 synthetic_shape=(1, 28, 28), synthetic_n=(2048, 512),
                 num_classes: int | None = None) -> Dataset:
    """Load dataset ``name`` (see module doc) from ``data_dir`` or its default location."""
    key = canonical_name(name)
    if key == "synthetic":
        return make_synthetic(synthetic_n[0], synthetic_n[1], tuple(synthetic_shape),
                              num_classes or 10, seed=seed)
    directory = resolve_dir(key, data_dir)
    if key in ("mnist", "fashion-mnist", "kmnist"):
        return load_idx_dir(directory, key)
    if key == "cifar10":
        return load_cifar10_dir(directory)
    return load_npy_dir(directory, key)


def batches(n: int, batch_size: int, rng: np.random.Generator | None = None,
            drop_last: bool = False):
    """Yield index arrays covering range(n) in minibatches; shuffled when ``rng`` is given."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """Generator for (seed, epoch, stream): resuming at an epoch reproduces its shuffling."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(stream)]))

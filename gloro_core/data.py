"""Datasets: loaders for real data on disk, a synthetic dataset, seeded minibatches.

Every loader returns a :class:`Dataset` holding

- ``x_train``, ``x_test``: float32, NCHW, pixels in [0, 1];
- ``y_train``, ``y_test``: int64 class indices in [0, num_classes).

Supported layouts (from a directory the user names):

- MNIST-format IDX (MNIST, Fashion-MNIST, KMNIST): ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
  each optionally gzipped (``.gz``). ``test-`` is accepted in place of ``t10k-``.
- CIFAR-10, binary version (preferred when present): ``data_batch_1.bin`` ..
  ``data_batch_5.bin`` and ``test_batch.bin``, records of 1 label byte + 3072 pixel bytes
  (optionally inside a ``cifar-10-batches-bin`` subdirectory).
- CIFAR-10, python version: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``
  (optionally inside a ``cifar-10-batches-py`` subdirectory). These are pickles, read by
  a restricted unpickler that rebuilds only dicts, bytes/str, lists of ints and uint8
  arrays and calls no function of the file's choosing: a data file never executes code.
- Tiny-ImageNet as NumPy arrays: ``x_train.npy``, ``y_train.npy``, ``x_test.npy``,
  ``y_test.npy``; images NHWC or NCHW with 1 or 3 channels, uint8 (0..255) or float
  (already in [0, 1]); labels an integer array.
- ``synthetic``: made on the fly from a seed (class templates plus noise).

The class count is the dataset's own (:data:`NUM_CLASSES`), never inferred from the
labels. Broken files (missing, truncated, corrupt gzip, bad magic number, no images,
image/label count mismatch, a label outside [0, num_classes), non-integer labels, NaN
pixels, an unknown image layout, a refused pickle global or opcode, a pickle nested
too deep) raise :class:`DataError` (a ``ValueError``) with one line naming the file.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import math
import os
import pickle
import pickletools
import reprlib
import struct
import zlib

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
# Each dataset's class count: the model's output width comes from here, not from the
# largest label (one stray label of 255 would otherwise make a 256-class model).
NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "kmnist": 10, "cifar10": 10,
               "tiny-imagenet": 200}


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

# A gzip file may expand ~1000x: decompress at most this much (the largest MNIST-family
# file, train images, is 47 MB unpacked).
MAX_GUNZIP_BYTES = 1 << 30


def _read_bytes(path: str) -> bytes:
    """Whole file, gunzipped if it is gzip (by magic bytes, not by name), to at most
    MAX_GUNZIP_BYTES unpacked (a DataError beyond: a small file must not fill memory)."""
    limit = MAX_GUNZIP_BYTES
    if not os.path.isfile(path):
        raise DataError(f"missing file: {path}")
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as gz:
                raw = gz.read(limit + 1)
        # zlib.error: a damaged deflate stream (not an OSError); EOFError: cut short.
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None
        if len(raw) > limit:
            raise DataError(f"{path}: gzip data unpacks to more than {limit} bytes "
                            f"(the limit for one data file); refusing it")
    return raw


def _check_labels(y: np.ndarray, num_classes: int, path: str, name: str) -> None:
    """Refuse the first label outside [0, num_classes); y: (N,) any integer dtype."""
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if bad.size:
        raise _label_error(path, int(bad[0]), int(y[bad[0]]), num_classes, name)


def _num_classes(name: str, num_classes: int | None) -> int:
    if num_classes is not None:
        return int(num_classes)
    if name not in NUM_CLASSES:
        raise ValueError(f"no known class count for dataset {name!r}: pass num_classes")
    return NUM_CLASSES[name]


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
    count = math.prod(dims)  # exact: an int64 product of 3 x 32-bit dims can wrap to 0
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


def _idx_split(directory: str, prefixes: list[str], num_classes: int,
               name: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (x (N, 1, H, W) float32 in [0, 1], y (N,) int64 in [0, num_classes))."""
    img_path = _find(directory, [p + "-images-idx3-ubyte" for p in prefixes]
                     + [p + "-images.idx3-ubyte" for p in prefixes])
    lab_path = _find(directory, [p + "-labels-idx1-ubyte" for p in prefixes]
                     + [p + "-labels.idx1-ubyte" for p in prefixes])
    images = read_idx(img_path, IDX_MAGIC_IMAGES)
    labels = read_idx(lab_path, IDX_MAGIC_LABELS)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"count mismatch: {img_path} holds {images.shape[0]} images but "
                        f"{lab_path} holds {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise DataError(f"{img_path}: holds no images (shape {images.shape})")
    _check_labels(labels, num_classes, lab_path, name)
    x = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    return x, labels.astype(np.int64)


def load_idx_dir(directory: str, name: str = "mnist", num_classes: int | None = None) -> Dataset:
    """MNIST-format directory -> Dataset with x (N, 1, 28, 28) float32 in [0, 1].

    ``num_classes`` defaults to the dataset's own (10 for the MNIST family).
    """
    num_classes = _num_classes(name, num_classes)
    if not os.path.isdir(directory):
        raise DataError(f"{name}: data directory not found: {directory}")
    x_tr, y_tr = _idx_split(directory, ["train"], num_classes, name)
    x_te, y_te = _idx_split(directory, ["t10k", "test"], num_classes, name)
    return Dataset(name, x_tr, y_tr, x_te, y_te, num_classes)


# ---------------------------------------------------------------- CIFAR-10

CIFAR_RECORD = 1 + 3072  # binary version: 1 label byte, then 1024 R, 1024 G, 1024 B bytes
_CIFAR_SPLITS = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class _Refused(Exception):
    """The restricted unpickler met something a CIFAR-10 batch never holds."""


class _ShortRepr(reprlib.Repr):
    """repr for values from a data file: bounded work and length whatever their size/shape."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxtuple, self.maxlist, self.maxdict = 2, 4, 4, 4
        self.maxset = self.maxfrozenset = self.maxdeque = self.maxarray = 4
        self.maxstring = self.maxother = self.maxlong = 40

    def repr_bytes(self, x, level):
        # reprlib has no bytes case: its fallback would repr the whole value first
        s = repr(bytes(x[:self.maxstring]))
        return s if len(x) <= self.maxstring else s + "..."

    repr_bytearray = repr_bytes

    def repr_int(self, x, level):
        # str() of an int past sys.get_int_max_str_digits() raises ValueError
        if x.bit_length() > 128:
            return f"<int of {x.bit_length()} bits>"
        return repr(x)


def _show(value) -> str:
    """Short repr of an untrusted value (never the whole of a big or deep object)."""
    try:
        return _ShortRepr().repr(value)
    except Exception:  # a stand-in's own repr cannot fail, but a message must not
        return f"<{type(value).__name__}>"


class _Allowed:
    """One global the restricted unpickler hands out, in place of the real object.

    pickle's BUILD could otherwise set attributes (``__defaults__`` ...) on what it is
    given, so state set on it is refused.
    """

    __slots__ = ("name", "fn")

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __setstate__(self, state):
        raise _Refused(f"pickle sets state on {self.name}")


class _Uint8Dtype:
    """What ``numpy.dtype('u1', ...)`` unpickles to; no other dtype can be made."""

    __slots__ = ()

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, ...): a plain uint8 has no
        # subarray and no fields (fields could hold object members).
        if (not isinstance(state, tuple) or len(state) < 5 or state[1] not in ("|", b"|")
                or any(v is not None for v in state[2:5])):
            raise _Refused(f"numpy dtype state {_show(state)} is not that of plain uint8")


class _PickledArray:
    """A uint8 array being unpickled: made empty by ``_reconstruct``, filled by BUILD once."""

    __slots__ = ("array",)

    def __init__(self, array=None):
        self.array = array

    def __setstate__(self, state):
        # ndarray state: ([version,] shape, dtype, is_fortran, raw bytes)
        if self.array is not None:
            raise _Refused("pickle sets the state of a numpy array twice")
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused(f"numpy array state {_show(state)} has an unknown form")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _uint8_array(raw, dtype, shape, "F" if fortran else "C")


def _uint8_array(raw, dtype, shape, order) -> np.ndarray:
    """uint8 array of ``shape`` from exactly prod(shape) bytes; nothing else is accepted."""
    if not isinstance(dtype, _Uint8Dtype):
        raise _Refused(f"numpy array with dtype {_show(dtype)} (only uint8 is read)")
    if (not isinstance(shape, tuple) or len(shape) > 8
            or not all(type(s) is int and s >= 0 for s in shape)):
        raise _Refused(f"numpy array shape {_show(shape)} is not a tuple of sizes")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != math.prod(shape):
        raise _Refused(f"numpy array of shape {_show(shape)} without its "
                       f"{_show(math.prod(shape))} bytes of data")
    if order not in ("C", "F"):
        raise _Refused(f"numpy array order {_show(order)}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape, order=order)


def _np_reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY or typecode not in ("b", b"b"):
        raise _Refused(f"numpy _reconstruct of {_show(subtype)} (only numpy.ndarray)")
    return _PickledArray()


def _np_dtype(spec, align=False, copy=True):
    if spec not in ("u1", b"u1"):
        raise _Refused(f"numpy dtype {_show(spec)} (only uint8 arrays are read)")
    return _Uint8Dtype()


def _np_frombuffer(buf, dtype, shape, order):
    # numpy's pickle of a contiguous array under protocol 5 (pickle's highest)
    return _PickledArray(_uint8_array(buf, dtype, shape, order))


def _latin1_encode(text, encoding):
    # Python 3 writes bytes under protocols 0-2 as _codecs.encode(text, 'latin1'):
    # allowed for that and nothing else (other codecs decompress, transform, ...).
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with {type(text).__name__}, {_show(encoding)}")
    return text.encode("latin1")


def _no_call(*args):
    raise _Refused("pickle calls numpy.ndarray directly")


_NDARRAY = _Allowed("numpy.ndarray", _no_call)
# The only globals a CIFAR-10 batch names (its uint8 array; bytes under protocol 2 from
# Python 3). Each maps to a checking stand-in above, never to the real object.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _Allowed("numpy _reconstruct", _np_reconstruct),
    ("numpy._core.multiarray", "_reconstruct"): _Allowed("numpy _reconstruct", _np_reconstruct),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Allowed("numpy.dtype", _np_dtype),
    ("numpy.core.numeric", "_frombuffer"): _Allowed("numpy _frombuffer", _np_frombuffer),
    ("numpy._core.numeric", "_frombuffer"): _Allowed("numpy _frombuffer", _np_frombuffer),
    ("_codecs", "encode"): _Allowed("_codecs.encode", _latin1_encode),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only dicts, bytes/str, lists of ints and uint8 arrays."""

    def find_class(self, module, name):
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise _Refused(f"refused global {module}.{name}: a CIFAR-10 batch holds only "
                           "dicts, bytes, lists of ints and uint8 arrays, and no data file "
                           "may run code")
        return allowed


# Pre-scan of a CIFAR batch's opcodes (pickletools.genops decodes, executes nothing).
# The unpickler runs no code of the file's choosing, but crafted opcodes could still
# crash or exhaust it: a 200,000-deep tuple used as a dict key overflows the C stack in
# its hash (a segfault), LONG_BINPUT 2**30 makes the C unpickler allocate a 16 GiB memo,
# and DUP/GET can build a DAG whose repr or hash takes 2**depth steps. So only the
# opcodes pickle.dump writes for a CIFAR batch under protocols 0-5 (and Python 2's
# files) are allowed, nesting is bounded, memo indices are bounded by the file's own
# size, and the memo may share only small objects.
_PICKLE_MAX_DEPTH = 16  # a batch nests ~4 deep (dict > numpy state > shape tuple)
_PICKLE_MAX_SHARED = 64  # expanded nodes a memo GET may share (numpy shares (0,), b"b")
# push one value holding no other object
_LEAF_OPS = frozenset({
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1",
    "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
    "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "BYTEARRAY8"})
_EMPTY_OPS = {"EMPTY_TUPLE": "tuple", "EMPTY_LIST": "list", "EMPTY_DICT": "dict"}
_FROM_MARK_OPS = {"TUPLE": "tuple", "LIST": "list", "DICT": "dict"}
_TUPLE_N_OPS = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})


class _Value:
    """What the scan knows of one stack value: its kind, nesting depth, expanded size."""

    __slots__ = ("kind", "depth", "size")

    def __init__(self, kind, depth=0, size=1):
        # kind: "leaf" (number, str, bytes), "obj" (a global or what REDUCE made),
        # "tuple", "list" or "dict"
        self.kind, self.depth, self.size = kind, depth, size


def _scan_cifar_pickle(raw: bytes) -> None:
    """Raise _Refused if ``raw`` holds an opcode or shape no CIFAR batch pickle has."""
    stack: list = []
    marks: list[int] = []
    memo: dict[int, _Value] = {}

    def pop(n=1):
        if len(stack) - (marks[-1] if marks else 0) < n:
            raise _Refused("malformed pickle: stack underflow")
        out = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return out

    def pop_mark():
        if not marks:
            raise _Refused("malformed pickle: no MARK")
        start = marks.pop()
        out = stack[start:]
        del stack[start:]
        return out

    def container(kind, items, pos):
        v = _Value(kind, 1 + max((x.depth for x in items), default=0),
                   1 + sum(x.size for x in items))
        if v.depth > _PICKLE_MAX_DEPTH:
            raise _Refused(f"pickle nests deeper than {_PICKLE_MAX_DEPTH} at byte {pos}")
        return v

    def add_to(target, kind, items, pos):
        if target.kind != kind:
            raise _Refused(f"pickle adds items to a {target.kind}, not a {kind}, at byte {pos}")
        grown = container(kind, items, pos)  # the items as if in a fresh container
        target.depth = max(target.depth, grown.depth)
        target.size += grown.size - 1

    nops = 0
    for op, arg, pos in pickletools.genops(raw):
        nops += 1
        name = op.name
        if name in _LEAF_OPS:
            stack.append(_Value("leaf"))
        elif name == "GLOBAL":
            stack.append(_Value("obj"))
        elif name == "STACK_GLOBAL":
            if any(v.kind != "leaf" for v in pop(2)):
                raise _Refused(f"malformed pickle: STACK_GLOBAL at byte {pos}")
            stack.append(_Value("obj"))
        elif name in _EMPTY_OPS:
            stack.append(_Value(_EMPTY_OPS[name]))
        elif name == "MARK":
            marks.append(len(stack))
        elif name in _FROM_MARK_OPS:
            stack.append(container(_FROM_MARK_OPS[name], pop_mark(), pos))
        elif name in _TUPLE_N_OPS:
            stack.append(container("tuple", pop(_TUPLE_N_OPS[name]), pos))
        elif name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS"):
            items = {"APPEND": pop, "SETITEM": lambda: pop(2)}.get(name, pop_mark)()
            target, = pop()
            add_to(target, "list" if name.startswith("APPEND") else "dict", items, pos)
            stack.append(target)
        elif name == "REDUCE":
            fn, args = pop(2)
            if fn.kind != "obj" or args.kind != "tuple":
                raise _Refused(f"pickle calls a {fn.kind} with a {args.kind} at byte {pos}")
            stack.append(_Value("obj"))
        elif name == "BUILD":
            pop()  # the state: its own nesting was checked when it was built
            if not stack or stack[-1].kind != "obj":
                raise _Refused(f"pickle sets state on a non-object at byte {pos}")
        elif name in _PUT_OPS:
            idx = len(memo) if name == "MEMOIZE" else arg
            # a pickler numbers its memo 0, 1, 2 ...: a larger index only makes the C
            # unpickler allocate a memo of that size (LONG_BINPUT 2**30: 16 GiB)
            if not 0 <= idx <= nops or not stack:
                raise _Refused(f"pickle memo index {_show(idx)} at byte {pos} is out of range")
            memo[idx] = stack[-1]
        elif name in _GET_OPS:
            v = memo.get(arg)
            if v is None:
                raise _Refused(f"pickle reads memo entry {_show(arg)}, never stored, at byte {pos}")
            # sharing a list/dict, or a big tuple, is what makes a DAG whose repr and
            # hash take time exponential in its depth; batches share only globals,
            # strings, dtypes and tiny tuples
            if v.kind in ("list", "dict") or v.size > _PICKLE_MAX_SHARED:
                raise _Refused(f"pickle shares a {v.kind} of {v.size} nodes at byte {pos} "
                               "(a CIFAR-10 batch shares no list, dict or big tuple)")
            stack.append(v)
        elif name in ("PROTO", "FRAME", "STOP"):
            pass
        else:  # DUP, POP, INST/OBJ/NEWOBJ, sets, extension codes, persistent ids, buffers
            raise _Refused(f"pickle opcode {name} at byte {pos}: a CIFAR-10 batch never "
                           "holds it")


def _label_error(path: str, i: int, value, num_classes: int, name: str) -> DataError:
    return DataError(f"{path}: label {_show(value)} at index {i} is outside [0, {num_classes}) "
                     f"({name} has {num_classes} classes)")


def _cifar_xy(data: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """data (N, 3072) uint8, channel-major -> (x (N, 3, 32, 32) float32, y (N,) int64)."""
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
    return x, np.asarray(labels, dtype=np.int64)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (x (N, 3, 32, 32) float32, y (N,) int64)."""
    if not os.path.isfile(path):
        raise DataError(f"missing file: {path}")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        try:
            _scan_cifar_pickle(raw)
        except (ValueError, struct.error, EOFError, OverflowError) as exc:
            # genops' own complaint: unknown opcode, truncated argument ...
            raise _Refused(f"not a readable CIFAR-10 batch (corrupt pickle: {exc})") from None
        d = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _Refused as exc:
        raise DataError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, OverflowError, MemoryError, RecursionError,
            struct.error) as exc:
        raise DataError(f"{path}: not a readable CIFAR-10 batch "
                        f"(truncated or corrupt pickle: {exc})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, found {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: missing 'data' or 'labels' entry (keys: {_show(list(d))})")
    if isinstance(data, _PickledArray):
        data = data.array
    if isinstance(labels, _PickledArray):
        labels = labels.array
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3072):
        got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1:  # only uint8 arrays get this far
            raise DataError(f"{path}: 'labels' must be 1-D, got shape {labels.shape}")
    elif isinstance(labels, list):
        for i, v in enumerate(labels):
            if type(v) is not int:  # a float label would be truncated, a bool is no class
                raise DataError(f"{path}: labels must be integers, found "
                                f"{type(v).__name__} {_show(v)} at index {i}")
    else:
        raise DataError(f"{path}: 'labels' must be a list of ints, got {type(labels).__name__}")
    if len(labels) != data.shape[0]:
        raise DataError(f"count mismatch in {path}: {data.shape[0]} images but "
                        f"{len(labels)} labels")
    if data.shape[0] == 0:
        raise DataError(f"{path}: holds no images")
    for i, v in enumerate(labels):
        if not 0 <= v < NUM_CLASSES["cifar10"]:
            raise _label_error(path, i, int(v), NUM_CLASSES["cifar10"], "cifar10")
    return _cifar_xy(data, labels)


def _read_cifar_bin(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch (N records of 3073 bytes) -> (x (N, 3, 32, 32), y (N,))."""
    if not os.path.isfile(path):
        raise DataError(f"missing file: {path}")
    with open(path, "rb") as fh:
        raw = fh.read()
    if not raw:
        raise DataError(f"{path}: holds no images (empty file)")
    if len(raw) % CIFAR_RECORD:
        raise DataError(f"{path}: size {len(raw)} bytes is not a multiple of {CIFAR_RECORD} "
                        "(CIFAR-10 records: 1 label byte + 3072 pixel bytes)")
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    _check_labels(rec[:, 0], NUM_CLASSES["cifar10"], path, "cifar10")
    return _cifar_xy(rec[:, 1:], rec[:, 0])


def _cifar_layout(directory: str) -> tuple[str, bool]:
    """(directory holding the batches, binary?): binary files first, then python batches."""
    for sub, binary, suffix in (("cifar-10-batches-bin", True, ".bin"),
                                ("cifar-10-batches-py", False, "")):
        for d in (directory, os.path.join(directory, sub)):
            if any(os.path.isfile(os.path.join(d, n + suffix)) for n in _CIFAR_SPLITS):
                return d, binary
    return directory, False  # nothing found: reading reports the first missing file


def load_cifar10_dir(directory: str) -> Dataset:
    """CIFAR-10 directory (binary or python version) -> Dataset with x (N, 3, 32, 32)."""
    if not os.path.isdir(directory):
        raise DataError(f"cifar10: data directory not found: {directory}")
    directory, binary = _cifar_layout(directory)
    read, suffix = (_read_cifar_bin, ".bin") if binary else (_read_cifar_batch, "")
    parts = [read(os.path.join(directory, n + suffix)) for n in _CIFAR_SPLITS]
    x_tr = np.concatenate([p[0] for p in parts[:-1]])
    y_tr = np.concatenate([p[1] for p in parts[:-1]])
    return Dataset("cifar10", x_tr, y_tr, *parts[-1], NUM_CLASSES["cifar10"])


# ---------------------------------------------------------------- Tiny-ImageNet (.npy)

def _load_npy(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"missing file: {path}")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode=None)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array (truncated or corrupt: {exc})") \
            from None
    if not isinstance(arr, np.ndarray):  # np.load also opens .npz archives
        arr.close()
        raise DataError(f"{path}: an .npz archive, not a .npy array")
    return arr


def _first_index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def _images_to_nchw(x: np.ndarray, path: str) -> np.ndarray:
    """Images as stored, (N, H, W, C) or (N, C, H, W) with C in {1, 3} -> (N, C, H, W) float32.

    The channel axis is the one of size 1 or 3; when both axis 1 and axis 3 could be it,
    the layout is ambiguous and refused rather than guessed.
    """
    if x.ndim != 4:
        raise DataError(f"{path}: images must be 4-D (NHWC or NCHW), got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{path}: holds no images (shape {x.shape})")
    nchw, nhwc = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
    if nchw and nhwc:
        raise DataError(f"{path}: ambiguous image layout {x.shape}: axis 1 and axis 3 could "
                        "both be the channel axis (1 or 3 channels)")
    if not (nchw or nhwc):
        raise DataError(f"{path}: images must have 1 or 3 channels, NCHW or NHWC; "
                        f"got shape {x.shape}")
    if min(x.shape[1:]) == 0:
        raise DataError(f"{path}: empty images (shape {x.shape})")
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{path}: images must be uint8 (0..255) or float (0..1), "
                        f"got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        # checked in the file's own layout so that the index names the stored element
        finite = np.isfinite(x)
        if not finite.all():
            at = _first_index(~finite)
            what = "NaN" if np.isnan(x[at]) else ("inf" if x[at] > 0 else "-inf")
            raise DataError(f"{path}: contains {what} at index {at}")
        x = x.astype(np.float32, copy=False)  # range judged at the precision kept
        outside = (x < 0) | (x > 1)
        if outside.any():
            at = _first_index(outside)
            raise DataError(f"{path}: float images must lie in [0, 1]; found {x[at]} at "
                            f"index {at} (min {x.min()}, max {x.max()})")
    if nhwc:
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def load_npy_dir(directory: str, name: str = "tiny-imagenet",
                 num_classes: int | None = None) -> Dataset:
    """Directory with x_train.npy, y_train.npy, x_test.npy, y_test.npy -> Dataset.

    x: (N, C, H, W) float32 in [0, 1]; y: (N,) int64 in [0, num_classes), where
    ``num_classes`` defaults to the dataset's own (200 for tiny-imagenet).
    """
    num_classes = _num_classes(name, num_classes)
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
        _check_labels(y, num_classes, yp, name)  # before the cast: uint64 could wrap
        arrays[split] = (x, y.astype(np.int64))
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

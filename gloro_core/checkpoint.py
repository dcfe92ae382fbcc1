"""Checkpoint format ``gloro-npz/1``: one ``.npz`` file written with NumPy.

Arrays (all plain numeric, loadable with ``np.load(path, allow_pickle=False)``):

* ``meta``: a 0-d unicode array holding a JSON object with at least
  ``format`` ("gloro-npz/1"), ``input_shape`` [C, H, W], ``num_classes``, ``activation``,
  ``layers`` (the layer-spec list, final dense included), ``eps``, ``variant``, ``init``,
  ``lipschitz`` (the frozen numbers, or null) and ``extra`` (caller data, see below);
* ``param.{i}.weight``: conv OIHW (out, in, kh, kw) or dense (out, in);
* ``param.{i}.bias``: (out,);
* ``iterate.{i}``: the power-method iterate of layer i, (1, *layer input shape);
* ``extra.{k}``: arrays found inside ``extra`` (e.g. optimizer moments): in the JSON the
  array is replaced by ``{"__array__": "extra.{k}"}`` and put back on load.

Layouts are PyTorch's, so a loader elsewhere reads ``param.{i}.weight`` straight into a
``Conv2d``/``Linear`` (flatten between the last conv and the first dense in C, H, W order).

Format ``gloro-safetensors/1`` (:func:`save_safetensors`, needs the optional ``safetensors``
package: ``pip install -e ".[safetensors]"``): the same tensors under the same names, and the
same meta JSON (``format`` "gloro-safetensors/1", ``extra`` with its ``{"__array__": ...}``
references) as the string ``gloro_meta`` of the header's ``__metadata__``. PyTorch reads it
with ``safetensors.torch.load_file``.

:func:`save` picks the format by the path's suffix (``.safetensors``, anything else npz);
:func:`load` by the content (a zip is npz; 8 bytes of header length then ``{`` is safetensors).
``iterate.{i}`` may be absent from either (a weights-only file): the model loader then draws
fresh iterates; a file with some but not all of them is refused.

Writes are atomic: the file is written to a temporary file in the same directory and
moved over the target with ``os.replace``; a failed save leaves any old file untouched.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import struct
import tempfile
import zipfile

import numpy as np

FORMAT = "gloro-npz/1"
FORMAT_ST = "gloro-safetensors/1"
ST_META_KEY = "gloro_meta"   # the header metadata entry holding the meta JSON
ST_SUFFIX = ".safetensors"


def _split_extra(obj, arrays, path="extra"):
    """JSON-able copy of ``obj`` with every ndarray moved into ``arrays``."""
    if isinstance(obj, np.ndarray):
        key = f"extra.{len([k for k in arrays if k.startswith('extra.')])}"
        arrays[key] = obj
        return {"__array__": key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: dict keys must be strings for JSON, got {k!r}")
            out[k] = _split_extra(v, arrays, f"{path}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_split_extra(v, arrays, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"{path}: cannot store a {type(obj).__name__} in a checkpoint (JSON values and numpy arrays only)")


def _join_extra(obj, arrays, fname):
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            key = obj["__array__"]
            if key not in arrays:
                raise ValueError(f"{fname}: missing array {key!r} referenced by meta.extra")
            return arrays[key]
        return {k: _join_extra(v, arrays, fname) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_extra(v, arrays, fname) for v in obj]
    return obj


def _pack(meta: dict, arrays: dict, extra, fmt: str):
    """({name: contiguous array} with extra's arrays added, meta JSON text with ``format`` fmt)."""
    all_arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = dict(meta)
    meta["format"] = fmt
    meta["extra"] = _split_extra(extra if extra is not None else {}, all_arrays)
    try:
        text = json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint meta is not JSON-serialisable: {exc}") from None
    return all_arrays, text


def save_npz(path, meta: dict, arrays: dict, extra=None) -> None:
    """Atomically write ``meta`` (JSON-able dict), ``arrays`` and ``extra`` to ``path``.

    ``path`` is used as given (no ``.npz`` appended).
    """
    path = os.fspath(path)
    all_arrays, text = _pack(meta, arrays, extra, FORMAT)
    all_arrays["meta"] = np.array(text)
    _atomic_write(path, lambda fh: np.savez(fh, **all_arrays))


def _require_safetensors(path, doing: str):
    """The safetensors package, or an ImportError saying how to install it."""
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError(f"{path}: {doing} a .safetensors checkpoint needs the optional safetensors "
                          'package: pip install -e ".[safetensors]"') from None
    return safetensors


def save_safetensors(path, meta: dict, arrays: dict, extra=None) -> None:
    """Atomically write a ``gloro-safetensors/1`` file: ``arrays`` (and extra's arrays) as
    tensors, the meta JSON as header metadata ``gloro_meta`` (see the module docstring)."""
    path = os.fspath(path)
    st = _require_safetensors(path, "writing")
    all_arrays, text = _pack(meta, arrays, extra, FORMAT_ST)
    for k, a in all_arrays.items():
        if not any(a.dtype == d for d in _ST_NP):
            raise TypeError(f"{k}: safetensors cannot store dtype {a.dtype} (numeric and bool arrays only)")
    # serialised in memory first: a failure there leaves nothing on disk at all
    data = st.numpy.save(all_arrays, metadata={ST_META_KEY: text})
    _atomic_write(path, lambda fh: fh.write(data))


def save(path, meta: dict, arrays: dict, extra=None) -> None:
    """:func:`save_safetensors` for a ``.safetensors`` path, else :func:`save_npz`."""
    if os.fspath(path).lower().endswith(ST_SUFFIX):
        save_safetensors(path, meta, arrays, extra)
    else:
        save_npz(path, meta, arrays, extra)


def copy_npz(src, dst) -> None:
    """Atomically replace ``dst`` with a byte copy of ``src`` (a checkpoint)."""
    with open(src, "rb") as fh:
        data = fh.read()
    _atomic_write(os.fspath(dst), lambda out: out.write(data))


def _atomic_write(path: str, write) -> None:
    # The ".tmp-*.npz" names are what a run directory removes as orphans (rundir.ORPHANS).
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=d)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


def _fsync_dir(d: str) -> None:
    # The rename is durable only once the directory is: without this a power loss could
    # lose last.npz's replace yet keep a later best.npz one, breaking last-before-best.
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # platforms/filesystems that cannot fsync a directory
        pass
    finally:
        os.close(fd)


# compressed members may unpack to at most this many bytes in all (np.savez, which we
# write, stores them uncompressed: their size is the file's own)
MAX_INFLATED_BYTES = 1 << 30


def _check_member_sizes(z) -> None:
    """Refuse an npz whose arrays would allocate more than the file holds, before reading.

    np.load allocates an array of its header's shape first and then reads into it, so a
    few bytes declaring (10**6, 10**6) asked for terabytes; and a deflated member may
    declare any unpacked size. Each header's shape must fit in its member's unpacked size,
    and deflated members together may unpack to MAX_INFLATED_BYTES at most."""
    inflated = 0
    for info in z.zip.infolist():
        if info.compress_type != 0:
            inflated += info.file_size
            if inflated > MAX_INFLATED_BYTES:
                raise ValueError(f"compressed arrays unpack to more than {MAX_INFLATED_BYTES} bytes")
        with z.zip.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"{info.filename}: unsupported .npy format version {version}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > info.file_size:
            raise ValueError(f"{info.filename}: header declares shape {shape} of {dtype} "
                             f"({nbytes} bytes) but the member holds {info.file_size} bytes")


def check_arrays(path, arrays: dict, expect: dict) -> None:
    """ValueError naming the file and key unless every ``expect`` name is in ``arrays`` as a
    finite float array of the expected shape."""
    for key, shp in expect.items():
        if key not in arrays:
            raise ValueError(f"{path}: missing array {key!r}")
        a = arrays[key]
        if tuple(a.shape) != tuple(shp):
            raise ValueError(f"{path}: array {key!r} has shape {tuple(a.shape)}, expected {tuple(shp)}")
        if a.dtype.kind != "f":
            raise ValueError(f"{path}: array {key!r} has dtype {a.dtype}, expected a float array")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{path}: array {key!r} contains NaN or inf")


def load_npz(path):
    """Read a ``gloro-npz/1`` file: returns (meta dict, {name: array}, extra).

    ValueError (naming the file and key) for: not a readable npz, missing ``meta``,
    bad JSON, unknown format. Shapes are checked by the model loader.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and not zipfile.is_zipfile(path):  # np.load would read a .npy whole
        raise ValueError(f"{path}: not a readable .npz checkpoint (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            _check_member_sizes(z)
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .npz checkpoint ({type(exc).__name__}: {exc})") from None
    if "meta" not in arrays:
        raise ValueError(f"{path}: missing array 'meta' (not a {FORMAT} checkpoint)")
    m = arrays.pop("meta")
    if m.shape != () or m.dtype.kind != "U":
        raise ValueError(f"{path}: 'meta' must be a 0-d string array, got dtype {m.dtype} shape {m.shape}")
    meta = _parse_meta(path, str(m), "meta", FORMAT)
    extra = _join_extra(meta.get("extra") or {}, arrays, path)
    return meta, arrays, extra


def _parse_meta(path, text: str, what: str, fmt: str) -> dict:
    """The meta JSON object of format ``fmt``, or a ValueError naming the file and ``what``."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: '{what}' is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: '{what}' must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {fmt!r})")
    return meta


# ------------------------------------------------------------------ safetensors

# safetensors dtype names with a NumPy dtype (little-endian, as the format stores); BF16 and
# the FP8 types have none and are refused
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "|i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "|u1", "BOOL": "|b1"}
_ST_NP = tuple(np.dtype(v) for v in _ST_DTYPES.values())
# the safetensors library refuses larger headers too
MAX_ST_HEADER = 100 << 20


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors_header(path):
    """(tensor entries {name: {"dtype", "shape", "data_offsets"}}, ``__metadata__`` dict) of a
    safetensors file, read without its data and checked against the file size: the header
    fits in the file, every tensor has a known dtype, a shape of ints >= 0 whose byte size
    equals its offsets' span, lies inside the data, and no two tensors overlap.
    ValueError (one line, naming the file) otherwise."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_ST_HEADER:
            raise ValueError(f"{path}: safetensors header declares {n} bytes but the file holds {size - 8} "
                             f"after the length (limit {MAX_ST_HEADER}): truncated or not a safetensors file")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_len = size - 8 - n
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{path}: tensor {name!r}: header entry must hold exactly dtype, shape, data_offsets")
        dt, shape, off = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str) or dt not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r}: unsupported dtype {dt!r} (one of {sorted(_ST_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ValueError(f"{path}: tensor {name!r}: shape must be a list of ints >= 0, got {shape!r}")
        if (not isinstance(off, list) or len(off) != 2 or not all(_is_int(o) for o in off)
                or not 0 <= off[0] <= off[1]):
            raise ValueError(f"{path}: tensor {name!r}: data_offsets must be [begin, end], 0 <= begin <= end, "
                             f"got {off!r}")
        if off[1] > data_len:
            raise ValueError(f"{path}: tensor {name!r} ends at data byte {off[1]} but the file holds {data_len} "
                             "bytes of data (truncated?)")
        nbytes = math.prod(shape) * np.dtype(_ST_DTYPES[dt]).itemsize
        if nbytes != off[1] - off[0]:
            raise ValueError(f"{path}: tensor {name!r} declares shape {tuple(shape)} of {dt} ({nbytes} bytes) "
                             f"but its offsets span {off[1] - off[0]} bytes")
        spans.append((off[0], off[1], name))
    spans.sort()
    for (_, end, a), (begin, _, b) in itertools.pairwise(spans):
        if begin < end:
            raise ValueError(f"{path}: tensors {a!r} and {b!r} overlap in the data")
    return header, metadata


def _extra_refs(obj):
    """The ``extra.{k}`` names that meta.extra references."""
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return [obj["__array__"]]
        return [r for v in obj.values() for r in _extra_refs(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in _extra_refs(v)]
    return []


def load_safetensors(path, expect=None):
    """Read a ``gloro-safetensors/1`` file: (meta dict, {name: array}, extra), like load_npz.

    The header is checked first (:func:`read_safetensors_header`); then ``expect(meta)`` ->
    {name: shape}, if given, is called and every tensor must be one of its names with that
    shape, or an ``extra.{k}`` that meta.extra references: all before any data is read.
    """
    path = os.fspath(path)
    st = _require_safetensors(path, "reading")
    header, metadata = read_safetensors_header(path)
    if ST_META_KEY not in metadata:
        raise ValueError(f"{path}: safetensors header metadata lacks {ST_META_KEY!r} (not a {FORMAT_ST} checkpoint)")
    meta = _parse_meta(path, metadata[ST_META_KEY], ST_META_KEY, FORMAT_ST)
    if expect is not None:
        shapes, refs = expect(meta), set(_extra_refs(meta.get("extra")))
        for name, e in header.items():
            if name in shapes:
                if tuple(e["shape"]) != tuple(shapes[name]):
                    raise ValueError(f"{path}: array {name!r} has shape {tuple(e['shape'])}, "
                                     f"expected {tuple(shapes[name])}")
            elif name not in refs:
                raise ValueError(f"{path}: unexpected tensor {name!r} (not a layer array of the meta "
                                 "nor referenced by meta.extra)")
    try:
        with st.safe_open(path, framework="np") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (st.SafetensorError, OSError, ValueError, TypeError) as exc:   # the library's own checks (e.g. gaps)
        msg = " ".join(str(exc).split())
        raise ValueError(f"{path}: not a readable .safetensors checkpoint ({type(exc).__name__}: {msg})") from None
    extra = _join_extra(meta.get("extra") or {}, arrays, path)
    return meta, arrays, extra


def sniff(path) -> str:
    """"safetensors" or "npz", by content: a safetensors file starts with its header length
    (8 bytes, little-endian) and then the header's ``{``; npz files are zips. Neither
    (empty, truncated, foreign): by suffix, whose loader then reports what is wrong."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except FileNotFoundError:
        raise
    except OSError:   # e.g. a directory: load_npz words the ValueError as before
        return "npz"
    if head[:2] == b"PK":
        return "npz"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "safetensors" if os.fspath(path).lower().endswith(ST_SUFFIX) else "npz"


def load(path, expect=None):
    """(meta, {name: array}, extra) of either format (see :func:`sniff`). ``expect(meta)`` ->
    {name: shape} is called once: before any tensor is read for safetensors (whose tensors
    must then match it), after reading for npz (whose members are size-checked)."""
    if sniff(path) == "safetensors":
        return load_safetensors(path, expect)
    meta, arrays, extra = load_npz(path)
    if expect is not None:
        expect(meta)
    return meta, arrays, extra


def check_layer_arrays(path, arrays: dict, layers) -> bool:
    """checkpoint.check_arrays for every layer's arrays; True when the file has no
    ``iterate.{i}`` at all (a weights-only file: the caller draws fresh ones). Some
    iterates but not all is an error naming the first one missing."""
    names = [f"iterate.{i}" for i, layer in enumerate(layers) if layer.parametric]
    weights_only = bool(names) and not any(k in arrays for k in names)
    for i, layer in enumerate(layers):
        shapes = dict(layer.array_shapes(i))
        if weights_only:
            shapes.pop(f"iterate.{i}", None)
        check_arrays(path, arrays, shapes)
    return weights_only


def fresh_iterates(path, arrays: dict, layers, seed: int, dtype) -> None:
    """Put random unit iterates (1, *in_shape) for every layer with parameters into
    ``arrays``, from a generator seeded with ``seed`` (the same file gives the same ones),
    and log that ``path`` had none."""
    from .lipschitz import init_iterate

    logging.getLogger("gloro_core.checkpoint").info(
        "%s: no power iterates in the file (weights only); starting from fresh random ones", path)

    rng = np.random.default_rng(seed)
    for i, layer in enumerate(layers):
        if layer.parametric:
            arrays[f"iterate.{i}"] = init_iterate(layer, rng, dtype)

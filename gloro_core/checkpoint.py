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

Writes are atomic: the file is written to a temporary file in the same directory and
moved over the target with ``os.replace``; a failed save leaves any old file untouched.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "gloro-npz/1"


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


def save_npz(path, meta: dict, arrays: dict, extra=None) -> None:
    """Atomically write ``meta`` (JSON-able dict), ``arrays`` and ``extra`` to ``path``.

    ``path`` is used as given (no ``.npz`` appended).
    """
    path = os.fspath(path)
    all_arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = dict(meta)
    meta["format"] = FORMAT
    meta["extra"] = _split_extra(extra if extra is not None else {}, all_arrays)
    try:
        text = json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint meta is not JSON-serialisable: {exc}") from None
    all_arrays["meta"] = np.array(text)
    _atomic_write(path, lambda fh: np.savez(fh, **all_arrays))


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
    try:
        meta = json.loads(str(m))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: 'meta' is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: 'meta' must be a JSON object, got {type(meta).__name__}")
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {fmt!r} (expected {FORMAT!r})")
    extra = _join_extra(meta.get("extra") or {}, arrays, path)
    return meta, arrays, extra

"""Strict checks of user-given numbers, shapes and batches (float() would take "0.3" and
True, int() would truncate 4.9): the model, its layer specs and the CLI share them."""
from __future__ import annotations

import math
import numbers

import numpy as np

from kernels.registry import is_gpu_array, to_host
from nn.tensor import Tensor


def check_real(value, name) -> float:
    """value as a float: real numbers only (float() would take "0.3" and True), finite, >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_eps(eps) -> float:
    return check_real(eps, "eps")


def check_int(value, name) -> int:
    """value as a Python int: ints only (int() would truncate 4.9 and take "4" and True)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_input_shape(input_shape) -> tuple:
    if not isinstance(input_shape, (list, tuple)):
        raise TypeError(f"input_shape must be a tuple (C, H, W) (or (features,)), got {input_shape!r}")
    try:
        shape = tuple(check_int(v, "") for v in input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) (or (features,)) of positive ints, got {input_shape!r}")
    return shape


def check_num_classes(num_classes) -> int:
    m = check_int(num_classes, "num_classes")
    if m < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return m


def spec_int(d, i, key, default=None) -> int:
    """Layer i's d[key] as a Python int. Strict: int() would turn a padding of 1.7 into 1
    and a filters of True into 1; integral floats (4.0) are refused too (our checkpoints
    and architecture parsers write ints)."""
    try:
        return check_int(d.get(key, default), f"layer {i}: {key!r}")
    except TypeError as exc:   # a bad spec is a ValueError, as every other spec error
        raise ValueError(str(exc)) from None


def check_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype) if dtype is not None else None  # np.dtype(None) is float64
    except (TypeError, ValueError):
        dt = None
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    return dt


def check_batch(x, input_shape, dtype, xp, name="x"):
    """(x as ``dtype`` on xp's device, contiguous, shape (n, *input_shape); x as given on
    that device): float, finite, of the input shape. x: an array or Tensor (its .data)."""
    x = x.data if isinstance(x, Tensor) else x
    x = x if is_gpu_array(x) else np.asarray(x)
    if x.dtype.kind != "f":
        # uint8 images in 0..255 would be taken as is: radii 255x too large
        raise TypeError(f"{name} must be a float array of images in [0, 1], got dtype {x.dtype}; "
                        f"convert integer images first, e.g. {name} / 255.0")
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{name} must have shape (n, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}")
    # a host array is checked before it is copied: on a GPU the check then costs no host sync
    finite = bool(xp.all(xp.isfinite(x))) if is_gpu_array(x) else bool(np.isfinite(x).all())
    if not finite:
        raise ValueError(f"{name} contains NaN or inf")
    x = xp.asarray(x)
    return xp.ascontiguousarray(x, dtype=dtype), x


def check_labels(y, n, num_classes) -> np.ndarray:
    """Labels as int64 (n,) in [0, num_classes)."""
    y = np.asarray(to_host(y))
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise ValueError(f"labels must be ints of shape ({n},), got dtype {y.dtype} shape {y.shape}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return y.astype(np.int64)

"""Input validation and shape arithmetic shared by every backend.

The public API (kernels/api.py) validates once, so backends may assume
well-formed inputs: same float dtype, right ndim, matching channels, and a
padding already resolved to four ints (top, bottom, left, right).
"""
from __future__ import annotations

import math
import numbers

FLOAT_DTYPES = ("float32", "float64")
_FLOAT_CHARS = ("f", "d")  # dtype.char of float32 and float64 (no str(dtype) on the hot path)


def check_float(name: str, a) -> None:
    """TypeError unless ``a`` is a float32/float64 array."""
    dt = getattr(a, "dtype", None)
    if dt is None:
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if getattr(dt, "char", None) not in _FLOAT_CHARS:
        raise TypeError(f"{name} must be float32 or float64, got dtype {dt} (shape {tuple(a.shape)})")


def check_same_dtype(**arrays) -> None:
    """TypeError if the given arrays do not all share one dtype."""
    items = [(k, v) for k, v in arrays.items() if v is not None]
    dts = {v.dtype for _, v in items}
    if len(dts) > 1:
        desc = ", ".join(f"{k}: {v.dtype}" for k, v in items)
        raise TypeError(f"arrays must share one dtype, got {desc}")


def check_ndim(name: str, a, ndim: int, layout: str) -> None:
    """ValueError unless ``a`` has ``ndim`` dimensions (``layout`` names them)."""
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D ({layout}), got shape {tuple(a.shape)}")


def as_int(v, name: str, whole=None) -> int:
    """``v`` as an int; TypeError for floats, bools, strings, None (no silent truncation)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v if whole is None else whole!r}")
    return int(v)


def pair(v, name: str) -> tuple[int, int]:
    """An int or a pair of ints as (h, w)."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {v!r}")
        return as_int(v[0], name, v), as_int(v[1], name, v)
    return as_int(v, name), as_int(v, name)


def check_stride(stride) -> tuple[int, int]:
    sh, sw = pair(stride, "stride")
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be >= 1, got {stride!r}")
    return sh, sw


def same_pad_1d(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow SAME: total max((ceil(n/s)-1)*s + k - n, 0), the extra pixel last."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def resolve_padding(padding, hw: tuple[int, int], khw: tuple[int, int], stride: tuple[int, int]):
    """Padding as (top, bottom, left, right) for an input of spatial size ``hw``.

    ``padding`` is "same" (TensorFlow's definition), "valid", an int, or a pair
    of ints (symmetric per axis).
    """
    (h, w), (kh, kw), (sh, sw) = hw, khw, stride
    if isinstance(padding, str):
        p = padding.lower()
        if p == "same":
            return same_pad_1d(h, kh, sh) + same_pad_1d(w, kw, sw)
        if p == "valid":
            return (0, 0, 0, 0)
        raise ValueError(f"padding must be 'same', 'valid' or an int, got {padding!r}")
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        pads = tuple(as_int(v, "padding", padding) for v in padding)
    else:
        ph, pw = pair(padding, "padding")
        pads = (ph, ph, pw, pw)
    if min(pads) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return pads


def conv_out_hw(hw, khw, stride, pads) -> tuple[int, int]:
    """Output spatial size of a conv with resolved padding."""
    (h, w), (kh, kw), (sh, sw) = hw, khw, stride
    pt, pb, pl, pr = pads
    oh = (h + pt + pb - kh) // sh + 1
    ow = (w + pl + pr - kw) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(
            f"kernel {kh}x{kw} does not fit input {h}x{w} with padding {pads}: output would be {oh}x{ow}"
        )
    return oh, ow


def check_conv(x_shape, w, stride, padding):
    """Validate a conv of an input of ``x_shape`` (N,C,H,W) with weight ``w`` (O,C,kh,kw).

    Returns (stride pair, resolved pads, (OH, OW)).
    """
    check_float("w", w)
    check_ndim("w", w, 4, "O, C, kh, kw")
    if len(x_shape) != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x_shape)}")
    if x_shape[1] != w.shape[1]:
        raise ValueError(
            f"channel mismatch: x has {x_shape[1]} channels (shape {tuple(x_shape)}) but "
            f"w expects {w.shape[1]} (shape {tuple(w.shape)})"
        )
    s = check_stride(stride)
    khw = (int(w.shape[2]), int(w.shape[3]))
    if min(khw) < 1:
        raise ValueError(f"kernel must be at least 1x1, got w of shape {tuple(w.shape)}")
    pads = resolve_padding(padding, (int(x_shape[2]), int(x_shape[3])), khw, s)
    return s, pads, conv_out_hw((x_shape[2], x_shape[3]), khw, s, pads)

"""The ``reference`` backend: the oracle every other backend is tested against.

Deliberately plain: explicit loops over output pixels (conv) or output units
(dense) and channel pairs (MinMax), with NumPy only for the inner sums. Sums
are accumulated in float64 and the result is cast back to the input dtype, so
for float32 inputs the oracle is the correctly-rounded-ish value, not one more
float32 approximation. Slow; use small shapes.

Inputs arrive validated by kernels/api.py: one float dtype, ``stride`` = (sh, sw),
``pads`` = (top, bottom, left, right).
"""
from __future__ import annotations

import numpy as np

from .registry import register

_ACC = np.float64  # accumulation dtype


def _pad(x, pads):
    """Zero-pad the last two axes of (N, C, H, W) -> (N, C, H+pt+pb, W+pl+pr), float64."""
    pt, pb, pl, pr = pads
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + pt + pb, w + pl + pr), dtype=_ACC)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    return xp


def _out_hw(h, w, kh, kw, stride, pads):
    pt, pb, pl, pr = pads
    return (h + pt + pb - kh) // stride[0] + 1, (w + pl + pr - kw) // stride[1] + 1


@register("conv2d", "reference")
def conv2d(x, w, b, stride, pads):
    """x (N, C, H, W), w (O, C, kh, kw), b (O,) or None -> y (N, O, OH, OW).

    y[n, o, i, j] = b[o] + sum_{c,p,q} xpad[n, c, i*sh + p, j*sw + q] * w[o, c, p, q].
    """
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    sh, sw = stride
    oh, ow = _out_hw(h, wd, kh, kw, stride, pads)
    xp = _pad(x, pads)
    w64 = w.astype(_ACC)
    y = np.zeros((n, o, oh, ow), dtype=_ACC)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]  # (N, C, kh, kw)
            y[:, :, i, j] = np.tensordot(patch, w64, axes=([1, 2, 3], [1, 2, 3]))
    if b is not None:
        y += b.astype(_ACC)[None, :, None, None]
    return y.astype(x.dtype)


@register("conv2d_grad_input", "reference")
def conv2d_grad_input(gy, w, x_shape, stride, pads):
    """gy (N, O, OH, OW), w (O, C, kh, kw) -> gx of exactly ``x_shape`` (N, C, H, W).

    Scatter of each output pixel's gradient back over the patch it read (the
    transposed conv), then crop the padding away. Input pixels no window reached
    (stride leftovers) get 0: that is the output-padding to the input shape.
    """
    n, c, h, wd = x_shape
    _, _, kh, kw = w.shape
    sh, sw = stride
    pt, pb, pl, pr = pads
    oh, ow = gy.shape[2], gy.shape[3]
    gxp = np.zeros((n, c, h + pt + pb, wd + pl + pr), dtype=_ACC)
    w64 = w.astype(_ACC)
    gy64 = gy.astype(_ACC)
    for i in range(oh):
        for j in range(ow):
            # (N, O) x (O, C, kh, kw) -> (N, C, kh, kw)
            gxp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += np.tensordot(gy64[:, :, i, j], w64, axes=([1], [0]))
    return gxp[:, :, pt:pt + h, pl:pl + wd].astype(gy.dtype)


@register("conv2d_grad_weight", "reference")
def conv2d_grad_weight(x, gy, w_shape, stride, pads):
    """x (N, C, H, W), gy (N, O, OH, OW) -> gw (O, C, kh, kw) = sum over n, i, j of gy * patch."""
    _, _, kh, kw = w_shape
    sh, sw = stride
    oh, ow = gy.shape[2], gy.shape[3]
    xp = _pad(x, pads)
    gy64 = gy.astype(_ACC)
    gw = np.zeros(w_shape, dtype=_ACC)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]  # (N, C, kh, kw)
            gw += np.tensordot(gy64[:, :, i, j], patch, axes=([0], [0]))  # (O, C, kh, kw)
    return gw.astype(x.dtype)


@register("dense", "reference")
def dense(x, w, b):
    """x (N, I), w (O, I), b (O,) or None -> y (N, O), one output unit at a time."""
    x64 = x.astype(_ACC)
    y = np.zeros((x.shape[0], w.shape[0]), dtype=_ACC)
    for o in range(w.shape[0]):
        y[:, o] = (x64 * w[o].astype(_ACC)).sum(axis=1)
        if b is not None:
            y[:, o] += float(b[o])
    return y.astype(x.dtype)


@register("dense_grad_input", "reference")
def dense_grad_input(gy, w):
    """gy (N, O), w (O, I) -> gx (N, I) = sum_o gy[:, o] w[o]."""
    gx = np.zeros((gy.shape[0], w.shape[1]), dtype=_ACC)
    for o in range(w.shape[0]):
        gx += gy[:, o].astype(_ACC)[:, None] * w[o].astype(_ACC)[None, :]
    return gx.astype(gy.dtype)


@register("dense_grad_weight", "reference")
def dense_grad_weight(x, gy):
    """x (N, I), gy (N, O) -> gw (O, I) = sum_n gy[n, o] x[n]."""
    x64 = x.astype(_ACC)
    gw = np.zeros((gy.shape[1], x.shape[1]), dtype=_ACC)
    for o in range(gy.shape[1]):
        gw[o] = (gy[:, o].astype(_ACC)[:, None] * x64).sum(axis=0)
    return gw.astype(x.dtype)


@register("minmax", "reference")
def minmax(x):
    """x (N, C, ...) with C even -> same shape; channels (2k, 2k+1) become (min, max)."""
    y = np.empty_like(x)
    for k in range(x.shape[1] // 2):
        a, b = x[:, 2 * k], x[:, 2 * k + 1]
        y[:, 2 * k] = np.minimum(a, b)
        y[:, 2 * k + 1] = np.maximum(a, b)
    return y


@register("minmax_grad", "reference")
def minmax_grad(x, gy):
    """x, gy (N, C, ...) -> gx: gy[2k] goes to the argmin, gy[2k+1] to the argmax.

    Ties (x[2k] == x[2k+1]) keep the identity routing: gy[2k] -> 2k, gy[2k+1] -> 2k+1.
    """
    gx = np.empty_like(gy)
    for k in range(x.shape[1] // 2):
        keep = x[:, 2 * k] <= x[:, 2 * k + 1]  # already ordered (or tied): no swap
        g_lo, g_hi = gy[:, 2 * k], gy[:, 2 * k + 1]
        gx[:, 2 * k] = np.where(keep, g_lo, g_hi)
        gx[:, 2 * k + 1] = np.where(keep, g_hi, g_lo)
    return gx

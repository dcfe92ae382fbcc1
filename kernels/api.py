"""The public kernel API: validate once, pick a backend, call it.

Layouts are PyTorch's: activations NCHW, conv weights OIHW, dense weights
(out, in). Every function takes and returns raw arrays (NumPy or CuPy) of one
float dtype (float32 or float64). ``backend=None`` selects by array type and
the ``GLORO_BACKEND`` environment variable (see kernels/registry.py).

Backend implementations receive already-validated inputs with ``stride`` as an
(sh, sw) pair and ``pads`` as (top, bottom, left, right).
"""
from __future__ import annotations

from . import registry
from .checks import check_conv, check_float, check_ndim, check_same_dtype, pair


def _run(op, like, backend, *args):
    return registry.get(op, registry.select(op, like, backend))(*args)


def _check_out(name, a, expected):
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(a.shape)}")


# ---------------------------------------------------------------- conv2d

def conv2d(x, w, b=None, stride=1, padding="same", backend=None, relu=False):
    """y[n,o] = sum_c x[n,c] (*) w[o,c] + b[o]; with relu=True, max(y, 0) (NaN stays).

    x (N, C, H, W), w (O, C, kh, kw), b (O,) or None -> y (N, O, OH, OW).
    padding: "same" (TensorFlow: extra pixel at bottom/right), "valid", or int.
    relu runs fused in the backend's ``conv2d_relu`` where it has one (numpy: per chunk,
    in cache), else as one in-place pass over y.
    """
    check_float("x", x)
    check_ndim("x", x, 4, "N, C, H, W")
    s, pads, _ = check_conv(x.shape, w, stride, padding)
    if b is not None:
        check_float("b", b)
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"b must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    check_same_dtype(x=x, w=w, b=b)
    name = registry.select("conv2d", x, backend)
    if relu and registry.has("conv2d_relu", name):
        return registry.get("conv2d_relu", name)(x, w, b, s, pads)
    y = registry.get("conv2d", name)(x, w, b, s, pads)
    if relu:
        registry.array_module(y).maximum(y, y.dtype.type(0), out=y)
    return y


def conv2d_grad_input(gy, w, x_shape, stride=1, padding="same", backend=None):
    """Gradient of conv2d w.r.t. x, i.e. the adjoint (transposed conv) applied to ``gy``.

    gy (N, O, OH, OW), w (O, C, kh, kw) -> (N, C, H, W) with (H, W) from ``x_shape``:
    the transposed conv is output-padded back to the exact input shape.
    """
    check_float("gy", gy)
    check_ndim("gy", gy, 4, "N, O, OH, OW")
    x_shape = tuple(int(v) for v in x_shape)
    s, pads, ohw = check_conv(x_shape, w, stride, padding)
    _check_out("gy", gy, (x_shape[0], w.shape[0]) + ohw)
    check_same_dtype(gy=gy, w=w)
    return _run("conv2d_grad_input", gy, backend, gy, w, x_shape, s, pads)


def conv2d_grad_weight(x, gy, kernel_hw, stride=1, padding="same", backend=None):
    """Gradient of conv2d w.r.t. w.

    x (N, C, H, W), gy (N, O, OH, OW), kernel_hw (kh, kw) -> (O, C, kh, kw).
    """
    check_float("x", x)
    check_float("gy", gy)
    check_ndim("x", x, 4, "N, C, H, W")
    check_ndim("gy", gy, 4, "N, O, OH, OW")
    kh, kw = pair(kernel_hw, "kernel_hw")
    w_shape = (int(gy.shape[1]), int(x.shape[1]), kh, kw)
    # a stand-in with the weight's shape and dtype, for the shared validation
    fake_w = _ShapeOnly(w_shape, x.dtype)
    s, pads, ohw = check_conv(x.shape, fake_w, stride, padding)
    _check_out("gy", gy, (x.shape[0], w_shape[0]) + ohw)
    check_same_dtype(x=x, gy=gy)
    return _run("conv2d_grad_weight", x, backend, x, gy, w_shape, s, pads)


def conv2d_grad_bias(gy):
    """Gradient of conv2d w.r.t. b: gy (N, O, OH, OW) -> (O,)."""
    check_float("gy", gy)
    check_ndim("gy", gy, 4, "N, O, OH, OW")
    return gy.sum(axis=(0, 2, 3))


def conv2d_adjoint(y, w, x_shape, stride=1, padding="same", backend=None):
    """A^T y for the conv operator A (no bias): the power method's second half."""
    return conv2d_grad_input(y, w, x_shape, stride, padding, backend)


# ---------------------------------------------------------------- dense

def dense(x, w, b=None, backend=None):
    """y = x w^T + b.  x (N, I), w (O, I), b (O,) or None -> (N, O)."""
    check_float("x", x)
    check_float("w", w)
    check_ndim("x", x, 2, "N, in")
    check_ndim("w", w, 2, "out, in")
    if x.shape[1] != w.shape[1]:
        raise ValueError(
            f"feature mismatch: x has {x.shape[1]} features (shape {tuple(x.shape)}) but "
            f"w expects {w.shape[1]} (shape {tuple(w.shape)})"
        )
    if b is not None:
        check_float("b", b)
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"b must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    check_same_dtype(x=x, w=w, b=b)
    return _run("dense", x, backend, x, w, b)


def dense_grad_input(gy, w, backend=None):
    """Gradient of dense w.r.t. x (= W^T applied to each row): gy (N, O), w (O, I) -> (N, I)."""
    check_float("gy", gy)
    check_float("w", w)
    check_ndim("gy", gy, 2, "N, out")
    check_ndim("w", w, 2, "out, in")
    if gy.shape[1] != w.shape[0]:
        raise ValueError(f"gy has {gy.shape[1]} outputs (shape {tuple(gy.shape)}), w has {w.shape[0]} (shape {tuple(w.shape)})")
    check_same_dtype(gy=gy, w=w)
    return _run("dense_grad_input", gy, backend, gy, w)


def dense_grad_weight(x, gy, backend=None):
    """Gradient of dense w.r.t. w: x (N, I), gy (N, O) -> (O, I)."""
    check_float("x", x)
    check_float("gy", gy)
    check_ndim("x", x, 2, "N, in")
    check_ndim("gy", gy, 2, "N, out")
    if x.shape[0] != gy.shape[0]:
        raise ValueError(f"batch mismatch: x {tuple(x.shape)} vs gy {tuple(gy.shape)}")
    check_same_dtype(x=x, gy=gy)
    return _run("dense_grad_weight", x, backend, x, gy)


def dense_grad_bias(gy):
    """Gradient of dense w.r.t. b: gy (N, O) -> (O,)."""
    check_float("gy", gy)
    check_ndim("gy", gy, 2, "N, out")
    return gy.sum(axis=0)


def dense_adjoint(y, w, backend=None):
    """W^T y for each row of y: the power method's second half for a dense layer."""
    return dense_grad_input(y, w, backend)


# ---------------------------------------------------------------- MinMax

def _check_minmax(name, x):
    check_float(name, x)
    if x.ndim < 2:
        raise ValueError(f"{name} must have a batch and a channel/feature axis, got shape {tuple(x.shape)}")
    if x.shape[1] % 2:
        raise ValueError(
            f"MinMax needs an even number of channels/features on axis 1, got {x.shape[1]} (shape {tuple(x.shape)})"
        )


def minmax(x, backend=None):
    """GroupSort-2 on axis 1: channels (2k, 2k+1) become (min, max).

    x (N, C, ...) with C even -> same shape.
    """
    _check_minmax("x", x)
    return _run("minmax", x, backend, x)


def minmax_grad(x, gy, backend=None):
    """Gradient of minmax at x: routes gy[2k] to the argmin and gy[2k+1] to the argmax.

    Ties (x[2k] == x[2k+1]) route min's gradient to 2k and max's to 2k+1.
    """
    _check_minmax("x", x)
    check_float("gy", gy)
    _check_out("gy", gy, x.shape)
    check_same_dtype(x=x, gy=gy)
    return _run("minmax_grad", x, backend, x, gy)


class _ShapeOnly:
    """Shape and dtype of an array that does not exist yet (for validation)."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)

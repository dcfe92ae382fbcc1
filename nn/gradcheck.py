"""Finite-difference checks of backward, in float64.

``check_backward(fn, inputs)``: Chainer's test. Draw one random direction d
covering every float input at once (unit norm over all of them) and a random
upstream gradient gy for the output; compare

    analytic  sum_i <dL/dx_i, d_i>          (from one backward of L = <fn(x), gy>)
    numeric   (L(x + eps d) - L(x - eps d)) / (2 eps)   (central differences)

``check_backward_elementwise``: the full gradient by per-element central
differences (for tiny inputs), compared entry by entry.

Both raise ``GradcheckError`` (an AssertionError) with the numbers on failure and
return a dict of them on success. NaN or inf never passes. Inputs are copied to
float64; integer/bool inputs and indices in ``no_grads`` are passed as constants.
Near kinks (ReLU at 0, max/MinMax ties) finite differences are meaningless:
resample such inputs in the test.
"""
from __future__ import annotations

import numpy as np

from kernels.registry import array_module, to_host

from .tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """The analytic gradient disagrees with finite differences."""


def _rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _prepare(inputs, no_grads):
    """float64 copies of the inputs; which ones are differentiated."""
    arrays, diff = [], []
    for i, x in enumerate(inputs):
        a = x.data if isinstance(x, Tensor) else x
        if not hasattr(a, "dtype"):
            a = np.asarray(a)
        xp = array_module(a)
        is_float = a.dtype.kind == "f"
        arrays.append(xp.array(a, dtype=xp.float64, copy=True) if is_float else a)
        diff.append(is_float and i not in set(no_grads))
    return arrays, diff


def _tensors(arrays, diff):
    return [Tensor(a, requires_grad=d) if d else Tensor(a) for a, d in zip(arrays, diff)]


def _output(fn, tensors):
    y = fn(*tensors)
    if not isinstance(y, Tensor):
        raise TypeError(f"fn must return a Tensor, got {type(y).__name__}")
    if y.dtype != np.float64:
        raise GradcheckError(f"fn returned dtype {y.dtype} for float64 inputs (an op does not keep the dtype)")
    return y


def _loss_value(fn, arrays, diff, gy) -> float:
    """<fn(x), gy> as a Python float, without building a graph."""
    with no_grad():
        y = _output(fn, _tensors(arrays, diff))
    xp = array_module(y.data)
    return float(xp.sum(y.data * gy))


def _upstream(y, grad_output, rng):
    xp = array_module(y.data)
    if grad_output is not None:
        g = grad_output.data if isinstance(grad_output, Tensor) else grad_output
        g = xp.asarray(g, dtype=xp.float64)
        if g.shape != y.data.shape:
            raise ValueError(f"grad_output has shape {tuple(g.shape)}, fn's output has {y.shape}")
        return g
    if y.size == 1:
        return xp.ones(y.data.shape, dtype=xp.float64)
    return xp.asarray(_rng(rng).standard_normal(y.shape))


def _analytic(fn, arrays, diff, grad_output, rng):
    ts = _tensors(arrays, diff)
    y = _output(fn, ts)
    gy = _upstream(y, grad_output, rng)
    if not y.requires_grad:
        grads = [None] * len(ts)
    else:
        y.backward(gy)
        grads = [t.grad if d else None for t, d in zip(ts, diff)]
    for i, (g, a, d) in enumerate(zip(grads, arrays, diff)):
        if d and g is not None:
            if tuple(g.shape) != tuple(a.shape):
                raise GradcheckError(f"input {i}: gradient shape {tuple(g.shape)} != input shape {tuple(a.shape)}")
            if g.dtype != np.float64:
                raise GradcheckError(f"input {i}: gradient dtype {g.dtype} for a float64 input")
    return grads, gy


def check_backward(fn, inputs, eps=1e-6, rtol=1e-5, atol=1e-8, rng=None, grad_output=None, no_grads=()):
    """Directional finite-difference check of ``fn``'s backward over all float inputs at once.

    fn(*tensors) -> Tensor; inputs: arrays/Tensors (copied to float64).
    Passes when |numeric - analytic| <= atol + rtol * max(|numeric|, |analytic|).
    """
    rng = _rng(rng)
    arrays, diff = _prepare(inputs, no_grads)
    if not any(diff):
        raise ValueError("check_backward: no float input to differentiate")
    grads, gy = _analytic(fn, arrays, diff, grad_output, rng)

    dirs = []
    for a, d in zip(arrays, diff):
        dirs.append(array_module(a).asarray(rng.standard_normal(a.shape)) if d else None)
    norm = np.sqrt(sum(float((v * v).sum()) for v in dirs if v is not None))
    dirs = [None if v is None else v / norm for v in dirs]

    contrib = []
    for g, v in zip(grads, dirs):
        contrib.append(0.0 if v is None or g is None else float((g * v).sum()))
    analytic = float(np.sum(contrib))

    plus = [a + eps * v if v is not None else a for a, v in zip(arrays, dirs)]
    minus = [a - eps * v if v is not None else a for a, v in zip(arrays, dirs)]
    numeric = (_loss_value(fn, plus, diff, gy) - _loss_value(fn, minus, diff, gy)) / (2.0 * eps)

    err = abs(numeric - analytic)
    tol = atol + rtol * max(abs(numeric), abs(analytic))
    if not (np.isfinite(numeric) and np.isfinite(analytic) and err <= tol):
        raise GradcheckError(
            f"directional derivative mismatch: numeric {numeric!r}, analytic {analytic!r}, "
            f"|diff| {err:.3e} > tol {tol:.3e} (atol {atol}, rtol {rtol}, eps {eps}); "
            f"analytic contribution per input: {[f'{c:.6g}' for c in contrib]}"
        )
    return {"numeric": numeric, "analytic": analytic, "error": err, "tolerance": tol}


def numerical_gradient(f, x, eps=1e-6) -> np.ndarray:
    """Central-difference gradient of a scalar function ``f(array) -> float`` at float64 ``x``."""
    x = np.array(x, dtype=np.float64, copy=True)
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for k in range(flat.size):
        old = flat[k]
        flat[k] = old + eps
        fp = f(x)
        flat[k] = old - eps
        fm = f(x)
        flat[k] = old
        gflat[k] = (fp - fm) / (2.0 * eps)
    return g


def check_backward_elementwise(fn, inputs, eps=1e-6, rtol=1e-5, atol=1e-8, rng=None, grad_output=None,
                               no_grads=(), max_elements=5000):
    """Per-element finite-difference check of every float input's gradient (tiny inputs only).

    Passes when every entry has |numeric - analytic| <= atol + rtol * |numeric|.
    """
    rng = _rng(rng)
    arrays, diff = _prepare(inputs, no_grads)
    if not any(diff):
        raise ValueError("check_backward_elementwise: no float input to differentiate")
    total = sum(int(a.size) for a, d in zip(arrays, diff) if d)
    if total > max_elements:
        raise ValueError(f"{total} input elements is too many for per-element checks (max {max_elements})")
    grads, gy = _analytic(fn, arrays, diff, grad_output, rng)
    report = {}
    for i, (a, d) in enumerate(zip(arrays, diff)):
        if not d:
            continue
        xp = array_module(a)
        host = to_host(a)

        def f(xi, i=i):
            args = list(arrays)
            args[i] = xp.asarray(xi)
            return _loss_value(fn, args, diff, gy)

        num = numerical_gradient(f, host, eps)
        g = grads[i]
        ana = np.zeros_like(num) if g is None else to_host(g)
        err = np.abs(num - ana)
        tol = atol + rtol * np.abs(num)
        ok = np.isfinite(num) & np.isfinite(ana) & (err <= tol)
        if not ok.all():
            bad = np.argwhere(~ok)
            k = tuple(int(v) for v in bad[0])
            raise GradcheckError(
                f"input {i} (shape {tuple(a.shape)}): {len(bad)} of {num.size} entries differ; first at {k}: "
                f"numeric {num[k]!r}, analytic {ana[k]!r} (atol {atol}, rtol {rtol}, eps {eps}); "
                f"max |diff| {float(np.nanmax(err)) if np.isfinite(err).any() else float('nan'):.3e}"
            )
        report[i] = float(err.max()) if err.size else 0.0
    return report

"""Differentiable ops: each forward on raw arrays with its chain rule right below it.

Every op takes Tensors (or scalars/arrays, which become constants of the
tensor's dtype: float32 is never upcast), returns a Tensor, and registers a
closure ``backward(g) -> (grad per parent)`` on raw arrays. Array calls go
through ``xp = array_module(a)`` so CuPy arrays stay on the device.

Shapes: conv2d NCHW activations with OIHW weights, dense (N, in) with (out, in)
weights, MinMax pairs channels (2k, 2k+1) on axis 1.
"""
from __future__ import annotations

import numpy as np

import kernels
from kernels import registry
from kernels.registry import array_module, is_gpu_array

from .tensor import Tensor, make_result


# ------------------------------------------------------------------ helpers

def _float_dtype_of(*xs):
    """The dtype shared by the float Tensors among ``xs`` (TypeError if they disagree)."""
    dts = {x.dtype for x in xs if isinstance(x, Tensor) and x.dtype.kind == "f"}
    if len(dts) > 1:
        raise TypeError(f"tensors of different float dtypes: {sorted(map(str, dts))}; cast one with .astype()")
    return dts.pop() if dts else None


def as_tensor(x, dtype=None, like=None) -> Tensor:
    """``x`` as a Tensor; a non-Tensor becomes a constant of ``dtype`` on ``like``'s device."""
    if isinstance(x, Tensor):
        return x
    xp = array_module(like.data) if like is not None else array_module(x)
    if dtype is None:
        return Tensor(xp.asarray(x))
    return Tensor(xp.asarray(x, dtype=dtype))


def _binary_operands(a, b):
    """Both operands as Tensors; a non-Tensor takes the float Tensor's dtype (no upcast)."""
    dt = _float_dtype_of(a, b)
    like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else None
    return as_tensor(a, dt, like), as_tensor(b, dt, like)


def unbroadcast(g, shape):
    """Sum ``g`` over the axes that broadcasting added or stretched, back to ``shape``."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, (n, m) in enumerate(zip(shape, g.shape)) if n == 1 and m != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _norm_axes(axis, ndim):
    """``axis`` (None, int or tuple) as a sorted tuple of non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} out of range for a {ndim}-D tensor")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {axis!r}")
    return tuple(sorted(out))


def _expand_to(g, shape, axes, keepdims):
    """Broadcast a reduced gradient ``g`` back to ``shape`` (reduced over ``axes``)."""
    xp = array_module(g)
    if not keepdims:
        g = g.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape)))
    return xp.broadcast_to(g, shape)


def _contig(a):
    return array_module(a).ascontiguousarray(a)


def _scalar(v, dtype):
    """A NumPy scalar of ``dtype`` (so float32 arithmetic stays float32 on NumPy and CuPy)."""
    return np.dtype(dtype).type(v)


# ------------------------------------------------------------------ arithmetic

def add(a, b) -> Tensor:
    """a + b with broadcasting."""
    a, b = _binary_operands(a, b)
    out = a.data + b.data

    def backward(g):  # d(a+b) = da + db, summed over broadcast axes
        return unbroadcast(g, a.shape), unbroadcast(g, b.shape)

    return make_result(out, (a, b), backward, "add")


def sub(a, b) -> Tensor:
    """a - b with broadcasting."""
    a, b = _binary_operands(a, b)
    out = a.data - b.data

    def backward(g):
        return unbroadcast(g, a.shape), unbroadcast(-g, b.shape) if b.requires_grad else None

    return make_result(out, (a, b), backward, "sub")


def mul(a, b) -> Tensor:
    """a * b with broadcasting."""
    a, b = _binary_operands(a, b)
    out = a.data * b.data

    def backward(g):  # d(ab) = b da + a db
        ga = unbroadcast(g * b.data, a.shape) if a.requires_grad else None
        gb = unbroadcast(g * a.data, b.shape) if b.requires_grad else None
        return ga, gb

    return make_result(out, (a, b), backward, "mul")


def div(a, b) -> Tensor:
    """a / b with broadcasting."""
    a, b = _binary_operands(a, b)
    out = a.data / b.data

    def backward(g):  # d(a/b) = da / b - a db / b^2 = (da - out db) / b
        gq = g / b.data
        ga = unbroadcast(gq, a.shape) if a.requires_grad else None
        gb = unbroadcast(-gq * out, b.shape) if b.requires_grad else None
        return ga, gb

    return make_result(out, (a, b), backward, "div")


def neg(a) -> Tensor:
    """-a."""
    a = as_tensor(a)

    def backward(g):
        return (-g,)

    return make_result(-a.data, (a,), backward, "neg")


def power(a, exponent) -> Tensor:
    """a ** p for a constant scalar p."""
    if isinstance(exponent, Tensor) or np.ndim(exponent) != 0:
        raise TypeError("power() supports a constant scalar exponent only")
    a = as_tensor(a)
    p = float(exponent)
    out = a.data ** _scalar(p, a.dtype)

    def backward(g):  # d(a^p) = p a^(p-1) da
        return (g * _scalar(p, a.dtype) * a.data ** _scalar(p - 1.0, a.dtype),)

    return make_result(out, (a,), backward, "power")


def square(a) -> Tensor:
    """a * a (elementwise)."""
    a = as_tensor(a)

    def backward(g):
        return (g * (a.data + a.data),)

    return make_result(a.data * a.data, (a,), backward, "square")


def astype(a, dtype) -> Tensor:
    """Cast to ``dtype``; the gradient is cast back to the input's dtype."""
    a = as_tensor(a)
    dtype = np.dtype(dtype)
    src = a.dtype

    def backward(g):
        return (g.astype(src),)

    return make_result(a.data.astype(dtype), (a,), backward, "astype")


# ------------------------------------------------------------------ matmul

def matmul(a, b) -> Tensor:
    """a @ b.  (..., n, k) @ (..., k, m) -> (..., n, m); 1-D operands as in NumPy."""
    a, b = _binary_operands(a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul needs at least 1-D operands, got shapes {a.shape} and {b.shape}")
    if a.ndim == 1:  # (k,) -> (1, k), then drop the 1
        return reshape(matmul(reshape(a, (1, a.shape[0])), b), b.shape[:-2] + (b.shape[-1],)
                       if b.ndim > 1 else ())
    if b.ndim == 1:
        return reshape(matmul(a, reshape(b, (b.shape[0], 1))), a.shape[:-1])
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"matmul shape mismatch: {a.shape} @ {b.shape} (inner dims {a.shape[-1]} != {b.shape[-2]})"
        )
    xp = array_module(a.data)
    out = xp.matmul(a.data, b.data)

    def backward(g):  # dC = dA B + A dB  =>  gA = g B^T, gB = A^T g (summed over broadcast batch)
        ga = unbroadcast(xp.matmul(g, xp.swapaxes(b.data, -1, -2)), a.shape) if a.requires_grad else None
        gb = unbroadcast(xp.matmul(xp.swapaxes(a.data, -1, -2), g), b.shape) if b.requires_grad else None
        return ga, gb

    return make_result(out, (a, b), backward, "matmul")


# ------------------------------------------------------------------ reductions

def sum(x, axis=None, keepdims=False) -> Tensor:  # noqa: A001 (mirrors numpy)
    """Sum over ``axis`` (None = all)."""
    x = as_tensor(x)
    axes = _norm_axes(axis, x.ndim)
    out = x.data.sum(axis=axes, keepdims=keepdims)

    def backward(g):  # every summand gets the upstream gradient
        return (_expand_to(g, x.shape, axes, keepdims),)

    return make_result(out, (x,), backward, "sum")


def mean(x, axis=None, keepdims=False) -> Tensor:
    """Mean over ``axis`` (None = all)."""
    x = as_tensor(x)
    axes = _norm_axes(axis, x.ndim)
    n = int(np.prod([x.shape[i] for i in axes])) if axes else 1
    if n == 0:
        raise ValueError(f"mean over an empty axis of shape {x.shape}")
    inv = _scalar(1.0 / n, x.dtype)
    out = x.data.sum(axis=axes, keepdims=keepdims) * inv

    def backward(g):
        return (_expand_to(g * inv, x.shape, axes, keepdims),)

    return make_result(out, (x,), backward, "mean")


def _argmax_flat(data, axes):
    """Move ``axes`` to the end and merge them: (kept..., prod(axes))."""
    xp = array_module(data)
    k = len(axes)
    moved = xp.moveaxis(data, axes, tuple(range(data.ndim - k, data.ndim)))
    kept = moved.shape[: data.ndim - k]
    return moved.reshape(kept + (-1,)), moved.shape


def max(x, axis=None, keepdims=False) -> Tensor:  # noqa: A001
    """Max over ``axis``; the gradient goes to ONE entry per reduction: the first argmax."""
    x = as_tensor(x)
    return _extremum(x, axis, keepdims, "max")


def min(x, axis=None, keepdims=False) -> Tensor:  # noqa: A001
    """Min over ``axis``; the gradient goes to the first argmin."""
    x = as_tensor(x)
    return _extremum(x, axis, keepdims, "min")


def _extremum(x, axis, keepdims, kind):
    if x.size == 0:
        raise ValueError(f"{kind} of an empty tensor (shape {x.shape})")
    xp = array_module(x.data)
    axes = _norm_axes(axis, x.ndim)
    flat, moved_shape = _argmax_flat(x.data, axes)
    idx = flat.argmax(axis=-1) if kind == "max" else flat.argmin(axis=-1)
    val = xp.take_along_axis(flat, idx[..., None], axis=-1)[..., 0]
    out_shape = tuple(1 if i in axes else n for i, n in enumerate(x.shape)) if keepdims else \
        tuple(n for i, n in enumerate(x.shape) if i not in axes)
    out = val.reshape(out_shape)

    def backward(g):  # one-hot of the first arg-extremum along the merged axes
        gk = g.reshape(idx.shape)
        hot = xp.arange(flat.shape[-1]) == idx[..., None]
        gflat = xp.where(hot, gk[..., None], xp.zeros((), dtype=g.dtype))
        k = len(axes)
        gmoved = gflat.reshape(moved_shape)
        return (xp.moveaxis(gmoved, tuple(range(x.ndim - k, x.ndim)), axes),)

    return make_result(out, (x,), backward, kind)


# ------------------------------------------------------------------ shapes

def reshape(x, shape) -> Tensor:
    """Reshape (one -1 allowed)."""
    x = as_tensor(x)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    try:
        out = x.data.reshape(shape)
    except ValueError:
        raise ValueError(f"cannot reshape a tensor of shape {x.shape} into {shape}") from None

    def backward(g):
        return (g.reshape(x.shape),)

    return make_result(out, (x,), backward, "reshape")


def flatten(x) -> Tensor:
    """(N, ...) -> (N, prod(...)): keeps the batch axis."""
    x = as_tensor(x)
    if x.ndim < 1:
        raise ValueError("flatten needs a batch axis, got a 0-d tensor")
    return reshape(x, (x.shape[0], -1) if x.shape[0] else (0, int(np.prod(x.shape[1:]))))


def transpose(x, axes=None) -> Tensor:
    """Permute axes (None reverses them)."""
    x = as_tensor(x)
    axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(int(a) % x.ndim for a in axes)
    if sorted(axes) != list(range(x.ndim)):
        raise ValueError(f"axes {axes} are not a permutation of the {x.ndim} axes of shape {x.shape}")
    inv = tuple(np.argsort(axes))
    xp = array_module(x.data)

    def backward(g):
        return (xp.transpose(g, inv),)

    return make_result(xp.transpose(x.data, axes), (x,), backward, "transpose")


def _raw_index(index, xp):
    """Tensors inside an index become their arrays; host index arrays move to x's device."""
    def one(i):
        i = i.data if isinstance(i, Tensor) else i
        if xp is not np and isinstance(i, (np.ndarray, list)):
            return xp.asarray(i)
        return i

    return tuple(one(i) for i in index) if isinstance(index, tuple) else one(index)


def _is_basic(index) -> bool:
    """True for ints, slices, None and Ellipsis only (no gather, no repeated entries)."""
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, np.integer, slice)) or i is None or i is Ellipsis for i in items)


def _scatter_add(target, index, values):
    """target[index] += values, with repeated indices accumulating."""
    if is_gpu_array(target):
        import cupyx

        cupyx.scatter_add(target, index, values)
    else:
        np.add.at(target, index, values)


def getitem(x, index) -> Tensor:
    """x[index]: basic slicing, integer-array gather and boolean masks."""
    x = as_tensor(x)
    xp = array_module(x.data)
    index = _raw_index(index, xp)
    out = x.data[index]
    basic = _is_basic(index)

    def backward(g):  # scatter the gradient back; repeated gathers accumulate
        gx = xp.zeros(x.shape, dtype=g.dtype)
        if basic:
            gx[index] = g
        else:
            _scatter_add(gx, index, g)
        return (gx,)

    return make_result(out, (x,), backward, "getitem")


def take_along_axis(x, indices, axis=-1) -> Tensor:
    """Like ``numpy.take_along_axis``: e.g. x (N, m), indices (N, 1) int -> x[n, indices[n, 0]]."""
    x = as_tensor(x)
    xp = array_module(x.data)
    idx = indices.data if isinstance(indices, Tensor) else indices
    idx = idx if is_gpu_array(idx) else np.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    if idx.ndim != x.ndim:
        raise ValueError(f"indices must have x's ndim {x.ndim} (shape {x.shape}), got shape {tuple(idx.shape)}")
    axis = _norm_axes(axis, x.ndim)[0]
    n = x.shape[axis]
    # checked where the indices live: host indices for device data cost an upload, no sync
    if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise IndexError(f"index out of range for axis {axis} of size {n}")
    idx = xp.asarray(idx)
    out = xp.take_along_axis(x.data, idx, axis=axis)

    def backward(g):  # scatter-add along ``axis``: open index grids on the other axes
        gx = xp.zeros(x.shape, dtype=g.dtype)
        full = []
        for d in range(x.ndim):
            if d == axis:
                full.append(idx % n)
            else:
                shp = [1] * x.ndim
                shp[d] = idx.shape[d]
                full.append(xp.arange(idx.shape[d]).reshape(shp))
        bidx = tuple(xp.broadcast_to(a, idx.shape) for a in full)
        _scatter_add(gx, bidx, g)
        return (gx,)

    return make_result(out, (x,), backward, "take_along_axis")


def gather(x, labels) -> Tensor:
    """Per-row pick: x (N, m), labels (N,) int -> (N,) with x[n, labels[n]]."""
    x = as_tensor(x)
    lab = labels.data if isinstance(labels, Tensor) else labels
    lab = lab if is_gpu_array(lab) else np.asarray(lab)   # host labels stay on the host until indexed
    if x.ndim != 2 or lab.shape != (x.shape[0],):
        raise ValueError(f"gather needs x (N, m) and labels (N,), got {x.shape} and {tuple(lab.shape)}")
    return reshape(take_along_axis(x, lab.reshape(-1, 1), axis=1), (x.shape[0],))


take = gather


def concatenate(tensors, axis=0) -> Tensor:
    """Join along ``axis``; the gradient is split back into the pieces."""
    ts = list(tensors)
    if not ts:
        raise ValueError("concatenate needs at least one tensor")
    dt = _float_dtype_of(*ts)
    like = next((t for t in ts if isinstance(t, Tensor)), None)
    ts = [as_tensor(t, dt, like) for t in ts]
    xp = array_module(ts[0].data)
    axis = _norm_axes(axis, ts[0].ndim)[0]
    out = xp.concatenate([t.data for t in ts], axis=axis)
    bounds = np.cumsum([0] + [t.shape[axis] for t in ts])

    def backward(g):
        sl = [slice(None)] * g.ndim
        res = []
        for t, lo, hi in zip(ts, bounds[:-1], bounds[1:]):
            sl[axis] = slice(int(lo), int(hi))
            res.append(g[tuple(sl)] if t.requires_grad else None)
        return tuple(res)

    return make_result(out, tuple(ts), backward, "concatenate")


def stack(tensors, axis=0) -> Tensor:
    """Stack along a new ``axis``."""
    ts = list(tensors)
    if not ts:
        raise ValueError("stack needs at least one tensor")
    ax = axis % (as_tensor(ts[0]).ndim + 1)
    parts = []
    for t in ts:
        t = as_tensor(t)
        parts.append(reshape(t, t.shape[:ax] + (1,) + t.shape[ax:]))
    return concatenate(parts, axis=ax)


def where(cond, a, b) -> Tensor:
    """cond ? a : b elementwise with broadcasting; ``cond`` is a constant boolean array."""
    c = cond.data if isinstance(cond, Tensor) else cond
    a, b = _binary_operands(a, b)
    xp = array_module(a.data)
    c = xp.asarray(c)
    if c.dtype != bool:
        raise TypeError(f"where() needs a boolean condition, got dtype {c.dtype}")
    out = xp.where(c, a.data, b.data)
    zero = xp.zeros((), dtype=out.dtype)

    def backward(g):  # each branch gets the gradient where it was chosen
        g = xp.broadcast_to(g, out.shape)
        ga = unbroadcast(xp.where(c, g, zero), a.shape) if a.requires_grad else None
        gb = unbroadcast(xp.where(c, zero, g), b.shape) if b.requires_grad else None
        return ga, gb

    return make_result(out, (a, b), backward, "where")


def masked_fill(x, mask, value) -> Tensor:
    """x with ``value`` where ``mask`` is True (no gradient there)."""
    x = as_tensor(x)
    return where(mask, as_tensor(value, x.dtype, x), x)


# ------------------------------------------------------------------ elementwise

def exp(x) -> Tensor:
    x = as_tensor(x)
    out = array_module(x.data).exp(x.data)

    def backward(g):  # d exp = exp dx
        return (g * out,)

    return make_result(out, (x,), backward, "exp")


def log(x) -> Tensor:
    x = as_tensor(x)
    out = array_module(x.data).log(x.data)

    def backward(g):  # d log = dx / x
        return (g / x.data,)

    return make_result(out, (x,), backward, "log")


def sqrt(x) -> Tensor:
    x = as_tensor(x)
    out = array_module(x.data).sqrt(x.data)

    def backward(g):  # d sqrt = dx / (2 sqrt)
        return (g / (out + out),)

    return make_result(out, (x,), backward, "sqrt")


def abs(x) -> Tensor:  # noqa: A001
    """|x|; gradient sign(x) (0 at 0)."""
    x = as_tensor(x)
    xp = array_module(x.data)

    def backward(g):
        return (g * xp.sign(x.data),)

    return make_result(xp.abs(x.data), (x,), backward, "abs")


def _cpu_kernel(op, like, *args):
    """The CPU kernel registered as ``op`` (on the backend selected for ``like``) applied to
    args; None for GPU arrays or where that backend lacks the op or is unavailable. Only
    the lookup may fall back: an error inside the kernel is raised, not hidden."""
    if is_gpu_array(like):
        return None
    name = registry.select(op, like)
    if not registry.has(op, name):
        return None
    return registry.get(op, name)(*args)


def _relu_grad(out, g):
    """g where out > 0, else 0: the CPU kernel registered as "relu_grad" (one fused pass),
    else np.where (GPU arrays, or a backend without the op)."""
    gx = _cpu_kernel("relu_grad", g, out, g)
    if gx is None:
        xp = array_module(g)
        gx = xp.where(out > 0, g, xp.zeros((), dtype=g.dtype))
    return gx


def _relu_grad_bias(out, g):
    """(_relu_grad(out, g), its sum over every axis but 1) in one pass with the CPU kernel
    "relu_grad_bias"; else (_relu_grad(out, g), None), the sum left to the caller's bias
    gradient (GPU arrays)."""
    both = _cpu_kernel("relu_grad_bias", g, out, g)
    return both if both is not None else (_relu_grad(out, g), None)


def relu(x) -> Tensor:
    """max(x, 0); the gradient at exactly 0 is 0."""
    x = as_tensor(x)
    xp = array_module(x.data)
    out = xp.maximum(x.data, _scalar(0, x.dtype))  # NaN propagates (a where() would hide it)

    def backward(g):  # out > 0 exactly where x > 0: no mask kept alive
        return (_relu_grad(out, g),)

    return make_result(out, (x,), backward, "relu")


def l2_norm(x, axis=None, keepdims=False) -> Tensor:
    """sqrt(sum x^2) over ``axis``, computed as m sqrt(sum (x/m)^2) with m = max|x|.

    The scaling keeps tiny (float32 underflow of x^2) and huge (overflow) entries
    exact. Gradient x / ||x||. Where ||x|| is exactly 0 the gradient is 0: a
    valid subgradient (0 lies in the unit ball, the subdifferential there), and
    never NaN.
    """
    x = as_tensor(x)
    xp = array_module(x.data)
    axes = _norm_axes(axis, x.ndim)
    amax = xp.abs(x.data).max(axis=axes, keepdims=True) if x.size else xp.zeros((), dtype=x.dtype)
    nz = amax > 0
    scale = xp.where(nz, amax, xp.ones((), dtype=x.dtype))
    xs = x.data / scale
    nk = scale * xp.sqrt((xs * xs).sum(axis=axes, keepdims=True))
    nk = xp.where(nz, nk, xp.zeros((), dtype=x.dtype))
    out = nk if keepdims else nk.reshape(tuple(n for i, n in enumerate(x.shape) if i not in axes))

    def backward(g):  # d||x|| = <x, dx> / ||x||  (0 where ||x|| = 0)
        gk = g.reshape(nk.shape)
        pos = nk > 0
        safe = xp.where(pos, nk, xp.ones((), dtype=nk.dtype))
        return (x.data * xp.where(pos, gk / safe, xp.zeros((), dtype=nk.dtype)),)

    return make_result(out, (x,), backward, "l2_norm")


def _max_shift(a, axes, xp):
    """The max over ``axes`` (keepdims) for a stable exp; 0 where a row is all -inf."""
    m = a.max(axis=axes, keepdims=True)
    return xp.where(xp.isfinite(m), m, xp.zeros((), dtype=m.dtype))


def logsumexp(x, axis=-1, keepdims=False) -> Tensor:
    """log(sum exp x) over ``axis``, shifted by the max for stability."""
    x = as_tensor(x)
    xp = array_module(x.data)
    axes = _norm_axes(axis, x.ndim)
    m = _max_shift(x.data, axes, xp)
    s = xp.exp(x.data - m).sum(axis=axes, keepdims=True)
    lk = xp.log(s) + m
    out = lk if keepdims else lk.reshape(tuple(n for i, n in enumerate(x.shape) if i not in axes))

    def backward(g):  # d lse = softmax dx
        return (g.reshape(lk.shape) * xp.exp(x.data - lk),)

    return make_result(out, (x,), backward, "logsumexp")


def log_softmax(x, axis=-1) -> Tensor:
    """x - logsumexp(x): stable (shifted by the max); -inf logits give -inf."""
    x = as_tensor(x)
    xp = array_module(x.data)
    ax = _norm_axes(axis, x.ndim)
    m = _max_shift(x.data, ax, xp)
    z = x.data - m
    out = z - xp.log(xp.exp(z).sum(axis=ax, keepdims=True))

    def backward(g):  # gx = g - softmax * sum(g)
        return (g - xp.exp(out) * g.sum(axis=ax, keepdims=True),)

    return make_result(out, (x,), backward, "log_softmax")


def softmax(x, axis=-1) -> Tensor:
    """exp(x) / sum exp(x), stable."""
    x = as_tensor(x)
    xp = array_module(x.data)
    ax = _norm_axes(axis, x.ndim)
    m = _max_shift(x.data, ax, xp)
    e = xp.exp(x.data - m)
    out = e / e.sum(axis=ax, keepdims=True)

    def backward(g):  # gx = s * (g - sum(g s))
        return (out * (g - (g * out).sum(axis=ax, keepdims=True)),)

    return make_result(out, (x,), backward, "softmax")


# ------------------------------------------------------------------ layers' ops (kernels)

def _kernel_operands(x, w, b):
    """x, w, b as Tensors; constant arrays take the float Tensors' dtype (the kernels need one dtype)."""
    dt = _float_dtype_of(x, w, b)
    like = next((t for t in (x, w, b) if isinstance(t, Tensor)), None)
    return as_tensor(x, dt, like), as_tensor(w, dt, like), None if b is None else as_tensor(b, dt, like)


def _relu_inplace(out):
    """max(out, 0) written over ``out`` (a fresh kernel output nobody else holds): NaN stays."""
    array_module(out).maximum(out, _scalar(0, out.dtype), out=out)
    return out


def conv2d(x, w, b=None, stride=1, padding="same", relu=False) -> Tensor:
    """x (N, C, H, W), w (O, C, kh, kw), b (O,) or None -> (N, O, OH, OW).

    padding "same" (TensorFlow), "valid" or int; validation is the kernel API's.
    relu=True returns relu(conv2d(...)) as one node: the same values and gradients as
    ``relu(conv2d(...))``, but the ReLU is applied by the kernel (fused per chunk, or in
    place on its output), so the pre-activation is neither kept alive for backward nor
    copied (less memory and one fresh array fewer per layer).
    """
    x, w, b = _kernel_operands(x, w, b)
    parents = (x, w) if b is None else (x, w, b)
    bdata = None if b is None else b.data
    out = kernels.conv2d(_contig(x.data), _contig(w.data), bdata, stride, padding, relu=relu)
    kh, kw = w.shape[2], w.shape[3]

    def backward(g):  # gx = transposed conv of g; gw = correlation of x with g; gb = sum of g
        gb = None
        if relu and b is not None and b.requires_grad:
            g, gb = _relu_grad_bias(out, g)
        elif relu:
            g = _relu_grad(out, g)
        g = _contig(g)
        gx = kernels.conv2d_grad_input(g, _contig(w.data), x.shape, stride, padding) if x.requires_grad else None
        gw = kernels.conv2d_grad_weight(_contig(x.data), g, (kh, kw), stride, padding) if w.requires_grad else None
        if b is None:
            return gx, gw
        if gb is None and b.requires_grad:
            gb = kernels.conv2d_grad_bias(g)
        return gx, gw, gb

    return make_result(out, parents, backward, "conv2d_relu" if relu else "conv2d")


def conv2d_transpose(u, w, x_shape, stride=1, padding="same") -> Tensor:
    """A^T u for the conv operator A of ``conv2d(., w, None, stride, padding)`` on inputs
    of shape x_shape (N, C, H, W): u (N, O, OH, OW) -> (N, C, H, W), differentiable in u and w.

    Backward from <A^T u, g> = <u, A g>: gu = A g (a conv of g), gw = the weight gradient
    of that conv with input g and output gradient u.
    """
    u, w, _ = _kernel_operands(u, w, None)
    x_shape = tuple(int(v) for v in x_shape)
    out = kernels.conv2d_adjoint(_contig(u.data), _contig(w.data), x_shape, stride, padding)
    kh, kw = w.shape[2], w.shape[3]

    def backward(g):
        g = _contig(g)
        gu = kernels.conv2d(g, _contig(w.data), None, stride, padding) if u.requires_grad else None
        gw = kernels.conv2d_grad_weight(g, _contig(u.data), (kh, kw), stride, padding) if w.requires_grad else None
        return gu, gw

    return make_result(out, (u, w), backward, "conv2d_transpose")


def dense(x, w, b=None, relu=False) -> Tensor:
    """x (N, in), w (out, in), b (out,) or None -> x w^T + b, (N, out).

    relu=True: relu(dense(...)) as one node, ReLU in place (see conv2d)."""
    x, w, b = _kernel_operands(x, w, b)
    parents = (x, w) if b is None else (x, w, b)
    bdata = None if b is None else b.data
    out = kernels.dense(_contig(x.data), _contig(w.data), bdata)
    if relu:
        _relu_inplace(out)

    def backward(g):  # gx = g W ; gW = g^T x ; gb = sum_n g
        if relu:
            g = _relu_grad(out, g)
        g = _contig(g)
        gx = kernels.dense_grad_input(g, _contig(w.data)) if x.requires_grad else None
        gw = kernels.dense_grad_weight(_contig(x.data), g) if w.requires_grad else None
        if b is None:
            return gx, gw
        gb = kernels.dense_grad_bias(g) if b.requires_grad else None
        return gx, gw, gb

    return make_result(out, parents, backward, "dense_relu" if relu else "dense")


def minmax(x) -> Tensor:
    """GroupSort-2 on axis 1: channels (2k, 2k+1) -> (min, max). Ties keep identity routing."""
    x = as_tensor(x)
    xd = _contig(x.data)
    out = kernels.minmax(xd)

    def backward(g):  # a permutation per pair: route each gradient back to where it came from
        return (kernels.minmax_grad(xd, _contig(g)),)

    return make_result(out, (x,), backward, "minmax")

"""The autodiff core: ``Tensor``, the define-by-run graph and the backward sweep.

A Tensor wraps one raw array (NumPy on the CPU, CuPy on the GPU) in ``.data``.
Every differentiable op (nn/functions.py) computes its forward on raw arrays and,
when grad mode is on and some input requires a gradient, returns a Tensor that
remembers its parents and a closure ``backward(g) -> (g_parent, ...)`` on raw
arrays. ``Tensor.backward`` sorts the graph topologically and sweeps it in
reverse; gradients accumulate into ``.grad`` of the leaves (tensors that require
a gradient and were not produced by an op), and of any tensor that called
``retain_grad()``. No higher-order gradients: backward closures use raw arrays.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from kernels import buffers
from kernels.registry import array_module, is_gpu_array

# grad mode per thread, as in PyTorch: the engine runs work on thread pools, and a
# no_grad() in one thread must not switch graph building off (or on) in another
_MODE = threading.local()


def is_grad_enabled() -> bool:
    """True unless inside ``no_grad()`` (in this thread)."""
    return getattr(_MODE, "enabled", True)


@contextlib.contextmanager
def _grad_mode(enabled: bool):
    prev = is_grad_enabled()
    _MODE.enabled = enabled
    try:
        yield
    finally:
        _MODE.enabled = prev


def no_grad():
    """Context manager: ops inside build no graph (outputs never require a gradient)."""
    return _grad_mode(False)


def enable_grad():
    """Context manager: turn graph building back on (e.g. inside ``no_grad``)."""
    return _grad_mode(True)


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray) or is_gpu_array(x)


def _is_float(dtype) -> bool:
    return np.dtype(dtype).kind == "f"


def _owned_copy(g):
    """A fresh copy of ``g`` for a leaf's .grad; large NumPy ones from the kernels' buffer
    pool (a 512x3136 weight gradient was 6.4 MB of fresh pages every step)."""
    if isinstance(g, np.ndarray):
        out = buffers.empty(g.shape, g.dtype)
        np.copyto(out, g)
        return out
    return g.copy()


class Tensor:
    """An array plus, optionally, its place in the autodiff graph.

    Tensor(data, requires_grad=False, name=None): ``data`` is a NumPy/CuPy array
    (kept as is, no copy, same device) or anything ``np.asarray`` accepts.
    Only float tensors may require a gradient.
    """

    # numpy must defer to our reflected operators (ndarray + Tensor -> Tensor.__radd__)
    __array_ufunc__ = None
    __array_priority__ = 1000

    def __init__(self, data, requires_grad: bool = False, name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        elif not _is_array(data):
            data = np.asarray(data)
        if requires_grad and not _is_float(data.dtype):
            raise TypeError(f"only float tensors can require a gradient, got dtype {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.name = name
        self._parents: tuple = ()
        self._backward = None  # closure g -> tuple of parent grads (None for a leaf)
        self._op = None  # name of the op that produced this tensor (for error messages)
        self._retain = False

    # ------------------------------------------------------------ array facts
    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def is_leaf(self) -> bool:
        return self._backward is None

    @property
    def xp(self):
        """numpy or cupy, whichever holds ``data``."""
        return array_module(self.data)

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        extra = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device=gpu" if is_gpu_array(self.data) else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{dev}{extra})"

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied to the host if it lives on the GPU)."""
        return self.data.get() if is_gpu_array(self.data) else self.data

    def item(self) -> float:
        if self.size != 1:
            raise ValueError(f"item() needs a tensor of one element, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def detach(self) -> "Tensor":
        """A constant tensor sharing ``data`` (no graph, no gradient)."""
        return Tensor(self.data)

    def retain_grad(self) -> "Tensor":
        """Keep this (non-leaf) tensor's gradient in ``.grad`` after backward."""
        self._retain = True
        return self

    def zero_grad(self) -> None:
        self.grad = None

    # ------------------------------------------------------------ backward
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) * grad into ``.grad`` of every leaf below.

        grad: upstream gradient of ``self``'s shape (array, Tensor or scalar);
        optional only when ``self`` has one element (then 1).
        retain_graph: keep the graph for another backward. By default each op's
        saved arrays are released as the sweep passes it (as in PyTorch), so a
        training loop never holds two steps' activations at once; a second
        backward through a released op raises RuntimeError.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() on a tensor that does not require a gradient "
                "(no input required one, or it was built under no_grad())"
            )
        xp = self.xp
        if grad is None:
            if self.size != 1:
                raise ValueError(
                    f"backward() without grad needs a one-element tensor, got shape {self.shape}; "
                    "pass grad= of the same shape"
                )
            grad = xp.ones(self.data.shape, dtype=self.dtype)
        else:
            if isinstance(grad, Tensor):
                grad = grad.data
            grad = xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.data.shape:
                if grad.size == 1 and self.size == 1:
                    grad = grad.reshape(self.data.shape)
                else:
                    raise ValueError(f"grad has shape {tuple(grad.shape)}, tensor has shape {self.shape}")

        order = _toposort(self)
        grads = {id(self): grad}
        for node in reversed(order):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._backward is None or node._retain:
                # a leaf (or retained): own a fresh, writable copy, then accumulate
                node.grad = _owned_copy(g) if node.grad is None else node.grad + g
            if node._backward is None:
                continue
            pgrads = node._backward(g)
            parents = node._parents
            if not retain_graph:
                node._backward, node._parents = _released, ()
            for p, gp in zip(parents, pgrads):
                if gp is None or not p.requires_grad:
                    continue
                if gp.shape != p.data.shape or gp.dtype != p.dtype:
                    raise RuntimeError(
                        f"op {node._op!r} returned a gradient of shape {tuple(gp.shape)} dtype "
                        f"{gp.dtype} for an input of shape {p.shape} dtype {p.dtype}"
                    )
                k = id(p)
                grads[k] = gp if k not in grads else grads[k] + gp

    # ------------------------------------------------------------ operators
    def __add__(self, other):
        return F.add(self, other)

    def __radd__(self, other):
        return F.add(other, self)

    def __sub__(self, other):
        return F.sub(self, other)

    def __rsub__(self, other):
        return F.sub(other, self)

    def __mul__(self, other):
        return F.mul(self, other)

    def __rmul__(self, other):
        return F.mul(other, self)

    def __truediv__(self, other):
        return F.div(self, other)

    def __rtruediv__(self, other):
        return F.div(other, self)

    def __neg__(self):
        return F.neg(self)

    def __pow__(self, exponent):
        return F.power(self, exponent)

    def __matmul__(self, other):
        return F.matmul(self, other)

    def __rmatmul__(self, other):
        return F.matmul(other, self)

    def __getitem__(self, index):
        return F.getitem(self, index)

    # ------------------------------------------------------------ methods
    def sum(self, axis=None, keepdims=False):
        return F.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return F.mean(self, axis, keepdims)

    def max(self, axis=None, keepdims=False):
        return F.max(self, axis, keepdims)

    def min(self, axis=None, keepdims=False):
        return F.min(self, axis, keepdims)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return F.reshape(self, shape)

    def flatten(self):
        return F.flatten(self)

    def transpose(self, *axes):
        if len(axes) == 1 and (isinstance(axes[0], (tuple, list)) or axes[0] is None):
            axes = axes[0]
        return F.transpose(self, axes if axes else None)

    @property
    def T(self):
        return F.transpose(self, None)

    def exp(self):
        return F.exp(self)

    def log(self):
        return F.log(self)

    def sqrt(self):
        return F.sqrt(self)

    def astype(self, dtype):
        return F.astype(self, dtype)


class Parameter(Tensor):
    """A trainable leaf: a Tensor with ``requires_grad=True`` and a name."""

    def __init__(self, data, name: str | None = None):
        super().__init__(data, requires_grad=True, name=name)

    def __repr__(self) -> str:
        return f"Parameter(name={self.name!r}, shape={self.shape}, dtype={self.dtype})"


def make_result(data, parents: tuple, backward, op: str) -> Tensor:
    """The output Tensor of an op: wired into the graph when some parent needs a gradient."""
    out = Tensor(data)
    if is_grad_enabled() and any(p.requires_grad for p in parents):
        out.requires_grad = True
        out._parents = parents
        out._backward = backward
        out._op = op
    return out


def _released(g):
    raise RuntimeError(
        "backward through a graph that was already released by an earlier backward(); "
        "pass retain_graph=True to the first backward() to go through it twice"
    )


def _toposort(root: Tensor) -> list:
    """Nodes that require a gradient, every parent before its children (iterative DFS)."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for p in node._parents:
            if p.requires_grad and id(p) not in seen:
                stack.append((p, False))
    return order


from . import functions as F  # noqa: E402  (late: functions imports Tensor from here)

"""Fused element-wise updates (Adam) behind the same registry as the other kernels.

The CPU versions are plain in-place NumPy; GPU backends register single-kernel
versions of the same op names.
"""
from __future__ import annotations

from . import registry
from .checks import check_same_dtype


def adam_update(p, g, m, v, lr_t, beta1, beta2, epsilon, backend=None):
    """One in-place Adam step on arrays of one shape and dtype.

    m <- b1 m + (1-b1) g ; v <- b2 v + (1-b2) g^2 ; p <- p - lr_t m / (sqrt(v) + epsilon),
    where lr_t = lr sqrt(1 - b2^t) / (1 - b1^t) is the bias-corrected step (Keras form).
    """
    shapes = {tuple(a.shape) for a in (p, g, m, v)}
    if len(shapes) != 1:
        raise ValueError(f"adam_update needs arrays of one shape, got {sorted(shapes)}")
    check_same_dtype(p=p, g=g, m=m, v=v)
    fn = registry.get("adam_update", registry.select("adam_update", p, backend))
    fn(p, g, m, v, float(lr_t), float(beta1), float(beta2), float(epsilon))


def _adam_update_cpu(p, g, m, v, lr_t, beta1, beta2, epsilon):
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    p -= lr_t * m / (_sqrt(v) + epsilon)


def _sqrt(a):
    return registry.array_module(a).sqrt(a)


for _b in ("reference", "numpy", "numba"):
    registry.register("adam_update", _b)(_adam_update_cpu)

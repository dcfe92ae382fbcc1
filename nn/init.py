"""Weight initialisers (Keras definitions, adapted to our layouts).

Layouts: dense weights (out, in), conv weights OIHW (out, in, kh, kw).
Fans as Keras computes them: fan_in = in * kh * kw, fan_out = out * kh * kw.
All return NumPy arrays of ``dtype`` (move them to the GPU with the layer).
"""
from __future__ import annotations

import numpy as np


def _rng(rng):
    """A numpy Generator from None, a seed or a Generator."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of ``shape``: (out, in) or (out, in, *kernel)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"fans need a weight of at least 2 dims (out, in, ...), got shape {shape}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def glorot_uniform(shape, rng=None, dtype=np.float32) -> np.ndarray:
    """U(-l, l) with l = sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(shape)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return _rng(rng).uniform(-limit, limit, size=tuple(shape)).astype(dtype)


def glorot_normal(shape, rng=None, dtype=np.float32) -> np.ndarray:
    """N(0, 2 / (fan_in + fan_out)), truncated at 2 standard deviations (Keras' form).

    Keras divides the std by 0.8796..., the std of a unit normal truncated to [-2, 2],
    so the truncated samples keep the intended variance.
    """
    fan_in, fan_out = fans(shape)
    std = np.sqrt(2.0 / (fan_in + fan_out)) / 0.87962566103423978
    g = _rng(rng)
    out = g.standard_normal(size=tuple(shape))
    bad = np.abs(out) > 2.0
    while bad.any():  # resample until every entry lies within 2 std
        out[bad] = g.standard_normal(size=int(bad.sum()))
        bad = np.abs(out) > 2.0
    return (out * std).astype(dtype)


def orthogonal(shape, rng=None, gain=1.0, dtype=np.float32) -> np.ndarray:
    """A weight whose (out, in*kh*kw) matrix has orthonormal rows or columns, times ``gain``.

    Keras draws a normal matrix of shape (max(r, c), min(r, c)) with r = fan of the
    flattened input side and c = out, takes Q of its QR decomposition, fixes signs
    by diag(R) (so Q is Haar-distributed), and transposes when r < c. Our layouts put
    ``out`` first, so we build that (r, c) matrix and transpose it to (out, r):
    orthonormal rows when out <= r, orthonormal columns otherwise.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"orthogonal init needs a weight of at least 2 dims, got shape {shape}")
    c = shape[0]
    r = int(np.prod(shape[1:]))
    a = _rng(rng).standard_normal(size=(max(r, c), min(r, c)))
    q, rr = np.linalg.qr(a)
    d = np.sign(np.diag(rr))
    d[d == 0] = 1.0
    q = q * d[None, :]
    if r < c:  # q is (c, r): already (out, r)
        m = q
    else:  # q is (r, c): columns orthonormal; we need (out, r)
        m = q.T
    return (gain * m).reshape(shape).astype(dtype)


def zeros(shape, rng=None, dtype=np.float32) -> np.ndarray:
    return np.zeros(tuple(shape), dtype=dtype)



_BY_NAME = {
    "glorot_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "orthogonal": orthogonal,
    "zeros": zeros,
}


def get(name):
    """An initialiser by name (or a callable ``fn(shape, rng, dtype)`` passed through)."""
    if callable(name):
        return name
    try:
        return _BY_NAME[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown initialiser {name!r}; known: {sorted(_BY_NAME)}") from None

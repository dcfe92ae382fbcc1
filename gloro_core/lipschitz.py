"""Per-layer linear operators and the power method that estimates their l2 norms.

``op`` below is a linear layer of gloro_core.layers at its real input size (stride and
padding included): it applies the operator A (no bias) and its adjoint A^T with the raw
kernels (``op.apply``, ``op.adjoint``, and ``op.raw_ops`` for the steps' direct backend
calls): no autodiff, so nothing here ever enters a gradient. Each layer keeps one
iterate, shaped like its input with batch 1 (``op.iterate_shape``), updated across
training steps.

Power step (two half-steps, each normalised, so the magnitudes handled are ~sigma and
never sigma**2: tiny weights neither underflow nor get biased by an epsilon):
    u = A v / ||A v||,   v <- A^T u / ||A^T u||,   sigma = ||A v||.
A norm is divided by only when it is not exactly zero; when it is zero the operator
annihilates the iterate, the estimate is 0 and the previous (unit) iterate is kept so
that it can recover once the weights change.

The estimate approaches ||A|| from below: it is *not* a bound. Certification uses the
provable bounds of gloro_core.bounds unless told otherwise.
"""
from __future__ import annotations

import math

import numpy as np

from kernels import registry, threads
from kernels.checks import check_float, check_same_dtype
from kernels.registry import array_module


def _norm(a) -> float:
    """l2 norm accumulated in float64 (a float32 sum of squares could overflow/underflow)."""
    a64 = a.astype(np.float64, copy=False).ravel()
    if isinstance(a, np.ndarray):  # the hot path of the power steps: no module lookups
        # einsum, not np.dot: OpenBLAS threads a ddot of > 10^4 elements, and its worker
        # then busy-waits ~0.1 s, which slowed the next forward pass by 40% (4C3F step)
        return math.sqrt(float(np.einsum("i,i->", a64, a64)))  # IEEE sqrt, as np.sqrt
    return float(array_module(a).sqrt(a64 @ a64))


def power_update_layers(ops, weights, iterates, iters: int) -> list:
    """power_steps(sigma=False) on every layer's iterate; returns the new iterates.

    Layers whose steps run fused in one backend call that releases the GIL (numba's)
    run concurrently on up to kernels.cpu_threads() Python threads (kernels.threads' pool),
    largest first onto the least-loaded thread (4C3F: 13.5 -> ~8 ms a training step on 2 cores); the
    rest (other backends, GPU arrays) run one after the other.
    """
    out = list(iterates)
    n_threads = threads.cpu_threads()
    fused = {}  # layer -> its fused steps
    for i, (op, w, v) in enumerate(zip(ops, weights, iterates)):
        f = _fused_steps(op, w, v) if n_threads > 1 and iters > 0 else None
        if f is None:
            out[i], _ = power_steps(op, w, v, iters, sigma=False)
        else:
            fused[i] = f
    if len(fused) < 2:
        for i, f in fused.items():
            out[i], _ = _run_fused(f, ops[i], weights[i], iterates[i], iters, sigma=False)
        return out
    groups = [[] for _ in range(min(n_threads, len(fused)))]
    load = [0] * len(groups)
    for i in sorted(fused, key=lambda i: -ops[i].flops()):
        t = load.index(min(load))
        groups[t].append(i)
        load[t] += ops[i].flops()

    def run(group):
        return [(i, _run_fused(fused[i], ops[i], weights[i], iterates[i], iters, sigma=False)[0]) for i in group]

    for part in threads.run_parts(run, groups):
        for i, v in part:
            out[i] = v
    return out


def _fused_steps(op, w, v):
    """``f(v, iters) -> (v, ok)`` running all steps in one backend call, or None.

    Used where the backend that the separate ops would select for ``v`` registers
    ``conv2d_power_steps`` / ``dense_power_steps`` (numba: one jitted loop, no Python
    per step). Checks what the API would (the fused call bypasses it) with the same
    errors: float arrays of one dtype, w of the layer's shape, v one iterate.
    """
    name = op.kernel
    if name is None:   # the layer has no fused steps (e.g. a residual I + A)
        return None
    backend = registry.select(name, v)
    if not registry.has(name + "_power_steps", backend):
        return None
    check_float("v", v)
    check_float("w", w)
    check_same_dtype(v=v, w=w)
    if tuple(w.shape) != tuple(op.w_shape):
        raise ValueError(f"w must have shape {tuple(op.w_shape)} for this layer, got {tuple(w.shape)}")
    if tuple(v.shape) != op.iterate_shape:
        raise ValueError(f"the iterate must have shape {op.iterate_shape}, got {tuple(v.shape)}")
    fn = registry.get(name + "_power_steps", backend)
    args = op.kernel_args(w, v)
    return lambda a, n: fn(a, w, n, *args)


def _run_fused(fused, op, w, v, iters: int, sigma: bool):
    """power_steps' result through a function from _fused_steps."""
    v, ok = fused(v, int(iters))
    if ok is False:  # A v or A^T u was exactly 0 (see module docstring); None: not known on
        return v, 0.0  # the host (GPU ops keep the iterate on the device, no sync to ask)
    return v, (_norm(op.apply(w, v)) if sigma else None)


def init_iterate(op, rng, dtype=np.float32):
    """A random unit iterate of shape op.iterate_shape."""
    v = rng.standard_normal(op.iterate_shape)
    v /= np.linalg.norm(v)
    return v.astype(dtype)


def power_steps(op, w, v, iters: int, sigma: bool = True):
    """Run ``iters`` power steps from ``v``; returns (new iterate, sigma = ||A v_new||).

    w: the layer weight (raw array); v: (1, *in_shape), same dtype as w. ``v`` is not
    modified. iters = 0 only evaluates sigma at v. sigma=False skips the final A v and
    returns None for sigma unless a zero norm ended the steps early (then 0.0).
    """
    if iters < 0:
        raise ValueError(f"power iterations must be >= 0, got {iters}")
    fused = _fused_steps(op, w, v) if iters else None
    if fused is not None:
        return _run_fused(fused, op, w, v, iters, sigma)
    u = op.apply(w, v)  # validated through the API; the rest are direct backend calls
    if not iters:
        return v, (_norm(u) if sigma else None)
    apply, adjoint = op.raw_ops(w, v)
    for it in range(int(iters)):
        if it:
            u = apply(v)
        nu = _norm(u)
        if nu == 0.0:  # A v = 0: the estimate is 0, keep v (see module docstring)
            return v, 0.0
        u /= u.dtype.type(nu)  # u and z are fresh kernel outputs: divided in place
        z = adjoint(u)
        nz = _norm(z)
        if nz == 0.0:
            return v, 0.0
        z /= z.dtype.type(nz)
        v = z
    return v, (_norm(apply(v)) if sigma else None)


def converge(op, w, v, tol: float = 1e-5, max_iter: int = 1000, dtype=None):
    """Power method to convergence (or ``max_iter`` steps), in float64 by default.

    Stops when both the relative change of sigma is below ``tol`` and the eigen-residual
    ||A^T A v - sigma^2 v|| / sigma^2 is below tol: a small change of sigma alone
    also happens far from the top singular vector when the top singular values are close.
    Returns (iterate in v's dtype, sigma, iterations used, converged flag); sigma is
    still an estimate from below.
    """
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol}")
    dt = np.float64 if dtype is None else dtype
    xp = array_module(w)
    w_ = xp.asarray(w, dtype=dt)
    x = xp.asarray(v, dtype=dt)
    nx = _norm(x)
    if nx == 0.0:
        raise ValueError("the power iterate is zero")
    x = x / nx
    sigma_prev = -1.0
    for it in range(int(max_iter) + 1):
        u = op.apply(w_, x)
        sigma = _norm(u)
        if sigma == 0.0:
            return x.astype(v.dtype), 0.0, it, True
        z = op.adjoint(w_, u)                       # A^T A x
        lam = sigma * sigma
        res = _norm(z - lam * x) / lam
        if abs(sigma - sigma_prev) <= tol * sigma and res <= tol:
            return x.astype(v.dtype), sigma, it, True
        if it == int(max_iter):
            break
        sigma_prev = sigma
        x = z / _norm(z)
    return x.astype(v.dtype), sigma, int(max_iter), False

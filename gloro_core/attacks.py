"""PGD in l2 (Madry et al.) on this engine: input gradients by nn autodiff.

``pgd_l2(net, x, y, eps, steps, step_size, restarts, rng)`` maximises the cross-entropy
of f (the m logits, no ⊥) at label y over the l2 ball of radius eps around x, with
normalised-gradient steps, projection onto the ball and (optionally) clipping to a box.
"""
from __future__ import annotations

import numpy as np

from kernels.registry import to_host
from nn import functions as F
from nn.tensor import Tensor


def _input_grad(net, xa, y):
    """(per-example CE (n,), d sum CE / d x) at xa (model dtype)."""
    xt = Tensor(net.xp.asarray(xa), requires_grad=True)
    logits = net.forward(xt)
    ce = -F.gather(F.log_softmax(logits, axis=1), y)
    F.sum(ce).backward()
    return to_host(ce.data).astype(np.float64), to_host(xt.grad).astype(np.float64)


def _norms(d):
    return np.sqrt((d.reshape(len(d), -1) ** 2).sum(axis=1))


def _project(delta, eps):
    """Scale each row of delta into the ball of radius eps (scalar or (n,)), 1e-4 inside
    so that float32 rounding of x + delta stays in the ball."""
    nrm = _norms(delta)
    scale = np.where(nrm > eps * (1 - 1e-4), eps * (1 - 1e-4) / np.maximum(nrm, 1e-300), 1.0)
    return delta * scale.reshape((-1,) + (1,) * (delta.ndim - 1))


def pgd_l2(net, x, y, eps, steps=40, step_size=None, restarts=1, rng=None, seed=None, clip=(0.0, 1.0)):
    """Adversarial examples for ``net`` within ||x' - x||_2 <= eps.

    x (n, *input_shape); eps a scalar or per-example (n,); y (n,) int labels (use the
    predicted classes to attack the prediction); step_size default 2.5 eps / steps;
    restarts >= 1 (the first starts at x, the others uniformly in the ball); clip: (lo, hi)
    box or None. Returns x' as a NumPy array of the model dtype, per example the first restart that flips argmax f, else the one with
    the largest loss.
    """
    eps_arr = np.asarray(eps, dtype=np.float64)
    if not np.all(np.isfinite(eps_arr)) or np.any(eps_arr < 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got {steps}, {restarts}")
    xd = to_host(net._check_x(x)[0])
    y = net._check_labels(y, xd.shape[0])
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(seed)
    x64 = xd.astype(np.float64)
    n = len(x64)
    if eps_arr.ndim not in (0, 1) or (eps_arr.ndim == 1 and eps_arr.shape != (n,)):
        raise ValueError(f"eps must be a scalar or of shape ({n},), got shape {eps_arr.shape}")
    eps = np.broadcast_to(eps_arr, (n,))
    step = 2.5 * eps / max(steps, 1) if step_size is None else np.broadcast_to(
        np.asarray(step_size, dtype=np.float64), (n,))
    bshape = (-1,) + (1,) * (x64.ndim - 1)
    best = xd.copy()
    best_loss = np.full(n, -np.inf)
    found = np.zeros(n, dtype=bool)
    for r in range(restarts):
        if r == 0:
            delta = np.zeros_like(x64)
        else:  # uniform in the ball: direction on the sphere, radius eps * U^(1/d)
            g = rng.standard_normal(x64.shape)
            d = g[0].size
            rad = eps * rng.random(n) ** (1.0 / d)
            delta = g / _norms(g).reshape(bshape) * rad.reshape(bshape)
        for _ in range(steps + 1):
            xa = x64 + delta
            if clip is not None:
                xa = np.clip(xa, clip[0], clip[1])
            xa32 = xa.astype(xd.dtype)
            loss, grad = _input_grad(net, xa32, y)
            flipped = net.logits(xa32).argmax(axis=1) != y
            take = (~found) & (flipped | (loss > best_loss))
            best[take] = xa32[take]
            best_loss = np.where(take, loss, best_loss)
            found |= flipped
            gn = _norms(grad)
            unit = grad / np.where(gn > 0, gn, 1.0).reshape((-1,) + (1,) * (grad.ndim - 1))
            delta = _project(xa - x64 + step.reshape(bshape) * unit, eps)
    return best

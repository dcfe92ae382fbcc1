"""Losses on logits, averaged over the batch, stable via log_softmax.

Logits may hold -inf entries (e.g. masked classes): a term whose target
probability is 0 there contributes exactly 0 (never 0 * -inf = NaN), in value
and in gradient.
"""
from __future__ import annotations

import numpy as np

from kernels.registry import array_module, is_gpu_array

from . import functions as F
from .tensor import Tensor


def _check_logits(logits):
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, m), got shape {logits.shape}")
    if logits.dtype.kind != "f":
        raise TypeError(f"logits must be float, got dtype {logits.dtype}")


def _plogq(p, logq):
    """p * logq, with the term set to 0 where p == 0 and logq == -inf (0 log 0 = 0).

    Only those entries are masked (the gradient w.r.t. p there, really -logq = +inf,
    is taken as 0); everywhere else both gradients are the exact ones.
    """
    xp = array_module(logq.data)
    pdata = xp.asarray(p.data if isinstance(p, Tensor) else p)
    keep = (pdata > 0) | xp.isfinite(logq.data)
    return p * F.where(keep, logq, 0.0)


def softmax_cross_entropy(logits, target) -> Tensor:
    """mean_n -log softmax(logits)[n, target[n]], or mean_n -sum_i t[n,i] log softmax(logits)[n,i].

    logits (N, m) Tensor. target: int labels (N,) in [0, m), or probabilities (N, m)
    (array = constant; a Tensor that requires grad also gets a gradient).
    """
    logits = F.as_tensor(logits)
    _check_logits(logits)
    n, m = logits.shape
    logp = F.log_softmax(logits, axis=1)
    tdata = target.data if isinstance(target, Tensor) else target
    xp = array_module(logits.data)
    # integer labels on the host are checked there and uploaded by gather (no device sync)
    tdata = tdata if is_gpu_array(tdata) else np.asarray(tdata)
    if tdata.dtype.kind not in "iu":
        tdata = xp.asarray(tdata)
    if tdata.dtype.kind in "iu":
        if tdata.shape != (n,):
            raise ValueError(f"integer labels must have shape ({n},), got {tuple(tdata.shape)}")
        if n and (int(tdata.min()) < 0 or int(tdata.max()) >= m):
            raise ValueError(f"labels must lie in [0, {m}), got range [{int(tdata.min())}, {int(tdata.max())}]")
        return -F.mean(F.gather(logp, tdata))
    if tdata.dtype.kind != "f":
        raise TypeError(f"target must be int labels or float probabilities, got dtype {tdata.dtype}")
    if tuple(tdata.shape) != (n, m):
        raise ValueError(f"probability targets must have shape ({n}, {m}), got {tuple(tdata.shape)}")
    t = target if isinstance(target, Tensor) else F.as_tensor(tdata, logits.dtype, logits)
    return -F.mean(F.sum(_plogq(t, logp), axis=1))


def kl_divergence(p_target, logits) -> Tensor:
    """mean_n sum_i p[n,i] (log p[n,i] - log_softmax(logits)[n,i]), with 0 log 0 = 0.

    p_target (N, m): a constant array, or a Tensor (then it gets a gradient too,
    log p - log q + 1, except at p == 0 where the true -inf is replaced by 0).
    """
    logits = F.as_tensor(logits)
    _check_logits(logits)
    n, m = logits.shape
    p = p_target if isinstance(p_target, Tensor) else F.as_tensor(p_target, logits.dtype, logits)
    if p.shape != (n, m):
        raise ValueError(f"p_target must have shape ({n}, {m}), got {p.shape}")
    pos = p.data > 0
    # log p where p > 0, log 1 = 0 elsewhere: p log p is then 0 (value and gradient) at p = 0
    logp_t = F.log(F.where(pos, p, 1.0))
    logq = F.log_softmax(logits, axis=1)
    terms = p * logp_t - _plogq(p, logq)
    return F.mean(F.sum(terms, axis=1))


def accuracy(logits, labels) -> float:
    """Fraction of rows whose argmax equals the label (first argmax on ties)."""
    d = logits.data if isinstance(logits, Tensor) else logits
    lab = labels.data if isinstance(labels, Tensor) else labels
    xp = array_module(d)
    return float((xp.argmax(d, axis=1) == xp.asarray(lab)).mean())


__all__ = ["softmax_cross_entropy", "kl_divergence", "accuracy"]

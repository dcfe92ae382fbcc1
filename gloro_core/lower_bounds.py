"""Lipschitz tightness: reported upper bounds and empirical lower bounds (paper App. E).

For logits f: R^n -> R^m the GloRo certificate uses, for each class pair (i, j), a bound
K_ij on the Lipschitz constant of the margin f_i - f_j. Any pair of inputs gives a lower
bound on the largest of them:

    L(x1, x2) = max_{i,j} |(f_i(x1) - f_j(x1)) - (f_i(x2) - f_j(x2))| / ||x1 - x2||
              = (max_k d_k - min_k d_k) / ||x1 - x2||,    d = f(x1) - f(x2),

so ``max_{i,j} K_ij >= L(x1, x2)`` for every pair. We maximise L by gradient ascent
(Adam on the inputs, with the autodiff of ``nn``):

- global lower bound: pairs anywhere in input space, started from test points and small
  random perturbations of them; the best value over all pairs and steps.
- local lower bound at x: both points kept inside the l2 ball B(x, eps) (projection after
  every step); the mean over test points is the "mean local lower bound" of Fig. 3c.
"""
from __future__ import annotations

import numpy as np


def _tensor_logits(net, x):
    """Logits as a Tensor with a graph back to the input Tensor ``x`` (GloroNet.forward)."""
    return net.forward(x)


def _ratio(net, x1, x2):
    """Per-pair L(x1, x2) as a Tensor (B,), plus the raw numbers."""
    import nn.functions as F

    d = F.sub(_tensor_logits(net, x1), _tensor_logits(net, x2))
    spread = F.sub(F.max(d, axis=1), F.min(d, axis=1))
    dist = F.l2_norm(F.sub(x1, x2), axis=tuple(range(1, x1.ndim)))   # (C, H, W) or (features,)
    return F.div(spread, dist)


def _project_ball(z, centre, eps):
    """Project each z[b] onto the l2 ball of radius eps around centre[b]."""
    delta = z - centre
    n = np.sqrt((delta.reshape(len(z), -1).astype(np.float64) ** 2).sum(1))
    scale = np.where(n > eps, eps / np.maximum(n, 1e-30), 1.0).astype(z.dtype)
    return centre + delta * _per_row(scale, z)


def _per_row(v, like):
    """(B,) -> broadcastable against ``like`` (B, ...), whatever its number of axes."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _ascend(net, x1, x2, steps, lr, project=None):
    """Adam ascent of L over (x1, x2); returns the best L per pair seen at any step."""
    from nn.optim import Adam
    from nn.tensor import Parameter

    dt = net.dtype   # the model's own: nn does not mix float32 inputs with float64 weights
    p1, p2 = Parameter(x1.astype(dt)), Parameter(x2.astype(dt))
    opt = Adam([p1, p2], lr=lr)
    best = np.full(len(x1), -np.inf)
    for t in range(steps + 1):
        r = _ratio(net, p1, p2)
        vals = np.asarray(r.data, np.float64)
        best = np.maximum(best, np.where(np.isfinite(vals), vals, -np.inf))
        if t == steps:
            break
        opt.zero_grad()
        (-r.sum()).backward()             # ascent: Adam descends on -L
        for p in (p1, p2):
            p.grad = np.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        opt.step()
        if project is not None:
            p1.data, p2.data = project(p1.data), project(p2.data)
        # keep the pair apart: a zero distance has no defined ratio
        same = np.sqrt(((p1.data - p2.data).reshape(len(x1), -1) ** 2).sum(1)) < 1e-6
        if same.any():
            p2.data[same] += 1e-3
    return best


def global_lower_bound(net, x: np.ndarray, pairs: int = 64, steps: int = 100,
                       lr: float = 0.01, seed: int = 0, batch: int = 128) -> float:
    """max over optimised input pairs of L(x1, x2). x: (N, C, H, W) start points."""
    if len(x) == 0:
        raise ValueError("global_lower_bound needs at least one start point")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x10B]))
    best = -np.inf
    for s in range(0, pairs, batch):
        b = min(batch, pairs - s)
        i1 = rng.integers(0, len(x), b)
        a = x[i1].astype(net.dtype)
        # half the pairs: two data points; half: a point and a small random displacement
        i2 = rng.integers(0, len(x), b)
        near = a + 0.05 * rng.standard_normal(a.shape).astype(net.dtype)
        c = np.where(_per_row(np.arange(b) % 2 == 0, a), x[i2].astype(net.dtype), near)
        same = np.all((a - c).reshape(b, -1) == 0, axis=1)
        c[same] += 1e-2
        best = max(best, float(_ascend(net, a, c, steps, lr).max()))
    return best


def local_lower_bound(net, x: np.ndarray, eps: float, steps: int = 100, lr: float = 0.01,
                      seed: int = 0, batch: int = 128) -> np.ndarray:
    """Per point: max of L(x1, x2) over x1, x2 in B(x, eps). x: (N, C, H, W) -> (N,)."""
    if eps <= 0:
        raise ValueError(f"local lower bound needs eps > 0, got {eps}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x10C]))
    out = []
    for s in range(0, len(x), batch):
        c = x[s:s + batch].astype(net.dtype)
        u = rng.standard_normal(c.shape).astype(net.dtype)
        u /= _per_row(np.sqrt((u.reshape(len(c), -1) ** 2).sum(1)), u)
        x1 = c + 0.5 * eps * u
        x2 = c - 0.5 * eps * u

        def project(z, c=c):
            return _project_ball(z, c, eps)
        out.append(_ascend(net, x1, x2, steps, lr * eps, project))
    return np.concatenate(out) if out else np.zeros(0)


def margin_upper_bound(net, k_sub: float) -> float:
    """max_{i != j} K_ij (margin: K_sub ||w_i - w_j||; basic: K_i + K_j), from the model's
    own pairwise bounds (float64, on the host whatever the model's device)."""
    kk = net.certifier.pair_k(k_sub)
    return float(kk[~np.eye(len(kk), dtype=bool)].max())


def upper_bounds(net) -> dict:
    """Per-layer and global upper bounds (power and provable), and the margin bound
    max K_ij that the lower bounds below are compared with."""
    lip = net.lipschitz("provable")
    layers = [{k: v for k, v in layer.items()} for layer in lip["layers"]]
    return {
        "layers": _jsonable(layers),
        "k_sub_power": float(lip["k_sub_power"]),
        "k_sub_provable": float(lip["k_sub_provable"]),
        "global_upper_power": float(np.prod([l["power"] for l in layers])),
        "global_upper_provable": float(np.prod([l["provable"] for l in layers])),
        "margin_upper_power": margin_upper_bound(net, lip["k_sub_power"]),
        "margin_upper_provable": margin_upper_bound(net, lip["k_sub_provable"]),
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj

"""The ⊥ logit and the GloRo training losses, differentiable with nn autodiff.

Shapes: logits y (n, m); last-layer weight W (m, d); GloRo logits (n, m+1), ⊥ last.
The predicted class j = argmax_i y_i *by index* (the first maximum), never the label.

Margin variant (App. A.2):  y_⊥ = max_{i≠j} y_i + eps * K_sub * ||w_j - w_i||
Basic variant  (Sec. 2.2):  y_⊥ = max_{i≠j} y_i + eps * (K_i + K_j),  K_i = K_sub ||w_i||

The j entry is excluded by index (an -inf mask on position j), so two tied top logits
give y_⊥ >= y_j, never a false "certified". ||w_j - w_j|| = 0 is never differentiated:
the j row of the difference is replaced by a constant before the norm.

Losses: ``gloro_ce`` (Sec. 4.1), ``trades`` (Def. 3) and ``emma`` (Hu et al., NeurIPS 2023).
The generic softmax cross-entropy and KL divergence are ``nn.losses``'; this module only
builds the GloRo-specific logits and targets.
"""
from __future__ import annotations

import numpy as np

from kernels.registry import array_module, to_host
from nn import functions as F
from nn.losses import kl_divergence, softmax_cross_entropy
from nn.tensor import Tensor, make_result

VARIANTS = ("margin", "basic")

# |J| * m * d above which the pairwise norms come from the Gram matrix instead of explicit
# differences (memory); the explicit form is the more accurate one.
_EXPLICIT_DIFF_MAX = 1 << 25


def predicted_class(y) -> np.ndarray:
    """argmax by index (first maximum) of raw logits (n, m) -> (n,) int64 NumPy array."""
    data = y.data if isinstance(y, Tensor) else y
    j = data.argmax(axis=1)
    return to_host(j)


def pair_norms(w: Tensor, j: np.ndarray) -> Tensor:
    """||w_{j_n} - w_i|| for every example n and class i: (n, m); the (n, j_n) entry is 1.

    w (m, d) Tensor; j (n,) int. The j entry is a placeholder (masked out by the caller),
    set before the norm so no gradient is ever taken of a zero norm.
    """
    m, d = w.shape
    xp = array_module(w.data)
    uj, inv = np.unique(j, return_inverse=True)
    inv = inv.reshape(-1)
    eye = np.zeros((len(uj), m), dtype=bool)
    eye[np.arange(len(uj)), uj] = True
    if len(uj) * m * d <= _EXPLICIT_DIFF_MAX:
        diff = F.reshape(w[xp.asarray(uj)], (len(uj), 1, d)) - F.reshape(w, (1, m, d))  # (|J|, m, d)
        diff = F.where(eye[:, :, None], np.ones((), dtype=w.dtype), diff)
        norms = F.l2_norm(diff, axis=2)                                        # (|J|, m)
    else:
        g = F.matmul(w, F.transpose(w))                                        # (m, m)
        diag = np.eye(m, dtype=bool)
        gd = F.sum(F.where(diag, g, np.zeros((), dtype=w.dtype)), axis=1)       # (m,) ||w_i||^2
        ujd = xp.asarray(uj)
        sq = F.reshape(gd[ujd], (len(uj), 1)) + F.reshape(gd, (1, m)) - 2.0 * g[ujd]
        ok = (sq.data > 0) & xp.asarray(~eye)
        sq = F.where(ok, sq, np.ones((), dtype=w.dtype))
        norms = F.where(ok, F.sqrt(sq), np.zeros((), dtype=w.dtype))
        norms = F.where(eye, np.ones((), dtype=w.dtype), norms)
    return norms[xp.asarray(inv)]


# m * m * d up to which the margin y_⊥ is one fused node (_margin_bot_fused) instead of
# ~20 autodiff ops (2C2F head: 0.46 -> ~0.2 ms per step)
_FUSED_PAIRS_MAX = 1 << 22


def _margin_bot_fused(y: Tensor, w: Tensor, k_sub, eps: float, j) -> Tensor:
    """The margin y_⊥ (n,) as one node: the values of the op-by-op form (pair_norms, then
    y + (D K) eps masked at j, max), and its gradient written out.

    D[a, b] = ||w_a - w_b|| for all class pairs (m, m) with l2_norm's scaled arithmetic;
    i*_n = the first argmax of the masked candidates. Backward: g_n goes to y[n, i*_n];
    K gets sum_n g_n eps D[j_n, i*_n]; D[j_n, i*_n] gets c_n = g_n eps K, hence
    w_a += sum_b C[a, b] u_ab and w_b -= the same, u_ab = (w_a - w_b) / D[a, b] (0 where
    D = 0, as l2_norm's gradient), C[a, b] = the sum of c_n over n with (j_n, i*_n) = (a, b).
    """
    xp = array_module(y.data)
    n, m = y.shape
    dt = y.dtype
    k = k_sub if isinstance(k_sub, Tensor) else Tensor(xp.asarray(k_sub, dtype=dt))
    wd = w.data
    diff = wd[:, None, :] - wd[None, :, :]                                   # (m, m, d)
    amax = xp.abs(diff).max(axis=2, keepdims=True)
    nz = amax > 0
    scale = xp.where(nz, amax, xp.ones((), dtype=dt))
    xs = diff / scale
    dist = xp.where(nz, scale * xp.sqrt((xs * xs).sum(axis=2, keepdims=True)), xp.zeros((), dtype=dt))[..., 0]
    dist[xp.arange(m), xp.arange(m)] = 1                                      # placeholder, masked below
    jj = xp.asarray(j)
    rows = xp.arange(n)
    e = dt.type(eps)
    cand = y.data + (dist[jj] * k.data) * e
    cand[rows, jj] = -xp.inf
    istar = cand.argmax(axis=1)
    out = cand[rows, istar]

    def backward(g):
        gy = xp.zeros((n, m), dtype=dt)
        gy[rows, istar] = g
        gk = (g * e * dist[jj, istar]).sum().reshape(k.shape) if k.requires_grad else None
        gw = None
        if w.requires_grad:
            # C = onehot(j)^T diag(c) onehot(i*): a product, not bincount, which reads the
            # largest index back to the host on a GPU
            classes = xp.arange(m)
            cn = (g * e * k.data).astype(np.float64)
            c = (((jj[:, None] == classes) * cn[:, None]).T @ (istar[:, None] == classes)).astype(dt)
            safe = xp.where(dist > 0, dist, xp.ones((), dtype=dt))
            u = xp.where((dist > 0)[..., None], diff / safe[..., None], xp.zeros((), dtype=dt))
            u[xp.arange(m), xp.arange(m)] = 0
            gw = xp.einsum("ab,abd->ad", c, u) - xp.einsum("ab,abd->bd", c, u)
        return gy, gw, gk

    return make_result(out, (y, w, k), backward, "margin_bot")


def bot_logit(y: Tensor, w_last: Tensor, k_sub, eps: float, variant: str = "margin") -> Tensor:
    """y_⊥ (n,) from logits y (n, m), last weight (m, d), K_sub (scalar Tensor or float)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    n, m = y.shape
    if variant == "margin" and m * m * w_last.shape[1] <= _FUSED_PAIRS_MAX:
        # the predicted classes stay on y's device: no host sync on a GPU
        return _margin_bot_fused(y, w_last, k_sub, eps, y.data.argmax(axis=1))
    j = predicted_class(y)
    is_j = np.zeros((n, m), dtype=bool)
    is_j[np.arange(n), j] = True
    if variant == "margin":
        kij = pair_norms(w_last, j) * k_sub                                   # (n, m)
    else:
        ki = F.l2_norm(w_last, axis=1) * k_sub                                 # (m,)
        kj = F.reshape(ki[array_module(w_last.data).asarray(j)], (n, 1))
        kij = F.reshape(ki, (1, m)) + kj
    cand = y + kij * eps
    cand = F.where(is_j, np.array(-np.inf, dtype=y.dtype), cand)
    return F.max(cand, axis=1)


def gloro_logits(y: Tensor, w_last: Tensor, k_sub, eps: float, variant: str = "margin") -> Tensor:
    """(n, m+1): the logits of f and y_⊥ last."""
    yb = bot_logit(y, w_last, k_sub, eps, variant)
    return F.concatenate([y, F.reshape(yb, (y.shape[0], 1))], axis=1)


def _labels(labels, n, m):
    lab = np.asarray(labels)
    if lab.shape != (n,) or lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be an int array of shape ({n},), got dtype {lab.dtype} shape {lab.shape}")
    if n and (lab.min() < 0 or lab.max() >= m):
        raise ValueError(f"labels must lie in [0, {m}), got range [{lab.min()}, {lab.max()}]")
    return lab.astype(np.int64)


def cross_entropy(logits: Tensor, labels) -> Tensor:
    """Mean softmax cross-entropy; labels (n,) int index into the logits' columns."""
    n, m = logits.shape
    return softmax_cross_entropy(logits, _labels(labels, n, m))


def gloro_ce(gl: Tensor, labels) -> Tensor:
    """CE on the m+1 GloRo logits with the one-hot label plus 0 for ⊥ (⊥ never correct)."""
    n, m1 = gl.shape
    _labels(labels, n, m1 - 1)
    return cross_entropy(gl, labels)


def trades(y: Tensor, gl: Tensor, labels, lam: float, form: str = "kl") -> Tensor:
    """TRADES (Def. 3): CE(f(x), y) + lam * L(f̄(x), p), p = softmax(f(x)) with 0 for ⊥.

    form "kl": KL(p || softmax(gl)) (the ⊥ entry, p_⊥ = 0, contributes nothing);
    "ce": -sum_i p_i log softmax(gl)_i. The gradient flows through both p and gl.
    y (n, m) logits, gl (n, m+1) GloRo logits.
    """
    if form not in ("kl", "ce"):
        raise ValueError(f"trades_form must be 'kl' or 'ce', got {form!r}")
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    n, m = y.shape
    clean = cross_entropy(y, labels)
    xp = array_module(y.data)
    p = F.concatenate([F.softmax(y, axis=1), Tensor(xp.zeros((n, 1), dtype=y.dtype))], axis=1)
    rob = kl_divergence(p, gl) if form == "kl" else softmax_cross_entropy(gl, p)
    return clean + rob * float(lam)


# EMMA's lower clip of the per-class radius (a fraction of eps), as in the authors' code
EMMA_MIN_FRACTION = 0.01


def emma_fraction(y, kli, eps: float, labels):
    """clip((y_l - y_i) / (eps K_li), 0.01, 1) as a constant array (n, m) of y's dtype.

    y (n, m) logits (Tensor or array), kli (n, m) the pair constants (0 at the label)."""
    yd = y.data if isinstance(y, Tensor) else y
    kd = kli.data if isinstance(kli, Tensor) else kli
    xp = array_module(yd)
    n = yd.shape[0]
    gap = yd[xp.arange(n), xp.asarray(labels)][:, None] - yd                     # y_l - y_i
    ratio = gap / xp.maximum(kd * yd.dtype.type(eps), yd.dtype.type(1e-8))
    return xp.clip(ratio, EMMA_MIN_FRACTION, 1.0).astype(yd.dtype)


def emma_logits(y: Tensor, w_last: Tensor, k_sub, eps: float, labels, frac=None) -> Tensor:
    """EMMA's logits (n, m) (Hu, Zou, Wang, Leino, Fredrikson, NeurIPS 2023; hukkai/liresnet
    models/margin_layer.py emma_loss): every class i != label l gets its own boost

        y~_i = y_i + eps_i K_li,   K_li = K_sub ||w_l - w_i||,
        eps_i = eps * clip((y_l - y_i) / (eps K_li), 0.01, 1)   (a constant: no gradient)

    i.e. the class is pushed by the worst case within min(eps, its own distance to the
    label's boundary); y~_l = y_l. Margins use the *label*, not the predicted class.
    ``frac`` (n, m) replaces the computed clip(...) (tests hold it fixed for finite
    differences, as the gradient does).
    """
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    n, m = y.shape
    lab = _labels(labels, n, m)
    xp = array_module(y.data)
    is_l = np.zeros((n, m), dtype=bool)
    is_l[np.arange(n), lab] = True
    is_l = xp.asarray(is_l)
    kli = F.where(is_l, np.zeros((), dtype=y.dtype), pair_norms(w_last, lab) * k_sub)  # (n, m)
    if frac is None:
        frac = emma_fraction(y, kli, eps, lab)
    return y + kli * (xp.asarray(frac, dtype=y.dtype) * y.dtype.type(eps))


def emma(y: Tensor, w_last: Tensor, k_sub, eps: float, labels) -> Tensor:
    """EMMA loss: mean softmax CE of ``emma_logits`` against the labels (no ⊥ column)."""
    return cross_entropy(emma_logits(y, w_last, k_sub, eps, labels), labels)

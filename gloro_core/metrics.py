"""Evaluation metrics: clean accuracy, verified-robust accuracy (VRA), rejection, radii.

Conventions: ``pred`` from :meth:`GloroNet.certify` holds a class index or -1 for ⊥;
``radius`` is the certified l2 radius per point (0 where nothing is certified).
"""
from __future__ import annotations

import numpy as np

BOT = -1


def _pair(a, b, an, bn):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"{an} and {bn} must be 1-D of one length, got {a.shape} and {b.shape}")
    return a, b


def clean_accuracy(clean_pred, labels) -> float:
    """Fraction with argmax f(x) == label."""
    p, y = _pair(clean_pred, labels, "clean_pred", "labels")
    return float((p == y).mean()) if len(y) else float("nan")


def vra(cert_pred, labels) -> float:
    """Verified-robust accuracy: fraction certified (not ⊥) AND correct."""
    p, y = _pair(cert_pred, labels, "cert_pred", "labels")
    return float(((p == y) & (p != BOT)).mean()) if len(y) else float("nan")


def rejection_rate(cert_pred) -> float:
    """Fraction of points answered with ⊥."""
    p = np.asarray(cert_pred)
    return float((p == BOT).mean()) if p.size else float("nan")


def radius_stats(radius, correct=None) -> dict:
    """Mean / median / quantiles of the certified radii (of the correct points if given)."""
    r = np.asarray(radius, dtype=np.float64)
    if correct is not None:
        r = r[np.asarray(correct, dtype=bool)]
    if r.size == 0:
        return {"n": 0, "mean": float("nan"), "median": float("nan"), "p10": float("nan"),
                "p90": float("nan"), "max": float("nan")}
    fin = r[np.isfinite(r)]
    return {"n": int(r.size), "mean": float(fin.mean()) if fin.size else float("inf"),
            "median": float(np.median(r)), "p10": float(np.quantile(r, 0.1)),
            "p90": float(np.quantile(r, 0.9)), "max": float(r.max())}


def vra_at(radius, correct, eps_values) -> list:
    """VRA as a function of eps from one set of radii: certified at eps iff radius > eps."""
    r = np.asarray(radius, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    return [float(((r > e) & c).mean()) if r.size else float("nan") for e in eps_values]


def evaluate(net, x, y, eps=None, bound="provable", batch=500, tight_radius=True) -> dict:
    """All metrics of ``net`` on (x, y) at radius ``eps`` (default net.eps).

    tight_radius=False gives the same decisions (so the same accuracies) for about one
    forward pass; radii are then slightly lower (see GloroNet.certify)."""
    y = np.asarray(y)
    clean, cert, rad = [], [], []
    for s in range(0, len(x), batch):
        xb = x[s:s + batch]
        clean.append(net.logits(xb).argmax(axis=1))
        p, r = net.certify(xb, eps, bound=bound, tight_radius=tight_radius)
        cert.append(p)
        rad.append(r)
    clean = np.concatenate(clean) if clean else np.zeros(0, int)
    cert = np.concatenate(cert) if cert else np.zeros(0, int)
    rad = np.concatenate(rad) if rad else np.zeros(0)
    return {"clean_acc": clean_accuracy(clean, y), "vra": vra(cert, y), "rejection": rejection_rate(cert),
            "bound": bound, "eps": float(net.eps if eps is None else eps),
            "radius": radius_stats(rad, clean == y)}

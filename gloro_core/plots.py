"""Training curves and VRA-vs-eps plots (matplotlib, optional extra ``plot``).

matplotlib is imported inside each function, with the non-interactive Agg backend,
so the rest of the package never needs it.
"""
from __future__ import annotations

import numpy as np


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'gloro-engine[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_training(history: list[dict], path: str) -> str:
    """Per-epoch curves (loss; clean acc, VRA, rejection; K_sub; lr and eps) -> PNG at path."""
    plt = _plt()
    ep = [m["epoch"] for m in history]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    ax[0, 0].plot(ep, [m["loss"] for m in history], "o-")
    ax[0, 0].set_title("training loss")
    for split, style in (("val", "o-"), ("test", "s--")):   # test: with --val 0 or --test-every-epoch
        for key, label in (("clean_acc", "clean acc"), ("vra", "VRA"), ("rejection", "rejected")):
            pts = [(m["epoch"], m[f"{split}_{key}"]) for m in history if f"{split}_{key}" in m]
            if pts:
                ax[0, 1].plot(*zip(*pts), style, label=f"{split} {label}")
    ax[0, 1].set_ylim(0, 1)
    ax[0, 1].legend()
    ax[0, 1].set_title("validation and test sets")
    ax[1, 0].plot(ep, [m["k_sub"] for m in history], "o-")
    ax[1, 0].set_title("K_sub (converged)")
    ax[1, 1].semilogy(ep, [m["lr"] for m in history], "o-", label="lr")
    ax[1, 1].set_title("lr (log) and eps_train")
    tw = ax[1, 1].twinx()
    tw.plot(ep, [m["eps"] for m in history], "s--", color="tab:orange", label="eps")
    for a in ax.ravel():
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def vra_curve(correct: np.ndarray, radius: np.ndarray, eps_grid: np.ndarray) -> np.ndarray:
    """VRA at each eps: fraction of points correct and with certified radius > eps."""
    correct = np.asarray(correct, bool)
    radius = np.asarray(radius, float)
    return np.array([(correct & (radius > e)).mean() for e in eps_grid])


def plot_vra_vs_eps(correct, radius, path: str, eps_mark: float | None = None,
                    eps_max: float | None = None) -> str:
    """VRA-vs-eps curve from per-point correctness and certified radii -> PNG at path."""
    plt = _plt()
    r = np.asarray(radius, float)
    finite = r[np.isfinite(r) & (r > 0)]
    top = eps_max or (float(np.quantile(finite, 0.99)) * 1.1 if finite.size else 1.0)
    grid = np.linspace(0.0, max(top, 1e-6), 200)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid, vra_curve(correct, r, grid))
    if eps_mark is not None:
        ax.axvline(eps_mark, color="gray", ls="--", label=f"eps={eps_mark:g}")
        ax.legend()
    ax.set_xlabel("eps (l2)")
    ax.set_ylabel("VRA")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""GloRo nets on the from-scratch engine: Lipschitz bounds, the ⊥ logit, losses,
metrics, certification, checkpoints and a PGD attack.

Submodules that need nn (model, losses, attacks) are imported lazily so that the
NumPy-only parts (bounds, checkpoint) work on their own.
"""
from __future__ import annotations


def __getattr__(name):
    if name in ("GloroNet", "load"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'gloro_core' has no attribute {name!r}")


__all__ = ["GloroNet", "load"]

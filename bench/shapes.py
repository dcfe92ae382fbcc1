"""What the bench measures: the paper's models, their layer shapes, synthetic data, FLOP counts.

Needs only NumPy at import (the PyTorch worker imports it too); the engine is imported
only by ``arch_specs``.
"""
from __future__ import annotations

import math

import numpy as np

NUM_CLASSES = 10
BATCH = 256  # the paper's batch; run.py's --batch replaces it through set_batch()
# (input shape (C, H, W), power iterations per training step, eps) per architecture, as in the paper
MODELS = {
    "2C2F": ((1, 28, 28), 10, 0.3),
    "4C3F": ((1, 28, 28), 10, 1.58),
    "6C2F": ((3, 32, 32), 5, 36 / 255),
}
# representative layers for the default run (the rest with --full)
DEFAULT_LAYERS = ["2C2F.c1", "4C3F.c3", "6C2F.c4", "2C2F.d1", "4C3F.d1"]
QUICK_LAYERS = ["2C2F.c2", "4C3F.c3", "2C2F.d1", "2C2F.d2"]
DEFAULT_MINMAX = ["6C2F.c2", "4C3F.d1"]
QUICK_MINMAX = ["2C2F.c2"]


def set_batch(n: int) -> None:
    global BATCH
    BATCH = int(n)


def arch_specs(name: str) -> list[dict]:
    """The engine's layer-spec list of a paper architecture (gloro_core.architectures)."""
    from gloro_core.architectures import layer_specs

    return layer_specs(name, NUM_CLASSES)


def _same_pad(n, k, s):
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def layer_table(arch: str, specs: list[dict] | None = None) -> list[dict]:
    """Per layer: label (e.g. '6C2F.c2'), kind, input shape (no batch), output shape; convs
    also k, s and the SAME pads (top, bottom, left, right)."""
    shape = MODELS[arch][0]
    rows, nc, nd = [], 0, 0
    for spec in specs if specs is not None else arch_specs(arch):
        if spec["type"] == "conv":
            nc += 1
            c, h, w = shape
            o, k, s = int(spec["filters"]), int(spec["kernel"]), int(spec.get("stride", 1))
            pt, pb = _same_pad(h, k, s)
            pl, pr = _same_pad(w, k, s)
            out = (o, (h + pt + pb - k) // s + 1, (w + pl + pr - k) // s + 1)
            rows.append(dict(label=f"{arch}.c{nc}", kind="conv", in_shape=shape, out_shape=out,
                             k=k, s=s, pads=(pt, pb, pl, pr)))
        else:
            nd += 1
            out = (int(spec["units"]),)
            rows.append(dict(label=f"{arch}.d{nd}", kind="dense", in_shape=(int(math.prod(shape)),),
                             out_shape=out))
        shape = out
    return rows


def all_layers() -> dict:
    """label -> layer row, over every model."""
    return {r["label"]: r for a in MODELS for r in layer_table(a)}


def is_last(label: str) -> bool:
    return label == layer_table(label.split(".")[0])[-1]["label"]


def synthetic(shape, n: int, seed: int = 0):
    """Images x (n, C, H, W) float32 in [0, 1) and labels y (n,) int64: the same on both sides."""
    rng = np.random.default_rng(seed)
    x = rng.random((n,) + tuple(shape), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
    return x, y


def layer_macs(layer: dict) -> int:
    """Multiply-adds of one layer on one sample: conv OH*OW*O*C*k*k, dense I*O."""
    if layer["kind"] == "conv":
        c = layer["in_shape"][0]
        o, oh, ow = layer["out_shape"]
        return oh * ow * o * c * layer["k"] ** 2
    return layer["in_shape"][0] * layer["out_shape"][0]


def step_flops(arch: str, n: int, kind: str, iters: int) -> float:
    """FLOPs of one training step at batch ``n``: the floor a step cannot go below.

    With M_l the per-sample multiply-adds of conv/dense layer l (``layer_macs``):

        forward          2 n M_l  for every layer
        grad-weight      2 n M_l  for every layer
        grad-input       2 n M_l  for every layer but the first (the images need no gradient)
        GloRo only, for every layer but the last (batch-1 iterates):
          power method   iters * (2 M_l + 2 M_l)   (A u, then A^T of it)
          sigma = ||A u||   2 M_l forward + 2 M_l for its weight gradient

    Element-wise work (bias, activations, ⊥, loss, Adam) is not counted: it is memory-bound
    and small next to the GEMMs. The floor time is these FLOPs at the run's sgemm rate.
    """
    layers = layer_table(arch)
    total = 0.0
    for i, layer in enumerate(layers):
        m = layer_macs(layer)
        total += 2.0 * n * m * (3 if i > 0 else 2)
        if kind == "gloro" and i < len(layers) - 1:
            total += 4.0 * m * iters + 4.0 * m
    return total

"""A validation split held out of the training set, so model selection never sees the test set.

The split is *stratified*: each class gives ``round(n_val * share of the class)`` points
(largest remainders make the total exactly ``n_val``), drawn without replacement by a
generator seeded from ``(seed, SPLIT_STREAM)`` alone. It depends only on the labels, ``n_val``
and the seed, so a resumed run recomputes the same split; ``digest`` fingerprints it and the
checkpoint keeps that fingerprint to prove it (``check_same``).
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

SPLIT_STREAM = 0x5A11D  # a stream of its own: epoch generators use (seed, epoch, 0 / 1)
METHOD = "stratified/1"


@dataclasses.dataclass(frozen=True)
class Split:
    """Indices into the (limited) training set: train (n - n_val,), val (n_val,), both sorted."""

    train: np.ndarray
    val: np.ndarray

    @property
    def digest(self) -> str:
        """sha256 of the validation indices (int64 little-endian) and the set size, hex."""
        h = hashlib.sha256(np.ascontiguousarray(self.val, dtype="<i8").tobytes())
        h.update(str(len(self.train) + len(self.val)).encode())
        return h.hexdigest()

    def record(self, seed: int) -> dict:
        """What a checkpoint keeps to check the split on resume."""
        return {"method": METHOD, "n_val": int(len(self.val)), "n_train": int(len(self.train)),
                "seed": int(seed), "digest": self.digest}


def holdout(labels: np.ndarray, n_val: int, seed: int) -> Split:
    """Stratified split of ``labels`` (n,) int: ``n_val`` points for validation.

    ``n_val`` must leave at least one training point: 0 < n_val < n.
    """
    y = np.asarray(labels)
    n = len(y)
    if isinstance(n_val, bool) or not isinstance(n_val, (int, np.integer)):
        raise ValueError(f"--val must be an integer, got {n_val!r}")
    if not 0 < n_val < n:
        raise ValueError(f"--val {n_val}: the validation split must hold between 1 and "
                         f"{n - 1} of the {n} training points (--val 0 selects on the test set)")
    classes, inverse = np.unique(y, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    share = counts * (n_val / n)
    take = np.floor(share).astype(np.int64)
    rest = n_val - int(take.sum())
    # largest remainders first; ties to the smaller class index (stable sort: deterministic)
    order = np.argsort(-(share - take), kind="stable")
    take[order[:rest]] += 1
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_STREAM]))
    val = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        val.append(members[rng.permutation(len(members))[:take[c]]])
    val = np.sort(np.concatenate(val)).astype(np.int64)
    keep = np.ones(n, dtype=bool)
    keep[val] = False
    return Split(train=np.flatnonzero(keep).astype(np.int64), val=val)


def check_same(saved: dict | None, split: Split | None, seed: int, where: str) -> None:
    """ValueError naming ``where`` unless the split recomputed now is the checkpoint's.

    ``saved`` None (a run without a split, or one saved before splits existed) must meet
    ``split`` None, and the other way round.
    """
    if saved is None and split is None:
        return
    if saved is None or split is None:
        now = "no validation split" if split is None else f"--val {len(split.val)}"
        was = "none" if saved is None else f"--val {saved.get('n_val')}"
        raise ValueError(f"--resume: {now} differs from the checkpoint's ({was}) ({where})")
    if not isinstance(saved, dict) or saved.get("digest") != split.record(seed)["digest"]:
        raise ValueError(f"--resume: the validation split recomputed now differs from the one "
                         f"the run was trained with ({where}); the training data or --val/--seed "
                         "changed")

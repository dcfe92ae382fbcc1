"""Per-epoch evaluation rows and model selection: best.npz is chosen on the validation split.

A history row holds ``val_clean_acc``, ``val_vra``, ``val_rejection`` (the held-out split of
the training set, ``--val N``) and, when the test set was evaluated that epoch (``--val 0``,
or ``--test-every-epoch`` for the curves), ``test_clean_acc``, ``test_vra``,
``test_rejection``. The selection VRA is the validation one; a run without a split selects
on the test set, which the run says (a warning, and ``selected_on`` in test.json).

Rows written before the split existed hold ``clean_acc``, ``vra``, ``rejection``, measured
on the test set: ``upgrade`` renames them, and ``selection_vra`` reads them as they are.
"""
from __future__ import annotations

import json
import os

KEYS = ("clean_acc", "vra", "rejection")
VAL_FIELDS = [f"val_{k}" for k in KEYS]
TEST_FIELDS = [f"test_{k}" for k in KEYS]
TEST_FILE = "test.json"   # the final test-set evaluation of best.npz
NO_VAL_WARNING = ("warning: --val 0: best.npz is chosen on the TEST set, so its test figures "
                  "are optimistic (model selection saw them); use --val N for an honest "
                  "held-out selection")


def prefixed(split: str, ev: dict) -> dict:
    """{'clean_acc': a, ...} -> {'<split>_clean_acc': a, ...} (split: 'val' or 'test')."""
    return {f"{split}_{k}": ev[k] for k in KEYS}


def selection_vra(row: dict):
    """The VRA best.npz is chosen on: val_vra, else test_vra (--val 0), else a legacy 'vra';
    None when the row has none."""
    for key in ("val_vra", "test_vra", "vra"):
        if key in row:
            return row[key]
    return None


def upgrade(row: dict) -> dict:
    """A legacy row (clean_acc / vra / rejection, all on the test set) with test_* names."""
    if "vra" not in row or any(k in row for k in VAL_FIELDS + TEST_FIELDS):
        return row
    out = {k: v for k, v in row.items() if k not in KEYS}
    out.update({f"test_{k}": row[k] for k in KEYS if k in row})
    return out


def describe(row: dict) -> str:
    """'val acc .. vra .. rej .. | test acc .. vra .. rej ..' for the splits in ``row``."""
    parts = []
    for split in ("val", "test"):
        if all(f"{split}_{k}" in row for k in KEYS):
            parts.append(f"{split} acc {row[f'{split}_clean_acc']:.4f} "
                         f"vra {row[f'{split}_vra']:.4f} rej {row[f'{split}_rejection']:.4f}")
    return " | ".join(parts)


def write_test_result(out: str, result: dict) -> str:
    """OUT/test.json (atomic replace); -> its path."""
    path = os.path.join(out, TEST_FILE)
    tmp = path + ".part"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
    return path

"""The paper's architectures (App. B) as layer-spec lists, and ``build``.

A layer spec is the checkpoint format: a list of dicts, e.g.
``{"type": "conv", "filters": 16, "kernel": 4, "stride": 2, "padding": "same"}`` and
``{"type": "dense", "units": 100}``; the final dense (``units = num_classes``) is included.
The activation (ReLU or MinMax) sits after every layer but the last and is chosen by
``GloroNet(activation=...)``, not written in the list.

Besides the named architectures, ``arch`` may be a compact string such as
``"c(8,3,2),d(32)"`` or a path to a JSON file holding a layer-spec list. Compact tokens,
comma separated (the final dense with num_classes units is appended):

* ``c(C,K,S)``: conv, C filters, kernel K, stride S, SAME padding;
* ``d(D)``: dense, D units;
* ``i``: invertible 2x2 downsampling (space-to-depth, ``{"type": "invdown"}``);
* ``r(K)``: linear residual conv block y = x + conv(x) + b, kernel K odd (``{"type": "liresnet"}``);
* ``p(S)``: average pooling over S x S windows, stride S (``{"type": "avgpool", "size": S}``);
* ``n``: as the last token, the appended final dense is normalised (``"normalize": true``).
"""
from __future__ import annotations

import json
import os
import re

ARCHS = {
    "2C2F": [("c", 16, 4, 2), ("c", 32, 4, 2), ("d", 100)],
    "4C3F": [("c", 32, 3, 1), ("c", 32, 4, 2), ("c", 64, 3, 1), ("c", 64, 4, 2),
             ("d", 512), ("d", 512)],
    "6C2F": [("c", 32, 3, 1), ("c", 32, 3, 1), ("c", 32, 4, 2), ("c", 64, 3, 1),
             ("c", 64, 3, 1), ("c", 64, 4, 2), ("d", 512)],
    "7C1F": [("c", 64, 3, 1), ("c", 64, 3, 1), ("c", 64, 4, 2), ("c", 128, 3, 1),
             ("c", 128, 4, 2), ("c", 256, 3, 1), ("c", 256, 4, 2)],
}


def conv(filters: int, kernel: int, stride: int) -> dict:
    return {"type": "conv", "filters": int(filters), "kernel": int(kernel),
            "stride": int(stride), "padding": "same"}


def dense(units: int, normalize: bool = False) -> dict:
    d = {"type": "dense", "units": int(units)}
    if normalize:
        d["normalize"] = True
    return d


def invdown() -> dict:
    return {"type": "invdown"}


def avgpool(size: int) -> dict:
    return {"type": "avgpool", "size": int(size)}


def liresnet(kernel: int) -> dict:
    return {"type": "liresnet", "kernel": int(kernel)}


# compact tokens: letter -> (argument names, spec builder); "n" is handled by parse_compact
TOKENS = {
    "c": (("C", "K", "S"), conv),
    "d": (("D",), dense),
    "i": ((), invdown),
    "p": (("S",), avgpool),
    "r": (("K",), liresnet),
}


def _from_tuples(items, num_classes: int, normalize: bool = False) -> list[dict]:
    out = [TOKENS[t[0]][1](*t[1:]) for t in items]
    out.append(dense(num_classes, normalize))
    return out


_TOKEN = re.compile(r"\s*([a-z])\s*(?:\(\s*([0-9,\s]*)\))?\s*,?", re.IGNORECASE)


def parse_compact(text: str, num_classes: int) -> list[dict]:
    """'c(16,4,2),d(100)' -> layer specs with the final dense(num_classes) appended.

    Tokens: c(C,K,S) conv; d(D) dense; i invdown; p(S) avgpool; r(K) liresnet; n (last token only) normalises the appended final
    dense (last-layer normalisation).
    """
    pos, items, normalize = 0, [], False
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        kind = m.group(1).lower() if m else None
        if not m or (kind not in TOKENS and kind != "n"):
            raise ValueError(f"cannot parse architecture {text!r} at {text[pos:]!r}; "
                             "expected e.g. 'c(16,4,2),d(100)'")
        args = [int(a) for a in (m.group(2) or "").split(",") if a.strip()]
        names = () if kind == "n" else TOKENS[kind][0]
        if len(args) != len(names) or (kind == "n" and m.group(2) is not None):
            need = f"({','.join(names)})" if names else "no arguments"
            raise ValueError(f"architecture {text!r}: {m.group(0).strip().rstrip(',')} needs {need}")
        if args and min(args) <= 0:
            raise ValueError(f"architecture {text!r}: sizes must be positive")
        pos = m.end()
        if kind == "n":
            if text[pos:].strip():
                raise ValueError(f"architecture {text!r}: 'n' (normalise the final dense) must come last")
            normalize = True
        else:
            items.append((kind, *args))
    if not items and not normalize:
        raise ValueError(f"empty architecture {text!r}")
    return _from_tuples(items, num_classes, normalize)


def layer_specs(arch, num_classes: int = 10) -> list[dict]:
    """Layer-spec list for a named architecture, compact string, JSON path or list."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if isinstance(arch, (list, tuple)):
        return [dict(d) for d in arch]
    key = str(arch).strip()
    if key.upper() in ARCHS:
        return _from_tuples(ARCHS[key.upper()], num_classes)
    if key.endswith(".json") and os.path.isfile(key):
        with open(key) as fh:
            specs = json.load(fh)
        if not isinstance(specs, list) or not all(isinstance(d, dict) for d in specs):
            raise ValueError(f"{key}: expected a JSON list of layer dicts")
        return specs
    if key[:1].lower() in TOKENS or key[:1].lower() == "n":
        return parse_compact(key, num_classes)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}, "
                     "a compact spec like 'c(16,4,2),d(100)', or a .json layer list")


def build(name, input_shape, num_classes: int = 10, activation: str = "relu",
          init: str = "glorot", eps: float = 0.3, seed: int = 0, **kwargs):
    """GloroNet for architecture ``name`` on inputs (C, H, W)."""
    from .model import GloroNet  # the model lands separately; import at call time

    specs = layer_specs(name, num_classes)
    return GloroNet(tuple(int(s) for s in input_shape), num_classes, specs,
                    activation=activation, init=init, eps=eps, seed=seed, **kwargs)

"""The Certifier's cache has one key, the parameters' version: a change to any weight or
bias, made in place as an optimizer makes it, refreshes every number derived from them
(power numbers, provable bounds, K_ij, rounding constants), and an unchanged net reuses
them all, digest included."""
import hashlib
import types
from collections import Counter

import numpy as np
import pytest

from gloro_core import certification
from gloro_core.model import GloroNet

SPECS = [{"type": "conv", "filters": 4, "kernel": 3, "stride": 2, "padding": "same"},
         {"type": "liresnet", "kernel": 3},
         {"type": "dense", "units": 6}, {"type": "dense", "units": 3}]
SHAPE = (1, 7, 8)
PARAMS = [f"param.{i}.{kind}" for i in range(4) for kind in ("weight", "bias")]


def _net():
    net = GloroNet(SHAPE, 3, SPECS, eps=0.05, seed=2)
    for p in net.parameters():   # nonzero biases, so that they matter to the rounding bound
        p.data += np.random.default_rng(7).normal(0, 0.1, p.shape).astype(p.dtype)
    return net


def _clone(net):
    """A fresh net (empty cache) with the same parameters and power iterates."""
    twin = GloroNet(SHAPE, 3, SPECS, eps=0.05, seed=2)
    for p, q in zip(net.parameters(), twin.parameters()):
        q.data = p.data.copy()
    twin.iterates = [v.copy() for v in net.iterates]
    return twin


@pytest.fixture
def counted(monkeypatch):
    """(net, counts): counts["converge" | "provable" | "rounding" | "pair_k" | "digest"]
    counts the computations of each cached number of ``net``."""
    net, counts = _net(), Counter()

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(certification, "converge", counting("converge", certification.converge))
    monkeypatch.setattr(certification, "hashlib", types.SimpleNamespace(
        blake2b=counting("digest", hashlib.blake2b)))
    for layer in net.layers:   # instance attributes shadow the class's methods
        layer.provable = counting("provable", layer.provable)
        layer.rounding_constants = counting("rounding", layer.rounding_constants)
    net.certifier.pair_k = counting("pair_k", net.certifier.pair_k)
    return net, counts


def _derived(net):
    """Every cached number of ``net``'s current version, as plain values."""
    fr = net.certifier.frozen
    numbers = {k: fr[k] for k in ("version", "power", "provable", "methods", "k_sub_power", "k_sub_provable")}
    numbers["pair_k"] = {k: v.tolist() for k, v in fr["pair_k"].items()}
    numbers["rounding"] = [{k: np.asarray(v).tolist() if v is not None else None for k, v in vars(c).items()}
                           for c in fr["rounding"]]
    return numbers


def test_unchanged_parameters_reuse_everything(counted, rng):
    net, counts = counted
    x = rng.random((6,) + SHAPE).astype(np.float32)
    first = net.certify(x)
    assert counts == {"converge": 4, "provable": 4, "rounding": 4, "pair_k": 1, "digest": 1}
    counts.clear()
    for _ in range(2):
        again = net.certify(x)
    net.gloro_logits(x)
    lip = net.lipschitz()
    assert counts == {}, f"recomputed with unchanged parameters: {dict(counts)}"
    np.testing.assert_array_equal(again[0], first[0])
    np.testing.assert_array_equal(again[1], first[1])
    assert lip["version"] == net.weights_version() == net.last_certification["version"]
    # an explicit freeze reconverges the power method; what follows from its numbers
    # (K_ij, rounding constants) is recomputed, the provable bounds and the digest are not
    net.update_lipschitz(tol=1e-6)
    net.certify(x)
    assert counts == {"converge": 4, "rounding": 4, "pair_k": 1}


@pytest.mark.parametrize("name", PARAMS)
def test_any_parameter_change_refreshes_every_cached_number(counted, rng, name):
    net, counts = counted
    x = rng.random((6,) + SHAPE).astype(np.float32)
    net.certify(x)
    before = _derived(net)
    p = dict(net.named_parameters())[name]
    if name.endswith("weight"):
        p.data *= np.float32(1.25)        # in place, as Adam does
    else:
        p.data += np.float32(0.5)
    twin = _clone(net)                   # its cache starts empty: the reference
    counts.clear()
    got = net.certify(x)
    assert counts == {"converge": 4, "provable": 4, "rounding": 4, "pair_k": 1, "digest": 1}
    want = twin.certify(x)
    after = _derived(net)
    assert after == _derived(twin)       # no number is left from the old version
    assert after["version"] != before["version"]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # the change reaches what it must: K for a weight, the rounding constants for either
    changed = {k for k in before if before[k] != after[k]}
    assert {"version", "rounding"} <= changed
    if name.endswith("weight"):
        assert {"power", "provable"} <= changed
    if name == "param.3.weight":         # the head's rows enter K_ij
        assert "pair_k" in changed

"""Certification proves with the dot-product rounding bound, which holds only for outputs
computed as sums of their products. Winograd (kernels/winograd.py, the CPU default for
large 3x3 layers) is not such a sum: these tests show it breaking the bound, and the
certifier's passes running without it (kernels.direct_sums())."""
from __future__ import annotations

import numpy as np
import pytest

import kernels
from gloro_core.model import GloroNet
from kernels import reference, winograd

pytestmark = pytest.mark.skipif(winograd.njit is None, reason="numba is not importable")


def _adversarial(rng, c=16):
    """A sign-block input and a single-tap kernel: the exact products are few and uneven,
    the Winograd transforms mix many large terms that cancel only in exact arithmetic."""
    blk = np.array([[1, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [-1, -1, 1, 1]], np.float64)
    p = np.tile(blk, (8, 8)) * rng.uniform(0.5, 1.0, (32, 32))
    x = (p[None, None] * rng.uniform(0.9, 1.0, (2, c, 1, 1))).astype(np.float32)
    w = np.zeros((4, c, 3, 3), np.float32)
    w[:, :, 0, 0] = rng.uniform(0.5, 1, (4, c))
    return x, w


def _worst_ratio(y, x, w):
    """max over outputs of |y - exact| / (gamma_{k+1} |W||x| + (k+1) tiny): <= 1 is the bound."""
    k = w.shape[1] * 9
    u = 2.0 ** -24
    gamma = (k + 1) * u / (1 - (k + 1) * u)
    exact = reference.conv2d(x.astype(np.float64), w.astype(np.float64), None, (1, 1), (1, 1, 1, 1))
    mag = reference.conv2d(np.abs(x).astype(np.float64), np.abs(w).astype(np.float64), None, (1, 1), (1, 1, 1, 1))
    return float((np.abs(y - exact) / (gamma * mag + (k + 1) * 2.0 ** -149)).max())


def test_winograd_breaks_the_dot_product_bound_and_direct_sums_keep_it(rng):
    x, w = _adversarial(rng)
    assert winograd.applies(x.shape, w.shape, (1, 1), (1, 1, 1, 1))
    assert _worst_ratio(kernels.conv2d(x, w, None, 1, "same"), x, w) > 1  # the premise
    with kernels.direct_sums():
        assert not winograd.applies(x.shape, w.shape, (1, 1), (1, 1, 1, 1))
        assert _worst_ratio(kernels.conv2d(x, w, None, 1, "same"), x, w) <= 1
    assert winograd.applies(x.shape, w.shape, (1, 1), (1, 1, 1, 1))  # restored after the block


def test_the_certifier_passes_run_without_winograd(rng, monkeypatch):
    calls = []
    real = winograd.conv2d
    monkeypatch.setattr(winograd, "conv2d", lambda *a: calls.append(1) or real(*a))
    layers = [{"type": "conv", "filters": 4, "kernel": 3, "stride": 1, "padding": "same"},
              {"type": "dense", "units": 10}]
    net = GloroNet((16, 32, 32), 10, layers, activation="relu", dtype="float32", eps=0.1, seed=0)
    x = rng.uniform(0, 1, (3, 16, 32, 32)).astype(np.float32)
    net.logits(x)
    assert calls, "this net's conv is meant to qualify for Winograd in a plain forward"
    calls.clear()
    net.update_lipschitz()
    for tight in (True, False):
        net.certify(x, tight_radius=tight)
    net.gloro_logits(x)
    assert not calls, "a certification pass ran Winograd"

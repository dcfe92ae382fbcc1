"""The performance defaults: the fused relu_grad kernel and the per-op / batch-1 backend choice."""
import numpy as np
import pytest

from kernels import registry


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 7, 9), (1, 1), (700, 1000)])
def test_relu_grad_backends_agree_exactly(dtype, shape):
    rng = np.random.default_rng()
    x = rng.standard_normal(shape).astype(dtype)
    x.flat[:: 7] = 0.0                     # exact zeros: gradient 0 there
    x.flat[3 :: 11] = np.nan               # NaN in the output: gradient 0 (as np.where)
    out = np.maximum(x, dtype(0))
    g = rng.standard_normal(shape).astype(dtype)
    g.flat[1 :: 13] = np.nan               # NaN upstream survives only where out > 0
    g.flat[2 :: 17] = np.inf
    want = np.where(out > 0, g, dtype(0))
    for backend in registry.backends():
        if (("relu_grad", backend) in registry._IMPLS):
            got = registry.get("relu_grad", backend)(out, g)
            assert got.dtype == g.dtype and got.shape == g.shape
            np.testing.assert_array_equal(got, want)


def test_relu_grad_takes_non_contiguous_inputs():
    rng = np.random.default_rng()
    out = np.maximum(rng.standard_normal((6, 8), dtype=np.float32), 0).T
    g = rng.standard_normal((8, 6), dtype=np.float32)
    for backend in ("numpy", "numba"):
        if backend in registry.backends():
            got = registry.get("relu_grad", backend)(out, g)
            np.testing.assert_array_equal(got, np.where(out > 0, g, np.float32(0)))


def test_batch1_default_differs_from_batch_default(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(registry, "DEFAULT_CPU_BATCH1_BY_OP", {"conv2d": "reference"})
    monkeypatch.setattr(registry, "DEFAULT_CPU_BY_OP", {})
    assert registry.select("conv2d", np.zeros((1, 2, 3, 3))) == "reference"
    assert registry.select("conv2d", np.zeros((2, 2, 3, 3))) == registry.DEFAULT_CPU
    assert registry.select("dense", np.zeros((1, 3))) == registry.DEFAULT_CPU
    # an explicit backend always wins
    assert registry.select("conv2d", np.zeros((1, 2, 3, 3)), backend="numpy") == "numpy"


def test_unavailable_default_falls_back(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(registry, "DEFAULT_CPU_BY_OP", {"dense": "numba"})
    monkeypatch.setitem(registry._LOADED, "numba", "pretend: not installed")
    assert registry.select("dense", np.zeros((2, 3))) == registry.DEFAULT_CPU

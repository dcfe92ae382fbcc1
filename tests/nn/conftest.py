"""Shared helpers for the nn tests: fresh random inputs, CPU backends to inject."""
import numpy as np
import pytest

import kernels


@pytest.fixture
def rng(request):
    # a fresh seed per test run (printed on failure through the test id's repr)
    seed = np.random.SeedSequence().entropy % (2**32)
    print(f"rng seed = {seed}")  # shown with a failing test's captured output
    return np.random.default_rng(seed)


def cpu_backends():
    from kernels.registry import device_of

    return [b for b in kernels.backends() if device_of(b) == "cpu"]


@pytest.fixture(params=["reference", "numpy", "numba"])
def cpu_backend(request, monkeypatch):
    """Run the test body once per CPU kernel backend (skipped where unavailable)."""
    if request.param not in cpu_backends():
        pytest.skip(f"backend {request.param} unavailable: {kernels.availability()[request.param]}")
    monkeypatch.setenv("GLORO_BACKEND", request.param)
    return request.param

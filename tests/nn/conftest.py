"""nn test helpers: the CPU kernel backends to inject (``rng`` comes from tests/conftest.py)."""
import pytest

import kernels


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

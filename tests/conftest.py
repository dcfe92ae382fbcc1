"""Shared, generic fixtures for the whole test tree."""
import os

import numpy as np
import pytest


@pytest.fixture
def rng():
    """A fresh random generator per test; its seed is printed (shown on failure).

    Set GLORO_TEST_SEED=<int> to replay a failing run.
    """
    env = os.environ.get("GLORO_TEST_SEED")
    seed = int(env) if env else int(np.random.SeedSequence().entropy % (2**63))
    print(f"rng seed: {seed} (replay with GLORO_TEST_SEED={seed})")
    return np.random.default_rng(seed)


@pytest.fixture
def cupy_device():
    """The cupy module when a CUDA device and the cupy backend are usable, else a skip
    that says why (no driver, no device, no CuPy)."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
        from kernels.registry import availability

        why = availability().get("cupy")
        if why is not None:
            raise RuntimeError(why)
        return cupy
    except Exception as exc:  # no driver, no device, no cupy
        pytest.skip(f"needs a CUDA device with the cupy backend: {type(exc).__name__}: {exc}")

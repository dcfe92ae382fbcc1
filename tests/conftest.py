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


@pytest.fixture(scope="session")
def cuda_emulator_build(tmp_path_factory):
    """The CUDA C emulator (tests/cuda_emulator.py), built once per session; a skip without g++."""
    import cuda_emulator

    if cuda_emulator.GXX is None:
        pytest.skip("g++ not installed: the CUDA C emulator cannot be built")
    return cuda_emulator.build(tmp_path_factory.mktemp("cuda_emu"))


@pytest.fixture
def fake_gpu(cuda_emulator_build):
    """The CuPy stand-in (tests/fake_cupy.py) installed as ``cupy``, its RawModule kernels on
    the CUDA C emulator; yields the stand-in module, with fresh host-sync counts."""
    import cuda_emulator
    import fake_cupy

    emu = cuda_emulator.Emulator(cuda_emulator_build)
    with fake_cupy.install(emu) as cp:
        fake_cupy.reset_counts()
        cp.emulator = emu
        yield cp

"""Shared helpers for the kernel tests: one test body serves every backend.

``backend_params()`` yields a pytest param per backend (GPU ones carry
``pytest.mark.gpu``); ``need(backend)`` skips with the registry's reason when a
backend cannot run here; ``call(op, backend, ...)`` moves array arguments to
the backend's device (``cupy.asarray``), runs ``kernels.<op>`` and brings the
result back (``cupy.asnumpy``), so assertions always see NumPy arrays.
"""
from __future__ import annotations

import numpy as np
import pytest

import kernels
from kernels import registry

TESTED = [b for b in registry.BACKEND_MODULES if b != "reference"]


def is_gpu(backend: str) -> bool:
    return registry.device_of(backend) == "gpu"


def backend_params(names=None):
    """pytest params over ``names`` (default: every backend but reference)."""
    return [
        pytest.param(b, id=b, marks=[pytest.mark.gpu] if is_gpu(b) else [])
        for b in (TESTED if names is None else names)
    ]


def _cuda_device_reason() -> str | None:
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no runtime, no CuPy
        return f"no CUDA device: {type(exc).__name__}: {exc}"
    return None if n > 0 else "no CUDA device: getDeviceCount() == 0"


def need(backend: str) -> None:
    """Skip the calling test, with the reason, unless ``backend`` runs here."""
    why = registry.availability()[backend]
    if why is None and is_gpu(backend):
        why = _cuda_device_reason()
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable: {why}")


def to_device(backend: str, a):
    """``a`` on the backend's device (NumPy arrays go to CuPy for GPU backends)."""
    if isinstance(a, np.ndarray) and is_gpu(backend):
        import cupy

        return cupy.asarray(a)
    return a


def to_host(a):
    """A NumPy array, whatever device ``a`` lives on."""
    if registry.is_gpu_array(a):
        import cupy

        return cupy.asnumpy(a)
    return a


def call(op: str, backend: str, *args, **kwargs):
    """``kernels.<op>(*args, backend=backend, **kwargs)`` with device moves both ways."""
    dev_args = [to_device(backend, a) for a in args]
    dev_kwargs = {k: to_device(backend, v) for k, v in kwargs.items()}
    out = getattr(kernels, op)(*dev_args, backend=backend, **dev_kwargs)
    return to_host(out)


def fresh_rng():
    """A fresh, unseeded-looking generator and the seed that reproduces it."""
    seed = int(np.random.SeedSequence().entropy % (2**63))
    return np.random.default_rng(seed), seed


def assert_close(got, want, mag, rtol: float, what: str, seed=None) -> None:
    """|got - want| <= rtol * mag elementwise, shapes and dtypes equal, no NaN/inf.

    ``mag`` bounds the sum of absolute terms behind each entry (the same op on
    |inputs|), so the tolerance follows the rounding error a correct summation in
    any order can make, including where cancellation leaves ``want`` near zero.
    """
    tag = f"{what} (seed {seed})" if seed is not None else what
    assert got.shape == want.shape, f"{tag}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{tag}: dtype {got.dtype} != {want.dtype}"
    assert np.all(np.isfinite(got)), f"{tag}: non-finite values"
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    tol = rtol * np.asarray(mag, dtype=np.float64) + np.finfo(np.float64).tiny
    bad = err > tol
    if bad.any():
        i = np.unravel_index(np.argmax(err / tol), err.shape)
        raise AssertionError(
            f"{tag}: {int(bad.sum())}/{bad.size} entries off; worst at {i}: got {got[i]!r}, "
            f"want {want[i]!r}, |err| {err[i]:.3e} > tol {tol[i]:.3e}"
        )

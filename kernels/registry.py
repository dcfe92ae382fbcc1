"""One place that decides which implementation of an op runs.

Implementations register under (op, backend). Backend modules are imported
lazily, on first use, inside try/except: a backend whose imports fail (no CuPy,
no CUDA driver) is reported as unavailable with the reason, and nothing else
is affected.

Selection order for a call: the ``backend=`` argument, then the default set by
:func:`default_backend` (the command line's ``--backend``), then the environment
variable ``GLORO_BACKEND`` (both for arrays of the matching kind), then the array
type: NumPy arrays go to the fastest CPU backend, CuPy arrays to ``cupy``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading

# backend name -> (module that registers it, device kind)
BACKEND_MODULES: dict[str, tuple[str, str]] = {
    "reference": ("kernels.reference", "cpu"),
    "numpy": ("kernels.numpy_backend", "cpu"),
    "numba": ("kernels.numba_backend", "cpu"),
    "cupy": ("kernels.cupy_backend", "gpu"),
    "numba_cuda": ("kernels.numba_cuda_backend", "gpu"),
}

# Default per op for NumPy arrays: whichever CPU backend measures faster
# (bench/run.py); ops not listed use DEFAULT_CPU.
DEFAULT_CPU = "numpy"
DEFAULT_CPU_BY_OP: dict[str, str] = {
    # one fused pass; NumPy's np.where(out > 0, g, 0) measured ~10x slower at 6.4M float32
    "relu_grad": "numba",
    # relu_grad plus the bias gradient's channel sums in the same pass
    "relu_grad_bias": "numba",
    # one jitted pass per pair (prange): numba measured 2-5x faster for minmax and 3-10x for
    # minmax_grad than numpy's strided min/max and masked copyto (1 and 2 threads, batch 256
    # and 1024 at the 2C2F/4C3F activation shapes; e.g. grad (256,32,28,28): 36.6 -> 3.9 ms)
    "minmax": "numba",
    "minmax_grad": "numba",
    # the numpy backend's GEMMs with one jitted output pass per chunk instead of NumPy's
    # transpose, bias and ReLU passes (and a stride-s grad_input's depth-to-space in that
    # pass), and Winograd for large 3x3 layers: faster at batch 256
    "conv2d": "numba",
    "conv2d_grad_input": "numba",
    # Winograd for the layers the forward takes it for, else the numpy backend's GEMMs
    "conv2d_grad_weight": "numba",
}
# Defaults for a batch of one (``like.shape[0] == 1``: the power method's iterates), where
# Python/im2col overhead dominates the small GEMM; bench/run.py and the kernel notes measured
# numba 1.1-2x faster than numpy there. Consulted before DEFAULT_CPU_BY_OP.
DEFAULT_CPU_BATCH1_BY_OP: dict[str, str] = {
    "conv2d": "numba",
    "conv2d_grad_input": "numba",
    # numba's dense ops are numpy's; numba adds the fused power steps (dense_power_steps)
    "dense": "numba",
    "dense_grad_input": "numba",
}
DEFAULT_GPU = "cupy"

ENV_VAR = "GLORO_BACKEND"

_IMPLS: dict[tuple[str, str], object] = {}
_LOADED: dict[str, str | None] = {}  # backend -> None if ok, else the reason it failed


# The kernel contract: every op a backend may register, with its positional parameters.
# REQUIRED ops are what kernels/api.py, nn and the optimiser call on any array, so every
# backend implements them; the others are fused or single-step variants that callers look
# up with has() (e.g. gloro_core.lipschitz finds "<op>_power_steps" by name).
OPS: dict[str, tuple[str, ...]] = {
    "conv2d": ("x", "w", "b", "stride", "pads"),
    "conv2d_grad_input": ("gy", "w", "x_shape", "stride", "pads"),
    "conv2d_grad_weight": ("x", "gy", "w_shape", "stride", "pads"),
    "dense": ("x", "w", "b"),
    "dense_grad_input": ("gy", "w"),
    "dense_grad_weight": ("x", "gy"),
    "minmax": ("x",),
    "minmax_grad": ("x", "gy"),
    "adam_update": ("p", "g", "m", "v", "lr_t", "beta1", "beta2", "epsilon"),
    "conv2d_power_steps": ("v", "w", "iters", "stride", "pads"),   # -> (v, ok: bool or None)
    "dense_power_steps": ("v", "w", "iters"),
    "conv2d_relu": ("x", "w", "b", "stride", "pads"),
    "relu_grad": ("out", "gy"),
    "relu_grad_bias": ("out", "gy"),
    "conv_power_step": ("v", "w", "stride", "pads"),               # -> (v_next, sigma)
    "dense_power_step": ("v", "w"),
}
REQUIRED = ("conv2d", "conv2d_grad_input", "conv2d_grad_weight", "dense", "dense_grad_input",
            "dense_grad_weight", "minmax", "minmax_grad", "adam_update")


def _positional_count(fn) -> int | None:
    """How many positional parameters fn takes; None when it takes *args (a wrapper)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):   # a compiled callable without a signature
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def register(op: str, backend: str):
    """Decorator: register ``fn`` as the implementation of ``op`` on ``backend``; the op must
    be in OPS and fn must take its parameters (a TypeError at import, not at first call)."""
    if backend not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {backend!r}; known: {sorted(BACKEND_MODULES)}")
    if op not in OPS:
        raise ValueError(f"{backend}: {op!r} is not an op of the kernel contract (registry.OPS)")

    def deco(fn):
        n = _positional_count(fn)
        if n is not None and n != len(OPS[op]):
            raise TypeError(f"{backend}: {op} takes ({', '.join(OPS[op])}); "
                            f"{getattr(fn, '__name__', fn)} takes {n} positional parameters")
        _IMPLS[(op, backend)] = fn
        return fn

    return deco


def _load(backend: str) -> str | None:
    """Import the backend's module once; return None or the reason it is unavailable."""
    if backend not in _LOADED:
        module, _ = BACKEND_MODULES[backend]
        try:
            mod = importlib.import_module(module)
            check = getattr(mod, "availability", None)
            _LOADED[backend] = check() if check is not None else None
        except Exception as exc:  # any import-time failure means "not here"
            _LOADED[backend] = f"{type(exc).__name__}: {exc}"
    return _LOADED[backend]


def availability() -> dict[str, str | None]:
    """Map every known backend to None (available) or the reason it is not."""
    return {name: _load(name) for name in BACKEND_MODULES}


def backends() -> list[str]:
    """Names of the backends that work on this machine."""
    return [name for name, why in availability().items() if why is None]


def device_of(backend: str) -> str:
    """'cpu' or 'gpu'."""
    if backend not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {backend!r}; known: {sorted(BACKEND_MODULES)}")
    return BACKEND_MODULES[backend][1]


def is_gpu_array(x) -> bool:
    """True for CuPy arrays; never imports CuPy itself."""
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(x, cp.ndarray)


def array_module(x):
    """numpy or cupy, whichever owns ``x``."""
    if is_gpu_array(x):
        return sys.modules["cupy"]
    import numpy

    return numpy


def to_host(x):
    """A NumPy array from a CuPy array (a copy), a NumPy array (itself) or array-like."""
    if is_gpu_array(x):
        return x.get()
    import numpy

    return numpy.asarray(x)


_DEFAULT: str | None = None   # see default_backend


@contextlib.contextmanager
def default_backend(name: str | None):
    """Within the block, calls without ``backend=`` use ``name`` for arrays of its device.

    What ``GLORO_BACKEND`` does, without writing the process environment that other
    libraries read (the CLI's ``--backend``); the previous default comes back after."""
    global _DEFAULT
    if name is not None and name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(BACKEND_MODULES)}")
    prev, _DEFAULT = _DEFAULT, name
    try:
        yield
    finally:
        _DEFAULT = prev


_SUMS = threading.local()


@contextlib.contextmanager
def direct_sums():
    """Within the block, in this thread, every conv output is computed as a sum of its
    products (in any order): no algorithm that transforms the operands (Winograd) runs.
    The rounding-error bounds certification proves with hold only for such sums."""
    _SUMS.depth = getattr(_SUMS, "depth", 0) + 1
    try:
        yield
    finally:
        _SUMS.depth -= 1


def direct_sums_only() -> bool:
    """Whether this thread is within :func:`direct_sums`."""
    return getattr(_SUMS, "depth", 0) > 0


def select(op: str, like, backend: str | None = None) -> str:
    """Name of the backend that runs ``op`` for an array like ``like``."""
    device = "gpu" if is_gpu_array(like) else "cpu"
    if backend is None:
        env = _DEFAULT or os.environ.get(ENV_VAR)
        if env and env in BACKEND_MODULES and device_of(env) == device:
            backend = env
        elif env and env not in BACKEND_MODULES:
            raise ValueError(f"{ENV_VAR}={env!r} is not a backend; known: {sorted(BACKEND_MODULES)}")
    if backend is None:
        backend = DEFAULT_GPU if device == "gpu" else _default_cpu(op, like)
    if backend not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {backend!r}; known: {sorted(BACKEND_MODULES)}")
    if device_of(backend) != device:
        raise ValueError(
            f"backend {backend!r} runs on the {device_of(backend)} but the array is a "
            f"{'CuPy' if device == 'gpu' else 'NumPy'} array"
        )
    return backend


def _default_cpu(op: str, like) -> str:
    """The per-op (and batch-1) CPU default; DEFAULT_CPU when that backend is unavailable."""
    name = None
    shape = getattr(like, "shape", ())
    if len(shape) and shape[0] == 1:
        name = DEFAULT_CPU_BATCH1_BY_OP.get(op)
    if name is None:
        name = DEFAULT_CPU_BY_OP.get(op)
    if name is None or _load(name) is not None:
        return DEFAULT_CPU
    return name


def has(op: str, backend: str) -> bool:
    """Whether ``backend`` is available and implements ``op`` (optional fused ops)."""
    return _load(backend) is None and (op, backend) in _IMPLS


def get(op: str, backend: str):
    """The implementation of ``op`` on ``backend``; a clear error if there is none."""
    why = _load(backend)
    if why is not None:
        raise RuntimeError(f"backend {backend!r} is not available here: {why}")
    try:
        return _IMPLS[(op, backend)]
    except KeyError:
        have = sorted(o for (o, b) in _IMPLS if b == backend)
        raise NotImplementedError(f"op {op!r} has no {backend!r} implementation; it has {have}") from None

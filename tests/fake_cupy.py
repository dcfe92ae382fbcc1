"""A NumPy-backed stand-in for the ``cupy`` module, for tests only: the GPU path on a CPU.

``install(emulator)`` puts this module in ``sys.modules`` as ``cupy`` (and a matching
``cupyx``), so the engine's GPU path runs unchanged on a machine without a GPU:
``GloroNet.to("gpu")``, a training step with ``device="gpu"``, ``certify``, the bench's
GPU epoch. Arrays live in host memory behind :class:`ndarray`, and ``RawModule`` kernels
launch on the CUDA C emulator (tests/cuda_emulator.py), so the cupy backend's own host
code and CUDA C kernels are what run.

The stand-in is strict where CuPy is, so host/device mix-ups fail here as they would on a
GPU: a NumPy array is refused as an operand (``TypeError``), ``numpy.asarray`` of a device
array is refused, reductions and element access give 0-d device arrays, not scalars.

Every host synchronisation is counted in :data:`syncs` (by kind): ``get``, ``item``,
``tolist``, ``__float__``/``__int__``/``__bool__``/``__index__``, ``asnumpy``,
``Stream.synchronize``/``Device.synchronize``/``Event.synchronize``. Uploads
(``asarray`` of host data) are counted in :data:`uploads`. Neither is a profiler of a real
GPU: a sync CuPy does inside a call (``bincount``'s output size, say) is counted only
where this module knows of it (``bincount`` without ``minlength`` is).
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

__version__ = "0.0-numpy-stand-in"

syncs: dict[str, int] = {}
uploads = [0]
_emulator = None   # tests/cuda_emulator.Emulator, set by install()
_LAUNCH_LOCK = threading.Lock()


def _sync(kind: str) -> None:
    syncs[kind] = syncs.get(kind, 0) + 1


def total_syncs() -> int:
    return sum(syncs.values())


def reset_counts() -> None:
    syncs.clear()
    uploads[0] = 0


# ---------------------------------------------------------------- arrays

def _host_refused(what) -> TypeError:
    return TypeError(f"Unsupported type {type(what)} (a NumPy array given where CuPy wants a device "
                     f"array; the CuPy stand-in refuses it as CuPy does)")


def _unwrap(obj, allow_host: bool = False):
    """The NumPy storage behind device arrays in ``obj`` (nested lists/tuples/dicts)."""
    if isinstance(obj, ndarray):
        return obj._a
    if isinstance(obj, np.ndarray):
        if not allow_host:
            raise _host_refused(obj)
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o, allow_host) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v, allow_host) for k, v in obj.items()}
    return obj


def _wrap(obj):
    """Device arrays for NumPy results; NumPy scalars become 0-d device arrays, as in CuPy."""
    if isinstance(obj, np.ndarray):
        return ndarray(obj)
    if isinstance(obj, np.generic):
        return ndarray(np.asarray(obj))
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    if isinstance(obj, list):
        return [_wrap(o) for o in obj]
    return obj


class ndarray(NDArrayOperatorsMixin):  # noqa: N801 - the name CuPy uses
    """A device array: a NumPy array that only device code may touch."""

    __slots__ = ("_a",)

    def __init__(self, a: np.ndarray):
        self._a = a

    # --- what CuPy forbids: implicit host conversion
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        outs = kwargs.get("out")
        if outs is not None:
            kwargs["out"] = tuple(_unwrap(o) for o in outs)
        res = getattr(ufunc, method)(*_unwrap(inputs), **kwargs)
        if outs is not None and len(outs) == 1:
            return outs[0]
        return _wrap(res)

    def __array_function__(self, func, types_, args, kwargs):
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    # --- host synchronisations
    def get(self, stream=None, order="C", out=None):
        _sync("get")
        return np.array(self._a, order=order)

    def item(self, *args):
        _sync("item")
        return self._a.item(*args)

    def tolist(self):
        _sync("tolist")
        return self._a.tolist()

    def __float__(self):
        _sync("__float__")
        return float(self._a)

    def __int__(self):
        _sync("__int__")
        return int(self._a)

    def __bool__(self):
        _sync("__bool__")
        return bool(self._a)

    def __index__(self):
        _sync("__index__")
        return self._a.__index__()

    def __repr__(self):
        return f"fake_cupy.ndarray({self._a!r})"

    # --- plain array protocol
    @property
    def shape(self):
        return self._a.shape

    @shape.setter
    def shape(self, value):
        self._a.shape = value

    @property
    def data(self):
        """A device pointer, as CuPy's (NumPy's ``data`` is a host buffer)."""
        return MemoryPointer(self._a.ctypes.data)

    @property
    def T(self):  # noqa: N802 - the NumPy/CuPy name
        return ndarray(self._a.T)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(r) for r in self._a)

    def __getitem__(self, idx):
        return _wrap(self._a[_unwrap(idx, allow_host=True)])

    def __setitem__(self, idx, value):
        if isinstance(value, np.ndarray):
            uploads[0] += 1
        self._a[_unwrap(idx, allow_host=True)] = _unwrap(value, allow_host=True)

    def __getattr__(self, name):
        # methods and attributes of NumPy's ndarray (reshape, astype, sum, dtype, size, ...);
        # never its protocols (__array_interface__ would hand NumPy the host buffer)
        if name.startswith("__"):
            raise AttributeError(name)
        val = getattr(self._a, name)
        if callable(val):
            def method(*args, **kwargs):
                return _wrap(val(*_unwrap(args), **_unwrap(kwargs)))
            method.__name__ = name
            return method
        return _wrap(val)

    def __copy__(self):
        return ndarray(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray(self._a.copy())

    def __getstate__(self):
        raise TypeError("the CuPy stand-in does not pickle device arrays")


class MemoryPointer:
    def __init__(self, ptr: int):
        self.ptr = ptr


# ---------------------------------------------------------------- module-level functions

def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    uploads[0] += 1
    return ndarray(np.array(_unwrap(a, allow_host=True), dtype=dtype, order=order or "K"))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if isinstance(a, ndarray):
        return ndarray(np.array(a._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    uploads[0] += 1
    return ndarray(np.array(_unwrap(a, allow_host=True), dtype=dtype, order=order, ndmin=ndmin))


asanyarray = asarray


def asnumpy(a, stream=None, order="C", out=None):
    if isinstance(a, ndarray):
        _sync("asnumpy")
        return np.array(a._a, order=order)
    return np.asarray(a, order=order)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def bincount(x, weights=None, minlength=0):
    if not minlength:
        _sync("bincount (output size)")   # CuPy reads max(x) back to size the output
    return _wrap(np.bincount(_unwrap(x), _unwrap(weights), minlength))


def _wrapped(fn):
    def call(*args, **kwargs):
        return _wrap(fn(*_unwrap(args), **_unwrap(kwargs)))
    call.__name__ = getattr(fn, "__name__", "fn")
    call.__doc__ = f"The stand-in for cupy.{call.__name__} (NumPy's, on device arrays)."
    return call


class _Namespace(types.ModuleType):
    """A submodule (linalg, random, fft) of NumPy's functions on device arrays."""

    def __init__(self, name, numpy_mod):
        super().__init__(name)
        self._np = numpy_mod

    def __getattr__(self, name):
        val = getattr(self._np, name)
        return _wrapped(val) if callable(val) and not isinstance(val, type) else val


class _Generator:
    def __init__(self, seed=None):
        self._g = np.random.default_rng(seed)

    def __getattr__(self, name):
        return _wrapped(getattr(self._g, name))


class _Random(_Namespace):
    """cupy.random: its module-level draws take ``dtype`` (as NumPy's Generator's do)."""

    _gen = np.random.default_rng()

    def __getattr__(self, name):
        if hasattr(self._gen, name):
            return _wrapped(getattr(self._gen, name))
        return super().__getattr__(name)


linalg = _Namespace("cupy.linalg", np.linalg)
random = _Random("cupy.random", np.random)
random.default_rng = _Generator
random.Generator = _Generator


class _UFunc:
    """A NumPy ufunc on device arrays, with its methods (reduce, at, outer, ...)."""

    def __init__(self, uf: np.ufunc):
        self._uf, self._call, self.__name__ = uf, _wrapped(uf), uf.__name__

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        val = getattr(self._uf, name)
        return _wrapped(val) if callable(val) else val


def __getattr__(name):
    # everything else NumPy has: dtypes, constants and functions (on device arrays)
    val = getattr(np, name)
    if isinstance(val, np.ufunc):
        return _UFunc(val)
    if isinstance(val, (type, np.dtype)) or not callable(val):
        return val
    return _wrapped(val)


# ---------------------------------------------------------------- cupy.cuda

class CUDARuntimeError(RuntimeError):
    pass


class Device:
    def __init__(self, device=0):
        self.id = int(device)
        self.compute_capability = "90"
        self.attributes = {"MultiProcessorCount": 2, "MaxThreadsPerBlock": 1024,
                           "MaxSharedMemoryPerBlock": 49152}

    def synchronize(self):
        _sync("Device.synchronize")

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Stream:
    null: Stream
    ptr = 0   # the legacy default stream

    def synchronize(self):
        _sync("Stream.synchronize")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


Stream.null = Stream()


class Event:
    def __init__(self, *args, **kwargs):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        _sync("Event.synchronize")


def _elapsed_ms(start: Event, end: Event) -> float:
    return (end.t - start.t) * 1e3


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


_POOL = _MemoryPool()


def get_default_memory_pool():
    return _POOL


def get_default_pinned_memory_pool():
    return _POOL


cuda = types.ModuleType("cupy.cuda")
cuda.Device = Device
cuda.Stream = Stream
cuda.Event = Event
cuda.get_elapsed_time = _elapsed_ms
cuda.get_current_stream = lambda: Stream.null
cuda.runtime = types.ModuleType("cupy.cuda.runtime")
cuda.runtime.CUDARuntimeError = CUDARuntimeError
cuda.runtime.getDeviceCount = lambda: 1
cuda.runtime.memGetInfo = lambda: (64 << 30, 80 << 30)


class RawModule:
    """NVRTC is not run; get_function hands out the emulator's kernel of that name."""

    def __init__(self, code=None, options=(), name_expressions=(), **kwargs):
        self.code, self.options, self.names = code, tuple(options), tuple(name_expressions)

    def get_function(self, expr):
        if self.names and expr not in self.names:
            raise KeyError(f"{expr!r} is not among the module's name expressions")
        if _emulator is None:
            raise RuntimeError("the CuPy stand-in has no emulator: call fake_cupy.install(emulator)")
        kernel = _emulator.kernel(expr)

        def launch(grid, block, args, **kwargs):
            for a in args:
                if isinstance(a, np.ndarray):
                    raise _host_refused(a)
            with _LAUNCH_LOCK:   # one stream: kernels run one at a time, as on the GPU's null stream
                kernel(grid, block, tuple(_unwrap(a) for a in args))
        return launch


# ---------------------------------------------------------------- cupyx

cupyx = types.ModuleType("cupyx")


def _scatter_add(a, slices, value):
    np.add.at(_unwrap(a), _unwrap(slices, allow_host=True), _unwrap(value))


cupyx.scatter_add = _scatter_add


# ---------------------------------------------------------------- installing

@contextlib.contextmanager
def install(emulator):
    """Within the block, ``import cupy`` gives this module and the cupy backend runs its
    kernels on ``emulator``; what was there before (real CuPy or nothing) comes back after."""
    global _emulator
    import kernels.cupy_backend as cb
    from kernels import registry

    me = sys.modules[__name__]
    saved = {k: sys.modules.get(k) for k in ("cupy", "cupyx")}
    saved_cb = (cb.cp, cb._MODULES.copy(), list(cb._SM_COUNT))
    saved_loaded = {k: registry._LOADED[k] for k in ("cupy",) if k in registry._LOADED}
    prev_emu, _emulator = _emulator, emulator
    sys.modules["cupy"], sys.modules["cupyx"] = me, cupyx
    cb.cp = me
    cb._MODULES.clear()
    cb._SM_COUNT[:] = [2]   # a small "GPU": split-K kicks in on small shapes
    registry._LOADED["cupy"] = None
    try:
        yield me
    finally:
        _emulator = prev_emu
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        cb.cp = saved_cb[0]
        cb._MODULES.clear()
        cb._MODULES.update(saved_cb[1])
        cb._SM_COUNT[:] = saved_cb[2]
        registry._LOADED.pop("cupy", None)
        registry._LOADED.update(saved_loaded)

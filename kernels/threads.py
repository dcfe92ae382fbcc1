"""The engine's thread policy, in one place: BLAS thread control and one shared pool.

Why the CPU kernels pin BLAS to one thread: with T > 1 BLAS threads, OpenBLAS
parallelises every small chunk GEMM on its own and ends each call with a barrier, and
after a multi-threaded call its workers busy-wait for a while and take a core from
whatever runs next (Numba's loops, the next chunk). So the kernels split their work over
``cpu_threads()`` Python threads of ``pool()`` instead, each calling a single-threaded
BLAS inside ``single_blas_thread()`` (NumPy and Numba release the GIL there): one join per
op, and no spinning.

BLAS libraries are found and driven through threadpoolctl: NumPy's OpenBLAS (np.matmul,
np.dot) and SciPy's (which Numba's jitted np.dot calls). The engine never writes
environment variables; it changes thread counts only through the libraries' own calls,
and restores them.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_LOCK = threading.RLock()
_BLAS = None  # list of threadpoolctl controllers of user_api "blas", found on first use
_PIN = [0, []]  # [open single_blas_thread contexts, the counts saved by the first]
_POOL: ThreadPoolExecutor | None = None


def _blas_controllers() -> list:
    """threadpoolctl's controllers of the loaded BLAS libraries ([] when unavailable)."""
    global _BLAS
    with _LOCK:
        if _BLAS is None:
            try:
                import numpy  # noqa: F401  (loads NumPy's BLAS)

                try:  # SciPy's BLAS, which Numba's np.dot uses: load it so it is controlled too
                    import scipy.linalg.cython_blas  # noqa: F401
                except ImportError:
                    pass
                ThreadpoolController = _import_threadpoolctl().ThreadpoolController
                _BLAS = list(ThreadpoolController().select(user_api="blas").lib_controllers)
            except Exception:  # no threadpoolctl or an unknown BLAS: nothing is pinned
                _BLAS = []
        return _BLAS


def _import_threadpoolctl():
    """threadpoolctl, imported without the environment change it makes at first import
    (KMP_DUPLICATE_LIB_OK=True, which Intel's OpenMP reads: not ours to decide)."""
    import sys

    if "threadpoolctl" in sys.modules:  # imported by the application: its choice stands
        return sys.modules["threadpoolctl"]
    # threadpoolctl does os.environ.setdefault("KMP_DUPLICATE_LIB_OK", "True") at import:
    # undo exactly that one default (nothing else: another thread's own settings made
    # meanwhile must stay), so the process environment ends as it was
    had = "KMP_DUPLICATE_LIB_OK" in os.environ
    import threadpoolctl

    if not had and os.environ.get("KMP_DUPLICATE_LIB_OK") == "True":
        del os.environ["KMP_DUPLICATE_LIB_OK"]
    return threadpoolctl


def _set(ctl, n: int) -> None:
    # threadpoolctl lets only one "controlling" Python thread change a process-wide
    # OpenBLAS pool and silently ignores the others. Our pin is process-wide and taken
    # under _LOCK by whichever thread opens it first, so take control for the call and
    # release it again for the application's own threadpoolctl use.
    clear = getattr(type(ctl), "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)
    ctl.set_num_threads(int(n))
    if clear is not None:
        clear(force=True)


def has_blas_control() -> bool:
    """True when the BLAS thread count can be read and set here."""
    return bool(_blas_controllers())


def blas_threads() -> int:
    """The configured BLAS thread count (the saved one while pinned to 1); 1 without control."""
    ctls = _blas_controllers()
    if not ctls:
        return 1
    with _LOCK:
        if _PIN[0]:
            return int(_PIN[1][0])
        return int(ctls[0].get_num_threads())


def set_blas_threads(n: int) -> None:
    """Set every BLAS library's thread count to ``n`` (the process-wide setting that
    ``single_blas_thread`` restores); no-op without control."""
    with _LOCK:
        if _PIN[0]:
            _PIN[1] = [int(n)] * len(_PIN[1])
            return
        for ctl in _blas_controllers():
            _set(ctl, n)


class single_blas_thread:
    """Context: BLAS calls use one thread while any such context is open, in every BLAS
    library (no-op without control). Process-wide, as OpenBLAS's count is; nests and
    overlaps across Python threads: the first enter saves the counts, the last exit
    restores them (a per-thread save/restore once raced and left the process at 1)."""

    def __enter__(self):
        ctls = _blas_controllers()
        if ctls:
            with _LOCK:
                if _PIN[0] == 0:
                    _PIN[1] = [int(c.get_num_threads()) for c in ctls]
                    for c in ctls:
                        _set(c, 1)
                _PIN[0] += 1
        return self

    def __exit__(self, *exc):
        ctls = _blas_controllers()
        if ctls:
            with _LOCK:
                _PIN[0] -= 1
                if _PIN[0] == 0:
                    for c, n in zip(ctls, _PIN[1]):
                        _set(c, n)


def cpu_threads() -> int:
    """Python threads the CPU kernels split work over: the configured BLAS thread count
    (1 when BLAS threads cannot be controlled here, so that no split races BLAS's own)."""
    return blas_threads()


def pool(workers: int = 1) -> ThreadPoolExecutor:
    """The engine's one thread pool (kernels' chunk splits, the power method's layers),
    grown to at least ``workers`` threads. Work submitted to it must release the GIL."""
    global _POOL
    with _LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="gloro",
                                       initializer=_mark_pool_thread)
        return _POOL


_local = threading.local()


def _mark_pool_thread() -> None:
    _local.in_pool = True


def run_parts(fn, parts: list) -> list:
    """``[fn(p) for p in parts]``: parts[1:] on the pool, parts[0] on the calling thread,
    all joined (also when one raises) before returning or re-raising. Called from a pool
    thread (a split inside a split) it runs everything inline: a pool thread waiting on
    work queued behind itself would deadlock."""
    if len(parts) <= 1 or getattr(_local, "in_pool", False):
        return [fn(p) for p in parts]
    futs = [pool(len(parts) - 1).submit(fn, p) for p in parts[1:]]
    try:
        first = fn(parts[0])
    finally:
        rest = [f.result() for f in futs]
    return [first] + rest

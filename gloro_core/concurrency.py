"""A small process-wide thread pool for gloro_core's overlapped work: the power steps of
several layers at once (lipschitz.power_update_layers). The work submitted releases the
GIL (Numba nogil loops, NumPy)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_POOL: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()


def pool(workers: int = 1) -> ThreadPoolExecutor:
    """The shared pool, grown to at least ``workers`` threads."""
    global _POOL
    with _LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="gloro-core")
        return _POOL

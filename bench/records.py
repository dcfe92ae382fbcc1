"""One bench run's state: options, records, notes and the machine description."""
from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import warnings


class Bench:
    """Holds the options, the records and the notes of one run, and the PyTorch peer
    (torch_worker.TorchPeer, or None without torch)."""

    def __init__(self, args):
        self.args = args
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.meta: dict = {}
        self.torch = None
        self.warm_steps: dict = {}  # arch -> our warm GloRo step at the bench batch
        self.sgemm_cache: dict = {}  # (m, k, n) -> median GFLOP/s
        self.sgemm_best: dict = {}  # (m, k, n) -> best-run GFLOP/s
        self.kernel_medians: dict = {}  # kernel record name -> backend -> median s
        self._only = None
        if args.only:
            try:
                self._only = re.compile(args.only)
            except re.error:
                self._only = re.compile(re.escape(args.only))

    def wanted(self, name: str) -> bool:
        return self._only is None or bool(self._only.search(name))

    def add(self, rec: dict) -> dict:
        self.records.append(rec)
        return rec

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
        if self.args.verbose:
            print("note:", text, file=sys.stderr)

    def log(self, text: str) -> None:
        if not self.args.silent:
            print(text, file=sys.stderr, flush=True)


def record(name, workload, backend, shape, batch, times=None, **extra) -> dict:
    """A record: name, workload, backend, shape text, batch; with ``times`` (seconds) also
    median_ms, min_ms and reps; extra fields that are not None."""
    rec = {"name": name, "workload": workload, "backend": backend, "shape": shape, "batch": batch}
    if times:
        rec["median_ms"] = statistics.median(times) * 1e3
        rec["min_ms"] = min(times) * 1e3
        rec["reps"] = len(times)
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


def machine_info(threads: int) -> dict:
    """CPU, cores, library versions and the thread settings of this process."""
    import numpy as np

    from kernels import threads as kthreads

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "threads": threads,
        "numpy": np.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "blas_threads": kthreads.blas_threads(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        info["blas"] = f"{blas.get('name')} {blas.get('version')}"
        if blas.get("openblas configuration"):
            info["blas_config"] = blas["openblas configuration"]
    except Exception as exc:  # older numpy: no dict mode
        info["blas"] = f"unknown ({type(exc).__name__})"
    import numba

    info["numba"] = numba.__version__
    info["numba_threads"] = numba.get_num_threads()
    return info

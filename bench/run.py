#!/usr/bin/env python
"""Benchmarks of the GloRo engine: kernels, training steps, certification, scaling, memory.

    python bench/run.py                 # default: representative shapes, every workload
    python bench/run.py --quick         # fewer shapes and repeats
    python bench/run.py --full          # every layer shape, every scaling point
    python bench/run.py --only step --json out.json --backend numba

Workloads (record names in brackets; ``--only`` is a regex/substring on them):
  1. kernels [kernel/<op>/<arch>.<layer>]: each op x each available backend at the paper's
     layer shapes, batch 256; GFLOP/s, % of a same-run sgemm of the op's GEMM size,
     speedup over the numpy backend, our time / PyTorch's. ``reference`` runs on a small
     batch (``--ref-batch``, default 8) and its time is scaled linearly to 256.
  2. GloRo training step [step/gloro/<arch>]: forward, power iterations, ⊥, loss, backward,
     Adam; 2C2F and 4C3F on 1x28x28 (10 iterations), 6C2F on 3x32x32 (5 iterations); with
     the share of the FLOP floor (shapes.step_flops at the run's sgemm rate).
  3. standard step [step/standard/<arch>] and the GloRo overhead ratio (gloro / standard).
  4. inference [infer/plain|certify|freezeK/<arch>] at batch 1024 with a frozen K (2C2F;
     every model with ``--full``, where K is frozen at the paper's tolerance 1e-5).
  5. scaling [scale/batch/2C2F/bN, scale/iters/2C2F/pK].
  5b. BLAS threads [threads/blasN/2C2F]: our GloRo step with BLAS at the run's count vs 1.
  5c. data parallel [scale/mpi/4C3F/K1, K2]: 4C3F GloRo steps/s at 1 and 2 MPI ranks
     (bench/scale_mpi.py under mpiexec, one thread per rank) and the all-reduce's bytes per
     step; skipped with a note without the mpi extra.
  6. peak memory [mem/<arch>] (bench/memory.py).

Where things live: shapes.py (models, layer shapes, FLOP counts), workloads.py (workloads
1-5b), memory.py (6), timing.py (warm-up, interleaving, repeats), torch_worker.py
(PyTorch's worker processes), report.py (the table), records.py (the run's records).

Timing: every callable is warmed up first (Numba compilation happens there and is reported
as "compile s", never in a median); then ours and PyTorch's run in alternating rounds
(ours, theirs, theirs, ours, ...) and medians/minima of those interleaved runs are
reported; repeats adapt to a time budget per record. Ratios are of medians.

PyTorch never runs in this process: it runs in two worker processes of its own (see
torch_worker.py), one under glibc's malloc defaults, one with raised mmap/trim thresholds
(without them its large tensors come from fresh mmap'ed pages, page faults every step);
both get this run's thread count and the environment the bench started with, nothing
from the engine. ``/torch`` is our median over the faster of the two ("PyTorch at its
best"); both medians are shown. Without torch the PyTorch columns are skipped with a note.

This process sets its thread counts through the libraries (kernels.threads for BLAS,
numba.set_num_threads), not through environment variables.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback

import memory
import report
import shapes
import timing
import workloads
from records import Bench, machine_info
from torch_worker import SETTINGS, TorchPeer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few shapes, few repeats (seconds)")
    p.add_argument("--full", action="store_true", help="every layer shape and scaling point")
    p.add_argument("--only", metavar="PATTERN", help="regex (or substring) on record names, e.g. 'step|mem'")
    p.add_argument("--backend", metavar="NAME", action="append",
                   help="restrict our kernel backends (repeat or comma-separate); for model "
                        "workloads sets GLORO_BACKEND when one backend is given")
    p.add_argument("--json", metavar="PATH", help="write every record (and the machine info) as JSON")
    p.add_argument("--threads", type=int, default=None, help="threads for BLAS, Numba and torch "
                                                                "(default: all cores)")
    p.add_argument("--blas-threads", type=int, default=None,
                   help="BLAS threads if not --threads (1 avoids BLAS threads spinning "
                        "against Numba's and other processes' threads)")
    p.add_argument("--activation", default="relu", choices=["relu", "minmax"])
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side-by-side")
    p.add_argument("--step-budget", type=float, default=None, metavar="S",
                   help="seconds of timed calls per model record (repeats adapt to it)")
    p.add_argument("--batch", type=int, default=256,
                   help="batch of the kernel and training-step workloads (the paper's: 256)")
    p.add_argument("--ref-batch", type=int, default=8,
                   help="batch at which the slow reference backend is timed (scaled linearly)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    a = p.parse_args(argv)
    if a.quick and a.full:
        p.error("--quick and --full exclude each other")
    if a.backend:
        a.backend = [s.strip() for v in a.backend for s in v.split(",") if s.strip()]
    if a.threads is None:
        a.threads = os.cpu_count() or 1
    for flag in ("threads", "batch", "ref_batch"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    # repeat counts and time budgets per mode
    a.mode = "quick" if a.quick else ("full" if a.full else "default")
    a.min_reps = {"quick": 2, "default": 3, "full": 5}[a.mode]
    # PyTorch's step times vary by up to 30% from round to round here: the default mode takes
    # enough interleaved rounds for a stable median (5 gave ratios 0.57-0.73 for one model)
    a.min_step_reps = {"quick": 1, "default": 3, "full": 5}[a.mode]
    a.step_reps = {"quick": 2, "default": 9, "full": 15}[a.mode]
    if a.step_budget is None:
        a.step_budget = {"quick": 1.0, "default": 8.0, "full": 30.0}[a.mode]
    a.warmup = 1
    a.kernel_budget = {"quick": 0.1, "default": 0.5, "full": 1.5}[a.mode]
    a.infer_batch = 1024
    # inference rounds: as many as fit the step budget, within these bounds (a 2C2F certify
    # vs plain ratio from 7 rounds moved between 1.02 and 1.06 from run to run)
    a.min_infer_reps = {"quick": 2, "default": 7, "full": 9}[a.mode]
    a.infer_reps = {"quick": 2, "default": 31, "full": 41}[a.mode]
    # K's value does not change the time of a certified forward pass; the paper's tolerance
    # (1e-5) makes our float64 power method slow, so only --full pays for it
    a.freeze_tol = 1e-5 if a.full else 1e-3
    a.freeze_max_iter = None if a.full else 200
    return a


def _set_threads(b) -> None:
    """BLAS and Numba thread counts of this process, through the libraries' own calls."""
    import numba

    from kernels import threads as kthreads

    a = b.args
    kthreads.set_blas_threads(a.blas_threads or a.threads)
    most = numba.config.NUMBA_NUM_THREADS
    if a.threads > most:
        b.note(f"Numba runs {most} threads (NUMBA_NUM_THREADS), fewer than --threads {a.threads}")
    numba.set_num_threads(min(a.threads, most))


def _start_torch(b) -> None:
    if b.args.no_torch:
        b.note("PyTorch column skipped (--no-torch)")
        return
    if importlib.util.find_spec("torch") is None:
        b.note("PyTorch column skipped: torch is not installed")
        return
    try:
        b.torch = TorchPeer(b.args.threads, b.base_env)
        b.meta["torch"] = f"{b.torch.version} ({b.torch.threads} threads)"
        b.meta["torch_tuned"] = SETTINGS["tuned"]
    except Exception as exc:
        b.note(f"PyTorch column skipped: its worker did not start ({type(exc).__name__}: {exc})")


def main(argv=None) -> int:
    a = parse_args(argv)
    base_env = dict(os.environ)  # what PyTorch's workers and the memory children start from
    shapes.set_batch(a.batch)
    if a.backend and len(a.backend) == 1:
        os.environ["GLORO_BACKEND"] = a.backend[0]  # the engine's own selection, read at each call

    b = Bench(a)
    b.base_env = base_env
    _set_threads(b)
    b.meta = machine_info(a.threads)
    b.meta.update(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), mode=a.mode,
                  activation=a.activation)
    t_start = time.perf_counter()
    from kernels import registry

    b.meta["backends"] = registry.backends()
    _start_torch(b)
    try:
        _run_workloads(b, t_start)
    finally:
        if b.torch is not None:
            b.torch.close()
    b.meta["wall_s"] = time.perf_counter() - t_start
    b.meta["torch_imported_here"] = "torch" in sys.modules  # PyTorch belongs in its workers only
    _print(b)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"meta": b.meta, "notes": b.notes, "records": b.records}, fh, indent=1,
                      default=_json_default)
    return 0


def _run_workloads(b, t_start) -> None:
    a = b.args
    size = 512 if a.quick else 1024  # the headline sgemm: the rate of the FLOP floor
    g = timing.sgemm_gflops(b, size, size, size, budget_s=0.3)
    b.meta.update(sgemm_size=f"{size}x{size}x{size}", sgemm_gflops=g, sgemm_ms=2 * size**3 / g / 1e6,
                  sgemm_best_gflops=b.sgemm_best[(size, size, size)])
    b.meta["loadavg_start"] = os.getloadavg()[0]
    for title, fn in (("kernels", workloads.bench_kernels), ("training steps", workloads.bench_steps),
                      ("inference", workloads.bench_inference), ("scaling", workloads.bench_scaling),
                      ("BLAS threads", workloads.bench_blas_threads),
                      ("data parallel", workloads.bench_mpi_scaling), ("memory", memory.bench_memory)):
        b.log(f"[{time.perf_counter() - t_start:6.1f}s] {title}")
        try:
            fn(b)
        except Exception as exc:  # one broken workload must not hide the others
            b.note(f"{title}: aborted by {type(exc).__name__}: {exc}")
            if a.verbose:
                traceback.print_exc()
    b.meta["loadavg_end"] = os.getloadavg()[0]
    busy = max(b.meta["loadavg_start"], b.meta["loadavg_end"])
    if busy > (os.cpu_count() or 1) + 0.5:
        b.note(f"the machine was busy (1-min load average up to {busy:.1f} on "
               f"{os.cpu_count()} cores, this run included): timings are noisy")
    import numba

    try:
        b.meta["numba_threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel region ran
        pass
    b.meta["sgemm_sizes"] = {f"{m}x{k}x{n}": v for (m, k, n), v in b.sgemm_cache.items()}
    fastest = report.fastest_cpu_backends(b)
    if fastest:
        b.meta["fastest_cpu_backend_by_op"] = fastest


def _print(b) -> None:
    print(report.header(b))
    print()
    print(report.render_table(b))
    fastest = b.meta.get("fastest_cpu_backend_by_op")
    if fastest:
        print("\nfastest CPU backend per op in this run (sum of medians over the shapes timed; "
              "kernels/registry.py DEFAULT_CPU_BY_OP):")
        print("  " + ", ".join(f"{op}: {be}" for op, be in fastest.items()))
    if b.notes:
        print("\nnotes:")
        for n in b.notes:
            print(f"  - {n}")
    print(f"\n({len(b.records)} records, {b.meta['wall_s']:.1f} s)")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())

"""How the bench times: warm-up outside the medians, interleaved rounds, adaptive repeats.

A callable is either local (timed here with perf_counter) or remote (torch_worker's
RemoteFn: it runs in another process, which times it there and reports the seconds;
``timed()`` returns them). While one side runs, the other waits on a pipe, asleep.
"""
from __future__ import annotations

import gc
import statistics
import time
import traceback

import numpy as np


def call_time(fn) -> float:
    """Seconds one call of ``fn`` takes (measured where it runs)."""
    timed = getattr(fn, "timed", None)
    if timed is not None:
        return timed()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def warm(fn, calls: int = 1) -> tuple[float, float]:
    """Call ``fn`` ``calls`` (>= 1) times outside any median; return (first call s, last call s)."""
    first = last = call_time(fn)
    for _ in range(calls - 1):
        last = call_time(fn)
    return first, last


def interleaved(fns: dict, reps: int) -> dict:
    """Time the already-warm callables in rounds, forwards then backwards (A B C, C B A,
    A B C, ...: ours, theirs, theirs, ours, ...), so that each sees the others' after-effects
    from both sides: name -> list of seconds."""
    out = {k: [] for k in fns}
    keys = list(fns)
    gc.collect()
    for r in range(reps):
        for k in keys if r % 2 == 0 else keys[::-1]:
            out[k].append(call_time(fns[k]))
    return out


def reps_for(est_s: float, budget_s: float, lo: int, hi: int) -> int:
    """Repeats that fit ``budget_s`` given a per-call estimate, clamped to [lo, hi]."""
    if est_s <= 0:
        return hi
    return int(max(lo, min(hi, budget_s / est_s)))


def time_pair(b, name, fns: dict, reps: int | None = None, rep_range=None):
    """Warm up every callable, then interleave them.

    ``reps`` None: as many rounds as fit the mode's per-record budget (``--step-budget``),
    at least ``min_step_reps`` and at most ``step_reps`` (or ``rep_range`` = (lo, hi)).
    Returns (times, first-call s, compile s) per callable, where compile s = first call
    minus the median of the timed calls: Numba compilation / cache loading and other
    one-off work. A callable that fails is dropped with a note.
    """
    first, last, ok = {}, {}, {}
    for k, fn in fns.items():
        try:
            first[k], last[k] = warm(fn, b.args.warmup)
            ok[k] = fn
        except Exception as exc:
            b.note(f"{name} [{k}] failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            if b.args.verbose:
                traceback.print_exc()
    if not ok:
        return {}, first, {}
    if reps is None:
        lo, hi = rep_range or (b.args.min_step_reps, b.args.step_reps)
        reps = reps_for(sum(last.values()), b.args.step_budget, lo, hi)
    times = interleaved(ok, reps)
    compile_s = {k: max(first[k] - statistics.median(v), 0.0) for k, v in times.items()}
    return times, first, compile_s


def time_group(b, label, groups: dict, reps: int | None = None, rep_range=None) -> dict:
    """Interleave every callable of every record together, so that ratios between records
    (gloro / standard, certify / plain, one batch size / another) come from interleaved runs
    too. groups: record name -> {side: callable}; returns record name -> (times,
    first-call s, compile s), each a dict by side."""
    flat = {f"{name}|{side}": fn for name, d in groups.items() for side, fn in d.items()}
    if not flat:
        return {}
    times, first, comp = time_pair(b, label, flat, reps, rep_range)
    out = {}
    for key, ts in times.items():
        name, side = key.rsplit("|", 1)
        t, f, c = out.setdefault(name, ({}, {}, {}))
        t[side], f[side], c[side] = ts, first[key], comp[key]
    return out


def sgemm_gflops(b, m: int, k: int, n: int, budget_s: float = 0.15) -> float:
    """GFLOP/s of np.matmul float32 (m, k) @ (k, n), measured once per size in this run
    (BLAS at the run's thread count)."""
    key = (m, k, n)
    if key not in b.sgemm_cache:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((m, k), dtype=np.float32)
        c = rng.standard_normal((k, n), dtype=np.float32)
        fn = lambda: np.matmul(a, c)  # noqa: E731
        _, est = warm(fn, 2)
        times = interleaved({"s": fn}, reps_for(est, budget_s, 3, 50))["s"]
        b.sgemm_cache[key] = 2.0 * m * k * n / statistics.median(times) / 1e9
        b.sgemm_best[key] = 2.0 * m * k * n / min(times) / 1e9
    return b.sgemm_cache[key]

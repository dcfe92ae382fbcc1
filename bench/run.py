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
     Adam; 2C2F and 4C3F on 1x28x28 (10 iterations), 6C2F on 3x32x32 (5 iterations).
  3. standard step [step/standard/<arch>] and the GloRo overhead ratio (gloro / standard).
  4. inference [infer/plain|certify|freezeK/<arch>] at batch 1024 with a frozen K (2C2F;
     every model with ``--full``, where K is frozen at the paper's tolerance 1e-5).
  5. scaling [scale/batch/2C2F/bN, scale/iters/2C2F/pK].
  5b. OpenBLAS threads [threads/blasN/2C2F]: our GloRo step with BLAS at the run's count vs 1.
  6. peak memory [mem/<arch>]: tracemalloc peak during one GloRo step / batch (NumPy's
     allocations are traced). PyTorch's CPU allocator is not traced by tracemalloc, so for
     the side by side (2C2F; every model with ``--full``) both frameworks also run one step
     in a fresh subprocess that reports its peak resident-set growth: the peak is reset
     through /proc/self/clear_refs, then VmHWM after the step minus VmRSS before it
     (fallback: ru_maxrss growth).

Timing: every callable is warmed up first (Numba compilation happens there and is reported
as "compile s", never in a median); then ours and PyTorch run alternately (A B, B A, ...)
and medians/minima of those interleaved runs are reported; repeats adapt to a time budget
per record. Ratios are of medians. BLAS, Numba and torch get the same thread count
(``--threads``, default all cores) and OMP_WAIT_POLICY=PASSIVE unless set (spinning
OpenMP threads starve the other libraries' threads on a small shared machine).
PyTorch's step times depend on glibc's malloc state: its large tensors come from fresh
mmap'ed pages (page faults every step) unless the process raised glibc's mmap/trim
thresholds, e.g. GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824
(measured alone: 6C2F 567-668 ms default, 398-404 ms tuned; ours recycles its buffers and
does not move). The header prints the setting; compare runs with the same one.
PyTorch (bench/torch_ref.py) is imported here only, never by the engine; without it the
torch column is skipped with a note.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

np = None  # imported in main(), after the thread settings are in the environment

NUM_CLASSES = 10
BATCH = 256
# (input shape, power iterations, eps) per architecture, as in the paper
MODELS = {
    "2C2F": ((1, 28, 28), 10, 0.3),
    "4C3F": ((1, 28, 28), 10, 1.58),
    "6C2F": ((3, 32, 32), 5, 36 / 255),
}
# The paper's layers (App. B); gloro_core.architectures is used instead when present.
_PAPER = {
    "2C2F": [("c", 16, 4, 2), ("c", 32, 4, 2), ("d", 100)],
    "4C3F": [("c", 32, 3, 1), ("c", 32, 4, 2), ("c", 64, 3, 1), ("c", 64, 4, 2), ("d", 512), ("d", 512)],
    "6C2F": [("c", 32, 3, 1), ("c", 32, 3, 1), ("c", 32, 4, 2), ("c", 64, 3, 1), ("c", 64, 3, 1),
             ("c", 64, 4, 2), ("d", 512)],
}
# representative layers for the default run (the rest with --full)
DEFAULT_LAYERS = ["2C2F.c1", "4C3F.c3", "6C2F.c4", "2C2F.d1", "4C3F.d1"]
QUICK_LAYERS = ["2C2F.c2", "4C3F.c3", "2C2F.d1", "2C2F.d2"]
DEFAULT_MINMAX = ["6C2F.c2", "4C3F.d1"]
QUICK_MINMAX = ["2C2F.c2"]


# ============================================================== records and filtering
class Bench:
    """Holds the options, the records and the notes of one run."""

    def __init__(self, args):
        self.args = args
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.meta: dict = {}
        self.torch = None  # the torch_ref module when torch imports
        self.warm_steps: dict = {}  # arch -> our warm GloRo step at batch BATCH
        self.sgemm_cache: dict = {}  # (m, k, n) -> median GFLOP/s
        self.sgemm_best: dict = {}  # (m, k, n) -> best-run GFLOP/s
        if args.only:
            try:
                self._only = re.compile(args.only)
            except re.error:
                self._only = re.compile(re.escape(args.only))
        else:
            self._only = None

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


def _record(name, workload, backend, shape, batch, times=None, **extra):
    rec = {"name": name, "workload": workload, "backend": backend, "shape": shape, "batch": batch}
    if times:
        rec["median_ms"] = statistics.median(times) * 1e3
        rec["min_ms"] = min(times) * 1e3
        rec["reps"] = len(times)
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


# ============================================================== timing
def _call_time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def warm(fn, calls: int = 1) -> tuple[float, float]:
    """Call ``fn`` ``calls`` (>= 1) times outside any median; return (first call s, last call s)."""
    first = last = _call_time(fn)
    for _ in range(calls - 1):
        last = _call_time(fn)
    return first, last


def interleaved(fns: dict, reps: int) -> dict:
    """Time the already-warm callables in turn, A B C, B C A, C A B, ... (the order rotates
    so that none always runs right after the same neighbour): name -> list of seconds."""
    out = {k: [] for k in fns}
    keys = list(fns)
    gc.collect()
    for r in range(reps):
        i = r % len(keys)
        for k in keys[i:] + keys[:i]:
            out[k].append(_call_time(fns[k]))
    return out


def reps_for(est_s: float, budget_s: float, lo: int, hi: int) -> int:
    """Repeats that fit ``budget_s`` given a per-call estimate, clamped to [lo, hi]."""
    if est_s <= 0:
        return hi
    return int(max(lo, min(hi, budget_s / est_s)))


# ============================================================== machine info
def machine_info(threads: int) -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "threads": threads,
        "numpy": np.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "blas_threads": int(os.environ.get("OPENBLAS_NUM_THREADS", threads)),
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
        conf = blas.get("openblas configuration")
        if conf:
            info["blas_config"] = conf
    except Exception as exc:  # older numpy: no dict mode
        info["blas"] = f"unknown ({type(exc).__name__})"
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
    except Exception:
        pass
    return info


def sgemm_gflops(b: Bench, m: int, k: int, n: int, budget_s: float = 0.15) -> float:
    """GFLOP/s of np.matmul float32 (m, k) @ (k, n), measured once per size in this run."""
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


# ============================================================== layer shapes
def arch_specs(name: str) -> list[dict]:
    """Layer-spec list of a paper architecture (from gloro_core when it is there)."""
    try:
        from gloro_core.architectures import layer_specs

        return layer_specs(name, NUM_CLASSES)
    except ImportError:
        out = []
        for t in _PAPER[name]:
            if t[0] == "c":
                out.append({"type": "conv", "filters": t[1], "kernel": t[2], "stride": t[3], "padding": "same"})
            else:
                out.append({"type": "dense", "units": t[1]})
        out.append({"type": "dense", "units": NUM_CLASSES})
        return out


def _same_pad(n, k, s):
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def layer_table(arch: str) -> list[dict]:
    """Per layer: label (e.g. '6C2F.c2'), kind, input shape (no batch), output shape, params."""
    shape = MODELS[arch][0]
    rows, nc, nd = [], 0, 0
    for spec in arch_specs(arch):
        if spec["type"] == "conv":
            nc += 1
            c, h, w = shape
            o, k, s = int(spec["filters"]), int(spec["kernel"]), int(spec.get("stride", 1))
            pt, pb = _same_pad(h, k, s)
            pl, pr = _same_pad(w, k, s)
            oh, ow = (h + pt + pb - k) // s + 1, (w + pl + pr - k) // s + 1
            out = (o, oh, ow)
            rows.append(dict(label=f"{arch}.c{nc}", kind="conv", in_shape=shape, out_shape=out,
                             k=k, s=s, pads=(pt, pb, pl, pr)))
        else:
            nd += 1
            i = int(math.prod(shape))
            out = (int(spec["units"]),)
            rows.append(dict(label=f"{arch}.d{nd}", kind="dense", in_shape=(i,), out_shape=out))
        shape = out
    return rows


def all_layers() -> dict:
    return {r["label"]: r for a in MODELS for r in layer_table(a)}


# ============================================================== workload 1: kernels
def _kernel_cases(layer: dict, n: int, rng, minmax_only=False):
    """(op, shape text, flops, gemm (m,k,n) or None, bytes moved, make(xp) -> callable) per op."""
    from kernels import api

    cases = []
    if minmax_only:
        shp = (n,) + tuple(layer["out_shape"])
        x = rng.standard_normal(shp, dtype=np.float32)
        gy = rng.standard_normal(shp, dtype=np.float32)
        nbytes = x.nbytes
        txt = "x".join(map(str, shp))
        cases.append(("minmax", txt, None, None, 2 * nbytes,
                      lambda be, xp: (lambda a=xp(x): api.minmax(a, backend=be))))
        cases.append(("minmax_grad", txt, None, None, 3 * nbytes,
                      lambda be, xp: (lambda a=xp(x), g=xp(gy): api.minmax_grad(a, g, backend=be))))
        return cases
    if layer["kind"] == "conv":
        c, h, w = layer["in_shape"]
        o, oh, ow = layer["out_shape"]
        k, s = layer["k"], layer["s"]
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        wt = (rng.standard_normal((o, c, k, k), dtype=np.float32) / math.sqrt(c * k * k)).astype(np.float32)
        bias = rng.standard_normal(o, dtype=np.float32)
        gy = rng.standard_normal((n, o, oh, ow), dtype=np.float32)
        p = n * oh * ow
        flops = 2.0 * p * o * c * k * k
        txt = f"{n}x{c}x{h}x{w} k{k}s{s}->{o}x{oh}x{ow}"
        cases.append(("conv2d", txt, flops, (p, c * k * k, o), None,
                      lambda be, xp: (lambda a=xp(x), ww=xp(wt), bb=xp(bias):
                                      api.conv2d(a, ww, bb, s, "same", backend=be))))
        cases.append(("conv2d_grad_input", txt, flops, (p, o, c * k * k), None,
                      lambda be, xp: (lambda g=xp(gy), ww=xp(wt):
                                      api.conv2d_grad_input(g, ww, (n, c, h, w), s, "same", backend=be))))
        cases.append(("conv2d_grad_weight", txt, flops, (o, p, c * k * k), None,
                      lambda be, xp: (lambda a=xp(x), g=xp(gy):
                                      api.conv2d_grad_weight(a, g, (k, k), s, "same", backend=be))))
    else:
        (i,), (o,) = layer["in_shape"], layer["out_shape"]
        x = rng.standard_normal((n, i), dtype=np.float32)
        wt = (rng.standard_normal((o, i), dtype=np.float32) / math.sqrt(i)).astype(np.float32)
        bias = rng.standard_normal(o, dtype=np.float32)
        gy = rng.standard_normal((n, o), dtype=np.float32)
        flops = 2.0 * n * i * o
        txt = f"{n}x{i}->{o}"
        cases.append(("dense", txt, flops, (n, i, o), None,
                      lambda be, xp: (lambda a=xp(x), ww=xp(wt), bb=xp(bias): api.dense(a, ww, bb, backend=be))))
        cases.append(("dense_grad_input", txt, flops, (n, o, i), None,
                      lambda be, xp: (lambda g=xp(gy), ww=xp(wt): api.dense_grad_input(g, ww, backend=be))))
        cases.append(("dense_grad_weight", txt, flops, (o, n, i), None,
                      lambda be, xp: (lambda a=xp(x), g=xp(gy): api.dense_grad_weight(a, g, backend=be))))
    return cases


def _torch_kernel(tr, op, layer, n, rng, minmax_only):
    """The same op in PyTorch (SAME padding via F.pad), as a callable."""
    import torch
    import torch.nn.functional as F

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    if minmax_only:
        shp = (n,) + tuple(layer["out_shape"])
        x, gy = t(rng.standard_normal(shp, dtype=np.float32)), t(rng.standard_normal(shp, dtype=np.float32))
        return (lambda: tr.minmax(x)) if op == "minmax" else (lambda: tr.minmax_grad(x, gy))
    if layer["kind"] == "conv":
        c, h, w = layer["in_shape"]
        o, oh, ow = layer["out_shape"]
        k, s, pads = layer["k"], layer["s"], layer["pads"]
        x = t(rng.standard_normal((n, c, h, w), dtype=np.float32))
        wt = t(rng.standard_normal((o, c, k, k), dtype=np.float32))
        bias = t(rng.standard_normal(o, dtype=np.float32))
        gy = t(rng.standard_normal((n, o, oh, ow), dtype=np.float32))
        return {
            "conv2d": lambda: tr.conv2d_same(x, wt, bias, s, pads),
            "conv2d_grad_input": lambda: tr.conv2d_grad_input(gy, wt, (n, c, h, w), s, pads),
            "conv2d_grad_weight": lambda: tr.conv2d_grad_weight(x, gy, (o, c, k, k), s, pads),
        }[op]
    (i,), (o,) = layer["in_shape"], layer["out_shape"]
    x = t(rng.standard_normal((n, i), dtype=np.float32))
    wt = t(rng.standard_normal((o, i), dtype=np.float32))
    bias = t(rng.standard_normal(o, dtype=np.float32))
    gy = t(rng.standard_normal((n, o), dtype=np.float32))
    return {
        "dense": lambda: F.linear(x, wt, bias),
        "dense_grad_input": lambda: gy @ wt,
        "dense_grad_weight": lambda: gy.t() @ x,
    }[op]


def _xp_for(backend):
    """(array converter, synchronising wrapper) for a backend's device."""
    from kernels import registry

    if registry.device_of(backend) == "gpu":
        import cupy

        def sync(fn):
            def run():
                fn()
                cupy.cuda.Stream.null.synchronize()

            return run

        return cupy.asarray, sync
    return (lambda a: a), (lambda fn: fn)


def bench_kernels(b: Bench) -> None:
    try:
        from kernels import registry
    except Exception as exc:
        b.note(f"kernels: skipped, the kernels package does not import ({type(exc).__name__}: {exc})")
        return
    avail = registry.availability()
    ours = [k for k, why in avail.items() if why is None]
    for k, why in avail.items():
        if why is not None:
            b.note(f"backend {k} unavailable: {why.splitlines()[0][:120]}")
    if b.args.backend:
        keep = set(b.args.backend)
        ours = [k for k in ours if k in keep]
        if not ours:
            b.note(f"kernels: none of --backend {sorted(keep)} is available")
            return
    a = b.args
    layers = all_layers()
    if a.full or a.only:  # --only selects from every shape
        conv_dense = list(layers)
        mm = [lab for lab in layers if not _is_last(lab)]  # activations follow all but the last
    elif a.quick:
        conv_dense, mm = QUICK_LAYERS, QUICK_MINMAX
    else:
        conv_dense, mm = DEFAULT_LAYERS, DEFAULT_MINMAX
    jobs = [(lab, False) for lab in conv_dense] + [(lab, True) for lab in mm]

    def ops_of(lab, mmo):
        if mmo:
            return ("minmax", "minmax_grad")
        if layers[lab]["kind"] == "conv":
            return ("conv2d", "conv2d_grad_input", "conv2d_grad_weight")
        return ("dense", "dense_grad_input", "dense_grad_weight")

    if not any(b.wanted(f"kernel/{op}/{lab}") for lab, mmo in jobs for op in ops_of(lab, mmo)):
        return

    # warm-up / compile: each backend x op once on tiny inputs (Numba compiles here)
    rng = np.random.default_rng(1)
    tiny = dict(label="tiny", kind="conv", in_shape=(2, 6, 6), out_shape=(4, 3, 3), k=3, s=2, pads=(0, 1, 0, 1))
    tiny_d = dict(label="tiny", kind="dense", in_shape=(6,), out_shape=(4,))
    for be in ours:
        xp, sync = _xp_for(be)
        t0 = time.perf_counter()
        per_op = {}
        try:
            for lay, mmo in ((tiny, False), (tiny_d, False), (tiny, True)):
                for op, *_, make in _kernel_cases(lay, 2, rng, mmo):
                    try:
                        per_op[op] = _call_time(sync(make(be, xp)))
                    except NotImplementedError:
                        per_op[op] = None
        except Exception as exc:
            b.note(f"kernel warm-up on {be} failed: {type(exc).__name__}: {exc}")
        total = time.perf_counter() - t0
        b.add(_record(f"kernel/compile/{be}", "compile", be, "tiny inputs, every op", 2,
                      compile_s=total, per_op_first_call_s=per_op,
                      note="first calls: Numba compile or cache load" if be.startswith("numba") else "first calls"))

    tr = b.torch
    ref_n = a.ref_batch
    for lab, mmo in jobs:
        layer = layers[lab]
        for op, txt, flops, gemm, nbytes, make in _kernel_cases(layer, BATCH, np.random.default_rng(2), mmo):
            name = f"kernel/{op}/{lab}"
            if not b.wanted(name):
                continue
            b.log(f"  {name}")
            fns, first = {}, {}
            for be in ours:
                if be == "reference":
                    continue
                xp, sync = _xp_for(be)
                try:
                    fns[be] = sync(make(be, xp))
                except NotImplementedError as exc:
                    b.note(f"{be}: {exc}")
            if tr is not None:
                fns["torch"] = _torch_kernel(tr, op, layer, BATCH, np.random.default_rng(2), mmo)
            ests = {}
            for k in list(fns):
                try:
                    first[k], ests[k] = warm(fns[k], 1)
                except NotImplementedError as exc:
                    b.note(f"{k}: {exc}")
                    del fns[k]
                except Exception as exc:
                    b.note(f"{name} on {k} failed: {type(exc).__name__}: {exc}")
                    del fns[k]
            if not fns:
                continue
            est = sum(ests.values())
            reps = reps_for(est, a.kernel_budget, a.min_reps if est < 1.0 else 2, 30)
            times = interleaved(fns, reps)
            med = {k: statistics.median(v) for k, v in times.items()}
            sg = sgemm_gflops(b, *gemm) if gemm else None
            for k, ts in times.items():
                gf = flops / med[k] / 1e9 if flops else None
                rec = _record(name, "kernels", k, txt, BATCH, ts, gflops=gf,
                              gbps=(nbytes / med[k] / 1e9 if nbytes else None),
                              sgemm_gflops=sg, frac_sgemm=(gf / sg if gf and sg else None),
                              first_call_ms=first[k] * 1e3)
                if "numpy" in med and k != "numpy":
                    rec["speedup_vs_numpy"] = med["numpy"] / med[k]
                if "torch" in med and k != "torch":
                    rec["ours_over_torch"] = med[k] / med["torch"]
                b.add(rec)
            if "reference" in ours:
                _bench_reference(b, name, layer, op, ref_n, mmo, flops, med)


def _is_last(label):
    arch = label.split(".")[0]
    return label == layer_table(arch)[-1]["label"]


def _bench_reference(b, name, layer, op, n, mmo, flops, med):
    """The oracle is too slow for the full batch: time it at batch ``n`` and scale the time
    linearly to BATCH (its per-call overhead is scaled too, so this errs on the slow side)."""
    n = min(n, BATCH)
    case = [c for c in _kernel_cases(layer, n, np.random.default_rng(3), mmo) if c[0] == op][0]
    fn = case[-1]("reference", lambda x: x)
    try:
        t = _call_time(fn)
        ts = [_call_time(fn) for _ in range(1 if t > 0.05 else 3)]
    except Exception as exc:
        b.note(f"{name} on reference failed: {type(exc).__name__}: {exc}")
        return
    scale = BATCH / n
    scaled = [v * scale for v in ts]
    est = statistics.median(scaled)
    full = _kernel_cases(layer, BATCH, np.random.default_rng(3), mmo)
    txt = [c for c in full if c[0] == op][0][1]
    rec = _record(name, "kernels", "reference", txt, BATCH, scaled,
                  gflops=(flops / est / 1e9 if flops else None), measured_batch=n,
                  measured_ms=statistics.median(ts) * 1e3,
                  note=(f"est.: timed at N={n}, x{scale:g}" if scale != 1 else None))
    if "numpy" in med:
        rec["speedup_vs_numpy"] = med["numpy"] / est
    b.add(rec)


# ============================================================== models (ours and torch)
def _synthetic(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n,) + tuple(shape), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
    return x, y


class Ours:
    """Adapter over the engine's GloroNet + Adam; raises ImportError until they exist."""

    def __init__(self, arch, activation):
        from gloro_core.model import GloroNet  # noqa: F401  (ImportError -> skipped)
        import nn  # noqa: F401

        self.GloroNet = GloroNet
        self.arch, self.activation = arch, activation

    def build(self, seed=0):
        shape, _, eps = MODELS[self.arch]
        return self.GloroNet(shape, NUM_CLASSES, arch_specs(self.arch), activation=self.activation,
                             init="glorot", eps=eps, variant="margin", seed=seed, dtype="float32")

    @staticmethod
    def optimizer(model):
        from nn.optim import Adam

        return Adam(model.parameters(), lr=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-7)

    @staticmethod
    def step_fn(model, opt, x, y, kind, iters):
        def step():
            opt.zero_grad()
            loss = model.loss(x, y, power_iters=iters) if kind == "gloro" else model.standard_loss(x, y)
            value = float(np.asarray(loss.data))  # the training loop reads it every step too
            loss.backward()
            opt.step()
            return value

        return step


def _ours_or_note(b, arch, what):
    try:
        return Ours(arch, b.args.activation)
    except Exception as exc:
        b.note(f"{what}: ours skipped, the engine model is not importable yet "
               f"({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        return None


def _torch_model(b, arch, seed=0):
    import torch

    shape, _, eps = MODELS[arch]
    return b.torch.TorchGloroNet(shape, NUM_CLASSES, arch_specs(arch), activation=b.args.activation,
                                 eps=eps, seed=seed, dtype=torch.float32)


def _time_pair(b, name, fns: dict, reps: int | None = None, rep_range=None):
    """Warm up every callable (one call each), then interleave them (A B, B A, ...).

    ``reps`` None: as many rounds as fit the mode's per-record budget (``--step-budget``),
    at least ``min_step_reps`` and at most ``step_reps`` (or ``rep_range`` = (lo, hi)).
    Returns (times, first-call s, compile s) per callable, where compile s = first call
    minus the median of the timed calls: Numba compilation / cache loading and other
    one-off work.
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


def _step_callables(b, arch, kind, n, iters):
    """name -> one-step callable for ours and torch (whichever exist)."""
    shape = MODELS[arch][0]
    x, y = _synthetic(shape, n)
    fns = {}
    ours = _ours_or_note(b, arch, f"step/{kind}/{arch}")
    if ours is not None:
        try:
            m = ours.build()
            fns["ours"] = Ours.step_fn(m, Ours.optimizer(m), x, y, kind, iters)
        except Exception as exc:
            b.note(f"step/{kind}/{arch}: ours failed to build: {type(exc).__name__}: {exc}")
    if b.torch is not None:
        import torch

        tm = _torch_model(b, arch)
        fns["torch"] = b.torch.train_step_fn(tm, b.torch.make_optimizer(tm), torch.from_numpy(x),
                                             torch.from_numpy(y), kind, iters)
    return fns


def _add_pair(b, name, workload, shape_txt, n, times, first, compile_s, **extra):
    meds = {k: statistics.median(v) for k, v in times.items()}
    recs = {}
    for k, ts in times.items():
        rec = _record(name, workload, k, shape_txt, n, ts, compile_s=compile_s.get(k),
                      first_call_ms=first[k] * 1e3, **extra)
        if k == "ours" and "torch" in meds:
            rec["ours_over_torch"] = meds["ours"] / meds["torch"]
        recs[k] = b.add(rec)
    return recs


def _time_group(b, label, groups: dict, reps: int | None = None, rep_range=None) -> dict:
    """Interleave every callable of every record together, so that ratios between records
    (gloro / standard, certify / plain, one batch size / another) come from interleaved runs
    too. groups: record name -> {framework: callable}; returns record name -> (times,
    first-call s, compile s), each a dict by framework."""
    flat = {f"{name}|{fw}": fn for name, d in groups.items() for fw, fn in d.items()}
    if not flat:
        return {}
    times, first, comp = _time_pair(b, label, flat, reps, rep_range)
    out = {}
    for key, ts in times.items():
        name, fw = key.rsplit("|", 1)
        t, f, c = out.setdefault(name, ({}, {}, {}))
        t[fw], f[fw], c[fw] = ts, first[key], comp[key]
    return out


def bench_steps(b: Bench) -> None:
    a = b.args
    archs = ["2C2F"] if a.quick and not a.only else list(MODELS)
    for arch in archs:
        shape, iters, _ = MODELS[arch]
        shp = "x".join(map(str, shape))
        kinds = [k for k in ("gloro", "standard")
                 if b.wanted(f"step/{k}/{arch}") or b.wanted(f"overhead/{arch}")]
        if not kinds:
            continue
        b.log(f"  step/{'+'.join(kinds)}/{arch} (interleaved)")
        groups = {f"step/{k}/{arch}": _step_callables(b, arch, k, BATCH, iters) for k in kinds}
        timed = _time_group(b, f"step/{arch}", groups)
        res = {}
        for kind in kinds:
            name = f"step/{kind}/{arch}"
            if name not in timed:
                continue
            times, first, comp = timed[name]
            if kind == "gloro" and "ours" in times:
                b.warm_steps[arch] = groups[name]["ours"]  # reused by the memory workload
            txt = f"{BATCH}x{shp}" + (f" p={iters}" if kind == "gloro" else "")
            res[kind] = _add_pair(b, name, "step", txt, BATCH, times, first, comp,
                                  power_iters=(iters if kind == "gloro" else 0))
        if "gloro" in res and "standard" in res and b.wanted(f"overhead/{arch}"):
            for k in res["gloro"]:
                if k in res["standard"]:
                    r = res["gloro"][k]["median_ms"] / res["standard"][k]["median_ms"]
                    b.add(_record(f"overhead/{arch}", "overhead", k, f"{BATCH}x{shp}", BATCH,
                                  gloro_over_standard=r, note=f"gloro/standard step = {r:.2f}x"))


def bench_inference(b: Bench) -> None:
    a = b.args
    n = a.infer_batch
    # freezing K with provable bounds is slow on the larger models: those only with --full
    archs = list(MODELS) if a.full or a.only else ["2C2F"]
    for arch in archs:
        names = [f"infer/plain/{arch}", f"infer/certify/{arch}"]
        if not any(b.wanted(nm) for nm in names):
            continue
        b.log(f"  infer/{arch}")
        shape = MODELS[arch][0]
        x, _ = _synthetic(shape, n, seed=5)
        fns = {"plain": {}, "certify": {}}
        ours = _ours_or_note(b, arch, f"infer/{arch}")
        if ours is not None:
            try:
                m = ours.build()
                # freeze K before timing (one-off, not in the medians): power method to the
                # tolerance, then the provable float64 bounds that certify() uses
                tol, mx = a.freeze_tol, a.freeze_max_iter
                kw = {} if mx is None else {"max_iter": mx}
                t_freeze = _call_time(lambda: m.update_lipschitz(tol=tol, **kw))
                if b.wanted(f"infer/freezeK/{arch}"):
                    b.add(_record(f"infer/freezeK/{arch}", "inference", "ours", "once per model", 1,
                                  [t_freeze], note=f"update_lipschitz(): power method (tol {tol:g}"
                                  f"{'' if mx is None else f', <= {mx} it.'}) + provable bounds (one-off)"))
                fns["plain"]["ours"] = lambda m=m: m.logits(x)
                # predictions and radii, as a user certifying a test set runs it (the tight
                # per-coordinate rounding pass only where the decision needs it)
                fns["certify"]["ours"] = lambda m=m: m.certify(x, tight_radius=False)
            except Exception as exc:
                b.note(f"infer/{arch}: ours failed: {type(exc).__name__}: {exc}")
        if b.torch is not None:
            import torch

            tm = _torch_model(b, arch)
            t_freeze = _call_time(lambda: tm.freeze_lipschitz(100))
            if b.wanted(f"infer/freezeK/{arch}"):
                b.add(_record(f"infer/freezeK/{arch}", "inference", "torch", "once per model", 1,
                              [t_freeze], note="100 power iterations (no provable bound)"))
            tx = torch.from_numpy(x)
            fns["plain"]["torch"] = lambda: tm.predict(tx)
            fns["certify"]["torch"] = lambda: tm.certify(tx)
        groups = {f"infer/{k}/{arch}": fns[k] for k in ("plain", "certify")
                  if fns[k] and b.wanted(f"infer/{k}/{arch}")}
        timed = _time_group(b, f"infer/{arch}", groups, None, (a.min_infer_reps, a.infer_reps))
        recs = {}
        for kind in ("plain", "certify"):
            name = f"infer/{kind}/{arch}"
            if name in timed:
                recs[kind] = _add_pair(b, name, "inference", f"{n}x" + "x".join(map(str, shape)), n,
                                       *timed[name])
        if "plain" in recs and "certify" in recs:
            for k, r in recs["certify"].items():
                if k in recs["plain"]:
                    ratio = r["median_ms"] / recs["plain"][k]["median_ms"]
                    r["certify_over_plain"] = ratio
                    r["note"] = f"certify/plain = {ratio:.2f}x" + (
                        " (incl. rounding-error bound and radii)" if k == "ours" else "")


def bench_scaling(b: Bench) -> None:
    a = b.args
    arch = "2C2F"
    shape, iters0, _ = MODELS[arch]
    if a.full:
        batches, iters_list = [32, 64, 128, 256, 512, 1024], [0, 1, 2, 5, 10, 20]
    elif a.quick:
        batches, iters_list = [32, 128], [0, 5]
    else:
        batches, iters_list = [32, 256, 1024], [0, 10, 20]
    shp = "x".join(map(str, shape))
    names = [f"scale/batch/{arch}/b{n}" for n in batches if b.wanted(f"scale/batch/{arch}/b{n}")]
    if names:
        b.log(f"  scale/batch/{arch} (interleaved)")
        groups = {nm: _step_callables(b, arch, "gloro", int(nm.rsplit("b", 1)[1]), iters0) for nm in names}
        for nm, (times, first, comp) in _time_group(b, f"scale/batch/{arch}", groups).items():
            n = int(nm.rsplit("b", 1)[1])
            recs = _add_pair(b, nm, "scaling", f"{n}x{shp} p={iters0}", n, times, first, comp)
            for r in recs.values():
                r["per_instance_us"] = r["median_ms"] * 1e3 / n
                r["note"] = f"{r['per_instance_us']:.0f} us/instance"
    by_p = {}
    names = [f"scale/iters/{arch}/p{p}" for p in iters_list if b.wanted(f"scale/iters/{arch}/p{p}")]
    if names:
        b.log(f"  scale/iters/{arch} (interleaved)")
        groups = {nm: _step_callables(b, arch, "gloro", BATCH, int(nm.rsplit("p", 1)[1])) for nm in names}
        for nm, (times, first, comp) in _time_group(b, f"scale/iters/{arch}", groups).items():
            p = int(nm.rsplit("p", 1)[1])
            by_p[p] = _add_pair(b, nm, "scaling", f"{BATCH}x{shp} p={p}", BATCH, times, first,
                                comp, power_iters=p)
    # cost of one power iteration (all layers, batch-1 iterates): slope from fewest to most
    if len(by_p) >= 2:
        lo, hi = min(by_p), max(by_p)
        for k, r in by_p[hi].items():
            if k in by_p[lo]:
                per = (r["median_ms"] - by_p[lo][k]["median_ms"]) / (hi - lo)
                r["ms_per_power_iter"] = per
                r["note"] = f"{per:+.2f} ms per power iteration (p={lo}..{hi})"


# ============================================================== BLAS threads check
def _openblas_set_threads():
    """NumPy's bundled OpenBLAS thread setter via ctypes, or None (other BLAS, other build)."""
    import ctypes
    import glob

    libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(libdir, "*openblas*.so*")):
        try:
            lib = ctypes.CDLL(path)  # already loaded by NumPy: the same handle, the same pool
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                    "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                return lambda n, fn=fn: fn(ctypes.c_int(int(n)))
    return None


def bench_blas_threads(b: Bench) -> None:
    """Our 2C2F GloRo step with OpenBLAS at the run's thread count vs 1 thread, interleaved:
    BLAS threads that spin while Numba's or other processes' threads hold the cores can
    cost more than the parallel GEMMs gain."""
    a = b.args
    arch = "2C2F"
    nb = int(os.environ.get("OPENBLAS_NUM_THREADS", a.threads))
    counts = sorted({nb, 1}, reverse=True)
    names = {n: f"threads/blas{n}/{arch}" for n in counts}
    if len(counts) < 2 or not any(b.wanted(nm) for nm in names.values()):
        return
    setter = _openblas_set_threads()
    if setter is None:
        b.note("threads: NumPy's BLAS is not OpenBLAS (or its thread setter is not found): skipped")
        return
    ours = _ours_or_note(b, arch, "threads")
    if ours is None:
        return
    b.log(f"  threads/blas{counts}/{arch} (interleaved)")
    shape, iters, _ = MODELS[arch]
    x, y = _synthetic(shape, BATCH)
    groups = {}
    for n in counts:
        m = ours.build()
        step = Ours.step_fn(m, Ours.optimizer(m), x, y, "gloro", iters)

        def run(n=n, step=step):
            setter(n)
            return step()

        groups[names[n]] = {"ours": run}
    try:
        timed = _time_group(b, "threads", groups)
    finally:
        setter(nb)
    recs = {}
    for n in counts:
        if names[n] in timed:
            recs[n] = _add_pair(b, names[n], "threads", f"{BATCH}x" + "x".join(map(str, shape)) +
                                f" p={iters}", BATCH, *timed[names[n]])["ours"]
            recs[n]["blas_threads"] = n
    if len(recs) == 2:
        r = recs[1]["median_ms"] / recs[nb]["median_ms"]
        recs[1]["blas1_over_blasN"] = r
        recs[1]["note"] = f"BLAS 1 thread / {nb} threads = {r:.2f}x (below 1: fewer BLAS threads are faster)"


# ============================================================== workload 6: memory
def bench_memory(b: Bench) -> None:
    import tracemalloc

    a = b.args
    archs = ["2C2F"] if a.quick and not a.only else list(MODELS)
    for arch in archs:
        name = f"mem/{arch}"
        if not b.wanted(name):
            continue
        b.log(f"  {name}")
        shape, iters, _ = MODELS[arch]
        shp = f"{BATCH}x" + "x".join(map(str, shape))
        ours = _ours_or_note(b, arch, name)
        if ours is not None:
            try:
                step = b.warm_steps.get(arch)
                if step is None:
                    m = ours.build()
                    x, y = _synthetic(shape, BATCH)
                    step = Ours.step_fn(m, Ours.optimizer(m), x, y, "gloro", iters)
                    step()  # warm: compile, optimizer state, iterates
                # pooled output buffers from earlier steps would not be counted: start empty
                from kernels import buffers

                buffers.clear()
                gc.collect()
                tracemalloc.start()
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                step()
                peak = tracemalloc.get_traced_memory()[1] - base
                tracemalloc.stop()
                b.add(_record(name, "memory", "ours", shp, BATCH, peak_mb=peak / 2**20,
                              mb_per_instance=peak / 2**20 / BATCH, mem_method="tracemalloc",
                              note="tracemalloc peak of one GloRo step / batch"))
            except Exception as exc:
                tracemalloc.stop() if tracemalloc.is_tracing() else None
                b.note(f"{name}: ours failed: {type(exc).__name__}: {exc}")
        # the subprocess measurement (like for like, ours vs torch): 2C2F only unless --full
        frameworks = []
        if a.full or (arch == "2C2F" and not a.quick):
            if ours is not None:
                frameworks.append("ours")
            if b.torch is not None:
                frameworks.append("torch")
        for fw in frameworks:
            b.log(f"  {name} [{fw}, subprocess]")
            res = _rss_child(b, fw, arch)
            if res is None:
                continue
            delta, method = res
            what = ("peak RSS (VmHWM reset via clear_refs) minus RSS before" if method == "VmHWM-delta"
                    else "ru_maxrss growth")
            b.add(_record(name, "memory", fw, shp, BATCH, peak_mb=delta / 2**20,
                          mb_per_instance=delta / 2**20 / BATCH, mem_method=f"{method} (subprocess)",
                          note=f"{what}, one GloRo step in a fresh process / batch"))


def _rss_child(b, fw, arch):
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem-child", f"{fw}:{arch}",
           "--activation", b.args.activation, "--threads", str(b.args.threads),
           "--batch", str(BATCH)]
    if b.args.blas_threads is not None:
        cmd += ["--blas-threads", str(b.args.blas_threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        b.note(f"mem/{arch} [{fw}]: subprocess timed out")
        return None
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("RSS_DELTA "):
            _, val, method = line.split()
            return int(val), method
    b.note(f"mem/{arch} [{fw}]: subprocess failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return None


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def mem_child(spec: str, activation: str) -> None:
    """Subprocess body: a warm-up step at batch 2, then the resident-set growth of one step at 256.

    Preferred method: reset the peak RSS (``/proc/self/clear_refs`` <- 5, Linux >= 4.0) and
    report VmHWM after the step minus VmRSS before it. Fallback: ru_maxrss growth, which
    reads 0 when an earlier peak (imports) was higher.
    """
    import resource

    fw, arch = spec.split(":")
    shape, iters, _ = MODELS[arch]
    x2, y2 = _synthetic(shape, 2)
    x, y = _synthetic(shape, BATCH)
    if fw == "torch":
        import torch
        import torch_ref as tr

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        m = tr.TorchGloroNet(shape, NUM_CLASSES, arch_specs(arch), activation=activation,
                             eps=MODELS[arch][2], dtype=torch.float32)
        opt = tr.make_optimizer(m)
        tr.train_step_fn(m, opt, torch.from_numpy(x2), torch.from_numpy(y2), "gloro", iters)()
        step = tr.train_step_fn(m, opt, torch.from_numpy(x), torch.from_numpy(y), "gloro", iters)
    else:
        o = Ours(arch, activation)
        m = o.build()
        opt = Ours.optimizer(m)
        Ours.step_fn(m, opt, x2, y2, "gloro", iters)()
        step = Ours.step_fn(m, opt, x, y, "gloro", iters)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _proc_status_kib("VmRSS")
        step()
        peak = _proc_status_kib("VmHWM")
        if before is None or peak is None:
            raise OSError("no VmRSS/VmHWM")
        print(f"RSS_DELTA {(peak - before) * 1024} VmHWM-delta")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"RSS_DELTA {(after - before) * 1024} ru_maxrss-delta")  # ru_maxrss is KiB on Linux


def fastest_cpu_backends(b: Bench) -> dict:
    """op -> the CPU backend (not reference) with the smallest summed median over the
    shapes where every compared backend ran."""
    try:
        from kernels import registry
    except Exception:
        return {}
    per = {}  # op -> shape -> backend -> median
    for r in b.records:
        if r["workload"] != "kernels" or r["backend"] in ("torch", "reference"):
            continue
        if registry.BACKEND_MODULES.get(r["backend"], ("", "gpu"))[1] != "cpu":
            continue
        op = r["name"].split("/")[1]
        per.setdefault(op, {}).setdefault(r["name"], {})[r["backend"]] = r["median_ms"]
    out = {}
    for op, shapes in per.items():
        common = set.intersection(*(set(v) for v in shapes.values()))
        if len(common) >= 2:
            out[op] = min(common, key=lambda be: sum(v[be] for v in shapes.values()))
    return out


# ============================================================== table
COLS = [
    ("name", "name", "<"), ("backend", "backend", "<"), ("shape", "shape", "<"),
    ("median_ms", "med ms", ">"), ("min_ms", "min ms", ">"), ("gflops", "GFLOP/s", ">"),
    ("frac_sgemm", "%sgemm", ">"), ("speedup_vs_numpy", "x numpy", ">"),
    ("ours_over_torch", "/torch", ">"), ("compile_s", "compile s", ">"),
    ("mb_per_instance", "MB/inst", ">"), ("note", "note", "<"),
]
def sections():
    return [
        ("compile", "warm-up (first calls, excluded from medians)"),
        ("kernels", f"1. kernels, batch {BATCH}, float32"),
        ("step", f"2-3. training step, batch {BATCH} (gloro: power iterations + ⊥ + CE on m+1; standard: CE)"),
        ("overhead", "3. GloRo overhead"),
        ("inference", "4. inference (frozen K)"),
        ("scaling", "5. scaling (2C2F GloRo step)"),
        ("threads", "5b. OpenBLAS threads (our 2C2F GloRo step; rest of the run uses the header's counts)"),
        ("memory", "6. peak memory per training instance"),
    ]


def _fmt(key, v):
    if v is None or v == "":
        return ""
    if key == "frac_sgemm":
        return f"{100 * v:.0f}%"
    if key in ("speedup_vs_numpy", "ours_over_torch"):
        return f"{v:.2f}x"
    if key in ("median_ms", "min_ms"):
        return f"{v:.3f}" if v < 1 else (f"{v:.2f}" if v < 100 else f"{v:.0f}")
    if key == "gflops":
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    if key == "compile_s":
        return f"{v:.2f}"
    if key == "mb_per_instance":
        return f"{v:.3f}"
    return str(v)


def render_table(b: Bench) -> str:
    rows = []
    for wl, title in sections():
        recs = [r for r in b.records if r["workload"] == wl]
        if not recs:
            continue
        rows.append(("section", title))
        for r in recs:
            cells = []
            for key, _, _ in COLS:
                v = r.get(key)
                if key == "note" and r.get("mem_method") and "note" not in r:
                    v = r["mem_method"]
                cells.append(_fmt(key, v))
            rows.append(("row", cells))
    widths = [len(h) for _, h, _ in COLS]
    for kind, cells in rows:
        if kind == "row":
            widths = [max(w, len(c)) for w, c in zip(widths, cells)]
    line = lambda cells: "  ".join(  # noqa: E731
        (c.ljust(w) if al == "<" else c.rjust(w)) for c, w, (_, _, al) in zip(cells, widths, COLS)).rstrip()
    out = [line([h for _, h, _ in COLS]), "-" * min(sum(widths) + 2 * len(widths), 200)]
    for kind, cells in rows:
        out.append(f"-- {cells}" if kind == "section" else line(cells))
    return "\n".join(out)


def header(b: Bench) -> str:
    m = b.meta
    lines = [
        f"GloRo engine benchmark  {m['date']}  mode={m['mode']}",
        f"machine: {m.get('cpu', '?')}, {m['cores']} cores; threads={m['threads']} (Numba, torch), "
        f"{m.get('blas_threads', m['threads'])} (BLAS); "
        f"python {m['python']}, numpy {m['numpy']} ({m.get('blas', '?')})"
        + (f", numba {m['numba']}" if "numba" in m else ""),
        f"backends: {', '.join(m.get('backends', [])) or 'none'}; torch: {m.get('torch', 'not available')}",
    ]
    if "sgemm_gflops" in m:
        lines.append(f"sgemm reference: np.matmul float32 {m['sgemm_size']}: {m['sgemm_ms']:.2f} ms = "
                     f"{m['sgemm_gflops']:.1f} GFLOP/s median, {m['sgemm_best_gflops']:.1f} best  "
                     f"(%sgemm = op GFLOP/s / median sgemm GFLOP/s at the op's own GEMM size, same run)")
    if m.get("loadavg_start") is not None:
        lines.append(f"load average (1 min): {m['loadavg_start']:.2f} at start, "
                     f"{m.get('loadavg_end', float('nan')):.2f} at end; activation: {m['activation']}; "
                     f"OMP_WAIT_POLICY={m.get('omp_wait_policy')}; "
                     f"GLIBC_TUNABLES={m.get('glibc_tunables') or '(unset)'}")
    lines.append("x numpy = numpy-backend time / this time (higher is faster); /torch = this time / "
                 "PyTorch time (interleaved runs; below 1 = we are faster)")
    return "\n".join(lines)


# ============================================================== main
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
                   help="OpenBLAS threads if not --threads (1 avoids BLAS threads spinning "
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
    p.add_argument("--_mem-child", dest="mem_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick and a.full:
        p.error("--quick and --full exclude each other")
    if a.backend:
        a.backend = [s.strip() for v in a.backend for s in v.split(",") if s.strip()]
    if a.threads is None:
        a.threads = os.cpu_count() or 1
    if a.threads < 1:
        p.error("--threads must be >= 1")
    if a.batch < 1:
        p.error("--batch must be >= 1")
    if a.ref_batch < 1:
        p.error("--ref-batch must be >= 1")
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


def _set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)
    # OpenMP threads that spin after a parallel region steal the cores from the next
    # library's threads (BLAS, Numba, torch alternate here) and from other processes; on a
    # busy 2-core box that made torch's batch-1 power iterations 10-100x slower. Sleeping
    # waits cost microseconds per region. An explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> int:
    global np, BATCH
    a = parse_args(argv)
    BATCH = a.batch
    _set_threads(a.threads)
    if a.blas_threads is not None:
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.blas_threads)
    if a.backend and len(a.backend) == 1:
        os.environ["GLORO_BACKEND"] = a.backend[0]
    import numpy

    np = numpy
    if a.mem_child:
        mem_child(a.mem_child, a.activation)  # uses BATCH
        return 0

    b = Bench(a)
    b.meta = machine_info(a.threads)
    b.meta["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    b.meta["mode"] = a.mode
    b.meta["activation"] = a.activation
    t_start = time.perf_counter()
    try:
        from kernels import registry

        b.meta["backends"] = registry.backends()
    except Exception as exc:
        b.note(f"kernels do not import: {exc}")
    if not a.no_torch:
        try:
            import torch

            torch.set_num_threads(a.threads)
            import torch_ref

            b.torch = torch_ref
            b.meta["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
        except Exception as exc:
            b.note(f"PyTorch column skipped: torch does not import ({type(exc).__name__}: {exc})")
    else:
        b.note("PyTorch column skipped (--no-torch)")

    # headline sgemm
    size = 512 if a.quick else 1024
    g = sgemm_gflops(b, size, size, size, budget_s=0.3)
    b.meta.update(sgemm_size=f"{size}x{size}x{size}", sgemm_gflops=g, sgemm_ms=2 * size**3 / g / 1e6,
                  sgemm_best_gflops=b.sgemm_best[(size, size, size)])
    b.meta["loadavg_start"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    for title, fn in (("kernels", bench_kernels), ("training steps", bench_steps),
                      ("inference", bench_inference), ("scaling", bench_scaling),
                      ("BLAS threads", bench_blas_threads),
                      ("memory", bench_memory)):
        b.log(f"[{time.perf_counter() - t_start:6.1f}s] {title}")
        try:
            fn(b)
        except Exception as exc:  # one broken workload must not hide the others
            b.note(f"{title}: aborted by {type(exc).__name__}: {exc}")
            if a.verbose:
                traceback.print_exc()
    b.meta["wall_s"] = time.perf_counter() - t_start
    if hasattr(os, "getloadavg"):
        b.meta["loadavg_end"] = os.getloadavg()[0]
        busy = max(b.meta["loadavg_start"], b.meta["loadavg_end"])
        if busy > (os.cpu_count() or 1) + 0.5:
            b.note(f"the machine was busy (1-min load average up to {busy:.1f} on "
                   f"{os.cpu_count()} cores, this run included): timings are noisy")
    try:
        import numba

        b.meta["numba_threading_layer"] = numba.threading_layer()
    except Exception:
        pass
    b.meta["sgemm_sizes"] = {f"{m}x{k}x{n}": v for (m, k, n), v in b.sgemm_cache.items()}

    fastest = fastest_cpu_backends(b)
    if fastest:
        b.meta["fastest_cpu_backend_by_op"] = fastest
    print(header(b))
    print()
    print(render_table(b))
    if fastest:
        print("\nfastest CPU backend per op in this run (sum of medians over the shapes timed; "
              "kernels/registry.py DEFAULT_CPU_BY_OP):")
        print("  " + ", ".join(f"{op}: {be}" for op, be in fastest.items()))
    if b.notes:
        print()
        print("notes:")
        for n in b.notes:
            print(f"  - {n}")
    print(f"\n({len(b.records)} records, {b.meta['wall_s']:.1f} s)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"meta": b.meta, "notes": b.notes, "records": b.records}, fh, indent=1,
                      default=_json_default)
    return 0


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())

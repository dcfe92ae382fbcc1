"""Workload 6: peak memory of one GloRo training step, per instance.

Ours in this process: the tracemalloc peak of one step (NumPy's allocations are traced).
PyTorch's CPU allocator is not traced by tracemalloc, so for the side by side (2C2F; every
model with --full) each framework also runs one step in a fresh process that reports its
peak resident-set growth: the peak is reset through /proc/self/clear_refs, then VmHWM after
the step minus VmRSS before it (fallback: ru_maxrss growth). PyTorch's child runs under
both malloc settings (torch_worker.SETTINGS); its record is the smaller peak.

Child: ``python bench/memory.py ours:2C2F --threads 2 --batch 256 --activation relu``,
prints ``RSS_DELTA <bytes> <method>``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import shapes
from records import record
from shapes import MODELS, NUM_CLASSES, arch_specs, synthetic
from torch_worker import LABELS, SETTINGS, worker_env


def bench_memory(b) -> None:
    from workloads import Ours

    a = b.args
    batch = shapes.BATCH
    archs = ["2C2F"] if a.quick and not a.only else list(MODELS)
    for arch in archs:
        name = f"mem/{arch}"
        if not b.wanted(name):
            continue
        b.log(f"  {name}")
        shape, iters, _ = MODELS[arch]
        shp = f"{batch}x" + "x".join(map(str, shape))
        try:
            b.add(record(name, "memory", "ours", shp, batch, **_traced_peak(b, arch, Ours)))
        except Exception as exc:
            b.note(f"{name}: ours failed: {type(exc).__name__}: {exc}")
        # the subprocess measurement (like for like, ours vs torch): 2C2F only unless --full
        if not (a.full or (arch == "2C2F" and not a.quick)):
            continue
        runs = [("ours", None)] + ([("torch", s) for s in SETTINGS] if b.torch is not None else [])
        found = {}
        for fw, setting in runs:
            b.log(f"  {name} [{fw}{'' if setting is None else ', ' + setting}, subprocess]")
            res = _rss_child(b, fw, arch, setting)
            if res is not None:
                found[(fw, setting)] = res
        for fw in ("ours", "torch"):
            mine = {s: r for (f, s), r in found.items() if f == fw}
            if not mine:
                continue
            best = min(mine, key=lambda s: mine[s][0])
            delta, method = mine[best]
            what = ("peak RSS (VmHWM reset via clear_refs) minus RSS before" if method == "VmHWM-delta"
                    else "ru_maxrss growth")
            rec = record(name, "memory", fw, shp, batch, peak_mb=delta / 2**20,
                         mb_per_instance=delta / 2**20 / batch, mem_method=f"{method} (subprocess)",
                         note=f"{what}, one GloRo step in a fresh process / batch")
            if fw == "torch":
                rec["malloc"] = LABELS[best]
                for s, (d, _) in mine.items():
                    rec[f"torch_{s}_mb_per_instance"] = d / 2**20 / batch
                rec["note"] += f"; smaller of the malloc settings: {LABELS[best]}"
            b.add(rec)


def _traced_peak(b, arch, Ours) -> dict:
    import tracemalloc

    from kernels import buffers

    shape, iters, _ = MODELS[arch]
    step = b.warm_steps.get(arch)
    if step is None:
        m = Ours(arch, b.args.activation).build()
        x, y = synthetic(shape, shapes.BATCH)
        step = Ours.step_fn(m, Ours.optimizer(m), x, y, "gloro", iters)
        step()  # warm: compile, optimizer state, iterates
    buffers.clear()  # pooled output buffers from earlier steps would not be counted: start empty
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        step()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return dict(peak_mb=peak / 2**20, mb_per_instance=peak / 2**20 / shapes.BATCH, mem_method="tracemalloc",
                note="tracemalloc peak of one GloRo step / batch")


def _rss_child(b, fw, arch, setting):
    a = b.args
    cmd = [sys.executable, os.path.abspath(__file__), f"{fw}:{arch}", "--activation", a.activation,
           "--threads", str(a.threads), "--batch", str(shapes.BATCH)]
    if a.blas_threads is not None:
        cmd += ["--blas-threads", str(a.blas_threads)]
    if fw == "torch":  # the layer specs travel along: PyTorch's child does not import the engine
        cmd += ["--specs", json.dumps(arch_specs(arch))]
    env = worker_env(b.base_env, setting) if setting is not None else dict(b.base_env)
    if fw == "ours" and a.backend and len(a.backend) == 1:
        env["GLORO_BACKEND"] = a.backend[0]
    label = f"mem/{arch} [{fw}{'' if setting is None else ', ' + setting}]"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        b.note(f"{label}: subprocess timed out")
        return None
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("RSS_DELTA "):
            _, val, method = line.split()
            return int(val), method
    b.note(f"{label}: subprocess failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
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


def child(spec: str, activation: str, threads: int, blas_threads: int | None, specs=None) -> None:
    """A warm-up step at batch 2, then the resident-set growth of one step at the batch.

    Preferred method: reset the peak RSS (``/proc/self/clear_refs`` <- 5, Linux >= 4.0) and
    report VmHWM after the step minus VmRSS before it. Fallback: ru_maxrss growth, which
    reads 0 when an earlier peak (imports) was higher.
    """
    import resource

    fw, arch = spec.split(":")
    shape, iters, eps = MODELS[arch]
    x2, y2 = synthetic(shape, 2)
    x, y = synthetic(shape, shapes.BATCH)
    if fw == "torch":
        import torch

        import torch_ref as tr

        torch.set_num_threads(threads)
        m = tr.TorchGloroNet(shape, NUM_CLASSES, specs, activation=activation, eps=eps,
                             dtype=torch.float32)
        opt = tr.make_optimizer(m)
        tr.train_step_fn(m, opt, torch.from_numpy(x2), torch.from_numpy(y2), "gloro", iters)()
        step = tr.train_step_fn(m, opt, torch.from_numpy(x), torch.from_numpy(y), "gloro", iters)
    else:
        import numba

        from kernels import threads as kthreads
        from workloads import Ours

        kthreads.set_blas_threads(blas_threads or threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
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


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="one step's peak RSS growth (bench/run.py's memory child)")
    p.add_argument("spec", help="ours:<arch> or torch:<arch>")
    p.add_argument("--activation", default="relu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--blas-threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=shapes.BATCH)
    p.add_argument("--specs", type=json.loads, default=None, help="layer specs (JSON), for torch")
    args = p.parse_args()
    shapes.set_batch(args.batch)
    child(args.spec, args.activation, args.threads, args.blas_threads, args.specs)

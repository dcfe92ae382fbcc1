#!/usr/bin/env python
"""GPU benchmarks for the ``cupy`` and ``numba_cuda`` backends (needs a CUDA device).

    python bench/gpu_bench.py kernels [--json k.json] [--reps 20]
    python bench/gpu_bench.py train --backend cupy|numba_cuda [--json t.json] [--arch 2C2F] [--n 60000]
    python bench/gpu_bench.py report [--kernels k.json] [--train t.json ...] [--pytest-line "..."]

kernels: every conv/dense op at the paper's layer shapes (batch 256), each GPU
backend, timed with CUDA events (median of ``--reps`` after warm-up/compilation),
reported as GFLOP/s next to ``cupy.matmul`` of an (M, K) x (K, N) float32 product
with the same FLOP count measured in the same run (the vendor-GEMM ceiling), and
the fused/element-wise ops (Adam, MinMax, power steps) next to the CuPy
expressions they replace. Exit 1 when a backend is unavailable, 2 without a device.

train: one GloRo training epoch on synthetic MNIST-shaped data, in this process,
through ``gloro_core.train.train(TrainConfig(..., device="gpu"))`` with the chosen
backend as the default for GPU arrays (the CLI has no --synthetic-n). It counts the
training steps, the host syncs during them (see SyncCounter) and which backend ran
each kernel op, and fails (exit 1, 2 without a GPU) unless the GEMM ops ran on the
chosen backend and none on a CPU backend.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

# (label, x shape (N, C, H, W), weight (O, C, k, k), stride): 2C2F and 6C2F/4C3F layers, batch 256
CONV_LAYERS = [
    ("2C2F.c1", (256, 1, 28, 28), (16, 1, 4, 4), 2),
    ("2C2F.c2", (256, 16, 14, 14), (32, 16, 4, 4), 2),
    ("4C3F.c3", (256, 32, 14, 14), (64, 32, 3, 3), 1),
    ("6C2F.c2", (256, 32, 32, 32), (32, 32, 3, 3), 1),
]
# (label, batch, in, out)
DENSE_LAYERS = [
    ("2C2F.d1", 256, 1568, 100),
    ("4C3F.d1", 256, 3136, 512),
]
BACKENDS = ("cupy", "numba_cuda")


def _timer(cp, fn, reps):
    """Median and min milliseconds of ``fn()`` over ``reps`` runs (after 2 warm-ups)."""
    for _ in range(2):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times), min(times)


def _matmul_gflops(cp, m, n, k, reps, cache):
    """GFLOP/s of cupy.matmul (M, K) x (K, N) float32 (cuBLAS), same FLOPs as the op."""
    key = (m, n, k)
    if key not in cache:
        a = cp.random.standard_normal((m, k), dtype=cp.float32)
        b = cp.random.standard_normal((k, n), dtype=cp.float32)
        med, _ = _timer(cp, lambda: cp.matmul(a, b), reps)
        cache[key] = 2.0 * m * n * k / (med * 1e-3) / 1e9
    return cache[key]


def bench_kernels(reps: int):
    import cupy as cp

    from kernels import registry
    from kernels.checks import conv_out_hw, resolve_padding

    avail = registry.availability()
    rows, mm_cache = [], {}
    rng = cp.random.default_rng(0)
    for label, xs, ws, st in CONV_LAYERS:
        s = (st, st)
        pads = resolve_padding("same", xs[2:], ws[2:], s)
        oh, ow = conv_out_hw(xs[2:], ws[2:], s, pads)
        n, c = xs[:2]
        o, _, kh, kw = ws
        x = rng.standard_normal(xs, dtype=cp.float32)
        w = rng.standard_normal(ws, dtype=cp.float32)
        b = rng.standard_normal((o,), dtype=cp.float32)
        gy = rng.standard_normal((n, o, oh, ow), dtype=cp.float32)
        npix = n * oh * ow
        # the GEMM each op is: (M, N, K)
        ops = {
            "conv2d": ((o, npix, c * kh * kw), lambda f: f(x, w, b, s, pads)),
            "conv2d_grad_input": ((c, n * xs[2] * xs[3], o * kh * kw), lambda f: f(gy, w, xs, s, pads)),
            "conv2d_grad_weight": ((o, c * kh * kw, npix), lambda f: f(x, gy, ws, s, pads)),
        }
        rows += _bench_ops(cp, registry, avail, label, ops, reps, mm_cache)
    for label, n, i, o in DENSE_LAYERS:
        x = rng.standard_normal((n, i), dtype=cp.float32)
        w = rng.standard_normal((o, i), dtype=cp.float32)
        b = rng.standard_normal((o,), dtype=cp.float32)
        gy = rng.standard_normal((n, o), dtype=cp.float32)
        ops = {
            "dense": ((n, o, i), lambda f: f(x, w, b)),
            "dense_grad_input": ((n, i, o), lambda f: f(gy, w)),
            "dense_grad_weight": ((o, i, n), lambda f: f(x, gy)),
        }
        rows += _bench_ops(cp, registry, avail, label, ops, reps, mm_cache)
    rows += _bench_fused(cp, registry, avail, reps)
    return rows


# largest |GPU - CPU| / max |CPU| a float32 GEMM row may show (K up to ~1e5 terms)
RESULT_RTOL = 1e-4


def _on_host(cp, fn):
    """``fn`` (a CPU backend's op) called with the device arguments copied to the host."""
    def call(*args):
        return fn(*(cp.asnumpy(a) if isinstance(a, cp.ndarray) else a for a in args))
    return call


def _bench_ops(cp, registry, avail, label, ops, reps, mm_cache):
    """One row per (op, GPU backend): time, GFLOP/s next to cupy.matmul, and the result
    checked against the numpy backend on the same inputs (a row "error" past RESULT_RTOL)."""
    rows = []
    for op, ((m, nn, k), call) in ops.items():
        flops = 2.0 * m * nn * k
        ref = _matmul_gflops(cp, m, nn, k, reps, mm_cache)
        want = None
        for be in BACKENDS:
            row = {"kind": "gemm", "layer": label, "op": op, "backend": be, "M": m, "N": nn, "K": k,
                   "matmul_gflops": ref}
            if avail[be] is not None:
                row["error"] = avail[be]
            else:
                fn = registry.get(op, be)
                t0 = time.perf_counter()
                got = cp.asnumpy(call(fn))
                row["first_call_s"] = time.perf_counter() - t0  # includes NVRTC / numba compile
                if want is None:
                    want = call(_on_host(cp, registry.get(op, "numpy")))
                err = float(np.max(np.abs(got.astype(np.float64) - want)) / max(float(np.max(np.abs(want))), 1e-30))
                row["max_rel_err"] = err
                if not err <= RESULT_RTOL:   # NaN fails too
                    row["error"] = f"wrong result: max |gpu - numpy| / max |numpy| = {err:.3g} > {RESULT_RTOL:g}"
                med, mn = _timer(cp, lambda: call(fn), reps)
                row.update(ms=med, ms_min=mn, gflops=flops / (med * 1e-3) / 1e9)
                row["pct_matmul"] = 100.0 * row["gflops"] / ref
            rows.append(row)
    return rows


def _bench_fused(cp, registry, avail, reps):
    """Fused ops against the CuPy expressions they replace."""
    from kernels.checks import resolve_padding

    rows = []
    rng = cp.random.default_rng(1)
    n = 1568 * 100 + 16 * 16 + 32 * 16 * 16 + 100 * 10  # 2C2F parameter count (weights)
    p, g, m = (rng.standard_normal((n,), dtype=cp.float32) for _ in range(3))
    v = cp.abs(rng.standard_normal((n,), dtype=cp.float32))
    args = (1e-3, 0.9, 0.999, 1e-7)

    def unfused():
        m[...] = 0.9 * m + 0.1 * g
        v[...] = 0.999 * v + 0.001 * g * g
        p[...] = p - 1e-3 * m / (cp.sqrt(v) + 1e-7)

    base, _ = _timer(cp, unfused, reps)
    for be in BACKENDS:
        row = {"kind": "fused", "op": "adam_update", "layer": f"n={n}", "backend": be, "baseline": "cupy expr",
               "baseline_ms": base}
        if avail[be] is None:
            fn = registry.get("adam_update", be)
            row["ms"], _ = _timer(cp, lambda: fn(p, g, m, v, *args), reps)
        else:
            row["error"] = avail[be]
        rows.append(row)

    # MinMax on 2C2F's first conv output (256, 16, 14, 14)
    x = rng.standard_normal((256, 16, 14, 14), dtype=cp.float32)
    gy = rng.standard_normal(x.shape, dtype=cp.float32)

    def mm_expr():
        a, b = x[:, 0::2], x[:, 1::2]
        return cp.stack([cp.minimum(a, b), cp.maximum(a, b)], axis=2).reshape(x.shape)

    def time_backends(op, label, call, baseline, base_ms):
        """One row per GPU backend: op's time through ``call(fn)``, or why it is unavailable."""
        for be in BACKENDS:
            row = {"kind": "fused", "op": op, "layer": label, "backend": be,
                   "baseline": baseline, "baseline_ms": base_ms}
            if avail[be] is None:
                fn = registry.get(op, be)
                row["ms"], _ = _timer(cp, lambda: call(fn), reps)
            else:
                row["error"] = avail[be]
            rows.append(row)

    base, _ = _timer(cp, mm_expr, reps)
    for op, call in (("minmax", lambda f: f(x)), ("minmax_grad", lambda f: f(x, gy))):
        time_backends(op, "2C2F.c1", call, "cupy minimum/maximum (fwd)", base)

    # power step on 2C2F conv 2 (iterate 1x16x14x14) and dense 1 (1568 -> 100)
    xs, w = (1, 16, 14, 14), rng.standard_normal((32, 16, 4, 4), dtype=cp.float32)
    s = (2, 2)
    pads = resolve_padding("same", xs[2:], (4, 4), s)
    it = rng.standard_normal(xs, dtype=cp.float32)
    it /= cp.linalg.norm(it)
    wd = rng.standard_normal((100, 1568), dtype=cp.float32)
    itd = rng.standard_normal((1, 1568), dtype=cp.float32)
    itd /= cp.linalg.norm(itd)
    cases = [
        ("conv_power_step", "2C2F.c2", lambda f: f(it, w, s, pads), lambda: _cp_conv_step(it, w, s, pads)),
        ("dense_power_step", "2C2F.d1", lambda f: f(itd, wd), lambda: _cp_dense_step(cp, itd, wd)),
    ]
    for op, label, call, unfused_call in cases:
        base, _ = _timer(cp, unfused_call, reps)
        time_backends(op, label, call, "kernels ops + cupy norms", base)
    return rows


def _cp_conv_step(v, w, s, pads):
    import cupy as cp

    import kernels

    u = kernels.conv2d(v, w, None, s, pads, backend="cupy")
    sigma = cp.linalg.norm(u)
    z = kernels.conv2d_adjoint(u / sigma, w, v.shape, s, pads, backend="cupy")
    return z / cp.linalg.norm(z), sigma


def _cp_dense_step(cp, v, w):
    u = v @ w.T
    sigma = cp.linalg.norm(u)
    z = (u / sigma) @ w
    return z / cp.linalg.norm(z), sigma


# ---------------------------------------------------------------- training epoch

class SyncCounter:
    """Counts host syncs while ``active``: the CuPy calls that copy to the host or wait
    (ndarray.get/item/tolist/__float__/__int__/__bool__/__index__, Stream.synchronize)
    and numba's Stream.synchronize (numba_cuda's ``as_cuda_array(sync=True)``).

    Patches the classes in this process only (the bench's own process); nested calls
    (float() calling get()) count once. Not a profiler: a sync inside compiled code
    (cupy.bincount's output size, say) is not seen, so this is a lower bound."""

    CUPY_METHODS = ("get", "item", "tolist", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, cupy_mod=None, numba_stream_cls=None):
        self.counts: dict[str, int] = {}
        self.active = False
        self._depth = 0
        self._undo = []
        targets = []
        if cupy_mod is not None:
            targets += [(cupy_mod.ndarray, m, f"ndarray.{m}") for m in self.CUPY_METHODS]
            targets.append((cupy_mod.cuda.Stream, "synchronize", "cupy Stream.synchronize"))
        if numba_stream_cls is not None:
            targets.append((numba_stream_cls, "synchronize", "numba Stream.synchronize"))
        for cls, name, label in targets:
            orig = cls.__dict__.get(name)
            if orig is None and not hasattr(cls, name):
                continue
            try:
                setattr(cls, name, self._wrap(getattr(cls, name), label))
            except (TypeError, AttributeError):  # an extension type: not patchable, not counted
                self.counts.setdefault(f"{label} (not counted)", 0)
                continue
            self._undo.append((cls, name, orig))

    def _wrap(self, fn, label):
        counter = self

        def wrapped(*a, **k):
            if counter.active and counter._depth == 0:
                counter.counts[label] = counter.counts.get(label, 0) + 1
            counter._depth += 1
            try:
                return fn(*a, **k)
            finally:
                counter._depth -= 1

        return wrapped

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def restore(self):
        for cls, name, orig in reversed(self._undo):
            if orig is None:
                delattr(cls, name)
            else:
                setattr(cls, name, orig)
        self._undo.clear()


def _numba_stream_cls():
    try:
        from numba.cuda.cudadrv import driver
        return driver.Stream
    except Exception:
        return None


def bench_train(args, train_fn=None):
    """One GloRo epoch with device="gpu" and ``args.backend`` as the default GPU backend.

    Counts training steps, host syncs (SyncCounter, paused during evaluation) and which
    backend ran each kernel op; fails (result["error"]) when the GPU is missing or any
    GEMM op ran on a CPU backend."""
    from kernels import registry

    result = {"arch": args.arch, "n": args.n, "batch": args.batch, "backend": args.backend,
              "device": "gpu", "via": "python api, TrainConfig(device='gpu')"}
    why = registry.availability().get(args.backend, f"unknown backend {args.backend!r}")
    if why is None and registry.device_of(args.backend) != "gpu":
        why = f"{args.backend!r} is not a GPU backend"
    if why is not None:
        result.update(rc=2, error=f"no GPU for backend {args.backend}: {why}")
        return result

    import cupy as cp

    import gloro_core.train as tr

    out = args.out or tempfile.mkdtemp(prefix=f"gloro_gpu_epoch_{args.backend}_")
    result["out"] = out
    cfg = tr.TrainConfig(dataset="synthetic", arch=args.arch, epochs=1, batch=args.batch,
                         power_iters=args.power_iters, out=out, progress=False,
                         synthetic_n=(args.n, args.n_test), device="gpu",
                         val=0)  # timing an epoch as before: no split
    counter = SyncCounter(cp, _numba_stream_cls())
    calls: dict[str, int] = {}
    steps = [0]
    real_get, real_batches, real_eval = registry.get, tr.data_mod.batches, tr.evaluate

    def get(op, backend):
        if counter.active:
            key = f"{op}:{backend}"
            calls[key] = calls.get(key, 0) + 1
        return real_get(op, backend)

    def batches(*a, **k):
        counter.active = True  # counting starts with the first training batch
        for idx in real_batches(*a, **k):
            steps[0] += 1
            yield idx
        counter.active = False  # the epoch's last step is done: update_lipschitz is not a step

    def evaluate(*a, **k):
        counter.active = False  # evaluation is not a training step
        return real_eval(*a, **k)

    registry.get, tr.data_mod.batches, tr.evaluate = get, batches, evaluate
    t0 = time.perf_counter()
    try:
        with registry.default_backend(args.backend):
            (train_fn or tr.train)(cfg, log=lambda m: print(m, flush=True))
        cp.cuda.Device().synchronize()
    except Exception as exc:
        result.update(rc=1, error=f"{type(exc).__name__}: {exc}")
    finally:
        counter.active = False
        registry.get, tr.data_mod.batches, tr.evaluate = real_get, real_batches, real_eval
        counter.restore()
    result["wall_s"] = time.perf_counter() - t0
    result["steps"] = steps[0]
    result["host_syncs"] = counter.total
    result["host_syncs_by_call"] = dict(counter.counts)
    result["host_syncs_per_step"] = counter.total / steps[0] if steps[0] else None
    result["op_calls"] = calls
    if "error" not in result:
        on_cpu = sorted(k for k in calls if registry.device_of(k.split(":")[1]) == "cpu"
                        and k.split(":")[0].startswith(("conv2d", "dense")))
        ran = sum(v for k, v in calls.items() if k.endswith(":" + args.backend))
        if on_cpu or not ran:
            result.update(rc=1, error=f"the epoch did not run on {args.backend}: CPU GEMM ops {on_cpu}, "
                                      f"{ran} op calls on {args.backend}")
        else:
            result["rc"] = 0
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            lines = [json.loads(x) for x in f if x.strip()]
        if lines:
            for k in ("epoch_s", "eval_s", "samples_per_s", "loss", "vra", "clean_acc", "peak_mem_mb"):
                if k in lines[-1]:
                    result[k] = lines[-1][k]
    return result


# ---------------------------------------------------------------- report

def _train_line(t):
    head = f"GloRo {t.get('arch')} epoch, backend {t.get('backend')}, device {t.get('device')}"
    if t.get("rc") != 0 or "epoch_s" not in t:
        return f"{head}: FAILED (rc {t.get('rc')}): {t.get('error', '')}"
    sps = t.get("host_syncs_per_step")
    syncs = "n/a" if sps is None else f"{sps:.1f}"
    return (f"{head}: synthetic n={t['n']}, batch {t['batch']}: {t['epoch_s']:.2f} s train "
            f"({t.get('samples_per_s', float('nan')):.0f} samples/s, {t.get('steps')} steps), "
            f"eval {t.get('eval_s', float('nan')):.2f} s, host syncs/step {syncs} "
            f"({t.get('host_syncs_by_call', {})})")


def print_table(krows, trains=(), pytest_line=None):
    lines = []
    if pytest_line:
        lines.append(f"pytest -m gpu: {pytest_line}")
    if any(r["kind"] == "gemm" for r in krows or []):
        lines.append(f"{'layer':10} {'op':20} {'backend':11} {'M x N x K':>22} {'ms':>8} {'GFLOP/s':>9} "
                     f"{'matmul GF/s':>11} {'% matmul':>8} {'rel err':>8}")
    for r in krows or []:
        if r["kind"] != "gemm":
            continue
        shape = f"{r['M']}x{r['N']}x{r['K']}"
        if "ms" not in r:
            lines.append(f"{r['layer']:10} {r['op']:20} {r['backend']:11} {shape:>22}   unavailable: {r['error'][:40]}")
            continue
        lines.append(f"{r['layer']:10} {r['op']:20} {r['backend']:11} {shape:>22} {r['ms']:8.3f} "
                     f"{r['gflops']:9.1f} {r['matmul_gflops']:11.1f} {r['pct_matmul']:7.1f}% "
                     f"{r['max_rel_err']:8.1e}" + ("  WRONG RESULT" if "error" in r else ""))
    fused = [r for r in krows or [] if r["kind"] == "fused"]
    if fused:
        lines.append(f"{'fused op':20} {'layer':10} {'backend':11} {'ms':>8} {'baseline ms':>11}  baseline")
        for r in fused:
            ms = f"{r['ms']:8.3f}" if "ms" in r else "     n/a"
            lines.append(f"{r['op']:20} {r['layer']:10} {r['backend']:11} {ms} {r['baseline_ms']:11.3f}  {r['baseline']}")
    for t in trains or ():
        lines.append(_train_line(t))
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--reps", type=int, default=20)
    k.add_argument("--json", default=None)
    t = sub.add_parser("train")
    t.add_argument("--arch", default="2C2F")
    t.add_argument("--n", type=int, default=60000)
    t.add_argument("--n-test", type=int, default=10000)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--power-iters", type=int, default=10)
    t.add_argument("--backend", default="cupy", choices=BACKENDS)
    t.add_argument("--out", default=None, help="run directory (default: a new temp dir)")
    t.add_argument("--json", default=None)
    r = sub.add_parser("report")
    r.add_argument("--kernels", default=None, help="kernels --json output")
    r.add_argument("--train", action="append", default=[], help="train --json output (repeatable)")
    r.add_argument("--pytest-line", default=None)
    args = ap.parse_args(argv)

    if args.cmd == "kernels":
        from kernels import registry

        why = registry.availability()["cupy"]
        if why is not None:  # timing needs CuPy events on a device, whichever backend runs
            print(f"gpu_bench kernels: no CUDA device for CuPy: {why}", file=sys.stderr)
            return 2
        rows = bench_kernels(args.reps)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        print_table(rows)
        missing = [r for r in rows if "error" in r]
        return 1 if missing else 0
    elif args.cmd == "train":
        res = bench_train(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        print_table([], [res])
        if res["rc"] != 0:
            print(f"gpu_bench train: {res.get('error')}", file=sys.stderr)
        return res["rc"]
    else:
        def load(p):
            if not p or not os.path.exists(p):
                return None
            with open(p) as f:
                return json.load(f)

        trains = [load(p) or {"arch": "?", "backend": os.path.basename(p)[6:-5] if os.path.basename(p).startswith("train_")
                              else p, "rc": "-", "error": f"not run ({p} missing)"} for p in args.train]
        print_table(load(args.kernels) or [], trains, args.pytest_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

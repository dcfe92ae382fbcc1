#!/usr/bin/env python
"""GPU benchmarks for the ``cupy`` and ``numba_cuda`` backends (needs a CUDA device).

    python bench/gpu_bench.py kernels [--json k.json] [--reps 20]
    python bench/gpu_bench.py train [--json t.json] [--arch 2C2F] [--n 60000] [--batch 256]
    python bench/gpu_bench.py report k.json t.json [--pytest-line "..."]   # one table

kernels: every conv/dense op at the paper's layer shapes (batch 256), each GPU
backend, timed with CUDA events (median of ``--reps`` after warm-up/compilation),
reported as GFLOP/s next to ``cupy.matmul`` of an (M, K) x (K, N) float32 product
with the same FLOP count measured in the same run (the vendor-GEMM ceiling), and
the fused ops (Adam, power steps) next to the unfused CuPy expressions they replace.

train: one GloRo training epoch of 2C2F on synthetic MNIST-shaped data through
``python -m gloro_core train --dataset synthetic ...`` (the CLI; the dataset size
goes through ``--synthetic-n`` when the CLI has it, else through the Python API
``gloro_core.train.TrainConfig(synthetic_n=...)``), reporting the epoch's train
time from the run's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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


def _bench_ops(cp, registry, avail, label, ops, reps, mm_cache):
    rows = []
    for op, ((m, nn, k), call) in ops.items():
        flops = 2.0 * m * nn * k
        ref = _matmul_gflops(cp, m, nn, k, reps, mm_cache)
        for be in BACKENDS:
            row = {"kind": "gemm", "layer": label, "op": op, "backend": be, "M": m, "N": nn, "K": k,
                   "matmul_gflops": ref}
            if avail[be] is not None:
                row["error"] = avail[be]
            else:
                fn = registry.get(op, be)
                t0 = time.perf_counter()
                call(fn)
                cp.cuda.Device().synchronize()
                row["first_call_s"] = time.perf_counter() - t0  # includes NVRTC / numba compile
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
        for be in BACKENDS:
            row = {"kind": "fused", "op": op, "layer": label, "backend": be,
                   "baseline": "kernels ops + cupy norms", "baseline_ms": base}
            if avail[be] is None:
                fn = registry.get(op, be)
                row["ms"], _ = _timer(cp, lambda: call(fn), reps)
            else:
                row["error"] = avail[be]
            rows.append(row)
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

def bench_train(args):
    out = tempfile.mkdtemp(prefix="gloro_gpu_epoch_")
    helptext = subprocess.run([sys.executable, "-m", "gloro_core", "train", "--help"], cwd=ROOT,
                              capture_output=True, text=True).stdout
    cmd = [sys.executable, "-m", "gloro_core", "train", "--dataset", "synthetic", "--arch", args.arch,
           "--epochs", "1", "--batch", str(args.batch), "--backend", args.backend, "--out", out,
           "--no-progress", "--power-iters", str(args.power_iters)]
    if "--device" in helptext:
        cmd += ["--device", "gpu"]
    result = {"arch": args.arch, "n": args.n, "batch": args.batch, "backend": args.backend, "out": out}
    env = dict(os.environ, GLORO_BACKEND=args.backend)
    t0 = time.perf_counter()
    if "--synthetic-n" in helptext:
        cmd += ["--synthetic-n", f"{args.n},{args.n_test}"]
        result["via"] = "cli"
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    else:
        # the CLI cannot set the synthetic size yet: same run through the Python API
        code = (
            "import sys\nfrom gloro_core.train import TrainConfig, train\n"
            f"cfg = TrainConfig(dataset='synthetic', arch={args.arch!r}, epochs=1, batch={args.batch}, "
            f"power_iters={args.power_iters}, out={out!r}, progress=False, "
            f"synthetic_n=({args.n}, {args.n_test}))\n"
            "train(cfg, log=lambda s: print(s, flush=True))\n"
        )
        result["via"] = "python api (CLI has no --synthetic-n)"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    result["wall_s"] = time.perf_counter() - t0
    result["rc"] = proc.returncode
    result["log_tail"] = (proc.stdout + proc.stderr)[-2000:]
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            lines = [json.loads(x) for x in f if x.strip()]
        if lines:
            last = lines[-1]
            for k in ("epoch_s", "eval_s", "samples_per_s", "loss", "vra", "clean_acc", "peak_mem_mb"):
                if k in last:
                    result[k] = last[k]
    return result


# ---------------------------------------------------------------- report

def print_table(krows, train=None, pytest_line=None):
    lines = []
    if pytest_line:
        lines.append(f"pytest -m gpu: {pytest_line}")
    if any(r["kind"] == "gemm" for r in krows or []):
        lines.append(f"{'layer':10} {'op':20} {'backend':11} {'M x N x K':>22} {'ms':>8} {'GFLOP/s':>9} "
                     f"{'matmul GF/s':>11} {'% matmul':>8}")
    for r in krows or []:
        if r["kind"] != "gemm":
            continue
        shape = f"{r['M']}x{r['N']}x{r['K']}"
        if "error" in r:
            lines.append(f"{r['layer']:10} {r['op']:20} {r['backend']:11} {shape:>22}   unavailable: {r['error'][:40]}")
            continue
        lines.append(f"{r['layer']:10} {r['op']:20} {r['backend']:11} {shape:>22} {r['ms']:8.3f} "
                     f"{r['gflops']:9.1f} {r['matmul_gflops']:11.1f} {r['pct_matmul']:7.1f}%")
    fused = [r for r in krows or [] if r["kind"] == "fused"]
    if fused:
        lines.append(f"{'fused op':20} {'layer':10} {'backend':11} {'ms':>8} {'baseline ms':>11}  baseline")
        for r in fused:
            ms = f"{r['ms']:8.3f}" if "ms" in r else "     n/a"
            lines.append(f"{r['op']:20} {r['layer']:10} {r['backend']:11} {ms} {r['baseline_ms']:11.3f}  {r['baseline']}")
    if train:
        if train.get("rc") == 0 and "epoch_s" in train:
            lines.append(f"GloRo {train['arch']} epoch (synthetic n={train['n']}, batch {train['batch']}, "
                         f"backend {train['backend']}, via {train['via']}): {train['epoch_s']:.2f} s train, "
                         f"{train.get('samples_per_s', float('nan')):.0f} samples/s, eval {train.get('eval_s', float('nan')):.2f} s")
        else:
            lines.append(f"GloRo {train.get('arch')} epoch: FAILED (rc {train.get('rc')}), log tail:\n{train.get('log_tail', '')}")
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
    t.add_argument("--backend", default="cupy")
    t.add_argument("--json", default=None)
    r = sub.add_parser("report")
    r.add_argument("kernels_json", nargs="?")
    r.add_argument("train_json", nargs="?")
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
    elif args.cmd == "train":
        res = bench_train(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        print_table([], res)
        return 0 if res["rc"] == 0 else 1
    else:
        load = lambda p: json.load(open(p)) if p and os.path.exists(p) else None  # noqa: E731
        print_table(load(args.kernels_json) or [], load(args.train_json), args.pytest_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""One small launch of every GPU kernel, for compute-sanitizer (bench/gpu_check.sh):

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/gpu_sanitize.py [backend ...]

Each op of each backend (default: cupy and numba_cuda) runs once on small odd
shapes that hit edge tiles, padding and split-K, float32, and is compared with the
NumPy oracle (a sanitizer run that computes garbage should not pass either).
CuPy's memory pool is turned off so every array is its own cudaMalloc and memcheck
sees an access past its end. Exit 0 when all ran and matched, 1 otherwise, 2 without a GPU.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(backend: str) -> list[str]:
    import cupy as cp

    from kernels import reference as ref
    from kernels import registry
    from kernels.checks import resolve_padding

    bad = []
    rng = np.random.default_rng(0)
    op = lambda name: registry.get(name, backend)  # noqa: E731

    def check(name, got, want, tol=1e-4):
        got = cp.asnumpy(got).astype(np.float64)
        err = float(np.max(np.abs(got - want))) / (1.0 + float(np.max(np.abs(want)))) if want.size else 0.0
        print(f"  {backend:10s} {name:22s} rel err {err:.2e}", flush=True)
        if got.shape != want.shape or not err <= tol:
            bad.append(f"{backend} {name}: shape {got.shape} vs {want.shape}, err {err}")

    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    # conv: 20 filters (tile 32x128), stride 2, SAME; grad-W K = 2*5*5 = 50 ... plus a long-K one for split-K
    for xs, ws, st in (((2, 3, 9, 10), (20, 3, 4, 4), (2, 2)), ((3, 2, 17, 15), (40, 2, 3, 3), (1, 1))):
        pads = resolve_padding("same", xs[2:], ws[2:], st)
        x, w, b = f32(*xs), f32(*ws), f32(ws[0])
        dx, dw, db = cp.asarray(x), cp.asarray(w), cp.asarray(b)
        y = op("conv2d")(dx, dw, db, st, pads)
        check(f"conv2d {xs}", y, ref.conv2d(x, w, b, st, pads))
        gy = f32(*y.shape)
        dgy = cp.asarray(gy)
        check("conv2d_grad_input", op("conv2d_grad_input")(dgy, dw, xs, st, pads),
              ref.conv2d_grad_input(gy, w, xs, st, pads))
        check("conv2d_grad_weight", op("conv2d_grad_weight")(dx, dgy, ws, st, pads),
              ref.conv2d_grad_weight(x, gy, ws, st, pads))
        v = f32(1, *xs[1:])
        v /= np.linalg.norm(v)
        z, sigma = op("conv_power_step")(cp.asarray(v), dw, st, pads)
        u = ref.conv2d(v, w, None, st, pads).astype(np.float64)
        zr = ref.conv2d_grad_input(u, w.astype(np.float64), v.shape, st, pads)
        check("conv_power_step", z, zr / np.linalg.norm(zr))
        check("conv_power_step sigma", cp.asarray(sigma).reshape(()), np.asarray(np.linalg.norm(u)))
    for n, i, o in ((5, 37, 19), (70, 300, 40)):
        x, w, b, gy = f32(n, i), f32(o, i), f32(o), f32(n, o)
        dx, dw, dgy = cp.asarray(x), cp.asarray(w), cp.asarray(gy)
        check(f"dense {(n, i, o)}", op("dense")(dx, dw, cp.asarray(b)), ref.dense(x, w, b))
        check("dense_grad_input", op("dense_grad_input")(dgy, dw), ref.dense_grad_input(gy, w))
        check("dense_grad_weight", op("dense_grad_weight")(dx, dgy), ref.dense_grad_weight(x, gy))
        v = f32(1, i)
        v /= np.linalg.norm(v)
        z, sigma = op("dense_power_step")(cp.asarray(v), dw)
        u = w.astype(np.float64) @ v[0].astype(np.float64)
        zr = w.T.astype(np.float64) @ u
        check("dense_power_step", z, (zr / np.linalg.norm(zr)).reshape(1, -1))
    x, gy = f32(3, 6, 5, 7), f32(3, 6, 5, 7)
    check("minmax", op("minmax")(cp.asarray(x)), ref.minmax(x), tol=0)
    check("minmax_grad", op("minmax_grad")(cp.asarray(x), cp.asarray(gy)), ref.minmax_grad(x, gy), tol=0)
    from kernels.fused import _adam_update_cpu

    p, g, m = f32(33, 17), f32(33, 17), f32(33, 17)
    v = np.abs(f32(33, 17))
    want = [a.copy() for a in (p, g, m, v)]
    _adam_update_cpu(*want, 0.01, 0.9, 0.999, 1e-7)
    dp, dm, dv = cp.asarray(p), cp.asarray(m), cp.asarray(v)
    op("adam_update")(dp, cp.asarray(g), dm, dv, 0.01, 0.9, 0.999, 1e-7)
    check("adam_update", dp, want[0])
    cp.cuda.Device().synchronize()
    return bad


def main(argv=None) -> int:
    backends = (argv if argv is not None else sys.argv[1:]) or ["cupy", "numba_cuda"]
    from kernels import registry

    avail = registry.availability()
    missing = {b: avail.get(b, "unknown backend") for b in backends if avail.get(b, "unknown") is not None}
    if missing:
        print(f"gpu_sanitize: backends unavailable: {missing}", file=sys.stderr)
        return 2
    import cupy as cp

    cp.cuda.set_allocator(None)  # no pool: out-of-bounds accesses leave their own allocation
    bad = []
    for b in backends:
        bad += run(b)
    for line in bad:
        print("MISMATCH", line, file=sys.stderr)
    print("gpu_sanitize:", "all kernels ran and matched" if not bad else f"{len(bad)} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a training step's time goes: per op and per layer shape, with the GEMM share inside
the conv ops (the numpy backend's im2col GEMMs, which the numba backend's batched convs run
too, and Winograd's 16 GEMMs) (issue 10, part 2's "profile first").

python bench/profile/conv_profile.py [--steps 15] [--json out.json]
Ours only; the PyTorch side is bench/profile/torch_conv_ops.py (its own process).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

import numpy as np  # noqa: E402

from kernels import numpy_backend, registry, winograd  # noqa: E402

_T = collections.defaultdict(float)     # (op, backend, shape-key) -> seconds, this step
_GEMM = collections.defaultdict(float)  # thread-seconds in np.matmul inside numpy convs
_CUR = threading.local()
_OP_KEY = [None]


class _NpProxy:
    """numpy, with matmul timed per calling thread (numpy_backend's GEMMs)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def matmul(*a, **k):
        t = time.perf_counter()
        r = np.matmul(*a, **k)
        if _OP_KEY[0] is not None:
            _GEMM[_OP_KEY[0]] += time.perf_counter() - t
        return r


def _key(op, args):
    shapes = [tuple(a.shape) for a in args if hasattr(a, "shape")]
    if op.startswith("conv2d") and op not in ("conv2d_power_steps",):
        if op == "conv2d_grad_input":
            w, xs = args[1].shape, args[2]
        elif op == "conv2d_grad_weight":
            xs, w = args[0].shape, args[2]
        else:
            xs, w = args[0].shape, args[1].shape
        return (op, f"x{tuple(xs)} w{tuple(w)} s{tuple(args[3])[0]}")
    return (op, " ".join(str(s) for s in shapes[:2]))


def install():
    registry.backends()
    for (op, be), fn in list(registry._IMPLS.items()):
        if registry.device_of(be) != "cpu":
            continue

        def wrapped(*args, _fn=fn, _op=op, _be=be):
            key = _key(_op, args) + (_be,)
            outer = _OP_KEY[0]
            if outer is None:
                _OP_KEY[0] = key
            t = time.perf_counter()
            try:
                return _fn(*args)
            finally:
                if outer is None:
                    _T[key] += time.perf_counter() - t
                    _OP_KEY[0] = None
        registry._IMPLS[(op, be)] = wrapped
    numpy_backend.np = _NpProxy()
    winograd.np = _NpProxy()  # its 16 GEMMs per chunk


def profile(arch, kind, n, steps):
    sys.path.insert(0, os.path.join(os.path.dirname(HERE)))
    from bench.shapes import MODELS, synthetic
    import bench.workloads  # noqa: F401
    from bench.workloads import Ours

    iters = MODELS[arch][1]
    m = Ours(arch, os.environ.get("PROFILE_ACTIVATION", "relu")).build()
    x, y = synthetic(MODELS[arch][0], n)
    step = Ours.step_fn(m, Ours.optimizer(m), x, y, kind, iters)
    for _ in range(3):
        step()
    per, gem, walls = collections.defaultdict(list), collections.defaultdict(list), []
    for _ in range(steps):
        _T.clear(); _GEMM.clear()
        t = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t)
        for k, v in _T.items():
            per[k].append(v)
        for k, v in _GEMM.items():
            gem[k].append(v)
    return statistics.median(walls), {k: statistics.median(v) for k, v in per.items()}, \
        {k: statistics.median(v) for k, v in gem.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--archs", default="2C2F,4C3F")
    ap.add_argument("--json")
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bench"))
    install()
    out = {}
    for arch in a.archs.split(","):
        wall, per, gem = profile(arch, "gloro", a.batch, a.steps)
        print(f"\n== {arch} gloro step, batch {a.batch}: median {wall*1e3:.1f} ms; "
              f"ops total {sum(per.values())*1e3:.1f} ms")
        rows = sorted(per.items(), key=lambda kv: -kv[1])
        for k, v in rows:
            g = gem.get(k, 0.0)
            split = f"  gemm {g*1e3:6.2f} thread-ms ({g/(2*v)*100:4.0f}% of 2 threads)" if g else ""
            print(f"  {v*1e3:7.2f} ms  {k[2]:6s} {k[0]:22s} {k[1]}{split}")
        out[arch] = dict(wall=wall, ops=[dict(op=k[0], shape=k[1], backend=k[2], ms=v * 1e3,
                                              gemm_thread_ms=gem.get(k, 0) * 1e3) for k, v in rows])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

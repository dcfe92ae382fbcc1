"""A/B: stride-2 conv2d_grad_input through space-to-depth (S2D_MIN_CHANNELS=2) against the
GEMM + col2im path (S2D_MIN_CHANNELS huge), interleaved, medians; batch 256, float32."""
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]
import numpy as np  # noqa: E402

from kernels import numpy_backend as nb  # noqa: E402
from shapes import layer_table  # noqa: E402

rng = np.random.default_rng(0)
for arch in ("2C2F", "4C3F", "6C2F"):
    for r in layer_table(arch):
        if r["kind"] != "conv" or r["s"] == 1 or r["k"] % r["s"] or r["in_shape"][0] < 2:
            continue
        c, h, w = r["in_shape"]
        o = r["out_shape"][0]
        wt = rng.standard_normal((o, c, r["k"], r["k"])).astype(np.float32)
        gy = rng.standard_normal((256,) + tuple(r["out_shape"])).astype(np.float32)
        xs, st = (256, c, h, w), (r["s"], r["s"])
        t = {"col2im": [], "s2d": []}
        for rep in range(2 + int(sys.argv[1] if len(sys.argv) > 1 else 15)):
            for side in (("col2im", "s2d") if rep % 2 else ("s2d", "col2im")):
                nb.S2D_MIN_CHANNELS = 2 if side == "s2d" else 1 << 30
                t0 = time.perf_counter()
                nb.conv2d_grad_input(gy, wt, xs, st, r["pads"])
                if rep >= 2:
                    t[side].append(time.perf_counter() - t0)
        a, b = statistics.median(t["col2im"]) * 1e3, statistics.median(t["s2d"]) * 1e3
        print(f"{r['label']}: col2im {a:.2f} ms, s2d {b:.2f} ms, speedup {a / b:.2f}x", flush=True)

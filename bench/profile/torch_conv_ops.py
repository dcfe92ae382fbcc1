"""PyTorch's conv ops at the paper's layer shapes: forward, grad_input, grad_weight (medians, ms).

Run in a process of its own, with raised malloc thresholds ("PyTorch at its best"):
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824 \
    python bench/profile/torch_conv_ops.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from shapes import layer_table  # noqa: E402


def med(fn, reps):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--archs", default="2C2F,4C3F")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = {}
    for arch in a.archs.split(","):
        for r in layer_table(arch):
            if r["kind"] != "conv":
                continue
            c, h, w = r["in_shape"]
            o = r["out_shape"][0]
            pt, pb, pl, pr = r["pads"]
            assert pt == pb and pl == pr
            g = torch.Generator().manual_seed(0)
            x = torch.rand((a.batch, c, h, w), generator=g)
            wt = torch.randn((o, c, r["k"], r["k"]), generator=g)
            b = torch.randn((o,), generator=g)
            s, p = r["s"], (pt, pl)
            y = torch.nn.functional.conv2d(x, wt, b, s, p)
            gy = torch.randn(y.shape, generator=g)
            bwd = torch.ops.aten.convolution_backward
            args = (gy, x, wt, [o], [s, s], list(p), [1, 1], False, [0, 0], 1)
            res = {
                "conv2d": med(lambda: torch.nn.functional.conv2d(x, wt, b, s, p), a.reps),
                "conv2d_grad_input": med(lambda: bwd(*args, [True, False, False]), a.reps),
                "conv2d_grad_weight": med(lambda: bwd(*args, [False, True, True]), a.reps),
            }
            out[r["label"]] = dict(x=list(x.shape), w=list(wt.shape), s=s, **res)
            print(r["label"], {k: round(v, 2) for k, v in res.items()}, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

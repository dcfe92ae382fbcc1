"""GloRo training-step time of candidate architectures against the first one given (the
issue-13 budget: a Fashion-MNIST recipe's step at most 2x the 2C2F step), batch 256,
float32, MinMax, 10 power iterations, Adam; steps of all candidates interleaved round by
round (so load changes hit them alike), medians. ``--power-grad`` adds each architecture
again with K_sub differentiated through the power steps (``train --power-grad``).

OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/profile/step_time_archs.py \\
    2C2F 'c(16,4,2),c(32,4,2),d(512)' 'c(16,4,2),c(32,4,2),d(1024)' --power-grad
"""
import argparse
import statistics
import time

import numpy as np

from gloro_core.architectures import layer_specs
from gloro_core.model import GloroNet
from nn.optim import Adam


def make_step(arch: str, power_grad: bool, x, y):
    net = GloroNet((1, 28, 28), 10, layer_specs(arch, 10), activation="minmax", init="glorot",
                   eps=0.15, seed=0, dtype="float32")
    opt = Adam(net.parameters(), lr=1e-3, epsilon=1e-7)

    def step():
        opt.zero_grad()
        loss = net.loss(x, y, power_iters=10, power_grad=power_grad)
        float(np.asarray(loss.data))
        loss.backward()
        opt.step()

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archs", nargs="+", help="2C2F or compact strings; the first is the reference")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--power-grad", action="store_true")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.random((256, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 256)
    cases = [(a, False) for a in args.archs] + ([(a, True) for a in args.archs] if args.power_grad else [])
    steps = {c: make_step(c[0], c[1], x, y) for c in cases}
    times = {c: [] for c in cases}
    for r in range(args.warmup + args.rounds):
        for c in (cases if r % 2 == 0 else cases[::-1]):
            t = time.perf_counter()
            steps[c]()
            if r >= args.warmup:
                times[c].append(time.perf_counter() - t)
    ref = statistics.median(times[cases[0]])
    for (arch, pg), ts in times.items():
        med = statistics.median(ts)
        print(f"{arch:40s} {'power-grad' if pg else '':10s} {med * 1e3:8.1f} ms  {med / ref:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Data-parallel training steps, timed: one rank or ``mpiexec -n K`` of them (workload 5c).

    python bench/scale_mpi.py --arch 4C3F --steps 5                 # K = 1
    mpiexec -n 2 python bench/scale_mpi.py --arch 4C3F --steps 5    # K = 2

Every rank runs one BLAS and one Numba thread, builds the same model, and takes its part of
the same global batch of ``--batch`` synthetic points per step, as ``train`` does
(gloro_core.parallel: part, loss, backward, one all-reduce of the gradients, Adam). Rank 0
prints one JSON line: the median step time, the median time in the all-reduce call (it
includes waiting for the slower rank), the all-reduce's bytes per step and per rank (the
parameters', the power iterates' and one float), and the ranks' count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="4C3F")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    a = p.parse_args(argv)

    import numba
    import numpy as np
    from shapes import MODELS, synthetic
    from workloads import Ours

    from gloro_core import distributed, parallel
    from kernels import threads

    threads.set_blas_threads(1)
    numba.set_num_threads(1)
    comm = distributed.world()
    shape, iters, _ = MODELS[a.arch]
    model = Ours(a.arch, "relu").build()
    opt = Ours.optimizer(model)
    x, y = synthetic(shape, a.batch)
    idx = np.arange(a.batch)
    xb, yb, weight = parallel.local_batch(comm, x, y, idx)
    steps, reduces = [], []
    for i in range(2 + a.steps):
        comm.barrier()  # every step starts together: the slowest rank sets the pace
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = model.loss(xb, yb, power_iters=iters)
        lv = float(np.asarray(loss.data))
        loss.backward()
        t1 = time.perf_counter()
        parallel.reduce_gradients(comm, model.parameters(), lv, weight, model)
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= 2:
            steps.append(t3 - t0)
            reduces.append(t2 - t1)
    parallel.check_same(comm, model, opt, "after the timed steps")
    step_s = parallel.max_over_ranks(comm, statistics.median(steps))
    param_bytes = sum(prm.data.nbytes for prm in model.parameters())
    nbytes = param_bytes + sum(v.nbytes for v in model.iterates) + 4
    if comm.rank == 0:
        print(json.dumps({"arch": a.arch, "ranks": comm.size, "batch": a.batch,
                          "part": len(yb), "step_ms": 1e3 * step_s,
                          "steps_per_s": 1.0 / step_s,
                          "allreduce_ms": 1e3 * statistics.median(reduces) if comm.size > 1 else 0.0,
                          "allreduce_bytes": nbytes if comm.size > 1 else 0,
                          "param_bytes": param_bytes, "reps": len(steps)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

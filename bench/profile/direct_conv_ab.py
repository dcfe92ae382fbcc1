"""A measured candidate that did not pay (issue 10): a direct convolution in Numba, no im2col.

The convs' GEMMs run at this machine's sgemm rate; what our ops lose to PyTorch's is the
data movement around them (im2col, transposes). A direct convolution has none: it reads
the phase image (the padded input split by stride phases, as numpy_backend._Geom lays it
out) at each kernel offset and accumulates into the output rows. Here in its best form
found: the output channels in blocks of 4 (one load of the input feeds 4 FMAs), inner
loops over contiguous output columns with unsigned offsets so that LLVM vectorises them.
It runs at a fraction of the GEMM's rate: the accumulators live in memory, not registers
(Numba cannot pin them), so every FMA costs a load and a store of the output.

OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/profile/direct_conv_ab.py
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
from numba import njit, uint64

from kernels import numpy_backend


@njit(cache=True)
def _direct4(xf, w2, bias, koff, t_len, yw):
    """xf (N, L) flat phase images; w2 (O, K) with O % 4 == 0; koff (K,) uint64 flat offsets
    of the kernel taps; yw (N, O, T) <- bias + sum_k w2[o, k] xf[n, koff[k] + t]."""
    n_sz, o_sz, k_sz = xf.shape[0], w2.shape[0], w2.shape[1]
    for n in range(n_sz):
        xs = xf[n]
        for o in range(0, o_sz, 4):
            r0, r1, r2, r3 = yw[n, o], yw[n, o + 1], yw[n, o + 2], yw[n, o + 3]
            for t in range(t_len):
                r0[t], r1[t], r2[t], r3[t] = bias[o], bias[o + 1], bias[o + 2], bias[o + 3]
            for k in range(k_sz):
                w0, w1, w2_, w3 = w2[o, k], w2[o + 1, k], w2[o + 2, k], w2[o + 3, k]
                off = koff[k]
                for t in range(uint64(t_len)):
                    v = xs[off + t]
                    r0[t] += w0 * v
                    r1[t] += w1 * v
                    r2[t] += w2_ * v
                    r3[t] += w3 * v


def direct(x, w, b, stride, pads):
    """The whole op: phase images, the direct loops, the junk columns dropped."""
    g = numpy_backend._Geom(x.shape, w.shape, stride, pads)
    n = x.shape[0]
    xph = np.zeros((n, g.c, g.sh, g.sw, g.hph, g.wph), x.dtype)
    for a, bb, ri, rj, si, sj in g.phase_blocks():
        xph[:, :, a, bb, ri, rj] = x[:, :, si, sj]
    plane = g.hph * g.wph
    koff = np.array([((c * g.sh + a) * g.sw + bb) * plane + off
                     for c in range(g.c) for _, _, a, bb, off in g.offsets()], np.uint64)
    yw = np.empty((n, g.o, g.t), x.dtype)
    _direct4(xph.reshape(n, -1), w.reshape(g.o, g.k), b, koff, g.t, yw)
    return yw.reshape(n, g.o, g.oh, g.wph)[:, :, :, :g.ow]


def _med(fn, reps=7):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    rng = np.random.default_rng(0)
    layers = {"2C2F.c2": ((256, 16, 14, 14), (32, 16, 4, 4), (2, 2)),
              "4C3F.c3": ((256, 32, 14, 14), (64, 32, 3, 3), (1, 1))}
    for name, (xs, ws, s) in layers.items():
        x = rng.standard_normal(xs, dtype=np.float32)
        w = rng.standard_normal(ws, dtype=np.float32) * 0.1
        b = rng.standard_normal(ws[0], dtype=np.float32)
        p = (1, 1, 1, 1)
        want = numpy_backend.conv2d(x, w, b, s, p)
        got = direct(x, w, b, s, p)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        g = numpy_backend._Geom(xs, ws, s, p)
        flops = 2.0 * g.o * g.k * g.oh * g.ow * xs[0]
        t_direct = _med(lambda: direct(x, w, b, s, p))
        t_ours = _med(lambda: numpy_backend.conv2d(x, w, b, s, p))
        w2, cols = w.reshape(g.o, g.k), rng.standard_normal((g.k, 2048), dtype=np.float32)
        out = np.empty((g.o, 2048), np.float32)
        t_gemm = _med(lambda: np.matmul(w2, cols, out=out), 15)
        print(f"{name}: direct {1e3 * t_direct:.1f} ms ({flops / t_direct / 1e9:.1f} GFLOP/s), "
              f"im2col + GEMM {1e3 * t_ours:.1f} ms ({flops / t_ours / 1e9:.1f}), the GEMM alone at this "
              f"(O, K) {2 * g.o * g.k * 2048 / t_gemm / 1e9:.1f} GFLOP/s; max rel. diff {err:.1e}")


if __name__ == "__main__":
    main()

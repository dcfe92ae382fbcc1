"""A/B: Winograd F(2x2, 3x3) (kernels/winograd.py) against the numba backend's im2col conv at
the paper's 3x3 stride-1 layers and their flipped-kernel grad_inputs, forward with bias and
ReLU, batch 256, float32, interleaved ABBA, medians; then where one chunk's time goes.

OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/profile/winograd_ab.py
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np

from kernels import numba_backend, winograd

LAYERS = {  # x shape, w shape (the grad_input rows: the flipped conv, x = gy)
    "4C3F.c3": ((256, 32, 14, 14), (64, 32, 3, 3)),
    "4C3F.c3 grad_input": ((256, 64, 14, 14), (32, 64, 3, 3)),
    "6C2F.c2": ((256, 32, 32, 32), (32, 32, 3, 3)),
    "6C2F.c4": ((256, 32, 16, 16), (64, 32, 3, 3)),
    "6C2F.c4 grad_input": ((256, 64, 16, 16), (32, 64, 3, 3)),
    "6C2F.c5": ((256, 64, 16, 16), (64, 64, 3, 3)),
}


def _t(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _med(fn, reps=9):
    fn()
    return 1e3 * statistics.median(_t(fn) for _ in range(reps))


def main():
    rng = np.random.default_rng(0)
    pads = (1, 1, 1, 1)
    real = winograd.applies
    for name, (xs, ws) in LAYERS.items():
        x = rng.standard_normal(xs, dtype=np.float32)
        w = rng.standard_normal(ws, dtype=np.float32) * 0.1
        b = rng.standard_normal(ws[0], dtype=np.float32)

        def im2col():
            winograd.applies = lambda *a: False
            try:
                return numba_backend.conv2d_relu(x, w, b, (1, 1), pads)
            finally:
                winograd.applies = real

        def wino():
            return winograd.conv2d(x, w, b, pads, True)

        im2col(), wino()
        a, g = [], []
        for _ in range(5):
            a.append(_t(im2col)), g.append(_t(wino)), g.append(_t(wino)), a.append(_t(im2col))
        ma, mg = 1e3 * statistics.median(a), 1e3 * statistics.median(g)
        used = "used" if real(xs, ws, (1, 1), pads) else "not used"
        print(f"{name:20s} im2col {ma:7.1f} ms  winograd {mg:7.1f} ms  {ma / mg:5.2f}x  ({used})", flush=True)

    # one chunk of 6C2F.c2 (3 samples: CHUNK_COLS / 17^2), the four stages
    m, c, o, th, tw = 3, 32, 32, 16, 16
    plane, length = (th + 1) * (tw + 1), 3 * 32 * 17 * 17
    x = rng.standard_normal((m, c, 32, 32), dtype=np.float32)
    xp = np.empty((2, 2, c, m, th + 1, tw + 1), np.float32)
    e = np.empty((4, 2, length), np.float32)
    v = np.empty((16, c, m * plane), np.float32)
    u = winograd.kernel_transform(rng.standard_normal((o, c, 3, 3), dtype=np.float32))
    mt = np.empty((16, o, m * plane), np.float32)
    s = np.empty((2, 4, o * m * plane), np.float32)
    y = np.empty((m, o, 32, 32), np.float32)
    planes = _med(lambda: winograd._parity_planes(x, pads, th, tw, xp))
    vin = _med(lambda: winograd._input_transform(xp.reshape(2, 2, length), e, v.reshape(16, length), tw + 1,
                                                 length - tw - 2))
    gemm = _med(lambda: np.matmul(u, v, out=mt))
    vout = _med(lambda: winograd._output_transform(mt.reshape(16, o, m, th + 1, tw + 1), s, 0, y,
                                                   np.zeros(o, np.float32), True, np.float32(0)))
    flops = 2 * 16 * o * c * m * plane
    print(f"6C2F.c2, one chunk of {m} samples: parity planes {planes:.3f} ms, input transform {vin:.3f} ms, "
          f"16 GEMMs {gemm:.3f} ms ({flops / gemm / 1e6:.1f} GFLOP/s), output transform {vout:.3f} ms")


if __name__ == "__main__":
    main()

"""A measured candidate that did not pay (issue 10): Winograd F(2x2, 3x3) for the 3x3
stride-1 convolutions, with Numba transforms and 16 BLAS GEMMs, against the engine's
im2col conv (the numba backend's default). Correct (checked against the oracle below), but
slower: the transforms run as scalar code (Numba/LLVM did not vectorise them: 16 loads and
16 stores to rows of one array per tile), about 55 ns per tile and channel, so they cost
more than the GEMM work they save.

python bench/profile/winograd_ab.py      # 1 thread: OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1

The method (Lavin & Gray, 2016):

Each 2x2 block of outputs (a tile) is computed from the 4x4 input patch d under it as

    Y = A^T [ U (.) V ] A,    U = G g G^T (per (o, c)),    V = B^T d B (per (c, tile)),

summed over input channels c, with (.) the elementwise product of 4x4 arrays, so the 36
multiplies per tile and channel pair become 16. Summing over c turns each of the 16
positions (k, l) of the 4x4 arrays into one GEMM:

    M[k, l] (O, P) = U[k, l] (O, C) @ V[k, l] (C, P),   P = samples x tiles of a chunk,

and those 16 GEMMs (BLAS) carry the arithmetic; Numba loops do the transforms of the
input (V) and of the output (Y = A^T M A, plus bias and ReLU, written in NCHW).

    B^T = [1  0 -1  0]    G = [1    0    0  ]    A^T = [1  1  1  0]
          [0  1  1  0]        [1/2  1/2  1/2]          [0  1 -1 -1]
          [0 -1  1  0]        [1/2 -1/2  1/2]
          [0  1  0 -1]        [0    0    1  ]

Only for even output sizes (every tile whole) and pads of at most 1 (the paper's SAME
3x3 layers and their flipped-kernel grad_input). Float error: every coefficient above is
exact in binary; the transforms add at most 9 terms of the input (V) and of M (Y) per
value, so the rounding error grows by a small constant factor over the direct sum
(checked against the oracle by main() below).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kernels import buffers, threads
from kernels import numpy_backend as _npb

try:
    from numba import njit
except Exception:  # no numba: applies() says no, nothing below is called
    njit = None

# Input channels from which the Winograd path runs (K = C per GEMM: with fewer the 16
# GEMMs are too thin to beat one im2col GEMM with K = 9 C).
MIN_CHANNELS = 16
# Target columns P (samples x tiles) of one chunk's 16 GEMMs.
CHUNK_COLS = 1024


def applies(x_shape, w_shape, stride, pads) -> bool:
    """Whether conv2d(x, w, stride, pads) runs here: 3x3, stride 1, pads <= 1, even output."""
    if njit is None:
        return False
    _, c, h, wd = (int(v) for v in x_shape)
    o, _, kh, kw = (int(v) for v in w_shape)
    if (kh, kw) != (3, 3) or tuple(stride) != (1, 1) or c < MIN_CHANNELS or max(pads) > 1 or min(pads) < 0:
        return False
    oh, ow = h + pads[0] + pads[1] - 2, wd + pads[2] + pads[3] - 2
    return oh > 0 and ow > 0 and oh % 2 == 0 and ow % 2 == 0


def kernel_transform(w) -> np.ndarray:
    """w (O, C, 3, 3) -> U (16, O, C): U[4k + l] = (G w G^T)[k, l], in w's dtype."""
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=w.dtype)
    u = np.einsum("ki,ocij,lj->kloc", g, w, g)
    return np.ascontiguousarray(u.reshape(16, w.shape[0], w.shape[1]))


if njit is not None:
    @njit(cache=True)
    def _input_transform(xq, v, col0, th, tw):
        """xq (m, C, Hp, 2, Wq): padded input split into even / odd columns (xq[.., r, b, j]
        = padded pixel (r, 2j + b)); v (16, C, P) <- B^T d B of tile (ti, tj) of sample mm
        at column col0 + (mm * th + ti) * tw + tj."""
        m, c_sz = xq.shape[0], xq.shape[1]
        for mm in range(m):
            for c in range(c_sz):
                for ti in range(th):
                    base = col0 + (mm * th + ti) * tw
                    r0e, r0o = xq[mm, c, 2 * ti, 0], xq[mm, c, 2 * ti, 1]
                    r1e, r1o = xq[mm, c, 2 * ti + 1, 0], xq[mm, c, 2 * ti + 1, 1]
                    r2e, r2o = xq[mm, c, 2 * ti + 2, 0], xq[mm, c, 2 * ti + 2, 1]
                    r3e, r3o = xq[mm, c, 2 * ti + 3, 0], xq[mm, c, 2 * ti + 3, 1]
                    for tj in range(tw):
                        # rows: e_k = (B^T d)[k, :] over the 4 columns 2tj .. 2tj+3
                        a0, a1, a2, a3 = r0e[tj], r0o[tj], r0e[tj + 1], r0o[tj + 1]
                        b0, b1, b2, b3 = r1e[tj], r1o[tj], r1e[tj + 1], r1o[tj + 1]
                        c0, c1, c2, c3 = r2e[tj], r2o[tj], r2e[tj + 1], r2o[tj + 1]
                        d0, d1, d2, d3 = r3e[tj], r3o[tj], r3e[tj + 1], r3o[tj + 1]
                        e00, e01, e02, e03 = a0 - c0, a1 - c1, a2 - c2, a3 - c3
                        e10, e11, e12, e13 = b0 + c0, b1 + c1, b2 + c2, b3 + c3
                        e20, e21, e22, e23 = c0 - b0, c1 - b1, c2 - b2, c3 - b3
                        e30, e31, e32, e33 = b0 - d0, b1 - d1, b2 - d2, b3 - d3
                        # columns: V[k, :] = e_k B
                        col = base + tj
                        v[0, c, col] = e00 - e02
                        v[1, c, col] = e01 + e02
                        v[2, c, col] = e02 - e01
                        v[3, c, col] = e01 - e03
                        v[4, c, col] = e10 - e12
                        v[5, c, col] = e11 + e12
                        v[6, c, col] = e12 - e11
                        v[7, c, col] = e11 - e13
                        v[8, c, col] = e20 - e22
                        v[9, c, col] = e21 + e22
                        v[10, c, col] = e22 - e21
                        v[11, c, col] = e21 - e23
                        v[12, c, col] = e30 - e32
                        v[13, c, col] = e31 + e32
                        v[14, c, col] = e32 - e31
                        v[15, c, col] = e31 - e33

    @njit(cache=True)
    def _output_transform(mt, n0, y, b, relu, zero, th, tw):
        """mt (16, O, P) -> y[n0 + mm, o, 2ti + i, 2tj + j] = (A^T M A)[i, j] + b[o],
        max(., 0) if relu (NaN stays NaN), for the chunk's samples mm."""
        o_sz, p_sz = mt.shape[1], mt.shape[2]
        m = p_sz // (th * tw)
        for mm in range(m):
            for o in range(o_sz):
                bo = b[o]
                for ti in range(th):
                    base = (mm * th + ti) * tw
                    out0 = y[n0 + mm, o, 2 * ti]
                    out1 = y[n0 + mm, o, 2 * ti + 1]
                    for tj in range(tw):
                        col = base + tj
                        m00, m01, m02, m03 = mt[0, o, col], mt[1, o, col], mt[2, o, col], mt[3, o, col]
                        m10, m11, m12, m13 = mt[4, o, col], mt[5, o, col], mt[6, o, col], mt[7, o, col]
                        m20, m21, m22, m23 = mt[8, o, col], mt[9, o, col], mt[10, o, col], mt[11, o, col]
                        m30, m31, m32, m33 = mt[12, o, col], mt[13, o, col], mt[14, o, col], mt[15, o, col]
                        # rows: s_i = (A^T M)[i, :]
                        s00, s01, s02, s03 = m00 + m10 + m20, m01 + m11 + m21, m02 + m12 + m22, m03 + m13 + m23
                        s10, s11, s12, s13 = m10 - m20 - m30, m11 - m21 - m31, m12 - m22 - m32, m13 - m23 - m33
                        y00 = s00 + s01 + s02 + bo
                        y01 = s01 - s02 - s03 + bo
                        y10 = s10 + s11 + s12 + bo
                        y11 = s11 - s12 - s13 + bo
                        if relu:
                            y00 = max(y00, zero)
                            y01 = max(y01, zero)
                            y10 = max(y10, zero)
                            y11 = max(y11, zero)
                        out0[2 * tj] = y00
                        out0[2 * tj + 1] = y01
                        out1[2 * tj] = y10
                        out1[2 * tj + 1] = y11


def conv2d(x, w, b, pads, relu):
    """x (N, C, H, W), w (O, C, 3, 3), b (O,) or None -> y (N, O, OH, OW) (max(y, 0) if
    relu), for the shapes ``applies`` accepts (stride 1)."""
    n, c, h, wd = (int(v) for v in x.shape)
    o = int(w.shape[0])
    pt, pb, pl, pr = pads
    oh, ow = h + pt + pb - 2, wd + pl + pr - 2
    th, tw = oh // 2, ow // 2
    hp, wq = 2 * th + 2, tw + 1  # padded rows read; columns per parity
    u = kernel_transform(w)
    y = buffers.empty((n, o, oh, ow), x.dtype)
    bias = b if b is not None else np.zeros(o, x.dtype)
    zero = x.dtype.type(0)
    step = max(1, min(n, CHUNK_COLS // (th * tw)))
    t = threads.cpu_threads()
    step = max(1, min(step, -(-n // t)))  # every worker gets a chunk

    def run(starts):
        for n0 in starts:
            m = min(step, n - n0)
            xq = _npb._scratch("wg_in", (m, c, hp, 2, wq), x.dtype)
            xq.fill(0)
            # padded pixel (r, col) = input (r - pt, col - pl) goes to xq[.., r, col % 2, col // 2]
            rows = slice(pt, pt + h)
            for par in range(2):
                j0 = (par - pl) % 2  # input columns j0, j0 + 2, ... land in parity par
                cnt = (wd - j0 + 1) // 2
                if cnt > 0:
                    q0 = (pl + j0) // 2
                    xq[:, :, rows, par, q0:q0 + cnt] = x[n0:n0 + m, :, :, j0::2][:, :, :, :cnt]
            p_sz = m * th * tw
            v = _npb._scratch("wg_v", (16, c, p_sz), x.dtype)
            _input_transform(xq, v, 0, th, tw)
            mt = _npb._scratch("wg_m", (16, o, p_sz), x.dtype)
            np.matmul(u, v, out=mt)
            _output_transform(mt, n0, y, bias, relu, zero, th, tw)

    _npb._run_groups(_npb._groups(n, step), run)
    return y


def _med(fn, reps=7):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def main():
    from kernels import numba_backend, reference

    rng = np.random.default_rng(1)
    for n, c, h, w, o, pads in [(3, 16, 8, 8, 5, (1, 1, 1, 1)), (2, 17, 10, 6, 4, (0, 0, 1, 1)),
                                (2, 16, 9, 9, 3, (0, 1, 1, 0))]:
        x, wt, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((o, c, 3, 3)), rng.standard_normal(o)
        assert applies(x.shape, wt.shape, (1, 1), pads)
        err = np.abs(conv2d(x, wt, b, pads, False) - reference.conv2d(x, wt, b, (1, 1), pads)).max()
        print(f"float64 {(n, c, h, w, o, pads)}: max |winograd - oracle| = {err:.1e}")
        assert err < 1e-12
    layers = {"4C3F.c3": ((256, 32, 14, 14), (64, 32, 3, 3)), "6C2F.c2": ((256, 32, 32, 32), (32, 32, 3, 3)),
              "6C2F.c4": ((256, 32, 16, 16), (64, 32, 3, 3)), "6C2F.c5": ((256, 64, 16, 16), (64, 64, 3, 3))}
    for name, (xs, ws) in layers.items():
        x = rng.standard_normal(xs, dtype=np.float32)
        w = rng.standard_normal(ws, dtype=np.float32) * 0.1
        b = rng.standard_normal(ws[0], dtype=np.float32)
        p = (1, 1, 1, 1)
        a = [_med(lambda: numba_backend.conv2d_relu(x, w, b, (1, 1), p), 3) for _ in range(3)]
        g = [_med(lambda: conv2d(x, w, b, p, True), 3) for _ in range(3)]
        print(f"{name} forward, batch 256: im2col {statistics.median(a):.1f} ms, winograd {statistics.median(g):.1f} ms")
    # where the Winograd time goes, one chunk of 4 samples of 6C2F.c2
    m, c, o, th, tw = 4, 32, 32, 16, 16
    x = rng.standard_normal((m, c, 32, 32), dtype=np.float32)
    xq = np.zeros((m, c, 2 * th + 2, 2, tw + 1), np.float32)
    xq[:, :, 1:33, 1, 0:16] = x[:, :, :, 0::2]
    xq[:, :, 1:33, 0, 1:17] = x[:, :, :, 1::2]
    u = kernel_transform(rng.standard_normal((o, c, 3, 3), dtype=np.float32))
    v = np.empty((16, c, m * th * tw), np.float32)
    mt = np.empty((16, o, m * th * tw), np.float32)
    y = np.empty((m, o, 32, 32), np.float32)
    print("6C2F.c2, one chunk of 4 samples (x64 for the batch): input transform "
          f"{_med(lambda: _input_transform(xq, v, 0, th, tw)):.2f} ms, 16 GEMMs {_med(lambda: np.matmul(u, v, out=mt)):.2f} ms, "
          f"output transform {_med(lambda: _output_transform(mt, 0, y, np.zeros(o, np.float32), True, np.float32(0), th, tw)):.2f} ms")


if __name__ == "__main__":
    main()

"""Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions on the CPU (Lavin & Gray, 2016).

Each 2x2 block of outputs (a tile) comes from the 4x4 input patch d under it:

    Y = A^T [ U (.) V ] A,    U = G g G^T (per (o, c)),    V = B^T d B (per (c, tile)),

summed over input channels c, with (.) the elementwise product of 4x4 arrays: 16
multiplies per tile and channel pair instead of 36. Summed over c, each of the 16
positions kk = 4k + l of the 4x4 arrays is one GEMM (BLAS):

    M[kk] (O, P) = U[kk] (O, C) @ V[kk] (C, P),   P = the chunk's tiles,

and the weight gradient runs the same transforms backwards: gU[kk] = (A gY A^T)[kk] @
V[kk]^T, summed over chunks (16 GEMMs whose inner dimension is P), then gw = G^T gU G.

    B^T = [1  0 -1  0]    G = [1    0    0  ]    A^T = [1  1  1  0]
          [0  1  1  0]        [1/2  1/2  1/2]          [0  1 -1 -1]
          [0 -1  1  0]        [1/2 -1/2  1/2]
          [0  1  0 -1]        [0    0    1  ]

Layout that makes the transforms a few long vector loops: the zero-padded input is split
into its four parity planes X[rp, cp][c, s, i, j] = padded(2i + rp, 2j + cp), each
(th+1) x (tw+1) per channel and sample, flattened over (c, s, i, j). Tile (ti, tj) then
reads d[k, l] = X[k%2, l%2][q + (k//2) (tw+1) + l//2] at its flat index q, so every row
of B^T d and every column of (B^T d) B is a difference or sum of two shifted copies of
one flat array (``_lin2``): 24 contiguous loops per chunk, which LLVM vectorises. The
tiles with i = th or j = tw are junk (computed, never stored); they cost
(th+1)(tw+1) / (th tw) - 1 of extra GEMM work (13% at 32x32, 27% at 16x16).

Only for pads of 0 or 1, even output sizes and outputs large enough that the junk tiles
cost little (32x32 and up: 6C2F's second layer and its flipped-kernel grad_input, 7C1F's
first layers); ``applies`` says when, and the numba backend's batched conv2d takes this
path then. Its outputs are accurate (tests/kernels/test_winograd.py checks them against the
oracle in float32 and float64), but they are not sums of the products w x: the rounded
transforms cancel only in exact arithmetic, so the dot-product rounding bound that
certification proves with does not hold per output (a sparse, uneven kernel breaks it by
orders of magnitude), and a partial sum can overflow where the products' sum does not. The
certifier therefore runs its passes under ``kernels.direct_sums()``, which turns this path
off. A
non-finite input reaches all four outputs of every tile whose 4x4 patch holds it (one
pixel further than the 3x3 windows of a direct sum), as NaN (inf - inf in the transforms).
"""
from __future__ import annotations

import numpy as np

from . import buffers, registry, threads
from . import numpy_backend as _npb

try:
    from numba import njit, uint64
except Exception:  # no numba: applies() says no, nothing below runs
    njit = None

# Input channels from which the Winograd path runs (the GEMMs' inner dimension is C, not
# 9 C as in im2col: thin GEMMs run further below the BLAS peak).
MIN_CHANNELS = 16
# Largest ratio of computed tiles (th+1)(tw+1) to real ones th*tw: the junk tiles' GEMM
# work decides it (it passed im2col at 32x32 outputs, ratio 1.13; not at 16x16, 1.27).
MAX_TILE_RATIO = 1.15
# G of the docstring (exact in binary): U = G g G^T, and gw = G^T gU G
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
# Target tile columns (samples x (th+1)(tw+1)) of one chunk's 16 GEMMs.
CHUNK_COLS = 1024


def applies(x_shape, w_shape, stride, pads) -> bool:
    """Whether conv2d(x, w, stride, pads) runs here: 3x3, stride 1, C >= MIN_CHANNELS, pads
    of 0 or 1, an even output height and width, and few junk tiles (MAX_TILE_RATIO); never
    within ``registry.direct_sums()``."""
    if njit is None or registry.direct_sums_only():
        return False
    _, c, h, wd = (int(v) for v in x_shape)
    kh, kw = int(w_shape[2]), int(w_shape[3])
    if (kh, kw) != (3, 3) or tuple(stride) != (1, 1) or c < MIN_CHANNELS:
        return False
    if any(p not in (0, 1) for p in pads):
        return False
    oh, ow = h + pads[0] + pads[1] - 2, wd + pads[2] + pads[3] - 2
    if oh <= 0 or ow <= 0 or oh % 2 or ow % 2:
        return False
    th, tw = oh // 2, ow // 2
    return (th + 1) * (tw + 1) <= MAX_TILE_RATIO * th * tw


def kernel_transform(w) -> np.ndarray:
    """w (O, C, 3, 3) -> U (16, O, C): U[4k + l] = (G w G^T)[k, l], in w's dtype."""
    g = _G.astype(w.dtype)
    u = np.einsum("ki,ocij,lj->kloc", g, w, g)
    return np.ascontiguousarray(u.reshape(16, w.shape[0], w.shape[1]))


if njit is not None:
    @njit(cache=True, nogil=True)
    def _lin2(out, so, a, sa, ca, b, sb, cb, n):
        """out[so + q] = ca a[sa + q] + cb b[sb + q] for q < n; ca, cb are +-1 (exact).
        Unsigned offsets: Numba then emits no negative-index wraparound, and the loop
        vectorises."""
        for q in range(n):
            out[so + q] = ca * a[sa + q] + cb * b[sb + q]

    @njit(cache=True, nogil=True)
    def _lin3(out, a, ca, b, cb, c, cc, n):
        """out[q] = ca a[q] + cb b[q] + cc c[q] for q < n (ca, cb, cc = +-1)."""
        for q in range(n):
            out[q] = ca * a[q] + cb * b[q] + cc * c[q]

    @njit(cache=True, nogil=True)
    def _input_transform(x, e, v, w1, n):
        """x (2, 2, L): the parity planes, flat; e (4, 2, L) scratch; v (16, L) <- B^T d B
        at every flat tile index q < n (n + w1 + 1 <= L)."""
        one = x.dtype.type(1)
        z, o1, s = uint64(0), uint64(1), uint64(w1)
        n0, n1 = uint64(n), uint64(n + 1)
        for cp in range(2):  # rows of B^T d, for both column parities
            x0, x1 = x[0, cp], x[1, cp]
            _lin2(e[0, cp], z, x0, z, one, x0, s, -one, n1)   # d0 - d2
            _lin2(e[1, cp], z, x1, z, one, x0, s, one, n1)    # d1 + d2
            _lin2(e[2, cp], z, x0, s, one, x1, z, -one, n1)   # d2 - d1
            _lin2(e[3, cp], z, x1, z, one, x1, s, -one, n1)   # d1 - d3
        for k in range(4):  # columns: (B^T d)[k] B; column l + 2 is column l shifted by 1
            e0, e1 = e[k, 0], e[k, 1]
            _lin2(v[4 * k], z, e0, z, one, e0, o1, -one, n0)
            _lin2(v[4 * k + 1], z, e1, z, one, e0, o1, one, n0)
            _lin2(v[4 * k + 2], z, e0, o1, one, e1, z, -one, n0)
            _lin2(v[4 * k + 3], z, e1, z, one, e1, o1, -one, n0)

    @njit(cache=True, nogil=True)
    def _output_transform(mt, s, n0, y, b, relu, zero):
        """mt (16, O, m, th+1, tw+1) GEMM outputs (the last row and column of tiles junk);
        s (2, 4, O*m*(th+1)*(tw+1)) scratch ->
        y[n0 + mm, o, 2ti + i, 2tj + j] = (A^T M A)[i, j] + b[o], max(., 0) if relu (NaN
        stays NaN)."""
        one = mt.dtype.type(1)
        o_sz, m, th, tw = mt.shape[1], mt.shape[2], mt.shape[3] - 1, mt.shape[4] - 1
        n = uint64(o_sz * m * (th + 1) * (tw + 1))
        mf = mt.reshape(16, -1)
        for col in range(4):  # rows of A^T M
            _lin3(s[0, col], mf[col], one, mf[4 + col], one, mf[8 + col], one, n)
            _lin3(s[1, col], mf[4 + col], one, mf[8 + col], -one, mf[12 + col], -one, n)
        s6 = s.reshape(2, 4, o_sz, m, th + 1, tw + 1)
        for o in range(o_sz):
            bo = b[o]
            for mm in range(m):
                for ti in range(th):
                    for i in range(2):
                        out = y[n0 + mm, o, 2 * ti + i]
                        a0, a1, a2, a3 = s6[i, 0, o, mm, ti], s6[i, 1, o, mm, ti], s6[i, 2, o, mm, ti], s6[i, 3, o, mm, ti]
                        for tj in range(tw):
                            v0 = a0[tj] + a1[tj] + a2[tj] + bo
                            v1 = a1[tj] - a2[tj] - a3[tj] + bo
                            if relu:
                                if v0 < zero:
                                    v0 = zero
                                if v1 < zero:
                                    v1 = zero
                            out[2 * tj] = v0
                            out[2 * tj + 1] = v1


def _parity_planes(x, pads, th, tw, out):
    """x (m, C, H, W) -> out (2, 2, C, m, th+1, tw+1): out[rp, cp, c, s, i, j] = the
    zero-padded pixel (2i + rp, 2j + cp) of x[s, c]."""
    _, _, h, wd = x.shape
    pt, _, pl, _ = pads
    out.fill(0)
    for rp in range(2):
        r0 = (rp - pt) % 2  # first input row whose padded row has parity rp
        rows = len(range(r0, h, 2))
        i0 = (r0 + pt) // 2
        for cp in range(2):
            c0 = (cp - pl) % 2
            cols = len(range(c0, wd, 2))
            j0 = (c0 + pl) // 2
            if rows and cols:
                out[rp, cp, :, :, i0:i0 + rows, j0:j0 + cols] = x[:, :, r0::2, c0::2].transpose(1, 0, 2, 3)


def _transformed_input(xc, pads, th, tw, zero_tail):
    """xc (m, C, H, W), one chunk -> V (16, C, m (th+1)(tw+1)) in scratch: B^T d B of every
    tile of the wide grid. The last tw + 2 flat tiles would read past the parity planes;
    they are junk tiles (the last plane's row th) and are left as they are, or zeroed
    where ``zero_tail`` (when they enter a sum rather than outputs that are never stored)."""
    m, c = int(xc.shape[0]), int(xc.shape[1])
    length = c * m * (th + 1) * (tw + 1)
    xp = _npb._scratch("wg_x", (2, 2, c, m, th + 1, tw + 1), xc.dtype)
    _parity_planes(xc, pads, th, tw, xp)
    e = _npb._scratch("wg_e", (4, 2, length), xc.dtype)
    v = _npb._scratch("wg_v", (16, c, length // c), xc.dtype)
    last = length - tw - 2
    if zero_tail:
        v.reshape(16, length)[:, last:] = 0
    _input_transform(xp.reshape(2, 2, length), e, v.reshape(16, length), tw + 1, last)
    return v


def conv2d(x, w, b, pads, relu):
    """x (N, C, H, W), w (O, C, 3, 3), b (O,) or None -> y (N, O, OH, OW), max(y, 0) if
    relu; stride 1, for the shapes ``applies`` accepts."""
    n = int(x.shape[0])
    o = int(w.shape[0])
    oh = int(x.shape[2]) + pads[0] + pads[1] - 2
    ow = int(x.shape[3]) + pads[2] + pads[3] - 2
    th, tw = oh // 2, ow // 2
    plane = (th + 1) * (tw + 1)  # flat size of one parity plane (wide grid of tiles)
    u = kernel_transform(w)
    y = buffers.empty((n, o, oh, ow), x.dtype)
    bias = b if b is not None else np.zeros(o, x.dtype)
    zero = x.dtype.type(0)
    step = max(1, min(n, CHUNK_COLS // plane, -(-n // threads.cpu_threads())))

    def run(starts):
        for n0 in starts:
            m = min(step, n - n0)
            v = _transformed_input(x[n0:n0 + m], pads, th, tw, False)
            mt = _npb._scratch("wg_m", (16, o, m * plane), x.dtype)
            np.matmul(u, v, out=mt)
            s = _npb._scratch("wg_s", (2, 4, o * m * plane), x.dtype)
            _output_transform(mt.reshape(16, o, m, th + 1, tw + 1), s, n0, y, bias, relu, zero)

    _npb._run_groups(_npb._groups(n, step), run)
    return y


def _tile_grads(gy, n0, m, th, tw, out):
    """out (2, 2, O, m, th+1, tw+1): out[i, j, o, s, ti, tj] = gy[n0 + s, o, 2ti + i, 2tj + j],
    the junk tiles (ti = th or tj = tw) 0."""
    out[:, :, :, :, th, :] = 0
    out[:, :, :, :, :, tw] = 0
    for i in range(2):
        for j in range(2):
            out[i, j, :, :, :th, :tw] = gy[n0:n0 + m, :, i::2, j::2].transpose(1, 0, 2, 3)


def _grad_transform(g, gm):
    """g (2, 2, R) tile gradients (the 2x2 outputs of every tile, flat) -> gm (16, R) =
    A gY A^T, the adjoint of the output transform: with A^T's rows (1 1 1 0) and
    (0 1 -1 -1), row k of A gY is (g0j, g0j + g1j, g0j - g1j, -g1j)[k], and likewise
    for the columns."""
    g00, g01, g10, g11 = g[0, 0], g[0, 1], g[1, 0], g[1, 1]
    rows = ((g00, g01), (g00 + g10, g01 + g11), (g00 - g10, g01 - g11), (-g10, -g11))
    for k, (r0, r1) in enumerate(rows):
        gm[4 * k] = r0
        np.add(r0, r1, out=gm[4 * k + 1])
        np.subtract(r0, r1, out=gm[4 * k + 2])
        np.negative(r1, out=gm[4 * k + 3])


def grad_weight(x, gy, pads):
    """x (N, C, H, W), gy (N, O, OH, OW) -> gw (O, C, 3, 3): the weight gradient of
    ``conv2d``, by the same transforms: gU[kk] = sum over tiles of (A gY A^T)[kk] V[kk]^T
    (16 GEMMs whose inner dimension is the chunk's tiles), then gw = G^T gU G."""
    n, c = int(x.shape[0]), int(x.shape[1])
    o = int(gy.shape[1])
    th, tw = int(gy.shape[2]) // 2, int(gy.shape[3]) // 2
    plane = (th + 1) * (tw + 1)
    step = max(1, min(n, CHUNK_COLS // plane, -(-n // threads.cpu_threads())))

    def run(starts):  # one accumulator per group, summed in group order (deterministic)
        gu = np.zeros((16, o, c), x.dtype)
        for n0 in starts:
            m = min(step, n - n0)
            # the junk tiles meet zero tile gradients in the GEMM: they must be finite
            v = _transformed_input(x[n0:n0 + m], pads, th, tw, True)
            gt = _npb._scratch("wg_g", (2, 2, o, m, th + 1, tw + 1), x.dtype)
            _tile_grads(gy, n0, m, th, tw, gt)
            gm = _npb._scratch("wg_m", (16, o, m * plane), x.dtype)
            _grad_transform(gt.reshape(2, 2, -1), gm.reshape(16, -1))
            part = _npb._scratch("wg_u", (16, o, c), x.dtype)
            np.matmul(gm, v.transpose(0, 2, 1), out=part)
            gu += part
        return gu

    parts = _npb._run_groups(_npb._groups(n, step), run)
    gu = parts[0]
    for other in parts[1:]:
        gu += other
    g = _G.astype(x.dtype)
    return np.ascontiguousarray(np.einsum("ka,klod,lb->odab", g, gu.reshape(4, 4, o, c), g))

"""The ``numba`` backend: Numba CPU loops for data movement, BLAS for the GEMMs.

Batched convolutions (the CPU default for the conv ops) run the numpy backend's wide-row
GEMMs (``numpy_backend.conv_wide``) and move each chunk's output with one jitted pass: drop
the junk columns, transpose to NCHW, add the bias and apply the ReLU together, and for a
stride-s grad_input (space-to-depth route) scatter the phases straight into gx. Where the
numpy backend runs the same GEMMs the results are its own bit for bit (it runs convs with
few patch rows as per-sample GEMMs instead). 3x3 stride-1 layers with large outputs run
Winograd F(2x2,3x3) (kernels/winograd.py) unless within ``registry.direct_sums()``.

The batch-1 convs (the power method's iterates) are lowered to GEMMs over an im2col
matrix ``cols (K, nb*P)`` with K = C*kh*kw (row r = (c, p, q)) and column
m*P + i*OW + j for sample m of a chunk of ``nb`` samples and output pixel (i, j),
P = OH*OW. Numba builds and scatters those matrices (``prange``, vectorisable
inner loops over output columns); the GEMMs go to BLAS through ``np.dot``:

    conv2d:             Y (O, nb*P)  = W (O, K) @ cols        -> y[n, o, :] (+ b)
    conv2d_grad_input:  G (K, nb*P)  = W^T @ gy^T (O, nb*P)    -> col2im -> gx

With a single-sample chunk (nb = 1) the (O, P) matrices are the NCHW sample itself, so
the GEMM reads/writes it in place. conv2d_grad_weight is the numpy backend's, or Winograd's
where the forward runs Winograd.

im2col moves whole blocks, not elements: for stride-1 convs whose output width
equals the input width (SAME), a patch row is the flat input plane shifted by a
constant, i.e. one contiguous copy plus zeroed edge columns; otherwise one 2-D
strided block copy per (sample, patch row). col2im adds with explicit row loops
(a sliced ``+=`` in Numba builds a temporary), one task per (sample, channel). Every loop nest is compiled
twice (_Twin): small work runs the serial copy, with no parallel launch.

Dense layers are one BLAS call each; MinMax is a Numba loop over channel pairs.
Every array keeps the input dtype (float32 stays float32). Inputs arrive
validated by kernels/api.py: ``stride`` = (sh, sw), ``pads`` = (top, bottom,
left, right).
"""
from __future__ import annotations

import functools
import types

import numpy as np

from . import buffers
from . import numpy_backend as _numpy_backend
from . import winograd as _winograd
from .threads import single_blas_thread as _single_blas_thread
from .registry import register

try:
    from numba import njit, prange

    _WHY = None
except Exception as exc:  # no numba: the module still imports, the backend reports why
    _WHY = f"numba is not importable: {type(exc).__name__}: {exc}"
    prange = range

    def njit(*args, **kwargs):
        return (lambda fn: fn) if not args or not callable(args[0]) else args[0]


def availability() -> str | None:
    """None when the backend is usable, else the reason it is not."""
    return _WHY


# Elements of one im2col chunk: ~4 MiB of float32 (K*nb*P <= this, nb >= 1).
_CHUNK_ELEMS = 1 << 20
# Loops moving fewer elements than this run serially: a parallel launch costs more than
# it saves on them (the power method's batch-1 iterates), and it hands the cores back and
# forth with BLAS's threads.
_PAR_MIN_ELEMS = 1 << 18


class _Twin:
    """One loop nest compiled twice: ``par`` (parallel=True) and ``ser`` (prange = range).

    ``twin(work, *args)`` runs ``par`` when ``work`` >= _PAR_MIN_ELEMS, else ``ser``. The
    serial copy gets its own qualified name so the two on-disk caches do not collide.
    """

    def __init__(self, fn):
        ser = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
        ser.__qualname__ = fn.__qualname__ + "_serial"
        ser.__doc__ = fn.__doc__
        self.par = njit(parallel=True, cache=True)(fn)
        self.ser = njit(cache=True)(ser)
        self.__doc__ = fn.__doc__

    def __call__(self, work, *args):
        return (self.par if work >= _PAR_MIN_ELEMS else self.ser)(*args)


# ---------------------------------------------------------------- conv helpers (jitted)

@_Twin
def _im2col(x, n0, cols, kh, kw, sh, sw, pt, pl, oh, ow):
    """x (N, C, H, W) -> cols (C*kh*kw, nb*OH*OW) for samples n0 .. n0+nb-1 (zero padding)."""
    _, c_in, h, w = x.shape
    p_sz = oh * ow
    nb = cols.shape[1] // p_sz
    for t in prange(c_in * kh * kw * nb):
        r = t // nb
        m = t - r * nb
        c = r // (kh * kw)
        p = (r // kw) % kh
        q = r % kw
        # output columns j whose input column j*sw + q - pl lies inside [0, w)
        j_lo = (pl - q + sw - 1) // sw if pl > q else 0
        j_hi = min(ow, (w - 1 - q + pl) // sw + 1)
        if j_hi < j_lo:
            j_hi = j_lo
        w_lo = j_lo * sw + q - pl  # first input column read (when j_lo < j_hi)
        w_hi = (j_hi - 1) * sw + q - pl + 1
        row = cols[r]
        i_lo = max(0, pt - p)  # output rows whose input row is inside (stride 1)
        i_hi = min(oh, h - p + pt)
        if sh == 1 and sw == 1 and ow == w and i_lo < i_hi and j_lo < j_hi:
            # stride-1 SAME: the patch row is the flat input plane shifted by delta, so the
            # rows i_lo..i_hi-1 are one contiguous copy; only the wrapped-around edge
            # columns and the out-of-image rows are then overwritten with zeros.
            base = m * p_sz
            delta = (p - pt) * w + (q - pl)
            xs = x[n0 + m, c].reshape(h * w)
            a = i_lo * ow + j_lo
            b = (i_hi - 1) * ow + j_hi
            row[base:base + a] = 0
            row[base + a:base + b] = xs[a + delta:b + delta]
            row[base + b:base + p_sz] = 0
            for i in range(i_lo, i_hi):
                for j in range(j_lo):
                    row[base + i * ow + j] = 0
                for j in range(j_hi, ow):
                    row[base + i * ow + j] = 0
            continue
        # general stride: one 2-D strided copy of the valid block, zeros around it
        i_lo = (pt - p + sh - 1) // sh if pt > p else 0
        i_hi = min(oh, (h - 1 - p + pt) // sh + 1)
        blk = row[m * p_sz:(m + 1) * p_sz].reshape(oh, ow)
        if i_hi <= i_lo or j_hi <= j_lo:
            blk[:, :] = 0
            continue
        blk[:i_lo, :] = 0
        blk[i_hi:, :] = 0
        blk[i_lo:i_hi, :j_lo] = 0
        blk[i_lo:i_hi, j_hi:] = 0
        h_lo = i_lo * sh + p - pt
        h_hi = (i_hi - 1) * sh + p - pt + 1
        blk[i_lo:i_hi, j_lo:j_hi] = x[n0 + m, c, h_lo:h_hi:sh, w_lo:w_hi:sw]


@_Twin
def _col2im(gcols, n0, gx, kh, kw, sh, sw, pt, pl, oh, ow):
    """Adjoint of _im2col: gx[n0+m] = sum of gcols entries over the patches that read each pixel.

    Overwrites samples n0 .. n0+nb-1 of gx (N, C, H, W); one task per (sample, channel)
    plane, so the scatter-adds never race.
    """
    _, c_in, h, w = gx.shape
    p_sz = oh * ow
    nb = gcols.shape[1] // p_sz
    for t in prange(nb * c_in):
        m = t // c_in
        c = t - m * c_in
        plane = gx[n0 + m, c]
        plane[:, :] = 0
        base = m * p_sz
        for p in range(kh):
            for q in range(kw):
                r = (c * kh + p) * kw + q
                j_lo = (pl - q + sw - 1) // sw if pl > q else 0
                j_hi = min(ow, (w - 1 - q + pl) // sw + 1)
                if j_hi <= j_lo:
                    continue
                i_lo = (pt - p + sh - 1) // sh if pt > p else 0
                i_hi = min(oh, (h - 1 - p + pt) // sh + 1)
                # explicit loops: a sliced "+=" would build a temporary per row block
                for i in range(i_lo, i_hi):
                    prow = plane[i * sh + p - pt]
                    src = gcols[r, base + i * ow:base + (i + 1) * ow]
                    if sw == 1:  # unit stride: a plain vectorisable loop
                        off = q - pl
                        for j in range(j_lo, j_hi):
                            prow[j + off] += src[j]
                    else:
                        for j in range(j_lo, j_hi):
                            prow[j * sw + q - pl] += src[j]


@_Twin
def _cols_to_nchw(ymat, n0, y, b, has_bias):
    """ymat (O, nb*P) -> y[n0+m, o, :] = ymat[o, m*P:(m+1)*P] (+ b[o]); y is (N, O, P)."""
    o_sz = y.shape[1]
    p_sz = y.shape[2]
    nb = ymat.shape[1] // p_sz
    for t in prange(nb * o_sz):
        m = t // o_sz
        o = t - m * o_sz
        bo = b[o] if has_bias else 0
        for k in range(p_sz):
            y[n0 + m, o, k] = ymat[o, m * p_sz + k] + bo


@_Twin
def _nchw_to_cols(g, n0, gmat):
    """g (N, O, P) -> gmat (O, nb*P) with gmat[o, m*P + k] = g[n0+m, o, k]."""
    o_sz = g.shape[1]
    p_sz = g.shape[2]
    nb = gmat.shape[1] // p_sz
    for t in prange(nb * o_sz):
        m = t // o_sz
        o = t - m * o_sz
        for k in range(p_sz):
            gmat[o, m * p_sz + k] = g[n0 + m, o, k]


@_Twin
def _add_bias(y, b):
    """y (N, O, P) += b[o], in place."""
    n_sz, o_sz, p_sz = y.shape
    for t in prange(n_sz * o_sz):
        n = t // o_sz
        o = t - n * o_sz
        bo = b[o]
        for k in range(p_sz):
            y[n, o, k] += bo


# ---------------------------------------------------------------- MinMax (jitted)

@_Twin
def _minmax(x, y):
    """x, y (N, C, S): channels (2k, 2k+1) -> (min, max); a NaN in a pair gives (NaN, NaN)."""
    n_sz, c_sz, s_sz = x.shape
    half = c_sz // 2
    for t in prange(n_sz * half):
        n = t // half
        k2 = 2 * (t - n * half)
        for s in range(s_sz):
            a = x[n, k2, s]
            b = x[n, k2 + 1, s]
            if a <= b:
                y[n, k2, s] = a
                y[n, k2 + 1, s] = b
            elif b < a:
                y[n, k2, s] = b
                y[n, k2 + 1, s] = a
            else:  # unordered: NaN, as np.minimum/np.maximum give
                y[n, k2, s] = a + b
                y[n, k2 + 1, s] = a + b


@_Twin
def _minmax_grad(x, gy, gx):
    """x, gy, gx (N, C, S): gy[2k] to the argmin, gy[2k+1] to the argmax; ties keep order."""
    n_sz, c_sz, s_sz = x.shape
    half = c_sz // 2
    for t in prange(n_sz * half):
        n = t // half
        k2 = 2 * (t - n * half)
        for s in range(s_sz):
            if x[n, k2, s] <= x[n, k2 + 1, s]:
                gx[n, k2, s] = gy[n, k2, s]
                gx[n, k2 + 1, s] = gy[n, k2 + 1, s]
            else:
                gx[n, k2, s] = gy[n, k2 + 1, s]
                gx[n, k2 + 1, s] = gy[n, k2, s]


@_Twin
def _minmax_pairs(x, y):
    """x, y flat (2M,) with pairs (2i, 2i+1) adjacent, as in (N, C) features: (min, max)."""
    for i in prange(x.shape[0] // 2):
        a = x[2 * i]
        b = x[2 * i + 1]
        if a <= b:
            y[2 * i] = a
            y[2 * i + 1] = b
        elif b < a:
            y[2 * i] = b
            y[2 * i + 1] = a
        else:
            y[2 * i] = a + b
            y[2 * i + 1] = a + b


@_Twin
def _minmax_grad_pairs(x, gy, gx):
    """Flat (2M,) version of _minmax_grad for adjacent pairs."""
    for i in prange(x.shape[0] // 2):
        if x[2 * i] <= x[2 * i + 1]:
            gx[2 * i] = gy[2 * i]
            gx[2 * i + 1] = gy[2 * i + 1]
        else:
            gx[2 * i] = gy[2 * i + 1]
            gx[2 * i + 1] = gy[2 * i]


# ---------------------------------------------------------------- registered wrappers

def _one_blas_thread(fn):
    """Run ``fn`` with OpenBLAS pinned to one thread: a multi-threaded np.dot leaves
    OpenBLAS's workers busy-waiting ~0.1 s afterwards, which halved the speed of whatever
    ran next (the numpy backend's split convs, other processes); the Numba loops here are
    the parallel part (policy: kernels/threads.py)."""
    @functools.wraps(fn)
    def pinned(*args):
        with _single_blas_thread():
            return fn(*args)

    return pinned


def _chunk(n, k, p):
    """Samples per im2col chunk: keep K*nb*P near _CHUNK_ELEMS, at least 1."""
    return max(1, min(n, _CHUNK_ELEMS // max(1, k * p)))


def _out_hw(h, w, kh, kw, stride, pads):
    pt, pb, pl, pr = pads
    return (h + pt + pb - kh) // stride[0] + 1, (w + pl + pr - kw) // stride[1] + 1


def _conv2d_cols(x, w, b, stride, pads):
    """x (N, C, H, W), w (O, C, kh, kw), b (O,) or None -> y (N, O, OH, OW), by the
    (K, nb*P) im2col above (the batch-1 power iterates)."""
    x = np.ascontiguousarray(x)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    sh, sw = stride
    oh, ow = _out_hw(h, wd, kh, kw, stride, pads)
    k, p = c * kh * kw, oh * ow
    wmat = np.ascontiguousarray(w).reshape(o, k)
    y = np.empty((n, o, p), dtype=x.dtype)
    nb = _chunk(n, k, p)
    # the jitted scatter takes an array either way (one signature); unused when b is None
    bias = np.ascontiguousarray(b) if b is not None else np.zeros(o, dtype=x.dtype)
    cols = np.empty((k, nb * p), dtype=x.dtype)
    ymat = np.empty((o, nb * p), dtype=x.dtype) if nb > 1 else None
    for n0 in range(0, n, nb):
        m = min(nb, n - n0)
        cm = cols if m == nb else np.empty((k, m * p), dtype=x.dtype)  # last, shorter chunk
        # a batch of one (the power iterates) always runs the serial loops: a parallel launch
        # between BLAS calls stalls for whole time slices on a loaded machine
        _im2col(cm.size if n > 1 else 0, x, n0, cm, kh, kw, sh, sw, pads[0], pads[2], oh, ow)
        if n == 1:  # the power iterates: one BLAS thread (no barrier per small GEMM)
            with _single_blas_thread():
                np.dot(wmat, cm, out=y[n0])
        elif nb == 1:
            np.dot(wmat, cm, out=y[n0])  # (O, P) is the sample itself
        else:
            ym = ymat if m == nb else np.empty((o, m * p), dtype=x.dtype)
            np.dot(wmat, cm, out=ym)
            _cols_to_nchw(ym.size, ym, n0, y, bias, b is not None)
    if nb == 1 and b is not None:
        _add_bias(y.size if n > 1 else 0, y, bias)
    return y.reshape(n, o, oh, ow)


def _conv2d_grad_input_cols(gy, w, x_shape, stride, pads):
    """gy (N, O, OH, OW), w (O, C, kh, kw) -> gx of exactly ``x_shape`` (N, C, H, W), by
    GEMM + the col2im above (the batch-1 power iterates)."""
    n, c, h, wd = x_shape
    o, _, kh, kw = w.shape
    sh, sw = stride
    oh, ow = gy.shape[2], gy.shape[3]
    k, p = c * kh * kw, oh * ow
    g3 = np.ascontiguousarray(gy).reshape(n, o, p)
    wmat_t = np.ascontiguousarray(w).reshape(o, k).T  # (K, O) view: BLAS transposes it
    gx = np.empty((n, c, h, wd), dtype=gy.dtype)
    nb = _chunk(n, k, p)
    gcols = np.empty((k, nb * p), dtype=gy.dtype)
    gmat = np.empty((o, nb * p), dtype=gy.dtype) if nb > 1 else None
    for n0 in range(0, n, nb):
        m = min(nb, n - n0)
        if nb == 1:
            gm, gc = g3[n0], gcols
        elif m == nb:
            gm, gc = gmat, gcols
        else:
            gm, gc = np.empty((o, m * p), dtype=gy.dtype), np.empty((k, m * p), dtype=gy.dtype)
        if nb > 1:
            _nchw_to_cols(gm.size, g3, n0, gm)
        if n == 1:  # (see conv2d)
            with _single_blas_thread():
                np.dot(wmat_t, gm, out=gc)
        else:
            np.dot(wmat_t, gm, out=gc)
        _col2im(gc.size if n > 1 else 0, gc, n0, gx, kh, kw, sh, sw, pads[0], pads[2], oh, ow)  # (see conv2d)
    return gx


@register("conv2d_grad_weight", "numba")
def conv2d_grad_weight(x, gy, w_shape, stride, pads):
    """x (N, C, H, W), gy (N, O, OH, OW) -> gw (O, C, kh, kw): Winograd where the forward
    takes it (kernels/winograd.py), else the numpy backend's im2col GEMMs."""
    if x.shape[0] > 1 and _winograd.applies(x.shape, w_shape, stride, pads):
        return _winograd.grad_weight(x, gy, pads)
    return _numpy_backend.conv2d_grad_weight(x, gy, w_shape, stride, pads)


# ---------------------------------------------------------------- batched convs
# A batch runs the numpy backend's wide-row GEMMs (numpy_backend.conv_wide: im2col by
# contiguous block copies, chunks split over the worker threads) with the output moved
# by one jitted pass per chunk instead of NumPy's transpose, bias add and ReLU passes, and
# a stride-s grad_input's depth-to-space done in that same pass. The passes run serially:
# they are called in the worker threads, one chunk each.

@njit(cache=True, nogil=True)
def _wide_to_nchw(yc, n0, y, b, relu, zero):
    """yc (O, m, OH, WPH) -> y[n0 + mm, o, i, j] = yc[o, mm, i, j] + b[o], then max(., 0)
    if relu (NaN stays NaN); the WPH - OW junk columns are dropped. ``zero`` is a 0 of
    y's dtype (keeps the arithmetic in that dtype)."""
    o_sz, m, oh, _ = yc.shape
    ow = y.shape[3]
    for mm in range(m):
        for o in range(o_sz):
            bo = b[o]
            for i in range(oh):
                src = yc[o, mm, i]
                dst = y[n0 + mm, o, i]
                for j in range(ow):
                    v = src[j] + bo
                    if relu and v < zero:
                        v = zero
                    dst[j] = v


@njit(cache=True, nogil=True)
def _wide_to_d2s(yc, n0, gx, sh, sw, spans_r, spans_c):
    """Depth-to-space from the inner conv's wide rows: yc (C*sh*sw, m, HZ, WPH), channel
    (c, a, b) -> gx[n0 + mm, c, r0_a + sh*ii, c0_b + sw*jj] = yc[(c, a, b), mm, i0_a + ii,
    j0_b + jj] for the spans' (i0, r0, count) rows (phase a) and columns (phase b)."""
    m = yc.shape[1]
    c_sz = gx.shape[1]
    for mm in range(m):
        for c in range(c_sz):
            out = gx[n0 + mm, c]
            for a in range(sh):
                i0, r0, ci = spans_r[a, 0], spans_r[a, 1], spans_r[a, 2]
                for ii in range(ci):
                    row = out[r0 + sh * ii]
                    for bb in range(sw):
                        j0, c0, cj = spans_c[bb, 0], spans_c[bb, 1], spans_c[bb, 2]
                        src = yc[(c * sh + a) * sw + bb, mm, i0 + ii]
                        for jj in range(cj):
                            row[c0 + sw * jj] = src[j0 + jj]


# the batch-1 (power iterate) paths with OpenBLAS pinned to one thread
_conv2d_cols_1 = _one_blas_thread(_conv2d_cols)
_conv2d_grad_input_cols_1 = _one_blas_thread(_conv2d_grad_input_cols)


def _conv2d_batch(x, w, b, stride, pads, relu):
    if _winograd.applies(x.shape, w.shape, stride, pads):
        return _winograd.conv2d(x, w, b, pads, relu)
    # also for few patch rows (the first layers), where the numpy backend runs per-sample
    # GEMMs instead: with this output pass the wide layout is the faster one there too
    g = _numpy_backend._Geom(x.shape, w.shape, stride, pads)
    y = buffers.empty((x.shape[0], g.o, g.oh, g.ow), x.dtype)
    bias = b if b is not None else np.zeros(g.o, x.dtype)  # + 0: the value (a -0 becomes +0)
    zero = x.dtype.type(0)

    def store(yc, n0, m):
        _wide_to_nchw(yc.reshape(g.o, m, g.oh, g.wph), n0, y, bias, relu, zero)

    _numpy_backend.conv_wide(x, w, stride, pads, store)
    return y


@register("conv2d", "numba")
def conv2d(x, w, b, stride, pads):
    """x (N, C, H, W), w (O, C, kh, kw), b (O,) or None -> y (N, O, OH, OW)."""
    if x.shape[0] == 1:
        return _conv2d_cols_1(x, w, b, stride, pads)
    return _conv2d_batch(x, w, b, stride, pads, False)


@register("conv2d_relu", "numba")
def conv2d_relu(x, w, b, stride, pads):
    """relu(conv2d(x, w, b)), the ReLU in the output pass (NaN stays NaN)."""
    if x.shape[0] == 1:
        y = _conv2d_cols_1(x, w, b, stride, pads)
        return np.maximum(y, y.dtype.type(0), out=y)
    return _conv2d_batch(x, w, b, stride, pads, True)


@register("conv2d_grad_input", "numba")
def conv2d_grad_input(gy, w, x_shape, stride, pads):
    """gy (N, O, OH, OW), w (O, C, kh, kw) -> gx of exactly ``x_shape`` (N, C, H, W).

    A batch takes the numpy backend's routes (stride 1: the flipped-kernel conv; stride s
    dividing the kernel: space-to-depth) with this backend's output passes."""
    if gy.shape[0] == 1:
        return _conv2d_grad_input_cols_1(gy, w, x_shape, stride, pads)
    nb = _numpy_backend
    route = nb.grad_input_route(w, stride, pads)
    if route is not None and route[0] == "flip":
        return _conv2d_batch(gy, route[1], None, (1, 1), route[2], False)
    if route is not None:
        wt, inner_pads, spans_r, spans_c, covered = nb.s2d_plan(w, x_shape, stride, pads)
        g = nb._Geom(gy.shape, wt.shape, (1, 1), inner_pads)
        gx = (buffers.empty if covered else buffers.zeros)(tuple(int(v) for v in x_shape), gy.dtype)
        sr, sc = np.array(spans_r, np.int64), np.array(spans_c, np.int64)
        sh, sw = stride

        def store(yc, n0, m):
            _wide_to_d2s(yc.reshape(g.o, m, g.oh, g.wph), n0, gx, sh, sw, sr, sc)

        nb.conv_wide(gy, wt, (1, 1), inner_pads, store)
        return gx
    return nb.conv2d_grad_input(gy, w, x_shape, stride, pads)


# Dense is one GEMM either way: the numba backend registers the numpy backend's (rows split
# over Python threads with 1 BLAS thread each; a plain 2-thread np.dot left OpenBLAS's
# workers busy-waiting ~0.1 s, halving the next op).
for _op in ("dense", "dense_grad_input", "dense_grad_weight"):
    register(_op, "numba")(getattr(_numpy_backend, _op))


def _as3(a):
    """(N, C, ...) -> contiguous (N, C, S) view/copy; S = 1 for (N, C)."""
    a = np.ascontiguousarray(a)
    return a.reshape(a.shape[0], a.shape[1], -1)


@register("minmax", "numba")
def minmax(x):
    """x (N, C, ...) with C even -> same shape; channels (2k, 2k+1) become (min, max)."""
    x3 = _as3(x)
    y = buffers.empty(x3.shape, x3.dtype)
    if x3.shape[2] == 1:  # (N, C) features: pairs are adjacent, one flat loop
        _minmax_pairs(x3.size, x3.reshape(-1), y.reshape(-1))
    else:
        _minmax(x3.size, x3, y)
    return y.reshape(x.shape)


@register("minmax_grad", "numba")
def minmax_grad(x, gy):
    """x, gy (N, C, ...) -> gx: gy[2k] to the argmin, gy[2k+1] to the argmax (ties: in order)."""
    x3 = _as3(x)
    g3 = _as3(gy)
    gx = buffers.empty(g3.shape, g3.dtype)
    if x3.shape[2] == 1:
        _minmax_grad_pairs(x3.size, x3.reshape(-1), g3.reshape(-1), gx.reshape(-1))
    else:
        _minmax_grad(x3.size, x3, g3, gx)
    return gx.reshape(x.shape)


# ---------------------------------------------------------------- ReLU gradient (jitted)

@njit(cache=True)
def _relu_grad(out, gy, gx):
    """Flat arrays: gx = gy where out > 0, else 0 (NaN in ``out`` gives 0, as np.where)."""
    for i in range(out.shape[0]):
        gx[i] = gy[i] if out[i] > 0 else 0


@register("relu_grad", "numba")
def relu_grad(out, gy):
    """out = relu(x), gy (same shape) -> gx = gy where out > 0, else 0.

    One fused pass (np.where(out > 0, gy, 0) builds a bool mask and, on this numpy,
    takes a slow masked path: measured 10x slower at 6.4M float32).
    """
    o = np.ascontiguousarray(out).reshape(-1)
    g = np.ascontiguousarray(gy).reshape(-1)
    gx = buffers.empty(g.shape, gy.dtype)
    # serial: one memory-bound pass gains little from a second thread, and a parallel
    # launch between BLAS calls stalls on a loaded machine
    _relu_grad(o, g, gx)
    return gx.reshape(gy.shape)


@njit(cache=True, fastmath={"reassoc"})
def _relu_grad_bias(out, gy, gx, gb):
    """(N, C, P) arrays: gx = gy where out > 0, else 0; gb[c] = sum of gx[:, c] in float64
    (reassoc: the per-channel sums vectorise; the order is fixed, so results repeat)."""
    n, c, p = out.shape
    for j in range(c):
        gb[j] = 0.0
    for i in range(n):
        for j in range(c):
            s = 0.0
            for k in range(p):
                v = gy[i, j, k] if out[i, j, k] > 0 else 0
                gx[i, j, k] = v
                s += np.float64(v)
            gb[j] += s


@register("relu_grad_bias", "numba")
def relu_grad_bias(out, gy):
    """out = relu(x) (N, C, ...), gy (same shape) -> (relu_grad(out, gy), its sum over every
    axis but 1 (C,)): a conv or dense layer's pre-activation gradient and bias gradient in
    one pass (the separate gy.sum(axis=(0, 2, 3)) took 0.4-1.1 ms per conv layer at batch 256).
    """
    n, c = gy.shape[0], gy.shape[1]
    o = np.ascontiguousarray(out).reshape(n, c, -1)
    g = np.ascontiguousarray(gy).reshape(n, c, -1)
    gx = buffers.empty(g.shape, gy.dtype)
    gb = np.empty(c, dtype=np.float64)
    _relu_grad_bias(o, g, gx, gb)
    return gx.reshape(gy.shape), gb.astype(gy.dtype)


# ---------------------------------------------------------------- fused power steps (jitted)
# The power method runs ~10 steps per layer and training step on batch-1 iterates, where
# the ~20-40 us of Python per op call (dispatch, buffers, BLAS pinning) outweighs the small
# GEMMs. One jitted call runs all the steps of a layer: the same im2col / GEMM / col2im as
# the separate ops, with norms summed in float64.

_im2col_ser, _col2im_ser = _im2col.ser, _col2im.ser  # plain dispatchers: callable from jitted code


@njit(cache=True)
def _sumsq64(a):
    """Sum of squares of a contiguous array, accumulated in float64."""
    s = 0.0
    for v in a.ravel():
        d = np.float64(v)  # (Numba's float() keeps float32: squares of 1e-30 would be 0)
        s += d * d
    return s


@njit(cache=True)
def _normalize(a):
    """a /= ||a|| in place (the norm summed in float64, then rounded to a's dtype, as
    ``a /= a.dtype.type(nrm)``); False, a untouched, when the norm is exactly 0."""
    nrm = np.sqrt(_sumsq64(a))
    if nrm == 0.0:
        return False
    d = np.empty(1, a.dtype)
    d[0] = nrm
    a /= d[0]
    return True


@njit(cache=True, nogil=True)  # nogil: layers' loops may run concurrently (lipschitz.power_update_layers)
def _conv_power_loop(v, wmat, wmat_t, iters, kh, kw, sh, sw, pt, pl, oh, ow):
    """``iters`` steps v <- A^T (A v / ||A v||) / ||.|| for the conv A; v (1, C, H, W).

    Returns (v, ok): ok False when a norm was exactly 0 (v is then the last iterate).
    """
    c, h, w = v.shape[1], v.shape[2], v.shape[3]
    k = wmat.shape[1]
    p = oh * ow
    cols = np.empty((k, p), v.dtype)
    for _ in range(iters):
        _im2col_ser(v, 0, cols, kh, kw, sh, sw, pt, pl, oh, ow)
        u = np.dot(wmat, cols)
        if not _normalize(u):
            return v, False
        z = np.empty((1, c, h, w), v.dtype)
        _col2im_ser(np.dot(wmat_t, u), 0, z, kh, kw, sh, sw, pt, pl, oh, ow)
        if not _normalize(z):
            return v, False
        v = z
    return v, True


@njit(cache=True, nogil=True)
def _dense_power_loop(v, w, iters):
    """``iters`` steps v <- W^T (W v / ||W v||) / ||.||; v (I,), w (O, I) contiguous."""
    for _ in range(iters):
        u = np.dot(w, v)
        if not _normalize(u):
            return v, False
        z = np.dot(u, w)
        if not _normalize(z):
            return v, False
        v = z
    return v, True


@register("conv2d_power_steps", "numba")
@_one_blas_thread
def conv2d_power_steps(v, w, iters, stride, pads):
    """v (1, C, H, W), w (O, C, kh, kw) -> (v after ``iters`` power steps of the conv, ok).

    ok is False when A v or A^T u was exactly 0; v is then the last iterate before it.
    """
    _, c, h, wd = v.shape
    o, _, kh, kw = w.shape
    oh, ow = _out_hw(h, wd, kh, kw, stride, pads)
    wmat = np.ascontiguousarray(w).reshape(o, c * kh * kw)
    out, ok = _conv_power_loop(np.ascontiguousarray(v), wmat, np.ascontiguousarray(wmat.T), int(iters),
                               kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow)
    return out, bool(ok)


@register("dense_power_steps", "numba")
@_one_blas_thread
def dense_power_steps(v, w, iters):
    """v (1, I), w (O, I) -> (v after ``iters`` power steps of x -> W x, ok); see conv."""
    out, ok = _dense_power_loop(np.ascontiguousarray(v).reshape(-1), np.ascontiguousarray(w), int(iters))
    return out.reshape(v.shape), bool(ok)

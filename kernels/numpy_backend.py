"""The ``numpy`` backend: im2col + one BLAS GEMM per batch chunk (the numba backend runs
these GEMMs too, with jitted output passes: the CPU default for batched convs).

Convolution as a matrix product. For a chunk of ``m`` samples the patches are
copied into

    cols (C*kh*kw, m*T)        rows ordered (c, p, q) like w.reshape(O, -1)

so that  forward      y    = w2 @ cols              (O, m*T)
         grad_weight  gw  += gy2 @ cols.T            (O, C*kh*kw)
         grad_input   gcol = w2.T @ gy2, then col2im.

Layout ("wide rows", see _Geom): the padded input is split into stride phases
and every output row is computed ``wph`` >= OW wide, so each kernel offset's
patches are one contiguous run of the flattened phase image: im2col and col2im
become kh*kw long contiguous copies/adds instead of many short strided ones
(measured 1.1-1.6x faster than a sliding_window_view im2col, and col2im 1.3-2x
faster than strided adds). The junk columns cost (wph-OW)/OW extra GEMM work.

Why chunks and scratch buffers: at batch 256 the full cols matrix is hundreds
of MB; a fresh array that size costs more in page faults than the copy itself,
and a chunk of a few MB stays in cache between the copy and the GEMM. Chunks
are sized by ``CHUNK_BYTES``; scratch buffers are per thread, reused across
calls and never returned to callers.

Inputs arrive validated by kernels/api.py: one float dtype, ``stride`` = (sh, sw),
``pads`` = (top, bottom, left, right). Outputs keep the input dtype.
"""
from __future__ import annotations

import threading

import numpy as np

from . import buffers, threads
from .registry import register

# Target size of one chunk's cols matrix (per thread, reused: it is most of the backend's
# scratch memory). 2 MiB measured as fast as 4 MiB at 2C2F/4C3F and cut the 2C2F step's
# peak RSS by ~0.02 MB per instance.
CHUNK_BYTES = 2 << 20
MIN_CHUNK_SAMPLES = 3
# Stride-1 grad_input runs as a flipped-kernel conv from this many input channels up
# (see conv2d_grad_input).
FLIP_MIN_CHANNELS = 16
# Convs whose patches have at most this many rows (K = C*kh*kw: the first layers, 1-3 input
# channels) run per sample instead: see _im2col_per_sample.
PER_SAMPLE_MAX_K = 32

_local = threading.local()


def _scratch(slot: str, shape, dtype) -> np.ndarray:
    """An uninitialised reusable buffer of ``shape`` (per thread, per slot and dtype)."""
    pool = _local.__dict__.setdefault("pool", {})
    dtype = np.dtype(dtype)
    size = 1
    for d in shape:
        size *= int(d)
    buf = pool.get((slot, dtype))
    if buf is None or buf.size < size:
        buf = np.empty(max(size, 1), dtype)
        pool[(slot, dtype)] = buf
    return buf[:size].reshape(shape)


# ---------------------------------------------------------------- threads
# Chunks are split over threads.cpu_threads() Python threads, one BLAS thread each (the
# policy and its reasons: kernels/threads.py).

def _groups(n: int, step: int):
    """Chunk starts 0, step, ... < n split into contiguous groups, one per worker thread."""
    starts = list(range(0, n, step))
    t = min(threads.cpu_threads(), len(starts))
    if t <= 1:
        return [starts]
    k, r = divmod(len(starts), t)
    out, i = [], 0
    for j in range(t):
        c = k + (1 if j < r else 0)
        out.append(starts[i:i + c])
        i += c
    return out


def _run_groups(groups, fn):
    """[fn(group) for group in groups]; with several groups, in threads with 1 BLAS thread each."""
    # pinned once for the whole split, by the calling thread; also for one group, as a
    # multi-threaded OpenBLAS call leaves its workers busy-waiting afterwards
    with threads.single_blas_thread():
        return threads.run_parts(fn, groups)


def _span(a: int, s: int, pad: int, n_in: int, n_ph: int):
    """Rows i of phase ``a`` (padded row s*i + a) that hold input rows, i < n_ph.

    Returns (i0, r0, count): phase rows i0 .. i0+count-1 are input rows r0, r0+s, ...
    """
    i0 = max(0, -((a - pad) // s))  # ceil((pad - a) / s), clipped at 0
    r0 = s * i0 + a - pad
    if i0 >= n_ph or r0 >= n_in:
        return i0, r0, 0
    return i0, r0, min(n_ph - i0, (n_in - r0 + s - 1) // s)


class _Geom:
    """Shape arithmetic of one conv, with the phase images of the wide-row layout.

    The zero-padded input is split into sh*sw phases (polyphase: phase (a, b) holds
    padded pixels (sh*i + a, sw*j + b)), each of hph x wph pixels. Kernel offset
    (p, q) then reads phase (p % sh, q % sw) shifted by (p // sh, q // sw) with unit
    stride, so if every output row is computed wph wide (the last wph - ow columns
    are junk, dropped later) its patches for the whole chunk are ONE contiguous run
    of T = oh*wph elements of the flattened phase. One extra phase row keeps the
    junk columns of the last output row inside the buffer.
    """

    def __init__(self, x_shape, w_shape, stride, pads):
        _, self.c, self.h, self.w = (int(v) for v in x_shape)
        self.o, _, self.kh, self.kw = (int(v) for v in w_shape)
        self.sh, self.sw = stride
        self.pads = pads
        pt, pb, pl, pr = pads
        self.oh = (self.h + pt + pb - self.kh) // self.sh + 1
        self.ow = (self.w + pl + pr - self.kw) // self.sw + 1
        self.hph = self.oh + (self.kh - 1) // self.sh + 1
        self.wph = self.ow + (self.kw - 1) // self.sw
        self.t = self.oh * self.wph
        self.k = self.c * self.kh * self.kw

    def chunk(self, n: int, itemsize: int) -> int:
        """Samples per chunk: one chunk's cols matrix about CHUNK_BYTES, but at least
        MIN_CHUNK_SAMPLES (large images: the GEMMs of one or two samples ran ~4% slower)."""
        return max(1, min(n, max(CHUNK_BYTES // max(self.k * self.t * itemsize, 1), MIN_CHUNK_SAMPLES)))

    def offsets(self):
        """(p, q, phase a, phase b, flat offset) for every kernel offset."""
        for p in range(self.kh):
            for q in range(self.kw):
                yield p, q, p % self.sh, q % self.sw, (p // self.sh) * self.wph + q // self.sw

    def phase_blocks(self):
        """For each phase (a, b) that holds input pixels: the phase-image window
        and the matching strided input window, as slices."""
        pt, _, pl, _ = self.pads
        for a in range(self.sh):
            i0, r0, ci = _span(a, self.sh, pt, self.h, self.hph)
            if not ci:
                continue
            for b in range(self.sw):
                j0, c0, cj = _span(b, self.sw, pl, self.w, self.wph)
                if not cj:
                    continue
                yield (a, b, slice(i0, i0 + ci), slice(j0, j0 + cj),
                       slice(r0, r0 + self.sh * (ci - 1) + 1, self.sh),
                       slice(c0, c0 + self.sw * (cj - 1) + 1, self.sw))


def _step(g: _Geom, n: int, itemsize: int) -> int:
    """Samples per chunk: g.chunk, capped so that every BLAS thread gets a chunk (a batch
    whose cols fit in one CHUNK_BYTES chunk still splits over the threads)."""
    t = threads.cpu_threads()
    return max(1, min(g.chunk(n, itemsize), -(-n // t)))


def _im2col(x, g: _Geom):
    """x (m, C, H, W) -> cols (C*kh*kw, m*T) in scratch, rows in (c, p, q) order."""
    m = x.shape[0]
    xph = _scratch("phase", (g.c, m, g.sh, g.sw, g.hph, g.wph), x.dtype)
    xph.fill(0)  # padding, unread phase pixels and the spare row
    xt = x.transpose(1, 0, 2, 3)
    for a, b, ri, rj, si, sj in g.phase_blocks():
        xph[:, :, a, b, ri, rj] = xt[:, :, si, sj]
    flat = xph.reshape(g.c, m, g.sh, g.sw, g.hph * g.wph)
    cols = _scratch("cols", (g.c, g.kh, g.kw, m, g.t), x.dtype)
    for p, q, a, b, off in g.offsets():
        cols[:, p, q] = flat[:, :, a, b, off:off + g.t]
    return cols.reshape(g.k, m * g.t)


def _im2col_per_sample(x, g: _Geom):
    """x (m, C, H, W) -> cols (m, C*kh*kw, OH*OW) in scratch: one patch matrix per sample.

    With few patch rows (K <= PER_SAMPLE_MAX_K) the GEMMs are memory-bound, and the wide
    layout's transposes of y and gy into and out of (O, m*T) cost more than the GEMMs:
    per sample, w2 @ cols[i] writes y[i] in NCHW directly and gy[i] @ cols[i].T reads gy
    as it is (measured at batch 256: 4C3F.c1 forward 5.1 -> 1.6 ms, grad_weight 9.6 ->
    1.8 ms; 6C2F.c1 8.0 -> 5.4 and 10.2 -> 4.1; at K = 256-512 it is 1.05-1.5x slower).
    """
    m = x.shape[0]
    pt, pb, pl, pr = g.pads
    xp = _scratch("padded", (m, g.c, g.h + pt + pb, g.w + pl + pr), x.dtype)
    if pt or pb or pl or pr:
        xp.fill(0)
    xp[:, :, pt:pt + g.h, pl:pl + g.w] = x
    cols = _scratch("cols", (m, g.c, g.kh, g.kw, g.oh, g.ow), x.dtype)
    rows, width = g.sh * (g.oh - 1) + 1, g.sw * (g.ow - 1) + 1
    for p in range(g.kh):
        for q in range(g.kw):
            cols[:, :, p, q] = xp[:, :, p:p + rows:g.sh, q:q + width:g.sw]
    return cols.reshape(m, g.k, g.oh * g.ow)


def _gy_wide(gy, g: _Geom):
    """gy (m, O, OH, OW) -> (O, m*T) in scratch, junk columns zero (so they add nothing)."""
    m = gy.shape[0]
    gz = _scratch("gy", (g.o, m, g.oh, g.wph), gy.dtype)
    gz[:, :, :, g.ow:] = 0
    gz[:, :, :, :g.ow] = gy.transpose(1, 0, 2, 3)
    return gz.reshape(g.o, m * g.t)


@register("conv2d", "numpy")
def conv2d(x, w, b, stride, pads):
    """x (N, C, H, W), w (O, C, kh, kw), b (O,) or None -> y (N, O, OH, OW)."""
    return _conv2d(x, w, b, stride, pads, False)


@register("conv2d_relu", "numpy")
def conv2d_relu(x, w, b, stride, pads):
    """relu(conv2d(x, w, b)): the ReLU runs per chunk in the worker threads while the
    chunk is in cache, instead of one more pass over y (NaN stays NaN, as np.maximum)."""
    return _conv2d(x, w, b, stride, pads, True)


def _conv2d(x, w, b, stride, pads, relu):
    g = _Geom(x.shape, w.shape, stride, pads)
    n = x.shape[0]
    w2 = w.reshape(g.o, g.k)
    y = buffers.empty((n, g.o, g.oh, g.ow), x.dtype)
    step = _step(g, n, x.itemsize)
    if g.k <= PER_SAMPLE_MAX_K:
        y3 = y.reshape(n, g.o, g.oh * g.ow)

        def run(starts):
            for n0 in starts:
                xc = x[n0:n0 + step]
                out = y3[n0:n0 + xc.shape[0]]
                np.matmul(w2, _im2col_per_sample(xc, g), out=out)  # (O, K) @ (m, K, P)
                if b is not None:
                    out += b[:, None]
                if relu:
                    np.maximum(out, out.dtype.type(0), out=out)

        _run_groups(_groups(n, step), run)
        return y

    def store(yc, n0, m):
        yv = yc.reshape(g.o, m, g.oh, g.wph)[:, :, :, :g.ow].transpose(1, 0, 2, 3)
        if b is None:
            y[n0:n0 + m] = yv
        else:
            np.add(yv, b[:, None, None], out=y[n0:n0 + m])
        if relu:
            np.maximum(y[n0:n0 + m], y.dtype.type(0), out=y[n0:n0 + m])

    conv_wide(x, w, stride, pads, store)
    return y


def conv_wide(x, w, stride, pads, store) -> None:
    """The conv's GEMMs in the wide-row layout, chunk by chunk, with the output left to
    ``store(yc, n0, m)``: yc (O, m*T) holds samples n0 .. n0+m-1 as (O, m, OH, WPH), the
    last WPH - OW columns of each row junk; yc is scratch, valid only during the call.
    Chunks run in the worker threads (one BLAS thread each), so ``store`` must be
    thread-safe across disjoint sample ranges and must not start parallel work itself.
    """
    g = _Geom(x.shape, w.shape, stride, pads)
    n = x.shape[0]
    w2 = w.reshape(g.o, g.k)
    step = _step(g, n, x.itemsize)

    def run(starts):
        for n0 in starts:
            xc = x[n0:n0 + step]
            m = xc.shape[0]
            yc = _scratch("out", (g.o, m * g.t), x.dtype)
            np.matmul(w2, _im2col(xc, g), out=yc)
            store(yc, n0, m)

    _run_groups(_groups(n, step), run)


@register("conv2d_grad_weight", "numpy")
def conv2d_grad_weight(x, gy, w_shape, stride, pads):
    """x (N, C, H, W), gy (N, O, OH, OW) -> gw (O, C, kh, kw) = sum over chunks of gy2 @ cols.T."""
    g = _Geom(x.shape, w_shape, stride, pads)
    n = x.shape[0]
    # accumulated transposed: cols @ gy2.T ran ~1.25x faster in OpenBLAS than gy2 @ cols.T
    step = _step(g, n, x.itemsize)
    if g.k <= PER_SAMPLE_MAX_K:
        gy3 = gy.reshape(n, g.o, g.oh * g.ow)

        def run(starts):  # sum over samples of gy[i] (O, P) @ cols[i].T (P, K), in order
            gw2 = np.zeros((g.o, g.k), dtype=x.dtype)
            for n0 in starts:
                xc = x[n0:n0 + step]
                m = xc.shape[0]
                part = _scratch("gw", (m, g.o, g.k), x.dtype)
                np.matmul(gy3[n0:n0 + m], _im2col_per_sample(xc, g).transpose(0, 2, 1), out=part)
                gw2 += part.sum(axis=0)
            return gw2

        parts = _run_groups(_groups(n, step), run)
        for other in parts[1:]:
            parts[0] += other
        return parts[0].reshape(w_shape)

    def run(starts):  # one accumulator per group, summed in group order (deterministic)
        gwt = np.zeros((g.k, g.o), dtype=x.dtype)
        part = _scratch("gw", (g.k, g.o), x.dtype)
        for n0 in starts:
            cols = _im2col(x[n0:n0 + step], g)
            np.matmul(cols, _gy_wide(gy[n0:n0 + step], g).T, out=part)
            gwt += part
        return gwt

    parts = _run_groups(_groups(n, step), run)
    gwt = parts[0]
    for other in parts[1:]:
        gwt += other
    return np.ascontiguousarray(gwt.T).reshape(w_shape)


@register("conv2d_grad_input", "numpy")
def conv2d_grad_input(gy, w, x_shape, stride, pads):
    """gy (N, O, OH, OW), w (O, C, kh, kw) -> gx of exactly ``x_shape`` (N, C, H, W).

    The transposed conv: gcols = w2.T @ gy2 (wide rows, junk columns 0), then each
    kernel offset's block is added back onto its phase as one contiguous run
    (col2im), and the phases are scattered into gx (padding cropped; input pixels
    no window reached stay 0).
    """
    route = grad_input_route(w, stride, pads)
    if route is not None and route[0] == "flip":
        return conv2d(gy, route[1], None, (1, 1), route[2])
    if route is not None:
        return _grad_input_s2d(gy, w, x_shape, stride, pads)
    g = _Geom(x_shape, w.shape, stride, pads)
    n = int(x_shape[0])
    w2t = w.reshape(g.o, g.k).T
    gx = buffers.zeros((n, g.c, g.h, g.w), gy.dtype)
    step = _step(g, n, gy.itemsize)

    def run(starts):
        for n0 in starts:
            gc = gy[n0:n0 + step]
            m = gc.shape[0]
            gcols = _scratch("cols", (g.k, m * g.t), gy.dtype)
            np.matmul(w2t, _gy_wide(gc, g), out=gcols)
            g5 = gcols.reshape(g.c, g.kh, g.kw, m, g.t)
            gph = _scratch("phase", (g.c, m, g.sh, g.sw, g.hph, g.wph), gy.dtype)
            gph.fill(0)
            flat = gph.reshape(g.c, m, g.sh, g.sw, g.hph * g.wph)
            for p, q, a, b, off in g.offsets():
                flat[:, :, a, b, off:off + g.t] += g5[:, p, q]
            gt = gx[n0:n0 + m].transpose(1, 0, 2, 3)
            for a, b, ri, rj, si, sj in g.phase_blocks():
                gt[:, :, si, sj] = gph[:, :, a, b, ri, rj]

    _run_groups(_groups(n, step), run)
    return gx


def grad_input_route(w, stride, pads):
    """How a batch's grad_input runs, for every CPU backend that shares these GEMMs:
    ("flip", wt, pads') for stride 1, ("s2d",) for a stride that divides the kernel, or
    None for GEMM + col2im.

    Stride 1: the transposed conv is a plain conv of gy with the flipped, transposed
    kernel wt and "full minus pads" padding pads', so im2col + GEMM replaces GEMM + col2im
    (measured 1.1-1.25x faster at the paper's stride-1 layers with >= 32 input channels,
    batch 256; with 1 input channel the (1, O*kh*kw) GEMM is ~1.7x slower). Stride s: see
    _grad_input_s2d.
    """
    if tuple(stride) == (1, 1) and w.shape[1] >= FLIP_MIN_CHANNELS:
        kh, kw = int(w.shape[2]), int(w.shape[3])
        pt, pb, pl, pr = pads
        tp = (kh - 1 - pt, kh - 1 - pb, kw - 1 - pl, kw - 1 - pr)
        if min(tp) >= 0:
            return "flip", np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]), tp
    if (tuple(stride) != (1, 1) and w.shape[1] >= S2D_MIN_CHANNELS
            and w.shape[2] % stride[0] == 0 and w.shape[3] % stride[1] == 0):
        return ("s2d",)
    return None


def _grad_input_s2d(gy, w, x_shape, stride, pads):
    """Stride-s grad_input through space-to-depth, for kernels that the stride divides.

    The forward conv with stride (sh, sw) and kernel (kh, kw) equals a stride-1 valid conv
    with kernel (kh/sh, kw/sw) on z = space_to_depth(padded x) (C*sh*sw channels, channel
    (c, a, b) = padded pixels (sh*u + a, sw*v + b)) with w'[o, (c, a, b), i, j] =
    w[o, c, sh*i + a, sw*j + b]. Its adjoint is then the stride-1 flipped-kernel conv of gy
    (full padding): im2col + one GEMM with inner dimension O*kh*kw/(sh*sw), instead of
    the GEMM with inner dimension O that writes C*kh*kw rows for col2im to add back.
    The result is scattered phase by phase into gx (depth-to-space; padding cropped).
    """
    n, c, h, wd = (int(v) for v in x_shape)
    sh, sw = stride
    wt, inner_pads, spans_r, spans_c, covered = s2d_plan(w, x_shape, stride, pads)
    gz = conv2d(gy, wt, None, (1, 1), inner_pads)
    hz, wz = int(gz.shape[2]), int(gz.shape[3])
    g6 = gz.reshape(n, c, sh, sw, hz, wz)
    gx = (buffers.empty if covered else buffers.zeros)((n, c, h, wd), gy.dtype)

    def run(part):  # depth-to-space, one strided copy per phase, samples split over threads
        n0, n1 = part
        for a, (i0, r0, ci) in enumerate(spans_r):
            for b, (j0, c0, cj) in enumerate(spans_c):
                if ci and cj:
                    gx[n0:n1, :, r0:r0 + sh * (ci - 1) + 1:sh, c0:c0 + sw * (cj - 1) + 1:sw] = \
                        g6[n0:n1, :, a, b, i0:i0 + ci, j0:j0 + cj]

    t = max(1, min(threads.cpu_threads(), n))
    threads.run_parts(run, [(n * j // t, n * (j + 1) // t) for j in range(t)])
    return gx


def s2d_plan(w, x_shape, stride, pads):
    """The pieces of _grad_input_s2d: (wt, inner_pads, spans_r, spans_c, covered).

    wt (C*sh*sw, O, kh/sh, kw/sw) is the flipped, transposed space-to-depth kernel, so
    that gz = conv2d(gy, wt, stride 1, inner_pads) holds channel (c, a, b) = the gradient
    of padded pixels (sh*u + a, sw*v + b); spans_r[a] / spans_c[b] are _span's (i0, r0,
    count) of phase a / b in gz's rows / columns; covered: every input pixel is reached.
    """
    _, c, h, wd = (int(v) for v in x_shape)
    o, _, kh, kw = (int(v) for v in w.shape)
    sh, sw = stride
    pt, _, pl, _ = pads
    kh2, kw2 = kh // sh, kw // sw
    wp = w.reshape(o, c, kh2, sh, kw2, sw).transpose(0, 1, 3, 5, 2, 4).reshape(o, c * sh * sw, kh2, kw2)
    wt = np.ascontiguousarray(wp.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    n_out_h = (h + pads[0] + pads[1] - kh) // sh + 1
    n_out_w = (wd + pads[2] + pads[3] - kw) // sw + 1
    hz, wz = n_out_h + kh2 - 1, n_out_w + kw2 - 1
    spans_r = [_span(a, sh, pt, h, hz) for a in range(sh)]
    spans_c = [_span(b, sw, pl, wd, wz) for b in range(sw)]
    covered = sum(sp[2] for sp in spans_r) == h and sum(sp[2] for sp in spans_c) == wd
    return wt, (kh2 - 1, kh2 - 1, kw2 - 1, kw2 - 1), spans_r, spans_c, covered


# Stride-s grad_input (kernel divisible by the stride) runs through space-to-depth from this
# many input channels up (see _grad_input_s2d); a huge value restores the GEMM + col2im path.
S2D_MIN_CHANNELS = 2


# Dense GEMMs of at least this many multiply-adds are split by rows over the Python threads
# (one BLAS thread each); smaller ones run whole on one BLAS thread. Either way OpenBLAS never
# wakes its own workers, which after each call busy-wait ~0.1 s and took a core from what ran
# next (measured: a torch/numba op right after a 2-thread np.matmul ran ~2x slower).
DENSE_SPLIT_MIN = 1 << 21


def _matmul(a, b):
    """a (M, K) @ b (K, N) -> new (M, N) array, rows split over threads (see DENSE_SPLIT_MIN)."""
    m = a.shape[0]
    out = buffers.empty((m, b.shape[1]), np.result_type(a, b))
    t = threads.cpu_threads()
    if t <= 1 or m < 2 * t or m * a.shape[1] * b.shape[1] < DENSE_SPLIT_MIN:
        with threads.single_blas_thread():
            np.matmul(a, b, out=out)
        return out
    edges = [m * j // t for j in range(t + 1)]

    def run(j):
        r0, r1 = edges[j], edges[j + 1]
        np.matmul(a[r0:r1], b, out=out[r0:r1])

    _run_groups(list(range(t)), run)
    return out


@register("dense", "numpy")
def dense(x, w, b):
    """x (N, I), w (O, I), b (O,) or None -> x @ w.T + b (N, O)."""
    y = _matmul(x, w.T)
    if b is not None:
        y += b
    return y


@register("dense_grad_input", "numpy")
def dense_grad_input(gy, w):
    """gy (N, O), w (O, I) -> gy @ w (N, I)."""
    return _matmul(gy, w)


@register("dense_grad_weight", "numpy")
def dense_grad_weight(x, gy):
    """x (N, I), gy (N, O) -> gy.T @ x (O, I)."""
    if x.shape[0] == 1:
        # an outer product: one multiply per entry, the same values as the GEMM, which
        # took 2-7x longer at N=1
        return np.multiply(gy.reshape(-1, 1), x.reshape(1, -1))
    return _matmul(gy.T, x)


def _pairs(a):
    """(N, C, ...) -> (N, C//2, 2, rest) view (or copy if ``a`` cannot be viewed so)."""
    return a.reshape(a.shape[0], a.shape[1] // 2, 2, -1)


@register("minmax", "numpy")
def minmax(x):
    """x (N, C, ...) with C even -> same shape; channels (2k, 2k+1) become (min, max)."""
    y = buffers.empty(x.shape, x.dtype)
    xr, yr = _pairs(x), _pairs(y)
    np.minimum(xr[:, :, 0], xr[:, :, 1], out=yr[:, :, 0])
    np.maximum(xr[:, :, 0], xr[:, :, 1], out=yr[:, :, 1])
    return y


@register("minmax_grad", "numpy")
def minmax_grad(x, gy):
    """x, gy (N, C, ...) -> gx: gy[2k] to the argmin, gy[2k+1] to the argmax (ties: no swap)."""
    xr, gr = _pairs(x), _pairs(gy)
    gx = buffers.empty(gy.shape, gy.dtype)
    out = _pairs(gx)
    swap = xr[:, :, 0] > xr[:, :, 1]
    np.copyto(out[:, :, 0], gr[:, :, 0])
    np.copyto(out[:, :, 1], gr[:, :, 1])
    np.copyto(out[:, :, 0], gr[:, :, 1], where=swap)
    np.copyto(out[:, :, 1], gr[:, :, 0], where=swap)
    return gx


@register("relu_grad", "numpy")
def relu_grad(out, gy):
    """out = relu(x), gy (same shape) -> gx = gy where out > 0, else 0."""
    return np.where(out > 0, gy, np.zeros((), dtype=gy.dtype))


@register("relu_grad_bias", "numpy")
def relu_grad_bias(out, gy):
    """out = relu(x) (N, C, ...), gy -> (relu_grad(out, gy), its sum over every axis but 1)."""
    gx = relu_grad(out, gy)
    return gx, gx.sum(axis=(0,) + tuple(range(2, gx.ndim)), dtype=np.float64).astype(gy.dtype)

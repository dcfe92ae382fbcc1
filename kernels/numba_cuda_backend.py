"""The ``numba_cuda`` backend: the GPU ops written as ``numba.cuda.jit`` kernels.

Same op names and semantics as the ``cupy`` backend (see kernels/cupy_backend.py,
including adam_update, the fused conv2d_power_steps / dense_power_steps and the single
conv_power_step / dense_power_step), and the same array
type: registered ops take and return CuPy arrays (numba sees them through
``__cuda_array_interface__``, no copies), so the two GPU backends are
interchangeable under the registry's array-type dispatch.

Kernels:
  * one shared-memory tiled GEMM body (16 x 16 tiles, one output per thread)
    instantiated per op with device-function "loaders" that read A(m, k) and
    B(k, n) straight from the conv/dense inputs (implicit GEMM: no im2col
    buffer) and a "store" that adds the bias or atomically accumulates split-K
    slices;
  * element-wise MinMax / Adam kernels and a one-block L2 normalise.
No warp intrinsics, so everything also runs under the CUDA simulator
(NUMBA_ENABLE_CUDASIM=1).

Every kernel is built by a factory per dtype (shared-memory arrays need a
compile-time dtype): ``KERNELS`` maps a name to (factory, signature builder) so
tests can ``numba.cuda.compile_ptx`` each one for float32 and float64 without a
GPU. ``host_call(op, *numpy_arrays, ...)`` runs an op on NumPy inputs through
``numba.cuda.to_device`` (the simulator path used by the tests).
"""
from __future__ import annotations

import math
import os

import numpy as np

from .registry import register

try:
    from numba import cuda
except Exception as _exc:  # pragma: no cover - depends on the machine
    cuda = None
    _IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    _IMPORT_ERROR = None
    if "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS" not in os.environ:
        # the power-step norms are deliberate one-block launches: no warning per call
        from numba import config as _config

        _config.CUDA_LOW_OCCUPANCY_WARNINGS = 0

TILE = 16  # GEMM tile edge: TILE x TILE threads per block
EW_THREADS = 256
RED_THREADS = 256  # power of two (tree reduction)


def availability() -> str | None:
    """None only when numba.cuda imports and sees a real device, else the reason."""
    if cuda is None:
        return f"numba.cuda is not importable: {_IMPORT_ERROR}"
    try:
        from numba import config

        if getattr(config, "ENABLE_CUDASIM", 0):
            return "numba runs the CUDA simulator (NUMBA_ENABLE_CUDASIM=1), not a device"
        if not cuda.is_available():
            return "numba.cuda.is_available() is False (no CUDA driver or device)"
    except Exception as exc:
        return f"numba.cuda unusable: {type(exc).__name__}: {exc}"
    try:
        import cupy  # noqa: F401  (the backend's arrays are CuPy arrays)
    except Exception as exc:
        return f"cupy is not importable: {type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------ the GEMM kernels
# One kernel body computes out[m, n] = sum_k A(m, k) B(k, n) for all six ops;
# how A and B are read from the real inputs (implicit GEMM: conv patches are
# gathered on the fly, never stored) and how out is written depends on OP, a
# closure constant, so numba prunes the other branches at compile time.
# (Not cuda.jit device functions: those ask the driver for the current device's
# compute capability, so compile_ptx could not check them on a machine without a GPU.)
#
# p is an int64 tuple.  Conv: (N, C, H, W, O, KH, KW, OH, OW, sh, sw, pt, pl, has_bias).
# Dense: (Nb, I, O, has_bias, 0, ...).  All arrays are flat (1-D, C order).
#   op                 M    N           K           a    b
#   conv2d_fwd         O    N*OH*OW     C*KH*KW     w    x
#   conv2d_bwd_input   C    N*H*W       O*KH*KW     w    gy   (transposed conv as a gather)
#   conv2d_bwd_weight  O    C*KH*KW     N*OH*OW     gy   x
#   dense_fwd          Nb   O           I           x    w
#   dense_bwd_input    Nb   I           O           gy   w
#   dense_bwd_weight   O    I           Nb          gy   x

NPARAMS = 14
GEMM_OPS = ("conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight", "dense_fwd", "dense_bwd_input", "dense_bwd_weight")


def _make_gemm(name, dtype):
    """The 16 x 16 shared-memory tiled GEMM kernel for op ``name`` (K split over blockIdx.z)."""
    OP = GEMM_OPS.index(name)
    CF, CI, CW, DF, DI, DW = range(6)
    zero = dtype(0)

    def gemm(a, b, bias, out, M, N, K, kchunk, p):
        As = cuda.shared.array((TILE, TILE), dtype)
        Bs = cuda.shared.array((TILE, TILE), dtype)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        m = cuda.blockIdx.y * TILE + ty
        n = cuda.blockIdx.x * TILE + tx
        kbeg = cuda.blockIdx.z * kchunk
        kend = kbeg + kchunk
        if kend > K:  # (not min(): in CUDA kernels that compiles via the driver)
            kend = K
        acc = zero
        for k0 in range(kbeg, kend, TILE):
            # each thread stages one element of A's and one of B's K-slice; every
            # staged element is then reused by TILE threads from shared memory
            ka = k0 + tx
            va = zero
            if m < M and ka < kend:
                if OP == CF:
                    va = a[m * (p[1] * p[5] * p[6]) + ka]
                elif OP == CI:
                    khw = p[5] * p[6]
                    va = a[((ka // khw) * p[1] + m) * khw + ka % khw]
                elif OP == CW:
                    ohw = p[7] * p[8]
                    va = a[((ka // ohw) * p[4] + m) * ohw + ka % ohw]
                elif OP == DF:
                    va = a[m * p[1] + ka]
                elif OP == DI:
                    va = a[m * p[2] + ka]
                else:  # DW
                    va = a[ka * p[2] + m]
            As[ty, tx] = va

            kb = k0 + ty
            vb = zero
            if n < N and kb < kend:
                if OP == CF or OP == CW:
                    # x_padded[b, c, i*sh + r, j*sw + q] for patch index (c, r, q), pixel (b, i, j)
                    if OP == CF:
                        kidx = kb
                        pix = n
                    else:
                        kidx = n
                        pix = kb
                    q = kidx % p[6]
                    t = kidx // p[6]
                    r = t % p[5]
                    c = t // p[5]
                    j = pix % p[8]
                    t2 = pix // p[8]
                    i = t2 % p[7]
                    bb = t2 // p[7]
                    ih = i * p[9] - p[11] + r
                    iw = j * p[10] - p[12] + q
                    if ih >= 0 and ih < p[2] and iw >= 0 and iw < p[3]:
                        vb = b[((bb * p[1] + c) * p[2] + ih) * p[3] + iw]
                elif OP == CI:
                    # gy[b, o, i, j] where i*sh + r = h + pt (and likewise for columns), else 0
                    q = kb % p[6]
                    t = kb // p[6]
                    r = t % p[5]
                    o = t // p[5]
                    v = n % p[3]
                    t2 = n // p[3]
                    h = t2 % p[2]
                    bb = t2 // p[2]
                    hh = h + p[11] - r
                    vv = v + p[12] - q
                    if hh >= 0 and vv >= 0:
                        i = hh // p[9]
                        j = vv // p[10]
                        if i * p[9] == hh and j * p[10] == vv and i < p[7] and j < p[8]:
                            vb = b[((bb * p[4] + o) * p[7] + i) * p[8] + j]
                elif OP == DF:
                    vb = b[n * p[1] + kb]
                else:  # DI, DW
                    vb = b[kb * p[1] + n]
            Bs[ty, tx] = vb
            cuda.syncthreads()
            for kk in range(TILE):
                acc += As[ty, kk] * Bs[kk, tx]
            cuda.syncthreads()

        if m < M and n < N:
            first = cuda.blockIdx.z == 0  # only one K-slice adds the bias
            if OP == CF:
                ohw = p[7] * p[8]
                idx = ((n // ohw) * p[4] + m) * ohw + n % ohw
                if p[13] != 0 and first:
                    acc += bias[m]
            elif OP == CI:
                hw = p[2] * p[3]
                idx = ((n // hw) * p[1] + m) * hw + n % hw
            elif OP == CW:
                idx = m * (p[1] * p[5] * p[6]) + n
            elif OP == DF:
                idx = m * p[2] + n
                if p[3] != 0 and first:
                    acc += bias[n]
            else:  # DI, DW
                idx = m * p[1] + n
            if cuda.gridDim.z > 1:
                cuda.atomic.add(out, idx, acc)
            else:
                out[idx] = acc

    gemm.__name__ = f"{name}_{np.dtype(dtype).name}"
    return gemm

def _gemm_sig(dtype):
    t = np.dtype(dtype).name
    return f"void({t}[::1], {t}[::1], {t}[::1], {t}[::1], int64, int64, int64, int64, UniTuple(int64, {NPARAMS}))"


def _make_minmax_fwd(dtype):
    def minmax_fwd(x, y, npairs, inner):
        t = cuda.grid(1)
        stride = cuda.gridsize(1)
        while t < npairs:
            a = 2 * (t // inner) * inner + t % inner  # x[n, 2k, r]; x[n, 2k+1, r] is inner further
            b = a + inner
            xa = x[a]
            xb = x[b]
            if xa != xa or xb != xb:  # a NaN poisons both outputs (np.minimum/np.maximum)
                y[a] = xa + xb
                y[b] = xa + xb
            elif xa <= xb:  # ties keep their order (matches minmax_bwd)
                y[a] = xa
                y[b] = xb
            else:
                y[a] = xb
                y[b] = xa
            t += stride

    return minmax_fwd


def _make_minmax_bwd(dtype):
    def minmax_bwd(x, gy, gx, npairs, inner):
        t = cuda.grid(1)
        stride = cuda.gridsize(1)
        while t < npairs:
            a = 2 * (t // inner) * inner + t % inner
            b = a + inner
            if x[a] <= x[b]:
                gx[a] = gy[a]
                gx[b] = gy[b]
            else:
                gx[a] = gy[b]
                gx[b] = gy[a]
            t += stride

    return minmax_bwd


def _minmax_sig(n_arrays):
    def sig(dtype):
        t = np.dtype(dtype).name
        return "void(" + ", ".join([f"{t}[::1]"] * n_arrays) + ", int64, int64)"

    return sig


def _make_adam(dtype):
    one = dtype(1)

    def adam_step(p, g, m, v, lr_t, b1, b2, eps, n):
        c1 = one - b1
        c2 = one - b2
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        while i < n:
            gi = g[i]
            mi = b1 * m[i] + c1 * gi
            vi = b2 * v[i] + c2 * (gi * gi)
            m[i] = mi
            v[i] = vi
            p[i] -= lr_t * mi / (math.sqrt(vi) + eps)
            i += stride

    return adam_step


def _adam_sig(dtype):
    t = np.dtype(dtype).name
    return f"void({t}[::1], {t}[::1], {t}[::1], {t}[::1], {t}, {t}, {t}, {t}, int64)"


def _make_l2(dtype):
    def l2_normalize(a, norm_out, n, scale):
        """||a|| (float64 accumulation) into norm_out[0]; a /= ||a|| if scale and ||a|| > 0. One block."""
        sh = cuda.shared.array(RED_THREADS, np.float64)
        tid = cuda.threadIdx.x
        s = 0.0
        i = tid
        while i < n:
            v = np.float64(a[i])
            s += v * v
            i += RED_THREADS
        sh[tid] = s
        cuda.syncthreads()
        width = RED_THREADS // 2
        while width > 0:
            if tid < width:
                sh[tid] += sh[tid + width]
            cuda.syncthreads()
            width //= 2
        nrm = sh[0] ** 0.5
        if tid == 0:
            norm_out[0] = nrm
        if scale != 0 and nrm > 0.0:
            inv = 1.0 / nrm
            i = tid
            while i < n:
                a[i] = a[i] * inv
                i += RED_THREADS

    return l2_normalize


def _l2_sig(dtype):
    t = np.dtype(dtype).name
    return f"void({t}[::1], {t}[::1], int64, int64)"


def _make_keep(dtype):
    def keep_if_zero(z, v, nu, nz, n):
        """z <- v where a power step's norm was exactly 0 (the previous iterate is kept)."""
        if nu[0] == 0 or nz[0] == 0:
            i = cuda.grid(1)
            stride = cuda.gridsize(1)
            while i < n:
                z[i] = v[i]
                i += stride

    return keep_if_zero


def _keep_sig(dtype):
    t = np.dtype(dtype).name
    return f"void({t}[::1], {t}[::1], {t}[::1], {t}[::1], int64)"


# name -> (factory(dtype) -> python kernel function, signature(dtype) -> str)
KERNELS = {name: ((lambda dt, _n=name: _make_gemm(_n, dt)), _gemm_sig) for name in GEMM_OPS}
KERNELS.update({
    "minmax_fwd": (_make_minmax_fwd, _minmax_sig(2)),
    "minmax_bwd": (_make_minmax_bwd, _minmax_sig(3)),
    "adam_step": (_make_adam, _adam_sig),
    "l2_normalize": (_make_l2, _l2_sig),
    "keep_if_zero": (_make_keep, _keep_sig),
})

_JITTED: dict[tuple[str, str], object] = {}


def _kernel(name, dtype):
    key = (name, np.dtype(dtype).name)
    k = _JITTED.get(key)
    if k is None:
        factory, _ = KERNELS[name]
        k = cuda.jit(factory(np.dtype(dtype).type))
        _JITTED[key] = k
    return k


# ------------------------------------------------------------------ array plumbing
# Implementations below work on "native" arrays of an allocator: CuPy arrays for
# the registered ops, numba device arrays (from NumPy, also in the simulator)
# for host_call.

class _CupyAlloc:
    def __init__(self):
        import cupy

        self.cp = cupy

    # sync=False: the kernels run on CuPy's current stream (stream()), so the work that
    # wrote an input is ordered before them without a host-side stream sync per import
    def flat(self, a):
        return cuda.as_cuda_array(self.cp.ascontiguousarray(a).ravel(), sync=False)

    def empty(self, shape, dtype):
        return self.cp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.cp.zeros(shape, dtype=dtype)

    def flat_out(self, out):
        return cuda.as_cuda_array(out.ravel(), sync=False)

    def stream(self):
        """CuPy's current stream for a numba launch (0: the legacy default stream)."""
        ptr = self.cp.cuda.get_current_stream().ptr
        return cuda.external_stream(ptr) if ptr else 0

    def reshape(self, a, shape):
        return a.reshape(shape)


class _HostAlloc:
    """NumPy inputs copied with cuda.to_device; outputs are numba device arrays."""

    def flat(self, a):
        if isinstance(a, np.ndarray):
            return cuda.to_device(np.ascontiguousarray(a).reshape(-1))
        if hasattr(a, "copy_to_host"):  # already a numba device array (real or simulated)
            return a.reshape(-1)
        return cuda.as_cuda_array(a).reshape(-1)

    def empty(self, shape, dtype):
        return cuda.device_array(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return cuda.to_device(np.zeros(shape, dtype=dtype))

    def flat_out(self, out):
        return out.reshape(-1)

    def stream(self):
        return 0

    def reshape(self, a, shape):
        return a.reshape(shape)


_SM: list[int] = []


def _sm_count() -> int:
    if not _SM:
        try:
            _SM.append(int(cuda.get_current_device().MULTIPROCESSOR_COUNT))
        except Exception:  # the simulator has no such attribute: pretend a small GPU
            _SM.append(4)
    return _SM[0]


def gemm_plan(M, N, K, sm_count):
    """(grid (gx, gy, gz), kchunk): split K over gz when the output tiles are too few."""
    gm, gn = -(-M // TILE), -(-N // TILE)
    if gm > 65535:
        raise ValueError(f"GEMM with {M} rows exceeds the grid's y limit")
    blocks = gm * gn
    ksplit = 1
    if blocks < 2 * sm_count and K > 8 * TILE:
        ksplit = min(-(-2 * sm_count // blocks), K // (4 * TILE), 65535)
    kchunk = -(-K // ksplit)
    kchunk = max(TILE, -(-kchunk // TILE) * TILE)
    return (gn, gm, max(1, -(-K // kchunk))), kchunk


def _gemm(al, name, dtype, M, N, K, out_shape, a, b, bias, p):
    """Launch GEMM ``name``; a, b, bias are flat device arrays, p the parameter tuple."""
    if M == 0 or N == 0:
        return al.zeros(out_shape, dtype)
    grid, kchunk = gemm_plan(M, N, K, _sm_count())
    out = (al.zeros if grid[2] > 1 else al.empty)(out_shape, dtype)
    _kernel(name, dtype)[grid, (TILE, TILE), al.stream()](a, b, bias, al.flat_out(out), M, N, K, kchunk, p)
    return out


def _params(*vals):
    vals = tuple(int(v) for v in vals)
    return vals + (0,) * (NPARAMS - len(vals))


def _conv_params(x_shape, w_shape, out_hw, stride, pads, has_bias):
    n, c, h, wd = (int(v) for v in x_shape)
    o, _, kh, kw = (int(v) for v in w_shape)
    return _params(n, c, h, wd, o, kh, kw, out_hw[0], out_hw[1], stride[0], stride[1], pads[0], pads[2], has_bias)


def _out_hw(x_shape, w_shape, stride, pads):
    pt, pb, pl, pr = pads
    return ((x_shape[2] + pt + pb - w_shape[2]) // stride[0] + 1,
            (x_shape[3] + pl + pr - w_shape[3]) // stride[1] + 1)


def _check_size(*arrays):
    for a in arrays:
        if a is not None and a.size >= 2**31:
            raise ValueError(f"array of shape {tuple(a.shape)} is too large for the kernels' indexing")


# ------------------------------------------------------------------ op implementations (allocator-generic)

def _conv2d(al, x, w, b, stride, pads):
    _check_size(x, w)
    n, c = x.shape[:2]
    o, _, kh, kw = w.shape
    oh, ow = _out_hw(x.shape, w.shape, stride, pads)
    wf = al.flat(w)
    p = _conv_params(x.shape, w.shape, (oh, ow), stride, pads, b is not None)
    bias = al.flat(b) if b is not None else wf
    return _gemm(al, "conv2d_fwd", x.dtype, o, n * oh * ow, c * kh * kw, (n, o, oh, ow), wf, al.flat(x), bias, p)


def _conv2d_grad_input(al, gy, w, x_shape, stride, pads):
    _check_size(gy, w)
    n, c, h, wd = (int(v) for v in x_shape)
    o, _, kh, kw = w.shape
    wf = al.flat(w)
    p = _conv_params(x_shape, w.shape, gy.shape[2:], stride, pads, 0)
    return _gemm(al, "conv2d_bwd_input", gy.dtype, c, n * h * wd, o * kh * kw, (n, c, h, wd), wf, al.flat(gy), wf, p)


def _conv2d_grad_weight(al, x, gy, w_shape, stride, pads):
    _check_size(x, gy)
    o, c, kh, kw = (int(v) for v in w_shape)
    n, _, oh, ow = gy.shape
    gyf = al.flat(gy)
    p = _conv_params(x.shape, w_shape, (oh, ow), stride, pads, 0)
    return _gemm(al, "conv2d_bwd_weight", x.dtype, o, c * kh * kw, n * oh * ow, (o, c, kh, kw), gyf, al.flat(x), gyf, p)


def _dense(al, x, w, b):
    _check_size(x, w)
    n, i = x.shape
    o = w.shape[0]
    wf = al.flat(w)
    bias = al.flat(b) if b is not None else wf
    return _gemm(al, "dense_fwd", x.dtype, n, o, i, (n, o), al.flat(x), wf, bias, _params(n, i, o, b is not None))


def _dense_grad_input(al, gy, w):
    _check_size(gy, w)
    n, o = gy.shape
    i = w.shape[1]
    wf = al.flat(w)
    return _gemm(al, "dense_bwd_input", gy.dtype, n, i, o, (n, i), al.flat(gy), wf, wf, _params(n, i, o, 0))


def _dense_grad_weight(al, x, gy):
    _check_size(x, gy)
    n, i = x.shape
    o = gy.shape[1]
    gyf = al.flat(gy)
    return _gemm(al, "dense_bwd_weight", x.dtype, o, i, n, (o, i), gyf, al.flat(x), gyf, _params(n, i, o, 0))


def _ew_grid(n):
    return max(1, min(-(-n // EW_THREADS), 1 << 16))


def _pairs(x):
    inner = int(np.prod(x.shape[2:], dtype=np.int64)) if len(x.shape) > 2 else 1
    return int(x.size) // 2, inner


def _minmax(al, x):
    _check_size(x)
    y = al.empty(x.shape, x.dtype)
    npairs, inner = _pairs(x)
    if npairs:
        _kernel("minmax_fwd", x.dtype)[_ew_grid(npairs), EW_THREADS, al.stream()](al.flat(x), al.flat_out(y), npairs, inner)
    return y


def _minmax_grad(al, x, gy):
    _check_size(x)
    gx = al.empty(x.shape, x.dtype)
    npairs, inner = _pairs(x)
    if npairs:
        _kernel("minmax_bwd", x.dtype)[_ew_grid(npairs), EW_THREADS, al.stream()](
            al.flat(x), al.flat(gy), al.flat_out(gx), npairs, inner
        )
    return gx


def _adam(al, p, g, m, v, lr_t, beta1, beta2, epsilon):
    """In place on the device arrays behind p, m, v (flat views must alias them)."""
    n = int(p.size)
    if n == 0:
        return
    st = np.dtype(p.dtype).type
    _kernel("adam_step", p.dtype)[_ew_grid(n), EW_THREADS, al.stream()](
        al.flat_out(p), al.flat(g), al.flat_out(m), al.flat_out(v), st(lr_t), st(beta1), st(beta2), st(epsilon), n
    )


def _l2(al, a, scale):
    """||a|| as a (1,) array; with ``scale`` also a /= ||a|| in place."""
    nrm = al.empty((1,), a.dtype)
    _kernel("l2_normalize", a.dtype)[1, RED_THREADS, al.stream()](al.flat_out(a), al.flat_out(nrm), int(a.size), int(bool(scale)))
    return nrm


def _conv_power_step(al, v, w, stride, pads):
    u = _conv2d(al, v, w, None, stride, pads)
    sigma = _l2(al, u, False)
    z = _conv2d_grad_input(al, u, w, v.shape, stride, pads)
    _l2(al, z, True)
    return z, sigma


def _dense_power_step(al, v, w):
    o, i = w.shape
    if int(v.size) != i:
        raise ValueError(f"dense_power_step: v of shape {tuple(v.shape)} does not match w {tuple(w.shape)}")
    u = _dense(al, al.reshape(v, (1, i)), w, None)
    sigma = _l2(al, u, False)
    z = _dense_grad_input(al, u, w)
    _l2(al, z, True)
    return al.reshape(z, tuple(v.shape)), sigma


def _power_steps(al, v, iters, apply, adjoint):
    """``iters`` steps v <- A^T u / ||A^T u||, u = A v / ||A v||, on the device. As the CPU
    ops do, a step where A v or A^T u is exactly 0 keeps the previous iterate: decided on
    the device (keep_if_zero), so the steps need no host sync."""
    n = int(v.size)
    for _ in range(int(iters)):
        u = apply(v)
        nu = _l2(al, u, True)
        z = adjoint(u)
        nz = _l2(al, z, True)
        _kernel("keep_if_zero", z.dtype)[_ew_grid(n), EW_THREADS, al.stream()](al.flat_out(z), al.flat(v), al.flat_out(nu),
                                                                 al.flat_out(nz), n)
        v = z
    return v


def _conv2d_power_steps(al, v, w, iters, stride, pads):
    """v (1, C, H, W), w (O, C, kh, kw) -> v after ``iters`` power steps of the conv."""
    return _power_steps(al, v, iters, lambda a: _conv2d(al, a, w, None, stride, pads),
                        lambda b: _conv2d_grad_input(al, b, w, tuple(v.shape), stride, pads))


def _dense_power_steps(al, v, w, iters):
    """v (1, I), w (O, I) -> v after ``iters`` power steps of x -> W x."""
    i = int(w.shape[1])
    out = _power_steps(al, al.reshape(v, (1, i)), iters, lambda a: _dense(al, a, w, None),
                       lambda b: _dense_grad_input(al, b, w))
    return al.reshape(out, tuple(v.shape))


_IMPLS = {
    "conv2d": _conv2d,
    "conv2d_grad_input": _conv2d_grad_input,
    "conv2d_grad_weight": _conv2d_grad_weight,
    "dense": _dense,
    "dense_grad_input": _dense_grad_input,
    "dense_grad_weight": _dense_grad_weight,
    "minmax": _minmax,
    "minmax_grad": _minmax_grad,
    "conv_power_step": _conv_power_step,
    "dense_power_step": _dense_power_step,
    "conv2d_power_steps": _conv2d_power_steps,
    "dense_power_steps": _dense_power_steps,
}


def host_call(op, *args):
    """Run ``op`` on NumPy inputs (copied to the device) and return NumPy results.

    Same arguments as the registered op. Works under the CUDA simulator. For
    ``adam_update`` the NumPy arrays p, m, v are updated in place (copied back).
    """
    al = _HostAlloc()
    if op == "adam_update":
        p, g, m, v = args[:4]
        dp, dm, dv = (cuda.to_device(np.ascontiguousarray(a)) for a in (p, m, v))
        _adam(al, dp, g, dm, dv, *args[4:])
        for host, dev in ((p, dp), (m, dm), (v, dv)):
            host[...] = dev.copy_to_host()
        return None
    out = _IMPLS[op](al, *args)
    if isinstance(out, tuple):
        return tuple(np.asarray(o.copy_to_host()) for o in out)
    return out.copy_to_host()


# ------------------------------------------------------------------ registered ops (CuPy in, CuPy out)

_CUPY: list[_CupyAlloc] = []


def _cp():
    if not _CUPY:
        _CUPY.append(_CupyAlloc())
    return _CUPY[0]


def _register_all():
    def wrap(fn):
        def op(*args):
            return fn(_cp(), *args)

        op.__name__ = fn.__name__.lstrip("_")
        op.__doc__ = f"numba_cuda {op.__name__} (CuPy arrays; see kernels/api.py for shapes)."
        return op

    for name, fn in _IMPLS.items():
        if name in ("conv_power_step", "dense_power_step", "conv2d_power_steps", "dense_power_steps"):
            continue
        register(name, "numba_cuda")(wrap(fn))


_register_all()


@register("adam_update", "numba_cuda")
def adam_update(p, g, m, v, lr_t, beta1, beta2, epsilon):
    """In-place Adam step on same-shape CuPy arrays (p, m, v must be C-contiguous)."""
    for name, a in (("p", p), ("m", m), ("v", v)):
        if not a.flags.c_contiguous:
            raise ValueError(f"adam_update updates {name} in place and needs it C-contiguous (shape {tuple(a.shape)})")
    _adam(_cp(), p, g, m, v, lr_t, beta1, beta2, epsilon)


@register("conv_power_step", "numba_cuda")
def conv_power_step(v, w, stride, pads):
    """v (1, C, H, W), w (O, C, kh, kw) -> (v_next like v, sigma = ||conv(v)||, 0-d CuPy array)."""
    z, sigma = _conv_power_step(_cp(), v, w, stride, pads)
    return z, sigma.reshape(())


@register("dense_power_step", "numba_cuda")
def dense_power_step(v, w):
    """v (I,) or (1, I), w (O, I) -> (v_next like v, sigma = ||w v||, 0-d CuPy array)."""
    if w.dtype != v.dtype:
        raise TypeError(f"dense_power_step: v is {v.dtype} but w is {w.dtype}")
    z, sigma = _dense_power_step(_cp(), v, w)
    return z, sigma.reshape(())


@register("conv2d_power_steps", "numba_cuda")
def conv2d_power_steps(v, w, iters, stride, pads):
    """The CPU op's contract: v (1, C, H, W) CuPy -> (v after ``iters`` steps, ok). ok is None:
    whether a norm was 0 is known only on the device (the iterate was kept there)."""
    return _conv2d_power_steps(_cp(), v, w, iters, stride, pads), None


@register("dense_power_steps", "numba_cuda")
def dense_power_steps(v, w, iters):
    """v (1, I) CuPy, w (O, I) -> (v after ``iters`` steps, None); see conv2d_power_steps."""
    return _dense_power_steps(_cp(), v, w, iters), None

"""The ``cupy`` backend: hand-written CUDA C kernels (kernels/cuda/*.cu) run through CuPy.

Ops registered (inputs and outputs are CuPy arrays of one float dtype):
  conv2d, conv2d_grad_input, conv2d_grad_weight   implicit GEMM (gemm_conv.cu)
  dense, dense_grad_input, dense_grad_weight      tiled GEMM (gemm_conv.cu)
  minmax, minmax_grad                             one thread per channel pair
  adam_update(p, g, m, v, lr_t, b1, b2, eps)      in place, one fused kernel
  conv_power_step(v, w, stride, pads) -> (v_next, sigma)
  dense_power_step(v, w) -> (v_next, sigma)
    One power-method step for the operator A (conv without bias, resp. v -> v w^T):
    sigma = ||A v|| (the estimate for the incoming iterate v, meant to be a unit
    vector), v_next = A^T A v / ||A^T A v|| (left unscaled if that norm is exactly 0).
    ``v`` has the layer's input shape for one sample: (1, C, H, W) for a conv with
    ``stride`` = (sh, sw) and ``pads`` = (top, bottom, left, right) already resolved,
    (I,) or (1, I) for dense. ``sigma`` is a 0-d CuPy array of v's dtype (no host sync).

The kernels are C++ templates over the element type (float, double) and the
GEMM tile; each template instance is compiled once, lazily, by NVRTC via
``cupy.RawModule(name_expressions=...)``. Importing this module never touches a
device: ``availability()`` reports whether one is there.

Split-K GEMMs (chosen when the output alone has too few tiles to fill the GPU,
typically conv grad-weight) accumulate with atomicAdd, so their float rounding
may differ run to run by a few ulps.
"""
from __future__ import annotations

import os

import numpy as np

from .registry import register

try:  # the module must import everywhere; availability() says whether it can run
    import cupy as cp
except Exception as _exc:  # pragma: no cover - depends on the machine
    cp = None
    _IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    _IMPORT_ERROR = None

CUDA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda")
NVRTC_OPTIONS = ("-std=c++17",)

# GEMM tiles (BM, BN): 256 threads each; tall outputs use 64x64, short ones
# (few output channels) trade rows for columns so fewer lanes sit idle.
TILES = ((64, 64), (32, 128), (16, 128))
GEMM_BK = 16
GEMM_THREADS = 256
RED_THREADS = 1024
CTYPE = {"float32": "float", "float64": "double"}

GEMM_KERNELS = (
    "conv2d_fwd",
    "conv2d_bwd_input",
    "conv2d_bwd_weight",
    "dense_fwd",
    "dense_bwd_input",
    "dense_bwd_weight",
)
ELEMENTWISE_KERNELS = ("minmax_fwd", "minmax_bwd", "adam_step", "l2_normalize", "dense_power_step")

# dense_power_step runs in one block: worth it only while W is small
FUSED_DENSE_POWER_MAX = 1 << 20


def name_expressions(source: str) -> list[str]:
    """Every template instance of the kernels in ``source`` (a file name in kernels/cuda)."""
    if source == "gemm_conv.cu":
        return [f"{k}<{t},{bm},{bn}>" for k in GEMM_KERNELS for t in CTYPE.values() for bm, bn in TILES]
    if source == "elementwise.cu":
        return [f"{k}<{t}>" for k in ELEMENTWISE_KERNELS for t in CTYPE.values()]
    raise ValueError(f"unknown CUDA source {source!r}; known: gemm_conv.cu, elementwise.cu")


SOURCES = ("gemm_conv.cu", "elementwise.cu")


def availability() -> str | None:
    """None when CuPy imports and a CUDA device is present, else the reason."""
    if cp is None:
        return f"cupy is not importable: {_IMPORT_ERROR}"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except cp.cuda.runtime.CUDARuntimeError as exc:
        return f"no usable CUDA device: {exc}"
    except Exception as exc:  # e.g. no driver library at all
        return f"no usable CUDA device: {type(exc).__name__}: {exc}"
    return None if n > 0 else "no CUDA device (getDeviceCount() == 0)"


# ------------------------------------------------------------------ compilation

_MODULES: dict[str, object] = {}


def _module(source: str):
    """The RawModule of one .cu file (built on first use; NVRTC compiles lazily too)."""
    mod = _MODULES.get(source)
    if mod is None:
        with open(os.path.join(CUDA_DIR, source)) as f:
            code = f.read()
        mod = cp.RawModule(code=code, options=NVRTC_OPTIONS, name_expressions=name_expressions(source))
        _MODULES[source] = mod
    return mod


def _kernel(source: str, expr: str):
    return _module(source).get_function(expr)


_SM_COUNT: list[int] = []


def _sm_count() -> int:
    if not _SM_COUNT:
        dev = cp.cuda.Device()
        _SM_COUNT.append(int(dev.attributes["MultiProcessorCount"]))
    return _SM_COUNT[0]


def _ctype(a) -> str:
    return CTYPE[str(a.dtype)]


def _i32(*vals):
    out = []
    for v in vals:
        v = int(v)
        if not 0 <= v < 2**31:
            raise ValueError(f"size {v} does not fit the kernels' 32-bit indexing")
        out.append(np.int32(v))
    return out


def _check_size(*arrays):
    for a in arrays:
        if a is not None and a.size >= 2**31:
            raise ValueError(f"array of shape {tuple(a.shape)} is too large for 32-bit indexing")


def _contig(a):
    return cp.ascontiguousarray(a)


def gemm_plan(M: int, N: int, K: int, sm_count: int):
    """Tile, grid and K chunk for an (M x N, depth K) GEMM.

    Returns ((BM, BN), grid (gx, gy, gz), kchunk). Split-K (gz > 1) only when the
    output tiles alone would leave the GPU mostly idle and K is long enough that
    each slice still does >= 4 BK steps.
    """
    if M <= 16:
        bm, bn = 16, 128
    elif M <= 32:
        bm, bn = 32, 128
    else:
        bm, bn = 64, 64
    gm, gn = -(-M // bm), -(-N // bn)
    if gm > 65535:
        raise ValueError(f"GEMM with {M} rows exceeds the grid's y limit")
    blocks = gm * gn
    target = 2 * sm_count
    ksplit = 1
    if blocks < target and K > 8 * GEMM_BK:
        ksplit = min(-(-target // blocks), K // (4 * GEMM_BK), 65535)
    kchunk = -(-K // ksplit)
    kchunk = max(GEMM_BK, -(-kchunk // GEMM_BK) * GEMM_BK)
    ksplit = max(1, -(-K // kchunk))
    return (bm, bn), (gn, gm, ksplit), kchunk


def _run_gemm(name, a0, M, N, K, out_shape, build_args):
    """Plan, allocate (zeroed for split-K) and launch; ``build_args(out, kchunk)`` -> kernel args."""
    dtype = a0.dtype
    if M == 0 or N == 0:
        return cp.zeros(out_shape, dtype=dtype)
    (bm, bn), grid, kchunk = gemm_plan(M, N, K, _sm_count())
    out = (cp.zeros if grid[2] > 1 else cp.empty)(out_shape, dtype=dtype)
    kern = _kernel("gemm_conv.cu", f"{name}<{_ctype(a0)},{bm},{bn}>")
    kern(grid, (GEMM_THREADS,), build_args(out, np.int32(kchunk)))
    return out


def _conv_args(x_shape, w_shape, out_hw, stride, pads):
    n, c, h, wd = x_shape
    o, _, kh, kw = w_shape
    return _i32(n, c, h, wd, o, kh, kw, out_hw[0], out_hw[1], stride[0], stride[1], pads[0], pads[2])


def _out_hw(x_shape, w_shape, stride, pads):
    h, wd = x_shape[2], x_shape[3]
    kh, kw = w_shape[2], w_shape[3]
    pt, pb, pl, pr = pads
    return (h + pt + pb - kh) // stride[0] + 1, (wd + pl + pr - kw) // stride[1] + 1


# ------------------------------------------------------------------ conv2d

@register("conv2d", "cupy")
def conv2d(x, w, b, stride, pads):
    """x (N, C, H, W), w (O, C, kh, kw), b (O,) or None -> y (N, O, OH, OW)."""
    x, w = _contig(x), _contig(w)
    _check_size(x, w)
    n, c = x.shape[:2]
    o, _, kh, kw = w.shape
    oh, ow = _out_hw(x.shape, w.shape, stride, pads)
    bias = _contig(b) if b is not None else w  # w is a placeholder pointer when has_bias = 0
    shape_args = _conv_args(x.shape, w.shape, (oh, ow), stride, pads)
    has_bias = np.int32(b is not None)
    return _run_gemm(
        "conv2d_fwd", x, o, n * oh * ow, c * kh * kw, (n, o, oh, ow),
        lambda out, kc: (x, w, bias, out, has_bias, *shape_args, kc),
    )


@register("conv2d_grad_input", "cupy")
def conv2d_grad_input(gy, w, x_shape, stride, pads):
    """gy (N, O, OH, OW), w (O, C, kh, kw) -> gx (N, C, H, W) = x_shape."""
    gy, w = _contig(gy), _contig(w)
    _check_size(gy, w)
    n, c, h, wd = (int(v) for v in x_shape)
    o, _, kh, kw = w.shape
    shape_args = _conv_args((n, c, h, wd), w.shape, gy.shape[2:], stride, pads)
    return _run_gemm(
        "conv2d_bwd_input", gy, c, n * h * wd, o * kh * kw, (n, c, h, wd),
        lambda out, kc: (gy, w, out, *shape_args, kc),
    )


@register("conv2d_grad_weight", "cupy")
def conv2d_grad_weight(x, gy, w_shape, stride, pads):
    """x (N, C, H, W), gy (N, O, OH, OW) -> gw of ``w_shape`` (O, C, kh, kw)."""
    x, gy = _contig(x), _contig(gy)
    _check_size(x, gy)
    o, c, kh, kw = (int(v) for v in w_shape)
    n, _, oh, ow = gy.shape
    shape_args = _conv_args(x.shape, (o, c, kh, kw), (oh, ow), stride, pads)
    return _run_gemm(
        "conv2d_bwd_weight", x, o, c * kh * kw, n * oh * ow, (o, c, kh, kw),
        lambda out, kc: (x, gy, out, *shape_args, kc),
    )


# ------------------------------------------------------------------ dense

@register("dense", "cupy")
def dense(x, w, b):
    """x (N, I), w (O, I), b (O,) or None -> x w^T + b (N, O)."""
    x, w = _contig(x), _contig(w)
    _check_size(x, w)
    n, i = x.shape
    o = w.shape[0]
    bias = _contig(b) if b is not None else w
    has_bias = np.int32(b is not None)
    dims = _i32(n, i, o)
    return _run_gemm("dense_fwd", x, n, o, i, (n, o), lambda out, kc: (x, w, bias, out, has_bias, *dims, kc))


@register("dense_grad_input", "cupy")
def dense_grad_input(gy, w):
    """gy (N, O), w (O, I) -> gy w (N, I)."""
    gy, w = _contig(gy), _contig(w)
    _check_size(gy, w)
    n, o = gy.shape
    i = w.shape[1]
    dims = _i32(n, i, o)
    return _run_gemm("dense_bwd_input", gy, n, i, o, (n, i), lambda out, kc: (gy, w, out, *dims, kc))


@register("dense_grad_weight", "cupy")
def dense_grad_weight(x, gy):
    """x (N, I), gy (N, O) -> gy^T x (O, I)."""
    x, gy = _contig(x), _contig(gy)
    _check_size(x, gy)
    n, i = x.shape
    o = gy.shape[1]
    dims = _i32(n, i, o)
    return _run_gemm("dense_bwd_weight", x, o, i, n, (o, i), lambda out, kc: (x, gy, out, *dims, kc))


# ------------------------------------------------------------------ MinMax

def _ew_grid(n):
    return (max(1, min(-(-n // 256), 1 << 20)),), (256,)


def _pairs(x):
    inner = int(np.prod(x.shape[2:], dtype=np.int64)) if x.ndim > 2 else 1
    return x.size // 2, inner


@register("minmax", "cupy")
def minmax(x):
    """x (N, C, ...) with C even -> same shape, channel pairs sorted to (min, max)."""
    x = _contig(x)
    _check_size(x)
    y = cp.empty_like(x)
    npairs, inner = _pairs(x)
    if npairs:
        grid, block = _ew_grid(npairs)
        _kernel("elementwise.cu", f"minmax_fwd<{_ctype(x)}>")(grid, block, (x, y, *_i32(npairs, inner)))
    return y


@register("minmax_grad", "cupy")
def minmax_grad(x, gy):
    """x, gy (N, C, ...) -> gx: gy routed back through the pair sort (ties keep order)."""
    x, gy = _contig(x), _contig(gy)
    _check_size(x)
    gx = cp.empty_like(x)
    npairs, inner = _pairs(x)
    if npairs:
        grid, block = _ew_grid(npairs)
        _kernel("elementwise.cu", f"minmax_bwd<{_ctype(x)}>")(grid, block, (x, gy, gx, *_i32(npairs, inner)))
    return gx


# ------------------------------------------------------------------ Adam

@register("adam_update", "cupy")
def adam_update(p, g, m, v, lr_t, beta1, beta2, epsilon):
    """In-place Adam step on same-shape arrays p, g, m, v (p, m, v must be C-contiguous)."""
    for name, a in (("p", p), ("m", m), ("v", v)):
        if not a.flags.c_contiguous:
            raise ValueError(f"adam_update updates {name} in place and needs it C-contiguous (shape {tuple(a.shape)})")
    g = _contig(g)
    n = p.size
    if n == 0:
        return
    st = p.dtype.type
    grid, block = _ew_grid(n)
    _kernel("elementwise.cu", f"adam_step<{_ctype(p)}>")(
        grid, block, (p, g, m, v, st(lr_t), st(beta1), st(beta2), st(epsilon), np.int64(n))
    )


# ------------------------------------------------------------------ power method

def _l2(a, scale: bool):
    """||a|| as a 0-d array; with ``scale`` also normalises ``a`` (contiguous) in place."""
    nrm = cp.empty((), dtype=a.dtype)
    _kernel("elementwise.cu", f"l2_normalize<{_ctype(a)}>")(
        (1,), (RED_THREADS,), (a, nrm, *_i32(a.size), np.int32(bool(scale)))
    )
    return nrm


@register("conv_power_step", "cupy")
def conv_power_step(v, w, stride, pads):
    """v (1, C, H, W), w (O, C, kh, kw) -> (v_next like v, sigma = ||conv(v)||, 0-d)."""
    u = conv2d(v, w, None, stride, pads)
    sigma = _l2(u, scale=False)
    z = conv2d_grad_input(u, w, v.shape, stride, pads)
    _l2(z, scale=True)
    return z, sigma


@register("dense_power_step", "cupy")
def dense_power_step(v, w):
    """v (I,) or (1, I), w (O, I) -> (v_next like v, sigma = ||w v||, 0-d)."""
    w = _contig(w)
    o, i = w.shape
    if v.size != i:
        raise ValueError(f"dense_power_step: v of shape {tuple(v.shape)} does not match w {tuple(w.shape)}")
    if w.dtype != v.dtype:
        raise TypeError(f"dense_power_step: v is {v.dtype} but w is {w.dtype}")
    if o * i > FUSED_DENSE_POWER_MAX:  # one block would be the bottleneck: use the GEMMs
        v2 = _contig(v).reshape(1, i)
        u = dense(v2, w, None)
        sigma = _l2(u, scale=False)
        z = dense_grad_input(u, w)
        _l2(z, scale=True)
        return z.reshape(v.shape), sigma
    vc = _contig(v)
    u = cp.empty((o,), dtype=w.dtype)
    out = cp.empty(v.shape, dtype=w.dtype)
    sigma = cp.empty((), dtype=w.dtype)
    _kernel("elementwise.cu", f"dense_power_step<{_ctype(w)}>")(
        (1,), (RED_THREADS,), (w, vc, u, out, sigma, *_i32(o, i))
    )
    return out, sigma

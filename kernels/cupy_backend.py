"""The ``cupy`` backend: hand-written CUDA C kernels (kernels/cuda/*.cu) run through CuPy.

Ops registered (inputs and outputs are CuPy arrays of one float dtype):
  conv2d, conv2d_grad_input, conv2d_grad_weight   implicit GEMM (gemm_conv.cu)
  dense, dense_grad_input, dense_grad_weight      tiled GEMM (gemm_conv.cu)
  minmax, minmax_grad                             one thread per channel pair
  adam_update(p, g, m, v, lr_t, b1, b2, eps)      in place, one fused kernel
  conv2d_power_steps(v, w, iters, stride, pads) -> (v, None)
  dense_power_steps(v, w, iters) -> (v, None)
    The CPU backends' fused power steps (what gloro_core.lipschitz runs in training):
    ``iters`` steps, a step whose norm is exactly 0 keeping the previous iterate, chosen
    on the device; ``ok`` is None because only a host sync could tell.
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
import re

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

# GEMM tiles (BM, BN), 256 threads each: square for large outputs, and short, narrow and
# small ones so that few output channels (M), few columns (a 10-unit dense layer, a 1-channel
# conv's 4x4 weight gradient: N = 16) or both are not mostly padding. gemm_plan picks one.
TILES = ((64, 64), (32, 128), (16, 128), (128, 16), (16, 16))
# loads per multiply-add relative to compute in gemm_plan's cost model: a BM x BN tile
# stages BM + BN elements per BM * BN multiply-adds of each K step
TILE_LOAD_WEIGHT = 16
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


# ------------------------------------------------------------------ checked launches
# Every RawKernel launch goes through _launch, which checks each argument against the
# kernel's C parameter list read from the .cu source (so the two cannot drift): a
# RawKernel call passes raw pointers and bit patterns, and a wrong scalar width, dtype,
# non-contiguous array or oversized index shows up on a GPU as garbage, not an error.

INT_MAX = 2**31 - 1
GRID_X_MAX = 2**31 - 1
GRID_YZ_MAX = 65535
BLOCK_MAX = 1024
# arrays a kernel indexes with 64 bits (long long); every other array argument is
# indexed with int, so it must hold fewer than 2^31 elements
INDEX64 = {
    "conv2d_fwd": ("y",),
    "conv2d_bwd_input": ("gx",),
    "conv2d_bwd_weight": ("gw",),
    "dense_fwd": ("y",),
    "dense_bwd_input": ("gx",),
    "dense_bwd_weight": ("gw",),
    "minmax_fwd": ("x", "y"),
    "minmax_bwd": ("x", "gy", "gx"),
    "adam_step": ("p", "g", "m", "v"),
}
# the GEMM body computes m + BM, n + BN and k + BK in int: extents keep that margin
GEMM_EXTENT_MAX = INT_MAX - 128
_SCALAR_C = {"int": np.int32, "long long": np.int64}


class LaunchError(ValueError):
    """A kernel launch whose arguments do not match the kernel (raised before launching)."""


def _defines(code: str) -> dict[str, str]:
    """Object-like #defines of a source (continuation lines joined)."""
    code = code.replace("\\\n", " ")
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"^#define\s+(\w+)[ \t]+(.*)$", code, flags=re.M)}


_SIGS: dict[str, dict] = {}


def kernel_signatures(source: str) -> dict[str, dict]:
    """{kernel: {"params": [(name, ctype, is_pointer)], "threads": launch bound or None}}
    parsed from ``source``'s ``__global__`` functions (macros such as CONV_ARGS expanded)."""
    sigs = _SIGS.get(source)
    if sigs is None:
        with open(os.path.join(CUDA_DIR, source)) as f:
            code = f.read()
        defs = _defines(code)
        sigs = {}
        pat = r"__global__\s+void\s+(?:__launch_bounds__\((\w+)\)\s+)?(\w+)\s*\(([^)]*)\)"
        for m in re.finditer(pat, code):
            bound, name, plist = m.groups()
            for macro, body in defs.items():
                plist = re.sub(rf"\b{macro}\b", body, plist)
            params = []
            for p in plist.split(","):
                toks = p.replace("*", " * ").split()
                toks = [t for t in toks if t not in ("const", "__restrict__")]
                is_ptr = "*" in toks
                toks = [t for t in toks if t != "*"]
                params.append((toks[-1], " ".join(toks[:-1]), is_ptr))
            threads = int(defs.get(bound, bound)) if bound else None
            sigs[name] = {"params": params, "threads": threads}
        _SIGS[source] = sigs
    return sigs


def _dims3(v, what, name):
    v = tuple(int(x) for x in (v if isinstance(v, (tuple, list)) else (v,)))
    if not 1 <= len(v) <= 3 or any(x < 1 for x in v):
        raise LaunchError(f"{name}: {what} {v} must be 1 to 3 positive sizes")
    return v + (1,) * (3 - len(v))


def check_launch(source: str, name: str, ctype: str, grid, block, args) -> None:
    """Raise LaunchError unless ``args`` match kernel ``name<ctype, ...>`` of ``source``
    and ``grid``/``block`` are within CUDA's limits and the kernel's launch bound."""
    sig = kernel_signatures(source).get(name)
    if sig is None:
        raise LaunchError(f"no __global__ kernel {name!r} in {source}")
    dtype = {v: k for k, v in CTYPE.items()}.get(ctype)
    if dtype is None:
        raise LaunchError(f"{name}: element type {ctype!r} is not one of {sorted(CTYPE.values())}")
    dtype = np.dtype(dtype)
    g, b = _dims3(grid, "grid", name), _dims3(block, "block", name)
    if g[0] > GRID_X_MAX or g[1] > GRID_YZ_MAX or g[2] > GRID_YZ_MAX:
        raise LaunchError(f"{name}: grid {g} exceeds CUDA's limits ({GRID_X_MAX}, {GRID_YZ_MAX}, {GRID_YZ_MAX})")
    threads = b[0] * b[1] * b[2]
    if threads > BLOCK_MAX or b[2] > 64:
        raise LaunchError(f"{name}: block {b} ({threads} threads) exceeds CUDA's limits ({BLOCK_MAX} threads, z <= 64)")
    if sig["threads"] is not None and threads != sig["threads"]:
        # the bounded kernels (GEMM tiles, one-block reductions) assume exactly that many threads
        raise LaunchError(f"{name}: launched with {threads} threads, the kernel is written for {sig['threads']}")
    params = sig["params"]
    if len(args) != len(params):
        raise LaunchError(f"{name}: {len(args)} arguments for {len(params)} parameters "
                          f"({', '.join(p[0] for p in params)})")
    wide = INDEX64.get(name, ())
    for a, (pname, pc, is_ptr) in zip(args, params):
        if is_ptr:
            if isinstance(a, np.generic) or not hasattr(a, "shape"):
                raise LaunchError(f"{name}: parameter {pname} ({pc}*) needs an array, got {type(a).__name__}")
            shape = tuple(a.shape)
            if pc != "T":
                raise LaunchError(f"{name}: parameter {pname} has pointer type {pc}*, which the host does not pass")
            if a.dtype != dtype:
                raise LaunchError(f"{name}<{ctype}>: array {pname} of shape {shape} is {a.dtype}, not {dtype}")
            if not a.flags.c_contiguous:
                raise LaunchError(f"{name}: array {pname} of shape {shape} is not C-contiguous")
            size = int(np.prod(shape, dtype=object))
            if pname not in wide and size > INT_MAX:
                raise LaunchError(f"{name}: array {pname} of shape {shape} has {size} elements; the kernel "
                                  f"indexes it with 32-bit int (at most {INT_MAX})")
        else:
            want = dtype.type if pc == "T" else _SCALAR_C.get(pc)
            if want is None:
                raise LaunchError(f"{name}: parameter {pname} has C type {pc!r}, which the host does not pass")
            if type(a) is not want:
                raise LaunchError(f"{name}: parameter {pname} is C {'T=' + ctype if pc == 'T' else pc} and needs "
                                  f"{want.__name__}, got {type(a).__name__} {a!r}")


def _launch(source: str, name: str, a0, grid, block, args, tile=()):
    """Check, then launch ``name<T of a0, *tile>`` from ``source`` (the only launch site)."""
    ctype = _ctype(a0)
    check_launch(source, name, ctype, grid, block, args)
    expr = f"{name}<{','.join((ctype, *map(str, tile)))}>"
    _kernel(source, expr)(grid, block, args)


_SM_COUNT: list[int] = []


def _sm_count() -> int:
    if not _SM_COUNT:
        dev = cp.cuda.Device()
        _SM_COUNT.append(int(dev.attributes["MultiProcessorCount"]))
    return _SM_COUNT[0]


def _ctype(a) -> str:
    return CTYPE[str(a.dtype)]


def _i32(*vals, op="kernel"):
    out = []
    for v in vals:
        v = int(v)
        if not 0 <= v <= INT_MAX:
            raise ValueError(f"{op}: size {v} does not fit the kernel's 32-bit int parameters")
        out.append(np.int32(v))
    return out


def _check_size(op, **arrays):
    """Inputs the kernels index with int: refused before anything is allocated."""
    for name, a in arrays.items():
        if a is not None and int(np.prod(tuple(a.shape), dtype=object)) > INT_MAX:
            raise ValueError(f"{op}: input {name} of shape {tuple(a.shape)} has 2^31 elements or more; "
                             f"the kernel indexes inputs with 32-bit int")


def _contig(a):
    return cp.ascontiguousarray(a)


def gemm_tile(M: int, N: int):
    """((BM, BN), row blocks, column blocks) for an M x N output: the tile of TILES with the
    least padded work, (M and N rounded up to the tile) x (1 + w (1/BM + 1/BN)), the second
    factor being the tile's load overhead; ties go to the earlier (larger) tile."""
    best = None
    for bm, bn in TILES:
        gm, gn = -(-M // bm), -(-N // bn)
        if gm > 65535:
            continue
        cost = gm * bm * gn * bn * (1 + TILE_LOAD_WEIGHT * (1 / bm + 1 / bn))
        if best is None or cost < best[0]:
            best = (cost, (bm, bn), gm, gn)
    if best is None:
        raise ValueError(f"GEMM with {M} rows exceeds the grid's y limit")
    return best[1:]


def gemm_plan(M: int, N: int, K: int, sm_count: int):
    """Tile, grid and K chunk for an (M x N, depth K) GEMM.

    Returns ((BM, BN), grid (gx, gy, gz), kchunk). Split-K (gz > 1) only when the
    output tiles alone would leave the GPU mostly idle and K is long enough that
    each slice still does >= 4 BK steps.
    """
    (bm, bn), gm, gn = gemm_tile(M, N)
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
    for what, v in (("M", M), ("N", N), ("K", K)):
        # the GEMM body walks rows, columns and depth with int (the output itself is 64-bit)
        if int(v) > GEMM_EXTENT_MAX:
            raise ValueError(f"{name}: GEMM extent {what} = {int(v)} for output shape {tuple(out_shape)} "
                             f"exceeds the kernel's 32-bit int range ({GEMM_EXTENT_MAX})")
    if M == 0 or N == 0:
        return cp.zeros(out_shape, dtype=dtype)
    (bm, bn), grid, kchunk = gemm_plan(M, N, K, _sm_count())
    out = (cp.zeros if grid[2] > 1 else cp.empty)(out_shape, dtype=dtype)
    _launch("gemm_conv.cu", name, a0, grid, (GEMM_THREADS,), build_args(out, np.int32(kchunk)), tile=(bm, bn))
    return out


def _conv_args(x_shape, w_shape, out_hw, stride, pads, op):
    n, c, h, wd = x_shape
    o, _, kh, kw = w_shape
    return _i32(n, c, h, wd, o, kh, kw, out_hw[0], out_hw[1], stride[0], stride[1], pads[0], pads[2], op=op)


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
    _check_size("conv2d", x=x, w=w)
    n, c = x.shape[:2]
    o, _, kh, kw = w.shape
    oh, ow = _out_hw(x.shape, w.shape, stride, pads)
    bias = _contig(b) if b is not None else w  # w is a placeholder pointer when has_bias = 0
    shape_args = _conv_args(x.shape, w.shape, (oh, ow), stride, pads, "conv2d")
    has_bias = np.int32(b is not None)
    return _run_gemm(
        "conv2d_fwd", x, o, n * oh * ow, c * kh * kw, (n, o, oh, ow),
        lambda out, kc: (x, w, bias, out, has_bias, *shape_args, kc),
    )


@register("conv2d_grad_input", "cupy")
def conv2d_grad_input(gy, w, x_shape, stride, pads):
    """gy (N, O, OH, OW), w (O, C, kh, kw) -> gx (N, C, H, W) = x_shape."""
    gy, w = _contig(gy), _contig(w)
    _check_size("conv2d_grad_input", gy=gy, w=w)
    n, c, h, wd = (int(v) for v in x_shape)
    o, _, kh, kw = w.shape
    shape_args = _conv_args((n, c, h, wd), w.shape, gy.shape[2:], stride, pads, "conv2d_grad_input")
    return _run_gemm(
        "conv2d_bwd_input", gy, c, n * h * wd, o * kh * kw, (n, c, h, wd),
        lambda out, kc: (gy, w, out, *shape_args, kc),
    )


@register("conv2d_grad_weight", "cupy")
def conv2d_grad_weight(x, gy, w_shape, stride, pads):
    """x (N, C, H, W), gy (N, O, OH, OW) -> gw of ``w_shape`` (O, C, kh, kw)."""
    x, gy = _contig(x), _contig(gy)
    _check_size("conv2d_grad_weight", x=x, gy=gy)
    o, c, kh, kw = (int(v) for v in w_shape)
    n, _, oh, ow = gy.shape
    shape_args = _conv_args(x.shape, (o, c, kh, kw), (oh, ow), stride, pads, "conv2d_grad_weight")
    return _run_gemm(
        "conv2d_bwd_weight", x, o, c * kh * kw, n * oh * ow, (o, c, kh, kw),
        lambda out, kc: (x, gy, out, *shape_args, kc),
    )


# ------------------------------------------------------------------ dense

@register("dense", "cupy")
def dense(x, w, b):
    """x (N, I), w (O, I), b (O,) or None -> x w^T + b (N, O)."""
    x, w = _contig(x), _contig(w)
    _check_size("dense", x=x, w=w)
    n, i = x.shape
    o = w.shape[0]
    bias = _contig(b) if b is not None else w
    has_bias = np.int32(b is not None)
    dims = _i32(n, i, o, op="dense")
    return _run_gemm("dense_fwd", x, n, o, i, (n, o), lambda out, kc: (x, w, bias, out, has_bias, *dims, kc))


@register("dense_grad_input", "cupy")
def dense_grad_input(gy, w):
    """gy (N, O), w (O, I) -> gy w (N, I)."""
    gy, w = _contig(gy), _contig(w)
    _check_size("dense_grad_input", gy=gy, w=w)
    n, o = gy.shape
    i = w.shape[1]
    dims = _i32(n, i, o, op="dense_grad_input")
    return _run_gemm("dense_bwd_input", gy, n, i, o, (n, i), lambda out, kc: (gy, w, out, *dims, kc))


@register("dense_grad_weight", "cupy")
def dense_grad_weight(x, gy):
    """x (N, I), gy (N, O) -> gy^T x (O, I)."""
    x, gy = _contig(x), _contig(gy)
    _check_size("dense_grad_weight", x=x, gy=gy)
    n, i = x.shape
    o = gy.shape[1]
    dims = _i32(n, i, o, op="dense_grad_weight")
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
    y = cp.empty_like(x)
    npairs, inner = _pairs(x)
    if npairs:
        grid, block = _ew_grid(npairs)
        _launch("elementwise.cu", "minmax_fwd", x, grid, block, (x, y, np.int64(npairs), np.int64(inner)))
    return y


@register("minmax_grad", "cupy")
def minmax_grad(x, gy):
    """x, gy (N, C, ...) -> gx: gy routed back through the pair sort (ties keep order)."""
    x, gy = _contig(x), _contig(gy)
    if tuple(gy.shape) != tuple(x.shape):
        raise ValueError(f"minmax_grad: gy of shape {tuple(gy.shape)} does not match x {tuple(x.shape)}")
    gx = cp.empty_like(x)
    npairs, inner = _pairs(x)
    if npairs:
        grid, block = _ew_grid(npairs)
        _launch("elementwise.cu", "minmax_bwd", x, grid, block, (x, gy, gx, np.int64(npairs), np.int64(inner)))
    return gx


# ------------------------------------------------------------------ Adam

@register("adam_update", "cupy")
def adam_update(p, g, m, v, lr_t, beta1, beta2, epsilon):
    """In-place Adam step on same-shape arrays p, g, m, v (p, m, v must be C-contiguous)."""
    for name, a in (("p", p), ("m", m), ("v", v)):
        if not a.flags.c_contiguous:
            raise ValueError(f"adam_update updates {name} in place and needs it C-contiguous (shape {tuple(a.shape)})")
    for name, a in (("g", g), ("m", m), ("v", v)):
        if tuple(a.shape) != tuple(p.shape):  # the kernel walks all four with p's size
            raise ValueError(f"adam_update: {name} of shape {tuple(a.shape)} does not match p {tuple(p.shape)}")
    g = _contig(g)
    n = p.size
    if n == 0:
        return
    st = p.dtype.type
    grid, block = _ew_grid(n)
    _launch("elementwise.cu", "adam_step", p, grid, block,
            (p, g, m, v, st(lr_t), st(beta1), st(beta2), st(epsilon), np.int64(n)))


# ------------------------------------------------------------------ power method

def _l2(a, scale: bool):
    """||a|| as a 0-d array; with ``scale`` also normalises ``a`` (contiguous) in place."""
    _check_size("l2_normalize", a=a)
    nrm = cp.empty((), dtype=a.dtype)
    _launch("elementwise.cu", "l2_normalize", a, (1,), (RED_THREADS,),
            (a, nrm, *_i32(a.size, op="l2_normalize"), np.int32(bool(scale))))
    return nrm


def _power_steps(v, iters, apply, adjoint):
    """``iters`` steps v <- A^T u / ||A^T u||, u = A v / ||A v||. As the CPU ops do, a step
    where A v or A^T u is exactly 0 keeps the previous iterate: chosen on the device
    (cupy.where on the 0-d norms), so the steps need no host sync."""
    for _ in range(int(iters)):
        u = apply(v)
        nu = _l2(u, scale=True)
        z = adjoint(u)
        nz = _l2(z, scale=True)
        v = cp.where((nu == 0) | (nz == 0), v, z)
    return v


@register("conv2d_power_steps", "cupy")
def conv2d_power_steps(v, w, iters, stride, pads):
    """The CPU op's contract: v (1, C, H, W), w (O, C, kh, kw) -> (v after ``iters`` steps,
    ok). ok is None: whether a norm was 0 is known only on the device."""
    v = _contig(v)
    return _power_steps(v, iters, lambda a: conv2d(a, w, None, stride, pads),
                        lambda b: conv2d_grad_input(b, w, v.shape, stride, pads)), None


@register("dense_power_steps", "cupy")
def dense_power_steps(v, w, iters):
    """v (1, I), w (O, I) -> (v after ``iters`` steps, None); see conv2d_power_steps."""
    shape = v.shape
    v = _contig(v).reshape(1, -1)
    return _power_steps(v, iters, lambda a: dense(a, w, None),
                        lambda b: dense_grad_input(b, w)).reshape(shape), None


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
    _launch("elementwise.cu", "dense_power_step", w, (1,), (RED_THREADS,),
            (w, vc, u, out, sigma, *_i32(o, i, op="dense_power_step")))
    return out, sigma

"""Every op on every backend against the ``reference`` oracle, and the oracle itself
against independent formulas (scalar loops, explicit operator matrices).

Fresh random inputs each run (the seed is printed by the ``rng`` fixture and shown on
failure; GLORO_TEST_SEED replays it). Tolerances are relative to ``mag``, the same
op applied to |inputs|, which bounds the sum of absolute terms behind each entry:
float32 1e-4, float64 1e-10. GPU backends run through helpers.call (CuPy in and out)
and skip with the registry's reason where there is no CUDA device.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_close, backend_params, call, need

import kernels

RTOL = {np.float32: 1e-4, np.float64: 1e-10}
DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]
BACKENDS = backend_params()
ALL_BACKENDS = backend_params(["reference"] + [p.values[0] for p in BACKENDS])

# (n, c, h, w, o, kh, kw, stride, padding): odd/even sizes, strides 1-3, kernels 1-5 and 7,
# same/valid/int/pair paddings, batch 1 and > 1, non-square kernels and strides
CONV_CASES = [
    (1, 1, 5, 5, 1, 1, 1, 1, "valid"),
    (2, 3, 7, 8, 4, 3, 3, 1, "same"),
    (3, 2, 9, 6, 5, 4, 4, 2, "same"),
    (2, 4, 8, 8, 3, 4, 4, 2, "valid"),
    (1, 3, 11, 10, 2, 5, 5, 3, "same"),
    (2, 2, 10, 9, 3, 2, 2, 3, "valid"),
    (3, 1, 6, 7, 2, 3, 3, 2, 1),
    (2, 3, 13, 12, 4, 7, 7, 1, "same"),
    (1, 2, 5, 6, 3, 5, 3, (2, 1), 2),
    (4, 5, 6, 6, 6, 3, 3, 1, 2),
    (2, 2, 4, 4, 2, 4, 4, 1, "valid"),
    (5, 6, 12, 12, 8, 4, 4, 2, "same"),
    (1, 1, 7, 5, 1, 2, 2, 2, "same"),
    (2, 3, 9, 9, 4, 3, 3, 3, (0, 2)),
]


def _conv_id(case):
    n, c, h, w, o, kh, kw, s, p = case
    s = f"{s[0]}x{s[1]}" if isinstance(s, tuple) else s
    p = f"{p[0]}x{p[1]}" if isinstance(p, tuple) else p
    return f"n{n}c{c}_{h}x{w}_o{o}_k{kh}x{kw}_s{s}_p{p}"


CONV = [pytest.param(c, id=_conv_id(c)) for c in CONV_CASES]


def _normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _conv_inputs(rng, case, dtype):
    n, c, h, wd, o, kh, kw, s, p = case
    x = _normal(rng, (n, c, h, wd), dtype)
    w = _normal(rng, (o, c, kh, kw), dtype)
    b = _normal(rng, (o,), dtype)
    return x, w, b, s, p


def _ref(op, *args, **kw):
    return getattr(kernels, op)(*args, backend="reference", **kw)


# ---------------------------------------------------------------- the oracle itself

def _tf_same(n, k, s):
    """TensorFlow SAME padding, written out independently of kernels.checks."""
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _conv_scalar(x, w, b, s, pads):
    """Seven nested loops, float64: the definition of the conv, nothing else."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (pt, pb, pl, pr) = s, pads
    oh, ow = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1
    y = np.zeros((n, o, oh, ow))
    for ni in range(n):
        for oi in range(o):
            for i in range(oh):
                for j in range(ow):
                    acc = 0.0 if b is None else float(b[oi])
                    for ci in range(c):
                        for p in range(kh):
                            for q in range(kw):
                                r, col = i * sh + p - pt, j * sw + q - pl
                                if 0 <= r < h and 0 <= col < wd:
                                    acc += float(x[ni, ci, r, col]) * float(w[oi, ci, p, q])
                    y[ni, oi, i, j] = acc
    return y


@pytest.mark.parametrize("case", [
    (2, 2, 5, 6, 3, 3, 3, 1, "same"),
    (1, 3, 7, 5, 2, 4, 2, 2, "same"),
    (2, 1, 6, 7, 2, 2, 3, 3, "valid"),
    (1, 2, 4, 5, 2, 3, 3, 2, 1),
], ids=_conv_id)
def test_reference_conv_matches_scalar_loops(rng, case):
    n, c, h, wd, o, kh, kw, s, p = case
    x, w, b = rng.standard_normal((n, c, h, wd)), rng.standard_normal((o, c, kh, kw)), rng.standard_normal(o)
    sp = s if isinstance(s, tuple) else (s, s)
    if p == "same":
        pads = _tf_same(h, kh, sp[0]) + _tf_same(wd, kw, sp[1])
    elif p == "valid":
        pads = (0, 0, 0, 0)
    else:
        pads = (p, p, p, p)
    got = _ref("conv2d", x, w, b, s, p)
    np.testing.assert_allclose(got, _conv_scalar(x, w, b, sp, pads), rtol=1e-12, atol=1e-12)


def test_reference_same_padding_puts_extra_pixel_bottom_right():
    """A delta kernel at (1, 1) with k=2, s=1: total pad 1, all of it after the image,
    so y[i, j] = x[i+1, j+1] and the last row/column read the zero padding."""
    x = np.arange(1.0, 13.0).reshape(1, 1, 3, 4)
    w = np.zeros((1, 1, 2, 2))
    w[0, 0, 1, 1] = 1.0
    y = _ref("conv2d", x, w, None, 1, "same")
    want = np.zeros((1, 1, 3, 4))
    want[0, 0, :2, :3] = x[0, 0, 1:, 1:]
    np.testing.assert_array_equal(y, want)


def _operator_matrix(fn, in_shape):
    """Columns = fn(e_k) for the basis vectors of ``in_shape``: the explicit linear map."""
    size = math.prod(in_shape)
    cols = []
    for k in range(size):
        e = np.zeros(size)
        e[k] = 1.0
        cols.append(fn(e.reshape(in_shape)).ravel())
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("case", [
    (2, 2, 5, 4, 3, 3, 3, 2, "same"),
    (1, 2, 6, 5, 2, 4, 4, 2, "same"),
    (2, 1, 7, 7, 2, 3, 2, 3, "valid"),
    (1, 2, 4, 4, 3, 2, 2, 1, 1),
], ids=_conv_id)
def test_reference_conv_grads_are_explicit_transposes(rng, case):
    """grad_input = A^T gy and grad_weight = B^T gy, where A (x -> conv(x, w)) and
    B (w -> conv(x, w)) are built column by column from the forward oracle."""
    n, c, h, wd, o, kh, kw, s, p = case
    x, w = rng.standard_normal((n, c, h, wd)), rng.standard_normal((o, c, kh, kw))
    y = _ref("conv2d", x, w, None, s, p)
    gy = rng.standard_normal(y.shape)
    a = _operator_matrix(lambda v: _ref("conv2d", v, w, None, s, p), x.shape)
    bm = _operator_matrix(lambda v: _ref("conv2d", x, v, None, s, p), w.shape)
    gx = _ref("conv2d_grad_input", gy, w, x.shape, s, p)
    gw = _ref("conv2d_grad_weight", x, gy, (kh, kw), s, p)
    np.testing.assert_allclose(gx.ravel(), a.T @ gy.ravel(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw.ravel(), bm.T @ gy.ravel(), rtol=1e-12, atol=1e-12)


def test_reference_dense_and_minmax_match_formulas(rng):
    x, w, b = rng.standard_normal((4, 7)), rng.standard_normal((5, 7)), rng.standard_normal(5)
    gy = rng.standard_normal((4, 5))
    np.testing.assert_allclose(_ref("dense", x, w, b), x @ w.T + b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_ref("dense_grad_input", gy, w), gy @ w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_ref("dense_grad_weight", x, gy), gy.T @ x, rtol=1e-12, atol=1e-12)
    z = rng.standard_normal((3, 6, 2, 3))
    pairs = np.sort(z.reshape(3, 3, 2, 2, 3), axis=2).reshape(z.shape)
    np.testing.assert_array_equal(_ref("minmax", z), pairs)


# ---------------------------------------------------------------- conv: backends vs oracle

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV)
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d(backend, case, dtype, bias, rng):
    need(backend)
    x, w, b, s, p = _conv_inputs(rng, case, dtype)
    b = b if bias else None
    got = call("conv2d", backend, x, w, b, s, p)
    want = _ref("conv2d", x, w, b, s, p)
    mag = _ref("conv2d", np.abs(x).astype(np.float64), np.abs(w).astype(np.float64),
               None if b is None else np.abs(b).astype(np.float64), s, p)
    assert got.dtype == x.dtype
    assert_close(got, want, mag, RTOL[dtype], f"conv2d[{backend}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV)
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_grad_input(backend, case, dtype, rng):
    need(backend)
    x, w, _, s, p = _conv_inputs(rng, case, dtype)
    gy = _normal(rng, _ref("conv2d", x, w, None, s, p).shape, dtype)
    got = call("conv2d_grad_input", backend, gy, w, x.shape, s, p)
    want = _ref("conv2d_grad_input", gy, w, x.shape, s, p)
    mag = _ref("conv2d_grad_input", np.abs(gy).astype(np.float64), np.abs(w).astype(np.float64), x.shape, s, p)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert_close(got, want, mag, RTOL[dtype], f"conv2d_grad_input[{backend}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV)
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_grad_weight(backend, case, dtype, rng):
    need(backend)
    x, w, _, s, p = _conv_inputs(rng, case, dtype)
    khw = w.shape[2:]
    gy = _normal(rng, _ref("conv2d", x, w, None, s, p).shape, dtype)
    got = call("conv2d_grad_weight", backend, x, gy, khw, s, p)
    want = _ref("conv2d_grad_weight", x, gy, khw, s, p)
    mag = _ref("conv2d_grad_weight", np.abs(x).astype(np.float64), np.abs(gy).astype(np.float64), khw, s, p)
    assert got.shape == w.shape and got.dtype == x.dtype
    assert_close(got, want, mag, RTOL[dtype], f"conv2d_grad_weight[{backend}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_conv_adjoint_identity(backend, case, dtype, rng):
    """<A x, y> == <x, A^T y> (input adjoint, the power method's A^T) and
    <A_w x, y> == <w, grad_weight(x, y)>, using the backend alone."""
    need(backend)
    x, w, _, s, p = _conv_inputs(rng, case, dtype)
    ax = call("conv2d", backend, x, w, None, s, p)
    y = _normal(rng, ax.shape, dtype)
    aty = call("conv2d_adjoint", backend, y, w, x.shape, s, p)
    gw = call("conv2d_grad_weight", backend, x, y, w.shape[2:], s, p)
    f = np.float64
    lhs = np.sum(ax.astype(f) * y)
    mag = np.sum(_ref("conv2d", np.abs(x).astype(f), np.abs(w).astype(f), None, s, p) * np.abs(y))
    tol = RTOL[dtype] * mag
    assert abs(lhs - np.sum(x.astype(f) * aty)) <= tol, (lhs, np.sum(x.astype(f) * aty), tol)
    assert abs(lhs - np.sum(w.astype(f) * gw)) <= tol, (lhs, np.sum(w.astype(f) * gw), tol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_same_output_size_is_ceil(backend, rng):
    """SAME gives ceil(n/s) outputs per axis, and the adjoint returns exactly x's shape."""
    need(backend)
    for h, wd in [(1, 1), (2, 3), (5, 4), (7, 9), (8, 8)]:
        for k in range(1, 6):
            for s in range(1, 4):
                x = _normal(rng, (1, 2, h, wd), np.float32)
                w = _normal(rng, (3, 2, k, k), np.float32)
                y = call("conv2d", backend, x, w, None, s, "same")
                assert y.shape == (1, 3, -(-h // s), -(-wd // s)), (h, wd, k, s, y.shape)
                gx = call("conv2d_grad_input", backend, y, w, x.shape, s, "same")
                assert gx.shape == x.shape and gx.dtype == np.float32, (h, wd, k, s, gx.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_noncontiguous_inputs(backend, rng):
    """Views (NHWC transposed to NCHW, strided slices) give the same answers."""
    need(backend)
    x = np.ascontiguousarray(rng.standard_normal((3, 7, 6, 4))).transpose(0, 3, 1, 2)  # (3, 4, 7, 6)
    w = rng.standard_normal((5, 8, 3, 3))[:, ::2]  # (5, 4, 3, 3)
    y = call("conv2d", backend, x, w, None, 2, "same")
    mag = _ref("conv2d", np.abs(x), np.abs(w), None, 2, "same")
    assert_close(y, _ref("conv2d", x, w, None, 2, "same"), mag, 1e-10, f"conv2d view[{backend}]")
    gy = rng.standard_normal((y.shape[0], y.shape[2], y.shape[3], y.shape[1])).transpose(0, 3, 1, 2)
    gx = call("conv2d_grad_input", backend, gy, w, x.shape, 2, "same")
    gw = call("conv2d_grad_weight", backend, x, gy, (3, 3), 2, "same")
    assert_close(gx, _ref("conv2d_grad_input", gy, w, x.shape, 2, "same"),
                 _ref("conv2d_grad_input", np.abs(gy), np.abs(w), x.shape, 2, "same"), 1e-10, "grad_input view")
    assert_close(gw, _ref("conv2d_grad_weight", x, gy, (3, 3), 2, "same"),
                 _ref("conv2d_grad_weight", np.abs(x), np.abs(gy), (3, 3), 2, "same"), 1e-10, "grad_weight view")


# ---------------------------------------------------------------- dense

DENSE = [pytest.param(c, id=f"n{c[0]}_i{c[1]}_o{c[2]}") for c in [(1, 1, 1), (3, 7, 5), (8, 33, 16), (2, 64, 10)]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DENSE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_ops(backend, case, dtype, rng):
    need(backend)
    n, i, o = case
    x, w, b, gy = (_normal(rng, s, dtype) for s in [(n, i), (o, i), (o,), (n, o)])
    ax, aw, ab, agy = (np.abs(a).astype(np.float64) for a in (x, w, b, gy))
    r = RTOL[dtype]
    for bias, magb in [(b, ab), (None, None)]:
        got = call("dense", backend, x, w, bias)
        assert got.dtype == x.dtype
        assert_close(got, _ref("dense", x, w, bias), _ref("dense", ax, aw, magb), r, f"dense[{backend}]")
    assert_close(call("dense_grad_input", backend, gy, w), _ref("dense_grad_input", gy, w),
                 _ref("dense_grad_input", agy, aw), r, f"dense_grad_input[{backend}]")
    assert_close(call("dense_grad_weight", backend, x, gy), _ref("dense_grad_weight", x, gy),
                 _ref("dense_grad_weight", ax, agy), r, f"dense_grad_weight[{backend}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dense_adjoint_identity(backend, dtype, rng):
    """<x W^T, y> == <x, y W> == <W, y^T x>."""
    need(backend)
    x, w = _normal(rng, (6, 13), dtype), _normal(rng, (9, 13), dtype)
    y = _normal(rng, (6, 9), dtype)
    f = np.float64
    lhs = np.sum(call("dense", backend, x, w, None).astype(f) * y)
    via_x = np.sum(x.astype(f) * call("dense_adjoint", backend, y, w))
    via_w = np.sum(w.astype(f) * call("dense_grad_weight", backend, x, y))
    tol = RTOL[dtype] * np.sum((np.abs(x).astype(f) @ np.abs(w).T) * np.abs(y))
    assert abs(lhs - via_x) <= tol and abs(lhs - via_w) <= tol, (lhs, via_x, via_w, tol)


# ---------------------------------------------------------------- MinMax

MINMAX_SHAPES = [pytest.param(s, id="x".join(map(str, s))) for s in [(2, 4), (1, 2), (3, 6, 5, 7), (1, 2, 1, 1), (4, 8, 3)]]


def _with_ties(rng, shape, dtype):
    """Random values where about a third of the pairs are exact ties and the rest are
    strictly ordered both ways."""
    x = _normal(rng, shape, dtype)
    tie = rng.random((shape[0], shape[1] // 2) + tuple(shape[2:])) < 0.35
    x[:, 1::2] = np.where(tie, x[:, 0::2], x[:, 1::2])
    return x, tie


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MINMAX_SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_minmax(backend, shape, dtype, rng):
    need(backend)
    x, _ = _with_ties(rng, shape, dtype)
    got = call("minmax", backend, x)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, _ref("minmax", x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MINMAX_SHAPES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_minmax_grad_and_tie_rule(backend, shape, dtype, rng):
    """Exact routing: swapped pairs swap gy; ties route gy[2k] -> 2k, gy[2k+1] -> 2k+1."""
    need(backend)
    x, tie = _with_ties(rng, shape, dtype)
    gy = _normal(rng, shape, dtype)
    got = call("minmax_grad", backend, x, gy)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, _ref("minmax_grad", x, gy))
    swap = x[:, 0::2] > x[:, 1::2]
    assert not (swap & tie).any()
    np.testing.assert_array_equal(got[:, 0::2], np.where(swap, gy[:, 1::2], gy[:, 0::2]))
    np.testing.assert_array_equal(got[:, 1::2], np.where(swap, gy[:, 0::2], gy[:, 1::2]))
    if tie.any():  # the tie rule on its own
        np.testing.assert_array_equal(got[:, 0::2][tie], gy[:, 0::2][tie])
        np.testing.assert_array_equal(got[:, 1::2][tie], gy[:, 1::2][tie])


# ---------------------------------------------------------------- fused Adam

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_adam_update(backend, dtype, rng):
    """Three in-place steps against the Keras-form formula written out in float64."""
    need(backend)
    from helpers import to_device, to_host

    shape = (7, 5, 3)
    p0 = _normal(rng, shape, dtype)
    p, m, v = (to_device(backend, a) for a in (p0.copy(), np.zeros(shape, dtype), np.zeros(shape, dtype)))
    pe, me, ve = p0.astype(np.float64), np.zeros(shape), np.zeros(shape)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-7
    for t in range(1, 4):
        g = _normal(rng, shape, dtype)
        lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        kernels.adam_update(p, to_device(backend, g), m, v, lr_t, b1, b2, eps, backend=backend)
        ge = g.astype(np.float64)
        me = b1 * me + (1 - b1) * ge
        ve = b2 * ve + (1 - b2) * ge * ge
        pe = pe - lr_t * me / (np.sqrt(ve) + eps)
    r = 1e-5 if dtype == np.float32 else 1e-12
    for name, got, want in [("p", p, pe), ("m", m, me), ("v", v, ve)]:
        got = to_host(got)
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got, want, rtol=r, atol=r * np.abs(want).max(), err_msg=name)


# ---------------------------------------------------------------- numpy backend: chunks and scratch

@pytest.mark.parametrize("per_chunk", [1, 2, 64], ids=["1/chunk", "2/chunk-ragged", "1chunk"])
@pytest.mark.parametrize("case", [CONV[2], CONV[4], CONV[8], CONV[11]])  # pytest unwraps the params
def test_numpy_chunk_boundaries(monkeypatch, case, per_chunk, rng):
    """Batches split into 1-sample, ragged 2-sample and single chunks agree with the oracle."""
    from kernels import numpy_backend

    n, c, h, wd, o, kh, kw, s, p = case
    case = (5, c, h, wd, o, kh, kw, s, p)
    x, w, b, s, p = _conv_inputs(rng, case, np.float64)
    g = numpy_backend._Geom(x.shape, w.shape, s if isinstance(s, tuple) else (s, s),
                            kernels.resolve_padding(p, (h, wd), (kh, kw), s if isinstance(s, tuple) else (s, s)))
    monkeypatch.setattr(numpy_backend, "CHUNK_BYTES", per_chunk * g.k * g.t * 8)
    monkeypatch.setattr(numpy_backend, "MIN_CHUNK_SAMPLES", 1)
    assert g.chunk(5, 8) == min(per_chunk, 5)
    y = call("conv2d", "numpy", x, w, b, s, p)
    assert_close(y, _ref("conv2d", x, w, b, s, p), _ref("conv2d", np.abs(x), np.abs(w), np.abs(b), s, p), 1e-10, "conv2d")
    gy = rng.standard_normal(y.shape)
    assert_close(call("conv2d_grad_input", "numpy", gy, w, x.shape, s, p), _ref("conv2d_grad_input", gy, w, x.shape, s, p),
                 _ref("conv2d_grad_input", np.abs(gy), np.abs(w), x.shape, s, p), 1e-10, "grad_input")
    assert_close(call("conv2d_grad_weight", "numpy", x, gy, (kh, kw), s, p), _ref("conv2d_grad_weight", x, gy, (kh, kw), s, p),
                 _ref("conv2d_grad_weight", np.abs(x), np.abs(gy), (kh, kw), s, p), 1e-10, "grad_weight")


def test_numpy_scratch_reuse_leaves_no_stale_data(rng):
    """Big, then small, then big again through the same scratch buffers (both dtypes)."""
    for dtype in (np.float64, np.float32, np.float64):
        for case in (CONV_CASES[11], CONV_CASES[0], CONV_CASES[6], CONV_CASES[11]):
            x, w, b, s, p = _conv_inputs(rng, case, dtype)
            y = call("conv2d", "numpy", x, w, b, s, p)
            mag = _ref("conv2d", np.abs(x).astype(np.float64), np.abs(w).astype(np.float64), np.abs(b).astype(np.float64), s, p)
            assert_close(y, _ref("conv2d", x, w, b, s, p), mag, RTOL[dtype], f"conv2d {case}")
            gy = _normal(rng, y.shape, dtype)
            gx = call("conv2d_grad_input", "numpy", gy, w, x.shape, s, p)
            mag = _ref("conv2d_grad_input", np.abs(gy).astype(np.float64), np.abs(w).astype(np.float64), x.shape, s, p)
            assert_close(gx, _ref("conv2d_grad_input", gy, w, x.shape, s, p), mag, RTOL[dtype], f"grad_input {case}")

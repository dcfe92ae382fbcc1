"""Every differentiable op against float64 finite differences, plus values and dtypes.

Tiny inputs: per-element central differences. Conv/dense and bigger: one random
direction over all inputs at once. Kinks (ReLU/abs at 0, max and MinMax ties)
are kept out of reach of the finite differences by resampling.
"""
import numpy as np
import pytest

import nn
from nn import F, Tensor
from nn.gradcheck import check_backward, check_backward_elementwise


def away_from_zero(rng, shape, gap=1e-2):
    a = rng.standard_normal(shape)
    while (np.abs(a) < gap).any():
        a = rng.standard_normal(shape)
    return a


def distinct(rng, shape, gap=1e-2):
    """Normal samples whose entries are pairwise at least ``gap`` apart (no max ties)."""
    while True:
        a = rng.standard_normal(shape)
        s = np.sort(a.reshape(-1))
        if s.size < 2 or np.diff(s).min() > gap:
            return a


def pairs_apart(rng, shape, gap=1e-2):
    """MinMax inputs: channel pairs (2k, 2k+1) at least ``gap`` apart."""
    while True:
        a = rng.standard_normal(shape)
        if (np.abs(a[:, 0::2] - a[:, 1::2]) > gap).all():
            return a


# ------------------------------------------------------------------ elementwise, per element

UNARY = {
    "neg": (lambda x: F.neg(x), lambda r, s: r.standard_normal(s)),
    "exp": (lambda x: F.exp(x), lambda r, s: r.standard_normal(s)),
    "log": (lambda x: F.log(x), lambda r, s: r.uniform(0.2, 3.0, s)),
    "sqrt": (lambda x: F.sqrt(x), lambda r, s: r.uniform(0.2, 3.0, s)),
    "square": (lambda x: F.square(x), lambda r, s: r.standard_normal(s)),
    "power3": (lambda x: x ** 3, lambda r, s: r.standard_normal(s)),
    "power_half": (lambda x: x ** 0.5, lambda r, s: r.uniform(0.2, 3.0, s)),
    "abs": (lambda x: F.abs(x), away_from_zero),
    "relu": (lambda x: F.relu(x), away_from_zero),
    "astype_roundtrip": (lambda x: F.astype(F.astype(x, np.float32), np.float64) * 1.0, None),
}


@pytest.mark.parametrize("name", [k for k in UNARY if UNARY[k][1] is not None])
def test_unary_elementwise_grad(rng, name):
    fn, sample = UNARY[name]
    check_backward_elementwise(fn, [sample(rng, (3, 4))], rng=rng)


def test_unary_values(rng):
    a = rng.uniform(0.2, 3.0, (5,))
    b = rng.standard_normal(5)
    np.testing.assert_allclose(F.exp(Tensor(a)).data, np.exp(a))
    np.testing.assert_allclose(F.log(Tensor(a)).data, np.log(a))
    np.testing.assert_allclose(F.sqrt(Tensor(a)).data, np.sqrt(a))
    np.testing.assert_allclose(F.relu(Tensor(b)).data, np.maximum(b, 0))
    np.testing.assert_allclose(F.abs(Tensor(b)).data, np.abs(b))


def test_relu_grad_at_zero_is_zero():
    x = Tensor(np.array([-1.0, 0.0, 2.0]), requires_grad=True)
    F.relu(x).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 1.0])


def test_astype_grad_cast_back(rng):
    x = Tensor(rng.standard_normal(3), requires_grad=True)
    y = F.astype(x, np.float32)
    assert y.dtype == np.float32
    (y * 2.0).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad, 2.0)


# ------------------------------------------------------------------ matmul

@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 2)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)),
                                   ((4,), (4, 3)), ((3, 4), (4,)), ((4,), (4,))])
def test_matmul_grad_and_value(rng, sa, sb):
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    np.testing.assert_allclose(F.matmul(Tensor(a), Tensor(b)).data, a @ b, rtol=1e-13)
    check_backward_elementwise(F.matmul, [a, b], rng=rng)


# ------------------------------------------------------------------ reductions

@pytest.mark.parametrize("axis,keepdims", [(None, False), (None, True), (0, False), (1, True), (-1, False),
                                           ((0, 2), False), ((0, 2), True)])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_sum_mean(rng, op, axis, keepdims):
    a = rng.standard_normal((2, 3, 4))
    out = getattr(F, op)(Tensor(a), axis, keepdims)
    np.testing.assert_allclose(out.data, getattr(np, op)(a, axis=axis, keepdims=keepdims), rtol=1e-13)
    check_backward_elementwise(lambda x: getattr(F, op)(x, axis, keepdims), [a], rng=rng)


@pytest.mark.parametrize("axis,keepdims", [(None, False), (0, False), (1, True), (-1, False), ((0, 2), True),
                                           ((1, 2), False)])
@pytest.mark.parametrize("op", ["max", "min"])
def test_max_min(rng, op, axis, keepdims):
    a = distinct(rng, (2, 3, 4))
    out = getattr(F, op)(Tensor(a), axis, keepdims)
    np.testing.assert_array_equal(out.data, getattr(np, op)(a, axis=axis, keepdims=keepdims))
    check_backward_elementwise(lambda x: getattr(F, op)(x, axis, keepdims), [a], rng=rng)


def test_max_tie_goes_to_first_argmax_only():
    a = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    x = Tensor(a, requires_grad=True)
    x.max(axis=1).backward(np.array([1.0, 5.0]))
    np.testing.assert_array_equal(x.grad, [[0, 1, 0, 0], [5, 0, 0, 0]])
    y = Tensor(a, requires_grad=True)
    y.max().backward()  # global: first in C order
    np.testing.assert_array_equal(y.grad, [[0, 1, 0, 0], [0, 0, 0, 0]])
    z = Tensor(a, requires_grad=True)
    z.min(axis=0).backward(np.ones(4))
    np.testing.assert_array_equal(z.grad, [[1, 0, 0, 1], [0, 1, 1, 0]])


def test_reduction_bad_axis(rng):
    with pytest.raises(ValueError, match="out of range"):
        F.sum(Tensor(rng.standard_normal((2, 3))), axis=2)


# ------------------------------------------------------------------ shapes and indexing

def test_reshape_transpose_grads(rng):
    a = rng.standard_normal((2, 3, 4))
    check_backward_elementwise(lambda x: F.reshape(x, (4, -1)) * Tensor(np.arange(24.0).reshape(4, 6)), [a], rng=rng)
    check_backward_elementwise(lambda x: F.transpose(x, (2, 0, 1)), [a], rng=rng)
    check_backward_elementwise(lambda x: x.T, [a], rng=rng)
    check_backward_elementwise(lambda x: F.flatten(x), [a], rng=rng)


def test_transpose_bad_axes(rng):
    with pytest.raises(ValueError, match="permutation"):
        F.transpose(Tensor(rng.standard_normal((2, 3))), (0, 0))


@pytest.mark.parametrize("index", [
    (slice(1, 3), slice(None, None, 2)),
    (0,),
    (Ellipsis, 1),
    (np.array([2, 0, 2]),),
    (np.array([0, 1, 1]), np.array([3, 3, 3])),
    (slice(None), np.array([1, 1, 0])),
])
def test_getitem_grads(rng, index):
    a = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(Tensor(a)[index].data, a[index])
    check_backward_elementwise(lambda x: x[index], [a], rng=rng)


def test_take_along_axis_and_gather(rng):
    a = rng.standard_normal((4, 5))
    lab = rng.integers(0, 5, 4)
    np.testing.assert_array_equal(F.gather(Tensor(a), lab).data, a[np.arange(4), lab])
    check_backward_elementwise(lambda x: F.gather(x, lab), [a], rng=rng)
    idx = rng.integers(0, 4, (3, 5))  # repeated rows along axis 0: gradients accumulate
    np.testing.assert_array_equal(F.take_along_axis(Tensor(a), idx, 0).data, np.take_along_axis(a, idx, 0))
    check_backward_elementwise(lambda x: F.take_along_axis(x, idx, axis=0), [a], rng=rng)
    with pytest.raises(IndexError):
        F.gather(Tensor(a), np.array([0, 1, 2, 5]))
    with pytest.raises(TypeError):
        F.take_along_axis(Tensor(a), np.zeros((4, 1)), axis=1)


def test_concatenate_stack(rng):
    a, b, c = rng.standard_normal((2, 3)), rng.standard_normal((2, 1)), rng.standard_normal((2, 2))
    np.testing.assert_array_equal(F.concatenate([Tensor(a), Tensor(b), Tensor(c)], axis=1).data,
                                  np.concatenate([a, b, c], axis=1))
    check_backward_elementwise(lambda x, y, z: F.concatenate([x, y, z], axis=-1), [a, b, c], rng=rng)
    check_backward_elementwise(lambda x, y: F.stack([x, y], axis=1), [a, a + 1.0], rng=rng)
    # a constant piece gets no gradient, the others do
    x = Tensor(a, requires_grad=True)
    F.concatenate([x, b], axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad, np.ones_like(a))


def test_where_and_masked_fill(rng):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4,))
    cond = rng.random((3, 4)) > 0.5
    np.testing.assert_array_equal(F.where(cond, Tensor(a), Tensor(b)).data, np.where(cond, a, b))
    check_backward_elementwise(lambda x, y: F.where(cond, x, y), [a, b], rng=rng)
    out = F.masked_fill(Tensor(a), cond, -np.inf)
    assert np.isneginf(out.data[cond]).all()
    check_backward_elementwise(lambda x: F.masked_fill(x, cond, 7.0), [a], rng=rng)
    with pytest.raises(TypeError, match="boolean"):
        F.where(np.ones((3, 4)), Tensor(a), Tensor(a))


# ------------------------------------------------------------------ norms and softmax family

@pytest.mark.parametrize("axis,keepdims", [(None, False), (1, False), (1, True), ((1, 2), False)])
def test_l2_norm(rng, axis, keepdims):
    a = rng.standard_normal((2, 3, 4))
    np.testing.assert_allclose(F.l2_norm(Tensor(a), axis, keepdims).data,
                               np.sqrt((a * a).sum(axis=axis, keepdims=keepdims)), rtol=1e-13)
    check_backward_elementwise(lambda x: F.l2_norm(x, axis, keepdims), [a], rng=rng)


def test_l2_norm_zero_gives_zero_gradient_not_nan(rng):
    a = rng.standard_normal((3, 4))
    a[1] = 0.0
    x = Tensor(a, requires_grad=True)
    F.l2_norm(x, axis=1).sum().backward()
    assert np.isfinite(x.grad).all()
    np.testing.assert_array_equal(x.grad[1], 0.0)
    np.testing.assert_allclose(x.grad[0], a[0] / np.linalg.norm(a[0]), rtol=1e-14)


def np_log_softmax(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(axis=axis, keepdims=True))


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_log_softmax_softmax_logsumexp(rng, axis):
    a = rng.standard_normal((3, 4)) * 3
    ls = np_log_softmax(a, axis)
    np.testing.assert_allclose(F.log_softmax(Tensor(a), axis).data, ls, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(F.softmax(Tensor(a), axis).data, np.exp(ls), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(F.logsumexp(Tensor(a), axis).data, np.log(np.exp(a).sum(axis=axis)), rtol=1e-13)
    check_backward_elementwise(lambda x: F.log_softmax(x, axis), [a], rng=rng)
    check_backward_elementwise(lambda x: F.softmax(x, axis), [a], rng=rng)
    check_backward_elementwise(lambda x: F.logsumexp(x, axis, keepdims=True), [a], rng=rng)


def test_log_softmax_stable_for_huge_logits_float32():
    a = np.array([[1000.0, 0.0, -1000.0], [-5e4, -5e4, -5e4 + 1]], dtype=np.float32)
    out = F.log_softmax(Tensor(a)).data
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out[0], [0.0, -1000.0, -2000.0], atol=1e-3)
    np.testing.assert_allclose(out[1], np_log_softmax(np.array([0.0, 0.0, 1.0]), 0), rtol=1e-5)


def test_log_softmax_with_minus_inf_entry(rng):
    a = rng.standard_normal((2, 4))
    a[:, 2] = -np.inf
    x = Tensor(a, requires_grad=True)
    out = F.log_softmax(x)
    assert np.isneginf(out.data[:, 2]).all()
    np.testing.assert_allclose(out.data[:, [0, 1, 3]], np_log_softmax(a[:, [0, 1, 3]], 1), rtol=1e-13)
    F.softmax(x).backward(rng.standard_normal((2, 4)))
    assert np.isfinite(x.grad).all()
    np.testing.assert_array_equal(x.grad[:, 2], 0.0)


# ------------------------------------------------------------------ kernels: conv2d, dense, MinMax

CONV_CASES = [
    # x shape, (O, kh, kw), stride, padding
    ((2, 3, 5, 6), (4, 3, 3), 1, "same"),
    ((2, 2, 7, 6), (3, 4, 4), 2, "same"),
    ((1, 3, 6, 7), (2, 3, 3), 2, "valid"),
    ((2, 1, 5, 5), (2, 3, 3), 1, 1),
    ((1, 2, 8, 8), (4, 4, 4), 2, "valid"),
]


@pytest.mark.parametrize("xs,wk,stride,padding", CONV_CASES)
def test_conv2d_grad(rng, cpu_backend, xs, wk, stride, padding):
    x = rng.standard_normal(xs)
    w = rng.standard_normal((wk[0], xs[1], wk[1], wk[2]))
    b = rng.standard_normal(wk[0])
    check_backward(lambda x, w, b: F.conv2d(x, w, b, stride, padding), [x, w, b], rng=rng)
    check_backward(lambda x, w: F.conv2d(x, w, None, stride, padding), [x, w], rng=rng)


@pytest.mark.parametrize("xs,wk,stride,padding,out_hw", [
    ((2, 3, 9, 7), (8, 4, 4), 2, "same", (5, 4)),     # SAME: ceil(H / stride)
    ((1, 3, 6, 6), (5, 3, 2), 1, "valid", (4, 5)),    # VALID, a non-square kernel
    ((1, 3, 6, 6), (5, 3, 3), 2, 1, (3, 3)),          # explicit padding
])
def test_conv2d_output_shape_and_dtype(rng, xs, wk, stride, padding, out_hw):
    x = Tensor(rng.standard_normal(xs).astype(np.float32))
    w = Tensor(rng.standard_normal((wk[0], xs[1], wk[1], wk[2])).astype(np.float32))
    y = F.conv2d(x, w, Tensor(np.zeros(wk[0], np.float32)), stride, padding)
    assert y.shape == (xs[0], wk[0]) + out_hw and y.dtype == np.float32


def test_conv2d_elementwise_small(rng):
    x, w, b = rng.standard_normal((1, 2, 4, 5)), rng.standard_normal((2, 2, 3, 3)), rng.standard_normal(2)
    check_backward_elementwise(lambda x, w, b: F.conv2d(x, w, b, 2, "same"), [x, w, b], rng=rng)


def test_conv2d_value_against_direct_loop(rng):
    x, w, b = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 3, 3)), rng.standard_normal(2)
    y = F.conv2d(Tensor(x), Tensor(w), Tensor(b), 1, "valid").data
    want = np.zeros((2, 2, 3, 2))
    for i in range(3):
        for j in range(2):
            want[:, :, i, j] = np.einsum("nchw,ochw->no", x[:, :, i:i + 3, j:j + 3], w) + b
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_conv2d_only_input_or_only_weight_requires_grad(rng):
    x = Tensor(rng.standard_normal((1, 2, 4, 4)))
    w = Tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    F.conv2d(x, w).sum().backward()
    assert w.grad.shape == (3, 2, 3, 3) and x.grad is None
    x2 = Tensor(rng.standard_normal((1, 2, 4, 4)), requires_grad=True)
    F.conv2d(x2, Tensor(w.data)).sum().backward()
    assert x2.grad.shape == (1, 2, 4, 4)


def test_conv2d_bad_input_raises(rng):
    x = Tensor(rng.standard_normal((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="channel"):
        F.conv2d(x, Tensor(rng.standard_normal((3, 5, 3, 3))))


def test_dense_grad_and_value(rng, cpu_backend):
    x, w, b = rng.standard_normal((5, 7)), rng.standard_normal((3, 7)), rng.standard_normal(3)
    np.testing.assert_allclose(F.dense(Tensor(x), Tensor(w), Tensor(b)).data, x @ w.T + b, rtol=1e-12)
    check_backward(lambda x, w, b: F.dense(x, w, b), [x, w, b], rng=rng)
    check_backward_elementwise(lambda x, w, b: F.dense(x, w, b), [x[:2, :4], w[:, :4], b], rng=rng)
    check_backward(lambda x, w: F.dense(x, w), [x, w], rng=rng)


def test_dense_bad_input_raises(rng):
    with pytest.raises(ValueError, match="feature mismatch"):
        F.dense(Tensor(rng.standard_normal((5, 7))), Tensor(rng.standard_normal((3, 6))))


@pytest.mark.parametrize("shape", [(2, 4), (2, 6, 3, 3)])
def test_minmax_grad_and_value(rng, cpu_backend, shape):
    a = pairs_apart(rng, shape)
    out = F.minmax(Tensor(a)).data
    np.testing.assert_array_equal(out[:, 0::2], np.minimum(a[:, 0::2], a[:, 1::2]))
    np.testing.assert_array_equal(out[:, 1::2], np.maximum(a[:, 0::2], a[:, 1::2]))
    check_backward_elementwise(F.minmax, [a], rng=rng)


def test_minmax_ties_route_identity(rng):
    a = np.array([[1.0, 1.0, 3.0, 2.0]])
    x = Tensor(a, requires_grad=True)
    F.minmax(x).backward(np.array([[10.0, 20.0, 30.0, 40.0]]))
    np.testing.assert_array_equal(x.grad, [[10.0, 20.0, 40.0, 30.0]])


def test_minmax_odd_channels_raise(rng):
    with pytest.raises(ValueError, match="even"):
        F.minmax(Tensor(rng.standard_normal((2, 3))))


# ------------------------------------------------------------------ float32 stays float32

F32_OPS = {
    "arith": lambda x: (x * 2.0 + 1.0) / 3.0 - x,
    "pow": lambda x: x ** 2,
    "sum": lambda x: F.sum(x, axis=1),
    "mean": lambda x: F.mean(x, axis=(0, 2)),
    "max": lambda x: F.max(x, axis=1),
    "min": lambda x: F.min(x),
    "exp_log_sqrt": lambda x: F.sqrt(F.exp(F.log(F.abs(x) + 1.0))),
    "relu": F.relu,
    "l2": lambda x: F.l2_norm(x, axis=1),
    "log_softmax": lambda x: F.log_softmax(x, axis=1),
    "softmax": lambda x: F.softmax(x, axis=1),
    "logsumexp": lambda x: F.logsumexp(x, axis=1),
    "getitem": lambda x: x[np.array([0, 0]), 1:],
    "gather": lambda x: F.gather(F.reshape(x, (2, -1)), np.array([1, 3])),
    "where": lambda x: F.where(x.data > 0, x, 0.5),
    "concat": lambda x: F.concatenate([x, x * 2.0], axis=1),
    "matmul": lambda x: F.reshape(x, (2, 12)) @ np.ones((12, 3)),
    "conv": lambda x: F.conv2d(F.reshape(x, (2, 2, 3, 2)), np.ones((2, 2, 3, 3)), None, 1, "same"),
    "dense": lambda x: F.dense(F.flatten(x), np.ones((3, 12)), np.ones(3)),
    "minmax": F.minmax,
    "transpose": lambda x: x.transpose(2, 0, 1),
}


@pytest.mark.parametrize("name", sorted(F32_OPS))
def test_float32_stays_float32(rng, name):
    x = Tensor(rng.standard_normal((2, 4, 3)).astype(np.float32), requires_grad=True)
    y = F32_OPS[name](x)
    assert y.dtype == np.float32
    y.backward(np.ones(y.shape, np.float32))
    assert x.grad.dtype == np.float32 and np.isfinite(x.grad).all()


def test_l2_norm_tiny_and_huge_float32(rng):
    a = rng.standard_normal((3, 5))
    for scale in (1e-25, 1e25):
        x32 = (a * scale).astype(np.float32)
        want = np.linalg.norm(x32.astype(np.float64), axis=1)
        x = Tensor(x32, requires_grad=True)
        out = F.l2_norm(x, axis=1)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out.data, want, rtol=1e-5)
        out.backward(np.ones(3, np.float32))
        np.testing.assert_allclose(x.grad, x32.astype(np.float64) / want[:, None], rtol=1e-5, atol=1e-7)


def test_nan_propagates_through_relu():
    a = np.array([[np.nan, 1.0, -1.0, 2.0]])
    assert np.isnan(F.relu(Tensor(a)).data[0, 0])
    loss = F.sum(F.relu(Tensor(a, requires_grad=True)))
    assert np.isnan(loss.item())

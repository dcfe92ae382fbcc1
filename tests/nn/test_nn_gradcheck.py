"""The checker itself must fail on wrong gradients, NaN and dtype leaks."""
import numpy as np
import pytest

from nn import F, Tensor
from nn.gradcheck import GradcheckError, check_backward, check_backward_elementwise, numerical_gradient
from nn.tensor import make_result


def wrong_square(x):
    """x^2 with a backward that is off by 1%."""
    def backward(g):
        return (g * 2.02 * x.data,)
    return make_result(x.data * x.data, (x,), backward, "wrong_square")


def nan_grad(x):
    def backward(g):
        return (g * np.nan,)
    return make_result(x.data * 1.0, (x,), backward, "nan_grad")


def test_passes_on_correct_op(rng):
    r = check_backward(lambda x, y: F.exp(x) * y, [rng.standard_normal(6), rng.standard_normal(6)], rng=rng)
    assert r["error"] <= r["tolerance"]
    check_backward_elementwise(lambda x: F.exp(x), [rng.standard_normal((2, 3))], rng=rng)


def test_detects_wrong_gradient(rng):
    x = rng.standard_normal(5) + 3.0
    with pytest.raises(GradcheckError, match="mismatch"):
        check_backward(wrong_square, [x], rng=rng)
    with pytest.raises(GradcheckError, match="entries differ"):
        check_backward_elementwise(wrong_square, [x], rng=rng)


def test_detects_nan(rng):
    with pytest.raises(GradcheckError):
        check_backward(nan_grad, [rng.standard_normal(3)], rng=rng)
    with pytest.raises(GradcheckError):
        check_backward_elementwise(nan_grad, [rng.standard_normal(3)], rng=rng)


def test_detects_missing_gradient(rng):
    # an op that forgets one input (returns None for it) is caught
    def half(x, y):
        def backward(g):
            return g * y.data, None
        return make_result(x.data * y.data, (x, y), backward, "half")
    with pytest.raises(GradcheckError):
        check_backward_elementwise(half, [rng.standard_normal(3), rng.standard_normal(3) + 3], rng=rng)


def test_detects_dtype_leak(rng):
    with pytest.raises(GradcheckError, match="dtype"):
        check_backward(lambda x: F.astype(x, np.float32), [rng.standard_normal(3)], rng=rng)


def test_int_inputs_are_constants_and_no_grads(rng):
    z = rng.standard_normal((3, 4))
    lab = rng.integers(0, 4, 3)
    check_backward(lambda a, i: F.gather(a, i.data), [z, lab], rng=rng)
    check_backward(lambda a, b: a * b, [z, z + 1.0], no_grads=(1,), rng=rng)
    with pytest.raises(ValueError, match="no float input"):
        check_backward(lambda i: Tensor(i.data * 1.0), [lab])


def test_numerical_gradient_quadratic(rng):
    a = rng.standard_normal(4)
    np.testing.assert_allclose(numerical_gradient(lambda v: float((v**2).sum()), a), 2 * a, rtol=1e-8, atol=1e-8)


def test_elementwise_refuses_big_inputs(rng):
    with pytest.raises(ValueError, match="too many"):
        check_backward_elementwise(F.exp, [rng.standard_normal(10)], max_elements=5)

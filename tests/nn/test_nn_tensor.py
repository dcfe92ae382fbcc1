"""The Tensor core: graph building, backward sweep, accumulation, dtypes, no_grad, errors."""
import numpy as np
import pytest

import nn
from nn import F, Tensor


def leaf(a):
    return Tensor(a, requires_grad=True)


def test_backward_simple_chain_values(rng):
    a = rng.standard_normal((3, 4))
    b = rng.standard_normal((3, 4)) + 3.0
    x, y = leaf(a), leaf(b)
    z = ((x * y - x / y + 2.0) * 3.0).sum()
    z.backward()
    np.testing.assert_allclose(z.item(), ((a * b - a / b + 2.0) * 3.0).sum(), rtol=1e-14)
    np.testing.assert_allclose(x.grad, 3.0 * (b - 1.0 / b), rtol=1e-13)
    np.testing.assert_allclose(y.grad, 3.0 * (a + a / b**2), rtol=1e-13)


def test_shared_subexpression_diamond(rng):
    # x feeds two branches that meet again: the sweep must add both contributions once
    a = rng.standard_normal(5)
    x = leaf(a)
    h = x * x
    z = (h * 2.0 + h.exp()).sum()
    z.backward()
    np.testing.assert_allclose(x.grad, 2 * a * (2.0 + np.exp(a * a)), rtol=1e-13)


def test_grads_accumulate_and_zero(rng):
    a = rng.standard_normal(4)
    x = leaf(a)
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, np.full(4, 5.0))
    x.zero_grad()
    assert x.grad is None


def test_leaf_grad_is_owned_copy(rng):
    # add() passes g through unchanged: two leaves must not share one array
    x, y = leaf(rng.standard_normal(3)), leaf(rng.standard_normal(3))
    (x + y).backward(np.ones(3))
    x.grad[0] = 42.0
    assert y.grad[0] == 1.0
    assert x.grad.flags.writeable


def test_deep_graph_no_recursion_limit():
    x = leaf(np.ones(2))
    y = x
    for _ in range(5000):
        y = y + 1.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, np.ones(2))


def test_backward_needs_grad_for_non_scalar(rng):
    x = leaf(rng.standard_normal((2, 3)))
    y = x * 2.0
    with pytest.raises(ValueError, match="one-element"):
        y.backward()
    with pytest.raises(ValueError, match="shape"):
        y.backward(np.ones((3, 2)))
    y.backward(np.full((2, 3), 0.5))
    np.testing.assert_allclose(x.grad, np.ones((2, 3)))


def test_backward_on_constant_raises():
    with pytest.raises(RuntimeError, match="does not require"):
        Tensor(np.ones(2)).sum().backward()


def test_no_grad_builds_no_graph(rng):
    x = leaf(rng.standard_normal(3))
    with nn.no_grad():
        y = (x * 2.0).sum()
        assert not nn.is_grad_enabled()
    assert nn.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    z = (x * 2.0).sum()
    assert z.requires_grad


def test_detach_cuts_graph(rng):
    a = rng.standard_normal(3)
    x = leaf(a)
    y = (x * x.detach()).sum()  # d/dx = x (detached factor counted as constant)
    y.backward()
    np.testing.assert_allclose(x.grad, a)


def test_retain_grad_on_intermediate(rng):
    x = leaf(rng.standard_normal(3))
    h = (x * 2.0).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad, 2 * h.data)
    np.testing.assert_allclose(x.grad, 4 * h.data)


def test_requires_grad_only_for_float():
    with pytest.raises(TypeError, match="float"):
        Tensor(np.arange(3), requires_grad=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scalar_and_array_operands_keep_dtype(rng, dtype):
    x = leaf(rng.standard_normal((2, 3)).astype(dtype))
    other = rng.standard_normal((2, 3))  # float64 array: must be cast down, not upcast x
    outs = [x + 1.5, 1.5 + x, x - other, other - x, x * 2.0, 2.0 * x, x / 3.0, 3.0 / (x * x + 1.0),
            -x, x ** 2, x @ other.T, x.T @ other, x + np.int64(2), np.float64(2.0) * x, other[:1] - x]
    for o in outs:
        assert o.dtype == dtype, o
    sum(o.sum() for o in outs).backward()
    assert x.grad.dtype == dtype


def test_mixed_float_tensors_raise(rng):
    a = Tensor(rng.standard_normal(3).astype(np.float32))
    b = Tensor(rng.standard_normal(3))
    with pytest.raises(TypeError, match="float dtypes"):
        a + b


@pytest.mark.parametrize(
    "sa,sb",
    [((3, 4), (4,)), ((3, 1), (1, 4)), ((2, 3, 4), (3, 1)), ((1,), (2, 3)), ((2, 1, 4), (1, 3, 1)), ((), (2, 2))],
)
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_broadcasting_grads(rng, sa, sb, op):
    a = rng.standard_normal(sa)
    b = rng.uniform(0.5, 2.0, sb) * rng.choice([-1.0, 1.0], sb)  # away from 0 for div
    fn = getattr(F, op)
    nn.gradcheck.check_backward_elementwise(lambda x, y: fn(x, y), [a, b], rng=rng)
    # and the grad shapes equal the input shapes
    x, y = leaf(a), leaf(b)
    fn(x, y).backward(np.ones(np.broadcast_shapes(sa, sb)))
    assert x.grad.shape == sa and y.grad.shape == sb


def test_operators_match_numpy(rng):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    x, y = Tensor(a), Tensor(b)
    np.testing.assert_allclose((x @ y).data, a @ b)
    np.testing.assert_allclose((a @ Tensor(b)).data, a @ b)  # ndarray @ Tensor -> Tensor.__rmatmul__
    np.testing.assert_allclose((a + x).data, 2 * a)  # ndarray + Tensor
    assert isinstance(a + x, Tensor)
    np.testing.assert_allclose(x.T.data, a.T)
    np.testing.assert_allclose(x.transpose(1, 0).data, a.T)
    np.testing.assert_allclose(x.reshape(2, 6).data, a.reshape(2, 6))
    np.testing.assert_allclose(x.reshape((12,)).data, a.reshape(12))
    assert x.shape == (3, 4) and x.ndim == 2 and x.size == 12 and len(x) == 3
    assert isinstance(x.numpy(), np.ndarray)


def test_matmul_shape_mismatch_message(rng):
    with pytest.raises(ValueError, match=r"\(3, 4\) @ \(3, 2\)"):
        Tensor(rng.standard_normal((3, 4))) @ Tensor(rng.standard_normal((3, 2)))


def test_reshape_bad_shape_message(rng):
    with pytest.raises(ValueError, match="cannot reshape"):
        Tensor(rng.standard_normal((3, 4))).reshape(5, 2)


def test_flatten_keeps_batch(rng):
    a = rng.standard_normal((2, 3, 4, 5))
    x = leaf(a)
    y = x.flatten()
    assert y.shape == (2, 60)
    np.testing.assert_array_equal(y.data, a.reshape(2, 60))
    y.backward(np.arange(120.0).reshape(2, 60))
    np.testing.assert_array_equal(x.grad, np.arange(120.0).reshape(2, 3, 4, 5))


def test_getitem_basic_and_gather(rng):
    a = rng.standard_normal((4, 5))
    x = leaf(a)
    y = x[1:3, ::2].sum() + x[0, 1] * 2.0 + x[np.array([0, 0, 3]), np.array([4, 4, 1])].sum()
    y.backward()
    want = np.zeros((4, 5))
    want[1:3, ::2] += 1.0
    want[0, 1] += 2.0
    want[0, 4] += 2.0  # gathered twice: accumulates
    want[3, 1] += 1.0
    np.testing.assert_array_equal(x.grad, want)


def test_getitem_bool_mask(rng):
    a = rng.standard_normal((3, 4))
    x = leaf(a)
    m = a > 0
    x[m].sum().backward()
    np.testing.assert_array_equal(x.grad, m.astype(float))


def test_item_and_repr():
    t = Tensor(np.array([[2.5]]), requires_grad=True)
    assert t.item() == 2.5
    assert "requires_grad=True" in repr(t)
    with pytest.raises(ValueError):
        Tensor(np.ones(2)).item()


def test_enable_grad_inside_no_grad(rng):
    x = leaf(rng.standard_normal(2))
    with nn.no_grad():
        with nn.enable_grad():
            y = x * 2.0
    assert y.requires_grad


def test_graph_released_after_backward(rng):
    a = rng.standard_normal(3)
    x = leaf(a)
    h = F.exp(x * 2.0)
    loss = h.sum()
    loss.backward()
    assert h._parents == () and loss._parents == ()  # saved arrays are dropped
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        (h * 3.0).sum().backward()  # a new graph through a released op


def test_retain_graph_allows_second_backward(rng):
    a = rng.standard_normal(3)
    x = leaf(a)
    loss = (F.exp(x) * x).sum()
    loss.backward(retain_graph=True)
    g1 = x.grad.copy()
    loss.backward()
    np.testing.assert_allclose(x.grad, 2 * g1, rtol=1e-15)
    np.testing.assert_allclose(g1, np.exp(a) * (1 + a), rtol=1e-13)


def test_released_graph_frees_activations(rng):
    import gc
    import weakref

    x = leaf(rng.standard_normal((4, 4)))
    h = F.relu(x * 2.0)
    probe = weakref.ref(h.data)
    out = (h * 3.0).sum()
    del h
    gc.collect()
    assert probe() is not None  # held by the graph (the mul saved it)
    out.backward()
    gc.collect()
    assert probe() is None  # released with the graph, while ``out`` is still alive


def test_grad_mode_is_per_thread():
    """no_grad() in one thread (a pool worker certifying, say) must not turn graph building
    off in another, which was a module global before."""
    import threading

    from nn.tensor import is_grad_enabled, no_grad

    inside, release = threading.Event(), threading.Event()

    def worker():
        with no_grad():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(5)
    try:
        assert is_grad_enabled()
        x = Tensor(np.ones(3), requires_grad=True)
        assert (x * 2.0).requires_grad
    finally:
        release.set()
        t.join()
    with no_grad():
        assert not is_grad_enabled()
    assert is_grad_enabled()

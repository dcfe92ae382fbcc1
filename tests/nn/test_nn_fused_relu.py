"""conv2d(..., relu=True) and dense(..., relu=True) equal relu(conv2d(...)) / relu(dense(...))
exactly: values, gradients, NaN handling."""
import numpy as np
import pytest

from nn import functions as F
from nn.tensor import Tensor


def _pair(kind, rng, dtype):
    if kind == "conv":
        x = rng.standard_normal((3, 4, 7, 6)).astype(dtype)
        w = rng.standard_normal((6, 4, 3, 3)).astype(dtype)
        b = rng.standard_normal(6).astype(dtype)
        return x, w, b, (lambda x, w, b, relu: F.conv2d(x, w, b, 2, "same", relu=relu))
    x = rng.standard_normal((5, 8)).astype(dtype)
    w = rng.standard_normal((6, 8)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    return x, w, b, (lambda x, w, b, relu: F.dense(x, w, b, relu=relu))


@pytest.mark.parametrize("kind", ["conv", "dense"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_relu_matches_unfused(kind, dtype):
    rng = np.random.default_rng()
    x, w, b, op = _pair(kind, rng, dtype)
    outs, grads = [], []
    for fused in (False, True):
        ts = [Tensor(a.copy(), requires_grad=True) for a in (x, w, b)]
        y = op(*ts, relu=True) if fused else F.relu(op(*ts, relu=False))
        gy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
        y.backward(gy)
        outs.append(y.data.copy())
        grads.append([t.grad for t in ts])
    assert outs[1].dtype == dtype
    assert (outs[1] >= 0).all() and (outs[1] == 0).any()
    np.testing.assert_array_equal(outs[1], outs[0])
    for g_fused, g_plain in zip(grads[1], grads[0]):
        assert g_fused.dtype == dtype
    np.testing.assert_array_equal(grads[1][0], grads[0][0])
    np.testing.assert_array_equal(grads[1][1], grads[0][1])
    # the fused conv sums the bias gradient in float64 (relu_grad_bias): equal up to the
    # unfused sum's own float rounding, bounded by n * eps * sum |g|
    pre = np.where(outs[0] > 0, np.random.default_rng(1).standard_normal(outs[0].shape).astype(dtype), 0)
    axes = (0,) + tuple(range(2, pre.ndim))
    bound = pre.size * np.finfo(dtype).eps * np.abs(pre).sum(axis=axes)
    assert np.all(np.abs(grads[1][2].astype(np.float64) - grads[0][2]) <= bound)


def test_fused_relu_propagates_nan_and_blocks_its_gradient():
    x = np.ones((2, 3), dtype=np.float32)
    x[0, 1] = np.nan
    w = np.eye(3, dtype=np.float32)
    xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    y = F.dense(xt, wt, None, relu=True)
    assert np.isnan(y.data[0, 1]) and not np.isnan(y.data[1]).any()
    y.backward(np.ones((2, 3), dtype=np.float32))
    # out is NaN there: out > 0 is False, so no gradient flows through that entry
    assert xt.grad[0, 1] == 0 and xt.grad[1, 1] == 1


def test_fused_relu_is_differentiable_numerically():
    rng = np.random.default_rng()
    x = rng.standard_normal((2, 3, 5, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    xt, wt, bt = (Tensor(a, requires_grad=True) for a in (x, w, b))
    gy = rng.standard_normal((2, 4, 5, 5))
    F.conv2d(xt, wt, bt, 1, "same", relu=True).backward(gy)
    h = 1e-6
    for idx in [(0, 0, 1, 1), (1, 2, 2, 0), (3, 1, 0, 2)]:
        wp, wm = w.copy(), w.copy()
        wp[idx] += h
        wm[idx] -= h
        fp = (F.conv2d(Tensor(x), Tensor(wp), Tensor(b), 1, "same", relu=True).data * gy).sum()
        fm = (F.conv2d(Tensor(x), Tensor(wm), Tensor(b), 1, "same", relu=True).data * gy).sum()
        assert abs((fp - fm) / (2 * h) - wt.grad[idx]) <= 1e-5 * (1 + abs(wt.grad[idx]))


def test_a_failing_relu_kernel_is_raised_not_replaced(monkeypatch):
    """_cpu_kernel caught RuntimeError around the kernel call too, so a kernel that failed
    (a Numba error, say) was silently replaced by NumPy. Only a missing op falls back."""
    from kernels import registry

    x = Tensor(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), requires_grad=True)
    name = registry.select("relu_grad", x.data)
    if not registry.has("relu_grad", name):
        pytest.skip(f"the selected backend {name!r} has no relu_grad kernel")

    def broken(out, g):
        raise RuntimeError("kernel failed")

    monkeypatch.setitem(registry._IMPLS, ("relu_grad", name), broken)
    y = F.relu(x)
    with pytest.raises(RuntimeError, match="kernel failed"):
        y.sum().backward()
    monkeypatch.delitem(registry._IMPLS, ("relu_grad", name))   # a missing op: NumPy's form
    x.grad = None
    F.relu(x).sum().backward()
    assert np.array_equal(x.grad, (x.data > 0).astype(np.float32))

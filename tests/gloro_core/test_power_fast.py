"""power_steps' direct-backend loop equals the plain API loop; sigma=False skips only sigma."""
import numpy as np
import pytest

import kernels
from gloro_core.lipschitz import LinearOp, init_iterate, power_steps


def _plain(op, w, v, iters):
    for _ in range(iters):
        u = op.apply(w, v)
        u = u / np.linalg.norm(u.astype(np.float64))
        z = op.adjoint(w, u)
        v = z / np.linalg.norm(z.astype(np.float64))
    return v, float(np.linalg.norm(op.apply(w, v).astype(np.float64)))


@pytest.mark.parametrize("kind", ["conv_s1", "conv_s2", "dense"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_power_steps_match_plain_loop(kind, dtype):
    rng = np.random.default_rng()
    if kind == "dense":
        op = LinearOp.dense(12, 7)
    else:
        op = LinearOp.conv((3, 9, 8), 5, 3 if kind == "conv_s1" else 4, 1 if kind == "conv_s1" else 2)
    w = rng.standard_normal(op.w_shape).astype(dtype)
    v0 = init_iterate(op, rng, dtype)
    v0_copy = v0.copy()
    v, s = power_steps(op, w, v0, 6)
    want_v, want_s = _plain(op, w.astype(np.float64), v0.astype(np.float64), 6)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert v.dtype == dtype and v.shape == op.iterate_shape
    np.testing.assert_allclose(v, want_v, rtol=0, atol=tol)
    assert abs(s - want_s) <= tol * want_s
    np.testing.assert_array_equal(v0, v0_copy)  # the input iterate is not modified
    v2, s2 = power_steps(op, w, v0, 6, sigma=False)
    assert s2 is None
    np.testing.assert_array_equal(v2, v)


def test_power_steps_still_validate():
    op = LinearOp.conv((3, 9, 8), 5, 3)
    w = np.ones((5, 4, 3, 3), dtype=np.float32)  # wrong input channels
    with pytest.raises(ValueError):
        power_steps(op, w, np.ones(op.iterate_shape, np.float32), 2)
    with pytest.raises(ValueError):
        power_steps(op, np.ones(op.w_shape, np.float32), np.ones(op.iterate_shape, np.float32), -1)


def test_zero_operator_keeps_iterate():
    op = LinearOp.dense(6, 3)
    v = np.full(op.iterate_shape, 1 / 6 ** 0.5, np.float32)
    out, s = power_steps(op, np.zeros(op.w_shape, np.float32), v, 3, sigma=False)
    assert s == 0.0 and out is v

"""power_steps (the fused numba loop by default, the direct-backend loop under
GLORO_BACKEND=numpy) equals the plain API loop; sigma=False skips only sigma."""
import numpy as np
import pytest

import kernels
from gloro_core.layers import Conv, Dense
from gloro_core.lipschitz import _fused_steps, init_iterate, power_steps
from kernels import registry

# "fused": numba's conv2d_power_steps / dense_power_steps; "loop": one backend call per half-step
PATHS = ["fused", "loop"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "fused":
        if registry.availability()["numba"] is not None:
            pytest.skip("numba is not available")
        monkeypatch.delenv(registry.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(registry.ENV_VAR, "numpy")
    return request.param


def _plain(op, w, v, iters):
    for _ in range(iters):
        u = op.apply(w, v)
        u = u / np.linalg.norm(u.astype(np.float64))
        z = op.adjoint(w, u)
        v = z / np.linalg.norm(z.astype(np.float64))
    return v, float(np.linalg.norm(op.apply(w, v).astype(np.float64)))


@pytest.mark.parametrize("kind", ["conv_s1", "conv_s2", "conv_s3_valid", "conv_k5_s2x1", "conv_pad2x0", "dense"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_power_steps_match_plain_loop(path, kind, dtype):
    rng = np.random.default_rng()
    op = {"dense": lambda: Dense(12, 7),
          "conv_s1": lambda: Conv((3, 9, 8), 5, 3, 1),
          "conv_s2": lambda: Conv((3, 9, 8), 5, 4, 2),
          "conv_s3_valid": lambda: Conv((2, 11, 10), 4, 3, 3, "valid"),
          "conv_k5_s2x1": lambda: Conv((3, 8, 9), 2, (5, 3), (2, 1), 1),
          "conv_pad2x0": lambda: Conv((2, 7, 9), 3, 3, (1, 2), (2, 0))}[kind]()
    assert (_fused_steps(op, np.zeros(op.w_shape, dtype), np.zeros(op.iterate_shape, dtype)) is not None) \
        == (path == "fused")
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


def test_power_steps_still_validate(path):
    op = Conv((3, 9, 8), 5, 3)
    v = np.ones(op.iterate_shape, np.float32)
    w = np.ones(op.w_shape, np.float32)
    with pytest.raises(ValueError):
        power_steps(op, np.ones((5, 4, 3, 3), dtype=np.float32), v, 2)  # wrong input channels
    with pytest.raises(ValueError):
        power_steps(op, w, v, -1)
    with pytest.raises(TypeError):
        power_steps(op, w, v.astype(np.float64), 2)  # mixed dtypes
    with pytest.raises(TypeError):
        power_steps(op, w.astype(np.int32), v.astype(np.int32), 2)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_zero_operator_keeps_iterate(path, kind):
    op = Dense(6, 3) if kind == "dense" else Conv((2, 5, 5), 3, 3, 2)
    v = np.full(op.iterate_shape, 1 / np.prod(op.iterate_shape) ** 0.5, np.float32)
    out, s = power_steps(op, np.zeros(op.w_shape, np.float32), v, 3, sigma=False)
    assert s == 0.0
    np.testing.assert_array_equal(out, v)


def test_rank_one_operator_converges_in_one_step(path):
    """A rank-1 W: one step puts the iterate on W's row (up to sign), later steps keep it,
    and sigma is the row's norm exactly."""
    op = Dense(4, 2)
    w = np.zeros(op.w_shape, np.float64)
    w[0, 1] = 3.0
    v, s = power_steps(op, w, np.full(op.iterate_shape, 0.5), 4)
    np.testing.assert_allclose(np.abs(v), [[0.0, 1.0, 0.0, 0.0]], atol=1e-15)
    assert s == pytest.approx(3.0, rel=1e-15)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_power_update_layers_equals_one_layer_at_a_time(monkeypatch, threads):
    """Layers run concurrently (fused numba loops, GIL released) give exactly the
    iterates of power_steps run layer by layer; the inputs are not modified."""
    import gloro_core.lipschitz as lip

    monkeypatch.setattr(kernels, "cpu_threads", lambda: threads)
    rng = np.random.default_rng()
    ops = [Conv((2, 12, 12), 6, 3, 1), Conv((6, 12, 12), 8, 4, 2),
           Conv((8, 6, 6), 8, 3, 1, "valid"), Dense(128, 20), Dense(20, 5)]
    ws = [rng.standard_normal(op.w_shape).astype(np.float32) for op in ops]
    vs = [init_iterate(op, rng, np.float32) for op in ops]
    copies = [v.copy() for v in vs]
    got = lip.power_update_layers(ops, ws, vs, 7)
    for op, w, v, g, c in zip(ops, ws, vs, got, copies):
        want, _ = power_steps(op, w, v, 7, sigma=False)
        np.testing.assert_array_equal(g, want)
        np.testing.assert_array_equal(v, c)
    assert lip.power_update_layers(ops, ws, vs, 0) == vs

"""The performance defaults: the fused relu_grad kernel and the per-op / batch-1 backend choice."""
import numpy as np
import pytest

from kernels import registry


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 7, 9), (1, 1), (700, 1000)])
def test_relu_grad_backends_agree_exactly(dtype, shape):
    rng = np.random.default_rng()
    x = rng.standard_normal(shape).astype(dtype)
    x.flat[:: 7] = 0.0                     # exact zeros: gradient 0 there
    x.flat[3 :: 11] = np.nan               # NaN in the output: gradient 0 (as np.where)
    out = np.maximum(x, dtype(0))
    g = rng.standard_normal(shape).astype(dtype)
    g.flat[1 :: 13] = np.nan               # NaN upstream survives only where out > 0
    g.flat[2 :: 17] = np.inf
    want = np.where(out > 0, g, dtype(0))
    for backend in registry.backends():
        if (("relu_grad", backend) in registry._IMPLS):
            got = registry.get("relu_grad", backend)(out, g)
            assert got.dtype == g.dtype and got.shape == g.shape
            np.testing.assert_array_equal(got, want)


def test_relu_grad_takes_non_contiguous_inputs():
    rng = np.random.default_rng()
    out = np.maximum(rng.standard_normal((6, 8), dtype=np.float32), 0).T
    g = rng.standard_normal((8, 6), dtype=np.float32)
    for backend in ("numpy", "numba"):
        if backend in registry.backends():
            got = registry.get("relu_grad", backend)(out, g)
            np.testing.assert_array_equal(got, np.where(out > 0, g, np.float32(0)))


def test_batch1_default_differs_from_batch_default(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(registry, "DEFAULT_CPU_BATCH1_BY_OP", {"conv2d": "reference"})
    monkeypatch.setattr(registry, "DEFAULT_CPU_BY_OP", {})
    assert registry.select("conv2d", np.zeros((1, 2, 3, 3))) == "reference"
    assert registry.select("conv2d", np.zeros((2, 2, 3, 3))) == registry.DEFAULT_CPU
    assert registry.select("dense", np.zeros((1, 3))) == registry.DEFAULT_CPU
    # an explicit backend always wins
    assert registry.select("conv2d", np.zeros((1, 2, 3, 3)), backend="numpy") == "numpy"


def test_unavailable_default_falls_back(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(registry, "DEFAULT_CPU_BY_OP", {"dense": "numba"})
    monkeypatch.setitem(registry._LOADED, "numba", "pretend: not installed")
    assert registry.select("dense", np.zeros((2, 3))) == registry.DEFAULT_CPU


@pytest.mark.parametrize("c,o,h,w,kh,kw,padding", [
    (16, 3, 7, 6, 3, 3, "same"),
    (17, 4, 6, 9, 4, 2, "same"),      # even kernel: the extra pad is at the bottom/right
    (16, 2, 5, 5, 3, 3, "valid"),
    (20, 3, 6, 5, 2, 3, 1),
    (16, 2, 5, 6, 2, 2, 3),           # padding > k-1: the col2im path
])
def test_numpy_stride1_grad_input_as_flipped_conv(c, o, h, w, kh, kw, padding):
    """numpy's stride-1 grad_input for >= 16 input channels runs as a conv with the flipped
    kernel: it must match the reference transposed conv and the adjoint identity."""
    import kernels

    rng = np.random.default_rng()
    x = rng.standard_normal((2, c, h, w))
    wt = rng.standard_normal((o, c, kh, kw))
    y = kernels.conv2d(x, wt, None, 1, padding, backend="reference")
    gy = rng.standard_normal(y.shape)
    want = kernels.conv2d_grad_input(gy, wt, x.shape, 1, padding, backend="reference")
    got = kernels.conv2d_grad_input(gy, wt, x.shape, 1, padding, backend="numpy")
    assert got.shape == x.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    got32 = kernels.conv2d_grad_input(gy.astype(np.float32), wt.astype(np.float32), x.shape, 1, padding,
                                      backend="numpy")
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # <A x, gy> == <x, A^T gy>
    lhs = float((y * gy).sum())
    rhs = float((x * got).sum())
    assert abs(lhs - rhs) <= 1e-10 * (abs(lhs) + 1)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("stride,c", [(1, 16), (2, 3), (1, 3)])
def test_numpy_conv_chunks_split_over_threads(monkeypatch, threads, stride, c):
    """With several BLAS threads the numpy backend splits the batch's chunks over Python
    threads (1 BLAS thread each): results match the reference and the 1-thread run."""
    import kernels
    import kernels.numpy_backend as nb
    from kernels import threads as kthreads

    if not kthreads.has_blas_control():
        pytest.skip("no BLAS thread control here")
    rng = np.random.default_rng()
    x = rng.standard_normal((7, c, 9, 8)).astype(np.float32)
    w = rng.standard_normal((5, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    monkeypatch.setattr(nb, "CHUNK_BYTES", 1)  # one sample per chunk: 7 chunks
    monkeypatch.setattr(nb, "MIN_CHUNK_SAMPLES", 1)
    results = {}
    for t in (1, threads):
        monkeypatch.setattr(kthreads, "cpu_threads", lambda t=t: t)
        assert len(nb._groups(7, 1)) == min(t, 7)
        y = kernels.conv2d(x, w, b, stride, "same", backend="numpy")
        gy = np.random.default_rng(0).standard_normal(y.shape).astype(np.float32)
        gx = kernels.conv2d_grad_input(gy, w, x.shape, stride, "same", backend="numpy")
        gw = kernels.conv2d_grad_weight(x, gy, (3, 3), stride, "same", backend="numpy")
        results[t] = (y, gx, gw, gy)
    y1, gx1, gw1, gy = results[1]
    yt, gxt, gwt, _ = results[threads]
    np.testing.assert_array_equal(yt, y1)
    np.testing.assert_array_equal(gxt, gx1)
    np.testing.assert_allclose(gwt, gw1, rtol=1e-5, atol=1e-5 * np.abs(gw1).max())
    x64, w64, gy64 = (a.astype(np.float64) for a in (x, w, gy))
    want_y = kernels.conv2d(x64, w64, b.astype(np.float64), stride, "same", backend="reference")
    want_gx = kernels.conv2d_grad_input(gy64, w64, x.shape, stride, "same", backend="reference")
    want_gw = kernels.conv2d_grad_weight(x64, gy64, (3, 3), stride, "same", backend="reference")
    for got, want in ((yt, want_y), (gxt, want_gx), (gwt, want_gw)):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_dense_grad_weight_batch1_is_the_outer_product():
    import kernels

    rng = np.random.default_rng()
    x = rng.standard_normal((1, 37)).astype(np.float32)
    gy = rng.standard_normal((1, 11)).astype(np.float32)
    got = kernels.dense_grad_weight(x, gy, backend="numpy")
    assert got.shape == (11, 37) and got.dtype == np.float32
    # a float32 product is correctly rounded: equal to the exact float64 product rounded
    np.testing.assert_array_equal(got, (gy.T.astype(np.float64) @ x.astype(np.float64)).astype(np.float32))


def _actual_blas_threads() -> set:
    """The thread counts every BLAS library reports now (NumPy's and SciPy's OpenBLAS)."""
    from kernels import threads

    return {int(c.get_num_threads()) for c in threads._blas_controllers()}


def test_numpy_conv_split_restores_blas_threads(monkeypatch):
    """The chunk split pins OpenBLAS to 1 thread only while it runs: afterwards the process
    is back at its configured count (a racing per-worker restore once left it at 1 for good),
    also when contexts overlap across threads."""
    import threading

    import kernels
    import kernels.numpy_backend as nb
    from kernels import threads

    if not threads.has_blas_control():
        pytest.skip("no BLAS thread control here")
    prev = threads.blas_threads()
    threads.set_blas_threads(2)
    try:
        monkeypatch.setattr(nb, "CHUNK_BYTES", 1)  # one sample per chunk: many chunks, 2 groups
        monkeypatch.setattr(nb, "MIN_CHUNK_SAMPLES", 1)
        rng = np.random.default_rng()
        x = rng.standard_normal((9, 16, 8, 8)).astype(np.float32)
        w = rng.standard_normal((4, 16, 3, 3)).astype(np.float32)
        assert len(nb._groups(9, 1)) == 2
        for _ in range(20):  # the race needed unlucky interleavings: repeat
            y = kernels.conv2d(x, w, None, 1, "same", backend="numpy")
            kernels.conv2d_grad_weight(x, y, (3, 3), 1, "same", backend="numpy")
            assert _actual_blas_threads() == {2}
        barrier, seen = threading.Barrier(4), []

        def overlap():
            with threads.single_blas_thread():
                barrier.wait()
                seen.append((_actual_blas_threads(), threads.blas_threads()))  # pinned, configured
                barrier.wait()

        ts = [threading.Thread(target=overlap) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert seen == [({1}, 2)] * 4
        assert _actual_blas_threads() == {2}
    finally:
        threads.set_blas_threads(prev)


@pytest.mark.parametrize("n", [1, 3, 4, 9])
def test_numpy_dense_row_split_matches_reference(monkeypatch, n):
    """Dense GEMMs split by rows over threads (forced here for small shapes) give the
    reference's values, with and without the split, and leave the BLAS count as it was."""
    import kernels
    import kernels.numpy_backend as nb
    from kernels import reference as ref
    from kernels import threads

    if not threads.has_blas_control():
        pytest.skip("no BLAS thread control here")
    prev = threads.blas_threads()
    threads.set_blas_threads(2)
    try:
        monkeypatch.setattr(nb, "DENSE_SPLIT_MIN", 1)
        rng = np.random.default_rng()
        x = rng.standard_normal((n, 13)).astype(np.float32)
        w = rng.standard_normal((6, 13)).astype(np.float32)
        b = rng.standard_normal(6).astype(np.float32)
        gy = rng.standard_normal((n, 6)).astype(np.float32)
        got = (kernels.dense(x, w, b, backend="numpy"),
               kernels.dense_grad_input(gy, w, backend="numpy"),
               kernels.dense_grad_weight(x, gy, backend="numpy"))
        want = (ref.dense(x, w, b), ref.dense_grad_input(gy, w), ref.dense_grad_weight(x, gy))
        for g, r in zip(got, want):
            assert g.dtype == np.float32 and g.shape == r.shape
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * (1 + np.abs(r).max()))
        assert _actual_blas_threads() == {2}
    finally:
        threads.set_blas_threads(prev)


@pytest.mark.parametrize("max_k", [0, 10**6], ids=["wide-rows", "per-sample"])
@pytest.mark.parametrize("n,c,h,w,o,kh,kw,stride,padding", [
    (3, 1, 9, 8, 4, 3, 3, 1, "same"),
    (2, 3, 10, 11, 5, 4, 4, 2, "same"),
    (2, 2, 9, 9, 3, 3, 2, (2, 3), "valid"),
    (4, 5, 7, 6, 2, 3, 3, 1, 2),
    (1, 1, 6, 7, 3, 2, 2, 3, (1, 0)),
])
def test_numpy_conv_both_layouts_match_reference(monkeypatch, max_k, n, c, h, w, o, kh, kw, stride, padding):
    """conv2d and grad_weight take the per-sample layout when K = C*kh*kw is small and the
    wide-row layout otherwise: both layouts, forced, against the reference."""
    import kernels
    import kernels.numpy_backend as nb

    monkeypatch.setattr(nb, "PER_SAMPLE_MAX_K", max_k)
    monkeypatch.setattr(nb, "CHUNK_BYTES", 64)  # several chunks per call
    monkeypatch.setattr(nb, "MIN_CHUNK_SAMPLES", 1)
    rng = np.random.default_rng()
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((o, c, kh, kw))
    b = rng.standard_normal(o)
    want = kernels.conv2d(x, wt, b, stride, padding, backend="reference")
    got = kernels.conv2d(x, wt, b, stride, padding, backend="numpy")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    gy = rng.standard_normal(want.shape)
    want_gw = kernels.conv2d_grad_weight(x, gy, (kh, kw), stride, padding, backend="reference")
    got_gw = kernels.conv2d_grad_weight(x, gy, (kh, kw), stride, padding, backend="numpy")
    np.testing.assert_allclose(got_gw, want_gw, rtol=1e-12, atol=1e-12 * np.abs(want_gw).max())
    got32 = kernels.conv2d(x.astype(np.float32), wt.astype(np.float32), b.astype(np.float32), stride, padding,
                           backend="numpy")
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("max_k", [0, 10**6], ids=["wide-rows", "per-sample"])
@pytest.mark.parametrize("backend", ["numpy", "numba", "reference"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv2d_relu_equals_relu_of_conv2d(monkeypatch, max_k, backend, with_bias):
    """relu=True (numpy: fused per chunk; others: one in-place pass) gives exactly
    max(conv2d(...), 0), NaN included, in both numpy layouts and several chunks."""
    import kernels
    import kernels.numpy_backend as nb

    if registry.availability()[backend] is not None:
        pytest.skip(f"{backend} is not available")
    monkeypatch.setattr(nb, "PER_SAMPLE_MAX_K", max_k)
    monkeypatch.setattr(nb, "CHUNK_BYTES", 256)
    monkeypatch.setattr(nb, "MIN_CHUNK_SAMPLES", 1)
    rng = np.random.default_rng()
    x = rng.standard_normal((5, 3, 9, 8)).astype(np.float32)
    x[1, 0, 4, 4] = np.nan
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32) if with_bias else None
    for stride in (1, 2):
        y = kernels.conv2d(x, w, b, stride, "same", backend=backend)
        got = kernels.conv2d(x, w, b, stride, "same", backend=backend, relu=True)
        assert got.dtype == np.float32 and np.isnan(got).any() and (got == 0).any()
        np.testing.assert_array_equal(got, np.maximum(y, np.float32(0)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 29), (1000,), (3, 5, 7, 11)])
def test_adam_chunked_equals_plain_form_exactly(monkeypatch, dtype, shape):
    """numpy's Adam runs ADAM_CHUNK elements at a time: the same values, bit for bit, as
    the plain in-place form (ragged last chunk, non-contiguous gradient)."""
    from kernels import fused

    monkeypatch.setattr(fused, "ADAM_CHUNK", 100)
    rng = np.random.default_rng()
    p, m = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    v = np.abs(rng.standard_normal(shape)).astype(dtype)
    g = np.asfortranarray(rng.standard_normal(shape).astype(dtype))
    want = [a.copy() for a in (p, g, m, v)]
    for _ in range(2):  # two steps: m and v carried over
        fused.adam_update(p, g, m, v, 3e-3, 0.9, 0.999, 1e-7, backend="numpy")
        fused._adam_update_cpu(*want, 3e-3, 0.9, 0.999, 1e-7)
    for got, ref in zip((p, g, m, v), want):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 7, 9), (1, 1, 1, 1), (64, 32, 14, 14), (5, 3, 2, 3, 4)])
def test_relu_grad_bias_matches_relu_grad_and_a_float64_sum(dtype, shape):
    """The pre-activation gradient bit for bit as relu_grad (NaN and inf included), and the
    channel sums within float64 rounding of an exact-ish float64 sum."""
    rng = np.random.default_rng()
    x = rng.standard_normal(shape).astype(dtype)
    x.flat[:: 7] = 0.0
    out = np.maximum(x, dtype(0))
    g = rng.standard_normal(shape).astype(dtype) * dtype(1e3)
    want = np.where(out > 0, g, dtype(0))
    axes = (0,) + tuple(range(2, len(shape)))
    want_b = want.astype(np.float64).sum(axis=axes)
    scale = np.abs(want).astype(np.float64).sum(axis=axes)
    for backend in registry.backends():
        if ("relu_grad_bias", backend) in registry._IMPLS:
            gx, gb = registry.get("relu_grad_bias", backend)(out, g)
            assert gx.dtype == gb.dtype == g.dtype and gx.shape == g.shape and gb.shape == (shape[1],)
            np.testing.assert_array_equal(gx, want)
            # float64 accumulation, one rounding to dtype at the end
            tol = np.finfo(dtype).eps * np.abs(want_b) + 1e-12 * scale
            assert np.all(np.abs(gb.astype(np.float64) - want_b) <= tol), backend
    nan_out = out.copy()
    nan_out.flat[3 :: 11] = np.nan
    g.flat[2 :: 17] = np.inf
    for backend in registry.backends():
        if ("relu_grad_bias", backend) in registry._IMPLS:
            gx, _ = registry.get("relu_grad_bias", backend)(nan_out, g)
            np.testing.assert_array_equal(gx, np.where(nan_out > 0, g, dtype(0)))

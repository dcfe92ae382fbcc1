"""The jitted certification decision equals the NumPy definition bit for bit: random
logits, exact ties, zero and infinite K entries, overflowed logits (inf, NaN), one class."""
import numpy as np
import pytest

from gloro_core import decision

pytestmark = pytest.mark.skipif(decision._decide_rows is None, reason="numba not importable")


def _inputs(rng, n, m, case):
    y = rng.standard_normal((n, m)) * rng.choice([1e-3, 1.0, 1e3])
    err = np.abs(rng.standard_normal((n, m))) * 1e-4
    w = rng.standard_normal((m, 4))
    k = np.sqrt(((w[:, None] - w[None]) ** 2).sum(-1)) * 1.3
    eps = float(rng.choice([0.0, 0.05, 0.3, 2.0]))
    if case == "ties" and m > 1:
        y[:, 1] = y[:, 0] = y.max(axis=1) + rng.choice([0.0, 1e-17, 1.0])
        err[rng.random((n, m)) < 0.5] = 0.0
    if case == "zero_k":
        k[rng.random((m, m)) < 0.4] = 0.0      # duplicate rows of the last layer, or K = 0
        err[rng.random((n, m)) < 0.5] = 0.0
    if case == "overflow":
        for v in (np.inf, -np.inf, np.nan):
            y[rng.random((n, m)) < 0.05] = v
        err[rng.random((n, m)) < 0.05] = np.inf
        k[rng.random((m, m)) < 0.1] = np.inf
    return y, err, k, eps


@pytest.mark.parametrize("case", ["random", "ties", "zero_k", "overflow"])
@pytest.mark.parametrize("m", [1, 2, 10, 37])
def test_decide_matches_reference_bitwise(case, m):
    rng = np.random.default_rng()
    for _ in range(20):
        y, err, k, eps = _inputs(rng, int(rng.integers(1, 300)), m, case)
        with np.errstate(invalid="ignore", over="ignore"):
            ref = decision.decide_reference(y, err, k, eps)
        got = decision.decide(y, err, k, eps)
        for name, a, b in zip(("j", "y_bot", "certified", "radius", "bare"), got, ref):
            assert a.dtype == b.dtype, name
            # equal values, NaN where NaN, and the same sign of zero
            np.testing.assert_array_equal(a, b, err_msg=name)
            num = ~np.isnan(b) if b.dtype.kind == "f" else slice(None)
            assert np.array_equal(np.signbit(a[num]), np.signbit(b[num])), name


def test_ties_are_never_certified():
    y = np.array([[3.0, 3.0, 1.0], [2.0, 1.0, 2.0]])
    got = decision.decide(y, np.zeros_like(y), np.ones((3, 3)), 0.0)
    assert not got[2].any() and not got[4].any()
    assert np.all(got[3] == 0.0)


def test_wrong_shapes_raise_instead_of_reading_past_the_arrays():
    y = np.zeros((2, 3))
    for err, k in ((np.zeros((2, 1)), np.ones((3, 3))), (np.zeros((2, 3)), np.ones((2, 2))),
                   (np.zeros((2, 3)), np.ones(3))):
        for fn in (decision.decide, decision.decide_reference):
            with pytest.raises(ValueError, match="k_pair|err"):
                fn(y, err, k, 0.1)
    with pytest.raises(ValueError, match="m >= 1"):
        decision.decide(np.zeros((2, 0)), np.zeros((2, 0)), np.ones((0, 0)), 0.1)


def test_float32_and_read_only_inputs_decide_as_float64():
    rng = np.random.default_rng()
    y, err, k, eps = _inputs(rng, 50, 6, "random")
    k.setflags(write=False)                   # the model caches K read-only
    want = decision.decide_reference(y.astype(np.float32).astype(np.float64), err.astype(np.float32), k, eps)
    for fn in (decision.decide, decision.decide_reference):
        got = fn(y.astype(np.float32), err.astype(np.float32), k, eps)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)

"""The margin y_⊥ as one fused node equals the op-by-op autodiff form: same values, same
gradients up to rounding (also with two identical weight rows: a zero distance)."""
import numpy as np
import pytest

from gloro_core import losses
from nn.tensor import Tensor


def _run(yd, wd, k, gup, fused, monkeypatch):
    monkeypatch.setattr(losses, "_FUSED_PAIRS_MAX", 1 << 22 if fused else -1)
    y, w = Tensor(yd, requires_grad=True), Tensor(wd, requires_grad=True)
    kt = Tensor(np.asarray(k, dtype=yd.dtype), requires_grad=True) if k is not None else 1.25
    b = losses.bot_logit(y, w, kt, 0.3)
    b.backward(gup)
    return b.data, y.grad, w.grad, (kt.grad if k is not None else None)


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("case", ["random", "duplicate_rows", "ties", "k_constant"])
def test_fused_margin_bot_matches_op_by_op(monkeypatch, dtype, rtol, case):
    rng = np.random.default_rng()
    n, m, d = 33, 6, 9
    yd = rng.standard_normal((n, m)).astype(dtype)
    wd = rng.standard_normal((m, d)).astype(dtype)
    if case == "duplicate_rows":
        wd[4] = wd[1]
    if case == "ties":
        top = yd.max(axis=1) + 1
        yd[:, 0] = yd[:, 2] = top  # tied top logits: j = 0, and y_⊥ must still count class 2
    k = None if case == "k_constant" else 1.7
    gup = rng.standard_normal(n).astype(dtype)
    fused = _run(yd, wd, k, gup, True, monkeypatch)
    plain = _run(yd, wd, k, gup, False, monkeypatch)
    np.testing.assert_array_equal(fused[0], plain[0])
    np.testing.assert_array_equal(fused[1], plain[1])
    scale = np.abs(plain[2]).max()
    np.testing.assert_allclose(fused[2], plain[2], rtol=0, atol=rtol * scale)
    if k is not None:
        np.testing.assert_allclose(fused[3], plain[3], rtol=rtol)
    if case == "ties":  # never certified: y_⊥ >= y_j where the top two tie
        j = yd.argmax(axis=1)
        assert np.all(fused[0] >= yd[np.arange(n), j])

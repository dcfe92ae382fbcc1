"""numpy's stride-s conv2d_grad_input through space-to-depth (numpy_backend._grad_input_s2d)
against the reference oracle, on fresh random inputs; and the col2im path it replaces."""
from __future__ import annotations

import numpy as np
import pytest

from kernels import numpy_backend as nb
from kernels import reference
from kernels.checks import check_conv

# (n, c, h, w, o, kh, kw, stride, padding): the kernel divisible by the stride; odd sizes,
# non-square kernels/strides, pads that leave input rows unreached, the paper's 4x4/2 SAME
CASES = [
    (3, 5, 9, 7, 4, 4, 4, 2, "same"),
    (2, 3, 8, 8, 5, 4, 4, 2, "valid"),
    (2, 4, 10, 9, 3, 6, 4, (3, 2), 1),
    (1, 2, 7, 7, 3, 2, 2, 2, "same"),
    (2, 3, 9, 11, 2, 6, 6, 3, "same"),
    (2, 2, 11, 11, 3, 2, 2, 2, "valid"),
    (5, 16, 14, 14, 32, 4, 4, 2, "same"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("s2d", [True, False], ids=["s2d", "col2im"])
def test_grad_input_matches_oracle(rng, case, dtype, s2d, monkeypatch):
    n, c, h, w, o, kh, kw, s, p = case
    monkeypatch.setattr(nb, "S2D_MIN_CHANNELS", 2 if s2d else 1 << 30)
    wt = rng.standard_normal((o, c, kh, kw)).astype(dtype)
    st, pads, ohw = check_conv((n, c, h, w), wt, s, p)
    gy = rng.standard_normal((n, o) + tuple(ohw)).astype(dtype)
    got = nb.conv2d_grad_input(gy, wt, (n, c, h, w), st, pads)
    ref = reference.conv2d_grad_input(gy, wt, (n, c, h, w), st, pads)
    mag = reference.conv2d_grad_input(np.abs(gy), np.abs(wt), (n, c, h, w), st, pads)
    assert got.shape == (n, c, h, w) and got.dtype == dtype
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert np.all(np.abs(got - ref) <= tol * (mag + 1e-30)), np.abs(got - ref).max()


def test_s2d_is_the_default_for_the_paper_stride2_layers():
    assert nb.S2D_MIN_CHANNELS <= 16

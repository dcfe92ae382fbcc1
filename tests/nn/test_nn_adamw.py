"""AdamW's decoupled weight decay and global gradient-norm clipping against NumPy references."""
import math

import numpy as np
import pytest

from nn.optim import Adam, clip_grad_norm
from nn.tensor import Tensor


def _param(a):
    return Tensor(np.array(a, dtype=np.float64), requires_grad=True)


def test_adamw_matches_numpy_reference():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((4, 3))
    grads = [rng.standard_normal((4, 3)) for _ in range(3)]
    p = _param(p0)
    opt = Adam([p], lr=1e-2, weight_decay=0.1)
    ref, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, 1):
        opt.lr = 1e-2 / t                      # a schedule: the decay uses the current lr
        p.grad = g.copy()
        opt.step()
        ref *= 1 - (1e-2 / t) * 0.1            # decoupled: not through the moments
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        lr_t = (1e-2 / t) * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        ref -= lr_t * m / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(p.data, ref, rtol=1e-12)
    plain = _param(p0)
    opt0 = Adam([plain], lr=1e-2)
    plain.grad = grads[0].copy()
    opt0.step()
    assert not np.allclose(plain.data, p.data)
    with pytest.raises(ValueError, match="weight_decay"):
        Adam([_param(p0)], weight_decay=-1)


def test_clip_grad_norm():
    a, b = _param(np.zeros(3)), _param(np.zeros(2))
    c = _param(np.zeros(1))                    # no gradient: skipped
    a.grad, b.grad = np.array([3.0, 0.0, 0.0]), np.array([0.0, 4.0])
    assert clip_grad_norm([a, b, c], 10.0) == pytest.approx(5.0)
    assert np.array_equal(a.grad, [3, 0, 0])   # under the limit: untouched
    assert clip_grad_norm([a, b, c], 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(np.concatenate([a.grad, b.grad]), [0.6, 0, 0, 0, 0.8])
    assert c.grad is None
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([a], 0.0)


@pytest.mark.gpu_emulated
def test_clip_grad_norm_on_the_device_waits_for_nothing(fake_gpu):
    """On CuPy arrays the norm and the scale stay on the device: no host sync."""
    a, b = _param(np.zeros(3)), _param(np.zeros(2))
    a.grad, b.grad = fake_gpu.asarray(np.array([3.0, 0.0, 0.0])), fake_gpu.asarray(np.array([0.0, 4.0]))
    fake_gpu.reset_counts()
    total = clip_grad_norm([a, b], 1.0)
    assert fake_gpu.total_syncs() == 0 and isinstance(a.grad, fake_gpu.ndarray)
    assert float(total) == pytest.approx(5.0)
    np.testing.assert_allclose(np.concatenate([a.grad.get(), b.grad.get()]), [0.6, 0, 0, 0, 0.8])

"""CuPy arrays stay on the device through forward, backward and Adam; results match the CPU.

Skipped (with the reason) where there is no CUDA device.
"""
import numpy as np
import pytest

import nn
from nn import F, Tensor


pytestmark = pytest.mark.gpu


OPS = {
    "arith_broadcast": lambda x: (x * F.sum(x, axis=0, keepdims=True) + 1.0) / (F.abs(x) + 2.0) - x,
    "max_min": lambda x: F.max(x, axis=1) - F.min(x, axis=(0, 2)).sum(),
    "softmax_family": lambda x: F.log_softmax(F.reshape(x, (2, -1)), 1) + F.softmax(F.reshape(x, (2, -1)), 1),
    "norm": lambda x: F.l2_norm(x, axis=(1, 2)),
    "index": lambda x: x[np.array([1, 1, 0]), 1:] * 2.0,
    "gather": lambda x: F.gather(F.reshape(x, (2, -1)), np.array([3, 0])),
    "where_concat": lambda x: F.concatenate([F.where(x.data > 0, x, 0.5), F.relu(x)], axis=2),
    "minmax": F.minmax,
    "matmul": lambda x: F.reshape(x, (2, 12)) @ F.transpose(F.reshape(x, (2, 12))),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_ops_on_device_match_cpu(rng, name, cupy_device):
    cp = cupy_device
    a = rng.standard_normal((2, 4, 3)).astype(np.float32)
    gy = None
    grads = []
    for dev in ("cpu", "gpu"):
        x = Tensor(a if dev == "cpu" else cp.asarray(a), requires_grad=True)
        y = OPS[name](x)
        if gy is None:
            gy = rng.standard_normal(y.shape).astype(np.float32)
        y.backward(gy if dev == "cpu" else cp.asarray(gy))
        if dev == "gpu":
            assert isinstance(y.data, cp.ndarray) and isinstance(x.grad, cp.ndarray)
        assert x.grad.dtype == np.float32
        grads.append((nn.Tensor(y.data).numpy(), nn.Tensor(x.grad).numpy()))
    np.testing.assert_allclose(grads[1][0], grads[0][0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(grads[1][1], grads[0][1], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("act", ["relu", "minmax"])
def test_training_step_stays_on_device_and_matches_cpu(rng, act, cupy_device, small_net):
    cp = cupy_device
    cpu = small_net(np.random.default_rng(1), hw=8, act=act)   # nn ops: conv, conv, dense
    gpu = small_net(np.random.default_rng(1), hw=8, act=act).to("gpu")
    x = rng.standard_normal((5, 2, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 5)
    opts = [nn.Adam(cpu.parameters(), lr=1e-2), nn.Adam(gpu.parameters(), lr=1e-2)]
    for step in range(3):
        for model, opt, xx, yy in ((cpu, opts[0], x, y), (gpu, opts[1], cp.asarray(x), cp.asarray(y))):
            loss = nn.losses.softmax_cross_entropy(model(Tensor(xx)), yy)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if step == 0:  # the first gradients agree closely (before Adam's sign-like steps)
            for (n, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
                scale = float(np.abs(a.grad).max())
                np.testing.assert_allclose(b.grad.get(), a.grad, rtol=1e-4, atol=1e-5 * scale, err_msg=n)
    for p in gpu.parameters():
        assert isinstance(p.data, cp.ndarray) and p.dtype == np.float32
    for m in opts[1].m:
        assert isinstance(m, cp.ndarray)
    for (n, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-4, err_msg=n)
    # checkpoint from the GPU loads on the CPU
    cpu.load_state_dict(gpu.state_dict())
    state = opts[1].state_dict()
    assert isinstance(state["m.0"], np.ndarray)
    opts[0].load_state_dict(state)


def test_gradcheck_on_device(rng, cupy_device):
    cp = cupy_device
    x = cp.asarray(rng.standard_normal((2, 3, 6, 6)))
    w = cp.asarray(rng.standard_normal((4, 3, 3, 3)))
    b = cp.asarray(rng.standard_normal(4))
    nn.gradcheck.check_backward(lambda x, w, b: F.conv2d(x, w, b, 2, "same"), [x, w, b], rng=rng)
    wd = cp.asarray(rng.standard_normal((4, 108)))
    nn.gradcheck.check_backward(lambda x, w, b: F.dense(F.flatten(x), w, b), [x, wd, b], rng=rng)
    nn.gradcheck.check_backward(lambda x: F.log_softmax(F.minmax(F.flatten(x)), 1), [x], rng=rng)

"""GloroNet on a CUDA device (CuPy arrays), with each GPU backend (cupy, numba_cuda) as
the default: same logits, loss, gradients, K and certificates as on the CPU; the Adam step
and PGD run there too. Skipped where there is no device."""
import numpy as np
import pytest

from gloro_core import attacks
from gloro_core.model import GloroNet
from kernels import registry

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cupy", "numba_cuda"]


@pytest.fixture
def gpu_backend(request, cupy_device, monkeypatch):
    """The backend under test as the default for CuPy arrays; every conv/dense op it runs
    is checked to be that backend's (counted in the returned dict)."""
    name = request.param
    why = registry.availability()[name]
    if why is not None:
        pytest.skip(f"backend {name!r} unavailable: {why}")
    calls = {}
    real = registry.get

    def get(op, backend):
        calls[backend] = calls.get(backend, 0) + 1
        return real(op, backend)

    monkeypatch.setattr(registry, "get", get)
    with registry.default_backend(name):
        yield calls
    gpu_used = {b for b in calls if registry.device_of(b) == "gpu"}
    assert gpu_used == {name}, calls

LAYERS = [{"type": "conv", "filters": 8, "kernel": 4, "stride": 2, "padding": "same"},
          {"type": "conv", "filters": 8, "kernel": 3, "stride": 1, "padding": "same"},
          {"type": "dense", "units": 16}, {"type": "dense", "units": 10}]


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("activation", ["relu", "minmax"])
@pytest.mark.parametrize("variant", ["margin", "basic"])
def test_gpu_matches_cpu(activation, variant, cupy_device, gpu_backend):
    cp = cupy_device
    rng = np.random.default_rng(0)
    cpu = GloroNet((1, 12, 12), 10, LAYERS, activation=activation, variant=variant, eps=0.2, seed=3)
    gpu = GloroNet((1, 12, 12), 10, LAYERS, activation=activation, variant=variant, eps=0.2, seed=3).to("gpu")
    assert gpu.device == "gpu" and isinstance(gpu.params[0][0].data, cp.ndarray)
    x = rng.random((32, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    np.testing.assert_allclose(gpu.logits(cp.asarray(x)), cpu.logits(x), rtol=1e-4, atol=1e-5)
    for loss in ("ce", "trades"):
        lc, gc = cpu.gradients(x, y, loss=loss, power_iters=3)
        lg, gg = gpu.gradients(x, y, loss=loss, power_iters=3)
        assert abs(lc - lg) <= 1e-4 * max(1.0, abs(lc))
        for k in gc:
            np.testing.assert_allclose(gg[k], gc[k], rtol=2e-3, atol=1e-5, err_msg=k)
    for a, b in zip(gpu.iterates, cpu.iterates):
        assert isinstance(a, cp.ndarray)
        np.testing.assert_allclose(cp.asnumpy(a), b, rtol=1e-3, atol=1e-5)
    lc, lg = cpu.update_lipschitz(), gpu.update_lipschitz()
    assert lg["k_sub_provable"] == pytest.approx(lc["k_sub_provable"], rel=1e-12)
    assert lg["k_sub_power"] == pytest.approx(lc["k_sub_power"], rel=1e-4)
    pc, rc = cpu.certify(x, eps=0.01)
    pg, rg = gpu.certify(cp.asarray(x), eps=0.01)
    np.testing.assert_allclose(rg, rc, rtol=1e-3, atol=1e-5)
    assert np.mean(pc == pg) >= 0.95


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
def test_gpu_training_step_attack_and_checkpoint(tmp_path, cupy_device, gpu_backend):
    cp = cupy_device
    from nn.optim import Adam

    rng = np.random.default_rng(1)
    net = GloroNet((1, 12, 12), 10, LAYERS, eps=0.2, seed=4).to("gpu")
    opt = Adam(net.parameters(), lr=1e-3)
    x = rng.random((64, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    first = None
    for _ in range(20):
        loss = net.loss(x, y, power_iters=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first and isinstance(net.params[0][0].data, cp.ndarray)
    adv = attacks.pgd_l2(net, x[:8], y[:8], 0.3, steps=5, rng=rng)
    assert isinstance(adv, np.ndarray)
    assert np.all(np.sqrt(((adv.astype(np.float64) - x[:8]) ** 2).reshape(8, -1).sum(1)) <= 0.3)
    net.save(tmp_path / "g.npz")
    import gloro_core

    back = gloro_core.load(tmp_path / "g.npz")
    np.testing.assert_allclose(back.logits(x), net.logits(x), rtol=1e-4, atol=1e-5)

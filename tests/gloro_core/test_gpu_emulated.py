"""The GPU path end to end on a CPU: CuPy replaced by a NumPy-backed stand-in
(tests/fake_cupy.py) whose RawModule kernels run on the CUDA C emulator.

What runs is the engine's own GPU code (``GloroNet.to("gpu")``, the cupy backend's host
code and CUDA C kernels, the training loop with ``device="gpu"``); what is checked is that
it computes what the CPU path computes, keeps a training step on the device (host syncs
counted by the stand-in) and runs the GPU power-step ops in training."""
from __future__ import annotations

import numpy as np
import pytest

from gloro_core.model import GloroNet
from gloro_core.train import TrainConfig, train
from kernels import registry
from nn.optim import Adam

pytestmark = pytest.mark.gpu_emulated

SPECS = [{"type": "conv", "filters": 4, "kernel": 3, "stride": 2, "padding": "same"},
         {"type": "dense", "units": 8}, {"type": "dense", "units": 3}]


def _net(**kw):
    return GloroNet((1, 8, 8), 3, SPECS, activation="minmax", eps=0.1, power_iters=2, **kw)


def _batch(rng, n=6):
    return rng.random((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, n)


@pytest.fixture
def op_calls(monkeypatch):
    """{(op, backend): calls} for every kernel op looked up through the registry."""
    calls = {}
    real = registry.get

    def get(op, backend):
        calls[(op, backend)] = calls.get((op, backend), 0) + 1
        return real(op, backend)

    monkeypatch.setattr(registry, "get", get)
    return calls


def test_stand_in_is_strict_where_cupy_is(fake_gpu):
    a = fake_gpu.asarray(np.arange(6.0))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones(6)
    s = a.sum()
    assert isinstance(s, fake_gpu.ndarray) and s.shape == ()   # a 0-d device array, no sync
    assert fake_gpu.total_syncs() == 0
    assert float(s) == 15.0 and fake_gpu.syncs == {"__float__": 1}


def test_gpu_logits_gloro_logits_and_certify_match_cpu(fake_gpu, rng):
    x, _ = _batch(rng)
    net = _net(seed=3)
    net.update_lipschitz(max_iter=50)
    want_logits, want_gl = net.logits(x), net.gloro_logits(x)
    want_cert, want_radius = net.certify(x)
    net.to("gpu")
    assert net.device == "gpu" and isinstance(net.layers[0].weight.data, fake_gpu.ndarray)
    net.update_lipschitz(max_iter=50)
    np.testing.assert_allclose(net.logits(x), want_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.gloro_logits(x), want_gl, rtol=1e-4, atol=1e-5)
    cert, radius = net.certify(x)
    assert isinstance(cert, np.ndarray) and isinstance(radius, np.ndarray)
    np.testing.assert_array_equal(cert, want_cert)
    np.testing.assert_allclose(radius, want_radius, rtol=1e-4, atol=1e-6)


def test_gpu_training_step_needs_no_host_sync(fake_gpu, rng, op_calls):
    """A GloRo step (power steps, loss, backward, Adam) from host batches: nothing read
    back, every GEMM and the power steps on the cupy backend, and the same gradients as
    the CPU path."""
    x, y = _batch(rng)
    cpu = _net(seed=1)
    cpu_loss = cpu.loss(x, y)
    cpu_loss.backward()
    want = {k: p.grad.copy() for k, p in cpu.named_parameters()}

    net = _net(seed=1).to("gpu")
    opt = Adam(list(net.parameters()), lr=1e-3)
    fake_gpu.reset_counts()
    op_calls.clear()
    loss = net.loss(x, y)
    loss.backward()
    opt.step()
    assert fake_gpu.total_syncs() == 0, fake_gpu.syncs
    assert isinstance(loss.data, fake_gpu.ndarray)
    on_cpu = sorted(k for k in op_calls if registry.device_of(k[1]) == "cpu")
    assert not on_cpu, f"ops of a GPU step ran on the CPU: {on_cpu}"
    assert op_calls.get(("conv2d_power_steps", "cupy")) == 1
    assert op_calls.get(("dense_power_steps", "cupy")) == 2   # both dense layers
    assert "conv2d_fwd<float,16,128>" in fake_gpu.emulator.launches
    assert any(k.startswith("l2_normalize") for k in fake_gpu.emulator.launches)
    np.testing.assert_allclose(float(loss.data), float(cpu_loss.data), rtol=1e-5)
    # the parameters were updated in place by Adam, so compare the gradients Adam saw
    for k, p in net.named_parameters():
        np.testing.assert_allclose(p.grad.get(), want[k], rtol=2e-4, atol=1e-6, err_msg=k)


def test_gpu_epoch_trains_on_the_device(fake_gpu, tmp_path, op_calls, monkeypatch):
    """train(device="gpu"): one host sync per loss window (GPU_LOSS_READ_EVERY steps), the
    power-step ops of the cupy backend, and a checkpoint that loads on the CPU."""
    import gloro_core.train as tr

    monkeypatch.setattr(tr, "GPU_LOSS_READ_EVERY", 2)   # the emulator is slow: short windows
    steps = 3                                            # one full window and a partial one
    real_batches = tr.data_mod.batches
    syncs_in_steps = []

    def batches(*a, **k):
        fake_gpu.reset_counts()
        yield from real_batches(*a, **k)
        syncs_in_steps.append(dict(fake_gpu.syncs))   # the epoch's last step is done

    monkeypatch.setattr(tr.data_mod, "batches", batches)
    cfg = TrainConfig(dataset="synthetic", synthetic_shape=(1, 8, 8), synthetic_n=(4 * steps, 8),
                      arch="c(4,3,2),d(8)", batch=4, epochs=1, power_iters=2, lipschitz_max_iter=20,
                      out=str(tmp_path / "run"), progress=False, device="gpu", val=0)
    hist = train(cfg, log=lambda m: None)
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"])
    assert syncs_in_steps == [{"get": 2}]   # two loss windows read back, nothing else
    assert op_calls.get(("conv2d_power_steps", "cupy"), 0) >= steps
    assert not any(registry.device_of(b) == "cpu" and op.startswith(("conv2d", "dense"))
                   for op, b in op_calls), sorted(op_calls)
    back = tr.load_checkpoint(str(tmp_path / "run" / "last.npz"))[0]
    assert back.device == "cpu"


def test_gpu_nan_loss_stops_within_one_window(fake_gpu, tmp_path, monkeypatch):
    """A NaN loss on the GPU is seen when its window is read: training stops there, naming
    the step that produced it, and no checkpoint is written."""
    import gloro_core.train as tr
    from gloro_core import data

    monkeypatch.setattr(tr, "GPU_LOSS_READ_EVERY", 2)
    taken = []
    real_batches = tr.data_mod.batches

    def batches(*a, **k):
        for idx in real_batches(*a, **k):
            taken.append(idx)
            yield idx

    monkeypatch.setattr(tr.data_mod, "batches", batches)
    ds = data.load_dataset("synthetic", seed=0, synthetic_shape=(1, 8, 8), synthetic_n=(16, 8))
    ds.x_train[:] = 3e38   # finite inputs whose logits overflow
    cfg = TrainConfig(dataset="synthetic", synthetic_shape=(1, 8, 8), synthetic_n=(16, 8),
                      arch="c(4,3,2),d(8)", batch=4, epochs=1, power_iters=1, lipschitz_max_iter=20,
                      out=str(tmp_path / "run"), progress=False, device="gpu", val=0)
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(tr.TrainingDiverged, match="step 1/4"):
        train(cfg, log=lambda m: None, dataset=ds)
    assert len(taken) == 2   # stopped at the first read, not at the end of the epoch
    assert not (tmp_path / "run" / "last.npz").exists()

"""bench/gpu_check.sh and bench/gpu_bench.py's GPU epoch, on a machine without a GPU.

The epoch must run with device="gpu" on the chosen backend and fail loudly without a
GPU (it used to train on the CPU and report "backend cupy" with exit 0); the check
must use the machine's python3, write its logs and one summary under the folder it is
given, and exit non-zero on any failure."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "gpu_bench.py"
CHECK = ROOT / "bench" / "gpu_check.sh"


@pytest.fixture
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _no_gpu_here():
    from kernels import registry

    return registry.availability()["cupy"] is not None


@pytest.mark.skipif(not _no_gpu_here(), reason="this machine has a GPU")
def test_train_without_gpu_fails_loudly(tmp_path):
    js = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, str(BENCH), "train", "--backend", "cupy", "--n", "64",
                           "--n-test", "32", "--batch", "32", "--json", str(js)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    res = json.loads(js.read_text())
    assert res["rc"] == 2 and "no GPU for backend cupy" in res["error"]
    assert "FAILED" in proc.stdout and "epoch_s" not in res


class _FakeArray:
    def get(self):
        return np.zeros(1)

    def __float__(self):
        return float(self.get()[0])  # nested: one sync, not two


class _FakeStream:
    def synchronize(self):
        pass


def _fake_cupy():
    class Device:
        def synchronize(self):
            pass

    return types.SimpleNamespace(ndarray=_FakeArray, cuda=types.SimpleNamespace(Stream=_FakeStream, Device=Device))


def test_sync_counter_counts_outermost_calls_and_restores(gpu_bench):
    cp = _fake_cupy()
    before = dict(vars(_FakeArray))
    c = gpu_bench.SyncCounter(cp)
    a = _FakeArray()
    a.get()  # inactive: not counted
    c.active = True
    float(a)
    a.get()
    _FakeStream().synchronize()
    assert c.counts == {"ndarray.__float__": 1, "ndarray.get": 1, "cupy Stream.synchronize": 1} and c.total == 3
    c.restore()
    assert dict(vars(_FakeArray)) == before and "synchronize" in vars(_FakeStream)


@pytest.mark.parametrize("backend", ["cupy", "numba_cuda"])
@pytest.mark.parametrize("ops_on", ["gpu", "cpu"])
def test_train_runs_a_gpu_config_on_the_chosen_backend(gpu_bench, monkeypatch, tmp_path, backend, ops_on):
    """bench_train with a stand-in for train(): the config says device="gpu", the backend is
    the default for the epoch, syncs and steps are counted; GEMMs on the CPU fail the run."""
    from kernels import registry

    import gloro_core.train as tr

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    monkeypatch.setattr(registry, "availability", lambda: {"cupy": None, "numba_cuda": None})
    monkeypatch.setattr(registry, "get", lambda op, be: (lambda *a: None))
    seen = {}

    def fake_train(cfg, log=print):
        seen.update(device=cfg.device, synthetic_n=cfg.synthetic_n, default=registry._DEFAULT)
        for _ in tr.data_mod.batches(100, 25):
            registry.get("conv2d", backend if ops_on == "gpu" else "numpy")
            registry.get("dense", backend if ops_on == "gpu" else "numpy")
            float(_FakeArray())  # the step's one host sync
        float(_FakeArray())  # after the steps (update_lipschitz, evaluation): not counted
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"epoch_s": 0.5, "eval_s": 0.1, "samples_per_s": 200.0}) + "\n")

    args = types.SimpleNamespace(arch="2C2F", n=100, n_test=10, batch=25, power_iters=2, backend=backend,
                                 out=str(tmp_path / "run"))
    res = gpu_bench.bench_train(args, train_fn=fake_train)
    assert seen == {"device": "gpu", "synthetic_n": (100, 10), "default": backend}
    assert res["steps"] == 4 and res["host_syncs"] == 4 and res["host_syncs_per_step"] == 1.0
    if ops_on == "gpu":
        assert res["rc"] == 0 and res["op_calls"] == {f"conv2d:{backend}": 4, f"dense:{backend}": 4}, res
        assert res["epoch_s"] == 0.5
    else:
        assert res["rc"] == 1 and "did not run on" in res["error"], res
    assert registry._DEFAULT is None  # the default comes back


def test_gpu_check_without_gpu_writes_summary_and_fails(tmp_path):
    """The machine's python3 (a shim to this interpreter here), logs and summary.txt in the
    folder given, a clear skip line without compute-sanitizer, non-zero exit."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a symlink loses the venv
    (shim / "python3").chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}",
               GPU_CHECK_STEPS="device memcheck kernels train_cupy")
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(CHECK), str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    summary = (out / "summary.txt").read_text()
    if _no_gpu_here():
        assert proc.returncode != 0, proc.stdout + proc.stderr
        assert "overall: FAIL" in summary
        for name in ("device", "kernels", "train_cupy"):
            assert (out / f"{name}.log").exists()
            assert any(line.split()[:2] == [name, "FAIL"] for line in summary.splitlines()), summary
        assert "no GPU for backend cupy" in summary
    san = [line for line in summary.splitlines() if line.startswith("memcheck")]
    assert len(san) == 1 and ("compute-sanitizer not found" in san[0] or "SKIPPED" not in san[0])
    text = CHECK.read_text()
    assert "pip install" not in text and ".venv/" not in text and "PYTHONPATH=" in text


@pytest.mark.gpu_emulated
def test_bench_gpu_epoch_on_the_cupy_stand_in(gpu_bench, fake_gpu, tmp_path):
    """The bench's GPU epoch for real on the CuPy stand-in (kernels on the CUDA C emulator):
    the engine trains with device="gpu", every GEMM and the power steps on the cupy backend,
    and at most one host sync per step, counted by the bench's own SyncCounter."""
    import dataclasses

    import gloro_core.train as tr

    def train_fn(cfg, log=print):   # a short convergence at the epoch's end: the emulator is slow
        return tr.train(dataclasses.replace(cfg, lipschitz_max_iter=10), log=log)

    args = types.SimpleNamespace(arch="c(4,3,2),d(8)", n=12, n_test=4, batch=4, power_iters=2,
                                 backend="cupy", out=str(tmp_path / "run"))
    res = gpu_bench.bench_train(args, train_fn=train_fn)
    assert res["rc"] == 0, res
    assert res["steps"] == 3 and res["host_syncs"] <= 1, res   # one loss window read back
    assert res["op_calls"].get("conv2d_power_steps:cupy") == 3, res["op_calls"]
    assert res["op_calls"].get("dense_power_steps:cupy") == 6, res["op_calls"]
    assert "epoch_s" in res and np.isfinite(res["loss"])


@pytest.mark.gpu_emulated
def test_kernel_rows_check_results(gpu_bench, fake_gpu, monkeypatch):
    """Each GEMM row of the kernel benchmark compares the GPU result with the numpy backend:
    a right kernel passes, a wrong one makes the row an error (and `kernels` exit 1)."""
    from kernels import registry

    rng = np.random.default_rng(0)
    x, w, b = (fake_gpu.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((8, 40), (12, 40), (12,)))
    ops = {"dense": ((8, 12, 40), lambda f: f(x, w, b))}
    avail = {"cupy": None, "numba_cuda": "not here"}
    good = gpu_bench._bench_ops(fake_gpu, registry, avail, "tiny", ops, 1, {})
    assert good[0]["backend"] == "cupy" and "error" not in good[0] and good[0]["max_rel_err"] < 1e-6, good
    real = registry.get
    monkeypatch.setattr(registry, "get", lambda op, be: (lambda *a: real(op, be)(*a) * 1.01) if be == "cupy" else real(op, be))
    bad = gpu_bench._bench_ops(fake_gpu, registry, avail, "tiny", ops, 1, {})
    assert "wrong result" in bad[0]["error"] and bad[0]["max_rel_err"] > 5e-3, bad
    gpu_bench.print_table(bad)

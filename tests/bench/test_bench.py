"""bench/run.py end to end on tiny selections (seconds, not a benchmark), and torch_ref's math."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(ROOT, "bench", "run.py")
HAS_TORCH = importlib.util.find_spec("torch") is not None
sys.path.insert(0, os.path.join(ROOT, "bench"))  # the bench's modules are scripts' siblings, not a package
import shapes  # noqa: E402
import torch_worker  # noqa: E402


def _run(tmp_path, *args, timeout=240):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, RUN, "--quick", "--silent", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as fh:
        data = json.load(fh)
    return proc.stdout, data


def test_kernel_records(tmp_path):
    stdout, data = _run(tmp_path, "--only", r"kernel/dense(_grad_weight)?/2C2F\.d2$", "--no-torch",
                        "--backend", "numpy,numba")
    meta, recs = data["meta"], data["records"]
    assert meta["cores"] >= 1 and meta["threads"] >= 1 and "blas" in meta
    assert meta["sgemm_gflops"] > 0
    assert "sgemm reference" in stdout and "GFLOP/s" in stdout
    timed = [r for r in recs if r["workload"] == "kernels"]
    # exactly the two selected ops x the two backends: the filter and --backend both hold
    assert sorted((r["name"], r["backend"]) for r in timed) == sorted(
        (f"kernel/{op}/2C2F.d2", be) for op in ("dense", "dense_grad_weight") for be in ("numpy", "numba"))
    flops = 2.0 * 256 * 100 * 10  # 2C2F.d2: 256 x 100 -> 10
    by = {(r["name"], r["backend"]): r for r in timed}
    for r in timed:
        assert r["batch"] == 256 and r["shape"] == "256x100->10"
        assert r["reps"] >= 2
        assert 0 < r["min_ms"] <= r["median_ms"] and math.isfinite(r["median_ms"])
        assert r["gflops"] == pytest.approx(flops / (r["median_ms"] * 1e-3) / 1e9, rel=1e-9)
        assert r["frac_sgemm"] == pytest.approx(r["gflops"] / r["sgemm_gflops"], rel=1e-9)
        assert "ours_over_torch" not in r  # --no-torch
    for op in ("dense", "dense_grad_weight"):
        npy, nba = by[(f"kernel/{op}/2C2F.d2", "numpy")], by[(f"kernel/{op}/2C2F.d2", "numba")]
        assert "speedup_vs_numpy" not in npy
        assert nba["speedup_vs_numpy"] == pytest.approx(npy["median_ms"] / nba["median_ms"], rel=1e-9)
    # nothing outside the filter ran
    assert all(r["name"].startswith("kernel/") for r in recs)
    assert any("torch" in n for n in data["notes"])


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_column_and_reference_scaling(tmp_path):
    _, data = _run(tmp_path, "--only", r"kernel/minmax/2C2F\.c2$", "--backend", "numpy,reference")
    recs = {r["backend"]: r for r in data["records"] if r["workload"] == "kernels"}
    assert set(recs) == {"numpy", "torch", "reference"}
    assert recs["numpy"]["ours_over_torch"] == pytest.approx(
        recs["numpy"]["median_ms"] / recs["torch"]["median_ms"], rel=1e-9)
    ref = recs["reference"]
    assert ref["measured_batch"] == 8 and "N=8" in ref["note"]
    # timed at N=8, scaled linearly to 256
    assert ref["median_ms"] == pytest.approx(ref["measured_ms"] * 32, rel=1e-9)
    assert recs["numpy"]["gbps"] > 0 and "gflops" not in recs["numpy"]
    t = recs["torch"]
    assert t["median_ms"] == pytest.approx(min(t["torch_glibc_ms"], t["torch_tuned_ms"]), rel=1e-9)
    assert t["malloc"] in ("glibc defaults", "raised malloc thresholds")


def test_step_records_or_skip_note(tmp_path):
    _, data = _run(tmp_path, "--only", "step/.*/2C2F|overhead/2C2F", "--batch", "16", timeout=400)
    recs = [r for r in data["records"] if r["workload"] in ("step", "overhead")]
    have_model = importlib.util.find_spec("gloro_core.model") is not None
    if not have_model:
        assert any("ours skipped" in n for n in data["notes"])
    else:
        ours = {r["name"]: r for r in recs if r["backend"] == "ours"}
        assert {"step/gloro/2C2F", "step/standard/2C2F", "overhead/2C2F"} <= set(ours)
        assert ours["step/gloro/2C2F"]["power_iters"] == 10
        assert ours["overhead/2C2F"]["gloro_over_standard"] == pytest.approx(
            ours["step/gloro/2C2F"]["median_ms"] / ours["step/standard/2C2F"]["median_ms"], rel=1e-9)
        assert ours["step/gloro/2C2F"]["compile_s"] >= 0
    if HAS_TORCH:
        t = {r["name"]: r for r in recs if r["backend"] == "torch"}
        tg = t["step/gloro/2C2F"]
        assert tg["median_ms"] > 0
        # PyTorch at its best: the faster of its two malloc settings, both medians kept
        both = (tg["torch_glibc_ms"], tg["torch_tuned_ms"])
        assert tg["median_ms"] == pytest.approx(min(both), rel=1e-9)
        assert tg["malloc"] == ("glibc defaults" if both[0] <= both[1] else "raised malloc thresholds")
        if have_model:
            og = ours["step/gloro/2C2F"]
            assert og["ours_over_torch"] == pytest.approx(og["median_ms"] / tg["median_ms"], rel=1e-9)
            assert og["ours_over_torch_glibc"] == pytest.approx(og["median_ms"] / both[0], rel=1e-9)
    # the FLOP floor: the step's FLOPs over the run's headline sgemm rate
    for r in recs:
        if r["workload"] == "step":
            want = shapes.step_flops("2C2F", 16, r["name"].split("/")[1], r["power_iters"])
            assert r["step_gflop"] == pytest.approx(want / 1e9, rel=1e-12)
            assert r["gflops"] == pytest.approx(want / (r["median_ms"] * 1e-3) / 1e9, rel=1e-9)
            assert r["frac_floor"] == pytest.approx(r["gflops"] / data["meta"]["sgemm_gflops"], rel=1e-9)
    # the bench puts no thread policy into the environment, and PyTorch ran in its workers only
    assert data["meta"]["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY")
    assert data["meta"]["torch_imported_here"] is False


def test_memory_and_scaling_records(tmp_path):
    _, data = _run(tmp_path, "--only", "mem/2C2F|scale/iters|threads", "--batch", "16", "--no-torch",
                   "--threads", "2", timeout=400)
    if importlib.util.find_spec("gloro_core.model") is None:
        pytest.skip("the engine model is not there yet")
    recs = {(r["name"], r["backend"]): r for r in data["records"]}
    mem = recs[("mem/2C2F", "ours")]
    assert mem["mem_method"] == "tracemalloc" and mem["batch"] == 16
    assert mem["peak_mb"] > 0 and mem["mb_per_instance"] == pytest.approx(mem["peak_mb"] / 16, rel=1e-12)
    # a 16-sample 2C2F step allocates at least its first activation (16x16x14x14 float32)
    assert mem["peak_mb"] * 2**20 >= 16 * 16 * 14 * 14 * 4
    p0, p5 = recs[("scale/iters/2C2F/p0", "ours")], recs[("scale/iters/2C2F/p5", "ours")]
    assert (p0["power_iters"], p5["power_iters"]) == (0, 5)
    assert p5["ms_per_power_iter"] == pytest.approx((p5["median_ms"] - p0["median_ms"]) / 5, rel=1e-9)
    b2, b1 = recs.get(("threads/blas2/2C2F", "ours")), recs.get(("threads/blas1/2C2F", "ours"))
    if b1 is not None:  # NumPy on OpenBLAS: the thread A/B ran
        assert b1["blas_threads"] == 1 and b2["blas_threads"] == 2
        assert b1["blas1_over_blasN"] == pytest.approx(b1["median_ms"] / b2["median_ms"], rel=1e-9)


def test_data_parallel_records(tmp_path):
    """5c: 4C3F steps/s at K = 1 and 2 ranks (mpiexec), and the all-reduce's bytes: the
    parameters' (1.97 M float32), the power iterates' (rank 0's, shared) and the loss."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip('needs the mpi extra: pip install -e ".[mpi]"')
    _, data = _run(tmp_path, "--only", "scale/mpi", "--batch", "16", "--no-torch", timeout=400)
    recs = {r["name"]: r for r in data["records"]}
    assert set(recs) == {"scale/mpi/4C3F/K1", "scale/mpi/4C3F/K2"}, data["notes"]
    k1, k2 = recs["scale/mpi/4C3F/K1"], recs["scale/mpi/4C3F/K2"]
    from gloro_core.model import GloroNet

    net = GloroNet((1, 28, 28), 10, shapes.arch_specs("4C3F"))
    nbytes = sum(p.data.nbytes for p in net.parameters())
    assert (k1["ranks"], k2["ranks"]) == (1, 2)
    assert k1["param_bytes"] == k2["param_bytes"] == nbytes == 4 * 1_974_762
    it_bytes = sum(v.nbytes for v in net.iterates)
    assert k2["allreduce_bytes"] == nbytes + it_bytes + 4 and k1["allreduce_bytes"] == 0
    for r in (k1, k2):
        assert r["steps_per_s"] == pytest.approx(1e3 / r["median_ms"], rel=1e-9)
    assert "of K=1" in k2["note"] and k2["allreduce_ms"] > 0


def test_step_flops_formula():
    """2C2F at batch n: c1 1x28x28 -> 16x14x14 (k4), c2 -> 32x7x7 (k4), d1 1568 -> 100, d2 100 -> 10."""
    macs = [14 * 14 * 16 * 1 * 16, 7 * 7 * 32 * 16 * 16, 1568 * 100, 100 * 10]
    assert [shapes.layer_macs(r) for r in shapes.layer_table("2C2F")] == macs
    n, p = 8, 3
    standard = 2 * n * macs[0] * 2 + sum(2 * n * m * 3 for m in macs[1:])  # no grad-input for the images
    assert shapes.step_flops("2C2F", n, "standard", 0) == standard
    power = sum(4 * m * p + 4 * m for m in macs[:-1])  # batch-1 iterates, all layers but the last
    assert shapes.step_flops("2C2F", n, "gloro", p) == standard + power


def test_torch_worker_environment():
    """Each PyTorch worker starts from the bench's environment; only GLIBC_TUNABLES differs."""
    base = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=1", "OMP_NUM_THREADS": "3"}
    glibc, tuned = torch_worker.worker_env(base, "glibc"), torch_worker.worker_env(base, "tuned")
    assert glibc == {"PATH": "/bin", "OMP_NUM_THREADS": "3"}
    assert tuned == dict(glibc, GLIBC_TUNABLES=torch_worker.TUNED)
    assert "mmap_threshold=1073741824" in torch_worker.TUNED and "trim_threshold=1073741824" in torch_worker.TUNED


def test_bad_arguments_fail_cleanly():
    proc = subprocess.run([sys.executable, RUN, "--quick", "--full"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode != 0 and "exclude" in proc.stderr


# ------------------------------------------------------------ torch_ref's math
torch = pytest.importorskip("torch") if HAS_TORCH else None


def _tr():
    import torch_ref

    return torch_ref


SPECS = [{"type": "conv", "filters": 4, "kernel": 4, "stride": 2, "padding": "same"},
         {"type": "conv", "filters": 6, "kernel": 3, "stride": 1, "padding": "same"},
         {"type": "dense", "units": 7}, {"type": "dense", "units": 5}]


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_ref_adjoints_and_same_padding():
    tr = _tr()
    rng = np.random.default_rng()
    m = tr.TorchGloroNet((3, 9, 11), 5, SPECS, dtype=torch.float64, seed=int(rng.integers(1 << 30)))
    assert m.layers[0].pads == (1, 2, 1, 2)  # SAME, k4 s2 on 9x11: extra pixel bottom/right
    assert m.layers[0].out_shape == (4, 5, 6)
    for layer in m.layers:
        u = torch.from_numpy(rng.standard_normal((2,) + layer.in_shape))
        with torch.no_grad():
            y = layer(u, bias=False)
            v = torch.from_numpy(rng.standard_normal(tuple(y.shape)))
            lhs, rhs = float((y * v).sum()), float((u * layer.adjoint(v)).sum())
        assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_ref_power_method_and_bot_masking():
    tr = _tr()
    m = tr.TorchGloroNet((1, 6, 6), 5, SPECS, dtype=torch.float64, seed=3)
    # the power method's sigma reaches the exact operator norm of a dense layer from below
    d = m.layers[2]
    exact = float(torch.linalg.matrix_norm(d.weight.detach(), ord=2))
    m.power_iterate(100)
    sig = float(d(m.iterates[2], bias=False).detach().norm())
    assert sig <= exact * (1 + 1e-9) and sig == pytest.approx(exact, rel=1e-6)
    # tied top logits: masking by index keeps y_⊥ finite (>= the tied logit), so never certified
    y = torch.tensor([[2.0, 2.0, 0.0, -1.0, 0.5]], dtype=torch.float64)
    g = m.gloro_logits(y, torch.tensor(1.0, dtype=torch.float64), eps=0.1)
    assert torch.isfinite(g).all() and g[0, 5] > 2.0
    # y_⊥ matches a loop over i != j
    y = torch.from_numpy(np.random.default_rng().standard_normal((4, 5)))
    k = 1.7
    g = m.gloro_logits(y, torch.tensor(k, dtype=torch.float64), eps=0.3).detach()
    w = m.layers[-1].weight.detach()
    for n in range(4):
        j = int(y[n].argmax())
        want = max(float(y[n, i]) + 0.3 * k * float((w[j] - w[i]).norm()) for i in range(5) if i != j)
        assert float(g[n, 5]) == pytest.approx(want, rel=1e-12)
    # the loss backpropagates to every parameter, finitely
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    loss = m.loss(x, torch.tensor([0, 1, 2]), power_iters=2)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())

"""The numba_cuda kernels, run on the CPU by Numba's CUDA simulator, against the oracle.

NUMBA_ENABLE_CUDASIM must be set before numba is first imported, so the whole
check runs once in a subprocess (``SCRIPT`` below) that drives the backend's
host launchers (``host_call``: NumPy in, ``numba.cuda.to_device``, NumPy out)
on tiny shapes and prints one JSON record per comparison. Each record becomes
one assertion here. Shapes are chosen to hit: odd sizes, stride 1 and 2,
kernels 3 and 4, SAME (asymmetric) and VALID padding, several GEMM tiles,
split-K (atomic accumulation), bias / no bias, MinMax ties and NaN, float32
and float64.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import json, math, sys, time
import numpy as np
from numba import config
assert config.ENABLE_CUDASIM, "simulator not enabled"
import kernels.numba_cuda_backend as nb
from kernels import reference as ref
from kernels.checks import resolve_padding, conv_out_hw
from kernels.fused import _adam_update_cpu

rng = np.random.default_rng(int(sys.argv[1]))
out = []
TOL = {"float32": 2e-5, "float64": 1e-12}


def rec(name, got, want, dt, extra_ok=True):
    got = np.asarray(got)
    want = np.asarray(want)
    ok_meta = got.shape == want.shape and got.dtype == want.dtype
    # error relative to the result's scale; NaN makes err NaN and the check fail
    scale = 1.0 + float(np.max(np.abs(want))) if want.size else 1.0
    err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) / scale if ok_meta and want.size else 0.0
    out.append(dict(name=name, err=err, tol=TOL[dt], meta=ok_meta and bool(extra_ok),
                    shape=[list(got.shape), list(want.shape)], dtype=[str(got.dtype), str(want.dtype)]))


def randn(*shape, dt):
    return rng.standard_normal(shape).astype(dt)


t0 = time.time()
# (x shape, w shape, stride, padding, bias)
CONVS = [
    ((2, 3, 5, 6), (4, 3, 3, 3), 1, "same", True),       # odd sizes, SAME
    ((1, 2, 7, 6), (3, 2, 4, 4), 2, "same", False),      # kernel 4, stride 2, asymmetric SAME
    ((2, 2, 14, 13), (2, 2, 3, 3), (2, 1), "valid", True),  # VALID; grad-W K = 132 -> split-K
    ((1, 1, 9, 9), (20, 1, 3, 3), 1, 1, True),           # int padding; M = 20 > one 16-row tile
]
for dt in ("float32", "float64"):
    for ci, (xs, ws, stride, padding, use_b) in enumerate(CONVS):
        x, w = randn(*xs, dt=dt), randn(*ws, dt=dt)
        b = randn(ws[0], dt=dt) if use_b else None
        s = stride if isinstance(stride, tuple) else (stride, stride)
        pads = resolve_padding(padding, xs[2:], ws[2:], s)
        y = nb.host_call("conv2d", x, w, b, s, pads)
        rec(f"conv2d:{ci}-{dt}", y, ref.conv2d(x, w, b, s, pads), dt)
        gy = randn(*y.shape, dt=dt)
        rec(f"conv2d_grad_input:{ci}-{dt}", nb.host_call("conv2d_grad_input", gy, w, xs, s, pads),
            ref.conv2d_grad_input(gy, w, xs, s, pads), dt)
        rec(f"conv2d_grad_weight:{ci}-{dt}", nb.host_call("conv2d_grad_weight", x, gy, ws, s, pads),
            ref.conv2d_grad_weight(x, gy, ws, s, pads), dt)

    # (N, I, O): odd sizes; the third has a long batch -> split-K for grad-W
    for di, (n, i, o) in enumerate([(5, 37, 19), (3, 20, 2), (300, 7, 3)]):
        x, w, b = randn(n, i, dt=dt), randn(o, i, dt=dt), randn(o, dt=dt)
        rec(f"dense:{di}-{dt}", nb.host_call("dense", x, w, b), ref.dense(x, w, b), dt)
        rec(f"dense:nobias{di}-{dt}", nb.host_call("dense", x, w, None), ref.dense(x, w, None), dt)
        gy = randn(n, o, dt=dt)
        rec(f"dense_grad_input:{di}-{dt}", nb.host_call("dense_grad_input", gy, w), ref.dense_grad_input(gy, w), dt)
        rec(f"dense_grad_weight:{di}-{dt}", nb.host_call("dense_grad_weight", x, gy), ref.dense_grad_weight(x, gy), dt)

    for mi, shape in enumerate([(3, 6, 4, 5), (7, 10)]):
        x = randn(*shape, dt=dt)
        x[:, 3] = x[:, 2]           # a tied pair
        gy = randn(*shape, dt=dt)
        rec(f"minmax:{mi}-{dt}", nb.host_call("minmax", x), ref.minmax(x), dt)
        rec(f"minmax_grad:{mi}-{dt}", nb.host_call("minmax_grad", x, gy), ref.minmax_grad(x, gy), dt)
    xn = np.array([[1.0, np.nan, 2.0, 2.0, 3.0, -1.0]], dtype=dt)
    yn = nb.host_call("minmax", xn)
    rec(f"minmax:nan-{dt}", yn[:, 2:], np.array([[2.0, 2.0, -1.0, 3.0]], dtype=dt), dt,
        extra_ok=bool(np.isnan(yn[0, :2]).all()))

    # Adam: in place, against the CPU op
    p, g, m = randn(5, 7, dt=dt), randn(5, 7, dt=dt), randn(5, 7, dt=dt)
    v = np.abs(randn(5, 7, dt=dt))
    args = (0.01, 0.9, 0.999, 1e-7)
    want = [a.copy() for a in (p, g, m, v)]
    _adam_update_cpu(want[0], want[1], want[2], want[3], *args)
    nb.host_call("adam_update", p, g, m, v, *args)
    for nm, got, w_ in (("p", p, want[0]), ("m", m, want[2]), ("v", v, want[3])):
        rec(f"adam_update:{nm}-{dt}", got, w_, dt)

    # power steps: sigma = ||A v||, v_next = A^T A v / ||A^T A v||
    xs, ws, s = (1, 2, 6, 5), (3, 2, 3, 3), (2, 2)
    pads = resolve_padding("same", xs[2:], ws[2:], s)
    v0 = randn(*xs, dt=dt)
    v0 /= np.linalg.norm(v0)
    w = randn(*ws, dt=dt)
    z, sig = nb.host_call("conv_power_step", v0, w, s, pads)
    u = ref.conv2d(v0, w, None, s, pads)
    zr = ref.conv2d_grad_input(u, w, xs, s, pads).astype(np.float64)
    rec(f"conv_power_step:v-{dt}", z, (zr / np.linalg.norm(zr)).astype(dt), dt)
    rec(f"conv_power_step:sigma-{dt}", sig.reshape(()), np.asarray(np.linalg.norm(u.astype(np.float64)), dtype=dt), dt)
    w = randn(9, 13, dt=dt)
    v0 = randn(13, dt=dt)
    v0 /= np.linalg.norm(v0)
    z, sig = nb.host_call("dense_power_step", v0, w)
    u = w.astype(np.float64) @ v0
    zr = w.T.astype(np.float64) @ u
    rec(f"dense_power_step:v-{dt}", z, (zr / np.linalg.norm(zr)).astype(dt), dt)
    rec(f"dense_power_step:sigma-{dt}", sig.reshape(()), np.asarray(np.linalg.norm(u), dtype=dt), dt)

print("SIM_SECONDS", round(time.time() - t0, 1), file=sys.stderr)
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def sim_results():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(REPO))
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; printed on failure
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(seed)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"simulator run failed (seed {seed}):\n{proc.stderr[-4000:]}"
    sys.stderr.write(proc.stderr.splitlines()[-1] + "\n" if proc.stderr else "")
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    return seed, {r["name"]: r for r in records}


OPS = [
    "conv2d", "conv2d_grad_input", "conv2d_grad_weight", "dense", "dense_grad_input",
    "dense_grad_weight", "minmax", "minmax_grad", "adam_update",
    "conv_power_step", "dense_power_step",
]


@pytest.mark.parametrize("op", OPS)
def test_simulated_kernel_matches_oracle(sim_results, op):
    seed, recs = sim_results
    mine = {k: r for k, r in recs.items() if k.split(":")[0] == op}
    assert mine, f"no simulator results for {op}"
    for dt in ("float32", "float64"):
        assert any(k.endswith(dt) for k in mine), f"{op}: no {dt} case"
    for name, r in mine.items():
        assert r["meta"], f"{name} (seed {seed}): shape/dtype {r['shape']} {r['dtype']} or NaN check"
        assert r["err"] <= r["tol"], f"{name} (seed {seed}): relative error {r['err']:.3g} > {r['tol']:.1g}"


def test_simulator_reports_unavailable(sim_results):
    """Under the simulator the backend must not claim a device (checked in-process here: no GPU)."""
    import kernels.numba_cuda_backend as nb

    assert nb.availability() is not None

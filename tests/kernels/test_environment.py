"""No engine module changes the process environment (which other libraries read: an
OMP_WAIT_POLICY set here once slowed PyTorch's OpenMP runtime in the same process)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a fresh interpreter: snapshot, import and use every CPU backend and a tiny
# GloroNet, then report every variable that was added, removed or changed.
SCRIPT = r"""
import json, os
before = dict(os.environ)
import numpy as np
import kernels, nn, gloro_core
from kernels import registry
from gloro_core.model import GloroNet

rng = np.random.default_rng(0)
x = rng.standard_normal((2, 4, 6, 6), dtype=np.float32)
w = rng.standard_normal((6, 4, 3, 3), dtype=np.float32)
xd = rng.standard_normal((3, 8), dtype=np.float32)
wd = rng.standard_normal((5, 8), dtype=np.float32)
used = []
for be in ("numpy", "numba", "reference"):
    if registry.availability().get(be) is not None:
        continue
    y = kernels.conv2d(x, w, None, 1, "same", backend=be)
    kernels.conv2d_grad_input(y, w, x.shape, 1, "same", backend=be)
    kernels.conv2d_grad_weight(x, y, (3, 3), 1, "same", backend=be)
    kernels.dense(xd, wd, None, backend=be)
    kernels.minmax(y, backend=be)
    used.append(be)
specs = [{"type": "conv", "filters": 4, "kernel": 3, "stride": 2, "padding": "same"},
         {"type": "dense", "units": 3}]
net = GloroNet((1, 8, 8), 3, specs, eps=0.1, seed=0, dtype="float32")
xs = rng.random((4, 1, 8, 8), dtype=np.float32)
loss = net.loss(xs, np.array([0, 1, 2, 0]), power_iters=2)
loss.backward()
net.update_lipschitz(tol=1e-3, max_iter=50)
net.certify(xs)
after = dict(os.environ)
diff = {k: [before.get(k), after.get(k)] for k in set(before) | set(after) if before.get(k) != after.get(k)}
print(json.dumps({"used": used, "diff": diff}))
"""


def test_engine_leaves_the_environment_unchanged():
    # drop what the engine might set, so that a setdefault() would show up as a change
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMP_", "GOMP_", "KMP_", "OPENBLAS_", "MKL_", "NUMBA_", "GLORO_"))}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"numpy", "reference"} <= set(out["used"])
    assert out["diff"] == {}, f"the engine changed os.environ: {out['diff']}"

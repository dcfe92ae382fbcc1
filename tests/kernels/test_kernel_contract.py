"""The kernel contract (registry.OPS): the ops every backend implements, and the fused
power-step ops under one name and meaning on every backend.

``conv2d_power_steps(v, w, iters, stride, pads)`` and ``dense_power_steps(v, w, iters)``
return (v after ``iters`` steps, ok); a step where A v or A^T u is exactly 0 keeps the
previous iterate. gloro_core.lipschitz looks the ops up by these names, so a GPU backend
that registered other names (it once registered one step as ``conv_power_step``) never
ran its kernels in training. The numba_cuda ones run here under Numba's CUDA simulator
against the CPU (numba) ops; the cupy ones need CuPy and a device (tests marked gpu).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OPS = ("conv2d_power_steps", "dense_power_steps")


def _registered(module_file: str) -> set:
    """(op, backend) pairs registered with a literal @register("op", "backend") decorator."""
    tree = ast.parse((REPO / "kernels" / module_file).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register" and len(node.args) == 2 \
                and all(isinstance(a, ast.Constant) for a in node.args):
            out.add((node.args[0].value, node.args[1].value))
    return out


def _decorated_arity(module_file: str) -> dict:
    """{(op, backend): number of positional parameters} of @register-decorated functions."""
    tree = ast.parse((REPO / "kernels" / module_file).read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register" and len(d.args) == 2:
                    out[(d.args[0].value, d.args[1].value)] = len(node.args.posonlyargs) + len(node.args.args)
    return out


def _impls_dict_keys(module_file: str) -> set:
    """Keys of a module-level ``_IMPLS = {...}`` literal (numba_cuda registers from it)."""
    tree = ast.parse((REPO / "kernels" / module_file).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_IMPLS" for t in node.targets):
            return {k.value for k in node.value.keys}
    return set()


@pytest.mark.parametrize("module_file, backend", [("numba_backend.py", "numba"), ("cupy_backend.py", "cupy"),
                                                  ("numba_cuda_backend.py", "numba_cuda")])
def test_every_fused_backend_registers_the_names_lipschitz_looks_up(module_file, backend):
    regs = _registered(module_file)
    for op in OPS:
        assert (op, backend) in regs, f"{module_file} does not register {op!r} for {backend!r}"


@pytest.mark.parametrize("module_file, backend", [("cupy_backend.py", "cupy"), ("numba_cuda_backend.py", "numba_cuda")])
def test_gpu_backends_implement_the_required_ops(module_file, backend):
    """Read from the source: the GPU modules do not import without CuPy."""
    from kernels import registry

    have = {op for op, b in _registered(module_file) if b == backend} | _impls_dict_keys(module_file)
    assert not set(registry.REQUIRED) - have, f"{backend} lacks {sorted(set(registry.REQUIRED) - have)}"
    assert have <= set(registry.OPS), f"{backend} registers ops outside the contract: {sorted(have - set(registry.OPS))}"
    for (op, _), n in _decorated_arity(module_file).items():
        assert n == len(registry.OPS[op]), f"{backend} {op} takes {n} parameters, the contract {registry.OPS[op]}"


@pytest.mark.parametrize("backend", ["numpy", "numba", "reference"])
def test_cpu_backends_implement_the_required_ops(backend):
    from kernels import registry

    if registry._load(backend) is not None:   # numba missing: its backend reports why
        pytest.skip(f"{backend} unavailable: {registry._load(backend)}")
    missing = [op for op in registry.REQUIRED if not registry.has(op, backend)]
    assert not missing, f"{backend} lacks {missing}"


def test_registration_checks_the_contract():
    """An unknown op name or a wrong parameter list fails when the backend registers, not
    when a caller first looks the op up."""
    from kernels import registry

    with pytest.raises(ValueError, match="'conv_power_steps' is not an op of the kernel contract"):
        registry.register("conv_power_steps", "numpy")
    with pytest.raises(TypeError, match=r"dense_power_steps takes \(v, w, iters\); f takes 2"):
        def f(v, w):
            return v, None

        registry.register("dense_power_steps", "numpy")(f)


SCRIPT = r'''
import json, sys
import numpy as np
from numba import config
assert config.ENABLE_CUDASIM, "simulator not enabled"
import kernels.numba_cuda_backend as nb
from kernels import numba_backend as cpu
from kernels.checks import resolve_padding

rng = np.random.default_rng(int(sys.argv[1]))
out = []
for dt in ("float64", "float32"):
    for zero in (False, True):
        v = rng.standard_normal((1, 2, 6, 5)).astype(dt)
        v /= np.linalg.norm(v)
        w = rng.standard_normal((3, 2, 3, 3)).astype(dt) * (0 if zero else 1)
        s = (2, 2)
        pads = resolve_padding("same", (6, 5), (3, 3), s)
        got = nb.host_call("conv2d_power_steps", v, w, 4, s, pads)
        want, ok = cpu.conv2d_power_steps(v, w, 4, s, pads)
        out.append(dict(name=f"conv-{dt}-zero{zero}", err=float(np.abs(got - want).max()),
                        kept=bool(np.array_equal(got, v)), ok=bool(ok), shape=list(got.shape)))
        v = rng.standard_normal((1, 7)).astype(dt)
        v /= np.linalg.norm(v)
        w = rng.standard_normal((5, 7)).astype(dt) * (0 if zero else 1)
        got = nb.host_call("dense_power_steps", v, w, 4)
        want, ok = cpu.dense_power_steps(v, w, 4)
        out.append(dict(name=f"dense-{dt}-zero{zero}", err=float(np.abs(got - want).max()),
                        kept=bool(np.array_equal(got, v)), ok=bool(ok), shape=list(got.shape)))
print(json.dumps(out))
'''


def test_numba_cuda_power_steps_match_the_cpu_ops_under_the_simulator():
    pytest.importorskip("numba")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "7"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(recs) == 8
    for r in recs:
        tol = 1e-12 if "float64" in r["name"] else 2e-5
        assert r["err"] <= tol, r
        if r["name"].endswith("zeroTrue"):
            # zero weights: A v = 0 at the first step; both keep the iterate (the CPU says ok False)
            assert r["kept"] and not r["ok"], r
        else:
            assert r["ok"] and not r["kept"], r

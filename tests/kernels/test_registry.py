"""Backend registry: what is available, why not, and which implementation a call runs."""
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import need

import kernels
from kernels import registry


def test_backends_lists_reference_and_numpy():
    names = kernels.backends()
    assert "reference" in names and "numpy" in names
    assert set(names) <= set(registry.BACKEND_MODULES)


def test_availability_gives_reasons():
    av = kernels.availability()
    assert set(av) == set(registry.BACKEND_MODULES)
    for name, why in av.items():
        assert why is None or (isinstance(why, str) and why.strip()), (name, why)
    assert kernels.backends() == [n for n, why in av.items() if why is None]
    assert av["reference"] is None and av["numpy"] is None


def test_import_needs_no_gpu():
    """A fresh interpreter with no visible CUDA device imports kernels, lists backends and
    runs a conv on the default path; importing does not pull in CuPy."""
    code = (
        "import sys, numpy as np, kernels\n"
        "assert 'cupy' not in sys.modules, 'import kernels imported cupy'\n"
        "print(sorted(kernels.backends()))\n"
        "x = np.ones((1, 2, 5, 5), np.float32); w = np.ones((3, 2, 3, 3), np.float32)\n"
        "print(kernels.conv2d(x, w).dtype)\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", GLORO_BACKEND="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'numpy'" in out.stdout and "'reference'" in out.stdout and "float32" in out.stdout, out.stdout


@pytest.mark.parametrize("backend", [b for b, (_, dev) in registry.BACKEND_MODULES.items() if dev == "cpu"])
def test_every_cpu_backend_implements_every_op(backend):
    need(backend)
    for op in kernels.OPS + ("adam_update",):
        assert callable(registry.get(op, backend)), op


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b, (_, dev) in registry.BACKEND_MODULES.items() if dev == "gpu"])
def test_every_gpu_backend_implements_every_op(backend):
    need(backend)
    for op in kernels.OPS + ("adam_update",):
        assert callable(registry.get(op, backend)), op


def test_default_selection_by_array_type(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    x = np.ones((2, 4), np.float32)
    assert registry.select("dense", x) == registry.DEFAULT_CPU_BY_OP.get("dense", registry.DEFAULT_CPU)
    assert registry.device_of(registry.select("conv2d", x)) == "cpu"


def test_argument_beats_env_var(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "numpy")
    x = np.ones((2, 4))
    assert registry.select("dense", x) == "numpy"
    assert registry.select("dense", x, backend="reference") == "reference"
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert registry.select("dense", x) == "reference"


def test_env_var_for_the_other_device_is_ignored(monkeypatch):
    """GLORO_BACKEND=cupy applies to CuPy arrays; NumPy arrays keep the CPU default."""
    monkeypatch.setenv(registry.ENV_VAR, "cupy")
    assert registry.device_of(registry.select("dense", np.ones((2, 4)))) == "cpu"


def _spy(monkeypatch, op, backend):
    """Wrap the registered implementation so the test sees which one ran."""
    calls = []
    real = registry.get(op, backend)

    def spy(*args):
        calls.append(backend)
        return real(*args)

    monkeypatch.setitem(registry._IMPLS, (op, backend), spy)
    return calls


@pytest.mark.parametrize("chosen", ["reference", "numpy"])
def test_call_runs_the_selected_backend(monkeypatch, chosen):
    x, w = np.ones((2, 4)), np.ones((3, 4))
    spies = {b: _spy(monkeypatch, "dense", b) for b in ("reference", "numpy")}
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    kernels.dense(x, w, backend=chosen)
    assert spies[chosen] == [chosen] and sum(map(len, spies.values())) == 1
    monkeypatch.setenv(registry.ENV_VAR, chosen)
    np.testing.assert_array_equal(kernels.dense(x, w), np.full((2, 3), 4.0))
    assert spies[chosen] == [chosen, chosen] and sum(map(len, spies.values())) == 2


@pytest.mark.parametrize("backend", ["cupy", "numba_cuda"])
def test_gpu_backend_on_numpy_array_is_a_clear_error(backend):
    with pytest.raises(ValueError, match=f"{backend}.*gpu.*NumPy"):
        kernels.conv2d(np.ones((1, 2, 5, 5)), np.ones((3, 2, 3, 3)), backend=backend)
    with pytest.raises(ValueError, match=f"{backend}.*NumPy"):
        kernels.minmax(np.ones((2, 4)), backend=backend)


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setitem(registry._LOADED, "numba", "numba is not importable: test reason")
    assert "numba" not in kernels.backends()
    assert kernels.availability()["numba"].endswith("test reason")
    with pytest.raises(RuntimeError, match="'numba'.*test reason"):
        kernels.dense(np.ones((2, 4)), np.ones((3, 4)), backend="numba")


def test_missing_op_is_named(monkeypatch):
    monkeypatch.delitem(registry._IMPLS, ("minmax", "reference"))
    with pytest.raises(NotImplementedError, match="'minmax'.*'reference'"):
        kernels.minmax(np.ones((2, 4)), backend="reference")


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="'tpu'"):
        registry.register("conv2d", "tpu")


def test_array_helpers_on_numpy():
    x = np.ones(3)
    assert not kernels.is_gpu_array(x)
    assert kernels.array_module(x) is np

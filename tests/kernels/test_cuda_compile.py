"""The GPU kernels compile cleanly without a GPU (CPU-only CI).

* Every kernels/cuda/*.cu source, with every template instance the cupy backend
  asks for (float and double, every GEMM tile), compiles to PTX with nvcc for
  sm_80 and sm_90 with all warnings as errors; ptxas then reports registers and
  spills per kernel (printed, run pytest -s to see them) and no kernel may spill.
* The same sources compile through NVRTC (the compiler CuPy's RawModule uses),
  driven directly through CuPy's NVRTC bindings: CuPy's own compile path asks
  the runtime for the current device's architecture first, which fails without
  a driver, so it cannot be exercised here.
* Every numba_cuda kernel compiles with numba.cuda.compile_ptx for float32 and
  float64 at cc 8.0, and its PTX also goes through ptxas (no spills).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import kernels.cupy_backend as cb
import kernels.numba_cuda_backend as ncb

CUDA_DIR = Path(cb.CUDA_DIR)
ARCHS = ("80", "90")


def _tool(name):
    for cand in (shutil.which(name), f"/usr/local/bin/{name}", f"/usr/local/cuda/bin/{name}"):
        if cand and os.path.exists(cand):
            return cand
    return None


NVCC = _tool("nvcc")
PTXAS = _tool("ptxas")
needs_nvcc = pytest.mark.skipif(NVCC is None or PTXAS is None, reason="nvcc/ptxas not installed")


def test_every_cu_file_is_listed():
    """A new .cu file must be wired into the backend (and so into these tests)."""
    assert sorted(p.name for p in CUDA_DIR.glob("*.cu")) == sorted(cb.SOURCES)


def _instantiating_unit(source: str, tmp: Path) -> Path:
    """A translation unit that includes ``source`` and takes the address of every
    template instance, so nvcc emits each one (as NVRTC does for name expressions)."""
    exprs = cb.name_expressions(source)
    body = ",\n    ".join(f"(void*)&{e}" for e in exprs)
    unit = tmp / f"inst_{source}"
    unit.write_text(f'#include "{CUDA_DIR / source}"\n\nvoid* gloro_instances[] = {{\n    {body}\n}};\n')
    return unit


_PTXAS_FN = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _ptxas_report(ptx: Path, arch: str):
    """{kernel: (registers, spill_store_bytes, spill_load_bytes)} from ``ptxas -v``."""
    proc = subprocess.run(
        [PTXAS, f"-arch=sm_{arch}", "-v", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    report, fn, spill = {}, None, None
    for line in proc.stderr.splitlines():
        if m := _PTXAS_FN.search(line):
            fn, spill = m.group(1), None
        elif (m := _PTXAS_SPILL.search(line)) and fn:
            spill = (int(m.group(1)), int(m.group(2)))
        elif (m := _PTXAS_REGS.search(line)) and fn:
            report[fn] = (int(m.group(1)),) + (spill or (0, 0))
    return report


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", cb.SOURCES)
def test_nvcc_ptx_no_warnings_no_spills(source, arch, tmp_path):
    unit = _instantiating_unit(source, tmp_path)
    ptx = tmp_path / f"{source}.sm_{arch}.ptx"
    proc = subprocess.run(
        [NVCC, "--ptx", f"-arch=sm_{arch}", "-std=c++17", "-Werror", "all-warnings", "-o", str(ptx), str(unit)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, f"nvcc failed for {source} sm_{arch}:\n{proc.stderr}"
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
    report = _ptxas_report(ptx, arch)
    n_expected = len(cb.name_expressions(source))
    assert len(report) == n_expected, f"ptxas saw {len(report)} kernels, expected {n_expected}: {sorted(report)}"
    print(f"\n{source} sm_{arch}: kernel registers spill-store/load bytes")
    for fn, (regs, st, ld) in sorted(report.items()):
        print(f"  {fn:60s} {regs:4d} {st:5d}/{ld}")
    spilled = {fn: r for fn, r in report.items() if r[1] or r[2]}
    assert not spilled, f"register spills: {spilled}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", cb.SOURCES)
def test_nvrtc_compiles_every_instance(source, arch):
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    try:
        nvrtc.getVersion()
    except Exception as exc:  # pragma: no cover - wheel missing
        pytest.skip(f"NVRTC library not loadable: {exc}")
    code = (CUDA_DIR / source).read_text()
    prog = nvrtc.createProgram(code, source, [], [])
    try:
        exprs = cb.name_expressions(source)
        for e in exprs:
            nvrtc.addNameExpression(prog, e)
        opts = [f"-arch=compute_{arch}", *cb.NVRTC_OPTIONS]
        try:
            nvrtc.compileProgram(prog, opts)
        except Exception as exc:
            pytest.fail(f"NVRTC failed for {source} compute_{arch}: {exc}\n{nvrtc.getProgramLog(prog)}")
        log = nvrtc.getProgramLog(prog)
        assert "warning" not in log.lower(), log
        lowered = {e: nvrtc.getLoweredName(prog, e) for e in exprs}
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        for e, name in lowered.items():
            assert f".entry {name}" in ptx, f"{e} ({name}) missing from the PTX"
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(ncb.KERNELS))
def test_numba_kernel_compiles(name, dtype, tmp_path):
    from numba import cuda

    factory, sig = ncb.KERNELS[name]
    ptx, _ = cuda.compile_ptx(factory(np.dtype(dtype).type), sig(dtype), cc=(8, 0))
    assert ".entry" in ptx
    if PTXAS is None:
        return
    path = tmp_path / f"{name}_{dtype}.ptx"
    path.write_text(ptx)
    report = _ptxas_report(path, "80")
    assert len(report) == 1, report
    (fn, (regs, st, ld)), = report.items()
    print(f"\nnumba {name} {dtype}: {regs} registers, spill {st}/{ld} bytes")
    assert st == 0 and ld == 0, f"numba kernel {name} {dtype} spills {st}/{ld} bytes"


# ---------------------------------------------------------------- emulated execution
# The CUDA C kernels run on the CPU emulator (tests/cuda_emulator.py), driven by the cupy
# backend's own host code with CuPy swapped for plain NumPy.


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The cupy backend module with its kernels running on the CPU emulator."""
    import types

    import cuda_emulator

    if cuda_emulator.GXX is None:
        pytest.skip("g++ not installed")
    emu = cuda_emulator.Emulator(cuda_emulator.build(tmp_path_factory.mktemp("cuda_emu")))
    fake_cp = types.SimpleNamespace(empty=np.empty, zeros=np.zeros, empty_like=np.empty_like,
                                    ascontiguousarray=np.ascontiguousarray, where=np.where)
    mp = pytest.MonkeyPatch()
    mp.setattr(cb, "cp", fake_cp)
    mp.setattr(cb, "_kernel", lambda source, expr: emu.kernel(expr))
    mp.setattr(cb, "_SM_COUNT", [2])  # a small "GPU": split-K kicks in on small shapes
    yield cb
    mp.undo()


def _close(got, want, dt):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    tol = 2e-5 if dt == "float32" else 1e-12
    err = np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))) / (1.0 + np.max(np.abs(want)))
    assert err <= tol, f"relative error {err:.3g} > {tol:.1g}"  # NaN fails too


# (x shape, w shape, stride, padding, bias): tiles 16x128 (O <= 16), 32x128 (O <= 32),
# 64x64 (O > 32) and split-K for grad-W on the longer ones
EMU_CONVS = [
    ((2, 3, 7, 6), (5, 3, 3, 3), (1, 1), "same", True),
    ((1, 2, 9, 8), (20, 2, 4, 4), (2, 2), "same", False),
    ((2, 4, 11, 10), (40, 4, 3, 3), (2, 1), "valid", True),
    ((3, 1, 12, 12), (6, 1, 3, 3), (1, 1), 2, True),
    ((1, 1, 5, 5), (1, 1, 1, 1), (1, 1), "valid", True),      # 1x1 kernel
    ((1, 3, 11, 10), (2, 3, 5, 5), (3, 3), "same", False),    # stride 3
    ((2, 3, 13, 12), (4, 3, 7, 7), (1, 1), "same", True),     # 7x7
    ((1, 2, 5, 6), (3, 2, 5, 3), (2, 1), (2, 2, 1, 1), True),  # non-square kernel and stride
]


@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("case", range(len(EMU_CONVS)))
def test_emulated_conv(emulated, case, dt):
    from kernels import reference as ref
    from kernels.checks import resolve_padding

    rng = np.random.default_rng()
    xs, ws, s, padding, use_b = EMU_CONVS[case]
    x = rng.standard_normal(xs).astype(dt)
    w = rng.standard_normal(ws).astype(dt)
    b = rng.standard_normal(ws[0]).astype(dt) if use_b else None
    pads = resolve_padding(padding, xs[2:], ws[2:], s)
    y = emulated.conv2d(x, w, b, s, pads)
    _close(y, ref.conv2d(x, w, b, s, pads), dt)
    gy = rng.standard_normal(y.shape).astype(dt)
    _close(emulated.conv2d_grad_input(gy, w, xs, s, pads), ref.conv2d_grad_input(gy, w, xs, s, pads), dt)
    _close(emulated.conv2d_grad_weight(x, gy, ws, s, pads), ref.conv2d_grad_weight(x, gy, ws, s, pads), dt)


@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("n,i,o", [(5, 37, 19), (70, 33, 40), (300, 7, 3), (1, 200, 10)])
def test_emulated_dense(emulated, n, i, o, dt):
    from kernels import reference as ref

    rng = np.random.default_rng()
    x, w, b = (rng.standard_normal(s).astype(dt) for s in ((n, i), (o, i), (o,)))
    _close(emulated.dense(x, w, b), ref.dense(x, w, b), dt)
    _close(emulated.dense(x, w, None), ref.dense(x, w, None), dt)
    gy = rng.standard_normal((n, o)).astype(dt)
    _close(emulated.dense_grad_input(gy, w), ref.dense_grad_input(gy, w), dt)
    _close(emulated.dense_grad_weight(x, gy), ref.dense_grad_weight(x, gy), dt)


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_emulated_minmax_and_adam(emulated, dt):
    from kernels import reference as ref
    from kernels.fused import _adam_update_cpu

    rng = np.random.default_rng()
    for shape in ((3, 6, 4, 5), (7, 10)):
        x = rng.standard_normal(shape).astype(dt)
        x[:, 3] = x[:, 2]  # ties
        gy = rng.standard_normal(shape).astype(dt)
        np.testing.assert_array_equal(emulated.minmax(x), ref.minmax(x))
        np.testing.assert_array_equal(emulated.minmax_grad(x, gy), ref.minmax_grad(x, gy))
    xn = np.array([[1.0, np.nan, 2.0, 2.0, 3.0, -1.0]], dtype=dt)
    yn = emulated.minmax(xn)
    assert np.isnan(yn[0, :2]).all()
    np.testing.assert_array_equal(yn[0, 2:], [2.0, 2.0, -1.0, 3.0])

    p, g, m = (rng.standard_normal((33, 17)).astype(dt) for _ in range(3))
    v = np.abs(rng.standard_normal((33, 17))).astype(dt)
    want = [a.copy() for a in (p, g, m, v)]
    _adam_update_cpu(*want, 0.01, 0.9, 0.999, 1e-7)
    emulated.adam_update(p, g, m, v, 0.01, 0.9, 0.999, 1e-7)
    for got, w_ in ((p, want[0]), (m, want[2]), (v, want[3])):
        _close(got, w_, dt)


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_emulated_power_steps(emulated, dt, monkeypatch):
    from kernels import reference as ref
    from kernels.checks import resolve_padding

    rng = np.random.default_rng()
    xs, ws, s = (1, 2, 9, 7), (5, 2, 3, 3), (2, 2)
    pads = resolve_padding("same", xs[2:], ws[2:], s)
    v0 = rng.standard_normal(xs)
    v0 = (v0 / np.linalg.norm(v0)).astype(dt)
    w = rng.standard_normal(ws).astype(dt)
    z, sigma = emulated.conv_power_step(v0, w, s, pads)
    u = ref.conv2d(v0, w, None, s, pads).astype(np.float64)
    zr = ref.conv2d_grad_input(u, w.astype(np.float64), xs, s, pads)
    _close(z, (zr / np.linalg.norm(zr)).astype(dt), dt)
    _close(np.asarray(sigma).reshape(()), np.asarray(np.linalg.norm(u), dtype=dt), dt)

    w = rng.standard_normal((37, 70)).astype(dt)  # 37 rows: warps take 1 or 2 rows each
    for fused_max in (cb.FUSED_DENSE_POWER_MAX, 0):  # the one-block kernel, then the GEMM path
        monkeypatch.setattr(cb, "FUSED_DENSE_POWER_MAX", fused_max)
        for shape in ((70,), (1, 70)):
            v0 = rng.standard_normal(shape)
            v0 = (v0 / np.linalg.norm(v0)).astype(dt)
            z, sigma = emulated.dense_power_step(v0, w)
            u = w.astype(np.float64) @ v0.reshape(-1).astype(np.float64)
            zr = w.T.astype(np.float64) @ u
            _close(z, (zr / np.linalg.norm(zr)).reshape(shape).astype(dt), dt)
            _close(np.asarray(sigma).reshape(()), np.asarray(np.linalg.norm(u), dtype=dt), dt)


# ---------------------------------------------------------------- on a real device

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba_cuda"])
@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_gpu_paper_shapes_and_power_steps(backend, dt, monkeypatch):
    """2C2F layer shapes (real tile/split-K plans for the device) and the power-step ops."""
    from kernels import reference as ref
    from kernels import registry
    from kernels.checks import resolve_padding

    why = registry.availability()[backend]
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    import cupy

    rng = np.random.default_rng()
    op = lambda name: registry.get(name, backend)  # noqa: E731
    host = cupy.asnumpy
    for xs, ws in (((8, 1, 28, 28), (16, 1, 4, 4)), ((8, 16, 14, 14), (32, 16, 4, 4))):
        x, w, b = (rng.standard_normal(s).astype(dt) for s in (xs, ws, ws[:1]))
        s = (2, 2)
        pads = resolve_padding("same", xs[2:], ws[2:], s)
        dx, dw, db = (cupy.asarray(a) for a in (x, w, b))
        y = op("conv2d")(dx, dw, db, s, pads)
        _close(host(y), ref.conv2d(x, w, b, s, pads), dt)
        gy = rng.standard_normal(y.shape).astype(dt)
        dgy = cupy.asarray(gy)
        _close(host(op("conv2d_grad_input")(dgy, dw, xs, s, pads)), ref.conv2d_grad_input(gy, w, xs, s, pads), dt)
        _close(host(op("conv2d_grad_weight")(dx, dgy, ws, s, pads)), ref.conv2d_grad_weight(x, gy, ws, s, pads), dt)
        # power step on this layer
        v0 = rng.standard_normal((1,) + xs[1:])
        v0 = (v0 / np.linalg.norm(v0)).astype(dt)
        z, sigma = op("conv_power_step")(cupy.asarray(v0), dw, s, pads)
        u = ref.conv2d(v0, w, None, s, pads).astype(np.float64)
        zr = ref.conv2d_grad_input(u, w.astype(np.float64), v0.shape, s, pads)
        _close(host(z), (zr / np.linalg.norm(zr)).astype(dt), dt)
        _close(host(sigma).reshape(()), np.asarray(np.linalg.norm(u), dtype=dt), dt)

    x, w, b = (rng.standard_normal(s).astype(dt) for s in ((256, 1568), (100, 1568), (100,)))
    dx, dw, db = (cupy.asarray(a) for a in (x, w, b))
    _close(host(op("dense")(dx, dw, db)), ref.dense(x, w, b), dt)
    gy = rng.standard_normal((256, 100)).astype(dt)
    _close(host(op("dense_grad_input")(cupy.asarray(gy), dw)), ref.dense_grad_input(gy, w), dt)
    _close(host(op("dense_grad_weight")(dx, cupy.asarray(gy))), ref.dense_grad_weight(x, gy), dt)
    for fused_max in ((cb.FUSED_DENSE_POWER_MAX, 0) if backend == "cupy" else (None,)):
        if fused_max is not None:
            monkeypatch.setattr(cb, "FUSED_DENSE_POWER_MAX", fused_max)
        v0 = rng.standard_normal((1, 1568))
        v0 = (v0 / np.linalg.norm(v0)).astype(dt)
        z, sigma = op("dense_power_step")(cupy.asarray(v0), dw)
        u = w.astype(np.float64) @ v0[0].astype(np.float64)
        zr = w.T.astype(np.float64) @ u
        _close(host(z), (zr / np.linalg.norm(zr)).reshape(1, -1).astype(dt), dt)
        _close(host(sigma).reshape(()), np.asarray(np.linalg.norm(u), dtype=dt), dt)

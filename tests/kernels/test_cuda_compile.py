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

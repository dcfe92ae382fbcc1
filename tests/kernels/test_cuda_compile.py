"""The GPU kernels compile cleanly without a GPU (CPU-only CI).

* Every kernels/cuda/*.cu source, with every template instance the cupy backend
  asks for (float and double, every GEMM tile), compiles to PTX with nvcc for
  sm_80 and sm_90 with all warnings as errors; ptxas then reports registers,
  shared memory and spills per kernel (printed, run pytest -s to see them), and
  every instance must fit a block at its most threads (its __launch_bounds__, else
  1024): registers x threads <= 65536, static shared memory <= 48 KiB, no spills.
* The same sources compile through NVRTC (the compiler CuPy's RawModule uses),
  driven directly through CuPy's NVRTC bindings: CuPy's own compile path asks
  the runtime for the current device's architecture first, which fails without
  a driver, so it cannot be exercised here.
* Every numba_cuda kernel compiles with numba.cuda.compile_ptx for float32 and
  float64 at cc 8.0, and its PTX also goes through ptxas (the same limits).
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


def _instantiating_unit(path: Path, exprs, tmp: Path) -> Path:
    """A translation unit that includes the .cu file ``path`` and takes the address of
    every template instance in ``exprs``, so nvcc emits each one (as NVRTC does for name
    expressions)."""
    body = ",\n    ".join(f"(void*)&{e}" for e in exprs)
    unit = tmp / f"inst_{path.name}"
    unit.write_text(f'#include "{path}"\n\nvoid* gloro_instances[] = {{\n    {body}\n}};\n')
    return unit


_PTXAS_FN = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(([^{]*)\{")
_PTX_NTID = re.compile(r"\.(?:maxntid|reqntid)\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?")

# Per block on sm_80 and sm_90: the register file a block may use, registers per thread,
# static __shared__ (more needs dynamic shared memory and an opt-in attribute), threads.
REGS_PER_BLOCK = 65536
REGS_PER_THREAD = 255
STATIC_SMEM_BYTES = 48 * 1024
MAX_THREADS = 1024


def _ptxas_report(ptx: Path, arch: str):
    """{kernel: {regs, stack, spill_st, spill_ld, smem, threads}} from ``ptxas -v`` on
    ``ptx``, and ptxas's error lines.  ``threads`` is the kernel's most threads per
    block: its __launch_bounds__ (.maxntid in the PTX), else 1024 (any legal block)."""
    proc = subprocess.run(
        [PTXAS, f"-arch=sm_{arch}", "-v", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
        capture_output=True, text=True,
    )
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    if proc.returncode != 0 and not errors:
        errors = [proc.stderr.strip() or f"ptxas exited with {proc.returncode}"]
    threads = {}
    for m in _PTX_ENTRY.finditer(ptx.read_text()):
        if n := _PTX_NTID.search(m.group(2)):
            threads[m.group(1)] = int(n.group(1)) * int(n.group(2) or 1) * int(n.group(3) or 1)
    report, fn = {}, None
    for line in proc.stderr.splitlines():
        if m := _PTXAS_FN.search(line):
            fn = m.group(1)
            report[fn] = {"regs": 0, "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0,
                          "threads": threads.get(fn, MAX_THREADS), "bounded": fn in threads}
        elif fn is None:
            continue
        if m := _PTXAS_FRAME.search(line):
            report[fn].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        if m := _PTXAS_REGS.search(line):
            report[fn]["regs"] = int(m.group(1))
        if m := _PTXAS_SMEM.search(line):
            report[fn]["smem"] = int(m.group(1))
    return report, errors


def _block_registers(regs: int, threads: int) -> int:
    """Registers a block of ``threads`` takes: allocated per warp, in units of 256."""
    return -(-threads // 32) * (-(-regs * 32 // 256) * 256)


def _limit_violations(report, errors) -> list[str]:
    """One line per kernel over a launch, register, shared-memory or spill limit."""
    bad = [f"ptxas: {e}" for e in errors]
    for fn, r in sorted(report.items()):
        t = r["threads"]
        if t > MAX_THREADS:
            bad.append(f"{fn}: __launch_bounds__ {t} > {MAX_THREADS} threads per block")
        if r["regs"] > REGS_PER_THREAD:
            bad.append(f"{fn}: {r['regs']} registers per thread > {REGS_PER_THREAD}")
        if (br := _block_registers(r["regs"], t)) > REGS_PER_BLOCK:
            how = "its __launch_bounds__" if r["bounded"] else "no __launch_bounds__: any block up to 1024"
            bad.append(f"{fn}: {r['regs']} registers x {t} threads ({how})"
                       f" = {br} > {REGS_PER_BLOCK} registers per block: the launch would fail "
                       f"(too many resources requested)")
        if r["smem"] > STATIC_SMEM_BYTES:
            bad.append(f"{fn}: {r['smem']} bytes of static shared memory > {STATIC_SMEM_BYTES}")
        if r["spill_st"] or r["spill_ld"]:
            bad.append(f"{fn}: spills {r['spill_st']}/{r['spill_ld']} bytes (stores/loads) to local memory")
    return bad


def _nvcc_ptx(path: Path, exprs, arch: str, tmp: Path):
    unit = _instantiating_unit(path, exprs, tmp)
    ptx = tmp / f"{path.name}.sm_{arch}.ptx"
    proc = subprocess.run(
        [NVCC, "--ptx", f"-arch=sm_{arch}", "-std=c++17", "-Werror", "all-warnings", "-o", str(ptx), str(unit)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, f"nvcc failed for {path.name} sm_{arch}:\n{proc.stderr}"
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
    return ptx


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", cb.SOURCES)
def test_nvcc_ptx_no_warnings_within_limits(source, arch, tmp_path):
    """No warnings; every kernel instance within the launch, register and shared-memory
    limits at its most threads per block, and no spills."""
    exprs = cb.name_expressions(source)
    report, errors = _ptxas_report(_nvcc_ptx(CUDA_DIR / source, exprs, arch, tmp_path), arch)
    assert len(report) == len(exprs), f"ptxas saw {len(report)} kernels, expected {len(exprs)}: {sorted(report)}"
    print(f"\n{source} sm_{arch}: kernel  registers  threads  block registers  smem bytes  spill store/load")
    for fn, r in sorted(report.items()):
        print(f"  {fn:60s} {r['regs']:4d} {r['threads']:5d} {_block_registers(r['regs'], r['threads']):6d} "
              f"{r['smem']:6d} {r['spill_st']:5d}/{r['spill_ld']}")
    bad = _limit_violations(report, errors)
    assert not bad, "\n".join(bad)


# Kernels over a limit on purpose: the check above must catch each one.
OVER_LIMITS = r"""
// 40 doubles live at once (about 90 registers): fine at 256 threads, not at 1024
template <typename T>
__global__ void register_hog(const T* __restrict__ a, T* __restrict__ b)
{
    T r[40];
#pragma unroll
    for (int i = 0; i < 40; ++i) r[i] = a[threadIdx.x + 1024 * i];
    T s = 0;
#pragma unroll
    for (int i = 0; i < 40; ++i)
#pragma unroll
        for (int j = 0; j < 40; ++j) s += r[i] * r[(i * 7 + j) % 40];
    b[threadIdx.x] = s;
}

// the same under __launch_bounds__(1024): ptxas caps it at 64 registers and spills
template <typename T>
__global__ void __launch_bounds__(1024) bounded_hog(const T* __restrict__ a, T* __restrict__ b)
{
    T r[40];
#pragma unroll
    for (int i = 0; i < 40; ++i) r[i] = a[threadIdx.x + 1024 * i];
    T s = 0;
#pragma unroll
    for (int i = 0; i < 40; ++i)
#pragma unroll
        for (int j = 0; j < 40; ++j) s += r[i] * r[(i * 7 + j) % 40];
    b[threadIdx.x] = s;
}

// the same at 256 threads: within every limit
template <typename T>
__global__ void __launch_bounds__(256) hog_at_256(const T* __restrict__ a, T* __restrict__ b)
{
    T r[40];
#pragma unroll
    for (int i = 0; i < 40; ++i) r[i] = a[threadIdx.x + 1024 * i];
    T s = 0;
#pragma unroll
    for (int i = 0; i < 40; ++i)
#pragma unroll
        for (int j = 0; j < 40; ++j) s += r[i] * r[(i * 7 + j) % 40];
    b[threadIdx.x] = s;
}

#ifdef BIG_SHARED
__global__ void big_shared(float* a)  // 64 KiB of static shared memory
{
    __shared__ float s[16384];
    s[threadIdx.x] = a[threadIdx.x];
    __syncthreads();
    a[threadIdx.x] = s[16383 - threadIdx.x];
}
#endif
"""


@needs_nvcc
def test_limits_check_catches_kernels_over_limits(tmp_path):
    src = tmp_path / "over_limits.cu"
    src.write_text(OVER_LIMITS)
    exprs = ["register_hog<double>", "bounded_hog<double>", "hog_at_256<double>"]
    report, errors = _ptxas_report(_nvcc_ptx(src, exprs, "80", tmp_path), "80")
    bad = _limit_violations(report, errors)
    print("\n".join(bad))
    hog = next(fn for fn in report if "register_hog" in fn)
    assert report[hog]["regs"] > 64 and report[hog]["threads"] == 1024, report[hog]
    want = (f"{hog}: {report[hog]['regs']} registers x 1024 threads (no __launch_bounds__: any block up to 1024) = "
            f"{_block_registers(report[hog]['regs'], 1024)} > 65536 registers per block: the launch would fail "
            f"(too many resources requested)")
    assert [b for b in bad if "register_hog" in b] == [want], bad
    assert any("bounded_hog" in b and "spills" in b for b in bad), bad
    assert not [b for b in bad if "hog_at_256" in b], bad
    assert len(bad) == 2, bad

    big = tmp_path / "big_shared.cu"
    big.write_text("#define BIG_SHARED\n" + OVER_LIMITS)
    report, errors = _ptxas_report(_nvcc_ptx(big, ["hog_at_256<float>"], "90", tmp_path), "90")
    bad = _limit_violations(report, errors)
    print("\n".join(bad))
    assert any("big_shared" in b and "uses too much shared data" in b for b in bad), bad
    assert any("big_shared" in b and "65536 bytes of static shared memory > 49152" in b for b in bad), bad


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
    report, errors = _ptxas_report(path, "80")
    assert len(report) == 1, report
    (_, r), = report.items()
    print(f"\nnumba {name} {dtype}: {r['regs']} registers, {r['threads']} threads, spill {r['spill_st']}/{r['spill_ld']} bytes")
    bad = _limit_violations(report, errors)
    assert not bad, "\n".join(bad)


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
    # GLORO_EMU_SANITIZE=1: built with ASan and UBSan (test_cuda_emulator_strict runs these
    # tests so in a child process that has the ASan runtime preloaded)
    sanitize = os.environ.get("GLORO_EMU_SANITIZE") == "1"
    if sanitize and "libasan" not in Path("/proc/self/maps").read_text():
        pytest.fail("GLORO_EMU_SANITIZE=1 needs the ASan runtime preloaded (cuda_emulator.sanitizer_env())")
    emu = cuda_emulator.Emulator(cuda_emulator.build(tmp_path_factory.mktemp("cuda_emu"), sanitize=sanitize))
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

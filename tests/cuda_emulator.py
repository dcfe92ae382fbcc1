"""Run the CUDA C kernels (kernels/cuda/*.cu) on the CPU: a g++ build against a small
emulation of the CUDA subset they use, and a launcher with RawKernel's calling convention.

Without a GPU the kernels can still be *run*: the sources are compiled by g++ against the
prelude below, and the cupy backend's own host code (tile/split-K planning, argument order,
zeroing for split-K) drives them, with CuPy swapped for NumPy (tests/fake_cupy.py, or plain
NumPy in tests/kernels/test_cuda_compile.py). This checks the kernels' arithmetic and
indexing against the oracle; it says nothing about speed or about GPU-only hazards beyond
what real threads and barriers expose.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

import kernels.cupy_backend as cb

CUDA_DIR = Path(cb.CUDA_DIR)
GXX = shutil.which("g++")

EMU_PRELUDE = r"""// CPU emulation of the CUDA subset the kernels use: one OS thread per CUDA
// thread, blocks run one after another (so __shared__ = function static is
// per block), __syncthreads = a block-wide barrier, warp shuffles through a
// per-warp slot array and barrier, atomicAdd under a mutex.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>
using std::max;
using std::min;
using std::sqrt;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
static std::barrier<>* emu_block_bar = nullptr;
static std::vector<std::unique_ptr<std::barrier<>>> emu_warp_bars;
static std::vector<double> emu_warp_slots;
static std::mutex emu_atomic_mu;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)
inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
template <typename T> T atomicAdd(T* p, T v) { std::lock_guard<std::mutex> g(emu_atomic_mu); T old = *p; *p = old + v; return old; }
inline unsigned emu_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
template <typename T> T __shfl_down_sync(unsigned, T v, int off)
{
    const unsigned t = emu_tid(), lane = t % 32, warp = t / 32;
    emu_warp_slots[t] = (double)v;
    emu_warp_bars[warp]->arrive_and_wait();
    const double r = lane + off < 32 ? emu_warp_slots[t + off] : (double)v;
    emu_warp_bars[warp]->arrive_and_wait();
    return (T)r;
}
template <typename... A, std::size_t... I>
void emu_call(void (*k)(A...), void** args, std::index_sequence<I...>)
{
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <typename... A>
std::function<void(void**)> emu_bind(void (*k)(A...))
{
    return [k](void** args) { emu_call(k, args, std::index_sequence_for<A...>{}); };
}
#define EMU_REG(...) {#__VA_ARGS__, emu_bind(&__VA_ARGS__)}

"""

EMU_LAUNCH = r"""extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,
                          unsigned bx, unsigned by, unsigned bz, void** args)
{
    auto it = emu_kernels().find(name);
    if (it == emu_kernels().end()) return 1;
    const unsigned nt = bx * by * bz;
    if (nt % 32) return 2;
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    emu_warp_slots.assign(nt, 0.0);
    emu_warp_bars.clear();
    for (unsigned w = 0; w < nt / 32; ++w) emu_warp_bars.emplace_back(new std::barrier<>(32));
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                std::barrier<> bar(nt);
                emu_block_bar = &bar;
                std::vector<std::thread> threads;
                threads.reserve(nt);
                for (unsigned t = 0; t < nt; ++t)
                    threads.emplace_back([&, t] {
                        blockIdx = {x, y, z};
                        threadIdx = {t % bx, (t / bx) % by, t / (bx * by)};
                        it->second(args);
                    });
                for (auto& th : threads) th.join();
            }
    return 0;
}
"""


def build(tmp: Path | None = None) -> Path:
    """Compile every kernel of every cupy source with the prelude into a shared library."""
    if GXX is None:
        raise RuntimeError("g++ is not installed: the CUDA C emulator cannot be built")
    tmp = Path(tmp) if tmp is not None else Path(tempfile.mkdtemp(prefix="cuda_emu_"))
    src = EMU_PRELUDE
    for s in cb.SOURCES:
        src += f'#include "{CUDA_DIR / s}"\n'
    regs = ",\n".join(f"        EMU_REG({e})" for s in cb.SOURCES for e in cb.name_expressions(s))
    src += (
        "static std::map<std::string, std::function<void(void**)>>& emu_kernels()\n{\n"
        "    static std::map<std::string, std::function<void(void**)>> m = {\n" + regs + "\n    };\n    return m;\n}\n"
    )
    src += EMU_LAUNCH
    cpp, so = tmp / "emu.cpp", tmp / "emu.so"
    cpp.write_text(src)
    proc = subprocess.run(
        [GXX, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-o", str(so), str(cpp)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the CUDA C emulator does not build:\n{proc.stderr[-4000:]}")
    return so


_CTYPE = {np.int32: ctypes.c_int32, np.int64: ctypes.c_longlong,
          np.float32: ctypes.c_float, np.float64: ctypes.c_double}


class Emulator:
    """The built library; ``kernel(expr)`` is a callable with RawKernel's convention,
    ``kernel(grid, block, args)``, whose array arguments are C-contiguous NumPy arrays."""

    def __init__(self, so: Path):
        self.lib = ctypes.CDLL(str(so))
        self.lib.emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [ctypes.POINTER(ctypes.c_void_p)]
        self.lib.emu_launch.restype = ctypes.c_int
        self.launches: list[str] = []   # every kernel launched, in order

    def kernel(self, expr: str):
        return _EmuKernel(self, expr)


class _EmuKernel:
    def __init__(self, emu: Emulator, expr: str):
        self.emu, self.expr = emu, expr

    def __call__(self, grid, block, args):
        cells = []  # ctypes objects holding each argument's value (kept alive for the call)
        for a in args:
            if isinstance(a, np.ndarray):
                if not a.flags.c_contiguous:
                    raise AssertionError(f"{self.expr}: non-contiguous array argument")
                cells.append(ctypes.c_void_p(a.ctypes.data))
            else:
                if type(a) not in _CTYPE:
                    raise AssertionError(f"{self.expr}: scalar {a!r} must be a NumPy scalar of a fixed type")
                cells.append(_CTYPE[type(a)](a))
        argv = (ctypes.c_void_p * len(cells))(*[ctypes.addressof(c) for c in cells])
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        self.emu.launches.append(self.expr)
        rc = self.emu.lib.emu_launch(self.expr.encode(), *g, *b, argv)
        if rc != 0:
            raise AssertionError(f"emulator could not launch {self.expr} (code {rc})")

"""Run the CUDA C kernels (kernels/cuda/*.cu) on the CPU: a g++ build against a small
emulation of the CUDA subset they use, and a launcher with RawKernel's calling convention.

Without a GPU the kernels can still be *run*: the sources are compiled by g++ against the
prelude below, and the cupy backend's own host code (tile/split-K planning, argument order,
zeroing for split-K) drives them, with CuPy swapped for NumPy (tests/fake_cupy.py, or plain
NumPy in tests/kernels/test_cuda_compile.py). This checks the kernels' arithmetic and
indexing against the oracle; it says nothing about speed.

It is strict about what a GPU would get wrong silently or hang on (EmulatorError, naming
the kernel, block, threads and call sites): barriers and shuffles reached at different call
sites, skipped by threads that returned, or deadlocked; a block that makes no progress
(watchdog); out-of-range indices into fixed-size (shared) arrays; grid, block and
__launch_bounds__ limits.  Out-of-bounds global memory needs ``build(sanitize=True)``
(AddressSanitizer + UBSan), run in a process started with ``sanitizer_env()``
(tests/kernels/test_cuda_emulator_strict.py does both).  Data races between threads are
not detected.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

import kernels.cupy_backend as cb

CUDA_DIR = Path(cb.CUDA_DIR)
GXX = shutil.which("g++")

EMU_PRELUDE = r"""// CPU emulation of the CUDA subset the kernels use: one OS thread per CUDA thread
// (a pool kept across launches), blocks run one after another (so __shared__ =
// function static is per block), warp shuffles through a per-warp slot array,
// atomicAdd under a mutex.  Strict where a GPU would go wrong silently or hang:
//  * __syncthreads and shuffles are barriers that remember where each phase is
//    waited for: two call sites in one phase, a thread returning while others wait,
//    a barrier reached after some threads returned, and every live thread of the
//    block blocked (deadlock) fail the launch; a watchdog fails a block that makes
//    no progress for too long;
//  * indices into arrays of known size (every __shared__ array) are bounds checked
//    (-fsanitize=bounds with the handler below), negative ones included;
//  * grid and block limits, and the kernel's __launch_bounds__.
// A failure unwinds every CUDA thread of the launch (EmuAbort) and emu_launch
// returns 3, with the message (kernel, block, threads, call sites) in emu_last_error().
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <source_location>
#include <string>
#include <thread>
#include <utility>
#include <vector>
#include <unistd.h>
#ifdef EMU_SANITIZE
#include <sanitizer/common_interface_defs.h>
#endif
using std::max;
using std::min;
using std::sqrt;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define EMU_MAX_THREADS 1024

struct EmuAbort {};  // unwinds a CUDA thread once its launch has failed

struct EmuBar {  // __syncthreads of the block, or one warp's shuffles
    std::atomic<unsigned> gen{0};  // phase number: waiters sleep on it (futex), not on the mutex
    unsigned need = 0, arrived = 0, exited = 0;
    std::source_location site;     // where this phase's first arrival waits
    unsigned first = 0;            // and its thread
};

struct EmuState {
    std::mutex mu;  // guards the bookkeeping below (atomics are read without it)
    std::atomic<bool> failed{false};
    std::string error, kernel;
    unsigned nt = 0, blocked = 0, running = 0;
    EmuBar bar;                               // bar.exited: threads of the block that returned
    EmuBar warps[EMU_MAX_THREADS / 32];
    double slots[2][EMU_MAX_THREADS];         // shuffle values, double-buffered by phase parity
    unsigned long long block_no = 0, nblocks = 0, progress = 0;
    std::atomic<unsigned> blk_gen{0};         // bumped when a block completes (or the launch fails)
    std::condition_variable done_cv;          // the launching thread waits on it
    const std::function<void(void**)>* fn = nullptr;
    void** args = nullptr;
    double watchdog_s = 60.0;
    std::atomic<unsigned long long> go[EMU_MAX_THREADS];  // launch number each pool thread is to run
    unsigned long long launch_no = 0;
    unsigned pool = 0;   // pool threads started, by process pool_pid
    pid_t pool_pid = 0;
};
// never destroyed: the pool threads are detached and outlive static destructors
static EmuState& emu_S = *new EmuState;
thread_local unsigned emu_parity = 0;

inline unsigned emu_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

static std::string emu_thread(unsigned t)
{
    const unsigned bx = blockDim.x, by = blockDim.y;
    return "thread (" + std::to_string(t % bx) + "," + std::to_string(t / bx % by) + "," +
           std::to_string(t / (bx * by)) + ")";
}

static std::string emu_where(const std::source_location& l)
{
    const char* f = std::strrchr(l.file_name(), '/');
    return std::string(f ? f + 1 : l.file_name()) + ":" + std::to_string(l.line()) + " in " + l.function_name();
}

static bool emu_same(const std::source_location& a, const std::source_location& b)
{
    return a.line() == b.line() && a.column() == b.column() &&
           (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

static void emu_wake_all()  // every sleeper re-checks `failed`
{
    emu_S.bar.gen.fetch_add(1);
    emu_S.bar.gen.notify_all();
    for (auto& w : emu_S.warps) {
        w.gen.fetch_add(1);
        w.gen.notify_all();
    }
    emu_S.blk_gen.fetch_add(1);
    emu_S.blk_gen.notify_all();
    emu_S.done_cv.notify_all();
}

static std::string emu_waiters()  // who waits where, for a deadlock or watchdog report
{
    std::string s;
    if (emu_S.bar.arrived)
        s += "\n  " + std::to_string(emu_S.bar.arrived) + " threads at __syncthreads " + emu_where(emu_S.bar.site) +
             " (first: " + emu_thread(emu_S.bar.first) + ")";
    for (unsigned w = 0; w < emu_S.nt / 32; ++w)
        if (emu_S.warps[w].arrived)
            s += "\n  warp " + std::to_string(w) + ": " + std::to_string(emu_S.warps[w].arrived) +
                 " lanes at __shfl_down_sync " + emu_where(emu_S.warps[w].site);
    s += "\n  " + std::to_string(emu_S.bar.exited) + " threads returned, " +
         std::to_string(emu_S.nt - emu_S.bar.exited - emu_S.blocked) + " running";
    return s;
}

static void emu_set_error(const std::string& what)  // mu held
{
    if (emu_S.failed) return;
    const unsigned long long b = emu_S.block_no;  // blocks run one at a time
    emu_S.error = emu_S.kernel + ", block (" + std::to_string(b % gridDim.x) + "," + std::to_string(b / gridDim.x % gridDim.y) +
                  "," + std::to_string(b / (gridDim.x * gridDim.y)) + "): " + what;
    emu_S.failed = true;
    emu_wake_all();
}

[[noreturn]] static void emu_fail(const std::string& what)  // mu held
{
    emu_set_error(what);
    throw EmuAbort{};
}

// One arrival at barrier b (the block's, or a warp's) from call site loc.
static void emu_sync(EmuBar& b, const char* what, const char* group, const std::source_location& loc)
{
    const unsigned t = emu_tid();
    unsigned g;
    {
        std::lock_guard<std::mutex> lk(emu_S.mu);
        if (emu_S.failed) throw EmuAbort{};
        if (b.exited)
            emu_fail(emu_thread(t) + " reached " + what + " at " + emu_where(loc) + " after " + std::to_string(b.exited) +
                     " threads of its " + group + " returned (they skipped it: a GPU hangs or syncs the wrong threads)");
        if (b.arrived == 0) {
            b.site = loc;
            b.first = t;
        } else if (!emu_same(b.site, loc)) {
            emu_fail(std::string("divergent ") + what + ": " + emu_thread(b.first) + " waits at " + emu_where(b.site) +
                     ", " + emu_thread(t) + " reached " + emu_where(loc));
        }
        if (++b.arrived == b.need) {  // phase complete: release the others
            b.arrived = 0;
            emu_S.blocked -= b.need - 1;
            ++emu_S.progress;
            b.gen.fetch_add(1);
            b.gen.notify_all();
            return;
        }
        if (++emu_S.blocked + emu_S.bar.exited == emu_S.nt)
            emu_fail("deadlock: every thread still running waits at a barrier that cannot complete:" + emu_waiters());
        g = b.gen.load();
    }
    while (b.gen.load() == g) b.gen.wait(g);
    if (emu_S.failed) throw EmuAbort{};
}

inline void __syncthreads(std::source_location loc = std::source_location::current())
{
    emu_sync(emu_S.bar, "__syncthreads", "block", loc);
}

template <typename T> T __shfl_down_sync(unsigned mask, T v, int off,
                                         std::source_location loc = std::source_location::current())
{
    const unsigned t = emu_tid(), lane = t % 32;
    if (mask != 0xffffffffu) {
        std::lock_guard<std::mutex> lk(emu_S.mu);
        emu_fail("__shfl_down_sync at " + emu_where(loc) + ": the emulator supports full-warp masks only");
    }
    // double-buffered: the next shuffle writes the other buffer, and cannot pass its own
    // barrier before every lane has read this one
    double* s = emu_S.slots[emu_parity ^= 1];
    s[t] = (double)v;
    emu_sync(emu_S.warps[t / 32], "__shfl_down_sync", "warp", loc);
    return lane + off < 32 ? (T)s[t + off] : v;
}

// A thread's kernel call returned: it must not leave threads waiting for it.
static void emu_exit(unsigned t)
{
    std::lock_guard<std::mutex> lk(emu_S.mu);
    if (emu_S.failed) throw EmuAbort{};
    EmuBar& w = emu_S.warps[t / 32];
    if (emu_S.bar.arrived)
        emu_fail(emu_thread(t) + " returned while " + std::to_string(emu_S.bar.arrived) + " threads wait at __syncthreads " +
                 emu_where(emu_S.bar.site) + " (a barrier skipped by the returning threads: a GPU hangs or syncs the wrong threads)");
    if (w.arrived)
        emu_fail(emu_thread(t) + " returned while " + std::to_string(w.arrived) + " lanes of its warp wait at __shfl_down_sync " +
                 emu_where(w.site));
    ++w.exited;
    ++emu_S.progress;
    if (++emu_S.bar.exited == emu_S.nt) {  // block complete: reset and start the next
        emu_S.bar.exited = 0;
        for (unsigned i = 0; i < emu_S.nt / 32; ++i) emu_S.warps[i].exited = 0;
        ++emu_S.block_no;
        emu_S.blk_gen.fetch_add(1);
        emu_S.blk_gen.notify_all();
        return;
    }
    if (emu_S.blocked && emu_S.blocked + emu_S.bar.exited == emu_S.nt)
        emu_fail("deadlock: every thread still running waits at a barrier that cannot complete:" + emu_waiters());
}

// Pool thread t's share of one launch: its thread of every block, in order.
static void emu_run(unsigned t)
{
    const unsigned bx = blockDim.x, by = blockDim.y;
    threadIdx = {t % bx, t / bx % by, t / (bx * by)};
    for (;;) {
        unsigned long long b;
        unsigned g;
        {
            std::lock_guard<std::mutex> lk(emu_S.mu);
            b = emu_S.block_no;
            g = emu_S.blk_gen.load();
        }
        if (emu_S.failed || b >= emu_S.nblocks) break;
        blockIdx = {unsigned(b % gridDim.x), unsigned(b / gridDim.x % gridDim.y), unsigned(b / (gridDim.x * gridDim.y))};
        emu_parity = 0;
        try {
            (*emu_S.fn)(emu_S.args);
            emu_exit(t);
        } catch (const EmuAbort&) {
            break;
        }
        while (emu_S.blk_gen.load() == g) emu_S.blk_gen.wait(g);  // until the whole block returned
    }
    std::lock_guard<std::mutex> lk(emu_S.mu);
    if (--emu_S.running == 0) emu_S.done_cv.notify_all();
}

static void emu_worker(unsigned t)
{
    unsigned long long seen = 0;
    for (;;) {
        unsigned long long n;
        while ((n = emu_S.go[t].load()) == seen) emu_S.go[t].wait(seen);
        seen = n;
        emu_run(t);
    }
}

#ifdef EMU_SANITIZE
static void emu_on_sanitizer_death()
{
    std::fprintf(stderr, "CUDA emulator: the sanitizer stopped kernel %s in block (%u,%u,%u), thread (%u,%u,%u)\n",
                 emu_S.kernel.c_str(), blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
}
#else
// -fsanitize=bounds calls this on an index out of range of an array of known size (a
// __shared__ array, a register tile): fail the launch instead of reading a neighbour.
// The data layout is the UBSan runtime's ABI (SourceLocation, TypeDescriptor).  EmuAbort
// is thrown through the kernel's frames, which hold no objects with destructors (CUDA
// code), so unwinding needs no cleanup entries there even though g++ declares the
// handler nothrow.
struct EmuUbsanType { unsigned short kind, info; char name[1]; };
struct EmuUbsanOob { const char* file; unsigned line, col; const EmuUbsanType* array; const EmuUbsanType* index; };
extern "C" void __ubsan_handle_out_of_bounds(EmuUbsanOob* d, void* index)
{
    const unsigned bits = 1u << (d->index->info >> 1);
    long long i = (long long)(uintptr_t)index;
    if ((d->index->info & 1) && bits < 64) i = (long long)((unsigned long long)i << (64 - bits)) >> (64 - bits);
    const char* f = std::strrchr(d->file, '/');
    std::lock_guard<std::mutex> lk(emu_S.mu);
    emu_fail(emu_thread(emu_tid()) + ": index " + std::to_string(i) + " out of bounds of " + d->array->name + " at " +
             (f ? f + 1 : d->file) + ":" + std::to_string(d->line));
}
extern "C" void __ubsan_handle_out_of_bounds_abort(EmuUbsanOob* d, void* index) { __ubsan_handle_out_of_bounds(d, index); }
#endif

template <typename T> T atomicAdd(T* p, T v)
{
    static std::mutex mu;
    std::lock_guard<std::mutex> g(mu);
    T old = *p;
    *p = old + v;
    return old;
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
struct EmuKernel { std::function<void(void**)> fn; unsigned max_threads; };

"""

EMU_LAUNCH = r"""extern "C" const char* emu_last_error() { return emu_S.error.c_str(); }
extern "C" void emu_set_watchdog(double seconds) { emu_S.watchdog_s = seconds; }

extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,
                          unsigned bx, unsigned by, unsigned bz, void** args)
{
    static std::mutex launch_mu;  // one launch at a time (ctypes lets Python threads in concurrently)
    std::lock_guard<std::mutex> one(launch_mu);
    using std::to_string;
    emu_S.error.clear();
    auto it = emu_kernels().find(name);
    if (it == emu_kernels().end()) {
        emu_S.error = std::string("no kernel ") + name + " in the emulator";
        return 1;
    }
    const unsigned long long nt = (unsigned long long)bx * by * bz;
    const std::string dims = "grid (" + to_string(gx) + "," + to_string(gy) + "," + to_string(gz) + "), block (" +
                             to_string(bx) + "," + to_string(by) + "," + to_string(bz) + ")";
    std::string bad;
    if (!gx || !gy || !gz || !bx || !by || !bz) bad = "a zero grid or block dimension";
    else if (gx > 2147483647u || gy > 65535 || gz > 65535) bad = "grid over the limits (2^31-1, 65535, 65535)";
    else if (bx > 1024 || by > 1024 || bz > 64 || nt > 1024) bad = "block over the limits (1024, 1024, 64; 1024 threads)";
    else if (nt > it->second.max_threads)
        bad = to_string(nt) + " threads per block, over the kernel's __launch_bounds__ " + to_string(it->second.max_threads);
    else if (nt % 32) bad = "a block that is not whole warps (the emulator's shuffles need them)";
    if (!bad.empty()) {
        emu_S.error = std::string(name) + ": launch with " + dims + ": " + bad;
        return 2;
    }
    {
        std::lock_guard<std::mutex> lk(emu_S.mu);
        emu_S.kernel = name;
        emu_S.failed = false;
        emu_S.nt = (unsigned)nt;
        emu_S.blocked = 0;
        emu_S.running = (unsigned)nt;
        emu_S.bar.need = (unsigned)nt;
        emu_S.bar.arrived = emu_S.bar.exited = 0;
        for (auto& w : emu_S.warps) w.need = 32, w.arrived = w.exited = 0;
        emu_S.block_no = 0;
        emu_S.nblocks = (unsigned long long)gx * gy * gz;
        emu_S.fn = &it->second.fn;
        emu_S.args = args;
        gridDim = {gx, gy, gz};
        blockDim = {bx, by, bz};
        ++emu_S.launch_no;
    }
    if (emu_S.pool_pid != getpid()) {  // a forked child has none of its parent's pool threads
        emu_S.pool_pid = getpid();
        emu_S.pool = 0;
        for (auto& g : emu_S.go) g.store(0);
        emu_S.launch_no = 1;
    }
    while (emu_S.pool < nt) {
        const unsigned t = emu_S.pool++;
        std::thread(emu_worker, t).detach();
    }
    for (unsigned t = 0; t < nt; ++t) {
        emu_S.go[t].store(emu_S.launch_no);
        emu_S.go[t].notify_one();
    }
    // wait; the watchdog fails a block in which no barrier completes and no thread returns
    using clock = std::chrono::steady_clock;
    std::unique_lock<std::mutex> lk(emu_S.mu);
    unsigned long long last = emu_S.progress;
    auto since = clock::now();
    bool fired = false;
    while (emu_S.running) {
        emu_S.done_cv.wait_for(lk, std::chrono::milliseconds(100));
        const double idle = std::chrono::duration<double>(clock::now() - since).count();
        if (emu_S.progress != last) {
            last = emu_S.progress;
            since = clock::now();
        } else if (!emu_S.failed && idle > emu_S.watchdog_s) {
            char secs[32];
            std::snprintf(secs, sizeof secs, "%g", emu_S.watchdog_s);
            emu_set_error(std::string("watchdog: no barrier completed and no thread returned for ") + secs +
                          " s (a thread stuck in a loop, or a very slow block):" + emu_waiters());
            fired = true;
            since = clock::now();
        } else if (fired && idle > 10.0) {  // a thread that never reaches a barrier or returns cannot be stopped
            std::fprintf(stderr, "CUDA emulator: %s\nthreads still running 10 s later; aborting\n", emu_S.error.c_str());
            std::abort();
        }
    }
    return emu_S.failed ? 3 : 0;
}
"""


def launch_bounds(text: str) -> dict[str, str]:
    """{kernel name: the expression of its __launch_bounds__ max threads} in CUDA source text."""
    return {m.group(2): m.group(1).split(",")[0].strip()
            for m in re.finditer(r"__launch_bounds__\s*\(([^)]*)\)\s*(\w+)\s*\(", text)}


def build(tmp: Path | None = None, sanitize: bool = False, sources: dict | None = None) -> Path:
    """Compile kernels with the prelude into a shared library.

    ``sources`` maps .cu paths to the name expressions to instantiate (default: every
    kernel of every cupy backend source).  ``sanitize=True`` builds with AddressSanitizer
    and UBSan, which abort the process on the first error: load such a library only in a
    process started with ``sanitizer_env()`` (the ASan runtime must come first)."""
    if GXX is None:
        raise RuntimeError("g++ is not installed: the CUDA C emulator cannot be built")
    tmp = Path(tmp) if tmp is not None else Path(tempfile.mkdtemp(prefix="cuda_emu_"))
    if sources is None:
        sources = {CUDA_DIR / s: cb.name_expressions(s) for s in cb.SOURCES}
    src, regs = EMU_PRELUDE, []
    for path, exprs in sources.items():
        bounds = launch_bounds(Path(path).read_text())
        src += f'#include "{Path(path).resolve()}"\n'
        for e in exprs:
            # the bound's expression (often a macro) is evaluated by g++ after the include
            lb = bounds.get(e.split("<")[0].strip(), "EMU_MAX_THREADS")
            regs.append(f'        {{"{e}", {{emu_bind(&{e}), (unsigned)({lb})}}}}')
    src += (
        "static std::map<std::string, EmuKernel>& emu_kernels()\n{\n"
        "    static std::map<std::string, EmuKernel> m = {\n" + ",\n".join(regs) + "\n    };\n    return m;\n}\n"
    )
    if sanitize:
        src += ("static const int emu_death_cb = (__sanitizer_set_death_callback(emu_on_sanitizer_death), 0);\n")
    src += EMU_LAUNCH
    cpp, obj, so = tmp / "emu.cpp", tmp / "emu.o", tmp / "emu.so"
    cpp.write_text(src)
    base = [GXX, "-std=c++20", "-pthread", "-fPIC"]
    if sanitize:
        # -O0: g++ takes less than half the time of -O1 on these templates with the
        # sanitizers on, and that build dominates a sanitized run on small shapes
        cmds = [base + ["-O0", "-g1", "-fno-omit-frame-pointer", "-DEMU_SANITIZE", "-fsanitize=address,undefined",
                        "-fno-sanitize-recover=all", "-shared", "-o", str(so), str(cpp)]]
    else:
        # bounds checks compiled in, linked without the UBSan runtime: the prelude's handler
        # fails the launch, and the library loads into any Python
        # (-Bsymbolic: even if a UBSan runtime is loaded in the process, ours is the handler)
        cmds = [base + ["-O1", "-fsanitize=bounds", "-c", "-o", str(obj), str(cpp)],
                [GXX, "-pthread", "-shared", "-Wl,-Bsymbolic", "-o", str(so), str(obj)]]
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the CUDA C emulator does not build:\n{proc.stderr[-4000:]}")
    return so


def sanitizer_env(env: dict | None = None) -> dict:
    """The environment for a process that loads a ``build(sanitize=True)`` library: the
    ASan runtime preloaded (Python itself is not instrumented), leak checks off (the
    interpreter keeps memory at exit on purpose), and the process stops at the first error."""
    env = dict(os.environ if env is None else env)
    asan = subprocess.run([GXX, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(asan) or not os.path.exists(asan):  # g++ echoes the bare name when it has none
        raise RuntimeError(f"g++ has no AddressSanitizer runtime (libasan.so, got {asan!r}): install libasan")
    env["LD_PRELOAD"] = " ".join(p for p in (asan, env.get("LD_PRELOAD", "")) if p)
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    return env


class EmulatorError(AssertionError):
    """A launch broke a rule the emulator checks; the message names the kernel and the rule."""


_CTYPE = {np.int32: ctypes.c_int32, np.int64: ctypes.c_longlong,
          np.float32: ctypes.c_float, np.float64: ctypes.c_double}


class Emulator:
    """The built library; ``kernel(expr)`` is a callable with RawKernel's convention,
    ``kernel(grid, block, args)``, whose array arguments are C-contiguous NumPy arrays.
    ``watchdog_s``: how long a block may go without a barrier completing or a thread
    returning before its launch fails (default GLORO_EMU_WATCHDOG_S, else 60)."""

    def __init__(self, so: Path, watchdog_s: float | None = None):
        self.lib = ctypes.CDLL(str(so))
        self.lib.emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [ctypes.POINTER(ctypes.c_void_p)]
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_last_error.restype = ctypes.c_char_p
        self.lib.emu_set_watchdog.argtypes = [ctypes.c_double]
        if watchdog_s is None:
            watchdog_s = float(os.environ.get("GLORO_EMU_WATCHDOG_S", "60"))
        self.lib.emu_set_watchdog(watchdog_s)
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
            raise EmulatorError(self.emu.lib.emu_last_error().decode(errors="replace"))

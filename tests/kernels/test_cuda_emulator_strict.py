"""The CUDA C emulator (tests/cuda_emulator.py) refuses kernels that break CUDA's rules.

Each test builds a small, deliberately broken kernel through the same emulator path as
the real kernels and shows the launch fails with a message naming the kernel and the
call sites; the corrected kernel next to it passes.  The sanitizer tests run in a child
process, because an ASan-instrumented library needs the ASan runtime loaded first.
The real kernels under the sanitizers: test_real_kernels_clean_under_sanitizers.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import cuda_emulator as ce
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(ce.GXX is None, reason="g++ not installed")

ROOT = Path(__file__).resolve().parents[2]

BROKEN = r"""
// Kernels that break a CUDA rule on purpose (and their corrected versions).
__global__ void divergent_barrier(float* a)
{
    if (threadIdx.x < 32) {
        a[threadIdx.x] = 1.0f;
        __syncthreads();  // SITE_A
    } else {
        __syncthreads();  // SITE_B
        a[threadIdx.x] = 2.0f;
    }
}

__global__ void early_return(float* a, int n)
{
    __shared__ float s[64];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;  // the tail of the last block skips the barrier the others wait at
    s[threadIdx.x] = a[i];
    __syncthreads();
    a[i] = s[63 - threadIdx.x];
}

__global__ void early_return_fixed(float* a, int n)
{
    __shared__ float s[64];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    s[threadIdx.x] = i < n ? a[i] : 0.0f;
    __syncthreads();
    if (i < n) a[i] = s[63 - threadIdx.x];
}

__global__ void skipped_in_loop(float* a)
{
    for (int r = 0; r <= (int)(threadIdx.x % 2); ++r) {  // odd threads sync once more
        a[threadIdx.x] += 1.0f;
        __syncthreads();
    }
}

__global__ void half_warp_shuffle(float* a)
{
    float v = a[threadIdx.x];
    if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0xffffffffu, v, 1);  // lanes 16-31 never come
    __syncthreads();
    a[threadIdx.x] = v;
}

__global__ void shared_negative_index(float* a)
{
    __shared__ float s[64];
    const int t = threadIdx.x;
    s[t] = a[t];
    __syncthreads();
    a[t] = s[t - 1];  // thread 0 reads s[-1]
}

__global__ void __launch_bounds__(32) bounded_32(float* a) { a[threadIdx.x] = 0.0f; }

__global__ void spin_until(const volatile int* flag, float* a)
{
    if (threadIdx.x == 0)
        while (flag[0] == 0) {}  // neither reaches a barrier nor returns until flag is set
    a[threadIdx.x] = 1.0f;
}

__global__ void read_past_end(const float* a, float* b, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) b[i] = a[i + 1];  // a[n]: one past the end
}

__global__ void write_past_end(float* b, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) b[i] = 1.0f;  // b[n]: one past the end
}

__global__ void in_bounds(const float* a, float* b, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) b[i] = a[i] + 1.0f;
}
"""
KERNELS = ["divergent_barrier", "early_return", "early_return_fixed", "skipped_in_loop", "half_warp_shuffle",
           "shared_negative_index", "bounded_32", "spin_until", "read_past_end", "write_past_end", "in_bounds"]


def _line(marker: str) -> int:
    return next(i for i, line in enumerate(BROKEN.splitlines(), 1) if marker in line)


@pytest.fixture(scope="module")
def broken_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("broken") / "broken.cu"
    path.write_text(BROKEN)
    return path


@pytest.fixture(scope="module")
def emu(broken_src):
    out = broken_src.parent / "plain"
    out.mkdir()
    return ce.Emulator(ce.build(out, sources={broken_src: KERNELS}))


def _arr(n, v=0.0):
    return np.full(n, v, dtype=np.float32)


def test_divergent_barrier_fails_naming_both_sites(emu):
    with pytest.raises(ce.EmulatorError) as err:
        emu.kernel("divergent_barrier")((1,), (64,), (_arr(64),))
    msg = str(err.value)
    print(msg)
    assert msg.startswith("divergent_barrier, block (0,0,0): divergent __syncthreads"), msg
    assert f"broken.cu:{_line('SITE_A')}" in msg and f"broken.cu:{_line('SITE_B')}" in msg, msg


def test_barrier_skipped_by_returned_threads_fails(emu):
    a = _arr(100, 1.0)
    with pytest.raises(ce.EmulatorError, match=r"early_return, block \(1,0,0\): .*(returned while \d+ threads wait at "
                                               r"__syncthreads|reached __syncthreads .* after \d+ threads of its block returned)"):
        emu.kernel("early_return")((2,), (64,), (a, np.int32(100)))
    # the same with whole blocks passes, and so does the corrected kernel on the ragged size
    a = np.arange(128, dtype=np.float32)
    emu.kernel("early_return")((2,), (64,), (a, np.int32(128)))
    np.testing.assert_array_equal(a, np.concatenate([np.arange(63, -1, -1), np.arange(127, 63, -1)]))
    a = np.arange(100, dtype=np.float32)
    emu.kernel("early_return_fixed")((2,), (64,), (a, np.int32(100)))
    np.testing.assert_array_equal(a[:64], np.arange(63, -1, -1))


def test_barrier_skipped_in_a_loop_fails(emu):
    with pytest.raises(ce.EmulatorError, match=r"skipped_in_loop, .*thread \(\d+,0,0\) (returned while|reached)"):
        emu.kernel("skipped_in_loop")((1,), (64,), (_arr(64),))


def test_half_warp_shuffle_deadlock_fails_instead_of_hanging(emu):
    with pytest.raises(ce.EmulatorError) as err:
        emu.kernel("half_warp_shuffle")((1,), (64,), (_arr(64),))
    msg = str(err.value)
    print(msg)
    assert "half_warp_shuffle" in msg and "deadlock" in msg and "lanes at __shfl_down_sync" in msg, msg


def test_negative_shared_index_fails(emu):
    with pytest.raises(ce.EmulatorError, match=r"shared_negative_index, block \(0,0,0\): thread \(0,0,0\): "
                                               r"index -1 out of bounds of 'float \[64\]'"):
        emu.kernel("shared_negative_index")((1,), (64,), (_arr(64),))
    emu.kernel("in_bounds")((1,), (64,), (_arr(64), _arr(64), np.int32(64)))  # the emulator still runs after


@pytest.mark.parametrize("block,grid,why", [
    ((64,), (1,), r"64 threads per block, over the kernel's __launch_bounds__ 32"),
    ((2048,), (1,), r"block over the limits"),
    ((32,), (1, 70000), r"grid over the limits"),
    ((32,), (0,), r"a zero grid or block dimension"),
])
def test_launch_limits(emu, block, grid, why):
    with pytest.raises(ce.EmulatorError, match=r"bounded_32: launch with grid .*: " + why):
        emu.kernel("bounded_32")(grid, block, (_arr(2048),))
    emu.kernel("bounded_32")((1,), (32,), (_arr(32),))


def test_partial_warps_refused(emu):
    # legal on a GPU, but the emulator's shuffles need whole warps: refused, not mis-run
    with pytest.raises(ce.EmulatorError, match=r"in_bounds: launch with grid \(1,1,1\), block \(48,1,1\): "
                                               r"a block that is not whole warps"):
        emu.kernel("in_bounds")((1,), (48,), (_arr(48), _arr(48), np.int32(48)))


def test_watchdog_fails_a_block_that_makes_no_progress(emu):
    flag = np.zeros(1, dtype=np.int32)
    release = threading.Timer(2.0, flag.__setitem__, (0, 1))  # the spinning thread ends at last
    emu.lib.emu_set_watchdog(0.3)
    try:
        release.start()
        with pytest.raises(ce.EmulatorError, match=r"(?s)spin_until, block \(0,0,0\): watchdog: no barrier "
                                                   r"completed .* for 0.3 s.*63 threads returned, 1 running"):
            emu.kernel("spin_until")((1,), (64,), (flag, _arr(64)))
    finally:
        release.join()
        emu.lib.emu_set_watchdog(60.0)


def _launch_in_forked_child(emu, q):
    a = np.arange(64, dtype=np.float32)
    b = _arr(64)
    emu.kernel("in_bounds")((1,), (64,), (a, b, np.int32(64)))
    q.put(float(b.sum()))


def test_forked_child_gets_its_own_thread_pool(emu):
    # the parent's pool threads do not exist in a forked child: it must start its own
    import multiprocessing as mp

    emu.kernel("in_bounds")((1,), (64,), (_arr(64), _arr(64), np.int32(64)))  # the parent's pool
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_launch_in_forked_child, args=(emu, q))
    p.start()
    p.join(30)
    if p.exitcode is None:  # hung: the launch waited for threads that do not exist
        p.kill()
        p.join()
    assert p.exitcode == 0 and q.get(timeout=5) == float(np.arange(64).sum() + 64), p.exitcode


# ---------------------------------------------------------------- sanitizers (child process)

_CHILD = r"""
import sys
import numpy as np
import cuda_emulator as ce
emu = ce.Emulator(sys.argv[1])
n = 100
a, b = np.ones(n, np.float32), np.zeros(n, np.float32)
args = {"read_past_end": (a, b, np.int32(n)), "write_past_end": (b, np.int32(n)), "in_bounds": (a, b, np.int32(n))}
emu.kernel(sys.argv[2])((1,), (128,), args[sys.argv[2]])
assert (b == 2).all(), b
print("finished")
"""


@pytest.fixture(scope="module")
def sanitized_so(broken_src):
    out = broken_src.parent / "asan"
    out.mkdir()
    return ce.build(out, sanitize=True, sources={broken_src: ["read_past_end", "write_past_end", "in_bounds"]})


def _report(proc) -> str:
    """The lines of a child's output that say what a sanitizer found, and where."""
    keep = re.compile(r"ERROR: AddressSanitizer|runtime error|(READ|WRITE) of size|^\s*#[0-3] |SUMMARY|"
                      r"CUDA emulator|region|passed|failed|Error")
    return "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if keep.search(line))[-6000:]


def _run_sanitized(args, timeout=300, **extra_env):
    env = ce.sanitizer_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    env.update(extra_env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.parametrize("kernel,access", [("read_past_end", "READ"), ("write_past_end", "WRITE")])
def test_asan_catches_global_out_of_bounds(sanitized_so, kernel, access):
    proc = _run_sanitized(["-c", _CHILD, str(sanitized_so), kernel])
    report = _report(proc)
    print(report)
    assert proc.returncode != 0 and "finished" not in proc.stdout, report
    assert "AddressSanitizer: heap-buffer-overflow" in proc.stderr, report
    assert f"{access} of size 4" in proc.stderr, report
    assert re.search(rf"#0 .* in {kernel}\(", proc.stderr), report
    assert f"the sanitizer stopped kernel {kernel} in block (0,0,0)" in proc.stderr, report
    assert re.search(r"0 bytes (after|to the right of) 400-byte region", proc.stderr), report


def test_asan_passes_a_correct_kernel(sanitized_so):
    proc = _run_sanitized(["-c", _CHILD, str(sanitized_so), "in_bounds"])
    assert proc.returncode == 0 and "finished" in proc.stdout, _report(proc)


def test_real_kernels_clean_under_sanitizers():
    """tests/kernels/test_cuda_compile.py's emulated tests (every kernel against the NumPy
    oracle) again, with the emulator built with ASan and UBSan (GLORO_EMU_SANITIZE=1)."""
    # --capture=sys: pytest's default fd capture would swallow the sanitizer's report
    proc = _run_sanitized(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys", "-x",
                           "tests/kernels/test_cuda_compile.py", "-k", "emulated"], timeout=900,
                          GLORO_EMU_SANITIZE="1")
    report = _report(proc)
    print(report)
    assert proc.returncode == 0, report
    assert re.search(r"\b\d+ passed", proc.stdout) and not re.search(r"skipped|failed|error", proc.stdout), report

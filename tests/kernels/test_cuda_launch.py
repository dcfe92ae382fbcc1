"""The cupy backend's checked launches and its 2^31-element limits, without a GPU.

* Every op runs its real host code on shape-only fake arrays (no memory), so the
  4.29e9-element outputs of issue 15 (conv2d of (1024,3,256,256) with 64 filters,
  a grad-input undoing a stride, a 65536 x 65536 dense output) are planned and
  checked on the CPU; the launches are recorded, not run.
* ``check_launch`` refuses wrong scalar widths, dtypes, non-contiguous arrays,
  int-indexed arrays of 2^31 elements or more, and grids/blocks past CUDA's limits.
* The CUDA C store functors are compiled with g++ and asked for the address of the
  last element of a 2^32-element output: it must not wrap (32-bit index overflow).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest

import kernels.cupy_backend as cb

BIG = 2**32  # elements in the outputs


class FakeArray:
    """Shape, dtype, strides and flags of a C-contiguous array; no memory."""

    def __init__(self, shape, dtype="float32", contiguous=True):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=object))
        st, acc = [], self.dtype.itemsize
        for s in reversed(self.shape):
            st.append(acc)
            acc *= max(s, 1)
        self.strides = tuple(reversed(st))
        self.flags = types.SimpleNamespace(c_contiguous=contiguous)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return FakeArray(shape, self.dtype)


def _fake_cp():
    def make(shape, dtype="float32"):
        return FakeArray(shape if isinstance(shape, tuple) else (shape,), dtype)

    return types.SimpleNamespace(
        empty=make, zeros=make, empty_like=lambda a: FakeArray(a.shape, a.dtype),
        ascontiguousarray=lambda a: a if a.flags.c_contiguous else FakeArray(a.shape, a.dtype),
    )


@pytest.fixture
def launches(monkeypatch):
    """cupy_backend with fake CuPy arrays: returns the list of (expr, grid, block, args) launched."""
    rec = []
    checked = []
    real_check = cb.check_launch

    def check(source, name, ctype, grid, block, args):
        real_check(source, name, ctype, grid, block, args)
        checked.append(name)

    def kernel(source, expr):
        def launch(grid, block, args):
            # every launch must have been checked just before
            assert checked and expr.startswith(checked[-1] + "<"), (expr, checked)
            rec.append((expr, tuple(grid), tuple(block), tuple(args)))
        return launch

    monkeypatch.setattr(cb, "cp", _fake_cp())
    monkeypatch.setattr(cb, "_kernel", kernel)
    monkeypatch.setattr(cb, "check_launch", check)
    monkeypatch.setattr(cb, "_SM_COUNT", [132])  # an H200
    return rec


def _out(rec):
    """The output array argument of the one recorded GEMM launch."""
    (expr, grid, block, args), = rec
    name = expr.split("<")[0]
    params = cb.kernel_signatures("gemm_conv.cu")[name]["params"]
    out_name = cb.INDEX64[name][0]
    return name, args[[p[0] for p in params].index(out_name)]


# ---------------------------------------------------------------- outputs of 2^32 elements

def test_conv2d_output_of_2_32_elements_launches_with_64_bit_store(launches):
    x, w = FakeArray((1024, 3, 256, 256)), FakeArray((64, 3, 3, 3))
    y = cb.conv2d(x, w, FakeArray((64,)), (1, 1), (1, 1, 1, 1))
    assert y.shape == (1024, 64, 256, 256) and y.size == BIG
    name, out = _out(launches)
    assert name == "conv2d_fwd" and out is y and "y" in cb.INDEX64[name]


def test_grad_input_undoing_a_stride_to_2_32_elements(launches):
    gy, w = FakeArray((1024, 64, 128, 128)), FakeArray((64, 64, 4, 4))  # gy: 2^30 elements
    gx = cb.conv2d_grad_input(gy, w, (1024, 64, 256, 256), (2, 2), (1, 1, 1, 1))
    assert gx.size == BIG
    name, out = _out(launches)
    assert name == "conv2d_bwd_input" and out is gx


def test_dense_65536_by_65536_output(launches):
    y = cb.dense(FakeArray((65536, 16)), FakeArray((65536, 16)), None)
    assert y.shape == (65536, 65536)
    name, out = _out(launches)
    assert name == "dense_fwd" and out is y
    gw = cb.dense_grad_weight(FakeArray((16, 65536)), FakeArray((16, 65536)))
    assert gw.size == BIG


def test_minmax_of_2_32_elements_uses_64_bit_counts(launches):
    x = FakeArray((1024, 64, 256, 256))
    cb.minmax(x)
    cb.minmax_grad(x, FakeArray(x.shape))
    for expr, _, _, args in launches:
        assert type(args[-2]) is np.int64 and int(args[-2]) == BIG // 2, expr


def test_int_indexed_input_of_2_31_elements_is_refused_naming_op_and_shape(launches):
    with pytest.raises(ValueError, match=r"dense: input x of shape \(65536, 32768\)"):
        cb.dense(FakeArray((65536, 32768)), FakeArray((10, 32768)), None)
    with pytest.raises(ValueError, match=r"conv2d_grad_weight: input x of shape \(2048, 16, 256, 256\)"):
        cb.conv2d_grad_weight(FakeArray((2048, 16, 256, 256)), FakeArray((2048, 16, 256, 256)),
                              (16, 16, 3, 3), (1, 1), (1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"l2_normalize: input a of shape \(2147483648,\)"):
        cb._l2(FakeArray((2**31,)), scale=True)
    assert not launches


def test_gemm_extent_past_int_is_refused_naming_op_and_shape(launches):
    # a 1x1 input padded to 70001 x 70001 pixels: N = 4.9e9 GEMM columns, walked with int
    with pytest.raises(ValueError, match=r"conv2d_fwd: GEMM extent N = 4900140001 for output shape "
                                         r"\(1, 1, 70001, 70001\)"):
        cb.conv2d(FakeArray((1, 1, 1, 1)), FakeArray((1, 1, 1, 1)), None, (1, 1), (0, 70000, 0, 70000))
    assert not launches


def test_every_kernel_is_launched_through_the_check(launches):
    """Every op on small fake arrays: each kernel of both sources is launched, each checked."""
    cb.conv2d(FakeArray((2, 3, 8, 8)), FakeArray((4, 3, 3, 3)), FakeArray((4,)), (1, 1), (1, 1, 1, 1))
    cb.conv2d_grad_input(FakeArray((2, 4, 8, 8)), FakeArray((4, 3, 3, 3)), (2, 3, 8, 8), (1, 1), (1, 1, 1, 1))
    cb.conv2d_grad_weight(FakeArray((2, 3, 8, 8)), FakeArray((2, 4, 8, 8)), (4, 3, 3, 3), (1, 1), (1, 1, 1, 1))
    cb.dense(FakeArray((5, 7)), FakeArray((3, 7)), FakeArray((3,)))
    cb.dense_grad_input(FakeArray((5, 3)), FakeArray((3, 7)))
    cb.dense_grad_weight(FakeArray((5, 7)), FakeArray((5, 3)))
    cb.minmax(FakeArray((2, 4, 3, 3)))
    cb.minmax_grad(FakeArray((2, 4, 3, 3)), FakeArray((2, 4, 3, 3)))
    p = FakeArray((10,), "float64")
    cb.adam_update(p, FakeArray((10,), "float64"), FakeArray((10,), "float64"), FakeArray((10,), "float64"),
                   1e-3, 0.9, 0.999, 1e-7)
    cb.conv_power_step(FakeArray((1, 3, 8, 8)), FakeArray((4, 3, 3, 3)), (1, 1), (1, 1, 1, 1))
    cb.dense_power_step(FakeArray((1, 7)), FakeArray((3, 7)))
    names = {e.split("<")[0] for e, *_ in launches}
    assert names == set(cb.GEMM_KERNELS) | set(cb.ELEMENTWISE_KERNELS)


def test_launch_is_the_only_launch_site():
    src = Path(cb.__file__).read_text()
    calls = [m.start() for m in re.finditer(r"\b_kernel\(", src)]
    defs = [m.start() for m in re.finditer(r"def _kernel\(", src)]
    body = src[src.index("def _launch("):]
    body = body[:body.index("\n\n\n")]
    assert len(calls) == len(defs) + 1 and "_kernel(" in body, "a kernel is launched outside _launch"


def test_signatures_cover_every_instance():
    for source in cb.SOURCES:
        sigs = cb.kernel_signatures(source)
        names = {e.split("<")[0] for e in cb.name_expressions(source)}
        assert names == set(sigs), (source, names ^ set(sigs))
    for name, params in cb.INDEX64.items():
        src = "gemm_conv.cu" if name in cb.GEMM_KERNELS else "elementwise.cu"
        have = {p[0] for p in cb.kernel_signatures(src)[name]["params"] if p[2]}
        assert set(params) <= have, (name, params, have)


# ---------------------------------------------------------------- check_launch on its own

def _dense_args(x, w, y, *, scalars=None):
    scalars = scalars or (np.int32(0), np.int32(5), np.int32(7), np.int32(3), np.int32(16))
    return (x, w, w, y, *scalars)


GOOD = dict(grid=(1, 1, 1), block=(256,))


def _check(args, ctype="float", grid=GOOD["grid"], block=GOOD["block"], name="dense_fwd", source="gemm_conv.cu"):
    cb.check_launch(source, name, ctype, grid, block, args)


def test_check_launch_accepts_a_good_launch():
    _check(_dense_args(FakeArray((5, 7)), FakeArray((3, 7)), FakeArray((5, 3))))


@pytest.mark.parametrize("bad,match", [
    (dict(scalars=(np.int32(0), np.int64(5), np.int32(7), np.int32(3), np.int32(16))),
     r"parameter Nb is C int and needs int32, got int64"),
    (dict(scalars=(np.int32(0), 5, np.int32(7), np.int32(3), np.int32(16))),
     r"parameter Nb is C int and needs int32, got int"),
    (dict(x=FakeArray((5, 7), "float64")), r"array x of shape \(5, 7\) is float64, not float32"),
    (dict(x=FakeArray((5, 7), contiguous=False)), r"array x of shape \(5, 7\) is not C-contiguous"),
    (dict(x=FakeArray((2**16, 2**15))), r"array x of shape \(65536, 32768\) has 2147483648 elements; "
                                        r"the kernel indexes it with 32-bit int"),
    (dict(x=np.float32(1.0)), r"parameter x \(T\*\) needs an array, got float32"),
])
def test_check_launch_refuses_bad_arguments(bad, match):
    x = bad.get("x", FakeArray((5, 7)))
    args = _dense_args(x, FakeArray((3, 7)), FakeArray((5, 3)), scalars=bad.get("scalars"))
    with pytest.raises(cb.LaunchError, match=match):
        _check(args)


def test_check_launch_scalar_of_element_type():
    a = FakeArray((10,), "float64")
    good = (a, a, a, a, np.float64(1e-3), np.float64(0.9), np.float64(0.999), np.float64(1e-7), np.int64(10))
    cb.check_launch("elementwise.cu", "adam_step", "double", (1,), (256,), good)
    bad = good[:4] + (np.float32(1e-3),) + good[5:]
    with pytest.raises(cb.LaunchError, match=r"parameter lr_t is C T=double and needs float64, got float32"):
        cb.check_launch("elementwise.cu", "adam_step", "double", (1,), (256,), bad)
    with pytest.raises(cb.LaunchError, match=r"parameter n is C long long and needs int64, got int32"):
        cb.check_launch("elementwise.cu", "adam_step", "double", (1,), (256,), good[:-1] + (np.int32(10),))


@pytest.mark.parametrize("grid,block,match", [
    ((1, 65536, 1), (256,), r"grid \(1, 65536, 1\) exceeds"),
    ((1, 1, 65536), (256,), r"grid \(1, 1, 65536\) exceeds"),
    ((2**31, 1, 1), (256,), r"grid \(2147483648, 1, 1\) exceeds"),
    ((1,), (2048,), r"block \(2048, 1, 1\) \(2048 threads\) exceeds"),
    ((1,), (128,), r"launched with 128 threads, the kernel is written for 256"),
    ((0,), (256,), r"grid \(0,\) must be 1 to 3 positive sizes"),
])
def test_check_launch_refuses_bad_grids(grid, block, match):
    with pytest.raises(cb.LaunchError, match=match):
        _check(_dense_args(FakeArray((5, 7)), FakeArray((3, 7)), FakeArray((5, 3))), grid=grid, block=block)


def test_check_launch_refuses_wrong_arity_and_unknown_kernels():
    with pytest.raises(cb.LaunchError, match=r"8 arguments for 9 parameters"):
        _check(_dense_args(FakeArray((5, 7)), FakeArray((3, 7)), FakeArray((5, 3)))[:-1])
    with pytest.raises(cb.LaunchError, match=r"no __global__ kernel 'nope'"):
        _check((), name="nope")


def test_64_bit_indexed_output_may_exceed_2_31():
    _check(_dense_args(FakeArray((65536, 16)), FakeArray((65536, 16)), FakeArray((65536, 65536))))


# ---------------------------------------------------------------- the store functors, compiled

GXX = shutil.which("g++")

PROBE = r"""
#include <algorithm>
#include <cstdint>
#include <cstdio>
using std::min;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)
inline void __syncthreads() {}
template <typename T> T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
#include "GEMM_CONV"
// A value type whose store records the address instead of writing it.
struct Probe { double v; Probe& operator+=(const Probe&) { return *this; } };
static Probe* last = nullptr;
template <> inline void put<Probe>(Probe* p, Probe, bool) { last = p; }
static Probe* const base = reinterpret_cast<Probe*>(uintptr_t(1) << 44);
static long long offset() { return (long long)((intptr_t)last - (intptr_t)base) / (long long)sizeof(Probe); }
int main()
{
    Probe v{0};
    // conv2d (1024, 3, 256, 256) * 64 filters 3x3 SAME: last output element
    ConvShape f{1024, 3, 256, 256, 64, 3, 3, 256, 256, 1, 1, 1, 1};
    ConvFwdStore<Probe>{base, nullptr, f}(63, 1024 * 256 * 256 - 1, v, false, true);
    std::printf("conv_fwd %lld\n", offset());
    // grad-input to (1024, 64, 256, 256) from stride 2
    ConvShape g{1024, 64, 256, 256, 64, 4, 4, 128, 128, 2, 2, 1, 1};
    ConvBwdStore<Probe>{base, g}(63, 1024 * 256 * 256 - 1, v, false, true);
    std::printf("conv_bwd_input %lld\n", offset());
    RowMajorStore<Probe>{base, 65536}(65535, 65535, v, false, true);
    std::printf("row_major %lld\n", offset());
    DenseStore<Probe>{base, nullptr, 65536}(65535, 65535, v, false, true);
    std::printf("dense %lld\n", offset());
    return 0;
}
"""


@pytest.mark.skipif(GXX is None, reason="g++ not installed")
def test_store_functors_index_past_2_31(tmp_path):
    src = tmp_path / "probe.cpp"
    src.write_text(PROBE.replace("GEMM_CONV", str(Path(cb.CUDA_DIR) / "gemm_conv.cu")))
    exe = tmp_path / "probe"
    # -fwrapv: a 32-bit overflow wraps as on the GPU instead of being undefined
    proc = subprocess.run([GXX, "-std=c++17", "-O0", "-fwrapv", "-o", str(exe), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    got = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert got == {k: BIG - 1 for k in ("conv_fwd", "conv_bwd_input", "row_major", "dense")}, got


# ---------------------------------------------------------------- CUDA 12 and 13

def test_cuda12_and_cuda13_extras():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    extras = extras["project"]["optional-dependencies"]
    assert any(d.startswith("cupy-cuda12x") for d in extras["cuda12"])
    assert any(d.startswith("cupy-cuda13x") for d in extras["cuda13"])


def test_no_cupy_version_assumptions():
    """The GPU code runs on CuPy 13 (CUDA 12) and 14 (CUDA 13) alike: no version checks,
    no NVRTC paths or arch options tied to one toolkit."""
    root = Path(cb.__file__).resolve().parent
    for path in [root / "cupy_backend.py", root / "numba_cuda_backend.py", *sorted((root / "cuda").glob("*.cu"))]:
        text = path.read_text()
        for bad in ("__version__", "cuda12", "cuda-12", "libnvrtc", "CUDA_PATH", "-arch=", "compute_"):
            assert bad not in text, f"{path.name} mentions {bad!r}"
    assert all(not o.startswith(("-arch", "--gpu-architecture")) for o in cb.NVRTC_OPTIONS)

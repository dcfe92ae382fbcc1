"""Bad input is refused by the public API with an error naming the offending shape/value.

Runs on the default CPU path (validation happens before any backend is called) and,
for the dispatch-independent checks, on every CPU backend by name.
"""
import re

import numpy as np
import pytest

import kernels

F32, F64 = np.float32, np.float64


def arr(*shape, dtype=F64):
    return np.ones(shape, dtype=dtype)


def esc(v) -> str:
    """A regex matching the text of ``v`` literally."""
    return re.escape(str(v))


# ---------------------------------------------------------------- shapes

def test_conv_channel_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=esc("3 channels (shape (2, 3, 5, 5))") + ".*" + esc("(4, 2, 3, 3)")):
        kernels.conv2d(arr(2, 3, 5, 5), arr(4, 2, 3, 3))
    with pytest.raises(ValueError, match=esc("(2, 3, 5, 5)")):
        kernels.conv2d_grad_input(arr(2, 4, 5, 5), arr(4, 2, 3, 3), (2, 3, 5, 5))


@pytest.mark.parametrize("call, shape", [
    (lambda: kernels.conv2d(arr(3, 5, 5), arr(4, 3, 3, 3)), (3, 5, 5)),
    (lambda: kernels.conv2d(arr(1, 3, 5, 5), arr(4, 3, 3)), (4, 3, 3)),
    (lambda: kernels.conv2d(arr(1, 1, 3, 5, 5), arr(4, 3, 3, 3)), (1, 1, 3, 5, 5)),
    (lambda: kernels.conv2d_grad_input(arr(1, 4, 5), arr(4, 3, 3, 3), (1, 3, 5, 5)), (1, 4, 5)),
    (lambda: kernels.conv2d_grad_input(arr(1, 4, 5, 5), arr(4, 3, 3, 3), (3, 5, 5)), (3, 5, 5)),
    (lambda: kernels.conv2d_grad_weight(arr(3, 5, 5), arr(1, 4, 5, 5), (3, 3)), (3, 5, 5)),
    (lambda: kernels.dense(arr(2, 3, 4), arr(5, 4)), (2, 3, 4)),
    (lambda: kernels.dense(arr(4), arr(5, 4)), (4,)),
    (lambda: kernels.dense(arr(2, 4), arr(5, 4, 1)), (5, 4, 1)),
    (lambda: kernels.dense_grad_input(arr(2, 5, 1), arr(5, 4)), (2, 5, 1)),
    (lambda: kernels.dense_grad_weight(arr(2, 4), arr(5,)), (5,)),
    (lambda: kernels.minmax(arr(4)), (4,)),
], ids=["x3d", "w3d", "x5d", "gy3d", "xshape3", "gw_x3d", "dense_x3d", "dense_x1d", "dense_w3d",
        "dense_gy3d", "dense_gw_gy1d", "minmax_1d"])
def test_wrong_ndim(call, shape):
    with pytest.raises(ValueError, match=esc(shape)):
        call()


def test_dense_feature_and_batch_mismatch():
    with pytest.raises(ValueError, match=esc("(2, 4)") + ".*" + esc("(5, 3)")):
        kernels.dense(arr(2, 4), arr(5, 3))
    with pytest.raises(ValueError, match=esc("(2, 6)") + ".*" + esc("(5, 4)")):
        kernels.dense_grad_input(arr(2, 6), arr(5, 4))
    with pytest.raises(ValueError, match=esc("(3, 4)") + ".*" + esc("(2, 5)")):
        kernels.dense_grad_weight(arr(3, 4), arr(2, 5))


@pytest.mark.parametrize("shape", [(2, 3), (1, 5, 4, 4), (3, 1)])
def test_minmax_odd_width(shape):
    with pytest.raises(ValueError, match=esc(shape)):
        kernels.minmax(arr(*shape))
    with pytest.raises(ValueError, match=esc(shape)):
        kernels.minmax_grad(arr(*shape), arr(*shape))


def test_wrong_bias_shape():
    with pytest.raises(ValueError, match=esc("(3,)")):
        kernels.conv2d(arr(1, 2, 5, 5), arr(4, 2, 3, 3), arr(3))
    with pytest.raises(ValueError, match=esc("(4, 1)")):
        kernels.dense(arr(2, 3), arr(4, 3), arr(4, 1))


@pytest.mark.parametrize("call, bad", [
    # conv of (1, 2, 6, 6) with (3, 2, 3, 3), stride 2, same -> gy must be (1, 3, 3, 3)
    (lambda: kernels.conv2d_grad_input(arr(1, 3, 4, 3), arr(3, 2, 3, 3), (1, 2, 6, 6), 2), (1, 3, 4, 3)),
    (lambda: kernels.conv2d_grad_input(arr(2, 3, 3, 3), arr(3, 2, 3, 3), (1, 2, 6, 6), 2), (2, 3, 3, 3)),
    (lambda: kernels.conv2d_grad_weight(arr(1, 2, 6, 6), arr(1, 3, 6, 6), (3, 3), 2), (1, 3, 6, 6)),
    (lambda: kernels.conv2d_grad_weight(arr(1, 2, 6, 6), arr(1, 3, 3, 3), (3, 3), 1, "valid"), (1, 3, 3, 3)),
    (lambda: kernels.minmax_grad(arr(2, 4), arr(2, 6)), (2, 6)),
], ids=["gi_hw", "gi_batch", "gw_stride", "gw_valid", "minmax_grad"])
def test_wrong_gy_shape(call, bad):
    with pytest.raises(ValueError, match=r"gy must have shape .*" + esc(bad)):
        call()


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.float16, np.complex128])
def test_non_float_dtypes(dtype):
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=name):
        kernels.conv2d(arr(1, 2, 5, 5, dtype=dtype), arr(3, 2, 3, 3))
    with pytest.raises(TypeError, match=name):
        kernels.conv2d(arr(1, 2, 5, 5), arr(3, 2, 3, 3, dtype=dtype))
    with pytest.raises(TypeError, match=name):
        kernels.dense(arr(2, 3, dtype=dtype), arr(4, 3))
    with pytest.raises(TypeError, match=name):
        kernels.minmax(arr(2, 4, dtype=dtype))
    with pytest.raises(TypeError, match=name):
        kernels.conv2d_grad_weight(arr(1, 2, 5, 5), arr(1, 3, 5, 5, dtype=dtype), (3, 3))


def test_not_an_array():
    with pytest.raises(TypeError, match="list"):
        kernels.dense([[1.0, 2.0]], arr(3, 2))


def test_mixed_dtypes_name_both():
    both = "float32.*float64|float64.*float32"
    with pytest.raises(TypeError, match=both):
        kernels.conv2d(arr(1, 2, 5, 5, dtype=F32), arr(3, 2, 3, 3, dtype=F64))
    with pytest.raises(TypeError, match=both):
        kernels.conv2d(arr(1, 2, 5, 5, dtype=F32), arr(3, 2, 3, 3, dtype=F32), arr(3, dtype=F64))
    with pytest.raises(TypeError, match=both):
        kernels.conv2d_grad_input(arr(1, 3, 5, 5, dtype=F64), arr(3, 2, 3, 3, dtype=F32), (1, 2, 5, 5))
    with pytest.raises(TypeError, match=both):
        kernels.conv2d_grad_weight(arr(1, 2, 5, 5, dtype=F32), arr(1, 3, 5, 5, dtype=F64), (3, 3))
    with pytest.raises(TypeError, match=both):
        kernels.dense(arr(2, 3, dtype=F64), arr(4, 3, dtype=F32))
    with pytest.raises(TypeError, match=both):
        kernels.dense_grad_input(arr(2, 4, dtype=F64), arr(4, 3, dtype=F32))
    with pytest.raises(TypeError, match=both):
        kernels.minmax_grad(arr(2, 4, dtype=F32), arr(2, 4, dtype=F64))
    with pytest.raises(TypeError, match=both):
        kernels.adam_update(arr(3, dtype=F32), arr(3, dtype=F64), arr(3, dtype=F32), arr(3, dtype=F32), 0.1, 0.9, 0.999, 1e-7)


# ---------------------------------------------------------------- stride / padding / kernel size

@pytest.mark.parametrize("stride", [0, -1, (1, 0), (0, 2)])
def test_stride_below_one(stride):
    with pytest.raises(ValueError, match=esc(stride)):
        kernels.conv2d(arr(1, 2, 5, 5), arr(3, 2, 3, 3), stride=stride)
    with pytest.raises(ValueError, match=esc(stride)):
        kernels.conv2d_grad_input(arr(1, 3, 5, 5), arr(3, 2, 3, 3), (1, 2, 5, 5), stride=stride)


@pytest.mark.parametrize("stride", [1.5, 2.0, "2", None, True, (1, 1, 1)])
def test_stride_not_int(stride):
    with pytest.raises((TypeError, ValueError), match=esc(stride)):
        kernels.conv2d(arr(1, 2, 5, 5), arr(3, 2, 3, 3), stride=stride)


@pytest.mark.parametrize("padding", [-1, (0, -2), (1, 0, -1, 0)])
def test_negative_padding(padding):
    with pytest.raises(ValueError, match=esc(padding)):
        kernels.conv2d(arr(1, 2, 5, 5), arr(3, 2, 3, 3), padding=padding)
    with pytest.raises(ValueError, match=esc(padding)):
        kernels.conv2d_grad_weight(arr(1, 2, 5, 5), arr(1, 3, 5, 5), (3, 3), padding=padding)


@pytest.mark.parametrize("padding", ["full", "", 1.5, None, (1, 2, 3)])
def test_bad_padding_value(padding):
    with pytest.raises((TypeError, ValueError), match=esc(repr(padding))):
        kernels.conv2d(arr(1, 2, 5, 5), arr(3, 2, 3, 3), padding=padding)


@pytest.mark.parametrize("x_hw, k, padding", [((3, 3), 5, "valid"), ((4, 6), 5, "valid"), ((2, 2), 7, 1)])
def test_kernel_larger_than_input(x_hw, k, padding):
    with pytest.raises(ValueError, match=f"kernel {k}x{k}.*{x_hw[0]}x{x_hw[1]}"):
        kernels.conv2d(arr(1, 1, *x_hw), arr(1, 1, k, k), padding=padding)
    with pytest.raises(ValueError, match=f"kernel {k}x{k}.*{x_hw[0]}x{x_hw[1]}"):
        kernels.conv2d_grad_weight(arr(1, 1, *x_hw), arr(1, 1, 1, 1), (k, k), padding=padding)


def test_empty_kernel_and_bad_kernel_hw():
    with pytest.raises(ValueError, match=esc("(3, 2, 0, 3)")):
        kernels.conv2d(arr(1, 2, 5, 5), arr(3, 2, 0, 3))
    with pytest.raises(ValueError, match=esc("(3, 3, 3)")):
        kernels.conv2d_grad_weight(arr(1, 2, 5, 5), arr(1, 3, 5, 5), (3, 3, 3))
    with pytest.raises(TypeError, match=esc("(3.5, 3)")):
        kernels.conv2d_grad_weight(arr(1, 2, 5, 5), arr(1, 3, 5, 5), (3.5, 3))


def test_adam_shape_mismatch():
    with pytest.raises(ValueError, match=esc("(3,)") + ".*" + esc("(4,)")):
        kernels.adam_update(arr(3), arr(4), arr(3), arr(3), 0.1, 0.9, 0.999, 1e-7)


# ---------------------------------------------------------------- backend names

@pytest.mark.parametrize("name", ["bogus", "NUMPY", "cuda", ""])
def test_unknown_backend_argument(name):
    with pytest.raises(ValueError, match=esc(repr(name))):
        kernels.dense(arr(2, 3), arr(4, 3), backend=name)


def test_unknown_backend_env_var(monkeypatch):
    monkeypatch.setenv("GLORO_BACKEND", "turbo")
    with pytest.raises(ValueError, match="GLORO_BACKEND.*'turbo'"):
        kernels.conv2d(arr(1, 2, 5, 5), arr(3, 2, 3, 3))
    with pytest.raises(ValueError, match="'turbo'"):
        kernels.minmax(arr(2, 4))


@pytest.mark.parametrize("backend", ["reference", "numpy", "numba"])
def test_validation_runs_before_any_backend(backend):
    """The same refusals whichever CPU backend is named (even one not built here)."""
    with pytest.raises(ValueError, match=esc("(2, 3, 5, 5)")):
        kernels.conv2d(arr(2, 3, 5, 5), arr(4, 2, 3, 3), backend=backend)
    with pytest.raises(TypeError, match="int64"):
        kernels.minmax(arr(2, 4, dtype=np.int64), backend=backend)

"""Hand-written compute kernels: conv2d, dense, MinMax and the power-method operators.

Raw arrays in and out (NumPy on the CPU, CuPy on the GPU), no autodiff.
Backends: ``reference`` (plain loops: the oracle), ``numpy`` (im2col + BLAS),
``numba`` (Numba CPU), ``cupy`` (CUDA C RawKernels) and ``numba_cuda``.
``backends()`` lists those that work here; ``availability()`` says why not.
"""
from .api import (
    conv2d,
    conv2d_adjoint,
    conv2d_grad_bias,
    conv2d_grad_input,
    conv2d_grad_weight,
    dense,
    dense_adjoint,
    dense_grad_bias,
    dense_grad_input,
    dense_grad_weight,
    minmax,
    minmax_grad,
)
from .checks import conv_out_hw, resolve_padding
from .fused import adam_update
from .registry import array_module, availability, backends, direct_sums, is_gpu_array
from .threads import cpu_threads

OPS = (
    "conv2d",
    "conv2d_grad_input",
    "conv2d_grad_weight",
    "dense",
    "dense_grad_input",
    "dense_grad_weight",
    "minmax",
    "minmax_grad",
)

__all__ = [
    "OPS",
    "adam_update",
    "array_module",
    "cpu_threads",
    "availability",
    "backends",
    "conv2d",
    "conv2d_adjoint",
    "conv2d_grad_bias",
    "conv2d_grad_input",
    "conv2d_grad_weight",
    "conv_out_hw",
    "dense",
    "dense_adjoint",
    "dense_grad_bias",
    "dense_grad_input",
    "dense_grad_weight",
    "direct_sums",
    "is_gpu_array",
    "minmax",
    "minmax_grad",
    "resolve_padding",
]

"""Minimal reverse-mode autodiff on raw NumPy/CuPy arrays, layers, initialisers, Adam, losses.

    import nn
    x = nn.Tensor(data)                      # constant
    model = nn.Sequential(nn.Conv2D(1, 16, 4, stride=2), nn.ReLU(), nn.Flatten(), nn.Dense(16*14*14, 10))
    loss = nn.losses.softmax_cross_entropy(model(x), labels)
    loss.backward(); opt.step(); opt.zero_grad()

Ops live in ``nn.F`` (nn/functions.py); kernels (conv, dense, MinMax, Adam update)
come from the ``kernels`` package, which picks the backend by array type.
"""
from . import functions
from . import functions as F
from . import gradcheck, init, losses, optim
from .layers import Conv2D, Dense, Flatten, MinMax, Module, ReLU, Sequential
from .optim import Adam
from .tensor import Parameter, Tensor, enable_grad, is_grad_enabled, no_grad

__all__ = [
    "Adam", "Conv2D", "Dense", "F", "Flatten", "MinMax", "Module", "Parameter", "ReLU",
    "Sequential", "Tensor", "enable_grad", "functions", "gradcheck", "init", "is_grad_enabled",
    "losses", "no_grad", "optim",
]

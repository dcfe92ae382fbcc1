"""Minimal reverse-mode autodiff on raw NumPy/CuPy arrays, Module, initialisers, Adam, losses.

    import nn
    from nn import F

    class Net(nn.Module):                    # parameters register on assignment
        def __init__(self, rng):
            super().__init__()
            self.w = nn.Parameter(nn.init.glorot_uniform((16, 1, 4, 4), rng))   # OIHW
            self.v = nn.Parameter(nn.init.glorot_uniform((10, 16 * 14 * 14), rng))

        def forward(self, x):                # x (N, 1, 28, 28) -> logits (N, 10)
            return F.dense(F.flatten(F.conv2d(x, self.w, None, 2, "same", relu=True)), self.v)

    net = Net(rng); opt = nn.Adam(net.parameters(), lr=1e-3)
    loss = nn.losses.softmax_cross_entropy(net(nn.Tensor(x)), labels)
    opt.zero_grad(); loss.backward(); opt.step()

Ops live in ``nn.F`` (nn/functions.py); kernels (conv, dense, MinMax, Adam update)
come from the ``kernels`` package, which picks the backend by array type. nn has no layer
classes: the engine's layers (one class per layer type) are gloro_core.layers, Modules too.
"""
from . import functions
from . import functions as F
from . import gradcheck, init, losses, optim
from .module import Module
from .optim import Adam
from .tensor import Parameter, Tensor, enable_grad, is_grad_enabled, no_grad

__all__ = [
    "Adam", "F", "Module", "Parameter", "Tensor", "enable_grad", "functions", "gradcheck", "init",
    "is_grad_enabled", "losses", "no_grad", "optim",
]

"""Layers: ``Module`` base, Conv2D, Dense, ReLU, MinMax, Flatten, Sequential.

Parameters and sub-modules register themselves when assigned as attributes,
in assignment order; ``parameters()`` follows that order (stable, so optimizer
state and checkpoints line up). Conv weights are OIHW, dense weights (out, in),
biases start at zero.
"""
from __future__ import annotations

import numpy as np

from . import functions as F
from . import init as _init
from .tensor import Parameter, Tensor


class Module:
    """Base class: parameter registry, train/eval flag, ``__call__`` -> ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_params" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call Module.__init__() before assigning attributes")
        self._params.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            if value.name is None:
                value.name = name
            self._params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def forward(self, x):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def named_parameters(self, prefix: str = "") -> list:
        """[(dotted name, Parameter)], own parameters first, then sub-modules, in order."""
        out = [(prefix + n, p) for n, p in self._params.items()]
        for n, m in self._modules.items():
            out.extend(m.named_parameters(prefix + n + "."))
        return out

    def parameters(self) -> list:
        return [p for _, p in self.named_parameters()]

    def modules(self) -> list:
        """This module and every sub-module, depth first."""
        out = [self]
        for m in self._modules.values():
            out.extend(m.modules())
        return out

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict:
        """{name: NumPy copy of the parameter}."""
        return {n: np.array(p.numpy(), copy=True) for n, p in self.named_parameters()}

    def load_state_dict(self, state: dict) -> None:
        """Copy arrays into the parameters (same names, shapes; cast to each parameter's dtype/device)."""
        named = dict(self.named_parameters())
        missing = sorted(set(named) - set(state))
        extra = sorted(set(state) - set(named))
        if missing or extra:
            raise KeyError(f"state_dict mismatch: missing {missing}, unexpected {extra}")
        for n, p in named.items():
            a = state[n]
            if tuple(a.shape) != p.shape:
                raise ValueError(f"{n}: shape {tuple(a.shape)} in state, {p.shape} in the model")
            p.data = p.xp.asarray(a, dtype=p.dtype).copy()
            p.grad = None

    def to(self, device: str) -> "Module":
        """Move every parameter to ``"cpu"`` (NumPy) or ``"gpu"``/``"cuda"`` (CuPy), in place."""
        dev = device.lower()
        for p in self.parameters():
            if dev == "cpu":
                p.data = p.numpy()
            elif dev in ("gpu", "cuda"):
                import cupy

                p.data = cupy.asarray(p.data)
            else:
                raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
            p.grad = None
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _pair(v, name) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class Conv2D(Module):
    """2-D convolution, NCHW in and out.

    Conv2D(in_channels, filters, kernel, stride=1, padding="same"): weight
    (filters, in_channels, kh, kw), bias (filters,) zeros. Attributes kept for
    the Lipschitz bound: ``kernel`` (kh, kw), ``stride`` (sh, sw), ``padding``
    ("same", "valid" or int, as given), ``in_channels``, ``filters``.
    """

    def __init__(self, in_channels, filters, kernel, stride=1, padding="same",
                 init="glorot_uniform", rng=None, dtype=np.float32, use_bias=True):
        super().__init__()
        self.in_channels, self.filters = int(in_channels), int(filters)
        self.kernel = _pair(kernel, "kernel")
        self.stride = _pair(stride, "stride")
        self.padding = padding
        if min(self.kernel) < 1 or min(self.stride) < 1 or self.in_channels < 1 or self.filters < 1:
            raise ValueError(
                f"Conv2D needs positive sizes, got in={in_channels} filters={filters} kernel={kernel} stride={stride}"
            )
        shape = (self.filters, self.in_channels) + self.kernel
        self.weight = Parameter(_init.get(init)(shape, _rng(rng), dtype=dtype), "weight")
        self.bias = Parameter(np.zeros(self.filters, dtype=dtype), "bias") if use_bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def __repr__(self):
        return (f"Conv2D({self.in_channels}, {self.filters}, kernel={self.kernel}, "
                f"stride={self.stride}, padding={self.padding!r})")


class Dense(Module):
    """Fully connected: (N, in) -> (N, units); weight (units, in), bias (units,) zeros."""

    def __init__(self, in_features, units, init="glorot_uniform", rng=None, dtype=np.float32, use_bias=True):
        super().__init__()
        self.in_features, self.units = int(in_features), int(units)
        if self.in_features < 1 or self.units < 1:
            raise ValueError(f"Dense needs positive sizes, got in={in_features} units={units}")
        self.weight = Parameter(_init.get(init)((self.units, self.in_features), _rng(rng), dtype=dtype), "weight")
        self.bias = Parameter(np.zeros(self.units, dtype=dtype), "bias") if use_bias else None

    def forward(self, x):
        return F.dense(x, self.weight, self.bias)

    def __repr__(self):
        return f"Dense({self.in_features}, {self.units})"


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)

    def __repr__(self):
        return "ReLU()"


class MinMax(Module):
    """GroupSort-2 on axis 1 (channels or features must be even)."""

    def forward(self, x):
        return F.minmax(x)

    def __repr__(self):
        return "MinMax()"


class Flatten(Module):
    """(N, ...) -> (N, prod(...))."""

    def forward(self, x):
        return F.flatten(x)

    def __repr__(self):
        return "Flatten()"


class Sequential(Module):
    """Layers applied in order; sub-modules named "0", "1", ... (so "0.weight")."""

    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes Modules, got {type(layer).__name__} at position {i}")
            setattr(self, str(i), layer)
        object.__setattr__(self, "layers", list(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Sequential(*self.layers[i])
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __repr__(self):
        inner = "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"


__all__ = ["Module", "Conv2D", "Dense", "ReLU", "MinMax", "Flatten", "Sequential", "Tensor"]

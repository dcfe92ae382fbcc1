"""``Module``: the base class of anything that holds Parameters (gloro_core.layers' layers).

Parameters and sub-modules register themselves when assigned as attributes,
in assignment order; ``parameters()`` follows that order (stable, so optimizer
state and checkpoints line up). nn has no layer classes of its own: a net is built from
gloro_core.layers (one class per layer type), or, in nn alone, as a Module subclass whose
``forward`` calls the ops of nn.functions.
"""
from __future__ import annotations

import numpy as np

from .tensor import Parameter


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


__all__ = ["Module"]

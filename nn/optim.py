"""Adam, as Keras does it (defaults lr 1e-3, beta1 0.9, beta2 0.999, epsilon 1e-7).

Step t (1-based):
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)
    p <- p - lr_t m / (sqrt(v) + epsilon)
The element-wise update is one fused kernel (kernels.adam_update), in place, on
the parameter's device; lr_t is computed in Python float64.

``weight_decay`` wd > 0 makes it AdamW (Loshchilov and Hutter, decoupled weight decay, as
PyTorch's AdamW): p <- p (1 - lr wd) before the Adam step, lr the current (scheduled) lr,
not lr_t. ``clip_grad_norm`` rescales all gradients together to a global l2 norm.
"""
from __future__ import annotations

import math

import numpy as np

import kernels
from kernels.registry import array_module, is_gpu_array


class Adam:
    """Adam(params, lr=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-7).

    ``lr`` may be changed between steps (schedules). ``t`` counts the steps taken.
    Parameters whose ``.grad`` is None are skipped (their moments are left alone),
    but ``t`` advances once per ``step()``, as in Keras.
    """

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-7, weight_decay=0.0):
        self.params = list(params)
        if not self.params:
            raise ValueError("Adam got an empty parameter list")
        for i, p in enumerate(self.params):
            if not getattr(p, "requires_grad", False):
                raise TypeError(f"parameter {i} ({getattr(p, 'name', None)!r}) does not require a gradient")
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got beta1={beta1}, beta2={beta2}")
        if epsilon < 0 or lr < 0:
            raise ValueError(f"lr and epsilon must be >= 0, got lr={lr}, epsilon={epsilon}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        self.weight_decay = float(weight_decay)
        self.lr = float(lr)
        self.beta1, self.beta2, self.epsilon = float(beta1), float(beta2), float(epsilon)
        self.t = 0
        self.m = [None] * len(self.params)  # created on first use, on the parameter's device
        self.v = [None] * len(self.params)

    def lr_t(self, t: int | None = None) -> float:
        """The bias-corrected step size at step ``t`` (default: the next step)."""
        t = self.t + 1 if t is None else int(t)
        return self.lr * math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)

    def step(self) -> None:
        self.t += 1
        lr_t = self.lr_t(self.t)
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if g.shape != p.data.shape or g.dtype != p.dtype:
                raise ValueError(
                    f"parameter {i} ({p.name!r}): grad shape/dtype {tuple(g.shape)}/{g.dtype} "
                    f"!= parameter {p.shape}/{p.dtype}"
                )
            if self.m[i] is None:
                xp = p.xp
                self.m[i] = xp.zeros(p.data.shape, dtype=p.dtype)
                self.v[i] = xp.zeros(p.data.shape, dtype=p.dtype)
            if self.weight_decay:
                p.data *= p.dtype.type(1.0 - self.lr * self.weight_decay)
            kernels.adam_update(p.data, g, self.m[i], self.v[i], lr_t, self.beta1, self.beta2, self.epsilon)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """Flat dict (npz-friendly): scalars, and NumPy copies "m.<i>", "v.<i>" for started moments."""
        out = {"t": int(self.t), "lr": float(self.lr), "beta1": self.beta1, "beta2": self.beta2,
               "epsilon": self.epsilon, "n_params": len(self.params)}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            if m is not None:
                out[f"m.{i}"] = _host_copy(m)
                out[f"v.{i}"] = _host_copy(v)
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved; moments go to each parameter's device and dtype."""
        n = int(state["n_params"])
        if n != len(self.params):
            raise ValueError(f"state has {n} parameters, optimizer has {len(self.params)}")
        self.t = int(state["t"])
        self.lr = float(state["lr"])
        self.beta1, self.beta2, self.epsilon = float(state["beta1"]), float(state["beta2"]), float(state["epsilon"])
        for i, p in enumerate(self.params):
            if f"m.{i}" in state:
                m, v = state[f"m.{i}"], state[f"v.{i}"]
                if tuple(m.shape) != p.shape or tuple(v.shape) != p.shape:
                    raise ValueError(f"moment {i} has shape {tuple(m.shape)}, parameter has {p.shape}")
                self.m[i] = p.xp.asarray(m, dtype=p.dtype).copy()
                self.v[i] = p.xp.asarray(v, dtype=p.dtype).copy()
            else:
                self.m[i] = self.v[i] = None


def clip_grad_norm(params, max_norm: float):
    """Scale every ``.grad`` by min(1, max_norm / ||g||), ||g|| the l2 norm of all gradients
    together (float64); -> ||g|| before clipping, a 0-d array on the gradients' device.
    Parameters without a gradient are skipped. The scale is applied on the device (a factor
    of exactly 1 below the threshold), so a GPU step does not wait for the norm."""
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm}")
    params = [p for p in params if p.grad is not None]
    if not params:
        return np.zeros(())
    xp = array_module(params[0].grad)
    total = xp.sqrt(sum((p.grad.astype(np.float64) ** 2).sum() for p in params))
    scale = xp.minimum(1.0, max_norm / xp.maximum(total, np.finfo(np.float64).tiny))
    for p in params:   # new arrays: a gradient may be shared with another buffer
        p.grad = p.grad * scale.astype(p.grad.dtype)
    return total


def _host_copy(a):
    return a.get() if is_gpu_array(a) else np.array(a, copy=True)   # .get() copies already

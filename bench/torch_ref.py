"""The same GloRo models in plain PyTorch, for side-by-side timing in bench/run.py.

Only the benchmark imports this module (the engine never imports torch). It mirrors
the engine's math so that the two sides do the same work:

- layers from the same spec list as gloro_core.architectures, e.g.
  ``[{"type": "conv", "filters": 16, "kernel": 4, "stride": 2, "padding": "same"}, ...,
  {"type": "dense", "units": 10}]``; NCHW activations, OIHW conv weights, (out, in)
  dense weights; an activation (ReLU or MinMax) after every layer but the last;
- SAME padding as TensorFlow: ``F.pad`` with the extra pixel at the bottom/right, the pads
  resolved by the engine's own layers (gloro_core.layers.build parses the specs);
- the margin GloRo variant: K_sub = product of per-layer spectral norms (all layers but
  the last) from power iterations on persisted batch-1 iterates (no gradient through the
  iterations; sigma = ||A v|| differentiated with v fixed), K_ij = K_sub ||w_j - w_i||,
  y_⊥ = max_{i != j} (y_i + eps K_ij) with j = argmax y masked by index;
- cross-entropy on the m+1 logits (⊥ is never the label); Adam with epsilon 1e-7.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def minmax(x: torch.Tensor) -> torch.Tensor:
    """GroupSort-2 on dim 1: channel pairs (2k, 2k+1) -> (min, max)."""
    shp = x.shape
    pairs = x.reshape(shp[0], shp[1] // 2, 2, *shp[2:])
    lo = pairs.amin(dim=2, keepdim=True)
    hi = pairs.amax(dim=2, keepdim=True)
    return torch.cat([lo, hi], dim=2).reshape(shp)


class _Conv:
    """A conv layer with its padding done by F.pad: x (N,C,H,W) -> (N,O,OH,OW).

    Shapes, stride and the resolved padding come from the engine's own layer (the spec is
    parsed in one place, gloro_core.layers)."""

    def __init__(self, layer, gen, dtype):
        (c, h, w), (o, oh, ow) = layer.in_shape, layer.out_shape
        _, _, kh, kw = layer.w_shape
        sh, sw = self.stride = tuple(layer.stride)
        self.pads = tuple(layer.pads)
        t, b, l, r = self.pads
        self.in_shape, self.out_shape = (c, h, w), (o, oh, ow)
        fan_in, fan_out = c * kh * kw, o * kh * kw
        lim = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform
        self.weight = ((torch.rand(o, c, kh, kw, generator=gen, dtype=dtype) * 2 - 1) * lim).requires_grad_()
        self.bias = torch.zeros(o, dtype=dtype, requires_grad=True)
        # the transposed conv gives (OH-1)*s + k rows; output-pad up to the padded input
        hp, wp = h + t + b, w + l + r
        self.out_pad = (hp - ((oh - 1) * sh + kh), wp - ((ow - 1) * sw + kw))

    def params(self):
        return [self.weight, self.bias]

    def __call__(self, x, bias=True):
        t, b, l, r = self.pads
        if t or b or l or r:
            x = F.pad(x, (l, r, t, b))
        return F.conv2d(x, self.weight, self.bias if bias else None, stride=self.stride)

    def adjoint(self, y):
        """A^T y: transposed conv, output-padded to the padded input, cropped to (H, W)."""
        t, _, l, _ = self.pads
        _, h, w = self.in_shape
        z = F.conv_transpose2d(y, self.weight, stride=self.stride, output_padding=self.out_pad)
        return z[:, :, t:t + h, l:l + w]


class _Dense:
    """y = x W^T + b; x (N, I) -> (N, O)."""

    def __init__(self, layer, gen, dtype):
        o, i = layer.w_shape
        lim = math.sqrt(6.0 / (i + o))
        self.in_shape, self.out_shape = (i,), (o,)
        self.weight = ((torch.rand(o, i, generator=gen, dtype=dtype) * 2 - 1) * lim).requires_grad_()
        self.bias = torch.zeros(o, dtype=dtype, requires_grad=True)

    def params(self):
        return [self.weight, self.bias]

    def __call__(self, x, bias=True):
        if x.dim() > 2:
            x = x.reshape(x.shape[0], -1)
        return F.linear(x, self.weight, self.bias if bias else None)

    def adjoint(self, y):
        return y @ self.weight


class TorchGloroNet:
    """A GloRo net in plain PyTorch (margin variant).

    input_shape (C, H, W); ``layers`` a spec list whose last entry is a dense layer with
    ``num_classes`` units. ``logits(x)``: x (N, C, H, W) -> (N, m).
    """

    def __init__(self, input_shape, num_classes, layers, activation="relu", eps=0.3, seed=0,
                 dtype=torch.float32):
        from gloro_core import layers as engine_layers

        gen = torch.Generator().manual_seed(seed)
        self.activation = activation
        self.eps = float(eps)
        self.num_classes = int(num_classes)
        # the engine validates the specs and resolves shapes and padding (it raises on a bad
        # spec, a last layer that is not dense, or a wrong class count)
        resolved = engine_layers.build(layers, tuple(int(v) for v in input_shape), self.num_classes,
                                       engine_layers.activation(activation))
        mirrors = {"conv": _Conv, "dense": _Dense}
        self.layers = []
        for layer in resolved:
            if type(layer) not in (engine_layers.Conv, engine_layers.Dense):
                raise ValueError(f"the PyTorch mirror has no {layer.kind!r} layer (conv and dense only)")
            self.layers.append(mirrors[layer.kind](layer, gen, dtype))
        # persisted power-method iterates, batch 1, shaped like each layer's input
        self.iterates = []
        for layer in self.layers[:-1]:
            u = torch.randn((1,) + layer.in_shape, generator=gen, dtype=dtype)
            self.iterates.append(u / u.norm())
        self.k_sub_frozen = None

    def parameters(self):
        return [p for layer in self.layers for p in layer.params()]

    def _act(self, x):
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "minmax":
            return minmax(x)
        raise ValueError(f"unknown activation {self.activation!r}")

    def logits(self, x):
        for layer in self.layers[:-1]:
            x = self._act(layer(x))
        return self.layers[-1](x)

    # ------------------------------------------------------------ Lipschitz bound
    def power_iterate(self, iters: int) -> None:
        """``iters`` steps of u <- A^T A u / ||A^T A u|| per layer, no gradient."""
        with torch.no_grad():
            for idx, layer in enumerate(self.layers[:-1]):
                u = self.iterates[idx]
                for _ in range(iters):
                    v = layer.adjoint(layer(u.reshape((1,) + layer.in_shape), bias=False))
                    n = v.norm()
                    u = v / n if n > 0 else v
                self.iterates[idx] = u

    def k_sub(self, iters: int) -> torch.Tensor:
        """Run the power method, then K_sub = prod ||A_l u_l|| with grads w.r.t. weights."""
        self.power_iterate(iters)
        k = None
        for idx, layer in enumerate(self.layers[:-1]):
            sigma = layer(self.iterates[idx], bias=False).norm()
            k = sigma if k is None else k * sigma
        return k

    def freeze_lipschitz(self, iters: int = 100) -> None:
        """Converge the iterates and keep K_sub as a constant (certification time)."""
        with torch.no_grad():
            self.k_sub_frozen = self.k_sub(iters).detach()

    # ------------------------------------------------------------ GloRo logits
    def gloro_logits(self, y, k_sub, eps=None):
        """y (N, m) -> (N, m+1): the m logits and y_⊥ = max_{i != j} (y_i + eps K_ij)."""
        eps = self.eps if eps is None else eps
        w = self.layers[-1].weight  # (m, D)
        m = w.shape[0]
        eye = torch.eye(m, dtype=w.dtype)
        sq = ((w[:, None, :] - w[None, :, :]) ** 2).sum(-1)
        # the diagonal (||w_j - w_j|| = 0) is masked below; keep sqrt away from 0 there
        dist = torch.sqrt(sq + eye) * (1 - eye)  # (m, m)
        j = y.argmax(dim=1)  # predicted class, by index
        kij = k_sub * dist[j]  # (N, m)
        z = y + eps * kij
        z = z.masked_fill(F.one_hot(j, m).bool(), float("-inf"))
        y_bot = z.max(dim=1, keepdim=True).values
        return torch.cat([y, y_bot], dim=1)

    def loss(self, x, labels, power_iters: int, eps=None):
        """Cross-entropy on the m+1 GloRo logits (⊥ never correct)."""
        y = self.logits(x)
        return F.cross_entropy(self.gloro_logits(y, self.k_sub(power_iters), eps), labels)

    def standard_loss(self, x, labels):
        return F.cross_entropy(self.logits(x), labels)

    def certify(self, x):
        """Frozen-K certified prediction: (predictions (N,), certified (N,) bool)."""
        if self.k_sub_frozen is None:
            raise RuntimeError("call freeze_lipschitz() first")
        with torch.no_grad():
            g = self.gloro_logits(self.logits(x), self.k_sub_frozen)
            pred = g.argmax(dim=1)
            return pred, pred != self.num_classes

    def predict(self, x):
        with torch.no_grad():
            return self.logits(x).argmax(dim=1)


def make_optimizer(model: TorchGloroNet, lr: float = 1e-3):
    """Adam, beta (0.9, 0.999), epsilon 1e-7 (the Keras default the paper used)."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-7)


def train_step_fn(model: TorchGloroNet, opt, x, labels, kind: str = "gloro", power_iters: int = 10):
    """A closure running one full training step (forward, loss, backward, Adam)."""
    if kind not in ("gloro", "standard"):
        raise ValueError(f"kind must be 'gloro' or 'standard', got {kind!r}")

    def step():
        opt.zero_grad(set_to_none=True)
        if kind == "gloro":
            loss = model.loss(x, labels, power_iters)
        else:
            loss = model.standard_loss(x, labels)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


# ------------------------------------------------------------ single kernels
def conv2d_same(x, w, b, stride, pads):
    t, bt, l, r = pads
    return F.conv2d(F.pad(x, (l, r, t, bt)), w, b, stride=stride)


def conv2d_grad_input(gy, w, x_shape, stride, pads):
    t, bt, l, r = pads
    n, c, h, wd = x_shape
    padded = (n, c, h + t + bt, wd + l + r)
    gx = torch.nn.grad.conv2d_input(padded, w, gy, stride=stride)
    return gx[:, :, t:t + h, l:l + wd]


def conv2d_grad_weight(x, gy, w_shape, stride, pads):
    t, bt, l, r = pads
    return torch.nn.grad.conv2d_weight(F.pad(x, (l, r, t, bt)), w_shape, gy, stride=stride)


def minmax_grad(x, gy):
    """Gradient of minmax at x with the engine's tie rule (2k gets min's, 2k+1 max's)."""
    n, c = x.shape[:2]
    rest = x.shape[2:]
    p = x.reshape(n, c // 2, 2, *rest)
    g = gy.reshape(n, c // 2, 2, *rest)
    swap = p[:, :, 0] > p[:, :, 1]  # min came from 2k+1
    g0 = torch.where(swap, g[:, :, 1], g[:, :, 0])
    g1 = torch.where(swap, g[:, :, 0], g[:, :, 1])
    return torch.stack([g0, g1], dim=2).reshape(x.shape)

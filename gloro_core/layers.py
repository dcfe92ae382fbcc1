"""The layers of a GloRo net: one class per layer type, holding all of its GloRo math.

A linear layer (:class:`Conv`, :class:`Dense`) is an nn Module that owns

* its spec, the checkpoint's layer dict (:meth:`Layer.from_spec` validates it strictly,
  ``layer.spec`` gives it back);
* its parameters ``weight`` and ``bias`` (Parameters named ``param.{i}.weight`` /
  ``.bias``) and its power iterate ``iterate`` (1, *in_shape);
* the autodiff forward (:meth:`forward`, ReLU optionally fused into the kernel);
* the linear operator A without bias on one example: :meth:`apply`, :meth:`adjoint`
  (raw kernels, no graph), :meth:`raw_ops` and :meth:`kernel_args` for the power steps of
  gloro_core.lipschitz;
* a sound float64 upper bound of ||A||_2 (:meth:`provable`) and of ||A_|W|||_2
  (:meth:`abs_bound`), the constants of the norm-wise rounding bound
  (:meth:`rounding_constants`) and one step of the per-coordinate rounding-error pass
  (:meth:`error_step`);
* its PyTorch-layout export (:meth:`torch_modules`).

Layer types: :class:`Conv`, :class:`Dense` (with ``"normalize": true`` on the last layer
a :class:`NormalizedDense`), :class:`LiResNet` (x + conv(x) + b), and the parameter-free
:class:`FixedLayer` s :class:`InvDown` (space-to-depth) and :class:`AvgPool`, whose exact
norm replaces the power iterate and the provable bound (``parametric`` False).

Activations (:class:`ReLU`, :class:`MinMax`) are 1-Lipschitz and exact in floating
point; they sit after every layer but the last whose ``activated`` is True (not after a
FixedLayer).

Adding a layer type: subclass :class:`Layer`, set ``kind``, ``kernel`` and ``keys``, and
write ``__init__`` (shapes), ``from_spec``, ``forward``, ``apply``, ``adjoint``,
``raw_ops``, ``kernel_args``, ``provable``, ``error_step`` and ``torch_modules``; then
add it to :data:`LAYER_TYPES`.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

import kernels
from kernels import registry
from kernels.checks import check_conv, check_stride, conv_out_hw, resolve_padding
from kernels.registry import array_module, to_host
from nn import functions as F
from nn.module import Module
from nn.tensor import Parameter, Tensor, no_grad

from . import bounds, rounding
from .checks import spec_int


class Layer(Module):
    """A linear layer y = A x + b (see the module docstring).

    in_shape: one example's input, (C, H, W) or (n_in,); out_shape likewise; w_shape: the
    weight's shape, (out, in, *taps); spec: the checkpoint dict.
    """

    kind = None     # the spec's "type"
    kernel = None   # the backend op of A (its fused power steps are kernel + "_power_steps"; None: none)
    keys = ()       # the spec's allowed keys
    required = ()   # ... and those without a default
    parametric = True   # has a weight, a bias and a power iterate (see FixedLayer for those without)
    activated = True    # the net's activation follows this layer (unless it is the last)

    def __init__(self, in_shape, out_shape, w_shape, spec):
        super().__init__()
        self.in_shape, self.out_shape, self.w_shape = tuple(in_shape), tuple(out_shape), tuple(w_shape)
        self.spec = spec
        self.weight = self.bias = self.iterate = None

    @classmethod
    def check_keys(cls, d, i):
        unknown = set(d) - set(cls.keys)
        if unknown:
            raise ValueError(f"layer {i}: unknown {cls.kind} keys {sorted(unknown)}")
        for key in cls.required:
            if key not in d:
                raise ValueError(f"layer {i}: {cls.kind} spec needs {key!r}: {d!r}")

    @classmethod
    def made(cls, i, *args):
        """cls(*args), a ValueError from the constructor naming layer i (a spec's error)."""
        try:
            return cls(*args)
        except ValueError as exc:
            raise ValueError(f"layer {i}: {exc}") from None

    def init_parameters(self, index: int, init, rng, dtype):
        """Weight from ``init(shape, rng, dtype)`` (None: zeros, filled in by load) and a zero bias."""
        w = init(self.w_shape, rng, dtype=dtype) if init is not None else np.zeros(self.w_shape, dtype)
        self.weight = Parameter(w, name=f"param.{index}.weight")
        self.bias = Parameter(np.zeros((self.w_shape[0],), dtype=dtype), name=f"param.{index}.bias")

    def effective_weight(self):
        """The weight array of the operator A (raw, no graph): what certification bounds
        and the forward pass multiplies by. The stored weight, except where the forward pass
        transforms it (NormalizedDense)."""
        return self.weight.data

    def head_weight(self):
        """The Tensor (with its graph to the Parameters) whose rows are the ⊥ head's w_i."""
        return self.weight

    def sigma(self):
        """Training estimate ||A v|| (scalar Tensor) at the stored iterate v held constant:
        its gradient reaches the weight only."""
        return F.l2_norm(self.forward(Tensor(self.iterate), bias=False))

    def adjoint_tensor(self, u):
        """A^T u as a Tensor differentiable in u and the weight: u (N, *out_shape) -> (N, *in_shape)."""
        raise NotImplementedError(f"{type(self).__name__} has no differentiable adjoint")

    def sigma_unrolled(self, iters: int):
        """Training estimate ||A x|| / ||x|| with x = (A^T A)^iters v, normalised before each
        step, from the stored iterate v: the steps are in the graph, so the gradient also
        reaches the weight through x (the authors' TensorFlow code; ``sigma`` holds v fixed).
        Stores x / ||x|| as the new iterate. The value is that of ``iters`` power steps and
        then ``sigma``. A zero norm stops the steps as ``power_steps`` does: estimate 0.
        """
        iters = int(iters)
        x = Tensor(self.iterate)
        for step in range(iters + 1):
            n = F.l2_norm(x)
            if not float(n.data) > 0:   # A^T A annihilated the iterate: 0, the weight's gradient 0
                return self.sigma() * 0.0
            if step == iters:
                break
            x = self.adjoint_tensor(self.forward(x / n, bias=False))
        self.iterate = array_module(x.data).ascontiguousarray(x.data / n.data)
        return F.l2_norm(self.forward(x, bias=False)) / n

    def array_shapes(self, i: int) -> dict:
        """{checkpoint array name: shape} of layer ``i``."""
        return {f"param.{i}.weight": self.w_shape, f"param.{i}.bias": (self.w_shape[0],),
                f"iterate.{i}": self.iterate_shape}

    def state_arrays(self, i: int) -> dict:
        """{checkpoint array name: host array} of layer ``i``."""
        return {f"param.{i}.weight": to_host(self.weight.data), f"param.{i}.bias": to_host(self.bias.data),
                f"iterate.{i}": to_host(self.iterate)}

    def load_arrays(self, i: int, arrays: dict, dtype):
        """Take layer ``i``'s arrays (checked by checkpoint.check_arrays) as the model dtype."""
        self.weight.data = np.ascontiguousarray(arrays[f"param.{i}.weight"], dtype=dtype)
        self.bias.data = np.ascontiguousarray(arrays[f"param.{i}.bias"], dtype=dtype)
        self.iterate = np.ascontiguousarray(arrays[f"iterate.{i}"], dtype=dtype)

    @property
    def iterate_shape(self) -> tuple:
        """Shape of the power iterate: the layer input with batch 1."""
        return (1,) + self.in_shape

    @property
    def positions(self) -> int:
        """Output positions per output channel (1 for a dense layer)."""
        return math.prod(self.out_shape[1:])

    @property
    def fan_in(self) -> int:
        """Products in one output's dot product (without the bias)."""
        return math.prod(self.w_shape[1:])

    def flops(self) -> int:
        """Multiply-adds of A v for one iterate (the power steps' cost, for scheduling)."""
        return math.prod(self.w_shape) * self.positions

    def abs_bound(self, w) -> float:
        """Upper bound of ||A_|W|||_2 (Schur test, see rounding.abs_operator_bound)."""
        return rounding.abs_operator_bound(w)

    def rounding_constants(self, sigma: float, dtype, last: bool) -> rounding.LayerConstants:
        """The norm-wise rounding bound's constants, with sigma >= ||A||_2."""
        w, b = to_host(self.effective_weight()), to_host(self.bias.data)
        return rounding.layer_constants(w, b, self.positions, sigma, self.abs_bound(w), dtype, last, self.fan_in)

    def forward_error(self, h, e, dtype):
        """One layer of Certifier.forward_with_error (whose docstring gives the argument).

        h (N, *in_shape) the computed input (model dtype), e (N, *in_shape) float64 a bound
        on its error. Returns (computed output, float64 error bound of the output, (N,) bool
        False for rows that may have overflowed)."""
        xp = array_module(h)
        info = np.finfo(dtype)
        u, tiny, limit = float(info.eps) / 2.0, float(info.smallest_subnormal), float(info.max)
        fan = self.fan_in + 1
        gamma = fan * u / (1.0 - fan * u)
        src = e + gamma * xp.abs(h.astype(np.float64)) + bounds.TINY   # (gamma |h| may underflow)
        out, e = self.error_step(h, src, gamma)
        e += fan * tiny + fan * bounds.TINY  # products that underflow, in the model dtype and here
        e *= 1.0 + 1e-6
        with np.errstate(over="ignore", invalid="ignore"):
            fine = xp.isfinite(out) & (e * ((1.0 + gamma) / gamma * (1.0 + 1e-6)) <= limit)
        return out, e, fine.reshape(fine.shape[0], -1).all(axis=1)

    def __repr__(self):
        return f"{type(self).__name__}({self.spec}, in {self.in_shape} -> out {self.out_shape})"


class Conv(Layer):
    """2-D convolution, NCHW: Conv(in_shape (C, H, W), filters, kernel, stride=1, padding="same").

    kernel and stride: an int or a pair; padding: "same", "valid", an int or a pair.
    Weight (filters, C, kh, kw) OIHW; out_shape (filters, OH, OW).
    """

    kind, kernel = "conv", "conv2d"
    keys = ("type", "filters", "kernel", "stride", "padding")
    required = ("filters", "kernel")

    def __init__(self, in_shape, filters, kernel, stride=1, padding="same"):
        c, h, w = (int(v) for v in in_shape)
        kh, kw = (kernel, kernel) if np.isscalar(kernel) else (int(kernel[0]), int(kernel[1]))
        s = check_stride(stride)
        pads = resolve_padding(padding, (h, w), (kh, kw), s)
        oh, ow = conv_out_hw((h, w), (kh, kw), s, pads)
        spec = {"type": "conv", "filters": filters, "kernel": kernel, "stride": stride, "padding": padding}
        super().__init__((c, h, w), (int(filters), oh, ow), (int(filters), c, kh, kw), spec)
        self.stride, self.padding, self.pads = s, padding, pads

    @classmethod
    def from_spec(cls, d, i, in_shape):
        cls.check_keys(d, i)
        if len(in_shape) != 3:
            raise ValueError(f"layer {i}: a conv layer cannot follow a dense layer" if i else
                             f"layer {i}: conv needs a (C, H, W) input, got input_shape {tuple(in_shape)}")
        filters, kernel, stride = spec_int(d, i, "filters"), spec_int(d, i, "kernel"), spec_int(d, i, "stride", 1)
        padding = d.get("padding", "same")
        if isinstance(padding, str):
            padding = padding.lower()
            if padding not in ("same", "valid"):
                raise ValueError(f"layer {i}: 'padding' must be 'same', 'valid' or an int, got {padding!r}")
        else:
            padding = spec_int(d, i, "padding")
            if padding < 0:
                raise ValueError(f"layer {i}: 'padding' must be >= 0, got {padding}")
        if filters < 1 or kernel < 1 or stride < 1:
            raise ValueError(f"layer {i}: filters, kernel and stride must be >= 1, got {d!r}")
        return cls.made(i, in_shape, filters, kernel, stride, padding)  # e.g. a kernel too large

    def forward(self, h, relu=False, bias=True):
        """(N, C, H, W) Tensor -> (N, *out_shape); relu=True fuses the ReLU into the node."""
        return F.conv2d(h, self.weight, self.bias if bias else None, self.stride, self.padding, relu=relu)

    def apply(self, w, v):
        """A v (no bias): v (N, *in_shape) -> (N, *out_shape)."""
        return kernels.conv2d(v, w, None, self.stride, self.padding)

    def adjoint(self, w, u):
        """A^T u: u (N, *out_shape) -> (N, *in_shape)."""
        return kernels.conv2d_adjoint(u, w, (u.shape[0],) + self.in_shape, self.stride, self.padding)

    def adjoint_tensor(self, u):
        return F.conv2d_transpose(u, self.weight, (u.shape[0],) + self.in_shape, self.stride, self.padding)

    def kernel_args(self, w, v) -> tuple:
        """The resolved (stride, pads) that the backend's conv kernels take after (v, w, ...)."""
        s, pads, _ = check_conv(v.shape, w, self.stride, self.padding)
        return s, pads

    def raw_ops(self, w, v):
        """(A, A^T) as direct backend calls for iterates like ``v`` (validated once here)."""
        s, pads = self.kernel_args(w, v)
        fa = registry.get("conv2d", registry.select("conv2d", v))
        # A v has v's batch and array type, all that selection looks at
        fb = registry.get("conv2d_grad_input", registry.select("conv2d_grad_input", v))
        x_shape = tuple(v.shape)
        return (lambda a: fa(a, w, None, s, pads)), (lambda b: fb(b, w, x_shape, s, pads))

    def provable(self, w, method="auto"):
        """(sound float64 upper bound of ||A||_2, method name): see bounds.conv_provable_bound."""
        return bounds.conv_provable_bound(w, self.in_shape[1:], self.stride, self.padding, method)

    def error_step(self, h, src, gamma):
        """The computed output fl(A h + b) (model dtype) and A_|W| src + gamma |b| (float64).

        h (N, *in_shape) the computed input; src (N, *in_shape) float64 = e + gamma |h| (+ tiny)."""
        xp = array_module(h)
        wd, bd = self.weight.data, self.bias.data
        out = kernels.conv2d(h, wd, bd, self.stride, self.padding)
        e = kernels.conv2d(src, xp.abs(wd.astype(np.float64)), None, self.stride, self.padding)
        e += (gamma * xp.abs(bd.astype(np.float64)))[None, :, None, None]
        return out, e

    def torch_modules(self):
        """[(torch.nn class name, constructor kwargs, state dict)]: ZeroPad2d then a Conv2d."""
        pt, pb, pl, pr = self.pads
        conv = {"in_channels": self.in_shape[0], "out_channels": self.out_shape[0],
                "kernel_size": tuple(self.w_shape[2:]), "stride": self.stride, "padding": 0}
        return [("ZeroPad2d", {"padding": (pl, pr, pt, pb)}, {}),
                ("Conv2d", conv, {"weight": to_host(self.weight.data), "bias": to_host(self.bias.data)})]


class Dense(Layer):
    """Fully connected: Dense(in_shape, units); a (C, H, W) input is flattened (C, H, W order).

    Weight (units, n_in), in_shape (n_in,), out_shape (units,).
    """

    kind, kernel = "dense", "dense"
    keys = ("type", "units", "normalize")
    required = ("units",)

    def __init__(self, in_shape, units):
        n_in = math.prod(in_shape) if isinstance(in_shape, (tuple, list)) else int(in_shape)  # exact: np.prod wraps
        super().__init__((n_in,), (int(units),), (int(units), n_in), {"type": "dense", "units": units})

    @classmethod
    def from_spec(cls, d, i, in_shape):
        cls.check_keys(d, i)
        units = spec_int(d, i, "units")
        if units < 1:
            raise ValueError(f"layer {i}: units must be >= 1, got {units}")
        normalize = d.get("normalize", False)
        if not isinstance(normalize, bool):
            raise ValueError(f"layer {i}: 'normalize' must be true or false, got {normalize!r}")
        return (NormalizedDense if normalize else Dense)(in_shape, units)

    def forward(self, h, relu=False, bias=True):
        """(N, ...) Tensor -> (N, units), flattening an image input first."""
        if h.ndim != 2:
            h = F.flatten(h)
        return F.dense(h, self.weight, self.bias if bias else None, relu=relu)

    def apply(self, w, v):
        """A v = v W^T (no bias): (N, n_in) -> (N, units)."""
        return kernels.dense(v, w, None)

    def adjoint(self, w, u):
        """A^T u = u W: (N, units) -> (N, n_in)."""
        return kernels.dense_adjoint(u, w)

    def adjoint_tensor(self, u):
        return F.matmul(u, self.head_weight())

    def kernel_args(self, w, v) -> tuple:
        return ()

    def raw_ops(self, w, v):
        fa = registry.get("dense", registry.select("dense", v))
        fb = registry.get("dense_grad_input", registry.select("dense_grad_input", v))
        return (lambda a: fa(a, w, None)), (lambda b: fb(b, w))

    def provable(self, w, method="auto"):
        """(||W||_2 by SVD, inflated to a sound bound, "svd"); method is for convs only."""
        return bounds.dense_norm(w), "svd"

    def error_step(self, h, src, gamma):
        """As :meth:`Conv.error_step`, flattening an image input first."""
        xp = array_module(h)
        wd, bd = self.effective_weight(), self.bias.data
        if h.ndim != 2:
            h = h.reshape(h.shape[0], -1)
            src = src.reshape(src.shape[0], -1)
        out = kernels.dense(h, wd, bd)
        e = kernels.dense(src, xp.abs(wd.astype(np.float64)), None) + gamma * xp.abs(bd.astype(np.float64))[None, :]
        return out, e

    def torch_modules(self):
        """[Flatten (image inputs are flattened in C, H, W order; harmless on vectors), Linear]."""
        lin = {"in_features": self.in_shape[0], "out_features": self.out_shape[0]}
        return [("Flatten", {}, {}),
                ("Linear", lin, {"weight": to_host(self.effective_weight()), "bias": to_host(self.bias.data)})]


class NormalizedDense(Dense):
    """Last-layer normalisation: Dense whose rows are scaled to unit l2 norm in the forward pass.

    Spec ``{"type": "dense", "units": m, "normalize": true}``, the last layer only. The
    Parameter is the raw weight W (units, n_in); the forward pass multiplies by the
    effective weight V = W / ||W_i|| row-wise (a zero row stays zero), built from nn ops so
    the gradient flows through the normalisation. Everything downstream of the forward
    pass (the ⊥ head's K_ij, the rounding bounds, the provable bound, the export) uses V
    *as computed in the model dtype* (:meth:`effective_weight`: the same ops on the same
    array, so the same bits), never the real-arithmetic quotient: a certificate is about
    the network that the forward pass evaluates.
    """

    def __init__(self, in_shape, units):
        super().__init__(in_shape, units)
        self.spec = {"type": "dense", "units": units, "normalize": True}

    @staticmethod
    def normalised(w):
        """(units, n_in) Tensor -> the same with unit rows (l2_norm's scaled arithmetic)."""
        n = F.l2_norm(w, axis=1, keepdims=True)                           # (units, 1)
        # a zero row has no direction: divide it by 1 (it stays 0, gradient 1/1 · g)
        return w / F.where(n.data > 0, n, np.ones((), dtype=n.dtype))

    def forward(self, h, relu=False, bias=True):
        if h.ndim != 2:
            h = F.flatten(h)
        return F.dense(h, self.normalised(self.weight), self.bias if bias else None, relu=relu)

    def head_weight(self):
        return self.normalised(self.weight)

    def effective_weight(self):
        with no_grad():
            return self.normalised(Tensor(self.weight.data)).data


class LiResNet(Conv):
    """Linear residual block (LiResNet, Hu et al., NeurIPS 2023): y = x + conv(x) + b, SAME
    padding, stride 1, channels kept: in_shape (C, H, W), weight (C, C, k, k), k odd.

    The operator is I + A (A the conv). Its norm is estimated in training by the power
    method on I + A (:meth:`apply`, :meth:`adjoint`; no fused conv steps, which would miss
    the identity) and bounded at certification as the conv whose kernel is w plus the
    identity at the centre tap (k odd and SAME padding put the centre tap of output (i, j)
    on input (i, j)): bounds.conv_provable_bound of that kernel. 1 + ||A|| would be sound
    but loose (the residual may cancel part of x).

    Floating point: fl(fl(conv(x) + b) + x) is one sum of C k^2 + 2 terms (the products,
    x with weight 1, and b) in some order: the dot-product bound of fan-in C k^2 + 1.
    """

    kind, kernel = "liresnet", None
    keys = ("type", "kernel")
    required = ("kernel",)

    def __init__(self, in_shape, kernel):
        super().__init__(in_shape, int(in_shape[0]), kernel, 1, "same")
        self.spec = {"type": "liresnet", "kernel": kernel}

    @classmethod
    def from_spec(cls, d, i, in_shape):
        cls.check_keys(d, i)
        if len(in_shape) != 3:
            raise ValueError(f"layer {i}: liresnet needs a (C, H, W) input, got {tuple(in_shape)}")
        k = spec_int(d, i, "kernel")
        if k < 1 or k % 2 == 0:
            raise ValueError(f"layer {i}: liresnet needs an odd kernel >= 1 (its centre tap is the identity), got {k}")
        return cls.made(i, in_shape, k)

    @property
    def fan_in(self) -> int:
        return math.prod(self.w_shape[1:]) + 1   # the residual x is one more term

    def forward(self, h, relu=False, bias=True):
        y = F.conv2d(h, self.weight, self.bias if bias else None, 1, "same") + h
        return F.relu(y) if relu else y

    def apply(self, w, v):
        return super().apply(w, v) + v

    def adjoint(self, w, u):
        return super().adjoint(w, u) + u

    def adjoint_tensor(self, u):
        return super().adjoint_tensor(u) + u

    def raw_ops(self, w, v):
        fa, fb = super().raw_ops(w, v)
        return (lambda a: fa(a) + a), (lambda b: fb(b) + b)

    def _with_identity(self, w):
        """(w + I at the centre tap in float64, a bound on what that addition rounded away)."""
        w2 = np.array(w, dtype=np.float64)
        c = self.in_shape[0]
        k2 = (self.w_shape[2] // 2, self.w_shape[3] // 2)
        centre = w2[np.arange(c), np.arange(c), k2[0], k2[1]]
        total = centre + 1.0
        # TwoSum: the exact rounding error of centre + 1 (w + 1 of a 1e-30 weight rounds)
        bb = total - centre
        err = (centre - (total - bb)) + (1.0 - bb)
        w2[np.arange(c), np.arange(c), k2[0], k2[1]] = total
        return w2, float(np.max(np.abs(err))) if c else 0.0

    def provable(self, w, method="auto"):
        """(sound bound of ||I + A||_2, method): the conv bound of w + I at the centre tap,
        plus the norm of the rounding of that addition (a diagonal operator: its largest entry)."""
        w2, err = self._with_identity(w)
        bound, method = bounds.conv_provable_bound(w2, self.in_shape[1:], 1, "same", method)
        return (math.nextafter(bound + err, math.inf) if err else bound), method

    def abs_bound(self, w) -> float:
        """Schur bound of |W| + I (>= |W + I| entrywise)."""
        w2, _ = self._with_identity(np.abs(np.asarray(w, dtype=np.float64)))
        return rounding.abs_operator_bound(w2)

    def error_step(self, h, src, gamma):
        """Conv's step plus the residual: fl(conv h + b) + h, and |W| src + gamma |b| + src."""
        out, e = super().error_step(h, src, gamma)
        return out + h, e + src

    def torch_modules(self):
        """ZeroPad2d and a Conv2d whose kernel is w + I at the centre (in the model dtype:
        the same function up to the rounding of w + 1)."""
        mods = super().torch_modules()
        w = to_host(self.weight.data)
        mods[1][2]["weight"] = self._with_identity(w)[0].astype(w.dtype)
        return mods


class FixedLayer(Layer):
    """A linear layer without parameters (no weight, bias or power iterate) whose operator
    norm is known in closed form: :attr:`norm`, a float64 upper bound equal to the exact
    norm up to its rounding, is both its power estimate and its provable bound. Nothing
    of it goes into the checkpoint's arrays; the spec rebuilds it. The net's activation
    does not follow it (it reshapes or pools what the previous layer's activation gave).
    """

    parametric, activated = False, False
    norm = 1.0

    def __init__(self, in_shape, out_shape, spec):
        super().__init__(in_shape, out_shape, (), spec)

    @classmethod
    def image_shape(cls, d, i, in_shape) -> tuple:
        """The spec's keys checked and the (C, H, W) input, or a ValueError naming layer i."""
        cls.check_keys(d, i)
        if len(in_shape) != 3:
            raise ValueError(f"layer {i}: {cls.kind} needs a (C, H, W) input, got {tuple(in_shape)}")
        return tuple(int(v) for v in in_shape)

    def init_parameters(self, index, init, rng, dtype):
        pass

    def effective_weight(self):
        return None

    def sigma(self):
        return self.norm   # a constant: no gradient

    def sigma_unrolled(self, iters: int):
        return self.norm

    def array_shapes(self, i):
        return {}

    def state_arrays(self, i):
        return {}

    def load_arrays(self, i, arrays, dtype):
        pass

    def kernel_args(self, w, v):
        return ()

    def raw_ops(self, w, v):
        return (lambda a: self.apply(w, a)), (lambda b: self.adjoint(w, b))

    def provable(self, w=None, method="auto"):
        return self.norm, "exact"

    def abs_bound(self, w=None):
        return self.norm   # the entries of both fixed operators are >= 0: |A| = A


class InvDown(FixedLayer):
    """Invertible 2x2 downsampling (space-to-depth): (C, H, W) -> (4C, H/2, W/2), H and W even.

    Channel order (PyTorch's PixelUnshuffle(2)): out[4c + 2i + j, a, b] = in[c, 2a + i, 2b + j],
    i, j in {0, 1} the row and column offsets inside the 2x2 block. A permutation of the
    coordinates: orthogonal (A^T A = I), so ||A||_2 = 1, A^T = A^-1 (depth-to-space), and
    exact in floating point: values and their rounding-error bounds move together.
    """

    kind = "invdown"
    keys = ("type",)

    def __init__(self, in_shape):
        c, h, w = (int(v) for v in in_shape)
        if h % 2 or w % 2:
            raise ValueError(f"invdown needs an even height and width, got input (C, H, W) = {(c, h, w)}")
        super().__init__((c, h, w), (4 * c, h // 2, w // 2), {"type": "invdown"})

    @classmethod
    def from_spec(cls, d, i, in_shape):
        shape = cls.image_shape(d, i, in_shape)
        return cls.made(i, shape)

    @property
    def fan_in(self) -> int:
        return 1

    def _split(self, n):
        c, h, w = self.in_shape
        return (n, c, h // 2, 2, w // 2, 2)

    def forward(self, h, relu=False, bias=True):
        """(N, C, H, W) Tensor -> (N, 4C, H/2, W/2) (nn reshape/transpose: a permutation of the gradient too)."""
        t = F.transpose(F.reshape(h, self._split(h.shape[0])), (0, 1, 3, 5, 2, 4))
        return F.reshape(t, (h.shape[0],) + self.out_shape)

    def apply(self, w, v):
        """Space-to-depth on a raw array (N, *in_shape) -> (N, *out_shape)."""
        xp = array_module(v)
        t = v.reshape(self._split(v.shape[0])).transpose(0, 1, 3, 5, 2, 4)
        return xp.ascontiguousarray(t).reshape((v.shape[0],) + self.out_shape)

    def adjoint(self, w, u):
        """Depth-to-space, the inverse: (N, *out_shape) -> (N, *in_shape)."""
        xp = array_module(u)
        c, h, w_ = self.in_shape
        t = u.reshape(u.shape[0], c, 2, 2, h // 2, w_ // 2).transpose(0, 1, 4, 2, 5, 3)
        return xp.ascontiguousarray(t).reshape((u.shape[0],) + self.in_shape)

    def forward_error(self, h, e, dtype):
        """Exact: the computed output is the permuted input, its error bound the permuted bound."""
        out = self.apply(None, h)
        fine = array_module(h).isfinite(out)
        return out, self.apply(None, e), fine.reshape(fine.shape[0], -1).all(axis=1)

    def rounding_constants(self, sigma, dtype, last):
        """Norm 1, no rounding (gamma 0, no bias, nothing underflows)."""
        return rounding.LayerConstants(sigma, 1.0, 0.0, 0.0, 0.0, limit=float(np.finfo(dtype).max))

    def torch_modules(self):
        return [("PixelUnshuffle", {"downscale_factor": 2}, {})]


class AvgPool(FixedLayer):
    """Average pooling over non-overlapping s x s windows (stride = size = s), NCHW:
    (C, H, W) -> (C, H/s, W/s), H and W multiples of s.

    Its norm is exactly 1/s. Proof: output (c, a, b) is the row of A with the entry 1/s^2
    on the s^2 inputs of its window and 0 elsewhere. The windows are disjoint, so distinct
    rows have disjoint supports and A A^T is diagonal with entries s^2 (1/s^2)^2 = 1/s^2:
    A A^T = I / s^2, every singular value of A is 1/s, and ||A||_2 = 1/s. (The entries are
    >= 0, so the Schur bound of |A| = A is also 1/s.) :attr:`norm` is 1/s rounded up.

    Floating point: an output is fl(fl(sum of its s^2 inputs) / s^2) (a division by the
    exact integer s^2, not a multiplication by a rounded 1/s^2). With S the exact sum, the
    computed sum is S + d, |d| <= gamma_{s^2 - 1} sum |h| in any order, and the division
    adds one relative rounding: |y' - S / s^2| <= gamma_{s^2 + 1} mean |h|. That is the
    dot-product bound of a layer with fan-in s^2 (Layer.forward_error, :meth:`error_step`).
    """

    kind = "avgpool"
    keys = ("type", "size")
    required = ("size",)

    def __init__(self, in_shape, size):
        c, h, w = (int(v) for v in in_shape)
        s = int(size)
        if s < 1 or h % s or w % s:
            raise ValueError(f"avgpool of size {s} needs a height and width that are multiples of it, "
                             f"got input (C, H, W) = {(c, h, w)}")
        super().__init__((c, h, w), (c, h // s, w // s), {"type": "avgpool", "size": size})
        self.size = s
        q = 1.0 / s
        self.norm = q if Fraction(q) >= Fraction(1, s) else math.nextafter(q, math.inf)

    @classmethod
    def from_spec(cls, d, i, in_shape):
        shape = cls.image_shape(d, i, in_shape)
        size = spec_int(d, i, "size")
        return cls.made(i, shape, size)

    @property
    def fan_in(self) -> int:
        return self.size * self.size

    def _windows(self, n):
        c, h, w = self.in_shape
        s = self.size
        return (n, c, h // s, s, w // s, s)

    def forward(self, h, relu=False, bias=True):
        """(N, C, H, W) Tensor -> (N, C, H/s, W/s): window sums (nn sum) divided by s^2."""
        t = F.sum(F.reshape(h, self._windows(h.shape[0])), axis=(3, 5))
        return F.div(t, np.asarray(self.fan_in, dtype=h.dtype))

    def apply(self, w, v):
        """The same operations on a raw array (so the same bits as :meth:`forward`)."""
        return v.reshape(self._windows(v.shape[0])).sum(axis=(3, 5)) / v.dtype.type(self.fan_in)

    def adjoint(self, w, u):
        """Each output spread over its window, divided by s^2."""
        xp, s = array_module(u), self.size
        return xp.repeat(xp.repeat(u, s, axis=2), s, axis=3) / u.dtype.type(self.fan_in)

    def error_step(self, h, src, gamma):
        """(fl(avgpool h), avgpool src): A = |A| and there is no bias."""
        return self.apply(None, h), self.apply(None, src)

    def rounding_constants(self, sigma, dtype, last):
        """sigma = sigma_abs = 1/s, gamma of fan-in s^2, no bias; s^2 + 1 subnormals per output."""
        per_output = (self.fan_in + 1) * float(np.finfo(dtype).smallest_subnormal)
        underflow = per_output * math.sqrt(math.prod(self.out_shape)) * (1.0 + 1e-9)
        return rounding.LayerConstants(sigma * (1.0 + 1e-9), self.norm, rounding.gamma(self.fan_in, dtype), 0.0,
                                       underflow, limit=float(np.finfo(dtype).max))

    def torch_modules(self):
        return [("AvgPool2d", {"kernel_size": self.size, "stride": self.size}, {})]


class ReLU:
    """max(h, 0): exact, 1-Lipschitz per coordinate; fused into the preceding layer's node."""

    name, fusable = "relu", True

    def check(self, layer, i):
        pass

    def forward(self, h):
        return F.relu(h)

    def apply(self, h):
        """On a raw array (the rounding-error pass)."""
        return array_module(h).maximum(h, h.dtype.type(0))

    def propagate_error(self, e):
        """A per-coordinate error bound of the input bounds the output's (|relu a - relu b| <= |a - b|)."""
        return e

    def torch_modules(self):
        return [("ReLU", {}, {})]


class MinMax:
    """GroupSort-2 on axis 1: channel pairs (2k, 2k+1) sorted; exact and 1-Lipschitz per pair."""

    name, fusable = "minmax", False

    def check(self, layer, i):
        width = layer.out_shape[0]
        if width % 2:
            raise ValueError(f"layer {i}: MinMax needs an even width, got {width} ({layer.spec})")

    def forward(self, h):
        return F.minmax(h)

    def apply(self, h):
        return kernels.minmax(h)

    def propagate_error(self, e):
        """Both outputs of a pair get the pair's larger input error."""
        xp = array_module(e)
        n2 = e.shape[1] // 2
        ep = e.reshape((e.shape[0], n2, 2) + e.shape[2:]).max(axis=2, keepdims=True)
        return xp.repeat(ep, 2, axis=2).reshape(e.shape)

    def torch_modules(self):
        raise NotImplementedError("torch.nn has no MinMax (GroupSort-2) module")


LAYER_TYPES = {"conv": Conv, "dense": Dense, "invdown": InvDown, "avgpool": AvgPool,
               "liresnet": LiResNet}
ACTIVATIONS = {"relu": ReLU, "minmax": MinMax}


def activation(name):
    """The activation object for a name in ACTIVATIONS."""
    # isinstance first: a list or dict (e.g. from a checkpoint's meta) is unhashable
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def build(specs, input_shape, num_classes, act) -> list:
    """Validated layers (without parameters) from the checkpoint's layer-spec list.

    act: the activation after every layer but the last (its width rules are checked here).
    The last layer must be dense with num_classes units: its rows are the ⊥ head's w_i.
    """
    if not isinstance(specs, (list, tuple)) or not specs:
        raise ValueError(f"layers must be a non-empty list of layer dicts, got {specs!r}")
    out, shape = [], tuple(input_shape)
    for i, d in enumerate(specs):
        if not isinstance(d, dict) or "type" not in d:
            raise ValueError(f"layer {i}: expected a dict with a 'type', got {d!r}")
        cls = LAYER_TYPES.get(d["type"]) if isinstance(d["type"], str) else None
        if cls is None:
            expected = " or ".join(repr(k) for k in LAYER_TYPES)
            raise ValueError(f"layer {i}: unknown layer type {d['type']!r} (expected {expected})")
        layer = cls.from_spec(d, i, shape)
        if i < len(specs) - 1 and isinstance(layer, NormalizedDense):
            raise ValueError(f"layer {i}: 'normalize' is for the last (dense) layer only, got {d!r}")
        if i < len(specs) - 1 and layer.activated:
            act.check(layer, i)
        out.append(layer)
        shape = layer.out_shape
    if not isinstance(out[-1], Dense):
        raise ValueError(f"the last layer must be dense with units = num_classes, got {out[-1].spec}")
    if out[-1].out_shape[0] != num_classes:
        raise ValueError(f"the last dense layer has {out[-1].out_shape[0]} units but num_classes = {num_classes}")
    return out

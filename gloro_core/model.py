"""The GloRo net: a conv/dense network f, its Lipschitz bounds and the ⊥ logit.

``GloroNet(input_shape, num_classes, layers, activation, init, eps, variant, seed, dtype,
power_iters, lam, eps_train)``: eps is the radius certified by default, eps_train (default
eps) the one the loss uses by default.

* ``layers``: the checkpoint's layer-spec list, final dense included, e.g.
  ``[{"type": "conv", "filters": 16, "kernel": 4, "stride": 2, "padding": "same"},
  {"type": "dense", "units": 100}, {"type": "dense", "units": 10}]``. The activation
  (ReLU or MinMax) follows every layer but the last; a flatten (C, H, W order) sits
  before the first dense layer.
* Training (nn autodiff): :meth:`loss`, :meth:`standard_loss`, :meth:`gradients`; the
  training K_sub is the product of power-method estimates sigma_i = ||A_i v_i|| with the
  stored iterates v_i held constant (a few power steps update them first, no gradient).
* Evaluation (NumPy, no graph): :meth:`logits`, :meth:`gloro_logits`, :meth:`certify`
  use a *frozen* K computed by :meth:`update_lipschitz` (power method to convergence plus
  provable float64 bounds, cached on a hash of the weights). Certification uses the
  provable bound unless ``bound="power"`` is asked for (then it is not a proof).

What a certificate means (see :meth:`gloro_logits`): the network evaluated in exact real
arithmetic with the stored weights, f, satisfies argmax f(x') = j for every
||x' - x||_2 <= eps. The float32 forward pass differs from f by at most a rounding
error that we bound per logit and subtract from the margin: cheaply from norms
(gloro_core/rounding.py) and, where that leaves the decision open, tightly with a
float64 pass over |W| (:meth:`_forward_with_error`).
"""
from __future__ import annotations

import hashlib
import math
import numbers

import numpy as np

import kernels
from kernels.registry import array_module, is_gpu_array, to_host
from nn import functions as F
from nn import init as nn_init
from nn.tensor import Parameter, Tensor, no_grad

from . import bounds, checkpoint, decision, losses, rounding
from .lipschitz import LinearOp, converge, init_iterate, power_update_layers

ACTIVATIONS = ("relu", "minmax")
INITS = {"glorot_uniform": "glorot_uniform", "glorot": "glorot_uniform", "orthogonal": "orthogonal"}
DEFAULT_POWER_ITERS = 5
DEFAULT_MAX_ITER = 2000
_TINY64 = bounds.TINY


def _check_real(value, name) -> float:
    """value as a float: real numbers only (float() would take "0.3" and True), finite, >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def _check_eps(eps) -> float:
    return _check_real(eps, "eps")


def _check_int(value, name) -> int:
    """value as a Python int: ints only (int() would truncate 4.9 and take "4" and True)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_input_shape(input_shape) -> tuple:
    if not isinstance(input_shape, (list, tuple)):
        raise TypeError(f"input_shape must be a tuple (C, H, W) (or (features,)), got {input_shape!r}")
    try:
        shape = tuple(_check_int(v, "") for v in input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) (or (features,)) of positive ints, got {input_shape!r}")
    return shape


def _check_num_classes(num_classes) -> int:
    m = _check_int(num_classes, "num_classes")
    if m < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return m


def _spec_int(d, i, key, default=None) -> int:
    """Layer i's d[key] as a Python int. Strict: int() would turn a padding of 1.7 into 1
    and a filters of True into 1; integral floats (4.0) are refused too (our checkpoints
    and architecture parsers write ints)."""
    try:
        return _check_int(d.get(key, default), f"layer {i}: {key!r}")
    except TypeError as exc:   # a bad spec is a ValueError, as every other spec error
        raise ValueError(str(exc)) from None


def _normalise_specs(layers, input_shape, num_classes, activation):
    """Validated copies of the layer specs and their LinearOps."""
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"layers must be a non-empty list of layer dicts, got {layers!r}")
    specs, ops = [], []
    shape = tuple(input_shape)
    seen_dense = False
    for i, d in enumerate(layers):
        if not isinstance(d, dict) or "type" not in d:
            raise ValueError(f"layer {i}: expected a dict with a 'type', got {d!r}")
        t = d["type"]
        if t == "conv":
            unknown = set(d) - {"type", "filters", "kernel", "stride", "padding"}
            if unknown:
                raise ValueError(f"layer {i}: unknown conv keys {sorted(unknown)}")
            if seen_dense:
                raise ValueError(f"layer {i}: a conv layer cannot follow a dense layer")
            if len(shape) != 3:
                raise ValueError(f"layer {i}: conv needs a (C, H, W) input, got input_shape {tuple(input_shape)}")
            for key in ("filters", "kernel"):
                if key not in d:
                    raise ValueError(f"layer {i}: conv spec needs {key!r}: {d!r}")
            filters, kernel, stride = (_spec_int(d, i, "filters"), _spec_int(d, i, "kernel"),
                                       _spec_int(d, i, "stride", 1))
            padding = d.get("padding", "same")
            if isinstance(padding, str):
                padding = padding.lower()
                if padding not in ("same", "valid"):
                    raise ValueError(f"layer {i}: 'padding' must be 'same', 'valid' or an int, got {padding!r}")
            else:
                padding = _spec_int(d, i, "padding")
                if padding < 0:
                    raise ValueError(f"layer {i}: 'padding' must be >= 0, got {padding}")
            if filters < 1 or kernel < 1 or stride < 1:
                raise ValueError(f"layer {i}: filters, kernel and stride must be >= 1, got {d!r}")
            try:
                op = LinearOp.conv(shape, filters, kernel, stride, padding)
            except ValueError as exc:  # e.g. a kernel larger than the padded input
                raise ValueError(f"layer {i}: {exc}") from None
            spec = {"type": "conv", "filters": filters, "kernel": kernel, "stride": stride, "padding": padding}
        elif t == "dense":
            unknown = set(d) - {"type", "units"}
            if unknown:
                raise ValueError(f"layer {i}: unknown dense keys {sorted(unknown)}")
            if "units" not in d:
                raise ValueError(f"layer {i}: dense spec needs 'units': {d!r}")
            units = _spec_int(d, i, "units")
            if units < 1:
                raise ValueError(f"layer {i}: units must be >= 1, got {units}")
            seen_dense = True
            op = LinearOp.dense(math.prod(shape), units)  # exact: np.prod wraps at 2**63
            spec = {"type": "dense", "units": units}
        else:
            raise ValueError(f"layer {i}: unknown layer type {t!r} (expected 'conv' or 'dense')")
        last = i == len(layers) - 1
        width = op.out_shape[0]
        if activation == "minmax" and not last and width % 2:
            raise ValueError(f"layer {i}: MinMax needs an even width, got {width} ({spec})")
        specs.append(spec)
        ops.append(op)
        shape = op.out_shape
    if specs[-1]["type"] != "dense":
        raise ValueError(f"the last layer must be dense with units = num_classes, got {specs[-1]}")
    if specs[-1]["units"] != num_classes:
        raise ValueError(f"the last dense layer has {specs[-1]['units']} units but num_classes = {num_classes}")
    return specs, ops


class GloroNet:
    """A GloRo net (see the module docstring)."""

    def __init__(self, input_shape, num_classes, layers, activation="relu", init="glorot_uniform",
                 eps=0.3, variant="margin", seed=0, dtype=np.float32, power_iters=DEFAULT_POWER_ITERS,
                 lam=1.0, eps_train=None, _init_params=True):
        self.input_shape = _check_input_shape(input_shape)
        self.num_classes = _check_num_classes(num_classes)
        # isinstance first: a list or dict (e.g. from a checkpoint's meta) is unhashable
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not isinstance(init, str) or init not in INITS:
            raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
        if not isinstance(variant, str) or variant not in losses.VARIANTS:
            raise ValueError(f"variant must be one of {losses.VARIANTS}, got {variant!r}")
        try:
            self.dtype = np.dtype(dtype) if dtype is not None else None  # np.dtype(None) is float64
        except (TypeError, ValueError):
            self.dtype = None
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
        self.seed = _check_int(seed, "seed")
        self.power_iters = _check_int(power_iters, "power_iters")
        if self.seed < 0 or self.power_iters < 0:
            raise ValueError(f"seed and power_iters must be >= 0, got {seed} and {power_iters}")
        self.activation, self.init, self.variant = activation, INITS[init], variant
        # eps: the radius certified by default (eps_test); eps_train: the loss's default
        self.eps = _check_eps(eps)
        self.eps_train = self.eps if eps_train is None else _check_real(eps_train, "eps_train")
        self.lam = _check_real(lam, "lam")
        self.layers, self.ops = _normalise_specs(layers, self.input_shape, self.num_classes, activation)
        self.extra = {}
        rng = np.random.default_rng(self.seed)
        self.params = []  # [(W, b)] as nn Parameters
        ini = nn_init.get(self.init)
        for i, op in enumerate(self.ops):
            w = ini(op.w_shape, rng, dtype=self.dtype) if _init_params else np.zeros(op.w_shape, self.dtype)
            b = np.zeros((op.w_shape[0],), dtype=self.dtype)
            self.params.append((Parameter(w, name=f"param.{i}.weight"), Parameter(b, name=f"param.{i}.bias")))
        # load() (the only _init_params=False caller) overwrites both: zeros are not touched
        self.iterates = [init_iterate(op, rng, self.dtype) if _init_params else np.zeros(op.iterate_shape, self.dtype)
                         for op in self.ops]
        self.last_certification = None
        self.provable_method = "auto"
        self._frozen = None      # dict of frozen Lipschitz numbers (see update_lipschitz)
        self._provable_cache = {}  # layer index -> (weight digest, bound, method)

    # ------------------------------------------------------------------ parameters
    def named_parameters(self):
        """[(name, Parameter)] in order: param.0.weight, param.0.bias, param.1.weight, ..."""
        out = []
        for w, b in self.params:
            out += [(w.name, w), (b.name, b)]
        return out

    def parameters(self):
        """The Parameters, for the optimizer (same order as named_parameters)."""
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    @property
    def num_layers(self) -> int:
        return len(self.ops)

    @property
    def xp(self):
        """numpy or cupy: where the parameters live."""
        return array_module(self.params[0][0].data)

    @property
    def device(self) -> str:
        return "gpu" if is_gpu_array(self.params[0][0].data) else "cpu"

    def to(self, device: str) -> "GloroNet":
        """Move parameters and power iterates to "cpu" (NumPy) or "gpu" (CuPy); returns self.

        Inputs may then be NumPy or CuPy arrays; logits/certify still return NumPy arrays.
        """
        dev = str(device).lower()
        if dev not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if dev == "gpu":
            import cupy

            conv = cupy.asarray
        else:
            conv = to_host
        for w, b in self.params:
            w.data, b.data = conv(w.data), conv(b.data)
            w.grad = b.grad = None
        self.iterates = [conv(v) for v in self.iterates]
        return self

    def _weight_digest(self, i) -> str:
        w = np.ascontiguousarray(to_host(self.params[i][0].data))
        return hashlib.blake2b(w.tobytes(), digest_size=16).hexdigest() + str(w.dtype) + str(w.shape)

    def _unchanged(self, arrays, snapshot) -> bool:
        """True if every array still equals its ``snapshot`` copy exactly (the frozen
        numbers are stale otherwise; an exact compare costs ~10x less than re-hashing)."""
        xp = self.xp
        return all(is_gpu_array(a) == is_gpu_array(s) and a.shape == s.shape and a.dtype == s.dtype
                   and bool(xp.array_equal(a, s)) for a, s in zip(arrays, snapshot))

    def weights_version(self) -> str:
        """A hash of every weight (biases do not enter K): the frozen-K cache key."""
        h = hashlib.blake2b(digest_size=16)
        for w, _ in self.params:
            h.update(np.ascontiguousarray(to_host(w.data)))  # buffer protocol: no copy
        return h.hexdigest()

    # ------------------------------------------------------------------ input checks
    def _check_x(self, x, name="x"):
        """x as the model dtype on the model's device, shape (n, *input_shape); plus the original."""
        if isinstance(x, Tensor):
            x = x.data
        x = x if is_gpu_array(x) else np.asarray(x)
        if x.dtype.kind != "f":
            # uint8 images in 0..255 would be taken as is: radii 255x too large
            raise TypeError(f"{name} must be a float array of images in [0, 1], got dtype {x.dtype}; "
                            f"convert integer images first, e.g. {name} / 255.0")
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{name} must have shape (n, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        xp = self.xp
        x = xp.asarray(x)
        if not bool(xp.all(xp.isfinite(x))):
            raise ValueError(f"{name} contains NaN or inf")
        return xp.ascontiguousarray(x, dtype=self.dtype), x

    def _check_labels(self, y, n):
        y = np.asarray(to_host(y))
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise ValueError(f"labels must be ints of shape ({n},), got dtype {y.dtype} shape {y.shape}")
        if n and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got [{y.min()}, {y.max()}]")
        return y.astype(np.int64)

    # ------------------------------------------------------------------ forward (autodiff)
    def _act(self, h):
        return F.relu(h) if self.activation == "relu" else F.minmax(h)

    def forward(self, x) -> Tensor:
        """f(x) as an nn Tensor (n, m). x: Tensor or array of shape (n, *input_shape)."""
        h = x if isinstance(x, Tensor) else Tensor(self._check_x(x)[0])
        last = self.num_layers - 1
        for i, (op, (w, b)) in enumerate(zip(self.ops, self.params)):
            # ReLU fused into the layer's node (in place: no pre-activation kept or copied)
            fuse = i < last and self.activation == "relu"
            if op.kind == "conv":
                h = F.conv2d(h, w, b, op.stride, op.padding, relu=fuse)
            else:
                if h.ndim != 2:
                    h = F.flatten(h)
                h = F.dense(h, w, b, relu=fuse)
            if i < last and not fuse:
                h = self._act(h)
        return h

    def logits(self, x) -> np.ndarray:
        """f(x): (n, m) NumPy array of the model dtype."""
        with no_grad():
            return to_host(self.forward(x).data)

    # ------------------------------------------------------------------ training K
    def power_update(self, iters: int):
        """Run ``iters`` power steps on every stored iterate (no gradient)."""
        self.iterates = power_update_layers(self.ops, [w.data for w, _ in self.params], self.iterates, iters)

    def layer_sigmas(self, upto=None):
        """[sigma_i = ||A_i v_i||] as Tensors with v_i constant: the gradient w.r.t. W_i only.

        Layers 0 .. upto-1 (default all)."""
        out = []
        for i, op in enumerate(self.ops[:upto]):
            v = Tensor(self.iterates[i])
            w = self.params[i][0]
            av = F.conv2d(v, w, None, op.stride, op.padding) if op.kind == "conv" else F.dense(v, w, None)
            out.append(F.l2_norm(av))
        return out

    def k_sub_tensor(self) -> Tensor:
        """Training K_sub = prod of sigma_i over all layers but the last (a scalar Tensor)."""
        k = Tensor(self.xp.ones((), dtype=self.dtype))
        for s in self.layer_sigmas(upto=self.num_layers - 1):
            k = k * s
        return k

    def gloro_logits_tensor(self, x, eps=None) -> Tensor:
        """Differentiable (n, m+1) GloRo logits with the training K (no power steps);
        eps defaults to eps_train."""
        eps = self.eps_train if eps is None else _check_eps(eps)
        y = self.forward(x)
        return losses.gloro_logits(y, self.params[-1][0], self.k_sub_tensor(), eps, self.variant)

    def loss(self, x, y, loss="ce", eps=None, lam=None, power_iters=None, trades_form="kl") -> Tensor:
        """Scalar training loss (nn Tensor) at eps (default eps_train). Runs ``power_iters``
        power steps first.

        loss "ce": CE on the m+1 GloRo logits; "trades": CE(f(x), y) + lam * L(f̄(x), softmax f(x))
        with L = KL (trades_form="kl") or CE ("ce").
        """
        if loss not in ("ce", "trades"):
            raise ValueError(f"loss must be 'ce' or 'trades', got {loss!r}")
        eps = self.eps_train if eps is None else _check_eps(eps)
        iters = self.power_iters if power_iters is None else int(power_iters)
        xd, _ = self._check_x(x)
        lab = self._check_labels(y, xd.shape[0])
        if iters:
            self.power_update(iters)
        f = self.forward(Tensor(xd))
        gl = losses.gloro_logits(f, self.params[-1][0], self.k_sub_tensor(), eps, self.variant)
        if loss == "ce":
            return losses.gloro_ce(gl, lab)
        lam = self.lam if lam is None else _check_real(lam, "lam")
        return losses.trades(f, gl, lab, lam, trades_form)

    def standard_loss(self, x, y) -> Tensor:
        """Plain CE on f (no ⊥, no power method): warm-up and the overhead baseline."""
        xd, _ = self._check_x(x)
        lab = self._check_labels(y, xd.shape[0])
        return losses.cross_entropy(self.forward(Tensor(xd)), lab)

    def gradients(self, x, y, loss="ce", eps=None, lam=None, power_iters=0, trades_form="kl"):
        """(loss value, {"param.{i}.weight": grad, ...}); power_iters=0 keeps the iterates."""
        self.zero_grad()
        if loss == "standard":
            val = self.standard_loss(x, y)
        else:
            val = self.loss(x, y, loss, eps, lam, power_iters, trades_form)
        val.backward()
        grads = {}
        for name, p in self.named_parameters():
            grads[name] = to_host(p.grad).copy() if p.grad is not None else np.zeros(p.shape, p.dtype)
        self.zero_grad()
        return float(val.item()), grads

    # ------------------------------------------------------------------ frozen K
    def update_lipschitz(self, tol=1e-5, max_iter=DEFAULT_MAX_ITER, provable=True, provable_method=None):
        """Converge every iterate (float64 power method), freeze K and compute provable bounds.

        provable_method for convs: "auto" (default: the exact norm of the explicit operator
        where it is small, see bounds.conv_provable_bound, else the FFT bound), "fft" or
        "explicit"; it sticks for later automatic refreshes. Provable bounds are cached per
        layer on a hash of its weight (and the method). Returns lipschitz().
        """
        if provable_method is not None:
            if provable_method not in ("auto", "fft", "explicit"):
                raise ValueError(f"provable_method must be 'auto', 'fft' or 'explicit', got {provable_method!r}")
            self.provable_method = provable_method
        power, iters, conv = [], [], []
        for i, op in enumerate(self.ops):
            v, s, it, ok = converge(op, self.params[i][0].data, self.iterates[i], tol, max_iter)
            self.iterates[i] = self.xp.ascontiguousarray(v, dtype=self.dtype)
            power.append(s)
            iters.append(it)
            conv.append(ok)
        prov, methods = [], []
        for i, op in enumerate(self.ops):
            if not provable:
                prov.append(float("nan"))
                methods.append("none")
                continue
            dig = self._weight_digest(i) + self.provable_method
            hit = self._provable_cache.get(i)
            if hit is None or hit[0] != dig:
                bound, method = op.provable(to_host(self.params[i][0].data), self.provable_method)
                hit = (dig, bound, method)
                self._provable_cache[i] = hit
            prov.append(hit[1])
            methods.append(hit[2])
        self._frozen = {
            "version": self.weights_version(),
            "weights": [w.data.copy() for w, _ in self.params],  # what "version" hashes
            "power": power,
            "provable": prov,
            "methods": methods,
            "power_iters": iters,
            "converged": conv,
            "tol": float(tol),
            "pair_k": {},  # (variant, bound) -> _pair_k(k_sub); the last layer is in "weights"
            # K_sub as (mantissa, exponent), rounded up: np.prod underflows to 0 (and a
            # certificate with K = 0 has an infinite radius); the floats are for reports
            "k_sub_scaled": {"power": bounds.product_up(power[:-1]),
                             "provable": bounds.product_up(prov[:-1])},
            "k_sub_power": float(np.prod(power[:-1])) if len(power) > 1 else 1.0,
            "k_sub_provable": float(np.prod(prov[:-1])) if len(prov) > 1 else 1.0,
        }
        return self.lipschitz()

    def _fresh_frozen(self):
        """The frozen numbers, recomputed when the weights changed since they were frozen."""
        if self._frozen is None or not self._unchanged([w.data for w, _ in self.params], self._frozen["weights"]) or \
                any(m == "none" for m in self._frozen["methods"]):
            self.update_lipschitz(tol=self._frozen["tol"] if self._frozen else 1e-5)
        return self._frozen

    def lipschitz(self, bound="provable") -> dict:
        """Frozen Lipschitz numbers: k_sub (the one certification uses), bound, per layer."""
        if bound not in ("provable", "power"):
            raise ValueError(f"bound must be 'provable' or 'power', got {bound!r}")
        fr = self._fresh_frozen()
        layers = []
        for i in range(self.num_layers):
            p, q = fr["power"][i], fr["provable"][i]
            layers.append({"kind": self.ops[i].kind, "power": p, "provable": q, "method": fr["methods"][i],
                           "ratio": (p / q) if q > 0 else float("nan"),
                           "power_iters": fr["power_iters"][i], "converged": fr["converged"][i]})
        return {"k_sub": fr["k_sub_provable"] if bound == "provable" else fr["k_sub_power"],
                "bound": bound, "layers": layers,
                "k_sub_power": fr["k_sub_power"], "k_sub_provable": fr["k_sub_provable"],
                "version": fr["version"]}

    # ------------------------------------------------------------------ certification
    def _forward_with_error(self, x):
        """Logits in the model dtype plus a per-logit bound on their rounding error.

        x (n, *input_shape) -> (y (n, m) model dtype, err (n, m) float64) such that the
        exact-arithmetic network satisfies |f(x)_i - y_i| <= err_i.

        Per linear layer with computed input h (exact values of the model dtype) and
        input error e: the computed output ŷ = fl(W h + b) obeys the standard dot-product
        bound |ŷ - (W h + b)| <= gamma_{k+1} (|W| |h| + |b|) + (k+1) tiny, gamma_k =
        k u / (1 - k u), u the unit roundoff, k the fan-in (any summation order, FMA or
        not), tiny the smallest subnormal (products that underflow), and the
        exact output differs by |W| e more. So e_out = |W| (e + gamma |h|) + gamma |b|,
        evaluated in float64 and inflated by 1e-6 relative and (k+1) float64 subnormals
        for float64's own rounding and underflow. ReLU and MinMax are exact and
        1-Lipschitz per coordinate (MinMax per pair: both outputs get the pair's larger
        error). A float64 input cast to float32 adds |x - fl32(x)| at the input.

        Overflow: every partial sum of an output is at most |W| |h| + |b| <= e_out /
        gamma, so a row whose e_out (1 + gamma) / gamma may pass the dtype's largest value
        (or whose computed output is not finite) may have overflowed: its error is inf.
        """
        xd, xorig = self._check_x(x)
        xp = self.xp
        u = float(np.finfo(self.dtype).eps) / 2.0
        tiny = float(np.finfo(self.dtype).smallest_subnormal)
        limit = float(np.finfo(self.dtype).max)
        e = xp.abs(xorig.astype(np.float64) - xd.astype(np.float64))
        h = xd
        bad = xp.zeros(xd.shape[0], dtype=bool)
        last = self.num_layers - 1
        for i, (op, (w, b)) in enumerate(zip(self.ops, self.params)):
            wd, bd = w.data, b.data
            fan = int(np.prod(op.w_shape[1:])) + 1
            gamma = fan * u / (1.0 - fan * u)
            aw = xp.abs(wd.astype(np.float64))
            src = e + gamma * xp.abs(h.astype(np.float64)) + _TINY64   # (gamma |h| may underflow)
            if op.kind == "conv":
                h = kernels.conv2d(h, wd, bd, op.stride, op.padding)
                e = kernels.conv2d(src, aw, None, op.stride, op.padding)
                e += (gamma * xp.abs(bd.astype(np.float64)))[None, :, None, None]
            else:
                if h.ndim != 2:
                    h = h.reshape(h.shape[0], -1)
                    src = src.reshape(src.shape[0], -1)
                h = kernels.dense(h, wd, bd)
                e = kernels.dense(src, aw, None) + gamma * xp.abs(bd.astype(np.float64))[None, :]
            e += fan * tiny + fan * _TINY64  # products that underflow, in the model and here
            e *= 1.0 + 1e-6
            with np.errstate(over="ignore", invalid="ignore"):
                fine = xp.isfinite(h) & (e * ((1.0 + gamma) / gamma * (1.0 + 1e-6)) <= limit)
            bad |= ~fine.reshape(fine.shape[0], -1).all(axis=1)
            if i < last:
                if self.activation == "relu":
                    h = xp.maximum(h, h.dtype.type(0))
                else:
                    h = kernels.minmax(h)
                    n2 = e.shape[1] // 2
                    ep = e.reshape((e.shape[0], n2, 2) + e.shape[2:]).max(axis=2, keepdims=True)
                    e = xp.repeat(ep, 2, axis=2).reshape(e.shape)
        e[bad] = np.inf
        return to_host(h), to_host(e)

    def _pair_k(self, k_sub):
        """(m, m) float64: K[j, i] bounding the Lipschitz constant of f_j - f_i (diag unused).

        k_sub: a float, or (mantissa, exponent) from bounds.product_up. Computed on the
        last weight scaled by a power of two and scaled back rounding up, so that no
        scale of weights makes a K_ij of a nonzero pair 0 (or NaN from 0 * inf)."""
        km, ke = k_sub if isinstance(k_sub, tuple) else bounds.product_up([k_sub])
        w, we = bounds.pow2_normalise(to_host(self.params[-1][0].data))
        m, d = w.shape
        if self.variant == "margin":
            sq = np.empty((m, m), dtype=np.float64)
            for j in range(m):
                sq[j] = ((w[j][None, :] - w) ** 2).sum(axis=1)
        else:
            sq = (w ** 2).sum(axis=1)
        # the d squares that may underflow lose < 1 subnormal each; SAFETY_REL covers the
        # float64 rounding of the differences, sums, square roots and products
        norms = np.sqrt(sq + d * _TINY64) * (1.0 + bounds.SAFETY_REL)
        if self.variant != "margin":
            norms = norms[:, None] + norms[None, :]
        with np.errstate(invalid="ignore"):
            kk = norms * km * (1.0 + bounds.SAFETY_REL)
        return bounds.ldexp_up_array(kk, ke + we)

    def _forward_norm_error(self, x, fr):
        """Logits in the model dtype plus the cheap norm-wise rounding bound (rounding.py).

        x (n, *input_shape) -> (y (n, m) model dtype on the host, err (n, m) float64).
        Costs one ordinary forward pass plus O(n·d) on the input.
        """
        xd, xorig = self._check_x(x)
        n, dim = xd.shape[0], math.prod(self.input_shape)  # reshape(0, -1) fails: empty batches
        # one Numba pass, 0.06 ms at 2C2F b1024: on a pool thread next to the forward pass it
        # competed with the forward's two threads (certify/plain 1.050 vs 1.027 inline)
        sq = rounding.sq_norms(xd.reshape(n, dim))
        with no_grad():
            y = to_host(self.forward(Tensor(xd)).data)
        if xorig.dtype == xd.dtype:
            e_in = np.zeros(n)
        else:  # the cast to the model dtype is the first rounding
            d = to_host(xorig).reshape(n, dim).astype(np.float64) - to_host(xd).reshape(n, dim).astype(np.float64)
            e_in = np.sqrt(rounding.sq_norms(d)) * (1.0 + 1e-9)  # (squares of tiny d underflow)
        return y, rounding.logit_error_bound(self._rounding_constants(fr), sq, e_in)

    def _rounding_constants(self, fr):
        """Per-layer constants of the norm-wise bound, cached with the frozen numbers."""
        # biases enter the rounding bound (not K): the cache also keeps a copy of them
        key = (fr["version"], tuple(fr["provable"]), tuple(fr["power"]))
        biases = [b.data for _, b in self.params]
        cached = getattr(self, "_rounding_cache", None)
        if cached is None or cached[0] != key or not self._unchanged(biases, cached[2]):
            last = self.num_layers - 1
            consts = []
            for i, (op, (w, b)) in enumerate(zip(self.ops, self.params)):
                # the provable bound; a power estimate that overflowed (inf, NaN) is no norm
                p = fr["power"][i]
                sigma = max(fr["provable"][i], p) if math.isfinite(p) else fr["provable"][i]
                positions = int(np.prod(op.out_shape[1:])) if op.kind == "conv" else 1
                consts.append(rounding.layer_constants(op.kind, to_host(w.data), to_host(b.data), positions,
                                                       sigma, self.dtype, last=i == last))
            cached = self._rounding_cache = (key, consts, [b.copy() for b in biases])
        return cached[1]

    def _certify_core(self, x, eps, bound, tight_rows="open"):
        """The ⊥ logit, certification and radii under two rigorous rounding bounds.

        First the cheap norm-wise bound (:meth:`_forward_norm_error`, costs a forward
        pass); then the tight per-coordinate bound (:meth:`_forward_with_error`, about two
        more) on ``tight_rows``: "open" (the points certified without any slack but not
        with the cheap one: the only ones whose decision it can change) or "all" (tight
        radii everywhere). Both bounds are proofs, each for the logits of its own pass, so
        a point certified by either is certified (with that pass's logits and y_⊥), and its
        radius is the larger of the two.
        """
        eps = self.eps if eps is None else _check_eps(eps)
        if bound not in ("provable", "power"):
            raise ValueError(f"bound must be 'provable' or 'power', got {bound!r}")
        fr = self._fresh_frozen()
        k_sub = fr["k_sub_provable"] if bound == "provable" else fr["k_sub_power"]
        # which bound the last certificate rests on (a proof only for "provable")
        self.last_certification = {"bound": bound, "k_sub": k_sub, "eps": eps, "proof": bound == "provable",
                                   "methods": list(fr["methods"]), "version": fr["version"]}
        k_pair = fr["pair_k"].get((self.variant, bound))
        if k_pair is None:
            k_pair = fr["pair_k"][(self.variant, bound)] = self._pair_k(fr["k_sub_scaled"][bound])
            k_pair.setflags(write=False)
        y, err = self._forward_norm_error(x, fr)
        y64 = y.astype(np.float64)
        j, ybot, cert, radius, bare_cert = decision.decide(y64, err, k_pair, eps)
        if tight_rows == "all":
            rows = np.arange(len(y64))
        else:
            rows = np.flatnonzero(~cert & bare_cert)
        if rows.size:
            # the tight bound holds for the logits of its own pass (a batch of other size
            # may run other kernels and round differently), so it decides with those
            xs = x.data if isinstance(x, Tensor) else x
            xs = xs if is_gpu_array(xs) else np.asarray(xs)   # lists too
            y2, err2 = self._forward_with_error(xs if rows.size == len(y64) else xs[rows])
            y2 = y2.astype(np.float64)
            j2, ybot2, cert2, radius2, _ = decision.decide(y2, err2, k_pair, eps)
            take = cert2 | ~cert[rows]
            tr = rows[take]
            y64[tr], j[tr], ybot[tr], cert[tr] = y2[take], j2[take], ybot2[take], cert2[take]
            radius[rows] = np.maximum(radius[rows], radius2)  # each a rigorous lower bound
        return y64, ybot, j, cert, radius, eps

    def gloro_logits(self, x, eps=None, bound="provable") -> np.ndarray:
        """(n, m+1) float64: f(x) and y_⊥ with the frozen K (provable by default).

        y_⊥ = max_{i≠j} y_i + e_i + e_j + eps K_ij (margin variant; basic: K_i + K_j), with
        e a rigorous rounding-error bound (the cheap norm-wise one, or the tight one of
        :meth:`_forward_with_error` where the decision needs it), j the first argmax, so
        argmax of the result (first maximum) is j exactly when x is certified: where
        y_⊥ ties y_j, y_⊥ is nudged one ulp up so that the tie goes to ⊥.
        """
        y64, ybot, j, cert, _, _ = self._certify_core(x, eps, bound)
        yj = y64[np.arange(len(j)), j]
        ybot = np.where(cert, ybot, np.maximum(ybot, np.nextafter(yj, np.inf)))
        return np.concatenate([y64, ybot[:, None]], axis=1)

    def certify(self, x, eps=None, bound="provable", tight_radius=True):
        """(pred (n,) int, radius (n,) float64): pred is the class or -1 for ⊥.

        radius = min_{i≠j} (y_j - y_i - e_i - e_j) / K_ij >= 0 (rounding slack e, see
        gloro_logits), at most eps where pred is -1, and 0 where the pass overflowed;
        pred = j iff y_j > y_⊥ (strict). bound="provable" (default, a
        proof) or "power" (converged power method: an estimate from below, not a proof).
        ``net.last_certification`` then says which bound (and K_sub, eps) was used.
        tight_radius=True (default) evaluates the tight per-coordinate rounding bound on
        every point, so radii are within float32 rounding of the exact margin / K_ij;
        False uses it only where the certification decision needs it (about one forward
        pass in all; radii are then lower by up to the cheap norm-wise slack / K_ij,
        typically 1e-4 to 1e-3). The predictions are the same either way.
        """
        _, _, j, cert, radius, _ = self._certify_core(x, eps, bound, "all" if tight_radius else "open")
        return np.where(cert, j, -1).astype(np.int64), radius

    def predict(self, x) -> np.ndarray:
        """argmax f(x) by index, (n,)."""
        return self.logits(x).argmax(axis=1)

    # ------------------------------------------------------------------ checkpoints
    def meta(self) -> dict:
        fr = self._frozen
        lip = None
        if fr is not None:
            lip = {k: fr[k] for k in ("version", "power", "provable", "methods", "power_iters", "converged",
                                      "tol", "k_sub_power", "k_sub_provable")}
        return {"input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "activation": self.activation, "layers": [dict(s) for s in self.layers],
                "eps": self.eps, "eps_train": self.eps_train, "variant": self.variant, "init": self.init, "seed": self.seed,
                "dtype": str(self.dtype), "power_iters": self.power_iters, "lam": self.lam,
                "provable_method": self.provable_method, "lipschitz": lip}

    def state_arrays(self) -> dict:
        out = {}
        for i, (w, b) in enumerate(self.params):
            out[f"param.{i}.weight"] = to_host(w.data)
            out[f"param.{i}.bias"] = to_host(b.data)
            out[f"iterate.{i}"] = to_host(self.iterates[i])
        return out

    def save(self, path, extra=None):
        """Write a gloro-npz/1 checkpoint atomically (see gloro_core.checkpoint).

        extra: dict of JSON values and numpy arrays (e.g. optimizer state, epoch); it comes
        back as ``net.extra`` after :func:`load`.
        """
        checkpoint.save_npz(path, self.meta(), self.state_arrays(), extra)


def _meta_error(path, exc) -> ValueError:
    if isinstance(exc, KeyError):
        return ValueError(f"{path}: meta lacks key {exc.args[0]!r}")
    return ValueError(f"{path}: bad meta: {exc}")


def _saved_radii(meta, extra) -> tuple:
    """(eps, eps_train) of a checkpoint. Files written before eps_train was recorded hold
    the *training* eps in meta["eps"]; their test eps is the training config's, if any."""
    if "eps_train" in meta:
        return meta["eps"], meta["eps_train"]
    state = extra.get("train_state") if isinstance(extra, dict) else None
    cfg = state.get("config") if isinstance(state, dict) else None
    test = cfg.get("eps") if isinstance(cfg, dict) else None
    try:
        test = _check_eps(test) if test is not None else meta["eps"]
    except (TypeError, ValueError):   # the evaluation commands report a bad config eps
        test = meta["eps"]
    return test, meta["eps"]


def load(path) -> GloroNet:
    """Read a gloro-npz/1 checkpoint into a GloroNet (``net.extra`` holds the saved extra)."""
    meta, arrays, extra = checkpoint.load_npz(path)
    # the file's arrays are the ground truth of size: the shapes the meta implies are checked
    # against them before GloroNet allocates (input_shape [1, 1e5, 1e5] in the meta alone
    # would allocate 1e10-element iterates and weights)
    try:
        _, ops = _normalise_specs(meta["layers"], _check_input_shape(meta["input_shape"]),
                                  _check_num_classes(meta["num_classes"]), meta["activation"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _meta_error(path, exc) from None
    for i, op in enumerate(ops):
        expect = {f"param.{i}.weight": op.w_shape, f"param.{i}.bias": (op.w_shape[0],),
                  f"iterate.{i}": op.iterate_shape}
        for key, shp in expect.items():
            if key not in arrays:
                raise ValueError(f"{path}: missing array {key!r}")
            a = arrays[key]
            if tuple(a.shape) != tuple(shp):
                raise ValueError(f"{path}: array {key!r} has shape {tuple(a.shape)}, expected {tuple(shp)}")
            if a.dtype.kind != "f":
                raise ValueError(f"{path}: array {key!r} has dtype {a.dtype}, expected a float array")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{path}: array {key!r} contains NaN or inf")
    try:
        eps, eps_train = _saved_radii(meta, extra)
        net = GloroNet(meta["input_shape"], meta["num_classes"], meta["layers"],
                       activation=meta["activation"], init=meta.get("init", "glorot_uniform"),
                       eps=eps, eps_train=eps_train, variant=meta.get("variant", "margin"),
                       seed=meta.get("seed", 0),
                       dtype=meta.get("dtype", "float32"),
                       power_iters=meta.get("power_iters", DEFAULT_POWER_ITERS), lam=meta.get("lam", 1.0),
                       _init_params=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise _meta_error(path, exc) from None
    for i in range(net.num_layers):
        w, b = net.params[i]
        w.data = np.ascontiguousarray(arrays[f"param.{i}.weight"], dtype=net.dtype)
        b.data = np.ascontiguousarray(arrays[f"param.{i}.bias"], dtype=net.dtype)
        net.iterates[i] = np.ascontiguousarray(arrays[f"iterate.{i}"], dtype=net.dtype)
    # the saved Lipschitz numbers are kept for reference only: a certificate must not
    # trust a file, so the frozen K is recomputed from the weights on first use
    net.saved_lipschitz = meta.get("lipschitz")
    pm = meta.get("provable_method", "auto")
    if pm not in ("auto", "fft", "explicit"):
        raise ValueError(f"{path}: unknown provable_method {pm!r} in meta")
    net.provable_method = pm
    net.extra = extra
    return net

"""The GloRo net: a sequence of layers f, the ⊥ head, the training loss and checkpoints.

``GloroNet(input_shape, num_classes, layers, activation, init, eps, variant, seed, dtype,
power_iters, lam, eps_train)``: eps is the radius certified by default, eps_train (default
eps) the one the loss uses by default.

* ``layers``: the checkpoint's layer-spec list, final dense included, e.g.
  ``[{"type": "conv", "filters": 16, "kernel": 4, "stride": 2, "padding": "same"},
  {"type": "dense", "units": 100}, {"type": "dense", "units": 10}]``. The activation
  (ReLU or MinMax) follows every layer but the last; a dense layer flattens an image
  input (C, H, W order). ``net.layers`` holds the layer objects (gloro_core.layers),
  ``net.specs`` the specs.
* Training (nn autodiff): :meth:`loss`, :meth:`standard_loss`, :meth:`gradients`; the
  training K_sub is the product of power-method estimates sigma_i = ||A_i v_i|| with the
  stored iterates v_i held constant (a few power steps update them first, no gradient).
* Evaluation (NumPy, no graph): :meth:`logits`, :meth:`gloro_logits`, :meth:`certify`
  use a *frozen* K computed by :meth:`update_lipschitz`; all of certification (frozen K,
  rounding bounds, the ⊥ decision) lives in gloro_core.certification (``net.certifier``).
  Certification uses the provable bound unless ``bound="power"`` is asked for (then it is
  not a proof).
"""
from __future__ import annotations

import numpy as np

from kernels.registry import array_module, is_gpu_array, to_host
from nn import init as nn_init
from nn.tensor import Tensor, no_grad

from . import checkpoint, losses
from . import layers as L
from .certification import DEFAULT_MAX_ITER, Certifier
from .checks import (check_batch, check_dtype, check_eps, check_input_shape, check_int, check_labels,
                     check_num_classes, check_real)
from .lipschitz import init_iterate, power_update_layers

ACTIVATIONS = tuple(L.ACTIVATIONS)
INITS = {"glorot_uniform": "glorot_uniform", "glorot": "glorot_uniform", "orthogonal": "orthogonal"}
DEFAULT_POWER_ITERS = 5


class GloroNet:
    """A GloRo net (see the module docstring)."""

    def __init__(self, input_shape, num_classes, layers, activation="relu", init="glorot_uniform",
                 eps=0.3, variant="margin", seed=0, dtype=np.float32, power_iters=DEFAULT_POWER_ITERS,
                 lam=1.0, eps_train=None, _init_params=True):
        self.input_shape = check_input_shape(input_shape)
        self.num_classes = check_num_classes(num_classes)
        self.act = L.activation(activation)
        if not isinstance(init, str) or init not in INITS:
            raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
        if not isinstance(variant, str) or variant not in losses.VARIANTS:
            raise ValueError(f"variant must be one of {losses.VARIANTS}, got {variant!r}")
        self.dtype = check_dtype(dtype)
        self.seed = check_int(seed, "seed")
        self.power_iters = check_int(power_iters, "power_iters")
        if self.seed < 0 or self.power_iters < 0:
            raise ValueError(f"seed and power_iters must be >= 0, got {seed} and {power_iters}")
        self.activation, self.init, self.variant = activation, INITS[init], variant
        # eps: the radius certified by default (eps_test); eps_train: the loss's default
        self.eps = check_eps(eps)
        self.eps_train = self.eps if eps_train is None else check_real(eps_train, "eps_train")
        self.lam = check_real(lam, "lam")
        self.layers = L.build(layers, self.input_shape, self.num_classes, self.act)
        self.extra = {}
        # weights first, then iterates, from one generator (a seed gives the same net as before);
        # load() (the only _init_params=False caller) overwrites the zeros
        rng = np.random.default_rng(self.seed)
        ini = nn_init.get(self.init) if _init_params else None
        for i, layer in enumerate(self.layers):
            layer.init_parameters(i, ini, rng, self.dtype)
        for layer in self.weighted:
            layer.iterate = (init_iterate(layer, rng, self.dtype) if _init_params
                             else np.zeros(layer.iterate_shape, self.dtype))
        self.certifier = Certifier(self)

    # ------------------------------------------------------------------ layers and parameters
    @property
    def specs(self) -> list:
        """The layer-spec list (the checkpoint's "layers")."""
        return [dict(layer.spec) for layer in self.layers]

    @property
    def weighted(self) -> list:
        """The layers with parameters and a power iterate (a FixedLayer has neither)."""
        return [layer for layer in self.layers if layer.parametric]

    @property
    def ops(self) -> list:
        """The layers as linear operators (older name of ``layers``)."""
        return self.layers

    @property
    def params(self) -> list:
        """[(weight, bias)] per layer with parameters."""
        return [(layer.weight, layer.bias) for layer in self.weighted]

    @params.setter
    def params(self, pairs):
        for layer, (w, b) in zip(self.weighted, pairs, strict=True):
            layer.weight, layer.bias = w, b

    @property
    def iterates(self) -> list:
        """The power iterates, (1, *in_shape) per layer with parameters."""
        return [layer.iterate for layer in self.weighted]

    @iterates.setter
    def iterates(self, vs):
        for layer, v in zip(self.weighted, vs, strict=True):
            layer.iterate = v

    def named_parameters(self):
        """[(name, Parameter)] in order: param.0.weight, param.0.bias, param.1.weight, ..."""
        return [(p.name, p) for layer in self.weighted for p in (layer.weight, layer.bias)]

    def parameters(self):
        """The Parameters, for the optimizer (same order as named_parameters)."""
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def xp(self):
        """numpy or cupy: where the parameters live."""
        return array_module(self.layers[-1].weight.data)   # the last layer is dense

    @property
    def device(self) -> str:
        return "gpu" if is_gpu_array(self.layers[-1].weight.data) else "cpu"

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
        for layer in self.weighted:
            for p in (layer.weight, layer.bias):
                p.data, p.grad = conv(p.data), None
            layer.iterate = conv(layer.iterate)
        return self

    # ------------------------------------------------------------------ input checks
    def _check_x(self, x, name="x"):
        """x as the model dtype on the model's device, shape (n, *input_shape); plus the original."""
        return check_batch(x, self.input_shape, self.dtype, self.xp, name)

    def _check_labels(self, y, n):
        return check_labels(y, n, self.num_classes)

    # ------------------------------------------------------------------ forward (autodiff)
    def forward(self, x) -> Tensor:
        """f(x) as an nn Tensor (n, m). x: Tensor or array of shape (n, *input_shape)."""
        h = x if isinstance(x, Tensor) else Tensor(self._check_x(x)[0])
        last = self.num_layers - 1
        for i, layer in enumerate(self.layers):
            # ReLU fused into the layer's node (in place: no pre-activation kept or copied)
            act = i < last and layer.activated
            fuse = act and self.act.fusable
            h = layer.forward(h, relu=fuse)
            if act and not fuse:
                h = self.act.forward(h)
        return h

    def logits(self, x) -> np.ndarray:
        """f(x): (n, m) NumPy array of the model dtype."""
        with no_grad():
            return to_host(self.forward(x).data)

    def predict(self, x) -> np.ndarray:
        """argmax f(x) by index, (n,)."""
        return self.logits(x).argmax(axis=1)

    # ------------------------------------------------------------------ training K
    def power_update(self, iters: int):
        """Run ``iters`` power steps on every stored iterate (no gradient)."""
        layers = self.weighted
        self.iterates = power_update_layers(layers, [layer.effective_weight() for layer in layers],
                                            self.iterates, iters)

    def layer_sigmas(self, upto=None):
        """[sigma_i = ||A_i v_i||] as Tensors with v_i constant: the gradient w.r.t. W_i only.

        Layers 0 .. upto-1 (default all)."""
        return [layer.sigma() for layer in self.layers[:upto]]

    def k_sub_tensor(self, unrolled: int | None = None) -> Tensor:
        """Training K_sub = prod of sigma_i over all layers but the last (a scalar Tensor).

        unrolled=n: each sigma_i comes from n power steps taken in the graph
        (Layer.sigma_unrolled), which also update the iterates; None: the stored iterates
        held constant (Layer.sigma)."""
        k = Tensor(self.xp.ones((), dtype=self.dtype))
        if unrolled is None:
            sigmas = self.layer_sigmas(upto=self.num_layers - 1)
        else:
            sigmas = [layer.sigma_unrolled(unrolled) for layer in self.layers[:self.num_layers - 1]]
        for s in sigmas:
            k = k * s
        return k

    def gloro_logits_tensor(self, x, eps=None) -> Tensor:
        """Differentiable (n, m+1) GloRo logits with the training K (no power steps);
        eps defaults to eps_train."""
        eps = self.eps_train if eps is None else check_eps(eps)
        y = self.forward(x)
        return losses.gloro_logits(y, self.layers[-1].head_weight(), self.k_sub_tensor(), eps, self.variant)

    def loss(self, x, y, loss="ce", eps=None, lam=None, power_iters=None, trades_form="kl",
             power_grad=False) -> Tensor:
        """Scalar training loss (nn Tensor) at eps (default eps_train). Runs ``power_iters``
        power steps first: outside the graph (K_sub's gradient holds the iterates fixed), or
        with power_grad=True inside it, differentiated through (as the authors' code does;
        the same K_sub value, a different gradient; the last layer's iterate is left as is).

        loss "ce": CE on the m+1 GloRo logits; "trades": CE(f(x), y) + lam * L(f̄(x), softmax f(x))
        with L = KL (trades_form="kl") or CE ("ce"); "emma": CE on EMMA's per-class
        label-based margins (losses.emma_logits).
        """
        if loss not in ("ce", "trades", "emma"):
            raise ValueError(f"loss must be 'ce', 'trades' or 'emma', got {loss!r}")
        eps = self.eps_train if eps is None else check_eps(eps)
        iters = self.power_iters if power_iters is None else int(power_iters)
        xd, _ = self._check_x(x)
        lab = self._check_labels(y, xd.shape[0])
        if iters and not power_grad:
            self.power_update(iters)
        f = self.forward(Tensor(xd))
        k_sub = self.k_sub_tensor(unrolled=iters if power_grad else None)
        if loss == "emma":
            return losses.emma(f, self.layers[-1].head_weight(), k_sub, eps, lab)
        gl = losses.gloro_logits(f, self.layers[-1].head_weight(), k_sub, eps, self.variant)
        if loss == "ce":
            return losses.gloro_ce(gl, lab)
        lam = self.lam if lam is None else check_real(lam, "lam")
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

    # ------------------------------------------------------------------ frozen K and certificates
    def update_lipschitz(self, tol=1e-5, max_iter=DEFAULT_MAX_ITER, provable=True, provable_method=None):
        """Converge the iterates and freeze K: see Certifier.update_lipschitz."""
        return self.certifier.update_lipschitz(tol, max_iter, provable, provable_method)

    def lipschitz(self, bound="provable") -> dict:
        """Frozen Lipschitz numbers: k_sub (the one certification uses), bound, per layer."""
        return self.certifier.lipschitz(bound)

    def gloro_logits(self, x, eps=None, bound="provable") -> np.ndarray:
        """(n, m+1) float64: f(x) and y_⊥ with the frozen K: see Certifier.gloro_logits."""
        return self.certifier.gloro_logits(x, eps, bound)

    def certify(self, x, eps=None, bound="provable", tight_radius=True):
        """(pred (n,) int, radius (n,) float64), pred -1 for ⊥: see Certifier.certify."""
        return self.certifier.certify(x, eps, bound, tight_radius)

    def weights_version(self) -> str:
        """A digest of every weight and bias: the key of every number certification caches."""
        return self.certifier.weights_version()

    @property
    def last_certification(self):
        """What the last certificate rests on: bound, k_sub, eps, proof, methods, version."""
        return self.certifier.last

    @property
    def provable_method(self) -> str:
        """"auto", "fft" or "explicit": how conv layers get their provable bound."""
        return self.certifier.provable_method

    @provable_method.setter
    def provable_method(self, method):
        self.certifier.provable_method = method

    # the certifier's state and passes under their former names (tests of the rounding bounds)
    @property
    def _frozen(self):
        return self.certifier.frozen

    def _fresh_frozen(self):
        return self.certifier.fresh_frozen()

    def _pair_k(self, k_sub):
        return self.certifier.pair_k(k_sub)

    def _forward_norm_error(self, x, fr):
        return self.certifier.forward_norm_error(x, fr)

    def _forward_with_error(self, x):
        return self.certifier.forward_with_error(x)

    # ------------------------------------------------------------------ checkpoints
    def meta(self) -> dict:
        fr = self.certifier.frozen
        lip = None
        if fr is not None:
            lip = {k: fr[k] for k in ("version", "power", "provable", "methods", "power_iters", "converged",
                                      "tol", "k_sub_power", "k_sub_provable")}
        return {"input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "activation": self.activation, "layers": self.specs,
                "eps": self.eps, "eps_train": self.eps_train, "variant": self.variant, "init": self.init, "seed": self.seed,
                "dtype": str(self.dtype), "power_iters": self.power_iters, "lam": self.lam,
                "provable_method": self.provable_method, "lipschitz": lip}

    def state_arrays(self) -> dict:
        out = {}
        for i, layer in enumerate(self.layers):
            out.update(layer.state_arrays(i))
        return out

    def save(self, path, extra=None):
        """Write a checkpoint atomically (gloro-safetensors/1 for a ``.safetensors`` path, else
        gloro-npz/1; see gloro_core.checkpoint). extra: dict of JSON values and numpy arrays
        (e.g. optimizer state, epoch); it comes back as ``net.extra`` after :func:`load`."""
        checkpoint.save(path, self.meta(), self.state_arrays(), extra)


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
        test = check_eps(test) if test is not None else meta["eps"]
    except (TypeError, ValueError):   # the evaluation commands report a bad config eps
        test = meta["eps"]
    return test, meta["eps"]


def load(path) -> GloroNet:
    """A checkpoint of either format (told by content) as a GloroNet; ``net.extra``: the saved
    extra; ``net.loaded_without_iterates``: True for a weights-only file (fresh iterates)."""
    layers = []

    def expect(meta):   # the meta's array shapes, checked against the file before reading
        # the file is the ground truth of size: GloroNet allocates only after this check (the
        # meta alone, input_shape [1, 1e5, 1e5], would allocate 1e10-element iterates)
        try:
            layers[:] = L.build(meta["layers"], check_input_shape(meta["input_shape"]),
                                check_num_classes(meta["num_classes"]), L.activation(meta["activation"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise _meta_error(path, exc) from None
        return {k: v for i, layer in enumerate(layers) for k, v in layer.array_shapes(i).items()}

    meta, arrays, extra = checkpoint.load(path, expect)
    fresh = checkpoint.check_layer_arrays(path, arrays, layers)
    try:
        eps, eps_train = _saved_radii(meta, extra)
        net = GloroNet(meta["input_shape"], meta["num_classes"], meta["layers"],
                       activation=meta["activation"], init=meta.get("init", "glorot_uniform"),
                       eps=eps, eps_train=eps_train, variant=meta.get("variant", "margin"),
                       seed=meta.get("seed", 0), dtype=meta.get("dtype", "float32"),
                       power_iters=meta.get("power_iters", DEFAULT_POWER_ITERS), lam=meta.get("lam", 1.0),
                       _init_params=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise _meta_error(path, exc) from None
    if fresh:   # seeded by the meta; certification converges the power method from them
        checkpoint.fresh_iterates(path, arrays, net.layers, net.seed, net.dtype)
    net.loaded_without_iterates = fresh
    for i, layer in enumerate(net.layers):
        layer.load_arrays(i, arrays, net.dtype)
    # the saved Lipschitz numbers are kept for reference only: a certificate must not
    # trust a file, so the frozen K is recomputed from the weights on first use
    net.saved_lipschitz = meta.get("lipschitz")
    pm = meta.get("provable_method", "auto")
    if pm not in ("auto", "fft", "explicit"):
        raise ValueError(f"{path}: unknown provable_method {pm!r} in meta")
    net.provable_method = pm
    net.extra = extra
    return net

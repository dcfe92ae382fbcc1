"""Certification of a GloRo net: the frozen K, two rigorous rounding bounds, the ⊥ decision.

A :class:`Certifier` belongs to one GloroNet (``net.certifier``) and reads its layers,
activation and head. Everything it derives from the parameters is cached under one key, the
parameters' version (:meth:`Certifier.weights_version`: a digest of every weight and bias,
taken once when they change), and dropped together when it changes:

* each layer's provable float64 bound, per ``provable_method``;
* the frozen Lipschitz numbers (:meth:`Certifier.update_lipschitz`: every iterate
  converged by the float64 power method, and the provable bounds), and with them the
  pairwise K_ij of the head (:meth:`Certifier.pair_k`) per (variant, bound) and the
  constants of the norm-wise rounding bound (rounding.py).

A call finds out whether the parameters changed by an exact compare with a copy of them
(the optimizer updates them in place; a compare costs ~10x less than a digest), once per
call; a change of any weight or bias, in any layer, refreshes everything.

What a certificate means: the network evaluated in exact real arithmetic with the stored
weights, f, satisfies argmax f(x') = j for every ||x' - x||_2 <= eps. The forward pass
in the model dtype differs from f by at most a rounding error that is bounded per logit
and subtracted from the margin: cheaply from norms (:meth:`Certifier.forward_norm_error`)
and, where that leaves the decision open, tightly with a float64 pass over |W|
(:meth:`Certifier.forward_with_error`).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from kernels.registry import direct_sums, is_gpu_array, to_host
from nn.tensor import Tensor, no_grad

from . import bounds, decision, rounding
from .checks import check_eps
from .lipschitz import converge

DEFAULT_MAX_ITER = 2000
_TINY64 = bounds.TINY


class Certifier:
    """The frozen K and the certificates of one GloroNet (see the module docstring)."""

    def __init__(self, net):
        self.net = net
        self.provable_method = "auto"
        self.tol = 1e-5             # of the last update_lipschitz: automatic refreshes keep it
        self.last = None            # what the last certificate rests on (net.last_certification)
        # the one cache: {"version": digest, "params": copies of what it digests, "provable":
        # {provable_method: [(bound, how found)] per layer}, "frozen": see update_lipschitz, or None}
        self._cache = None

    @property
    def frozen(self):
        """The frozen numbers of the cached version (None before the first freeze)."""
        return self._cache["frozen"] if self._cache is not None else None

    def _params(self) -> list:
        """Every parameter array, weights and biases (biases enter the rounding bound)."""
        return [p.data for layer in self.net.weighted for p in (layer.weight, layer.bias)]

    def _current(self) -> dict:
        """The cache for the current parameters: the cached one if they still equal its
        copies exactly, else a new, empty one under their new version."""
        params, c, xp = self._params(), self._cache, self.net.xp
        if c is not None and all(is_gpu_array(a) == is_gpu_array(b) and a.shape == b.shape and a.dtype == b.dtype
                                 and bool(xp.array_equal(a, b)) for a, b in zip(params, c["params"])):
            return c
        copies = [a.copy() for a in params]
        h = hashlib.blake2b(digest_size=16)
        for a in copies:
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(to_host(a)))  # buffer protocol: no copy on the host
        self._cache = {"version": h.hexdigest(), "params": copies, "provable": {}, "frozen": None}
        return self._cache

    def weights_version(self) -> str:
        """A digest of every weight and bias: the key of every cached number."""
        return self._current()["version"]

    # ------------------------------------------------------------------ frozen K
    def update_lipschitz(self, tol=1e-5, max_iter=DEFAULT_MAX_ITER, provable=True, provable_method=None):
        """Converge every iterate (float64 power method), freeze K and compute provable bounds.

        provable_method for convs: "auto" (default: the exact norm of the explicit operator
        where it is small, see bounds.conv_provable_bound, else the FFT bound), "fft" or
        "explicit"; it sticks for later automatic refreshes, as tol does. Provable bounds are
        cached per method under the parameters' version. Returns lipschitz().
        """
        if provable_method is not None:
            if provable_method not in ("auto", "fft", "explicit"):
                raise ValueError(f"provable_method must be 'auto', 'fft' or 'explicit', got {provable_method!r}")
            self.provable_method = provable_method
        self.tol = float(tol)
        cache = self._current()
        power, iters, conv = [], [], []
        for layer in self.net.layers:
            if not layer.parametric:   # a fixed operator's norm is known exactly: nothing to estimate
                power.append(layer.norm)
                iters.append(0)
                conv.append(True)
                continue
            v, s, it, ok = converge(layer, layer.effective_weight(), layer.iterate, tol, max_iter)
            layer.iterate = self.net.xp.ascontiguousarray(v, dtype=self.net.dtype)
            power.append(s)
            iters.append(it)
            conv.append(ok)
        if not provable:
            pairs = [(float("nan"), "none")] * len(power)
        else:
            pairs = cache["provable"].get(self.provable_method)
            if pairs is None:   # [(bound, how it was found)] per layer
                pairs = cache["provable"][self.provable_method] = [
                    layer.provable(to_host(layer.effective_weight()), self.provable_method)
                    for layer in self.net.layers]
        prov, methods = [b for b, _ in pairs], [m for _, m in pairs]
        cache["frozen"] = {
            "version": cache["version"],
            "power": power,
            "provable": prov,
            "methods": methods,
            "power_iters": iters,
            "converged": conv,
            "tol": self.tol,
            # derived from the numbers above (and the parameters), filled on first use
            "pair_k": {},  # (variant, bound) -> pair_k(k_sub)
            "rounding": None,   # per-layer constants of the norm-wise bound
            # K_sub as (mantissa, exponent), rounded up: np.prod underflows to 0 (and a
            # certificate with K = 0 has an infinite radius); the floats are for reports
            "k_sub_scaled": {"power": bounds.product_up(power[:-1]),
                             "provable": bounds.product_up(prov[:-1])},
            "k_sub_power": float(np.prod(power[:-1])) if len(power) > 1 else 1.0,
            "k_sub_provable": float(np.prod(prov[:-1])) if len(prov) > 1 else 1.0,
        }
        return self.lipschitz()

    def fresh_frozen(self):
        """The frozen numbers of the current parameters, frozen anew when any changed."""
        fr = self._current()["frozen"]
        if fr is None or any(m == "none" for m in fr["methods"]):
            self.update_lipschitz(tol=self.tol)
        return self.frozen

    def lipschitz(self, bound="provable") -> dict:
        """Frozen Lipschitz numbers: k_sub (the one certification uses), bound, per layer."""
        if bound not in ("provable", "power"):
            raise ValueError(f"bound must be 'provable' or 'power', got {bound!r}")
        fr = self.fresh_frozen()
        layers = []
        for i, layer in enumerate(self.net.layers):
            p, q = fr["power"][i], fr["provable"][i]
            layers.append({"kind": layer.kind, "power": p, "provable": q, "method": fr["methods"][i],
                           "ratio": (p / q) if q > 0 else float("nan"),
                           "power_iters": fr["power_iters"][i], "converged": fr["converged"][i]})
        return {"k_sub": fr["k_sub_provable"] if bound == "provable" else fr["k_sub_power"],
                "bound": bound, "layers": layers,
                "k_sub_power": fr["k_sub_power"], "k_sub_provable": fr["k_sub_provable"],
                "version": fr["version"]}

    # ------------------------------------------------------------------ certification
    def forward_with_error(self, x):
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

        Both facts need each output to be a sum of its products: the pass runs within
        ``kernels.direct_sums()`` (no Winograd, whose transformed operands break both).
        """
        with direct_sums():
            return self._forward_with_error(x)

    def _forward_with_error(self, x):
        xd, xorig = self.net._check_x(x)
        xp = self.net.xp
        e = xp.abs(xorig.astype(np.float64) - xd.astype(np.float64))
        h = xd
        bad = xp.zeros(xd.shape[0], dtype=bool)
        last, act = len(self.net.layers) - 1, self.net.act
        for i, layer in enumerate(self.net.layers):
            h, e, fine = layer.forward_error(h, e, self.net.dtype)   # the steps above, per layer type
            bad |= ~fine
            if i < last and layer.activated:
                h, e = act.apply(h), act.propagate_error(e)
        e[bad] = np.inf
        return to_host(h), to_host(e)

    def pair_k(self, k_sub):
        """(m, m) float64: K[j, i] bounding the Lipschitz constant of f_j - f_i (diag unused).

        k_sub: a float, or (mantissa, exponent) from bounds.product_up. Computed on the
        last weight scaled by a power of two and scaled back rounding up, so that no
        scale of weights makes a K_ij of a nonzero pair 0 (or NaN from 0 * inf)."""
        km, ke = k_sub if isinstance(k_sub, tuple) else bounds.product_up([k_sub])
        # the rows the forward pass multiplies by (normalised ones for a NormalizedDense)
        w, we = bounds.pow2_normalise(to_host(self.net.layers[-1].effective_weight()))
        m, d = w.shape
        if self.net.variant == "margin":
            sq = np.empty((m, m), dtype=np.float64)
            for j in range(m):
                sq[j] = ((w[j][None, :] - w) ** 2).sum(axis=1)
        else:
            sq = (w ** 2).sum(axis=1)
        # the d squares that may underflow lose < 1 subnormal each; SAFETY_REL covers the
        # float64 rounding of the differences, sums, square roots and products
        norms = np.sqrt(sq + d * _TINY64) * (1.0 + bounds.SAFETY_REL)
        if self.net.variant != "margin":
            norms = norms[:, None] + norms[None, :]
        with np.errstate(invalid="ignore"):
            kk = norms * km * (1.0 + bounds.SAFETY_REL)
        return bounds.ldexp_up_array(kk, ke + we)

    def forward_norm_error(self, x, fr):
        """Logits in the model dtype plus the cheap norm-wise rounding bound (rounding.py).

        x (n, *input_shape) -> (y (n, m) model dtype on the host, err (n, m) float64).
        Costs one ordinary forward pass plus O(n·d) on the input; the pass runs within
        ``kernels.direct_sums()``, as the bound is for sums of products (see
        :meth:`forward_with_error`).
        """
        xd, xorig = self.net._check_x(x)
        n, dim = xd.shape[0], math.prod(self.net.input_shape)  # reshape(0, -1) fails: empty batches
        # one Numba pass, 0.06 ms at 2C2F b1024: on a pool thread next to the forward pass it
        # competed with the forward's two threads (certify/plain 1.050 vs 1.027 inline)
        sq = rounding.sq_norms(xd.reshape(n, dim))
        with no_grad(), direct_sums():
            y = to_host(self.net.forward(Tensor(xd)).data)
        if xorig.dtype == xd.dtype:
            e_in = np.zeros(n)
        else:  # the cast to the model dtype is the first rounding
            d = to_host(xorig).reshape(n, dim).astype(np.float64) - to_host(xd).reshape(n, dim).astype(np.float64)
            e_in = np.sqrt(rounding.sq_norms(d)) * (1.0 + 1e-9)  # (squares of tiny d underflow)
        return y, rounding.logit_error_bound(self._rounding_constants(fr), sq, e_in)

    def _rounding_constants(self, fr):
        """Per-layer constants of the norm-wise bound, cached in ``fr`` (the frozen numbers of
        the current parameters, from :meth:`fresh_frozen`)."""
        if fr["rounding"] is None:
            last = len(self.net.layers) - 1
            consts = []
            for i, layer in enumerate(self.net.layers):
                # the provable bound; a power estimate that overflowed (inf, NaN) is no norm
                p = fr["power"][i]
                sigma = max(fr["provable"][i], p) if math.isfinite(p) else fr["provable"][i]
                consts.append(layer.rounding_constants(sigma, self.net.dtype, last=i == last))
            fr["rounding"] = consts
        return fr["rounding"]

    def certify_core(self, x, eps, bound, tight_rows="open"):
        """The ⊥ logit, certification and radii under two rigorous rounding bounds.

        First the cheap norm-wise bound (:meth:`forward_norm_error`, costs a forward
        pass); then the tight per-coordinate bound (:meth:`forward_with_error`, about two
        more) on ``tight_rows``: "open" (the points certified without any slack but not
        with the cheap one: the only ones whose decision it can change) or "all" (tight
        radii everywhere). Both bounds are proofs, each for the logits of its own pass, so
        a point certified by either is certified (with that pass's logits and y_⊥), and its
        radius is the larger of the two.
        """
        eps = self.net.eps if eps is None else check_eps(eps)
        if bound not in ("provable", "power"):
            raise ValueError(f"bound must be 'provable' or 'power', got {bound!r}")
        fr = self.fresh_frozen()
        k_sub = fr["k_sub_provable"] if bound == "provable" else fr["k_sub_power"]
        # which bound the last certificate rests on (a proof only for "provable")
        self.last = {"bound": bound, "k_sub": k_sub, "eps": eps, "proof": bound == "provable",
                     "methods": list(fr["methods"]), "version": fr["version"]}
        k_pair = fr["pair_k"].get((self.net.variant, bound))
        if k_pair is None:
            k_pair = fr["pair_k"][(self.net.variant, bound)] = self.pair_k(fr["k_sub_scaled"][bound])
            k_pair.setflags(write=False)
        y, err = self.forward_norm_error(x, fr)
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
            y2, err2 = self.forward_with_error(xs if rows.size == len(y64) else xs[rows])
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
        :meth:`forward_with_error` where the decision needs it), j the first argmax, so
        argmax of the result (first maximum) is j exactly when x is certified: where
        y_⊥ ties y_j, y_⊥ is nudged one ulp up so that the tie goes to ⊥.
        """
        y64, ybot, j, cert, _, _ = self.certify_core(x, eps, bound)
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
        _, _, j, cert, radius, _ = self.certify_core(x, eps, bound, "all" if tight_radius else "open")
        return np.where(cert, j, -1).astype(np.int64), radius

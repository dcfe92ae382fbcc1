"""A cheap, rigorous bound on the rounding error of a float32 forward pass.

Certification compares a float32 margin with eps·K_ij; the comparison is a proof only
after subtracting a bound on |f(x)_i - y_i|, where f is the network in exact arithmetic
and y the computed logits. ``certification.Certifier.forward_with_error`` bounds this per coordinate
with a second, float64 forward pass over |W| (tight, but it costs more than the forward
pass itself). This module bounds it from norms alone, so it costs O(n·d) on the input
and nothing per layer; certification uses it first and runs the tight pass only on the
few points whose decision it leaves open.

The bound, per input, with u the unit roundoff of the model dtype and, for a layer
with fan-in k (dot length, +1 for the bias), gamma = (k+1) u / (1 - (k+1) u):

* a computed linear layer ŷ = fl(W ĥ + b) obeys |ŷ - (W ĥ + b)| <= gamma (|W| |ĥ| + |b|)
  + (k+1) tiny componentwise, for any summation order, FMA or not (tiny: the smallest
  subnormal, covering products that underflow); in l2 norm that is at most
  gamma (||A_|W|||_2 ||ĥ|| + ||b||) + (k+1) tiny sqrt(outputs), with b broadcast over the
  output positions;
* the error against the exact network therefore grows as
  e_out <= ||A_W||_2 e_in + gamma (||A_|W|||_2 ||ĥ|| + ||b||);
* the computed activations obey ||ĥ_out|| <= ||A_W||_2 ||ĥ_in|| + ||b|| + (local error),
  since ReLU and MinMax are exact and do not increase the l2 norm;
* for the last layer, per logit i: |err_i| <= ||w_i|| e + gamma (||w_i|| ||ĥ|| + |b_i|)
  (Cauchy-Schwarz on |w_i| |ĥ|).

||A_W||_2 is the layer's provable operator-norm bound; ||A_|W|||_2 (the operator with
the kernel's absolute values) is bounded by the Schur test sqrt(max row sum * max column
sum). Every float64 step is inflated by a relative 1e-9 to cover its own rounding, and
by a few smallest subnormals where its products may underflow (float64 nets at 1e-200).

Overflow. Every partial sum of a computed dot product is at most sum_j |w_j| |ĥ_j| + |b|
<= ||A_|W|||_2 ||ĥ|| + ||b|| (any order, FMA or not), so when that bound times
(1 + gamma) stays below the dtype's largest finite value no product, sum or output of the
layer overflowed. Where it does not (a float32 sgemm returned -inf for an exact 1e38,
and ReLU turned it into 0) the bound is inf: no certificate.
"""
from __future__ import annotations

import math

import numpy as np

from kernels import array_module
from kernels.certify_loops import bound_rows as _bound_rows, sq_rows as _sq_rows
from kernels.registry import to_host

from . import bounds

_INFLATE = 1.0 + 1e-9
_TINY64 = bounds.TINY


def abs_operator_bound(w) -> float:
    """Upper bound on ||A_|W|||_2 by the Schur test, in float64.

    w: a weight (out, in, *taps) whose operator's rows sum the entries of one output
    channel's slice w[o] and whose columns meet each (out, tap) entry of one input channel's
    slice w[:, c] at most once: a dense weight (out, in), or a conv weight (O, C, kh, kw)
    whatever the stride and padding.
    """
    a = np.abs(np.asarray(w, dtype=np.float64))
    others = tuple(range(2, a.ndim))
    row, col = a.sum(axis=(1,) + others).max(), a.sum(axis=(0,) + others).max()
    # sqrt of each factor: row * col underflows to 0 for 1e-200 weights
    return math.sqrt(row) * math.sqrt(col) * _INFLATE + _TINY64


def gamma(fan_in: int, dtype) -> float:
    """gamma_{k+1} = (k+1) u / (1 - (k+1) u) for a dot product of length k plus a bias."""
    u = float(np.finfo(dtype).eps) / 2.0
    k = fan_in + 1
    return k * u / (1.0 - k * u)


def sq_norms(x2d) -> np.ndarray:
    """(n,) float64 upper bounds on the squared l2 norms of the rows of x2d (n, d).

    Summed in float64, where squares of float32 values neither underflow nor overflow
    (in float32 tiny inputs would square to 0 and make the bound vanish); a sum of d
    non-negative rounded squares is off by at most gamma_{d+1} relative in any order, so
    the result is divided by (1 - gamma_{d+1}). Squares of float64 values below ~1e-154
    underflow, each losing less than the smallest subnormal: d of those are added. NumPy
    arrays take one Numba pass (no float64 copy of x: 0.05 vs 0.44 ms at 1024 x 784).
    """
    if _sq_rows is not None and isinstance(x2d, np.ndarray) and x2d.dtype in (np.float32, np.float64):
        s = _sq_rows(np.ascontiguousarray(x2d))
    else:
        x64 = x2d.astype(np.float64)
        s = array_module(x64).einsum("ij,ij->i", x64, x64)
        s = np.asarray(to_host(s), dtype=np.float64)
    d = x2d.shape[1]
    s = s + d * _TINY64  # squares that underflowed (float64 inputs only)
    return s / (1.0 - gamma(d, np.float64)) * _INFLATE


class LayerConstants:
    """What the norm-wise bound needs of one linear layer (all float64 scalars/arrays).

    sigma: provable ||A_W||_2; sigma_abs: Schur bound on ||A_|W|||_2; gamma: see module;
    bias_norm: ||b|| broadcast over the output positions (conv: ||b|| sqrt(OH·OW));
    underflow: (k+1) tiny per output (the last layer) or its l2 norm over all outputs.
    For the last layer also row_norms (m,) = ||w_i|| and abs_bias (m,) = |b_i|.
    limit: the largest finite value of the model dtype (no partial sum may pass it).
    """

    def __init__(self, sigma, sigma_abs, gamma_, bias_norm, underflow, row_norms=None, abs_bias=None,
                 limit=float(np.finfo(np.float32).max)):
        self.sigma, self.sigma_abs, self.gamma = float(sigma), float(sigma_abs), float(gamma_)
        self.bias_norm, self.underflow = float(bias_norm), float(underflow)
        self.row_norms, self.abs_bias = row_norms, abs_bias
        self.limit = float(limit)


def layer_constants(w, b, out_positions: int, sigma: float, sigma_abs: float, dtype, last: bool,
                    fan_in: int | None = None) -> LayerConstants:
    """LayerConstants for a layer with weight w (out, in, *taps), bias b (out,) broadcast over
    out_positions, sigma >= ||A_W||_2 and sigma_abs >= ||A_|W|||_2; fan_in: the terms of one
    output's sum without the bias (default the weight's, prod(w.shape[1:]))."""
    w64 = np.asarray(w, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    fan = int(np.prod(w64.shape[1:])) if fan_in is None else int(fan_in)
    # norms scaled by powers of two: squares of 1e-200 biases or weights underflow
    bias_norm = float(bounds.row_norms_up(b64[None, :])[0]) * math.sqrt(out_positions) * _INFLATE
    rows = absb = None
    if last:
        rows = bounds.row_norms_up(w64) * _INFLATE
        absb = np.abs(b64)
    per_output = (fan + 1) * float(np.finfo(dtype).smallest_subnormal)
    underflow = per_output if last else per_output * math.sqrt(w64.shape[0] * out_positions)
    return LayerConstants(sigma * _INFLATE, sigma_abs, gamma(fan, dtype), bias_norm,
                          underflow * _INFLATE, rows, absb, float(np.finfo(dtype).max))


def logit_error_bound(consts, x_sq_norm, input_err) -> np.ndarray:
    """(n, m) float64 bound on |f(x)_i - y_i| from the input norms alone; a row is inf
    where a layer may have overflowed (see the module docstring).

    consts: LayerConstants per layer, the last one with row_norms/abs_bias;
    x_sq_norm (n,): upper bound on ||ĥ_0||^2 (the input as fed, in the model dtype);
    input_err (n,): ||x - ĥ_0|| (0 when x already was in the model dtype).
    With Numba, one loop over the rows (the same float64 operations in the same order as
    logit_error_bound_reference, bit-identical).
    """
    if _bound_rows is None:
        return logit_error_bound_reference(consts, x_sq_norm, input_err)
    table = np.array([[c.sigma, c.sigma_abs, c.gamma, c.bias_norm, c.underflow, c.limit] for c in consts[:-1]],
                     dtype=np.float64).reshape(-1, 6)
    c = consts[-1]
    sq = np.ascontiguousarray(x_sq_norm, dtype=np.float64)
    e_in = np.ascontiguousarray(np.broadcast_to(np.asarray(input_err, dtype=np.float64), sq.shape))
    out = np.empty((sq.shape[0], c.row_norms.shape[0]))
    _bound_rows(sq, e_in, table, np.ascontiguousarray(c.row_norms, dtype=np.float64),
                np.ascontiguousarray(c.abs_bias, dtype=np.float64), c.gamma, c.underflow, c.limit,
                _INFLATE, _INFLATE ** 2, _TINY64, out)
    return out


def logit_error_bound_reference(consts, x_sq_norm, input_err) -> np.ndarray:
    """logit_error_bound in NumPy: the definition (see the module docstring)."""
    h = np.sqrt(x_sq_norm) * _INFLATE
    e = np.asarray(input_err, dtype=np.float64) * _INFLATE
    e = np.broadcast_to(e, h.shape)
    for c in consts[:-1]:
        s = c.sigma_abs * h + c.bias_norm         # bounds every partial sum of the layer
        local = (c.gamma * s + c.underflow) + 2 * _TINY64
        ok = (s + local) * _INFLATE <= c.limit    # False also for NaN
        e = np.where(ok, (c.sigma * e + local) * _INFLATE + _TINY64, np.inf)
        h = np.where(ok, ((c.sigma * h + c.bias_norm) + local) * _INFLATE + _TINY64, np.inf)
    c = consts[-1]
    s = h[:, None] * c.row_norms[None, :] + c.abs_bias[None, :]
    err = e[:, None] * c.row_norms[None, :] + c.gamma * s
    err = ((err + c.underflow) + 2 * _TINY64) * (_INFLATE ** 2)
    ok = ((s + err) * _INFLATE <= c.limit).all(axis=1)
    err[~ok] = np.inf
    return err

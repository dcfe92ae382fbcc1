"""A cheap, rigorous bound on the rounding error of a float32 forward pass.

Certification compares a float32 margin with eps·K_ij; the comparison is a proof only
after subtracting a bound on |f(x)_i - y_i|, where f is the network in exact arithmetic
and y the computed logits. ``GloroNet._forward_with_error`` bounds this per coordinate
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
sum). Every float64 step is inflated by a relative 1e-9 to cover its own rounding.
"""
from __future__ import annotations

import math

import numpy as np

from kernels import array_module

_INFLATE = 1.0 + 1e-9


def abs_operator_bound(w, kind: str) -> float:
    """Upper bound on ||A_|W|||_2 by the Schur test, in float64.

    w: conv weight (O, C, kh, kw) or dense weight (out, in). A row of the conv operator
    sums at most C·kh·kw kernel entries of one filter; a column (one input pixel) meets
    each (filter, tap) pair at most once, whatever the stride and padding.
    """
    a = np.abs(np.asarray(w, dtype=np.float64))
    if kind == "conv":
        row, col = a.sum(axis=(1, 2, 3)).max(), a.sum(axis=(0, 2, 3)).max()
    elif kind == "dense":
        row, col = a.sum(axis=1).max(), a.sum(axis=0).max()
    else:
        raise ValueError(f"kind must be 'conv' or 'dense', got {kind!r}")
    return math.sqrt(row * col) * _INFLATE


def gamma(fan_in: int, dtype) -> float:
    """gamma_{k+1} = (k+1) u / (1 - (k+1) u) for a dot product of length k plus a bias."""
    u = float(np.finfo(dtype).eps) / 2.0
    k = fan_in + 1
    return k * u / (1.0 - k * u)


def sq_norms(x2d) -> np.ndarray:
    """(n,) float64 upper bounds on the squared l2 norms of the rows of x2d (n, d).

    Summed in float64, where squares of float32 values neither underflow nor overflow
    (in float32 tiny inputs would square to 0 and make the bound vanish); a sum of d
    non-negative rounded squares is off by at most gamma_{d+1} relative, so the result is
    divided by (1 - gamma_{d+1}).
    """
    x64 = x2d.astype(np.float64)
    s = array_module(x64).einsum("ij,ij->i", x64, x64)
    s = np.asarray(s.get() if hasattr(s, "get") else s, dtype=np.float64)
    g = gamma(x2d.shape[1], np.float64)
    return s / (1.0 - g) * _INFLATE


class LayerConstants:
    """What the norm-wise bound needs of one linear layer (all float64 scalars/arrays).

    sigma: provable ||A_W||_2; sigma_abs: Schur bound on ||A_|W|||_2; gamma: see module;
    bias_norm: ||b|| broadcast over the output positions (conv: ||b|| sqrt(OH·OW));
    underflow: (k+1) tiny per output (the last layer) or its l2 norm over all outputs.
    For the last layer also row_norms (m,) = ||w_i|| and abs_bias (m,) = |b_i|.
    """

    def __init__(self, sigma, sigma_abs, gamma_, bias_norm, underflow, row_norms=None, abs_bias=None):
        self.sigma, self.sigma_abs, self.gamma = float(sigma), float(sigma_abs), float(gamma_)
        self.bias_norm, self.underflow = float(bias_norm), float(underflow)
        self.row_norms, self.abs_bias = row_norms, abs_bias


def layer_constants(kind, w, b, out_positions: int, sigma: float, dtype, last: bool) -> LayerConstants:
    """LayerConstants for a conv (w OIHW) or dense (w (out, in)) layer with bias b."""
    w64 = np.asarray(w, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    fan = int(np.prod(w64.shape[1:]))
    bias_norm = float(np.sqrt((b64 ** 2).sum() * out_positions)) * _INFLATE
    rows = absb = None
    if last:
        rows = np.sqrt((w64.reshape(w64.shape[0], -1) ** 2).sum(axis=1)) * _INFLATE
        absb = np.abs(b64)
    per_output = (fan + 1) * float(np.finfo(dtype).smallest_subnormal)
    underflow = per_output if last else per_output * math.sqrt(w64.shape[0] * out_positions)
    return LayerConstants(sigma * _INFLATE, abs_operator_bound(w64, kind), gamma(fan, dtype), bias_norm,
                          underflow * _INFLATE, rows, absb)


def logit_error_bound(consts, x_sq_norm, input_err) -> np.ndarray:
    """(n, m) float64 bound on |f(x)_i - y_i| from the input norms alone.

    consts: LayerConstants per layer, the last one with row_norms/abs_bias;
    x_sq_norm (n,): upper bound on ||ĥ_0||^2 (the input as fed, in the model dtype);
    input_err (n,): ||x - ĥ_0|| (0 when x already was in the model dtype).
    """
    h = np.sqrt(x_sq_norm) * _INFLATE
    e = np.asarray(input_err, dtype=np.float64) * _INFLATE
    for c in consts[:-1]:
        local = c.gamma * (c.sigma_abs * h + c.bias_norm) + c.underflow
        e = (c.sigma * e + local) * _INFLATE
        h = (c.sigma * h + c.bias_norm + local) * _INFLATE
    c = consts[-1]
    err = e[:, None] * c.row_norms[None, :] + c.gamma * (h[:, None] * c.row_norms[None, :] + c.abs_bias[None, :])
    err += c.underflow
    return err * (_INFLATE ** 2)

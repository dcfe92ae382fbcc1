"""Compiled loops of certification: squared input norms, the norm-wise rounding bound and
the decision, one pass over the rows each.

Each is the float64 arithmetic of a NumPy definition in gloro_core (rounding.sq_norms,
rounding.logit_error_bound_reference, decision.decide_reference), written as a loop in
the same order so that the results are bit-identical (tests/gloro_core/test_rounding.py,
test_decision.py). Without Numba every name here is None and the NumPy forms run.
"""
from __future__ import annotations

import numpy as np

try:
    from numba import njit
except Exception:  # no numba: callers use the NumPy definitions
    njit = None

if njit is None:
    sq_rows = bound_rows = decide_rows = None
else:
    # reassoc lets the sum vectorise (the bound holds for any order); no nnan/ninf, so a
    # float64 row whose squares overflow still gives inf (no bound, no certificate)
    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def sq_rows(x):
        """(n,) float64 sums of squares of the rows of x (n, d), float32 or float64."""
        n, d = x.shape
        out = np.empty(n)
        for i in range(n):
            s = 0.0
            for k in range(d):
                v = np.float64(x[i, k])
                s += v * v
            out[i] = s
        return out

    @njit(cache=True)
    def bound_rows(sq, e_in, table, row_norms, abs_bias, gamma_last, underflow_last, limit_last, inflate,
                   inflate2, tiny, out):
        """logit_error_bound_reference per row; table (layers - 1, 6): sigma, sigma_abs,
        gamma, bias_norm, underflow, limit of each hidden layer."""
        m = row_norms.shape[0]
        for r in range(sq.shape[0]):
            h = np.sqrt(sq[r]) * inflate
            e = e_in[r] * inflate
            for i in range(table.shape[0]):
                sig, sabs, gam, bn, uf, lim = (table[i, 0], table[i, 1], table[i, 2], table[i, 3],
                                               table[i, 4], table[i, 5])
                s = sabs * h + bn
                local = (gam * s + uf) + 2 * tiny
                if (s + local) * inflate <= lim:
                    e = (sig * e + local) * inflate + tiny
                    h = ((sig * h + bn) + local) * inflate + tiny
                else:
                    e = np.inf
                    h = np.inf
            ok = True
            for k in range(m):
                s = h * row_norms[k] + abs_bias[k]
                v = e * row_norms[k] + gamma_last * s
                v = ((v + underflow_last) + 2 * tiny) * inflate2
                out[r, k] = v
                if not (s + v) * inflate <= limit_last:
                    ok = False
            if not ok:
                for k in range(m):
                    out[r, k] = np.inf

    @njit(cache=True)
    def decide_rows(y64, err, k_pair, eps, c4, tiny, normal, maxf, j, ybot, certified, radius, bare_cert):
        """decide_reference's arithmetic per row, each float64 operation as NumPy orders it."""
        n, m = y64.shape
        for r in range(n):
            jr = 0                                  # np.argmax: the first NaN, else first max
            best = y64[r, 0]
            if best == best:
                for i in range(1, m):
                    v = y64[r, i]
                    if v != v:
                        jr = i
                        break
                    if v > best:
                        best, jr = v, i
            finite = True
            for i in range(m):
                if not (np.isfinite(y64[r, i]) and np.isfinite(err[r, i])):
                    finite = False
            yj, ej = y64[r, jr], err[r, jr]
            ayj = abs(yj)
            top = -np.inf
            top_bare = -np.inf
            rmin = np.inf
            for i in range(m):
                if i == jr:
                    continue
                y, k = y64[r, i], k_pair[jr, i]
                slack = err[r, i] + ej
                ek = eps * k
                cand = (y + slack) + ek
                cand += c4 * (((abs(y) + ayj) + slack) + ek) + 2 * tiny
                if cand > top or cand != cand:      # np.max propagates NaN
                    top = cand if top == top else top
                bare = y + ek
                bare += c4 * ((abs(y) + ayj) + ek) + 2 * tiny
                if bare > top_bare or bare != bare:
                    top_bare = bare if top_bare == top_bare else top_bare
                margin = ((yj - y) - slack) - (c4 * ((abs(y) + ayj) + slack) + 2 * tiny)
                if k > 0:
                    q = min(margin / k, maxf)
                elif margin > 0:
                    q = np.inf
                else:
                    q = 0.0
                if q < normal:                      # a quotient that underflowed may round up
                    q = q - tiny
                if q < rmin or q != q:              # NaN: radius 0 below
                    rmin = q if rmin == rmin else rmin
            j[r] = jr
            ybot[r] = top
            certified[r] = yj > top and finite
            bare_cert[r] = yj > top_bare and finite
            rad = rmin if (rmin > 0 and finite) else 0.0
            radius[r] = rad if certified[r] else min(rad, eps)

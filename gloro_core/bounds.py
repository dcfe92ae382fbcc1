"""Provable upper bounds on the l2 operator norm of dense and convolution layers.

Everything here is plain NumPy in float64 and has no autodiff: these numbers are
constants of a trained model, used by certification.

* Dense ``y = W x``: the norm is the largest singular value of W (LAPACK SVD).
* Convolution with zero padding and stride: an upper bound from the exact norm of
  a *circular* convolution on an enlarged torus, computed by FFT with a polyphase
  split for the stride (see :func:`conv_circular_bound` for the argument).

Floating point: an SVD in float64 returns the singular values of a matrix within
a relative error of order ``n * 2**-53`` of the largest one, the FFT adds
``O(log n * 2**-53)``. Both are far below :data:`SAFETY_REL`, by which every
provable bound is inflated so that it stays an upper bound of the real-arithmetic
norm of the (exactly representable) float32/float64 weights.

Scale: relative error bounds hold only away from underflow and overflow, and weights
of float64 nets may lie anywhere in 1e-308..1e308 (a Gram matrix of 1e-165 entries is
exactly 0). Every norm here is therefore computed on the weights scaled by a power of
two that brings the largest entry into [0.5, 1) (exact), and scaled back rounding up
(:func:`ldexp_up`): inf when the bound overflows, never 0 for a nonzero operator.
Products of bounds (K_sub, K_ij) are kept as (mantissa, exponent) pairs, rounded up
(:func:`product_up`).
"""
from __future__ import annotations

import math

import numpy as np

from kernels.checks import conv_out_hw, resolve_padding, check_stride

# Relative inflation covering float64 rounding in FFT + SVD (errors are ~1e-13 at most
# for the sizes used here; 1e-9 leaves four orders of magnitude of room).
SAFETY_REL = 1e-9


# the smallest float64 subnormal: the most a float64 product loses when it underflows
TINY = float(np.finfo(np.float64).smallest_subnormal)


def pow2_normalise(a):
    """(a * 2**-e, e) with the largest |entry| of the result in [0.5, 1); (a, 0) when a is
    empty, all zero or not finite. Exact, except for entries more than ~1022 binades below
    the largest one, which round in the subnormal range or flush to zero: each loses less
    than 2**-1074, negligible next to the norm (>= 0.5) and covered by SAFETY_REL."""
    a = np.asarray(a, dtype=np.float64)
    big = float(np.max(np.abs(a))) if a.size else 0.0
    if not (0.0 < big < math.inf):
        return a, 0
    e = math.frexp(big)[1]
    return np.ldexp(a, -e), e


def ldexp_up(x: float, e: int) -> float:
    """x * 2**e rounded up (x >= 0): inf on overflow; a result that falls into or below
    the subnormal range (where ldexp rounds) is moved up one step if it lost anything."""
    x = float(x)
    if not x > 0.0 or math.isinf(x):
        return x          # 0, inf and NaN scale to themselves
    try:
        r = math.ldexp(x, e)
    except OverflowError:
        return math.inf
    if r < math.ldexp(1.0, -1022):
        try:
            lost = r == 0.0 or math.ldexp(r, -e) < x   # scaling a subnormal back up is exact
        except OverflowError:                          # r was rounded up past x: nothing lost
            lost = False
        if lost:
            r = math.nextafter(r, math.inf)
    return r


def ldexp_up_array(a, e: int) -> np.ndarray:
    """:func:`ldexp_up` elementwise on a float64 array of values >= 0 (NaN stays NaN)."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore"):
        r = np.ldexp(a, e)          # inf on overflow; rounds where it lands below 2**-1022
        lost = (r < math.ldexp(1.0, -1022)) & (np.ldexp(r, -e) < a)
    return np.where(lost, np.nextafter(r, np.inf), r)


def row_norms_up(a) -> np.ndarray:
    """(n,) float64 upper bounds on the l2 norms of the rows of a (n, d), at any scale:
    computed on a scaled by a power of two, with d smallest subnormals for squares that
    underflow and 1e-9 relative for float64 rounding, and scaled back rounding up."""
    a = np.asarray(a, dtype=np.float64)
    a = a.reshape(a.shape[0], -1)
    s, e = pow2_normalise(a)
    n = np.sqrt((s * s).sum(axis=1) + a.shape[1] * TINY) * (1.0 + SAFETY_REL)
    return ldexp_up_array(n, e)


def product_up(values) -> tuple[float, int]:
    """prod(values) as (mantissa in [0.5, 1) or 0 or inf/NaN, exponent), rounded up.

    values: non-negative floats. Each float64 product of two mantissas is rounded up one
    step, so mantissa * 2**exponent >= the exact product; no underflow or overflow can
    occur on the way (np.prod of 1e-200 and 1e-200 is 0)."""
    m, e = 1.0, 0
    for v in values:
        v = float(v)
        if v < 0.0:
            raise ValueError(f"a norm bound must be >= 0, got {v}")
        if v == 0.0 or not math.isfinite(v):
            m = m * v            # 0 stays 0 (exact), inf and NaN stay, 0 * inf is NaN (no bound)
            continue
        fv, ev = math.frexp(v)
        prod = m * fv
        if prod != 0.0 and not math.isinf(prod):
            prod = math.nextafter(prod, math.inf)
            prod, shift = math.frexp(prod)
            m, e = prod, e + ev + shift
        else:
            m = prod
    return m, e


def dense_norm(w) -> float:
    """Exact spectral norm of a dense weight ``w`` (out, in), float64, inflated by SAFETY_REL
    (computed on the weight scaled by a power of two: see the module docstring)."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"dense weight must be 2-D (out, in), got shape {w.shape}")
    if w.size == 0:
        return 0.0
    ws, e = pow2_normalise(w)
    s = np.linalg.svd(ws, compute_uv=False)
    return ldexp_up(float(s[0]) * (1.0 + SAFETY_REL), e)


def _torus_size(n_padded: int, s: int) -> int:
    """Smallest multiple of ``s`` that is >= ``n_padded``."""
    return int(math.ceil(n_padded / s) * s)


def conv_circular_bound(w, in_hw, stride=1, padding="same", tori=3) -> float:
    """Upper bound on the l2 norm of the zero-padded strided conv, via FFT (float64).

    w (O, C, kh, kw); in_hw = (H, W) the layer's real input size; stride and padding as
    in kernels.conv2d. Returns a float >= ||A||_2 where A: R^{C*H*W} -> R^{O*OH*OW}:
    the smallest of the circular norms on ``tori`` torus sizes (the smallest admissible
    one, then enlarged by s, 2s, ...: each is an upper bound, see below, and a different
    frequency grid can land lower).

    Why it is an upper bound. Let (pt, pb, pl, pr) be the resolved padding and take a
    torus of size N1 x N2 with N1 >= H + pt + pb, N2 >= W + pl + pr, N1 divisible by sh
    and N2 by sw (enlarged to the next multiple when needed). Define

        E: x -> x placed at offset (pt, pl) on the torus, zeros elsewhere (an isometry);
        C: z[o, a, b] = sum_{c,p,q} w[o,c,p,q] t[c, (sh*a + p) mod N1, (sw*b + q) mod N2],
           a < N1/sh, b < N2/sw  (the strided circular convolution);
        P: keep the outputs a < OH, b < OW (a coordinate projection, norm <= 1).

    For a < OH the rows read are sh*a + p <= (OH-1)*sh + kh - 1 <= H + pt + pb - 1 < N1,
    so no index wraps and these rows see exactly the padded input: A = P C E, hence
    ||A|| <= ||C||. (OH <= N1/sh follows from the same inequality.) Enlarging the torus
    beyond H + pt + pb only adds zero rows/columns around the embedded signal, so the
    identity still holds; this is why the torus may be rounded up to a multiple of s.

    ||C|| exactly: split the torus input into sh*sw phases t_{r1,r2}[c, m1, m2] =
    t[c, sh*m1 + r1, sw*m2 + r2] (a permutation, so an isometry). With p = sh*u + r1,
    q = sw*v + r2, C is a stride-1 circular correlation on the M1 x M2 = (N1/sh) x (N2/sw)
    torus with C*sh*sw input channels and kernel w'[o, (c,r1,r2), u, v] =
    w[o, c, sh*u + r1, sw*v + r2]. Such an operator is block-diagonalised by the 2-D DFT:
    its singular values are those of the O x (C*sh*sw) matrices
    W_hat[k] = sum_{u,v} w'[:, :, u, v] exp(2 pi i (k1 u / M1 + k2 v / M2)) over all
    frequencies k (Sedghi, Gupta, Long, ICLR 2019), so ||C|| = max_k ||W_hat[k]||_2.
    (numpy's FFT uses exp(-...): the complex conjugate, same singular values. Taps with
    u >= M1 wrap and add, which is what the circular operator does.)
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"conv weight must be 4-D (O, C, kh, kw), got shape {w.shape}")
    sh, sw = check_stride(stride)
    o, c, kh, kw = w.shape
    h, wd = int(in_hw[0]), int(in_hw[1])
    pads = resolve_padding(padding, (h, wd), (kh, kw), (sh, sw))
    conv_out_hw((h, wd), (kh, kw), (sh, sw), pads)  # raises if the kernel does not fit
    pt, pb, pl, pr = pads
    ws, scale = pow2_normalise(w)
    best = np.inf
    for e in range(max(int(tori), 1)):
        n1 = _torus_size(h + pt + pb, sh) + e * sh
        n2 = _torus_size(wd + pl + pr, sw) + e * sw
        best = min(best, _circular_norm(ws, n1 // sh, n2 // sw, sh, sw))
    return ldexp_up(best * (1.0 + SAFETY_REL), scale)


def _circular_norm(w, m1, m2, sh, sw) -> float:
    """Exact norm of the strided circular conv on an (sh*m1) x (sw*m2) torus (float64)."""
    o, c, kh, kw = w.shape
    # polyphase kernel on the M1 x M2 torus, taps wrapping modulo the torus size
    kp = np.zeros((o, c, sh, sw, m1, m2), dtype=np.float64)
    for p in range(kh):
        u, r1 = divmod(p, sh)
        for q in range(kw):
            v, r2 = divmod(q, sw)
            kp[:, :, r1, r2, u % m1, v % m2] += w[:, :, p, q]
    kp = kp.reshape(o, c * sh * sw, m1, m2)
    what = np.fft.fft2(kp, axes=(2, 3))                     # (O, C s s, M1, M2) complex128
    mats = np.transpose(what, (2, 3, 0, 1)).reshape(m1 * m2, o, c * sh * sw)
    sv = np.linalg.svd(mats, compute_uv=False)              # (M1 M2, min(O, C s s))
    return float(sv.max())


# ------------------------------------------------------------ explicit operators (tests)

def conv_operator_matrix(w, in_shape, stride=1, padding="same", backend=None):
    """The conv's matrix, built by applying kernels.conv2d to every basis vector.

    w (O, C, kh, kw); in_shape = (C, H, W). Returns float64 (O*OH*OW, C*H*W) in the
    row-major (C, H, W) / (O, OH, OW) flattenings. Use on small layers only.
    """
    import kernels

    c, h, wd = (int(v) for v in in_shape)
    n = c * h * wd
    basis = np.eye(n, dtype=np.float64).reshape(n, c, h, wd)
    y = kernels.conv2d(basis, np.asarray(w, dtype=np.float64), None, stride, padding, backend=backend)
    return y.reshape(n, -1).T.copy()


def dense_operator_matrix(w, backend=None):
    """The dense layer's matrix built from basis vectors (equals W; a check of the kernel)."""
    import kernels

    w = np.asarray(w, dtype=np.float64)
    basis = np.eye(w.shape[1], dtype=np.float64)
    return kernels.dense(basis, w, None, backend=backend).T.copy()


def matrix_norm(a) -> float:
    """Largest singular value of a matrix (float64, no inflation; scaled by a power of two)."""
    a, e = pow2_normalise(a)
    if a.size == 0:
        return 0.0
    return ldexp_up(float(np.linalg.svd(a, compute_uv=False)[0]), e)


def conv_matrix_direct(w, in_hw, stride=1, padding="same"):
    """The zero-padded strided conv as an explicit float64 matrix, from index arithmetic.

    w (O, C, kh, kw); returns (O*OH*OW, C*H*W). Independent of the kernels (tests compare
    the two constructions). Entry [(o,i,j), (c,h,w)] = w[o, c, h + pt - i*sh, w + pl - j*sw].
    """
    w = np.asarray(w, dtype=np.float64)
    sh, sw = check_stride(stride)
    o, c, kh, kw = w.shape
    h, wd = int(in_hw[0]), int(in_hw[1])
    pads = resolve_padding(padding, (h, wd), (kh, kw), (sh, sw))
    oh, ow = conv_out_hw((h, wd), (kh, kw), (sh, sw), pads)
    pt, _, pl, _ = pads
    a = np.zeros((o, oh, ow, c, h, wd), dtype=np.float64)
    for i in range(oh):
        for j in range(ow):
            for p in range(kh):
                r = i * sh + p - pt
                if not 0 <= r < h:
                    continue
                for q in range(kw):
                    s = j * sw + q - pl
                    if 0 <= s < wd:
                        a[:, i, j, :, r, s] = w[:, :, p, q]
    return a.reshape(o * oh * ow, c * h * wd)


def _gram_norm_scaled(a) -> tuple[float, int]:
    """(n, e) with ||a||_2 ~= n * 2**e: eigvalsh of the smaller Gram matrix of ``a`` scaled
    into [0.5, 1) first (unscaled, squares below 1e-154 underflow: 1e-165 entries gave 0)."""
    a, e = pow2_normalise(a)
    if a.size == 0:
        return 0.0, 0
    g = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    return float(math.sqrt(max(np.linalg.eigvalsh(g)[-1], 0.0))), e


def matrix_norm_gram(a) -> float:
    """||a||_2 via eigvalsh of the smaller Gram matrix (float64, no inflation)."""
    n, e = _gram_norm_scaled(a)
    return ldexp_up(n, e)


# operators whose smaller side is at most this many and whose matrix has at most
# EXPLICIT_MAX_ENTRIES entries get an exact norm from the explicit matrix
EXPLICIT_MAX_SIDE = 2048
EXPLICIT_MAX_ENTRIES = 8_000_000


def conv_provable_bound(w, in_hw, stride=1, padding="same", method="auto"):
    """Provable upper bound of the zero-padded strided conv's l2 norm; returns (bound, method).

    method: "fft" (the circular-torus bound of :func:`conv_circular_bound`), "explicit"
    (the exact norm of the explicit operator matrix, inflated by SAFETY_REL; small layers
    only), or "auto": the smaller of the two where the explicit matrix is small enough
    (both are upper bounds, so their minimum is one), else "fft".
    """
    w64 = np.asarray(w, dtype=np.float64)
    fft = conv_circular_bound(w64, in_hw, stride, padding)
    if method == "fft":
        return fft, "fft"
    o, c, kh, kw = w64.shape
    sh, sw = check_stride(stride)
    h, wd = int(in_hw[0]), int(in_hw[1])
    pads = resolve_padding(padding, (h, wd), (kh, kw), (sh, sw))
    oh, ow = conv_out_hw((h, wd), (kh, kw), (sh, sw), pads)
    n_in, n_out = c * h * wd, o * oh * ow
    small = min(n_in, n_out) <= EXPLICIT_MAX_SIDE and n_in * n_out <= EXPLICIT_MAX_ENTRIES
    if method == "explicit" and not small:
        raise ValueError(
            f"explicit bound needs the {n_out}x{n_in} operator matrix, over the limits "
            f"(side {EXPLICIT_MAX_SIDE}, {EXPLICIT_MAX_ENTRIES} entries); use 'fft' or 'auto'")
    if method == "explicit" or (method == "auto" and small):
        n, e = _gram_norm_scaled(conv_matrix_direct(w64, (h, wd), (sh, sw), padding))
        exact = ldexp_up(n * (1.0 + SAFETY_REL), e)  # inflated before scaling back
        if method == "explicit" or exact < fft:
            return exact, "explicit"
        return fft, "fft"
    if method != "auto":
        raise ValueError(f"method must be 'auto', 'fft' or 'explicit', got {method!r}")
    return fft, "fft"

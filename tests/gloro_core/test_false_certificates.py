"""No false certificate at any scale: certificates checked against exact rational arithmetic.

A certificate claims, for the network f evaluated in exact arithmetic with the stored
weights: argmax f(x) = j, and f_j(x) - f_i(x) > eps K_ij for every i != j, where K_ij =
K_sub ||w_j - w_i|| is the product of the true layer norms (margin variant). The oracle
computes f(x) with fractions.Fraction, and a rational *lower* bound of K_ij^2 from
||A v||^2 / ||v||^2 at the float64 top singular vector v of each layer (exact arithmetic
on A and v). A certificate that fails against a lower bound of K fails against K.

F1-F3 are the red team's cases (explicit conv bound underflowing, K_sub product
underflowing, a float32 hidden layer overflowing); the property test finds each of them
on the code before the fix.
"""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from gloro_core import bounds

# overflow and underflow are what these tests are about
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
from gloro_core.model import GloroNet


# ---------------------------------------------------------------- exact oracle

def _layer_matrices(net):
    """[(A float64 (out, in), bias per output float64, skip)] of every layer, entries
    exact; the layer computes A h + b, plus h where skip (a residual block: I + A, kept
    apart because w + 1 need not be a float).

    A dense layer's A is its effective weight (a NormalizedDense's rows as the forward
    pass computes them in the model dtype: the network a certificate is about)."""
    out = []
    for op in net.layers:
        if not op.parametric:   # linear, exact entries (a permutation): its matrix from basis vectors
            n = int(np.prod(op.in_shape))
            a = np.asarray(op.apply(None, np.eye(n).reshape((n,) + op.in_shape))).reshape(n, -1).T
            out.append((a, np.zeros(a.shape[0]), False))
            continue
        w64 = np.asarray(op.effective_weight(), dtype=np.float64)
        b64 = np.asarray(op.bias.data, dtype=np.float64)
        if op.kind in ("conv", "liresnet"):
            a = bounds.conv_matrix_direct(w64, op.in_shape[1:], op.stride, op.padding)
            bias = np.repeat(b64, int(np.prod(op.out_shape[1:])))
        else:
            a, bias = w64, b64
        out.append((a, bias, op.kind == "liresnet"))
    return out


def _exact_logits(net, mats, x):
    """f(x) in exact arithmetic: list of Fractions (m,). x: one input, any float dtype."""
    h = [Fraction(float(v)) for v in np.asarray(x, dtype=np.float64).ravel()]
    for i, (a, bias, skip) in enumerate(mats):
        h = [sum((Fraction(float(a[r, c])) * h[c] for c in range(a.shape[1]) if a[r, c] != 0),
                 Fraction(float(bias[r])) + (h[r] if skip else 0)) for r in range(a.shape[0])]
        if i < len(mats) - 1 and net.layers[i].activated:
            if net.activation == "relu":
                h = [max(v, Fraction(0)) for v in h]
            else:   # MinMax on channel pairs (2k, 2k+1), each channel a block of positions
                per = len(h) // net.layers[i].out_shape[0]
                for k in range(0, len(h) // per, 2):
                    for p in range(per):
                        lo, hi = k * per + p, (k + 1) * per + p
                        h[lo], h[hi] = min(h[lo], h[hi]), max(h[lo], h[hi])
    return h


def _norm_sq_lower(a, skip=False):
    """A rational lower bound of ||a + skip I||_2^2: ||(a + skip I) v||^2 / ||v||^2 at a
    float64 top singular vector v (any v gives a lower bound; this one is nearly tight)."""
    if skip:
        v = np.linalg.svd(a + np.eye(a.shape[0]))[2][0]
    elif not np.any(a):
        return Fraction(0)
    else:
        v = np.linalg.svd(a / np.max(np.abs(a)))[2][0]   # (scaled: the SVD of 1e-300 entries)
    vf = [Fraction(float(t)) for t in v]
    av = [sum((Fraction(float(a[r, c])) * vf[c] for c in range(a.shape[1]) if a[r, c] != 0),
              vf[r] if skip else Fraction(0)) for r in range(a.shape[0])]
    return sum(t * t for t in av) / sum(t * t for t in vf)


def _k_sq_lower(mats):
    """(m, m) nested list: rational lower bounds of K_ji^2 = K_sub^2 ||w_j - w_i||^2."""
    k_sub_sq = Fraction(1)
    for a, _, skip in mats[:-1]:
        k_sub_sq *= _norm_sq_lower(a, skip)
    w = mats[-1][0]
    wf = [[Fraction(float(t)) for t in row] for row in w]
    m = len(wf)
    return [[k_sub_sq * sum((p - q) ** 2 for p, q in zip(wf[j], wf[i])) for i in range(m)] for j in range(m)]


def check_error_bounds(net, x, mats):
    """Both rounding bounds (the norm-wise and the per-coordinate one) cover the real
    error of their own pass's logits wherever they are finite: |y_i - f_i(x)| <= err_i.
    Returns the largest log2(error / bound) seen (for hypothesis.target), -inf if none."""
    worst = -np.inf
    passes = [net._forward_norm_error(x, net._fresh_frozen()), net._forward_with_error(x)]
    for name, (y, err) in zip(("norm-wise", "tight"), passes):
        for n in range(len(x)):
            if not (np.isfinite(y[n]).all() and np.isfinite(err[n]).all()):
                continue
            f = _exact_logits(net, mats, x[n])
            for i, fi in enumerate(f):
                actual = abs(Fraction(float(y[n, i])) - fi)
                assert actual <= Fraction(float(err[n, i])), (
                    f"{name} bound: logit {i} of point {n} is {float(y[n, i])}, exact {float(fi)}, "
                    f"error {float(actual)} > bound {float(err[n, i])}")
                if actual > 0:
                    worst = max(worst, float(np.log2(float(actual))) - float(np.log2(max(float(err[n, i]), 1e-320))))
    return worst


def check_against_exact(net, x, eps):
    """Assert every certificate of net.certify(x, eps) (both radius modes) holds exactly."""
    mats = _layer_matrices(net)
    k_sq = None
    for tight in (True, False):
        pred, radius = net.certify(x, eps=eps, tight_radius=tight)
        assert np.all(radius >= 0) and not np.any(np.isnan(radius))
        assert np.all(radius[pred < 0] <= eps), "a rejected point has a radius beyond eps"
        for n in np.flatnonzero((pred >= 0) | (radius > 0)):
            f = _exact_logits(net, mats, x[n])
            j = int(pred[n]) if pred[n] >= 0 else max(range(len(f)), key=lambda i: f[i])
            if k_sq is None:
                k_sq = _k_sq_lower(mats)
            r = float(radius[n])
            for i in range(len(f)):
                if i == j:
                    continue
                margin = f[j] - f[i]
                assert margin > 0, (f"point {n}: certified class {j} (radius {r}, eps {eps}) but the "
                                    f"exact logits are {[float(v) for v in f]}")
                if pred[n] >= 0:
                    assert margin * margin > Fraction(eps) ** 2 * k_sq[j][i], (
                        f"point {n}: exact margin {float(margin)} to class {i} <= eps K_true "
                        f"(K_true >= {float(k_sq[j][i]) ** 0.5}, eps {eps})")
                if r == np.inf:
                    assert k_sq[j][i] == 0, f"point {n}: radius inf, but K_true > 0"
                else:
                    assert margin * margin >= Fraction(r) ** 2 * k_sq[j][i], (
                        f"point {n}: radius {r} but the exact margin {float(margin)} to class {i} "
                        f"allows only {float(margin) / float(k_sq[j][i]) ** 0.5}")


def _net(dtype, shape, layers, weights, biases, activation="relu"):
    net = GloroNet(shape, layers[-1]["units"], layers, activation=activation, dtype=dtype, eps=0.0)
    for (w, b), wv, bv in zip(net.params, weights, biases):
        w.data = np.ascontiguousarray(np.asarray(wv, dtype=np.float64).reshape(w.data.shape), dtype=dtype)
        b.data = np.ascontiguousarray(np.asarray(bv, dtype=np.float64).reshape(b.data.shape), dtype=dtype)
    return net


# ---------------------------------------------------------------- the red team's cases

def test_f1_explicit_conv_bound_at_1e_minus_166():
    """F1: sqrt(eigvalsh(A A^T)) underflowed (0 at 1e-165): the bound was 0, radius inf."""
    rng = np.random.default_rng(1)
    layers = [{"type": "conv", "filters": 2, "kernel": 3, "padding": "same"}, {"type": "dense", "units": 2}]
    w0 = rng.standard_normal((2, 1, 3, 3)) * 1e-166
    net = _net(np.float64, (1, 4, 4), layers, [w0, rng.standard_normal((2, 32)) * 1e150],
               [np.zeros(2), np.zeros(2)])
    exact = np.linalg.norm(bounds.conv_matrix_direct(w0 * 1e166, (4, 4)), 2) * 1e-166
    for method in ("auto", "explicit", "fft"):
        bound, _ = bounds.conv_provable_bound(w0, (4, 4), method=method)
        unit, _ = bounds.conv_provable_bound(w0 * 1e166, (4, 4), method=method)  # the same at scale 1
        assert exact <= bound and bound == pytest.approx(unit * 1e-166, rel=1e-6), (method, bound, exact)
    x = rng.random((8, 1, 4, 4))
    pred, radius = net.certify(x, eps=1.0)
    assert np.all(np.isfinite(radius))
    check_against_exact(net, x, 1.0)


def test_f2_k_sub_product_underflow():
    """F2: per-layer bounds 1e-200 each: np.prod gave K_sub = 0 and radius inf."""
    rng = np.random.default_rng(2)
    layers = [{"type": "dense", "units": 4}, {"type": "dense", "units": 4}, {"type": "dense", "units": 2}]
    ws = [rng.standard_normal((4, 4)) * 1e-200, rng.standard_normal((4, 4)) * 1e-200,
          rng.standard_normal((2, 4)) * 1e150]
    net = _net(np.float64, (4,), layers, ws, [np.zeros(4), np.zeros(4), np.array([0.0, 1e-248])])
    lip = net.update_lipschitz()
    m, e = net._frozen["k_sub_scaled"]["provable"]
    assert m > 0 and lip["k_sub"] == 0.0          # the float report underflows, the product does not
    k = net._pair_k(net._frozen["k_sub_scaled"]["provable"])
    assert k[0, 1] > 0 and np.isfinite(k[0, 1])
    x = rng.random((16, 4))
    for eps in (1e152, 1e100, 1e-300):
        pred, radius = net.certify(x, eps=eps)
        assert np.all(np.isfinite(radius))
        check_against_exact(net, x, eps)


def test_f2_overflowing_row_differences_give_no_certificate():
    """K_ij = 0 * inf was NaN, and certify returned ⊥ *with radius inf*."""
    layers = [{"type": "dense", "units": 2}, {"type": "dense", "units": 2}]
    net = _net(np.float64, (2,), layers, [np.zeros((2, 2)), np.array([[1e300, -1e300], [-1e300, 1e300]])],
               [np.zeros(2), np.array([1.0, 0.0])])
    pred, radius = net.certify(np.array([[0.5, 0.5]]), eps=1.0)
    # the hidden layer is 0, so f = b exactly and K_sub = 0: class 0 at any radius
    assert pred[0] == 0 and radius[0] == np.inf
    check_against_exact(net, np.array([[0.5, 0.5]]), 1.0)
    net.params[0][0].data = np.array([[1e-300, 0.0], [0.0, 1e-300]])
    pred, radius = net.certify(np.array([[0.5, 0.5]]), eps=1.0)
    assert np.all(np.isfinite(radius))
    check_against_exact(net, np.array([[0.5, 0.5]]), 1.0)


def test_f3_float32_hidden_layer_overflow():
    """F3: products of 2e8 and 2e30 overflow float32; sgemm gave -inf, ReLU made it 0, and
    the logits (0, 1000) were certified as class 1 (exact: class 0)."""
    layers = [{"type": "dense", "units": 2}, {"type": "dense", "units": 2}]
    net = _net(np.float32, (2,), layers, [[[-2e8, 2e8], [1, 1]], [[1e-30, 0], [0, 0]]],
               [[0, 0], [0, 1000]])
    x = np.array([[2e30, 2.5e30], [2e30, 2.5e30]], dtype=np.float32)
    for backend_pred in (net.certify(x, eps=1.0), net.certify(x, eps=1.0, tight_radius=False)):
        pred, radius = backend_pred
        assert np.all(pred == -1) and np.all(radius == 0)
    check_against_exact(net, x, 1.0)


def test_non_finite_logits_never_certify():
    """An input that overflows on the cast to float32 (finite as float64) gives inf logits."""
    layers = [{"type": "dense", "units": 2}, {"type": "dense", "units": 2}]
    net = _net(np.float32, (2,), layers, [[[1, 0], [0, 1]], [[1, 0], [0, 1]]], [[0, 0], [0, 0]])
    pred, radius = net.certify(np.array([[1e300, 0.0]]), eps=1.0)
    assert pred[0] == -1 and radius[0] == 0


# ---------------------------------------------------------------- property test

ARCHS = [
    ((3,), [{"type": "dense", "units": 2}]),
    ((2,), [{"type": "dense", "units": 2}, {"type": "dense", "units": 2}]),
    ((4,), [{"type": "dense", "units": 4}, {"type": "dense", "units": 4}, {"type": "dense", "units": 3}]),
    ((1, 4, 4), [{"type": "conv", "filters": 2, "kernel": 3, "padding": "same"}, {"type": "dense", "units": 2}]),
    ((1, 3, 3), [{"type": "conv", "filters": 2, "kernel": 2, "stride": 1, "padding": "valid"},
                 {"type": "dense", "units": 2}, {"type": "dense", "units": 3}]),
    ((2, 4, 4), [{"type": "conv", "filters": 2, "kernel": 2, "stride": 2, "padding": "same"},
                 {"type": "dense", "units": 2}]),
    # last-layer normalisation: K_ij from the normalised rows as computed in the model dtype
    ((3,), [{"type": "dense", "units": 4}, {"type": "dense", "units": 3, "normalize": True}]),
    ((1, 4, 4), [{"type": "conv", "filters": 2, "kernel": 3, "padding": "same"}, {"type": "invdown"},
                 {"type": "dense", "units": 2}]),
    # (size 2: the oracle's entries 1/4 are exact)
    ((2, 4, 4), [{"type": "avgpool", "size": 2}, {"type": "dense", "units": 2}, {"type": "dense", "units": 2}]),
    ((2, 3, 3), [{"type": "liresnet", "kernel": 3}, {"type": "dense", "units": 2}]),
]
SCALES = {np.float64: (-300, 300), np.float32: (-40, 37)}   # exponents of 10 the weights may take


@st.composite
def magnitude(draw, lo, hi):
    """An exponent of 10, often near the ends of the dtype's range (underflow, overflow)."""
    return draw(st.one_of(st.integers(lo, hi), st.integers(hi - 1, hi + 4), st.integers(lo - 6, lo + 3)))


@st.composite
def tiny_nets(draw, dtype, overflow=False):
    """(net, x (n, *shape), eps): a tiny net whose layers' outputs have drawn magnitudes
    (so sums overflow or underflow where the draw says), with biases near those
    magnitudes (margins near the rounding bounds), weights of mixed signs.
    overflow=True: the first layer's sums lie around the dtype's largest value."""
    lo, hi = SCALES[dtype]
    shape, hidden = ARCHS[draw(st.integers(1 if overflow else 0, len(ARCHS) - 1))]
    activation = draw(st.sampled_from(["relu", "minmax"]))
    layers = [dict(d) for d in hidden]
    net = GloroNet(shape, layers[-1]["units"], layers, activation=activation, dtype=dtype, eps=0.0)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    # of the input (finite in the dtype)
    level = draw(st.integers(hi - 10, hi)) if overflow else min(draw(magnitude(lo, hi)), hi)
    n = draw(st.integers(1, 3))
    x = rng.uniform(-1, 1, (n,) + shape) * 10.0 ** level
    if draw(st.booleans()):
        x = np.abs(x)
    for i, layer in enumerate(net.weighted):   # fixed layers (invdown, avgpool) keep the magnitude
        w, b = layer.weight, layer.bias
        # of this layer's output
        out = draw(st.integers(hi - 1, hi + 4)) if overflow and i == 0 else draw(magnitude(lo, hi))
        gain = int(np.clip(out - level - np.log10(np.prod(w.data.shape[1:])) / 2, lo, hi))
        w.data = (rng.uniform(-1, 1, w.data.shape) * 10.0 ** gain).astype(dtype)
        scale = draw(st.one_of(st.just(None), st.integers(-12, 3)))
        scale = 0.0 if scale is None else 10.0 ** int(np.clip(out + scale, lo, hi))
        b.data = (rng.uniform(-1, 1, b.data.shape) * scale).astype(dtype)
        level = max(level, out) if layer.kind == "liresnet" else out   # (x passes through a residual)
    eps = draw(st.one_of(st.just(0.0), st.integers(-300, 300).map(lambda k: 10.0 ** k)))
    return net, x.astype(dtype), eps


@pytest.mark.parametrize("dtype, overflow, examples", [(np.float64, False, 150), (np.float32, False, 300),
                                                      (np.float32, True, 1000), (np.float64, True, 100)],
                         ids=["float64", "float32", "float32-overflow", "float64-overflow"])
def test_certificates_hold_in_exact_arithmetic_at_any_scale(dtype, overflow, examples):
    """Random tiny nets, derandomized (the same examples every run). A float64 example costs
    ~0.2 s (its Fractions are long), a float32 one ~20 ms."""
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(tiny_nets(dtype, overflow))
    def run(case):
        net, x, eps = case
        with np.errstate(all="ignore"):
            worst = check_error_bounds(net, x, _layer_matrices(net))
            if np.isfinite(worst):
                target(worst)   # steer towards passes whose error nears its bound
            check_against_exact(net, x, eps)

    run()

"""Schedules for eps, TRADES lambda and the learning rate (paper App. B), in epochs.

A schedule is a callable ``s(t) -> float`` where ``t`` is the (possibly fractional)
number of epochs elapsed since the schedule started: ``t = epoch + step / steps``,
so values interpolate per step where natural; epoch-wise values are ``s(epoch)``.

Spec strings:

- eps: ``single`` (eps_train throughout), ``x,y,e`` (linear from x to y over e epochs,
  then eps_train), ``log`` (grows logarithmically from ~0 to eps_train over the first
  half of training, then eps_train).
- lambda: a constant (``1.5``) or ``x,y,e`` (linear then constant y).
- lr: ``fixed``, ``decay_to_lb`` (constant, then from epoch ``epochs/2`` exponential
  decay reaching ``lb`` at the last epoch), ``cosine`` (half a cosine from lr at t = 0 down to
  ``lb`` at t = epochs) or ``step`` (lr times ``gamma`` at each of the ``steps``, epochs or
  percentages of the run, e.g. ``50%,75%``). Any of them can start with ``warmup`` epochs of
  linear warm-up (lr t / warmup) and lag ``lag`` epochs (lr of epoch t = schedule(t - lag);
  the authors' Keras callback lags one epoch, GLORO.md section 7).
- An ``e`` (epochs) in ``x,y,e`` may be a percentage of the run's epochs, ``x,y,50%``, so a
  recipe's schedules scale with ``--epochs``.
Warm-up epochs of standard training come before all of these; the trainer offsets ``t``.
A schedule's parameters are checked when it is made, which covers every value it can take
(ramps lie between their ends), so a bad one fails before training, not epochs into it.
"""
from __future__ import annotations

import math


class Schedule:
    """Callable schedule with a readable description (for logs and checkpoints)."""

    def __init__(self, fn, spec: str):
        self._fn = fn
        self.spec = spec

    def __call__(self, t: float) -> float:
        t = float(t)
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"schedule time must be finite and >= 0, got {t}")
        return float(self._fn(t))

    def __repr__(self):
        return f"Schedule({self.spec!r})"


def _epochs_value(text: str, epochs: float | None) -> float:
    """'12' -> 12.0; '50%' -> 0.5 epochs (ValueError for '50%' when ``epochs`` is None)."""
    text = text.strip()
    if text.endswith("%"):
        if epochs is None:
            raise ValueError("a percentage needs the run's length")
        return float(text[:-1]) / 100.0 * epochs
    return float(text)


def _parse_linear(spec: str, flag: str, epochs: float | None = None) -> tuple[float, float, float]:
    """'x,y,e' -> numbers, each finite, x and y >= 0 (eps and lambda are never negative;
    a linear schedule's values lie between x and y, so this checks the whole ramp).
    e may be a percentage of ``epochs`` ('x,y,50%')."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 3:
        raise ValueError(f"{flag} {spec!r}: expected 'x,y,e'")
    try:
        x, y = float(parts[0]), float(parts[1])
        e = _epochs_value(parts[2], epochs)
    except ValueError:
        raise ValueError(f"{flag} {spec!r}: 'x,y,e' must be numbers") from None
    if not (math.isfinite(e) and e > 0):
        raise ValueError(f"{flag} {spec!r}: e must be a finite number of epochs > 0, got {e}")
    for name, v in (("x", x), ("y", y)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{flag} {spec!r}: values must be finite and >= 0 over the "
                             f"whole run, got {name}={v:g}")
    return x, y, e


def linear(x: float, y: float, e: float, after: float | None = None) -> Schedule:
    """x + (y - x) t / e for t <= e, then ``after`` (default y)."""
    after = y if after is None else after

    def fn(t):
        return x + (y - x) * t / e if t <= e else after
    return Schedule(fn, f"{x},{y},{e:g}")


def eps_schedule(spec: str, eps_train: float, epochs: int) -> Schedule:
    """eps schedule from its spec; ``epochs`` is the number of GloRo (non-warm-up) epochs."""
    if eps_train < 0 or not math.isfinite(eps_train):
        raise ValueError(f"eps_train must be finite and >= 0, got {eps_train}")
    spec = (spec or "single").strip()
    if spec == "single":
        return Schedule(lambda t: eps_train, "single")
    if spec == "log":
        half = max(epochs / 2.0, 1e-12)
        # eps_t = eps_train * log(1 + 9 t/half) / log(10): ~0 at t=0, eps_train at t=half.
        # (Reference code grows in log space; this reaches the same end points.)
        def fn(t):
            if t >= half:
                return eps_train
            return eps_train * math.log1p(9.0 * t / half) / math.log(10.0)
        return Schedule(fn, "log")
    x, y, e = _parse_linear(spec, "--eps-schedule", epochs)
    return linear(x, y, e, after=eps_train)


def lam_schedule(spec: str | float | None, epochs: float | None = None) -> Schedule:
    """TRADES lambda: a constant or 'x,y,e' (linear from x to y over e epochs, then y)."""
    if spec is None:
        spec = "1.0"
    if isinstance(spec, (int, float)):
        spec = repr(float(spec))
    spec = spec.strip()
    if "," not in spec:
        try:
            v = float(spec)
        except ValueError:
            raise ValueError(f"--lam {spec!r}: expected a number or 'x,y,e'") from None
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"--lam {spec!r}: lambda must be finite and >= 0")
        return Schedule(lambda t: v, f"{v:g}")
    return linear(*_parse_linear(spec, "--lam", epochs))


LR_SCHEDULES = ("fixed", "decay_to_lb", "cosine", "step")


def parse_steps(text: str, epochs: float) -> list[float]:
    """'50%,75%' or '10,15' -> increasing epochs in (0, epochs]."""
    try:
        steps = [_epochs_value(p, epochs) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--lr-steps {text!r}: expected epochs or percentages, "
                         "e.g. '50%,75%'") from None
    if not steps or any(not (math.isfinite(s) and 0 < s <= epochs) for s in steps) \
            or steps != sorted(steps):
        raise ValueError(f"--lr-steps {text!r}: expected increasing epochs in (0, {epochs}]")
    return steps


def lr_schedule(spec: str, lr: float, epochs: int, lb: float = 1e-6, *, steps="50%,75%",
                gamma: float = 0.1, warmup: float = 0.0, lag: float = 0.0) -> Schedule:
    """Learning rate: 'fixed', 'decay_to_lb' (constant lr until epochs/2, then
    exponential decay reaching ``lb`` at t = epochs), 'cosine' (lb + (lr - lb)(1 + cos(pi
    t / epochs)) / 2) or 'step' (lr gamma^(number of ``steps`` <= t)); then ``warmup`` and
    ``lag`` (see the module doc)."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be finite and > 0, got {lr}")
    for name, v in (("--lr-warmup", warmup), ("--lr-lag", lag)):
        if not (math.isfinite(v) and 0 <= v <= epochs):
            raise ValueError(f"{name} must be a number of epochs in [0, {epochs}], got {v}")
    base = _lr_base(spec, lr, epochs, lb, steps, gamma)
    if not warmup and not lag:
        return base

    def fn(t):
        ramp = min(1.0, t / warmup) if warmup else 1.0
        return ramp * base(max(0.0, t - lag))
    return Schedule(fn, f"{base.spec},warmup={warmup:g},lag={lag:g}")


def _lr_base(spec, lr, epochs, lb, steps, gamma) -> Schedule:
    spec = (spec or "fixed").strip()
    if spec in ("fixed", "constant", "none"):
        return Schedule(lambda t: lr, "fixed")
    if spec == "cosine":
        if not 0 <= lb <= lr:
            raise ValueError(f"--lr-lb must be in [0, --lr={lr}], got {lb}")

        def cos(t):
            return lb + (lr - lb) * 0.5 * (1.0 + math.cos(math.pi * min(t / epochs, 1.0)))
        return Schedule(cos, f"cosine({lb:g})")
    if spec == "step":
        if not (math.isfinite(gamma) and 0 < gamma <= 1):
            raise ValueError(f"--lr-gamma must be in (0, 1], got {gamma}")
        at = parse_steps(steps, epochs)
        return Schedule(lambda t: lr * gamma ** sum(t >= s for s in at),
                        f"step({','.join(f'{s:g}' for s in at)};{gamma:g})")
    if spec == "decay_to_lb":
        if not 0 < lb <= lr:
            raise ValueError(f"--lr-lb must be in (0, --lr={lr}], got {lb}")
        start = epochs / 2.0
        span = max(epochs - start, 1e-12)
        rate = math.log(lb / lr) / span  # lr * exp(rate * span) = lb

        def fn(t):
            if t <= start:
                return lr
            return max(lb, lr * math.exp(rate * min(t - start, span)))
        return Schedule(fn, f"decay_to_lb({lb:g})")
    raise ValueError(f"unknown lr schedule {spec!r}; choose one of {', '.join(LR_SCHEDULES)}")


class Plan:
    """All schedules of a run, indexed by absolute (fractional) epoch including warm-up.

    Epochs [0, warmup) are standard training (eps 0, no GloRo loss); GloRo schedules
    start at epoch ``warmup``. The lr schedule runs over the whole run.
    """

    def __init__(self, *, epochs: int, warmup: int = 0, eps_train: float, eps_spec="single",
                 lam_spec=None, lr: float = 1e-3, lr_spec="fixed", lr_lb: float = 1e-6,
                 lr_steps="50%,75%", lr_gamma: float = 0.1, lr_warmup: float = 0.0,
                 lr_lag: float = 0.0):
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        if not 0 <= warmup <= epochs:
            raise ValueError(f"warmup must be in [0, epochs={epochs}], got {warmup}")
        self.epochs, self.warmup = epochs, warmup
        self.eps = eps_schedule(eps_spec, eps_train, epochs - warmup)
        self.lam = lam_schedule(lam_spec, epochs - warmup)
        self.lr = lr_schedule(lr_spec, lr, epochs, lr_lb, steps=lr_steps, gamma=lr_gamma,
                              warmup=lr_warmup, lag=lr_lag)

    def is_warmup(self, t: float) -> bool:
        return t < self.warmup

    def at(self, t: float) -> dict:
        """Values at absolute time t (epochs, fractional): eps, lam, lr, warmup flag."""
        warm = self.is_warmup(t)
        g = max(0.0, t - self.warmup)
        return {"eps": 0.0 if warm else self.eps(g), "lam": self.lam(g),
                "lr": self.lr(t), "warmup": warm}

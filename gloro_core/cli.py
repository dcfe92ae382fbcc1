"""Command line: ``python -m gloro_core {train,certify,attack,lipschitz} --help``.

Under ``mpiexec -n K`` (``distributed.world()``) train is data-parallel, certify and attack
split the test set by whole batches, and rank 0 alone prints; an error on any rank ends
the whole job (``distributed.fail``)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tracemalloc

import numpy as np


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("on", "yes", "true", "1"):
        return True
    if t in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


def _pos_int(text: str) -> int:
    # argparse's int takes 0 and negatives: --limit 0 certified everything (a limit of 0 is
    # falsy), --limit -1 dropped a point, --steps 0 divided by zero, --batch 0 failed in range(0, n, 0)
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _nonneg_float(text: str) -> float:
    v = _float_or_nan(text)
    if not (math.isfinite(v) and v >= 0):  # float() takes "nan", "inf", "-1"
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def _pos_float(text: str) -> float:
    v = _float_or_nan(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def _val_count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number of points >= 0, got {text!r}")
    return v


def _epochs_arg(text: str) -> str:
    """'N' or 'P%' (resolved against --epochs in cmd_train)."""
    t = text.strip()
    try:
        v = float(t[:-1]) if t.endswith("%") else int(t)
    except ValueError:
        v = -1
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected epochs >= 0 or a percentage, got {text!r}")
    return t


def _shape(text: str) -> tuple:
    try:
        s = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W, got {text!r}") from None
    if len(s) != 3 or min(s) <= 0:
        raise argparse.ArgumentTypeError(f"expected C,H,W with positive sizes, got {text!r}")
    return s


def _data_args(p, default_dataset=None):
    p.add_argument("--dataset", default=default_dataset,
                   help="synthetic, mnist, fashion-mnist, kmnist, cifar10, tiny-imagenet "
                        "(default for evaluation commands: the checkpoint's)")
    p.add_argument("--data-dir", default=None,
                   help="directory holding the dataset files (fashion-mnist defaults to "
                        "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--limit", type=_pos_int, default=None, help="use only the first N points (train: N train and, unless --test-limit, "
                        "N test points; evaluation commands: N test points)")
    p.add_argument("--synthetic-shape", type=_shape, default=None,
                   help="C,H,W of the synthetic dataset (default 1,28,28)")


def _common(p):
    p.add_argument("--backend", default=None,
                   help="kernel backend (as GLORO_BACKEND does): numpy, numba, reference, cupy, "
                        "numba_cuda")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gloro_core",
                                 description="Globally-Robust Neural Networks: train, certify, "
                                             "attack, bound Lipschitz constants.")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a GloRo net",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _data_args(t, "synthetic")
    _common(t)
    t.add_argument("--test-limit", type=_pos_int, default=None,
                   help="evaluate on the first N test points (default: --limit, else all)")
    t.add_argument("--arch", default="2C2F",
                   help="2C2F, 4C3F, 6C2F, 7C1F, compact 'c(16,4,2),d(100)' or a .json list")
    t.add_argument("--activation", default="relu", choices=["relu", "minmax"])
    t.add_argument("--init", default="glorot", choices=["glorot", "orthogonal"])
    t.add_argument("--eps", type=float, default=0.3, help="eps_test (evaluation radius, l2)")
    t.add_argument("--train-eps", type=float, default=None, help="eps_train (default: --eps)")
    t.add_argument("--eps-schedule", default="single", help="single | log | x,y,e")
    t.add_argument("--loss", default="ce", choices=["ce", "trades", "emma"],
                   help="GloRo CE on the m+1 logits, TRADES, or EMMA (per-class label margins)")
    t.add_argument("--lam", default="1.0", help="TRADES lambda: constant or x,y,e")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lr-decay", default="fixed", choices=["fixed", "decay_to_lb", "cosine", "step"])
    t.add_argument("--lr-lb", type=float, default=1e-6,
                   help="the lr decay_to_lb reaches, and cosine's floor")
    t.add_argument("--lr-steps", default="50%,75%",
                   help="step: epochs or percentages of the run where lr is multiplied by --lr-gamma")
    t.add_argument("--lr-gamma", type=float, default=0.1, help="step: the factor at each step")
    t.add_argument("--lr-warmup", type=_epochs_arg, default="0",
                   help="epochs (or a percentage of --epochs) of linear lr warm-up (any schedule)")
    t.add_argument("--lr-lag", type=_nonneg_float, default=0.0,
                   help="the lr of epoch t is the schedule's at t - LAG (the authors' Keras "
                        "callback lags 1 epoch)")
    t.add_argument("--weight-decay", type=_nonneg_float, default=0.0,
                   help="decoupled (AdamW) weight decay")
    t.add_argument("--grad-clip", type=_pos_float, default=None,
                   help="clip the gradients' global l2 norm to this")
    t.add_argument("--converge-start", action="store_true",
                   help="converge the power iterates before the first step (authors' code)")
    t.add_argument("--power-grad", action="store_true",
                   help="differentiate K_sub through each step's power iterations (authors' "
                        "code); default: the iterates are held fixed in the gradient")
    t.add_argument("--val", type=_val_count, default=5000,
                   help="validation points held out of the training set (stratified, from "
                        "--seed); best.npz is chosen on them. 0: choose on the test set (warned)")
    t.add_argument("--test-every-epoch", action="store_true",
                   help="also evaluate the test set every epoch, for the curves (selection "
                        "stays on the validation split; the test set is evaluated once at the "
                        "end anyway)")
    t.add_argument("--recipe", default=None,
                   help="a named preset (--recipe list prints them); flags given on the "
                        "command line override it")
    t.add_argument("--warmup", type=_epochs_arg, default="0",
                   help="epochs (or a percentage of --epochs, e.g. 2.5%%) of standard training first")
    t.add_argument("--power-iters", type=int, default=10,
                   help="power iterations per step (paper: 10 MNIST, 5 CIFAR-10)")
    t.add_argument("--augment", type=_bool, default=None,
                   help="on/off (default: on for cifar10 and tiny-imagenet only)")
    t.add_argument("--out", default="runs/gloro",
                   help="run directory: new or empty unless --resume or --overwrite")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from OUT/last.npz exactly where it stopped")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in OUT: its checkpoints, metrics and curves are "
                            "removed once the new run has its data and model")
    t.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: parameters, Adam state and batches on the GPU (CuPy); "
                        "use with --backend cupy or numba_cuda")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many epochs in total (resume later with --resume)")
    t.add_argument("--plot", action="store_true", help="write OUT/curves.png")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")

    c = sub.add_parser("certify", help="clean accuracy, VRA, rejection rate, radii",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("checkpoint", help="checkpoint .npz, or a run directory (uses best.npz)")
    _data_args(c)
    _common(c)
    c.add_argument("--eps", type=_nonneg_float, default=None, help="radius (default: the run's eps)")
    c.add_argument("--bound", default="provable", choices=["provable", "power"],
                   help="Lipschitz bound used: provable (FFT/SVD, a proof) or power (estimate)")
    c.add_argument("--batch", type=_pos_int, default=500)
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--plot", default=None, metavar="PNG", help="write a VRA-vs-eps curve")

    a = sub.add_parser("attack", help="accuracy under an l2 PGD attack",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("checkpoint")
    _data_args(a)
    _common(a)
    a.add_argument("--eps", type=_nonneg_float, default=None)
    a.add_argument("--steps", type=_pos_int, default=50)
    a.add_argument("--restarts", type=_pos_int, default=1)
    a.add_argument("--step-size", type=_pos_float, default=None, help="default 2.5 eps / steps")
    a.add_argument("--batch", type=_pos_int, default=500)
    a.add_argument("--json", action="store_true")

    ap.train_parser = t   # recipes re-parse train's arguments with it
    k = sub.add_parser("lipschitz", help="Lipschitz upper and empirical lower bounds",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    k.add_argument("checkpoint")
    _data_args(k)
    _common(k)
    k.add_argument("--eps", type=_nonneg_float, default=None, help="ball radius for the local bound")
    k.add_argument("--pairs", type=_pos_int, default=64, help="input pairs optimised (global)")
    k.add_argument("--points", type=_pos_int, default=64, help="points for the local bound")
    k.add_argument("--steps", type=_pos_int, default=100, help="gradient-ascent steps")
    k.add_argument("--step-lr", type=_pos_float, default=0.01, help="Adam step size on inputs")
    k.add_argument("--json", action="store_true")
    return ap


# ---------------------------------------------------------------- helpers

def _resolve_ckpt(path: str) -> str:
    if os.path.isdir(path):
        for name in ("best.npz", "last.npz"):
            p = os.path.join(path, name)
            if os.path.isfile(p):
                return p
        raise SystemExit(f"error: no best.npz or last.npz in {path}")
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint not found: {path}")
    return path


def _load_run(args):
    """-> (net, cfg dict, dataset, eps) for the evaluation commands."""
    from . import data as data_mod
    from .train import load_checkpoint

    path = _resolve_ckpt(args.checkpoint)
    net, extra = load_checkpoint(path)
    state = extra.get("train_state") if isinstance(extra, dict) else None
    cfg = state.get("config", {}) if isinstance(state, dict) else {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: extra.train_state.config must be a JSON object, got {cfg!r:.80}")
    name = args.dataset or cfg.get("dataset")
    if not name:
        raise SystemExit("error: --dataset is needed (the checkpoint does not name one)")
    data_dir = args.data_dir if args.data_dir is not None else (
        cfg.get("data_dir") if name == cfg.get("dataset") else None)
    saved = [k for k, taken in (("dataset", not args.dataset),
                                ("data_dir", args.data_dir is None and data_dir is not None))
             if taken]
    if saved and _comm().rank == 0:  # the checkpoint chose what is read: say what and where
        try:
            key = data_mod.canonical_name(name)
            what = ("generating synthetic data" if key == "synthetic" else
                    f"reading {key} from {data_mod.resolve_dir(key, data_dir)}")
        except ValueError:  # unknown name or no directory: load_dataset reports it
            what = f"reading {name} from {data_dir or 'its default location'}"
        print(f"note: {what} ({' and '.join(saved)} saved in the checkpoint {path})",
              file=sys.stderr)
    from .checks import check_int as _check_int

    def saved_ints(key, default, count):
        """cfg[key] (the checkpoint's) as `count` positive ints, or a ValueError naming it."""
        v = cfg.get(key, default)
        try:
            vals = [_check_int(t, key) for t in (v if isinstance(v, (list, tuple)) else [v])]
        except TypeError as exc:
            raise ValueError(f"{path}: train_state.config.{key}: {exc}") from None
        if len(vals) != count or min(vals) < (0 if key == "seed" else 1):
            raise ValueError(f"{path}: train_state.config.{key} must be {count} "
                             f"{'int' if key == 'seed' else 'positive int'}(s), got {v!r:.60}")
        return tuple(vals)

    shape = args.synthetic_shape or saved_ints("synthetic_shape", (1, 28, 28), 3)
    seed = saved_ints("seed", args.seed, 1)[0]
    ds = data_mod.load_dataset(name, data_dir, seed=seed, synthetic_shape=shape,
                               synthetic_n=saved_ints("synthetic_n", (2048, 512), 2))
    x, y = ds.x_test, ds.y_test
    if args.limit is not None:
        x, y = x[:args.limit], y[:args.limit]
    if args.eps is not None:
        return net, cfg, path, x, y, args.eps
    eps = cfg.get("eps", net.eps)   # the run's test eps; net.eps is it too (or the only one saved)
    from .checks import check_eps as _check_eps

    try:
        eps = _check_eps(eps)
    except (TypeError, ValueError) as exc:  # float() would take "0.3" or true
        raise ValueError(f"{path}: train_state.config.eps: {exc} (or pass --eps)") from None
    return net, cfg, path, x, y, eps


def _np(a):
    from .train import _np as conv
    return conv(a)


def _json_safe(obj):
    """obj with NumPy values as Python ones and NaN / inf as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.ndarray, np.generic)):
        return _json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _print(result: dict, as_json: bool, title: str):
    if as_json:
        # allow_nan=False: a non-finite float that slipped past _json_safe fails loudly
        print(json.dumps(_json_safe(result), indent=None, allow_nan=False))
        return
    print(title)
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.6g}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=float)
        print(f"  {k:>24}: {v}")


# ---------------------------------------------------------------- commands

def train_config(args):
    """TrainConfig from train's parsed arguments; 'P%' epochs resolved against --epochs."""
    from .train import TrainConfig

    def epochs_of(v):  # 'N' or 'P%' of --epochs
        return float(v[:-1]) / 100 * args.epochs if str(v).endswith("%") else float(v)

    return TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, arch=args.arch,
        activation=args.activation, init=args.init, eps=args.eps, train_eps=args.train_eps,
        eps_schedule=args.eps_schedule, loss=args.loss, lam=args.lam, epochs=args.epochs,
        batch=args.batch, lr=args.lr, lr_schedule=args.lr_decay, lr_lb=args.lr_lb,
        lr_steps=args.lr_steps, lr_gamma=args.lr_gamma, lr_warmup=epochs_of(args.lr_warmup),
        lr_lag=args.lr_lag, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        converge_start=args.converge_start, power_grad=args.power_grad, val=args.val,
        test_every_epoch=args.test_every_epoch,
        warmup=round(epochs_of(args.warmup)), power_iters=args.power_iters, augment=args.augment,
        seed=args.seed, out=args.out, limit=args.limit, test_limit=args.test_limit,
        progress=not args.no_progress and sys.stderr.isatty(), plot=args.plot,
        synthetic_shape=args.synthetic_shape or (1, 28, 28), stop_after=args.stop_after,
        device=args.device)


def cmd_train(args) -> int:
    from .train import TrainingDiverged, train

    comm = _comm()
    cfg = train_config(args)
    if comm.rank == 0:
        if getattr(args, "recipe_note", None):
            print(args.recipe_note, flush=True)
        print(f"train: {json.dumps(cfg.to_json())}", flush=True)
    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite,
              log=lambda s: print(s, flush=True), comm=comm)
    except TrainingDiverged as exc:  # decided on the global loss: every rank stops here
        if comm.rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


def certify_arrays(net, x, y, eps, bound="provable", batch=500, comm=None):
    """-> dict of results and (correct, radius) arrays. x (N, C, H, W), y (N,).

    With ``comm`` of K ranks, each certifies its whole batches (``parallel.batch_span``)
    and every rank gets every point's result: the same as one process's, but for the
    times (the slowest rank's) and memory peaks (the largest)."""
    from nn.tensor import no_grad

    from . import parallel

    if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")  # range(0, n, 0)
    comm = _comm() if comm is None else comm
    n = len(x)
    lo, hi = parallel.batch_span(n, batch, comm)
    preds, radii, clean = [], [], []
    # bounds first (a model constant, computed once), then time the certificate alone
    tb = time.perf_counter()
    net.lipschitz(bound)
    bound_seconds = time.perf_counter() - tb
    tracemalloc.start()
    t0 = time.perf_counter()
    with no_grad():
        for s in range(lo, hi, batch):
            xb = x[s:min(s + batch, hi)]
            pred, radius = net.certify(xb, eps, bound=bound)
            preds.append(_np(pred))
            radii.append(_np(radius))
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    with no_grad():
        for s in range(lo, hi, batch):
            clean.append(_np(net.logits(x[s:min(s + batch, hi)])).argmax(1))
    pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    radius = np.concatenate(radii).astype(np.float64) if radii else np.zeros(0)
    clean = np.concatenate(clean) if clean else np.zeros(0, np.int64)
    pred, radius, clean = parallel.gather_rows(comm, pred, radius, clean)
    seconds, bound_seconds, peak = parallel.max_over_ranks(comm, seconds, bound_seconds, peak)
    num_classes = int(net.num_classes) if hasattr(net, "num_classes") else int(clean.max() + 1)
    rejected = (pred == num_classes) | (pred < 0)
    vra = (pred == y) & ~rejected
    cert_r = radius[~rejected]
    res = {
        "n": int(n), "eps": float(eps), "bound": bound,
        "clean_acc": float((clean == y).mean()), "vra": float(vra.mean()),
        "rejection_rate": float(rejected.mean()),
        "certified_rate": float((~rejected).mean()),
        "radius_mean": float(np.mean(radius)) if n else math.nan,
        "radius_median": float(np.median(radius)) if n else math.nan,
        "radius_min": float(np.min(radius)) if n else math.nan,
        "radius_max": float(np.max(radius)) if n else math.nan,
        "radius_mean_certified": float(np.mean(cert_r)) if cert_r.size else math.nan,
        "radius_of_correct": _radius_stats(radius, clean == y),
        "bound_seconds": bound_seconds, "seconds_total": seconds, "ms_per_instance": 1e3 * seconds / max(n, 1),
        "peak_mb_per_instance": peak / 2 ** 20 / max(min(batch, n), 1),
        "peak_mb_batch": peak / 2 ** 20, "batch": int(min(batch, n)),
    }
    return res, clean == y, radius


def _radius_stats(radius, correct):
    from .metrics import radius_stats

    return radius_stats(radius, correct)


def cmd_certify(args) -> int:
    net, cfg, path, x, y, eps = _load_run(args)
    res, correct, radius = certify_arrays(net, x, y, eps, args.bound, args.batch)
    res["checkpoint"] = path
    if _comm().rank != 0:
        return 0
    if args.plot:
        from .plots import plot_vra_vs_eps

        res["plot"] = plot_vra_vs_eps(correct, radius, args.plot, eps_mark=eps)
    _print(res, args.json, f"certify {path}")
    return 0


def cmd_attack(args) -> int:
    from . import attacks, parallel

    net, cfg, path, x, y, eps = _load_run(args)
    step = args.step_size if args.step_size is not None else 2.5 * eps / args.steps
    from nn.tensor import no_grad

    comm = _comm()
    # whole batches per rank: each batch's PGD (seeded per batch) is one process's
    lo, hi = parallel.batch_span(len(x), args.batch, comm)
    t0 = time.perf_counter()
    adv_pred, cert_pred = [], []
    for s in range(lo, hi, args.batch):
        xb, yb = x[s:min(s + args.batch, hi)], y[s:min(s + args.batch, hi)]
        x_adv = attacks.pgd_l2(net, xb, yb, eps=eps, steps=args.steps, step_size=step,
                               restarts=args.restarts, seed=args.seed)
        x_adv = _np(x_adv)
        dist = np.sqrt(((x_adv - xb).reshape(len(xb), -1).astype(np.float64) ** 2).sum(1))
        if np.any(dist > eps * (1 + 1e-4) + 1e-6):
            raise RuntimeError(f"attack left the eps-ball: max distance {dist.max()} > {eps}")
        with no_grad():
            adv_pred.append(_np(net.logits(x_adv)).argmax(1))
            cert_pred.append(_np(net.certify(xb, eps, tight_radius=False)[0]))
    with no_grad():
        clean = [_np(net.logits(x[s:min(s + args.batch, hi)])).argmax(1)
                 for s in range(lo, hi, args.batch)]
    empty = np.zeros(0, np.int64)
    adv, cert, clean = parallel.gather_rows(comm, *(np.concatenate(a) if a else empty
                                                    for a in (adv_pred, cert_pred, clean)))
    seconds = parallel.max_over_ranks(comm, time.perf_counter() - t0)
    # a certificate says no point of the eps-ball changes the class: PGD must flip none
    certified = cert >= 0
    res = {"checkpoint": path, "n": int(len(x)), "eps": eps, "steps": args.steps,
           "restarts": args.restarts, "step_size": step,
           "clean_acc": float((clean == y).mean()), "pgd_acc": float((adv == y).mean()),
           "certified": int(certified.sum()),
           "certified_flipped": int((certified & (adv != cert)).sum()),
           "seconds": seconds}
    if comm.rank == 0:
        _print(res, args.json, f"attack {path}")
    return 0


def cmd_lipschitz(args) -> int:
    from . import lower_bounds

    net, cfg, path, x, y, eps = _load_run(args)
    res = {"checkpoint": path}
    res.update(lower_bounds.upper_bounds(net))
    t0 = time.perf_counter()
    g = lower_bounds.global_lower_bound(net, x, pairs=args.pairs, steps=args.steps,
                                        lr=args.step_lr, seed=args.seed)
    loc = lower_bounds.local_lower_bound(net, x[:args.points], eps, steps=args.steps,
                                         lr=args.step_lr, seed=args.seed)
    res.update({"global_lower_bound": g, "local_lower_bound_mean": float(np.mean(loc)),
                "local_lower_bound_max": float(np.max(loc)), "local_eps": eps,
                "lower_bound_seconds": time.perf_counter() - t0,
                "pairs": args.pairs, "points": int(len(loc)), "steps": args.steps})
    if _comm().rank == 0:  # not sharded: every rank computes the same, one prints
        _print(res, args.json, f"lipschitz {path}")
    return 0


COMMANDS = {"train": cmd_train, "certify": cmd_certify, "attack": cmd_attack,
            "lipschitz": cmd_lipschitz}


def _comm():
    from .distributed import world

    return world()


def _with_recipe(parser, argv, args):
    """args re-parsed with the recipe's flags first (gloro_core.recipes); None: --recipe list."""
    from . import recipes

    if args.recipe == "list":
        print(recipes.listing())
        return None
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("train") + 1:]
    new, note = recipes.apply(parser.train_parser, rest)
    new.command, new.recipe_note = "train", note
    return new


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.recipe is not None:
        try:
            args = _with_recipe(parser, argv, args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args is None:
            return 0
    from kernels.registry import default_backend

    from .distributed import fail

    try:
        comm = _comm()
    except RuntimeError as exc:  # launched by mpiexec without mpi4py, or a foreign mpiexec
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if comm.size > 1:
        from .parallel import share_cores

        n = share_cores(comm)
        if comm.rank == 0:
            print(f"{args.command}: {comm.size} ranks ({comm.kind})"
                  + (f", {n} thread(s) each" if n else ""), file=sys.stderr, flush=True)
    try:
        with default_backend(args.backend or None):   # not os.environ: other libraries read it
            return COMMANDS[args.command](args)
    except Exception as exc:
        user = isinstance(exc, (ValueError, FileNotFoundError))
        if comm.size == 1 and not user:
            raise
        fail(comm, exc)  # K ranks: ends the job, unless every rank raised it alike
        if comm.rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2 if user else 1


if __name__ == "__main__":
    sys.exit(main())

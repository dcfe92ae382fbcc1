"""The training loop: Adam on the GloRo (or TRADES) loss, schedules, per-epoch evaluation,
atomic checkpoints, exact resume, metrics files.

Determinism: epoch ``e`` shuffles (and augments) with generators derived from
``(seed, e)``, and the checkpoint written at the end of epoch ``e`` holds the model
(weights and persisted power iterates), the Adam state and the epoch, so a run resumed
from it continues exactly as the uninterrupted run would have.

Output directory layout::

    last.npz      checkpoint at the end of the latest finished epoch (atomic replace)
    best.npz      checkpoint of the epoch with the highest validation VRA so far (``--val``;
                  with ``--val 0``, the highest test VRA, with a warning)
    test.json     the test set evaluated once on best.npz when training ends (``selection``)
    metrics.jsonl one JSON object per epoch
    metrics.csv   the same, as CSV
    curves.png    training curves (``plot=True``)
    .lock         flock'd while a run writes here; names the holder (``rundir``)

A directory that already holds a run is used only with ``resume`` or ``overwrite``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import resource
import sys
import time
import uuid
import zipfile

import numpy as np

from nn.optim import clip_grad_norm

from . import data as data_mod
from . import distributed, metrics, parallel, selection
from . import split as split_mod
from .checkpoint import copy_npz
from .rundir import RunDir
from .schedules import Plan

CKPT_LAST = "last.npz"
CKPT_BEST = "best.npz"
METRIC_FIELDS = ["epoch", "phase", "loss", *selection.VAL_FIELDS, *selection.TEST_FIELDS,
                 "k_sub", "lr", "eps", "eps_test", "lam", "samples_per_s", "epoch_s",
                 "eval_s", "peak_mem_mb"]


# steps per loss read-back on a GPU (one host sync): a NaN loss is seen at most this many
# steps late, and the epoch's checkpoints are written only after the last read
GPU_LOSS_READ_EVERY = 20


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    all_ranks = True  # decided on the all-reduced loss: every rank raises it at one step


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs; saved in the checkpoint so ``resume`` can check it."""

    dataset: str = "synthetic"
    data_dir: str | None = None
    arch: str = "2C2F"
    activation: str = "relu"
    init: str = "glorot"
    eps: float = 0.3            # eps_test: certification radius for evaluation
    train_eps: float | None = None  # eps_train (default: eps)
    eps_schedule: str = "single"
    loss: str = "ce"            # "ce", "trades" or "emma" (gloro_core.losses)
    lam: str = "1.0"            # TRADES lambda: constant or "x,y,e"
    epochs: int = 10
    batch: int = 256
    lr: float = 1e-3
    lr_schedule: str = "fixed"  # "decay_to_lb", "cosine" or "step" (schedules.lr_schedule)
    lr_lb: float = 1e-6
    lr_steps: str = "50%,75%"   # "step": epochs (or % of the run) where lr is multiplied by
    lr_gamma: float = 0.1       # lr_gamma
    lr_warmup: float = 0.0      # epochs of linear lr warm-up from ~0 (any schedule)
    lr_lag: float = 0.0         # the lr of epoch t is the schedule's at t - lr_lag (authors' code: 1)
    weight_decay: float = 0.0   # decoupled (AdamW): p <- p (1 - lr wd) before the Adam step
    grad_clip: float | None = None  # clip the global gradient l2 norm to this
    converge_start: bool = False  # converge the power iterates before the first step (authors' code)
    power_grad: bool = False    # differentiate K_sub through the step's power iterations (authors' code)
    val: int = 5000             # validation points held out of the training set; 0: none
    test_every_epoch: bool = False  # also evaluate the test set each epoch (curves only)
    warmup: int = 0             # epochs of standard (non-GloRo) training first
    power_iters: int = 10       # power iterations per training step
    lipschitz_tol: float = 1e-5
    lipschitz_max_iter: int = 2000
    augment: bool | None = None  # None: on for cifar10 / tiny-imagenet only
    seed: int = 0
    out: str = "runs/gloro"
    limit: int | None = None    # use the first N train points (and N test points, unless
    test_limit: int | None = None  # test_limit says otherwise); None: all
    eval_batch: int = 500
    progress: bool = True
    plot: bool = False
    synthetic_shape: tuple = (1, 28, 28)
    synthetic_n: tuple = (2048, 512)
    stop_after: int | None = None  # stop (as if interrupted) after this many epochs
    device: str = "cpu"         # "gpu": parameters, iterates, Adam state and batches on CuPy

    def __post_init__(self):
        if self.train_eps is None:
            self.train_eps = self.eps
        if self.loss not in ("ce", "trades", "emma"):
            raise ValueError(f"loss must be 'ce', 'trades' or 'emma', got {self.loss!r}")
        if isinstance(self.val, bool) or not isinstance(self.val, int) or self.val < 0:
            raise ValueError(f"--val must be an integer >= 0, got {self.val!r}")
        for name in ("weight_decay", "lr_lag", "lr_warmup"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, "
                                 f"got {v!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"--grad-clip must be a finite number > 0, got {self.grad_clip!r}")
        for name in ("epochs", "batch", "power_iters", "eval_batch"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.eps) and math.isfinite(self.train_eps)
                and self.eps >= 0 and self.train_eps >= 0):
            raise ValueError(f"eps must be finite and >= 0, got eps={self.eps}, "
                             f"train_eps={self.train_eps}")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {self.device!r}")
        self.synthetic_shape = tuple(self.synthetic_shape)
        self.synthetic_n = tuple(self.synthetic_n)
        self.plan()  # every schedule checked over the whole run now, not when it goes bad

    def plan(self) -> Plan:
        return Plan(epochs=self.epochs, warmup=self.warmup, eps_train=self.train_eps,
                    eps_spec=self.eps_schedule, lam_spec=self.lam, lr=self.lr,
                    lr_spec=self.lr_schedule, lr_lb=self.lr_lb, lr_steps=self.lr_steps,
                    lr_gamma=self.lr_gamma, lr_warmup=self.lr_warmup, lr_lag=self.lr_lag)

    def augment_on(self) -> bool:
        if self.augment is None:
            return data_mod.canonical_name(self.dataset) in ("cifar10", "tiny-imagenet")
        return bool(self.augment)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["synthetic_shape"] = list(self.synthetic_shape)
        d["synthetic_n"] = list(self.synthetic_n)
        return d


# ---------------------------------------------------------------- small helpers

def _np(a) -> np.ndarray:
    """Tensor / CuPy / NumPy -> NumPy array."""
    from kernels.registry import to_host

    return to_host(getattr(a, "data", a))


def _read_losses(window):
    """[(loss value, batch size, step)] for a window of (0-d loss array, size, step): one
    copy to the host for the whole window."""
    from kernels.registry import array_module, to_host

    losses = window[0][0] if len(window) == 1 else array_module(window[0][0]).stack([w[0] for w in window])
    vals = to_host(losses).reshape(-1).tolist()
    return [(float(v), size, at) for v, (_, size, at) in zip(vals, window)]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2 ** 20


def evaluate(net, x: np.ndarray, y: np.ndarray, eps: float, batch: int = 500) -> dict:
    """Clean accuracy, VRA and rejection rate of ``net`` on (x, y) at radius ``eps``.

    Uses the model's converged Lipschitz constants (call ``update_lipschitz`` first).
    x: (N, C, H, W) float32; y: (N,) int.
    """
    m = metrics.evaluate(net, x, y, eps, batch=batch, tight_radius=False)  # radii unused here
    return {"clean_acc": m["clean_acc"], "vra": m["vra"], "rejection": m["rejection"]}


def _evaluate(comm, net, x, y, cfg) -> dict:
    """evaluate() in one process; under K ranks sharded by whole batches (same numbers)."""
    if comm.size == 1:
        return evaluate(net, x, y, cfg.eps, cfg.eval_batch)
    return parallel.evaluate(comm, net, x, y, cfg.eps, cfg.eval_batch)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(net, path: str, extra: dict) -> None:
    """Write ``net`` plus training state ``extra`` to ``path`` (.npz, used as given).

    ``net.save`` writes atomically (temporary file + ``os.replace``): a crash mid-write
    leaves the previous checkpoint intact.
    """
    net.save(path, extra=extra)


def load_checkpoint(path: str):
    """-> (net, extra dict) from a checkpoint written by ``save_checkpoint``."""
    from .model import load

    net = load(path)
    return net, (getattr(net, "extra", None) or {})


def _saved_state(path: str):
    """train_state of a checkpoint, read from its meta alone; None if missing or unreadable.

    Anything that is not a gloro .npz (a .npy, a torn zip, no meta) counts as unreadable:
    ``_repair_best`` then treats best.npz as not this run's best, which replaces it only
    with last.npz's bytes when last.npz is the best epoch, and otherwise leaves it alone.
    """
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if not isinstance(z, np.lib.npyio.NpzFile):  # e.g. a .npy renamed: not a checkpoint
        return None
    try:
        with z:
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    state = (meta.get("extra") or {}).get("train_state") if isinstance(meta, dict) else None
    return state if isinstance(state, dict) else None


def _bad_state(path: str, what: str) -> ValueError:
    return ValueError(f"{path}: train_state has no valid {what}; cannot resume from it "
                      "(start over with --overwrite or another --out)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _row_ok(m) -> bool:
    """A history row with a numeric selection VRA (or none at all)."""
    if not isinstance(m, dict):
        return False
    key = next((k for k in ("val_vra", "test_vra", "vra") if k in m), None)
    return key is None or _is_real(m[key])


def _check_state(path: str, state) -> None:
    """ValueError naming ``path`` unless ``state`` is a train_state resume can use."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no training state in checkpoint; cannot resume")
    for key, kind in (("config", dict), ("optimizer", dict)):
        if not isinstance(state.get(key), kind):
            raise _bad_state(path, repr(key))
    epoch = state.get("epoch")
    if not _is_int(epoch) or epoch < 0:
        raise _bad_state(path, "'epoch'")
    # Older checkpoints may lack these; present, they must be usable (_repair_best reads them)
    history = state.get("history", [])
    if not isinstance(history, list) or not all(_row_ok(m) for m in history):
        raise _bad_state(path, "'history' (a list of per-epoch objects with a numeric vra)")
    best_epoch = state.get("best_epoch")
    if best_epoch is not None and not (_is_int(best_epoch) and 0 <= best_epoch <= epoch):
        raise _bad_state(path, f"'best_epoch' (an epoch number from 0 to {epoch})")
    if not _is_real(state.get("best_vra", -1.0)):
        raise _bad_state(path, "'best_vra' (a number)")
    run_id = state.get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise _bad_state(path, "'run_id'")


def _adopt_legacy_run(net, extra, last_path, best_path, best_epoch) -> str:
    """Mint a run_id for a run saved before run_ids; stamp it on last.npz and on a best.npz
    that was accepted as this run's, so a later resume still recognises that best.npz.
    last.npz first: a stop between the two writes leaves a best.npz that at worst is
    reported as another run's and kept, or replaced by last.npz when that is the best."""
    run_id = uuid.uuid4().hex
    held = _saved_state(best_path)
    adopt = (best_epoch is not None and held is not None and held.get("run_id") is None
             and held.get("epoch") == best_epoch)
    extra["train_state"]["run_id"] = run_id
    save_checkpoint(net, last_path, extra)
    if adopt:
        try:
            best_net, best_extra = load_checkpoint(best_path)
        except (OSError, ValueError):  # meta readable, model not: leave the file as it is
            return run_id
        best_extra["train_state"]["run_id"] = run_id
        save_checkpoint(best_net, best_path, best_extra)
    return run_id


def _repair_best(last_path: str, best_path: str, state: dict, log) -> int | None:
    """Make best.npz hold the best epoch that last.npz's ``state`` names; -> that epoch.

    last.npz is written before best.npz, so the only gap a stop can leave is "this epoch
    is the best but best.npz still holds an older one (or none)". Whenever last.npz's epoch
    is the best one, last.npz's bytes are the best checkpoint, so they replace best.npz
    whatever it holds (missing, unreadable, stale, or another run's): the directory is
    locked and its outputs belong to this run. When the best epoch is an older one and
    best.npz does not hold it, best.npz was changed outside training; the best weights are
    gone, which is said, and best.npz is left as it is.

    ``state`` must have passed ``_check_state``.
    """
    epoch, best_epoch = int(state["epoch"]), state.get("best_epoch")
    if best_epoch is None:  # checkpoints from before best_epoch was recorded
        vras = [selection.selection_vra(m) for m in state.get("history", [])]
        vras = [-1.0 if v is None else v for v in vras]
        if len(vras) != epoch + 1:
            return None
        best_epoch = vras.index(max(vras))  # the first epoch with the top VRA wrote best.npz
    held = _saved_state(best_path)
    if (held is not None and held.get("epoch") == best_epoch
            and held.get("run_id") == state.get("run_id")):
        return best_epoch
    if held is None:
        what = "is missing" if not os.path.exists(best_path) else "is unreadable"
    elif held.get("run_id") != state.get("run_id"):
        what = "is from another run"
    else:
        e = held.get("epoch")
        what = f"holds epoch {e + 1}" if isinstance(e, int) else "names no epoch"
    if best_epoch == epoch:
        copy_npz(last_path, best_path)
        log(f"{best_path} {what}; restored it from {last_path}, which holds the best epoch "
            f"({epoch + 1})")
    else:
        log(f"warning: {best_path} {what}, but the best epoch is {best_epoch + 1} and only "
            f"epoch {epoch + 1} is kept ({last_path}); best.npz is left as it is until VRA "
            "improves")
    return best_epoch


# ---------------------------------------------------------------- metrics files

def _write_metrics(out: str, history: list[dict], append_only: dict | None = None):
    """Append one row (``append_only``) or rewrite both files from ``history``."""
    jpath, cpath = os.path.join(out, "metrics.jsonl"), os.path.join(out, "metrics.csv")
    if append_only is not None and os.path.exists(jpath) and os.path.exists(cpath):
        with open(jpath, "a") as fh:
            fh.write(json.dumps(append_only) + "\n")
        with open(cpath, "a", newline="") as fh:
            csv.DictWriter(fh, METRIC_FIELDS, extrasaction="ignore").writerow(append_only)
        return
    with open(jpath, "w") as fh:
        for row in history:
            fh.write(json.dumps(row) + "\n")
    with open(cpath, "w", newline="") as fh:
        w = csv.DictWriter(fh, METRIC_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow(row)


def format_line(m: dict, epochs: int) -> str:
    return (f"epoch {m['epoch']:>3}/{epochs} [{m['phase']}] loss {m['loss']:.4f} "
            f"{selection.describe(m)} "
            f"K_sub {m['k_sub']:.3f} lr {m['lr']:.2e} eps {m['eps']:.4f} lam {m['lam']:.3g} "
            f"{m['samples_per_s']:.0f} samples/s {m['epoch_s']:.1f}s "
            f"(eval {m['eval_s']:.1f}s) mem {m['peak_mem_mb']:.0f}MiB")


# ---------------------------------------------------------------- the loop

def _place(net, device: str) -> None:
    """Move the model to ``device`` ("cpu" or "gpu") before its optimizer is made, so the
    Adam moments are created (or restored) next to the parameters."""
    if device == "gpu":
        import kernels

        why = kernels.availability()["cupy"]
        if why is not None:
            raise ValueError(f"--device gpu needs CuPy and a CUDA device: {why}")
    net.to(device)


def _make_optimizer(net, lr: float, weight_decay: float = 0.0):
    from nn.optim import Adam

    # Keras defaults, as the paper used (GLORO.md section 3)
    return Adam(list(net.parameters()), lr=lr, beta1=0.9, beta2=0.999, epsilon=1e-7,
                weight_decay=weight_decay)


def _set_lr(opt, lr: float):
    opt.lr = lr


def _zero_grad(net, opt):
    if hasattr(opt, "zero_grad"):
        opt.zero_grad()
    else:
        for p in net.parameters():
            p.grad = None


def load_data(cfg: TrainConfig) -> data_mod.Dataset:
    ds = data_mod.load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed,
                               synthetic_shape=cfg.synthetic_shape, synthetic_n=cfg.synthetic_n)
    if cfg.limit is not None or cfg.test_limit is not None:
        ds = ds.subset(cfg.limit, cfg.test_limit)
    return ds


def split_data(cfg: TrainConfig, ds: data_mod.Dataset):
    """-> (dataset to train on, (x_val, y_val) or None, Split or None): ``cfg.val`` points of
    the (limited) training set held out, stratified, from ``cfg.seed`` (split.holdout)."""
    if not cfg.val:
        return ds, None, None
    sp = split_mod.holdout(ds.y_train, cfg.val, cfg.seed)
    train_ds = data_mod.Dataset(ds.name, ds.x_train[sp.train], ds.y_train[sp.train],
                                ds.x_test, ds.y_test, ds.num_classes)
    return train_ds, (ds.x_train[sp.val], ds.y_train[sp.val]), sp


def train(cfg: TrainConfig, resume: bool = False, log=print, dataset=None,
          overwrite: bool = False, comm=None) -> list[dict]:
    """Run (or resume) training as configured; returns the per-epoch metrics history.

    ``comm`` (default ``distributed.world()``: MPI under ``mpiexec -n K``, else one
    process) makes it data-parallel (``parallel``): every rank trains on its part of each
    global batch, and rank 0 alone holds the run directory and writes and logs.

    ``cfg.out`` must be empty or new unless ``resume`` (continue the run there) or
    ``overwrite`` (replace it: its outputs are removed once data and model are ready, just
    before the first write). The directory is locked for the whole run (see ``rundir``).
    Everything that can be checked without training (schedules, plotting, write access) is
    checked before the data are loaded.
    """
    from nn.tensor import Tensor  # noqa: F401 - fail early if nn is missing

    plan = cfg.plan()
    if cfg.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError('--plot needs matplotlib: pip install -e ".[plot]"') from None
    comm = distributed.world() if comm is None else comm
    try:
        if comm.rank != 0:  # the other ranks read the run directory, never write or log
            history = _train_locked(cfg, plan, None, resume, lambda s: None, dataset, comm)
        else:
            with RunDir(cfg.out, resume=resume, overwrite=overwrite) as run:
                if run.removed_orphans:
                    log(f"removed temporary files of interrupted writes from {cfg.out}: "
                        + ", ".join(run.removed_orphans))
                if comm.size > 1:
                    log(f"data-parallel: {comm.size} ranks ({comm.kind}), global batch {cfg.batch}")
                history = _train_locked(cfg, plan, run, resume, log, dataset, comm)
        comm.barrier()  # every rank returns once rank 0 has written and unlocked the run
        return history
    except Exception as exc:
        distributed.fail(comm, exc)  # K ranks: an error on one rank ends them all
        raise


def _train_locked(cfg, plan, run, resume, log, dataset, comm) -> list[dict]:
    from .architectures import build

    lead = comm.rank == 0
    if cfg.device == "gpu" and comm.size > 1:
        distributed.use_local_gpu(comm)  # before any array is placed
    ds = dataset if dataset is not None else load_data(cfg)
    ds, val_set, split = split_data(cfg, ds)
    if split is None:
        log(selection.NO_VAL_WARNING)
    last_path = os.path.join(cfg.out, CKPT_LAST)
    best_path = os.path.join(cfg.out, CKPT_BEST)

    history: list[dict] = []
    start_epoch, best_vra, best_epoch = 0, -1.0, None
    run_id = uuid.uuid4().hex  # ties best.npz to last.npz of the same run
    # rank 0's run directory decides (other ranks may not share its filesystem)
    if resume and comm.bcast(os.path.exists(last_path) if lead else None):
        net, extra = parallel.load_on_all(comm, last_path, load_checkpoint)
        state = extra.get("train_state")
        _check_state(last_path, state)
        saved = state["config"]
        split_mod.check_same(state.get("split"), split, cfg.seed, last_path)
        for key in ("arch", "dataset", "seed", "batch", "loss", "limit", "activation"):
            if saved.get(key) != cfg.to_json().get(key):
                raise ValueError(f"--resume: {key}={cfg.to_json().get(key)!r} differs from the "
                                 f"checkpoint's {saved.get(key)!r} ({last_path})")
        # a key older runs lack had its default then (and val 0: they selected on the test set)
        defaults = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, "val": 0}
        changed = sorted(k for k, v in cfg.to_json().items()
                         if k not in ("out", "progress", "plot", "stop_after")
                         and saved.get(k, defaults.get(k)) != v)
        if changed:  # schedules would silently change mid-run
            log("warning: --resume with settings that differ from the checkpoint's: "
                + ", ".join(f"{k}={cfg.to_json()[k]!r} (was {saved.get(k)!r})" for k in changed))
        start_epoch = int(state["epoch"]) + 1
        best_vra = float(state.get("best_vra", -1.0))
        history = [selection.upgrade(m) for m in state.get("history", [])]
        best_epoch = _repair_best(last_path, best_path, state, log) if lead else None
        run_id = state.get("run_id")
        if run_id is None and lead:  # legacy run: give it an id so no other legacy best.npz matches
            run_id = _adopt_legacy_run(net, extra, last_path, best_path, best_epoch)
        _place(net, cfg.device)
        opt = _make_optimizer(net, cfg.lr, cfg.weight_decay)
        opt.load_state_dict(state["optimizer"])
        if lead:
            _write_metrics(cfg.out, history)
        log(f"resumed from {last_path} after epoch {start_epoch} of {cfg.epochs}")
    else:
        if resume:
            log(f"--resume: no checkpoint at {last_path}; starting from scratch")
        net = build(cfg.arch, ds.input_shape, ds.num_classes, activation=cfg.activation,
                    init=cfg.init, eps=cfg.eps, eps_train=cfg.train_eps, seed=cfg.seed)
        _place(net, cfg.device)
        opt = _make_optimizer(net, cfg.lr, cfg.weight_decay)
        if cfg.converge_start:  # as the authors' code does before its first step
            net.update_lipschitz(tol=1e-2, max_iter=cfg.lipschitz_max_iter, provable=False)
            parallel.share_iterates(comm, net)
        if lead and run.overwrite:  # the new run is ready: only now does the old one go
            gone = run.clear_outputs()
            if gone:
                log(f"--overwrite: removed the earlier run's {', '.join(gone)} from {cfg.out}")
        if lead:
            _write_metrics(cfg.out, [])
    parallel.check_same(comm, net, opt, "at the start")
    gcomm = distributed.device_comm(comm, cfg.device)

    n = len(ds.x_train)
    steps = math.ceil(n / cfg.batch)
    # a GPU step must not wait for the host: its losses are read back a window at a time
    read_every = 1 if net.device == "cpu" else GPU_LOSS_READ_EVERY
    use_aug = cfg.augment_on()
    stop_at = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
    for epoch in range(start_epoch, stop_at):
        t0 = time.perf_counter()
        shuffle_rng = data_mod.epoch_rng(cfg.seed, epoch, 0)
        aug_rng = data_mod.epoch_rng(cfg.seed, epoch, 1)
        loss_sum = 0.0
        seen = 0
        window = []   # (loss, batch size, step) not read back yet
        bar = _progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and lead)
        vals = plan.at(epoch)
        for step, idx in enumerate(data_mod.batches(n, cfg.batch, shuffle_rng)):
            vals = plan.at(epoch + step / steps)
            # this rank's part of the global batch idx (all of it on one process)
            xb, yb, weight = parallel.local_batch(comm, ds.x_train, ds.y_train, idx,
                                                  aug_rng if use_aug else None)
            _set_lr(opt, vals["lr"])
            _zero_grad(net, opt)
            if vals["warmup"]:
                loss = net.standard_loss(xb, yb)
            else:
                loss = net.loss(xb, yb, loss=cfg.loss, eps=vals["eps"], lam=vals["lam"],
                                power_iters=cfg.power_iters, power_grad=cfg.power_grad)
            loss.backward()
            # K ranks: one all-reduce turns the parts' gradients and losses into the global
            # batch's means on every rank (so every rank decides alike below); one process:
            # the loss as it is. A 0-d array: no host sync on a GPU
            gloss = parallel.reduce_gradients(gcomm, net.parameters(), loss.data, weight, net)
            if cfg.grad_clip is not None:   # the global gradient, alike on every rank
                clip_grad_norm(net.parameters(), cfg.grad_clip)
            window.append((gloss, len(idx), step))
            if len(window) >= read_every or step == steps - 1:
                for lv, size, at in _read_losses(window):
                    if not math.isfinite(lv):
                        bar.close()
                        raise TrainingDiverged(
                            f"loss is {lv} at epoch {epoch + 1}, step {at + 1}/{steps} "
                            f"(eps {vals['eps']:.4g}, lr {vals['lr']:.3g}); stopped. The last good "
                            f"checkpoint is {last_path if os.path.exists(last_path) else '(none yet)'}; "
                            "try a lower --lr or a gentler --eps-schedule")
                    loss_sum += lv * size
                    seen += size
                bar.set_postfix(loss=f"{lv:.4f}", refresh=False)
                window.clear()
            opt.step()
            bar.update(1)
        bar.close()
        train_s = time.perf_counter() - t0

        # Converge the power iterates: certification needs the real norm, not an estimate.
        te = time.perf_counter()
        net.update_lipschitz(tol=cfg.lipschitz_tol, max_iter=cfg.lipschitz_max_iter)
        parallel.share_iterates(comm, net)
        ev = {}
        if val_set is not None:
            ev.update(selection.prefixed("val", _evaluate(comm, net, *val_set, cfg)))
        if val_set is None or cfg.test_every_epoch:
            ev.update(selection.prefixed("test", _evaluate(comm, net, ds.x_test, ds.y_test, cfg)))
        eval_s = time.perf_counter() - te
        end = plan.at(epoch + 1 - 1e-9)
        m = {"epoch": epoch + 1, "phase": "warmup" if vals["warmup"] else "gloro",
             "loss": loss_sum / max(seen, 1), **ev,
             "k_sub": float(net.lipschitz()["k_sub"]), "lr": vals["lr"], "eps": end["eps"],
             "eps_test": cfg.eps, "lam": end["lam"], "samples_per_s": seen / max(train_s, 1e-9),
             "epoch_s": train_s, "eval_s": eval_s, "peak_mem_mb": peak_rss_mb()}
        history.append(m)
        improved = selection.selection_vra(m) > best_vra
        best_vra = max(best_vra, selection.selection_vra(m))
        best_epoch = epoch if improved else best_epoch
        parallel.check_same(comm, net, opt, f"epoch {epoch + 1}")  # before it is saved
        if not lead:
            continue
        extra = _train_extra(cfg, opt, epoch, best_vra, history, best_epoch, run_id)
        extra["train_state"]["split"] = None if split is None else split.record(cfg.seed)
        # last.npz first: it is the commit point and names the best epoch. A stop between
        # the two writes leaves best.npz behind only when this epoch is the best, and then
        # last.npz holds exactly its content: resume repairs it from there (_repair_best).
        save_checkpoint(net, last_path, extra)
        if improved:
            save_checkpoint(net, best_path, extra)
        _write_metrics(cfg.out, history, append_only=m)
        log(format_line(m, cfg.epochs))
    if lead and stop_at == cfg.epochs and history and os.path.exists(best_path):
        _final_test(cfg, ds, best_path, split is not None, log)
    if cfg.plot and history and lead:
        from .plots import plot_training

        log(f"wrote {plot_training(history, os.path.join(cfg.out, 'curves.png'))}")
    return history


def _final_test(cfg, ds, best_path, on_val: bool, log) -> dict:
    """The test set, once, on best.npz (chosen on the validation split): OUT/test.json."""
    t0 = time.perf_counter()
    net, extra = load_checkpoint(best_path)
    _place(net, cfg.device)
    net.update_lipschitz(tol=cfg.lipschitz_tol, max_iter=cfg.lipschitz_max_iter)
    ev = evaluate(net, ds.x_test, ds.y_test, cfg.eps, cfg.eval_batch)
    state = extra.get("train_state", {})
    row = (state.get("history") or [{}])[-1]
    res = {"checkpoint": best_path, "epoch": int(state.get("epoch", -1)) + 1,
           "selected_on": "val" if on_val else "test", "eps": cfg.eps,
           "n_test": int(len(ds.y_test)), "val_vra": row.get("val_vra"),
           **selection.prefixed("test", ev), "seconds": time.perf_counter() - t0}
    path = selection.write_test_result(cfg.out, res)
    log(f"test set on {best_path} (epoch {res['epoch']}, chosen on the "
        f"{'validation split' if on_val else 'TEST set'}): {selection.describe(res)}"
        f" -> {path}")
    return res


def _train_extra(cfg, opt, epoch, best_vra, history, best_epoch, run_id) -> dict:
    # Shuffling/augmentation rngs are derived from (seed, epoch): no generator state to keep.
    return {"train_state": {"epoch": epoch, "best_vra": best_vra, "best_epoch": best_epoch,
                            "run_id": run_id, "config": cfg.to_json(),
                            "history": history, "optimizer": opt.state_dict(),
                            "rng": {"kind": "derived(seed, epoch)", "seed": cfg.seed,
                                    "next_epoch": epoch + 1}}}


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="step", dynamic_ncols=True)

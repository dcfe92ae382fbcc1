"""The run directory of `train`: no silent replacement, one writer, best.npz kept consistent
with last.npz across stops, problems found before training."""
import errno
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from gloro_core import checkpoint
from gloro_core import train as train_mod
from gloro_core.cli import main
from gloro_core.rundir import RunDir, RunDirError
from gloro_core.train import TrainConfig, load_checkpoint, train

TINY = dict(dataset="synthetic", arch="c(4,3,2),d(16)", synthetic_shape=(1, 10, 10),
            synthetic_n=(96, 48), batch=32, power_iters=2, eps=0.1, train_eps=0.15,
            lipschitz_max_iter=300, progress=False, eval_batch=64, val=16)
# VRA improves at every one of 3 epochs with these (checked in the test that relies on it)
LEARNS = {**TINY, "eps": 0.05, "train_eps": 0.05, "synthetic_n": (256, 64), "lr": 3e-3}
CLI = ["train", "--dataset", "synthetic", "--synthetic-shape", "1,10,10", "--limit", "64",
       "--arch", "c(4,3,2),d(16)", "--epochs", "1", "--batch", "32", "--power-iters", "2",
       "--no-progress", "--val", "16"]


def _quiet(*a, **k):
    pass


def _params(path):
    net, _ = load_checkpoint(str(path))
    return [np.array(p.data) for p in net.parameters()]


def _files(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d)) if n != ".lock"}


# ---------------------------------------------------------------- 1. reruns

def test_rerun_is_refused_and_keeps_the_earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(CLI + ["--out", str(out)]) == 0
    before = _files(out)
    assert set(before) == {"last.npz", "best.npz", "metrics.jsonl", "metrics.csv", "test.json"}
    capsys.readouterr()
    assert main(CLI + ["--out", str(out), "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} is not empty (best.npz, last.npz, ")
    assert "use --resume to continue the run there or --overwrite to replace it" in err
    assert _files(out) == before
    with pytest.raises(RunDirError, match="is not empty"):
        train(TrainConfig(out=str(out), epochs=1, **TINY), log=_quiet)
    assert _files(out) == before
    with pytest.raises(SystemExit):  # argparse: not allowed with each other
        main(CLI + ["--out", str(out), "--resume", "--overwrite"])
    with pytest.raises(RunDirError, match="exclude each other"):
        train(TrainConfig(out=str(out), epochs=1, **TINY), resume=True, overwrite=True,
              log=_quiet)


def test_overwrite_replaces_only_the_run_and_only_once_it_starts(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(CLI + ["--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = _files(out)
    # a new run that fails before it starts (no data) leaves the old one whole
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
                 "--out", str(out), "--overwrite"]) == 2
    assert _files(out) == before
    capsys.readouterr()
    assert main(CLI + ["--out", str(out), "--overwrite", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert (f"--overwrite: removed the earlier run's best.npz, last.npz, metrics.csv, "
            f"metrics.jsonl, test.json from {out}") in text
    after = _files(out)
    assert after["notes.txt"] == b"mine"  # not a file train writes: left alone
    assert after["last.npz"] != before["last.npz"] and after["best.npz"] != before["best.npz"]
    assert [json.loads(s)["epoch"] for s in (out / "metrics.jsonl").read_text().splitlines()] == [1]


# ---------------------------------------------------------------- 2. one writer

def test_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    code = ("import sys\nfrom gloro_core.rundir import RunDir\n"
            "with RunDir(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        info = json.loads((out / ".lock").read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        who = (rf"pid {holder.pid} on {re.escape(socket.gethostname())}, "
               rf"started {re.escape(info['started'])}")
        with pytest.raises(RunDirError, match=rf"--out {re.escape(str(out))} is in use by "
                                              rf"another training run \({who}\)"):
            train(TrainConfig(out=str(out), epochs=1, **TINY), log=_quiet)
        with pytest.raises(RunDirError, match="in use"):  # resuming is writing too
            train(TrainConfig(out=str(out), epochs=1, **TINY), resume=True, log=_quiet)
        assert os.listdir(out) == [".lock"]  # the refused runs wrote nothing
    finally:
        holder.kill()  # no clean exit: the kernel drops a flock with its process
        holder.wait()
    train(TrainConfig(out=str(out), epochs=1, **TINY), log=_quiet)
    assert (out / "last.npz").exists()
    assert (out / ".lock").read_text() == ""  # released, and names no stale holder


def test_second_lock_in_the_same_process(tmp_path):
    # flock locks belong to open file descriptions: a second open() conflicts even here
    with RunDir(tmp_path / "run"):
        with pytest.raises(RunDirError,
                           match=rf"in use by another training run \(pid {os.getpid()} "):
            with RunDir(tmp_path / "run", resume=True):
                pass
    with RunDir(tmp_path / "run"):
        pass


# ---------------------------------------------------------------- 3. stops between writes

class Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise runs."""


def _stop_between_writes(monkeypatch, at_epoch, exc):
    """The epoch ``at_epoch`` (0-based) dies after its first checkpoint write."""
    real, seen = train_mod.save_checkpoint, []

    def save(net, path, extra):
        e = extra["train_state"]["epoch"]
        if e == at_epoch and e in seen:
            raise exc
        seen.append(e)
        real(net, path, extra)
    monkeypatch.setattr(train_mod, "save_checkpoint", save)


@pytest.mark.parametrize("cfg,at_epoch,exc", [
    # epoch 3 of 3 improves: best.npz was left at epoch 2 (and nothing is left to train)
    (LEARNS, 2, Killed()),
    # epoch 1 (always the best so far) dies on a full disk: no best.npz, and with these
    # settings epoch 2 does not improve, so no later epoch writes one either
    (TINY, 0, OSError(errno.ENOSPC, "No space left on device")),
])
def test_resume_restores_best_after_a_stop_between_the_writes(tmp_path, monkeypatch, cfg,
                                                              at_epoch, exc):
    epochs = 3 if cfg is LEARNS else 2
    ref = train(TrainConfig(out=str(tmp_path / "ref"), epochs=epochs, seed=1, **cfg), log=_quiet)
    vras = [m["val_vra"] for m in ref]
    best = vras.index(max(vras))
    assert best == at_epoch  # the stopped epoch is the one best.npz must hold
    if at_epoch > 0:
        assert vras[at_epoch] > vras[at_epoch - 1]  # so best.npz existed, at an older epoch
    out = tmp_path / "run"
    _stop_between_writes(monkeypatch, at_epoch, exc)
    with pytest.raises(type(exc)):
        train(TrainConfig(out=str(out), epochs=epochs, seed=1, **cfg), log=_quiet)
    monkeypatch.undo()
    assert load_checkpoint(str(out / "last.npz"))[1]["train_state"]["epoch"] == at_epoch
    held = (load_checkpoint(str(out / "best.npz"))[1]["train_state"]["epoch"]
            if (out / "best.npz").exists() else None)
    assert held != at_epoch  # the stop did leave best.npz behind
    logs = []
    hist = train(TrainConfig(out=str(out), epochs=epochs, seed=1, **cfg), resume=True,
                 log=logs.append)
    assert [m["val_vra"] for m in hist] == vras
    assert any(s.startswith(f"{out / 'best.npz'} ") and "restored it from" in s for s in logs)
    metrics = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    mv = [m["val_vra"] for m in metrics]
    _, extra = load_checkpoint(str(out / "best.npz"))
    assert extra["train_state"]["epoch"] == mv.index(max(mv)) == best
    for a, b in zip(_params(out / "best.npz"), _params(tmp_path / "ref" / "best.npz")):
        assert np.array_equal(a, b)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def _ckpt(path, **state):
    checkpoint.save_npz(path, {}, {}, extra={"train_state": state})


def test_repair_rule(tmp_path):
    """_repair_best's cases, on files that hold only a train_state."""
    last, best = str(tmp_path / "last.npz"), str(tmp_path / "best.npz")
    logs = []
    # best.npz ahead of or behind a best epoch that is not last's: not recoverable, said so
    st = {"epoch": 2, "best_epoch": 0, "run_id": "r"}
    _ckpt(last, **st)
    _ckpt(best, epoch=1, run_id="r")
    kept = open(best, "rb").read()
    assert train_mod._repair_best(last, best, st, logs.append) == 0
    assert open(best, "rb").read() == kept
    assert logs[-1].startswith(f"warning: {best} holds epoch 2, but the best epoch is 1 and "
                               "only epoch 3 is kept")
    # a best.npz from another run (same epoch number) is not taken for this run's
    st = {"epoch": 1, "best_epoch": 1, "run_id": "r"}
    _ckpt(last, **st)
    _ckpt(best, epoch=1, run_id="other")
    train_mod._repair_best(last, best, st, logs.append)
    assert "is from another run; restored it from" in logs[-1]
    assert open(best, "rb").read() == open(last, "rb").read()
    # checkpoints from before best_epoch/run_id: the best epoch comes from the history
    hist = [{"vra": 0.1}, {"vra": 0.3}, {"vra": 0.3}]
    st = {"epoch": 2, "history": hist}
    _ckpt(last, **st)
    _ckpt(best, epoch=1, history=hist[:2])
    n = len(logs)
    assert train_mod._repair_best(last, best, st, logs.append) == 1 and len(logs) == n
    os.unlink(best)
    st = {"epoch": 2, "history": hist[:2] + [{"vra": 0.4}]}
    _ckpt(last, **st)
    assert train_mod._repair_best(last, best, st, logs.append) == 2
    assert logs[-1].startswith(f"{best} is missing; restored it from {last}")


def test_orphaned_temporary_files_are_removed(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), epochs=2, stop_after=1, **TINY), log=_quiet)
    for n in (".tmp-k2j3h4.npz", ".tmp-probe-x1y2"):
        (out / n).write_bytes(b"half a checkpoint")
    (out / ".tmp-notes.txt").write_text("not ours")
    logs = []
    train(TrainConfig(out=str(out), epochs=2, **TINY), resume=True, log=logs.append)
    assert (f"removed temporary files of interrupted writes from {out}: .tmp-k2j3h4.npz, "
            ".tmp-probe-x1y2") in logs
    assert sorted(n for n in os.listdir(out) if n.startswith(".tmp-")) == [".tmp-notes.txt"]
    (out / ".tmp-zz.npz").write_bytes(b"x")  # and when a new run replaces the old one
    train(TrainConfig(out=str(out), epochs=1, **TINY), overwrite=True, log=_quiet)
    assert not (out / ".tmp-zz.npz").exists()


# ---------------------------------------------------------------- 4., 5. found up front

def test_unwritable_out_is_found_before_the_data_are_loaded(tmp_path, monkeypatch):
    # Tests run as root, whom a read-only mode does not stop: the probe's file creation is
    # made to fail as it would in a read-only directory.
    def no_data(cfg):
        raise AssertionError("data loaded before the write check")

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(train_mod, "load_data", no_data)
    monkeypatch.setattr("gloro_core.rundir.tempfile.mkstemp", refuse)
    out = tmp_path / "ro"
    with pytest.raises(RunDirError, match=rf"^--out {re.escape(str(out))}: cannot write there "
                                          r"\(Permission denied\); nothing was trained$"):
        train(TrainConfig(out=str(out), epochs=1, **TINY), log=_quiet)
    assert os.listdir(out) == [".lock"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_out_as_a_user(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="cannot write there"):
            train(TrainConfig(out=str(out), epochs=1, **TINY), log=_quiet)
    finally:
        out.chmod(0o700)


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("keep")
    assert main(CLI + ["--out", str(f)]) == 2
    assert capsys.readouterr().err == f"error: --out {f}: exists and is not a directory\n"
    assert f.read_text() == "keep"
    # under a file: cannot be made (a path no one, root included, can write to)
    assert main(CLI + ["--out", str(f / "run")]) == 2
    assert capsys.readouterr().err == (f"error: --out {f / 'run'}: cannot create the run "
                                       "directory (Not a directory)\n")


def test_plot_without_matplotlib_is_found_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "run"
    assert main(CLI + ["--out", str(out), "--plot"]) == 2
    assert capsys.readouterr().err == 'error: --plot needs matplotlib: pip install -e ".[plot]"\n'
    assert not out.exists()


# ---------------------------------------------------------------- 6. review fixes (R1-R6)

def test_resume_without_last_keeps_an_earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), epochs=1, **TINY), log=_quiet)
    os.unlink(out / "last.npz")
    before = _files(out)
    with pytest.raises(RunDirError, match=rf"^--resume: --out {re.escape(str(out))} has no "
                                          r"last.npz to resume from but holds an earlier run's "
                                          r"best.npz, metrics.csv, metrics.jsonl, test.json; use --overwrite"):
        train(TrainConfig(out=str(out), epochs=1, seed=3, **TINY), resume=True, log=_quiet)
    assert _files(out) == before
    assert main(CLI + ["--out", str(out), "--resume"]) == 2
    assert "has no last.npz to resume from" in capsys.readouterr().err
    assert _files(out) == before
    # nothing of a run there: resuming starts one, as before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "notes.txt").write_text("mine")
    logs = []
    train(TrainConfig(out=str(fresh), epochs=1, **TINY), resume=True, log=logs.append)
    assert any("starting from scratch" in s for s in logs) and (fresh / "best.npz").exists()


def test_best_that_is_a_npy_file_counts_as_unreadable(tmp_path):
    last, best = str(tmp_path / "last.npz"), str(tmp_path / "best.npz")
    with open(best, "wb") as fh:
        np.save(fh, np.arange(3))
    assert train_mod._saved_state(best) is None
    logs = []
    # not the best epoch's checkpoint: left as it is, and said so
    st = {"epoch": 1, "best_epoch": 0, "run_id": "r"}
    _ckpt(last, **st)
    kept = open(best, "rb").read()
    assert train_mod._repair_best(last, best, st, logs.append) == 0
    assert open(best, "rb").read() == kept
    assert logs[-1].startswith(f"warning: {best} is unreadable, but the best epoch is 1")
    # last.npz is the best epoch: its bytes are the best checkpoint
    st = {"epoch": 1, "best_epoch": 1, "run_id": "r"}
    _ckpt(last, **st)
    assert train_mod._repair_best(last, best, st, logs.append) == 1
    assert open(best, "rb").read() == open(last, "rb").read()


@pytest.mark.parametrize("bad,what", [
    ({"history": [{"vra": 0.1}, 3]}, "'history'"),
    ({"history": [{"vra": None}]}, "'history'"),
    ({"history": {"vra": 0.1}}, "'history'"),
    ({"best_epoch": "0"}, "'best_epoch'"),
    ({"best_epoch": 5}, "'best_epoch'"),
    ({"best_epoch": True}, "'best_epoch'"),
    ({"best_vra": None}, "'best_vra'"),
    ({"epoch": -1}, "'epoch'"),
    ({"run_id": 7}, "'run_id'"),
])
def test_malformed_train_state_is_refused_naming_the_file(tmp_path, bad, what):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), epochs=3, stop_after=2, **TINY), log=_quiet)
    last = out / "last.npz"
    net, extra = load_checkpoint(str(last))
    extra["train_state"].update(bad)
    if "history" in bad or "best_epoch" in bad:
        extra["train_state"]["best_epoch"] = bad.get("best_epoch")  # reach the history path
    train_mod.save_checkpoint(net, str(last), extra)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(last))}: train_state has no valid "
                                         rf"{re.escape(what)}"):
        train(TrainConfig(out=str(out), epochs=3, **TINY), resume=True, log=_quiet)


def test_replacing_best_from_another_run_is_documented():
    doc = train_mod._repair_best.__doc__
    assert "another run's" in doc and "locked" in doc


def test_legacy_resume_gets_a_run_id(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), epochs=3, stop_after=1, **TINY), log=_quiet)
    for name in ("last.npz", "best.npz"):  # as written before run_ids
        net, extra = load_checkpoint(str(out / name))
        extra["train_state"].pop("run_id")
        train_mod.save_checkpoint(net, str(out / name), extra)
    before = _params(out / "best.npz")
    logs = []
    train(TrainConfig(out=str(out), epochs=3, stop_after=2, **TINY), resume=True,
          log=logs.append)
    ids = {n: load_checkpoint(str(out / n))[1]["train_state"]["run_id"]
           for n in ("last.npz", "best.npz")}
    assert isinstance(ids["last.npz"], str) and ids["best.npz"] == ids["last.npz"]
    # the adopted best.npz keeps its weights when epoch 2 did not improve on it
    if load_checkpoint(str(out / "best.npz"))[1]["train_state"]["epoch"] == 0:
        assert all(np.array_equal(a, b) for a, b in zip(_params(out / "best.npz"), before))
    # a legacy best.npz of some other run no longer passes for this run's
    _ckpt(str(out / "best.npz"), epoch=0)
    logs.clear()
    train(TrainConfig(out=str(out), epochs=3, stop_after=2, **TINY), resume=True,
          log=logs.append)
    assert any("is from another run" in s for s in logs)


def test_refused_directory_gets_no_lock_file(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="is not empty"):
        train(TrainConfig(out=str(out), epochs=1, **TINY), log=_quiet)
    assert os.listdir(out) == ["notes.txt"]


def test_checkpoint_writes_fsync_the_directory(tmp_path, monkeypatch):
    import stat
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)
    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    checkpoint.save_npz(tmp_path / "a.npz", {}, {"x": np.zeros(2)})
    assert synced == [False, True]  # the file's data, then the directory's rename
    checkpoint.copy_npz(tmp_path / "a.npz", tmp_path / "b.npz")
    assert synced[2:] == [False, True]

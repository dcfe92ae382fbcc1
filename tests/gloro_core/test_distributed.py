"""Data parallelism (issue 14): shards, the communicators, and real ``mpiexec -n 2`` runs of
train, certify and attack against one process, a killed rank, and resume under another K.

The mpiexec tests need the ``mpi`` extra (mpi4py and MPICH from PyPI: ``pip install -e
".[mpi]"``; CI installs it) and skip with that reason without it. Every process of a
comparison runs one BLAS/Numba thread (the engine's float32 results depend on the thread
count, with or without MPI), so certify and attack must match one process exactly and
training within float32 reduction-order rounding (TOL below).
"""
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from gloro_core import distributed, parallel
from gloro_core.augment import augment_batch

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["train", "--dataset", "synthetic", "--synthetic-shape", "1,10,10", "--limit", "241", "--val", "40",
         "--test-limit", "90", "--arch", "c(4,3,2),d(16)", "--eps", "0.05", "--train-eps",
         "0.08", "--batch", "50", "--power-iters", "2", "--lr", "0.003", "--augment", "on",
         "--no-progress"]
# 241 points, 40 held out for validation: 201 in batches of 50: parts of 25 and 25, and a last batch of 1 that leaves rank 1
# an empty part (it then runs the power steps on a weight-0 point)
TOL = 2e-5  # |a - b| <= TOL * max|a| per array after 2 epochs (observed here: 2.1e-7)
TIMING = {"bound_seconds", "seconds_total", "ms_per_instance", "peak_mb_per_instance",
          "peak_mb_batch", "seconds"}


def _mpiexec():
    """The mpiexec installed next to this Python (the `mpi` extra's), else None."""
    here = Path(sys.executable).parent / "mpiexec"
    exe = str(here) if here.exists() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return exe


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason='needs mpi4py and mpiexec: pip install -e ".[mpi]"')


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMIX_SIZE")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", **extra)
    return env


def _run(args, ranks=1, timeout=300, check=True):
    cmd = [sys.executable, "-m", "gloro_core", *args]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def _metrics(out):
    return [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a, b, tol=TOL):
    """-> worst |a - b| / max|a| over the arrays (weights, iterates, Adam moments)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        scale = max(float(np.abs(a[k]).max()), 1e-30)
        d = float(np.abs(a[k].astype(np.float64) - b[k]).max()) / scale
        assert d <= tol, f"{k}: relative difference {d:.3g} > {tol}"
        worst = max(worst, d)
    return worst


# ---------------------------------------------------------------- without MPI

def test_spans_cover_in_order():
    for n in (0, 1, 2, 7, 50, 201):
        for k in (1, 2, 3, 5):
            parts = [parallel.span(n, k, r) for r in range(k)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
            assert max(h - lo for lo, h in parts) - min(h - lo for lo, h in parts) <= 1
            for batch in (1, 3, 64):
                spans = [parallel.batch_span(n, batch, types.SimpleNamespace(size=k, rank=r))
                         for r in range(k)]
                assert spans[0][0] == 0 and spans[-1][1] == n
                assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
                assert all(lo % batch == 0 for lo, _ in spans)  # whole batches only


def test_local_batches_make_the_global_batch():
    """The ranks' parts, augmented with the shared rng, are the single process's augmented
    batch, and each rank's rng ends where the single process's does."""
    rng = np.random.default_rng(3)
    x = rng.random((30, 2, 9, 9), dtype=np.float32)
    y = np.arange(30)
    idx = rng.permutation(30)[:7]
    whole = augment_batch(x[idx], np.random.default_rng(11))
    after = np.random.default_rng(11)
    augment_batch(x[idx], after)
    for k in (1, 2, 3, 8):
        parts, weights = [], []
        for r in range(k):
            g = np.random.default_rng(11)
            xb, yb, w = parallel.local_batch(types.SimpleNamespace(size=k, rank=r), x, y, idx, g)
            assert g.bit_generator.state == after.bit_generator.state
            if w:
                parts.append((xb, yb))
            else:  # empty part: the batch's first point, weight 0
                assert len(yb) == 1 and yb[0] == idx[0]
            weights.append(w)
        assert sum(weights) == pytest.approx(1.0)
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y[idx])


def test_launch_detection():
    assert distributed.launched_size({}) is None
    assert distributed.launched_size({"PMI_SIZE": "4"}) == 4
    assert distributed.launched_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    assert distributed.launched_size({"PMIX_RANK": "0"}) == 0
    with pytest.raises(RuntimeError, match="not a world size"):
        distributed.launched_size({"PMI_SIZE": "two"})
    assert distributed.world().size == 1  # pytest is not launched by mpiexec
    assert distributed.device_comm(distributed.world(), "gpu") is distributed.world()


def test_launch_without_mpi4py_says_what_to_install(tmp_path):
    """A process that a launcher started (PMI_SIZE=2) but that has no mpi4py: one clear
    line naming the extra, exit 2, nothing trained."""
    code = ("import sys; sys.modules['mpi4py'] = None; from gloro_core.cli import main; "
            f"sys.exit(main({TRAIN + ['--epochs', '1', '--out', str(tmp_path / 'r')]!r}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(PMI_SIZE="2", PMI_RANK="0"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert 'mpi4py is not installed here: pip install -e ".[mpi]"' in p.stderr
    assert not (tmp_path / "r").exists()


def test_readme_launch_commands_parse():
    """README's data-parallel section names the extra and launch commands that the CLI takes."""
    import shlex

    from gloro_core.cli import build_parser

    text = (REPO / "README.md").read_text()
    assert 'pip install -e ".[mpi]"' in text and '"mpi4py' in (REPO / "pyproject.toml").read_text()
    lines = [ln.split("#")[0].strip() for ln in text.splitlines() if ln.startswith("mpiexec -n ")]
    seen = set()
    for ln in lines:
        words = [w for w in shlex.split(ln) if w != "..."]
        assert words[3:6] == ["python", "-m", "gloro_core"], ln
        build_parser().parse_args(words[6:])  # exits (SystemExit) on a flag the CLI lacks
        seen.add(words[6])
    assert seen == {"train", "certify", "attack"}


# ---------------------------------------------------------------- mpiexec -n 2

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2-epoch runs: one process and mpiexec -n 2, on the same global batches."""
    if MPIEXEC is None:
        pytest.skip('needs mpi4py and mpiexec: pip install -e ".[mpi]"')
    base = tmp_path_factory.mktemp("dp")
    one, two = base / "one", base / "two"
    _run(TRAIN + ["--epochs", "2", "--out", str(one)])
    p = _run(TRAIN + ["--epochs", "2", "--out", str(two)], ranks=2)
    return one, two, p


@needs_mpi
def test_train_two_ranks_equals_one_process(runs):
    one, two, p = runs
    assert "data-parallel: 2 ranks (mpi), global batch 50" in p.stdout
    assert p.stdout.count("epoch   2/2") == 1  # rank 0 alone logs
    worst = _close(_arrays(one / "last.npz"), _arrays(two / "last.npz"))
    print(f"2 epochs, K=2 vs K=1: worst relative difference {worst:.3g}")
    m1, m2 = _metrics(one), _metrics(two)
    assert [m["epoch"] for m in m2] == [1, 2]
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        for k in ("val_clean_acc", "val_vra", "val_rejection"):  # counts of 40 points: at most one flips
            assert abs(a[k] - b[k]) <= 1 / 40 + 1e-12, k
        assert b["k_sub"] == pytest.approx(a["k_sub"], rel=1e-5)
    # rank 0 alone wrote the run directory: the lock names it, no stray temporaries
    assert sorted(n.name for n in two.iterdir()) == sorted(n.name for n in one.iterdir())


@needs_mpi
def test_resume_under_two_ranks_of_a_one_process_checkpoint(runs, tmp_path):
    """Epoch 1 by one process, epoch 2 by mpiexec -n 2 --resume: one process's 2 epochs."""
    one, _, _ = runs
    out = tmp_path / "mixed"
    _run(TRAIN + ["--epochs", "2", "--stop-after", "1", "--out", str(out)])
    p = _run(TRAIN + ["--epochs", "2", "--out", str(out), "--resume"], ranks=2)
    assert "resumed from" in p.stdout and "data-parallel: 2 ranks" in p.stdout
    assert [m["epoch"] for m in _metrics(out)] == [1, 2]
    _close(_arrays(one / "last.npz"), _arrays(out / "last.npz"))


@needs_mpi
def test_certify_and_attack_two_ranks_equal_one_process(runs):
    one, _, _ = runs
    for args in (["certify", str(one), "--json", "--batch", "32", "--limit", "90"],
                 ["attack", str(one), "--json", "--batch", "32", "--limit", "90", "--steps", "3",
                  "--restarts", "2"]):
        a = json.loads(_run(args).stdout.strip().splitlines()[-1])
        p = _run(args, ranks=2)
        lines = p.stdout.strip().splitlines()
        assert len(lines) == 1, p.stdout  # rank 0 alone prints
        b = json.loads(lines[0])
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if k not in TIMING} == \
            {k: v for k, v in b.items() if k not in TIMING}, args[0]
        assert a["n"] == 90


@needs_mpi
def test_ranks_that_differ_are_refused(tmp_path):
    """check_same compares a digest of the model and Adam state across real ranks."""
    code = """
import sys
from gloro_core import distributed, parallel
from gloro_core.architectures import build
from nn.optim import Adam
comm = distributed.world()
net = build("c(4,3,2),d(16)", (1, 10, 10), 10, seed=0)
opt = Adam(list(net.parameters()))
parallel.check_same(comm, net, opt, "same")
if comm.rank == 1:
    p = next(iter(net.parameters()))
    p.data[0] += 1e-7
try:
    parallel.check_same(comm, net, opt, "after a change on rank 1")
except parallel.RanksDiverged as exc:
    print(f"rank {comm.rank}: {exc}")
"""
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", code], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("after a change on rank 1: the model or Adam state of rank(s) [1] "
                          "differs from rank 0's") == 2


@needs_mpi
def test_a_nan_on_one_rank_stops_every_rank_alike(tmp_path):
    """Only rank 1's part overflows: the all-reduced loss is NaN on both ranks, so both
    raise TrainingDiverged at the same step and the job ends cleanly, with the last
    checkpoint as it was."""
    code = f"""
import numpy as np
from gloro_core import data, distributed
from gloro_core.train import TrainConfig, TrainingDiverged, train
tiny = dict(dataset="synthetic", synthetic_shape=(1, 10, 10), synthetic_n=(96, 48),
            arch="c(4,3,2),d(16)", batch=32, power_iters=2, progress=False, val=0)
out = {str(tmp_path / "run")!r}
train(TrainConfig(out=out, epochs=2, stop_after=1, **tiny), log=lambda s: None)
before = open(out + "/last.npz", "rb").read()
ds = data.load_dataset("synthetic", seed=0, synthetic_shape=(1, 10, 10), synthetic_n=(96, 48))
idx = next(data.batches(96, 32, data.epoch_rng(0, 1, 0)))  # epoch 2's first global batch
ds.x_train[idx[16:]] = 3e38  # rank 1's part of it overflows to inf / NaN; rank 0's does not
comm = distributed.world()
try:
    with np.errstate(over="ignore", invalid="ignore"):
        train(TrainConfig(out=out, epochs=2, **tiny), resume=True, log=lambda s: None, dataset=ds)
except TrainingDiverged as exc:
    print(f"rank {{comm.rank}}: {{str(exc)[:30]}}", flush=True)
assert open(out + "/last.npz", "rb").read() == before
"""
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", code], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    # the launcher forwards the ranks' stdout without keeping their lines whole
    said = sorted(re.findall(r"rank (\d): loss is inf at epoch 2, step 1(?!\d)", p.stdout))
    assert said == ["0", "1"], p.stdout + p.stderr[-3000:]


@needs_mpi
def test_power_iterates_that_drift_per_rank_are_shared_from_rank_0(tmp_path):
    """On a GPU the ranks' power steps may differ in the last bits (split-K GEMMs add with
    atomics in no fixed order). Stood in for here by a rank-dependent nudge after every power
    update and every convergence: training still keeps every rank's iterates equal to rank
    0's, so the state check after each epoch passes (before the fix: RanksDiverged)."""
    code = f"""
import numpy as np
from gloro_core import distributed
from gloro_core.model import GloroNet
from gloro_core.train import TrainConfig, train
comm = distributed.world()
def nudged(fn):
    def run(self, *a, **k):
        out = fn(self, *a, **k)
        self.iterates = [v * v.dtype.type(1 + 1e-6 * comm.rank) for v in self.iterates]
        return out
    return run
GloroNet.power_update = nudged(GloroNet.power_update)
GloroNet.update_lipschitz = nudged(GloroNet.update_lipschitz)
tiny = dict(dataset="synthetic", synthetic_shape=(1, 10, 10), synthetic_n=(96, 48),
            arch="c(4,3,2),d(16)", batch=32, power_iters=2, progress=False, val=0)
train(TrainConfig(out={str(tmp_path / "run")!r}, epochs=2, **tiny), log=lambda s: None)
print("trained", flush=True)
"""
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", code], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and p.stdout.count("trained") == 2, p.stdout + p.stderr[-3000:]


@needs_mpi
def test_an_error_on_rank_0_ends_the_job_once(tmp_path):
    """A run directory that rank 0 refuses: the whole job stops with rank 0's message."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("not a run")
    t0 = time.monotonic()
    p = _run(TRAIN + ["--epochs", "1", "--out", str(out)], ranks=2, check=False, timeout=120)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 100
    assert p.stderr.count(f"error: --out {out} is not empty") == 1, p.stderr
    assert sorted(n.name for n in out.iterdir()) == ["notes.txt"]  # refused before locking


@needs_mpi
def test_an_error_on_rank_1_alone_ends_the_job(tmp_path):
    """Rank 1 alone fails (its dataset cannot be read) while rank 0 waits in a collective:
    rank 1 names itself, and the job ends instead of hanging."""
    code = f"""
from gloro_core import distributed
from gloro_core.train import TrainConfig, train
comm = distributed.world()
tiny = dict(dataset="synthetic" if comm.rank == 0 else "mnist", synthetic_shape=(1, 10, 10),
            synthetic_n=(96, 48), arch="c(4,3,2),d(16)", batch=32, power_iters=2,
            progress=False, val=0, data_dir={str(tmp_path / "nothing-here")!r})
train(TrainConfig(out={str(tmp_path / "run")!r}, epochs=1, **tiny), log=lambda s: None)
print("finished")
"""
    t0 = time.monotonic()
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", code], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "finished" not in p.stdout
    assert p.stderr.count("error on rank 1 of 2: ") == 1, p.stderr
    assert time.monotonic() - t0 < 100


def _rank_pid(launcher: int, rank: int) -> int | None:
    """pid of the process of ``rank`` that ``launcher`` (an mpiexec) started."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            pid, ppid = int(d.name), int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if f"PMI_RANK={rank}".encode() not in env or b"-m\0gloro_core" not in (d / "cmdline").read_bytes():
            continue
        while ppid > 1:  # one of the launcher's descendants
            if ppid == launcher:
                return pid
            try:
                ppid = int((Path("/proc") / str(ppid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
    return None


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank through /proc")
def test_killed_rank_stops_the_job_and_resume_continues(tmp_path):
    """SIGKILL rank 1 during epoch 2 of 3: mpiexec ends the whole job with a message, last.npz
    holds epoch 1 intact, and --resume (under K=1, not the K that wrote it) finishes the run;
    its result is the uninterrupted one's within TOL."""
    out = tmp_path / "killed"
    # 1041 points, 1001 trained on: 21 steps an epoch, so epoch 2 is still running when rank 1 is killed
    args = TRAIN + ["--epochs", "3", "--limit", "1041", "--out", str(out)]
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "gloro_core", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        victim = None
        while not (out / "last.npz").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            victim = victim or _rank_pid(proc.pid, 1)
            time.sleep(0.02)
        assert (out / "last.npz").exists(), "epoch 1 did not finish in time"
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)  # no rank waits forever
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES" in stdout + stderr, stdout + stderr
    assert "Killed (signal 9)" in stdout + stderr
    from gloro_core.train import load_checkpoint

    _, extra = load_checkpoint(str(out / "last.npz"))  # loads: not torn
    assert extra["train_state"]["epoch"] == 0  # epoch 1's, whole
    p = _run(args + ["--resume"])
    assert "resumed from" in p.stdout
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    full = tmp_path / "full"
    _run(TRAIN + ["--epochs", "3", "--limit", "1041", "--out", str(full)])
    _close(_arrays(full / "last.npz"), _arrays(out / "last.npz"))


@needs_mpi
@pytest.mark.gpu_emulated
def test_gpu_training_two_ranks_equals_one_on_the_emulated_gpu(cuda_emulator_build, tmp_path):
    """--device gpu under mpiexec -n 2 on the CuPy stand-in (tests/fake_cupy.py, its kernels
    on the CUDA C emulator): each rank picks its GPU, the CuPy gradients go through the host
    (the stand-in has no NCCL), the losses stay 0-d device arrays, and the step (the
    emulator is slow: one, parts of 2 points) ends where one process's GPU run does."""
    code = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(REPO / "tests")!r})
import cuda_emulator, fake_cupy
with fake_cupy.install(cuda_emulator.Emulator(Path({str(cuda_emulator_build)!r}))):
    from gloro_core import distributed
    from gloro_core.train import TrainConfig, train
    cfg = TrainConfig(dataset="synthetic", synthetic_shape=(1, 8, 8), synthetic_n=(4, 4),
                      arch="c(4,3,2),d(8)", batch=4, epochs=1, power_iters=1,
                      lipschitz_max_iter=5, out=sys.argv[1], progress=False, device="gpu", val=0)
    hist = train(cfg, log=lambda m: None)
    comm = distributed.world()
    if comm.rank == 0:
        print(json.dumps({{"ranks": comm.size, "loss": hist[-1]["loss"]}}))
"""
    got = {}
    for k in (1, 2):
        out = tmp_path / f"k{k}"
        cmd = [sys.executable, "-c", code, str(out)]
        p = subprocess.run([MPIEXEC, "-n", str(k), *cmd] if k > 1 else cmd, cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        got[k] = json.loads(p.stdout.strip().splitlines()[-1])
        assert got[k]["ranks"] == k
    assert got[2]["loss"] == pytest.approx(got[1]["loss"], rel=1e-5)
    _close(_arrays(tmp_path / "k1" / "last.npz"), _arrays(tmp_path / "k2" / "last.npz"))


# ---------------------------------------------------------------- NCCL (one GPU)

def test_nccl_allreduce(cupy_device):
    """The NCCL communicator on one rank: the buffer goes through NCCL into another one;
    dtypes it does not sum are refused."""
    from cupy.cuda import nccl

    if not nccl.available:
        pytest.skip("CuPy has no NCCL library here (cupy.cuda.nccl.available is False)")
    cp = cupy_device
    comm = distributed.NCCLComm(distributed.Single())
    for dt in ("float32", "float64", "int64"):
        src = cp.arange(1000, dtype=dt) * 3
        out = cp.zeros_like(src)
        comm.allreduce(src, out)
        cp.cuda.get_current_stream().synchronize()
        assert bool((out == src).all()), dt
    with pytest.raises(ValueError, match="dtype"):
        comm.allreduce(cp.zeros(4, dtype=cp.float16))
    with pytest.raises(ValueError, match="1-D"):
        comm.allreduce(cp.zeros((2, 2), dtype=cp.float32))


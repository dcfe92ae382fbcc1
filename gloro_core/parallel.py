"""Data parallelism over a communicator (``distributed``): shards, the gradient all-reduce,
the same-state check, sharded evaluation and certification.

Training: the global batch is ``--batch``; rank r of K takes the contiguous part
``span(len(idx), K, r)`` of every global batch ``idx`` (so the K parts are the single
process's batch, in its order), computes the mean loss of its part, and the gradients are
summed as one flat buffer weighted by part size: the global mean, as one process computes
it up to float32 summation order. Every rank runs the same power iterations on the same
weights and the same Adam update on the same gradients, so the model stays identical on
every rank; :func:`check_same` compares a digest of it across ranks.

Evaluation and certification: rank r takes the whole batches ``batch_span`` gives it
(batch boundaries as one process has them, so each point is computed exactly as there)
and the counts or per-point arrays are gathered exactly.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from kernels.registry import is_gpu_array, to_host

# variables that set a thread count at library load: when one is set, the user decided
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


class RanksDiverged(RuntimeError):
    """The ranks' models or optimizer states differ: data parallelism is broken."""

    all_ranks = True  # raised on every rank at once (see cli.main)


def span(n: int, parts: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of part ``rank`` of ``range(n)`` cut into ``parts`` contiguous parts whose
    sizes differ by at most one."""
    return n * rank // parts, n * (rank + 1) // parts


def batch_span(n: int, batch: int, comm) -> tuple[int, int]:
    """[lo, hi) of the points this rank evaluates: whole batches of ``batch`` (the last may
    be short), so every batch is the one a single process would run."""
    nb = -(-n // batch)
    lo, hi = span(nb, comm.size, comm.rank)
    return min(lo * batch, n), min(hi * batch, n)


def share_cores(comm) -> int | None:
    """Under K ranks on one host, give each rank cores // K BLAS and Numba threads (else K
    ranks of all-core pools fight over the cores), unless a thread variable says otherwise.
    -> the count set, or None when nothing was changed."""
    if comm.size == 1 or any(os.environ.get(v) for v in _THREAD_VARS):
        return None
    import numba

    from kernels import threads

    n = max(1, (os.cpu_count() or 1) // comm.local_size)
    threads.set_blas_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return n


# ---------------------------------------------------------------- training

def local_batch(comm, x, y, idx, aug_rng=None):
    """This rank's part of the global batch ``idx``: -> (x part, y part, weight).

    weight = part size / global batch size: the part's mean loss times it, summed over the
    ranks, is the global mean. With augmentation every rank draws the whole batch's random
    transforms (a few numbers per image) and transforms only its own images, so image i
    gets the transform one process gives it. A rank whose part is empty (a last batch
    smaller than K) computes on the batch's first point with weight 0: it still runs the
    step's power iterations, which keep the iterates equal across ranks.
    """
    from .augment import augment_batch, random_matrix

    n = len(idx)
    lo, hi = span(n, comm.size, comm.rank)
    weight = (hi - lo) / n
    if hi == lo:
        lo, hi = 0, 1
    xb = x[idx[lo:hi]]
    if aug_rng is not None:
        h, w = xb.shape[-2:]
        for _ in range(lo):  # the draws of the images before this part
            random_matrix(aug_rng, h, w)
        xb = augment_batch(xb, aug_rng)
        for _ in range(n - hi):  # and after it: the rng ends where one process's does
            random_matrix(aug_rng, h, w)
    return xb, y[idx[lo:hi]], weight


def reduce_gradients(comm, params, loss, weight: float, net=None):
    """Sum ``weight`` x (gradient, loss) over the ranks in one flat buffer; the summed
    gradients replace each ``p.grad``. ``loss`` is this rank's 0-d loss array; -> the
    global mean loss, a 0-d array on the gradients' device (read without a host sync).
    One process: ``loss`` as it is, nothing summed.

    With ``net``, its power iterates ride in the same buffer, weighted 1 on rank 0 and 0
    elsewhere: every rank leaves with rank 0's iterates, bit for bit. Each rank runs the same
    power steps, but a GPU's split-K GEMMs add their parts with atomics in no fixed order, so
    the ranks' iterates would drift apart in the last bits.

    The buffer has the gradients' dtype and device (CuPy on NCCL); its size is the
    parameters' bytes (plus the iterates') plus one element. Parameters without a gradient
    stay without one (every rank runs the same graph, so the same ones have none).
    """
    if comm.size == 1:
        return loss
    have = [p for p in params if p.grad is not None]
    if not have:
        raise ValueError("no parameter has a gradient to reduce")
    xp = have[0].xp
    dtype = have[0].grad.dtype
    its = list(net.iterates) if net is not None else []
    buf = xp.empty(sum(p.grad.size for p in have) + sum(v.size for v in its) + 1, dtype=dtype)
    off = 0
    for p in have:
        xp.multiply(p.grad.ravel(), dtype.type(weight), out=buf[off:off + p.grad.size])
        off += p.grad.size
    for v in its:
        xp.multiply(v.ravel(), dtype.type(comm.rank == 0), out=buf[off:off + v.size])
        off += v.size
    xp.multiply(xp.asarray(loss, dtype=dtype).reshape(1), dtype.type(weight), out=buf[off:])
    comm.allreduce(buf)
    off = 0
    for p in have:
        p.grad = buf[off:off + p.grad.size].reshape(p.grad.shape)
        off += p.grad.size
    if its:
        shared = []
        for v in its:
            shared.append(buf[off:off + v.size].reshape(v.shape).astype(v.dtype))   # a copy
            off += v.size
        net.iterates = shared
    return buf[off:].reshape(()).copy()  # not a view: the buffer goes with the step


def share_iterates(comm, net) -> None:
    """Every rank takes rank 0's power iterates (after a convergence that each rank ran on
    its own: see reduce_gradients for why their last bits may differ)."""
    if comm.size == 1:
        return
    host = comm.bcast([to_host(v) for v in net.iterates] if comm.rank == 0 else None)
    net.iterates = [net.xp.asarray(v) for v in host]


def state_digest(net, opt) -> str:
    """A hash of everything that must be equal on every rank: parameters, power iterates,
    Adam's step count and moments."""
    h = hashlib.blake2b(digest_size=16)
    arrays = [p.data for p in net.parameters()] + list(net.iterates)
    arrays += [a for a in list(opt.m) + list(opt.v) if a is not None]
    for a in arrays:
        h.update(np.ascontiguousarray(to_host(a)).tobytes() if is_gpu_array(a)
                 else np.ascontiguousarray(a))
    h.update(str(opt.t).encode())
    return h.hexdigest()


def check_same(comm, net, opt, where: str) -> None:
    """RanksDiverged on every rank unless all ranks hold the same model and Adam state."""
    if comm.size == 1:
        return
    digests = comm.allgather(state_digest(net, opt))
    if len(set(digests)) > 1:
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RanksDiverged(
            f"{where}: the model or Adam state of rank(s) {odd} differs from rank 0's "
            f"(digests {sorted(set(digests))}); data-parallel training cannot go on. Resume "
            "from the last checkpoint (all ranks load the same one)")


def load_on_all(comm, path, load):
    """``load(path)`` on every rank from rank 0's file: rank 0 reads it and sends its bytes,
    which the other ranks load from a temporary file of their own (no shared filesystem
    needed for the checkpoint)."""
    if comm.size == 1:
        return load(path)
    data = None
    if comm.rank == 0:
        with open(path, "rb") as fh:
            data = fh.read()
    data = comm.bcast(data)
    if comm.rank == 0:
        return load(path)
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix="gloro-rank-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return load(tmp)
    finally:
        os.unlink(tmp)


# ---------------------------------------------------------------- evaluation

def evaluate(comm, net, x, y, eps, batch) -> dict:
    """Clean accuracy, VRA and rejection of ``net`` on (x, y) (train.evaluate's numbers),
    sharded by whole batches; counts summed exactly, so equal to one process's. (One
    process calls train.evaluate: train._evaluate chooses.)"""
    from . import metrics

    lo, hi = batch_span(len(x), batch, comm)
    counts = np.zeros(3, dtype=np.int64)  # clean correct, certified correct, rejected
    for s in range(lo, hi, batch):
        xb, yb = x[s:min(s + batch, hi)], np.asarray(y[s:min(s + batch, hi)])
        clean = net.logits(xb).argmax(axis=1)
        pred, _ = net.certify(xb, eps, tight_radius=False)
        counts += [(clean == yb).sum(), ((pred == yb) & (pred != metrics.BOT)).sum(),
                   (pred == metrics.BOT).sum()]
    counts = comm.allreduce(counts)
    n = len(x)
    if n == 0:
        return {"clean_acc": float("nan"), "vra": float("nan"), "rejection": float("nan")}
    return {"clean_acc": float(counts[0] / n), "vra": float(counts[1] / n),
            "rejection": float(counts[2] / n)}


def gather_rows(comm, *arrays):
    """Each array's rows of every rank, concatenated in rank order (one process: as given)."""
    if comm.size == 1:
        return arrays if len(arrays) > 1 else arrays[0]
    parts = comm.allgather([np.asarray(a) for a in arrays])
    out = tuple(np.concatenate([p[i] for p in parts]) for i in range(len(arrays)))
    return out if len(out) > 1 else out[0]


def max_over_ranks(comm, *values):
    """Each value's maximum over the ranks (times, memory peaks)."""
    if comm.size == 1:
        return values if len(values) > 1 else values[0]
    got = comm.allgather(values)
    out = tuple(max(v[i] for v in got) for i in range(len(values)))
    return out if len(out) > 1 else out[0]

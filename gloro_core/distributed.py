"""Communicators: one process (the default), MPI through mpi4py, NCCL for CuPy arrays.

``world()`` gives the communicator of this process. A process started by ``mpiexec`` (or
another MPI launcher: the launcher's variables say so) gets an :class:`MPIComm` over
MPI_COMM_WORLD; any other process a :class:`Single` one, and mpi4py is never imported.
There is no flag: the world size is the launcher's ``-n``.

Every communicator has ``size``, ``rank``, ``local_rank`` and ``local_size`` (ranks on this
host) and these collectives, which every rank must call in the same order:

* ``allreduce(buf)``: in-place sum of a flat 1-D array (float32/float64/int64) over the
  ranks; NumPy arrays on MPI, CuPy arrays on NCCL (or through the host on plain MPI);
* ``bcast(obj, root=0)``, ``allgather(obj) -> list`` (rank order): small Python objects;
* ``barrier()``; ``abort(code)``: ends every rank of the job now.

``device_comm(comm, "gpu")`` is the communicator for the gradients of a GPU run: NCCL
(``cupy.cuda.nccl``, one GPU per rank) when CuPy has it, else ``comm`` itself, which
copies through the host.
"""
from __future__ import annotations

import os
import sys

# (variable, what it holds): set by MPICH/Intel MPI (hydra), Open MPI, PMIx launchers
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
INSTALL_HINT = 'pip install -e ".[mpi]"'

_WORLD = None


def launched_size(environ=None) -> int | None:
    """The world size an MPI launcher announced to this process, or None when none did
    (a launcher whose size variable is absent but whose rank variable is set gives 0:
    "launched, size unknown")."""
    env = os.environ if environ is None else environ
    for var in _SIZE_VARS:
        if env.get(var, "").strip():
            try:
                return int(env[var])
            except ValueError:
                raise RuntimeError(f"{var}={env[var]!r} is not a world size") from None
    return 0 if any(env.get(v, "").strip() for v in _RANK_VARS) else None


def world():
    """The communicator of this process (made once): MPI under a launcher with more than
    one rank, else the single-process one."""
    global _WORLD
    if _WORLD is None:
        size = launched_size()
        _WORLD = Single() if size in (None, 1) else MPIComm.from_world(size)
    return _WORLD


class Single:
    """The world of one process: every collective is the identity."""

    size, rank, local_rank, local_size, kind = 1, 0, 0, 1, "single"

    def allreduce(self, buf):
        return buf

    def bcast(self, obj, root=0):
        return obj

    def allgather(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1):
        raise SystemExit(code)


class MPIComm:
    """MPI_COMM_WORLD through mpi4py. Errors are fatal (MPI's default handler): a rank that
    dies ends the job through the launcher instead of leaving the others waiting."""

    kind = "mpi"

    def __init__(self, comm):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()

    @classmethod
    def from_world(cls, announced: int) -> MPIComm:
        try:
            from mpi4py import MPI
        except ImportError:
            raise RuntimeError(
                f"this process was started by an MPI launcher (world size {announced or '?'}) "
                f"but mpi4py is not installed here: {INSTALL_HINT} (mpi4py and MPICH from "
                "PyPI), then launch with that environment's mpiexec") from None
        comm = cls(MPI.COMM_WORLD)
        if announced and comm.size != announced:
            raise RuntimeError(
                f"the launcher started {announced} ranks but mpi4py's MPI sees a world of "
                f"{comm.size}: mpiexec and mpi4py come from different MPI libraries; use the "
                f"mpiexec installed with mpi4py ({INSTALL_HINT} puts both in the environment)")
        return comm

    def allreduce(self, buf):
        from kernels.registry import array_module, is_gpu_array, to_host

        if is_gpu_array(buf):  # no NCCL: through the host
            host = to_host(buf)
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
            buf[...] = array_module(buf).asarray(host)
            return buf
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def bcast(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(int(code))
        os._exit(int(code))  # MPICH's Abort may return before the launcher's kill arrives


class NCCLComm:
    """Sums CuPy arrays on the GPUs through NCCL; the host collectives go to ``host``.

    ``host`` bootstraps it (rank 0's NCCL id is broadcast), so every rank must build it
    at the same point. Each rank must have selected its own GPU first (one GPU per rank:
    NCCL refuses two ranks on one device).
    """

    kind = "nccl"

    def __init__(self, host):
        from cupy.cuda import nccl

        if not nccl.available:
            raise RuntimeError("cupy.cuda.nccl is not available (CuPy found no NCCL library)")
        self.host, self.nccl = host, nccl
        self.size, self.rank = host.size, host.rank
        self.local_rank, self.local_size = host.local_rank, host.local_size
        uid = host.bcast(nccl.get_unique_id() if host.rank == 0 else None)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def allreduce(self, buf, out=None):
        """Sum ``buf`` (1-D CuPy) over the ranks into ``out`` (default: in place), on the
        current stream (later work on that stream sees the sum)."""
        import cupy

        if buf.ndim != 1 or not buf.flags.c_contiguous:
            raise ValueError(f"allreduce needs a contiguous 1-D array, got shape {buf.shape}")
        types = {"float32": self.nccl.NCCL_FLOAT32, "float64": self.nccl.NCCL_FLOAT64,
                 "int64": self.nccl.NCCL_INT64}
        if str(buf.dtype) not in types:
            raise ValueError(f"allreduce: dtype {buf.dtype} is not one of {sorted(types)}")
        out = buf if out is None else out
        self.comm.allReduce(buf.data.ptr, out.data.ptr, buf.size, types[str(buf.dtype)],
                            self.nccl.NCCL_SUM, cupy.cuda.get_current_stream().ptr)
        return out

    def bcast(self, obj, root=0):
        return self.host.bcast(obj, root)

    def allgather(self, obj) -> list:
        return self.host.allgather(obj)

    def barrier(self) -> None:
        self.host.barrier()

    def abort(self, code: int = 1):
        self.host.abort(code)


def fail(comm, exc: BaseException) -> None:
    """End the whole job over ``exc`` unless every rank raises it alike (``all_ranks``) or
    there is one rank; then return and let the caller raise it.

    A rank that leaves with an exception while the others wait in a collective would leave
    them waiting forever. Rank 0 prints the error and aborts at once; another rank waits two
    seconds first (when rank 0 has the same error, its abort ends this rank before it
    prints, and the error is printed once), then prints it as ``error on rank r of K``.
    The exit status is 2 for bad input (ValueError, FileNotFoundError), else 1."""
    if comm.size == 1 or getattr(exc, "all_ranks", False):
        return
    import time
    import traceback

    user = isinstance(exc, (ValueError, FileNotFoundError))
    if comm.rank != 0:
        time.sleep(2.0)
    if not user:
        traceback.print_exception(exc)
    who = f" on rank {comm.rank} of {comm.size}" if comm.rank else ""
    print(f"error{who}: {exc}" if user else f"error{who}: {type(exc).__name__}: {exc}",
          file=sys.stderr, flush=True)
    comm.abort(2 if user else 1)


def device_comm(comm, device: str):
    """The communicator for arrays on ``device``: NCCL for "gpu" when there is more than
    one rank, CuPy has NCCL and every rank of a host has a GPU of its own (NCCL refuses two
    ranks on one device), else ``comm`` (which stages CuPy arrays through the host). Every
    rank decides alike (an all-gather), since building NCCL's communicator is collective."""
    if device != "gpu" or comm.size == 1:
        return comm
    try:
        import cupy
        from cupy.cuda import nccl

        ok = nccl.available and comm.local_size <= cupy.cuda.runtime.getDeviceCount()
    except (ImportError, RuntimeError):  # no CuPy, no driver (CUDARuntimeError): the host
        ok = False
    return NCCLComm(comm) if all(comm.allgather(bool(ok))) else comm


def use_local_gpu(comm) -> int:
    """Select this rank's GPU (local rank modulo the host's device count); -> its id."""
    import cupy

    dev = comm.local_rank % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(dev).use()
    return dev

"""The run directory of ``train``: one writer at a time, no silent replacement of an earlier
run, write access checked before any work is done.

``RunDir(out, resume=..., overwrite=...)`` is held (``with``) for the whole run:

* ``OUT/.lock`` is locked with ``fcntl.flock``, which the kernel releases when the holder
  exits however it exits; the file names the holder (pid, host, start time) so a second
  writer is refused with a message saying who has the directory;
* a directory holding anything but ``.lock`` is refused unless ``resume`` (continue that run)
  or ``overwrite`` (replace it); ``resume`` without ``last.npz`` is refused too when an
  earlier run's outputs are there, since starting from scratch would replace them;
* these refusals come before OUT or its ``.lock`` is created where OUT already exists (and
  again once locked, in case another process changed it meanwhile);
* a small file is written and removed, so a read-only or full directory fails now rather
  than after the first epoch;
* temporary files that interrupted checkpoint writes left behind (``.tmp-*.npz``) are removed.

``overwrite`` removes nothing by itself: ``train`` calls ``clear_outputs`` once the new run has
its data and model, just before its first write, and only the files ``train`` writes
(``OUTPUTS``) go; anything else in OUT is left alone.
"""
from __future__ import annotations

import errno
import fnmatch
import json
import os
import socket
import tempfile
import time

try:
    import fcntl
except ImportError:  # not POSIX: refused in RunDir._lock rather than run unlocked
    fcntl = None

LOCK = ".lock"
OUTPUTS = ("last.npz", "best.npz", "metrics.jsonl", "metrics.csv", "curves.png", "test.json")
RESUME_FROM = "last.npz"  # the checkpoint ``resume`` continues from
# checkpoint.save_npz's temporary files, and the write probe below
ORPHANS = (".tmp-*.npz", ".tmp-probe-*")


class RunDirError(ValueError):
    """The run directory cannot be used as asked (a file, busy, not writable, holds a run)."""


class RunDir:
    def __init__(self, out, *, resume: bool = False, overwrite: bool = False):
        self.out = os.fspath(out)
        if resume and overwrite:
            raise RunDirError(f"--resume and --overwrite exclude each other (--out {self.out}): "
                              "resume continues the run there, overwrite replaces it")
        self.resume, self.overwrite = resume, overwrite
        self.removed_orphans: list[str] = []
        self._fd = None

    def __enter__(self):
        out = self.out
        if os.path.exists(out) and not os.path.isdir(out):
            raise RunDirError(f"--out {out}: exists and is not a directory")
        if os.path.isdir(out):
            self._check_empty()  # refuse before creating .lock in a directory we won't use
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"--out {out}: cannot create the run directory "
                              f"({exc.strerror or exc})") from None
        self._lock()
        try:
            self._probe_write()
            self._check_empty()
            self.removed_orphans = self._remove(
                n for n in os.listdir(out) if any(fnmatch.fnmatch(n, p) for p in ORPHANS))
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc):
        self.release()

    def clear_outputs(self) -> list[str]:
        """Remove the earlier run's files (``overwrite``); -> the names removed."""
        return self._remove(n for n in OUTPUTS if os.path.lexists(os.path.join(self.out, n)))

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # a later reader must not take this holder for a live one
        except OSError:
            pass
        # The file stays: unlinking it would let a process that opened it before the unlink
        # lock the orphaned inode while a newcomer locks a fresh file, both "holding" OUT.
        os.close(fd)  # closing the last descriptor releases the flock

    # ------------------------------------------------------------ steps of __enter__

    def _lock(self):
        path = os.path.join(self.out, LOCK)
        if fcntl is None:
            raise RunDirError(f"--out {self.out}: cannot lock the run directory on this "
                              "platform (no fcntl)")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"--out {self.out}: cannot write there ({exc.strerror}: "
                              f"{path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EACCES) else None
            os.close(fd)
            if holder is None:
                raise RunDirError(f"--out {self.out}: cannot lock {path} ({exc.strerror}); "
                                  "a run directory that cannot be locked is not used") from None
            raise RunDirError(f"--out {self.out} is in use by another training run ({holder}); "
                              "wait for it to finish or choose another --out") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        try:
            # write then cut, so a concurrent reader never sees an empty file mid-update
            os.pwrite(fd, info, 0)
            os.ftruncate(fd, len(info))
        except OSError as exc:
            os.close(fd)
            raise RunDirError(f"--out {self.out}: cannot write there ({exc.strerror}: "
                              f"{path})") from None
        self._fd = fd

    def _probe_write(self):
        path = None
        try:
            fd, path = tempfile.mkstemp(prefix=".tmp-probe-", dir=self.out)
            with os.fdopen(fd, "wb") as fh:
                fh.write(b"gloro write probe\n")
            os.unlink(path)
        except OSError as exc:
            if path is not None and os.path.exists(path):
                os.unlink(path)
            raise RunDirError(f"--out {self.out}: cannot write there ({exc.strerror or exc}); "
                              "nothing was trained") from None

    def _check_empty(self):
        if self.overwrite:
            return
        names = os.listdir(self.out)
        if self.resume:
            if RESUME_FROM in names:
                return
            # nothing to resume from: a fresh start would truncate metrics.jsonl and
            # replace best.npz, so an earlier run's leftovers are not silently taken over
            left = sorted(n for n in names if n in OUTPUTS)
            if left:
                raise RunDirError(f"--resume: --out {self.out} has no {RESUME_FROM} to resume "
                                  f"from but holds an earlier run's {', '.join(left)}; use "
                                  "--overwrite to replace them or choose another --out")
            return
        found = sorted(n for n in names if n != LOCK)
        if found:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise RunDirError(f"--out {self.out} is not empty ({shown}): use --resume to "
                              "continue the run there or --overwrite to replace it")

    def _remove(self, names) -> list[str]:
        done = []
        for n in names:
            try:
                os.unlink(os.path.join(self.out, n))
            except FileNotFoundError:
                continue
            done.append(n)
        return sorted(done)


def _read_holder(fd) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: its lock file names none"

"""PyTorch's side of the race, in worker processes of its own.

PyTorch never runs in the bench's process: our engine and PyTorch's OpenMP runtime would
read each other's process state (an OMP_WAIT_POLICY set for one slowed the other), and its
allocator's behaviour depends on glibc settings that are read at process start. So the
bench starts one worker per malloc setting:

    glibc   glibc's defaults (GLIBC_TUNABLES removed from the worker's environment)
    tuned   raised mmap/trim thresholds (GLIBC_TUNABLES=TUNED): large tensors are reused
            instead of coming from fresh mmap'ed pages (page faults) every step

Each worker gets the bench's starting environment otherwise, and the run's thread count
(torch.set_num_threads). "PyTorch at its best" is the faster of the two.

Protocol: one JSON object per line. The parent writes a command to the worker's stdin,
the worker answers one line on its stdout (everything else it prints goes to stderr):

    {"cmd": "hello", "threads": n}        -> {"ok": true, "torch": version, "threads": n, ...}
    {"cmd": "prepare", "id": i, "what": "kernel"|"step"|"infer", ...}
                                          -> {"ok": true, ...}  builds callable i, not called
    {"cmd": "run", "id": i}               -> {"ok": true, "s": seconds of one call, timed here}
    {"cmd": "reset"}                      -> {"ok": true}  drops every callable and model
    {"cmd": "quit"}
Failures answer {"ok": false, "error": "..."}.

Run by the bench as ``python bench/torch_worker.py``.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time

TUNED = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"
SETTINGS = {"glibc": None, "tuned": TUNED}  # setting -> GLIBC_TUNABLES in the worker
LABELS = {"glibc": "glibc defaults", "tuned": "raised malloc thresholds"}


def worker_env(base: dict, setting: str) -> dict:
    """The environment of the worker for ``setting``: ``base`` with GLIBC_TUNABLES set or removed."""
    env = {k: v for k, v in base.items() if k != "GLIBC_TUNABLES"}
    if SETTINGS[setting] is not None:
        env["GLIBC_TUNABLES"] = SETTINGS[setting]
    return env


# ============================================================== parent side
class RemoteFn:
    """A callable living in a worker: ``timed()`` runs it once there and returns the
    seconds the worker measured around the call; ``info`` is the prepare answer."""

    def __init__(self, worker, ident, info):
        self.worker, self.ident, self.info = worker, ident, info

    def timed(self) -> float:
        return self.worker.ask({"cmd": "run", "id": self.ident})["s"]

    def __call__(self):
        self.timed()


class _Worker:
    def __init__(self, setting: str, threads: int, base_env: dict):
        self.setting = setting
        self.log = tempfile.TemporaryFile(mode="w+")
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen([sys.executable, os.path.join(here, "torch_worker.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1, env=worker_env(base_env, setting))
        self.next_id = 0
        self.hello = self.ask({"cmd": "hello", "threads": threads})

    def ask(self, msg: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.log.seek(0)
            tail = self.log.read().strip().splitlines()[-3:]
            raise RuntimeError(f"torch worker ({self.setting}) exited: {' | '.join(tail)}")
        ans = json.loads(line)
        if not ans.get("ok"):
            raise RuntimeError(ans.get("error", "torch worker error"))
        return ans

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self.log.close()


class TorchPeer:
    """The two PyTorch workers (glibc defaults, raised thresholds), started together.

    ``make(what, **params)`` -> {"torch:glibc": RemoteFn, "torch:tuned": RemoteFn}: the same
    callable prepared in each worker, to be timed next to ours."""

    def __init__(self, threads: int, base_env: dict):
        self.workers = {}
        try:
            for setting in SETTINGS:
                self.workers[setting] = _Worker(setting, threads, base_env)
        except Exception:
            self.close()
            raise
        self.version = self.workers["glibc"].hello["torch"]
        self.threads = self.workers["glibc"].hello["threads"]

    def make(self, what: str, **params) -> dict:
        out = {}
        for setting, w in self.workers.items():
            w.next_id += 1
            info = w.ask({"cmd": "prepare", "id": w.next_id, "what": what, **params})
            out[f"torch:{setting}"] = RemoteFn(w, w.next_id, info)
        return out

    def reset(self):
        for w in self.workers.values():
            w.ask({"cmd": "reset"})

    def close(self):
        for w in self.workers.values():
            w.close()
        self.workers = {}


# ============================================================== worker side
def _kernel(op, layer, n, minmax_only):
    """The op in PyTorch on random inputs (SAME padding via F.pad), as a callable."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    import torch_ref as tr

    rng = np.random.default_rng(2)
    t = lambda shape: torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
    if minmax_only:
        shp = (n,) + tuple(layer["out_shape"])
        x, gy = t(shp), t(shp)
        return (lambda: tr.minmax(x)) if op == "minmax" else (lambda: tr.minmax_grad(x, gy))
    if layer["kind"] == "conv":
        c, h, w = layer["in_shape"]
        o, oh, ow = layer["out_shape"]
        k, s, pads = layer["k"], layer["s"], tuple(layer["pads"])
        x, wt, bias, gy = t((n, c, h, w)), t((o, c, k, k)), t((o,)), t((n, o, oh, ow))
        return {
            "conv2d": lambda: tr.conv2d_same(x, wt, bias, s, pads),
            "conv2d_grad_input": lambda: tr.conv2d_grad_input(gy, wt, (n, c, h, w), s, pads),
            "conv2d_grad_weight": lambda: tr.conv2d_grad_weight(x, gy, (o, c, k, k), s, pads),
        }[op]
    (i,), (o,) = layer["in_shape"], layer["out_shape"]
    x, wt, bias, gy = t((n, i)), t((o, i)), t((o,)), t((n, o))
    return {
        "dense": lambda: F.linear(x, wt, bias),
        "dense_grad_input": lambda: gy @ wt,
        "dense_grad_weight": lambda: gy.t() @ x,
    }[op]


def _model(p):
    import torch

    import torch_ref as tr
    from shapes import NUM_CLASSES

    return tr.TorchGloroNet(tuple(p["shape"]), NUM_CLASSES, p["specs"], activation=p["activation"],
                            eps=p["eps"], seed=0, dtype=torch.float32)


def _prepare(p, models):
    """(callable, extra answer fields) for a prepare command."""
    import torch

    import torch_ref as tr
    from shapes import synthetic

    if p["what"] == "kernel":
        return _kernel(p["op"], p["layer"], p["n"], p["minmax_only"]), {}
    if p["what"] == "step":
        x, y = synthetic(p["shape"], p["n"])
        m = _model(p)
        return tr.train_step_fn(m, tr.make_optimizer(m), torch.from_numpy(x), torch.from_numpy(y),
                                p["kind"], p["iters"]), {}
    if p["what"] == "infer":
        extra = {}
        key = p["model_key"]
        if key not in models:  # one frozen model serves plain and certify
            models[key] = _model(p)
            t0 = time.perf_counter()
            models[key].freeze_lipschitz(100)
            extra["freeze_s"] = time.perf_counter() - t0
        m = models[key]
        x = torch.from_numpy(synthetic(p["shape"], p["n"], seed=5)[0])
        return ((lambda: m.predict(x)) if p["kind"] == "plain" else (lambda: m.certify(x))), extra
    raise ValueError(f"unknown prepare {p['what']!r}")


def serve() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    fns, models = {}, {}
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "quit":
            break
        try:
            if cmd == "hello":
                import torch

                torch.set_num_threads(int(msg["threads"]))
                ans = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
            elif cmd == "prepare":
                fns[msg["id"]], ans = _prepare(msg, models)
                gc.collect()
            elif cmd == "run":
                fn = fns[msg["id"]]
                t0 = time.perf_counter()
                fn()
                ans = {"s": time.perf_counter() - t0}
            elif cmd == "reset":
                fns.clear()
                models.clear()
                gc.collect()
                ans = {}
            else:
                raise ValueError(f"unknown command {cmd!r}")
            ans["ok"] = True
        except Exception as exc:
            first_line = (str(exc).splitlines() or [""])[0][:200]
            ans = {"ok": False, "error": f"{type(exc).__name__}: {first_line}"}
        proto.write(json.dumps(ans) + "\n")


if __name__ == "__main__":
    serve()

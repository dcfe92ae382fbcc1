"""The timed workloads: kernels, training steps, inference, scaling, BLAS threads.

Each ``bench_*(b)`` adds records to the run ``b`` (records.Bench). Ours runs in this
process; PyTorch's callables live in the workers (torch_worker.TorchPeer) and are timed in
the same interleaved rounds, once per malloc setting; ``merge_torch`` keeps the faster
setting as the ``torch`` record ("PyTorch at its best") and both medians in it.
"""
from __future__ import annotations

import math
import statistics
import time

import numpy as np

import shapes
from records import record
from shapes import MODELS, NUM_CLASSES, all_layers, arch_specs, is_last, step_flops, synthetic
from timing import call_time, interleaved, reps_for, sgemm_gflops, time_group, warm
from torch_worker import LABELS


# ============================================================== our models
class Ours:
    """The engine's GloroNet and Adam with the paper's settings."""

    def __init__(self, arch, activation):
        self.arch, self.activation = arch, activation

    def build(self, seed=0):
        from gloro_core.model import GloroNet

        shape, _, eps = MODELS[self.arch]
        return GloroNet(shape, NUM_CLASSES, arch_specs(self.arch), activation=self.activation,
                        init="glorot", eps=eps, variant="margin", seed=seed, dtype="float32")

    @staticmethod
    def optimizer(model):
        from nn.optim import Adam

        return Adam(model.parameters(), lr=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-7)

    @staticmethod
    def step_fn(model, opt, x, y, kind, iters):
        def step():
            opt.zero_grad()
            loss = model.loss(x, y, power_iters=iters) if kind == "gloro" else model.standard_loss(x, y)
            value = float(np.asarray(loss.data))  # the training loop reads it every step too
            loss.backward()
            opt.step()
            return value

        return step


def _torch_model_params(b, arch):
    shape, _, eps = MODELS[arch]
    return dict(arch=arch, shape=list(shape), specs=arch_specs(arch), eps=eps, activation=b.args.activation)


# ============================================================== PyTorch's two settings
def merge_torch(times: dict, first: dict, compile_s: dict):
    """Replace the sides ``torch:glibc`` / ``torch:tuned`` by one ``torch`` side: the setting
    with the smaller median. Returns (times, first, compile_s, extra fields of the torch
    record: malloc (which setting), torch_glibc_ms and torch_tuned_ms (both medians))."""
    sides = {k.split(":", 1)[1]: v for k, v in times.items() if k.startswith("torch:")}
    if not sides:
        return times, first, compile_s, {}
    meds = {s: statistics.median(v) for s, v in sides.items()}
    best = min(meds, key=meds.get)
    out_t = {k: v for k, v in times.items() if not k.startswith("torch:")}
    out_f = {k: v for k, v in first.items() if not k.startswith("torch:")}
    out_c = {k: v for k, v in compile_s.items() if not k.startswith("torch:")}
    out_t["torch"], out_f["torch"] = sides[best], first[f"torch:{best}"]
    out_c["torch"] = compile_s.get(f"torch:{best}")
    extra = {"malloc": LABELS[best]}
    for s, m in meds.items():
        extra[f"torch_{s}_ms"] = m * 1e3
    return out_t, out_f, out_c, extra


def add_pair(b, name, workload, shape_txt, n, times, first, compile_s, flops=None, **extra):
    """Records of one name, one per side (ours, torch); ours gets ``ours_over_torch`` (to
    PyTorch at its best) and ``ours_over_torch_glibc``. With ``flops`` every record gets
    gflops and frac_floor (its rate over the run's headline sgemm rate)."""
    times, first, compile_s, torch_extra = merge_torch(times, first, compile_s)
    meds = {k: statistics.median(v) for k, v in times.items()}
    rate = b.meta.get("sgemm_gflops")
    recs = {}
    for k, ts in times.items():
        rec = record(name, workload, k, shape_txt, n, ts, compile_s=compile_s.get(k),
                     first_call_ms=first[k] * 1e3, **extra)
        if flops:
            rec["step_gflop"] = flops / 1e9
            rec["gflops"] = flops / meds[k] / 1e9
            if rate:
                rec["frac_floor"] = rec["gflops"] / rate
        if k == "torch":
            rec.update(torch_extra)
        elif "torch" in meds:
            rec["ours_over_torch"] = meds[k] / meds["torch"]
            if "torch_glibc_ms" in torch_extra:
                rec["ours_over_torch_glibc"] = meds[k] * 1e3 / torch_extra["torch_glibc_ms"]
        recs[k] = b.add(rec)
    return recs


def _reset_torch(b):
    if b.torch is not None:
        b.torch.reset()


# ============================================================== workload 1: kernels
def _kernel_cases(layer: dict, n: int, rng, minmax_only=False):
    """(op, shape text, flops, gemm (m,k,n) or None, bytes moved, make(backend, xp) -> callable) per op."""
    from kernels import api

    cases = []
    if minmax_only:
        shp = (n,) + tuple(layer["out_shape"])
        x = rng.standard_normal(shp, dtype=np.float32)
        gy = rng.standard_normal(shp, dtype=np.float32)
        txt = "x".join(map(str, shp))
        cases.append(("minmax", txt, None, None, 2 * x.nbytes,
                      lambda be, xp: (lambda a=xp(x): api.minmax(a, backend=be))))
        cases.append(("minmax_grad", txt, None, None, 3 * x.nbytes,
                      lambda be, xp: (lambda a=xp(x), g=xp(gy): api.minmax_grad(a, g, backend=be))))
        return cases
    if layer["kind"] == "conv":
        c, h, w = layer["in_shape"]
        o, oh, ow = layer["out_shape"]
        k, s = layer["k"], layer["s"]
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        wt = (rng.standard_normal((o, c, k, k), dtype=np.float32) / math.sqrt(c * k * k)).astype(np.float32)
        bias = rng.standard_normal(o, dtype=np.float32)
        gy = rng.standard_normal((n, o, oh, ow), dtype=np.float32)
        p = n * oh * ow
        flops = 2.0 * p * o * c * k * k
        txt = f"{n}x{c}x{h}x{w} k{k}s{s}->{o}x{oh}x{ow}"
        cases.append(("conv2d", txt, flops, (p, c * k * k, o), None,
                      lambda be, xp: (lambda a=xp(x), ww=xp(wt), bb=xp(bias):
                                      api.conv2d(a, ww, bb, s, "same", backend=be))))
        cases.append(("conv2d_grad_input", txt, flops, (p, o, c * k * k), None,
                      lambda be, xp: (lambda g=xp(gy), ww=xp(wt):
                                      api.conv2d_grad_input(g, ww, (n, c, h, w), s, "same", backend=be))))
        cases.append(("conv2d_grad_weight", txt, flops, (o, p, c * k * k), None,
                      lambda be, xp: (lambda a=xp(x), g=xp(gy):
                                      api.conv2d_grad_weight(a, g, (k, k), s, "same", backend=be))))
    else:
        (i,), (o,) = layer["in_shape"], layer["out_shape"]
        x = rng.standard_normal((n, i), dtype=np.float32)
        wt = (rng.standard_normal((o, i), dtype=np.float32) / math.sqrt(i)).astype(np.float32)
        bias = rng.standard_normal(o, dtype=np.float32)
        gy = rng.standard_normal((n, o), dtype=np.float32)
        flops = 2.0 * n * i * o
        txt = f"{n}x{i}->{o}"
        cases.append(("dense", txt, flops, (n, i, o), None,
                      lambda be, xp: (lambda a=xp(x), ww=xp(wt), bb=xp(bias): api.dense(a, ww, bb, backend=be))))
        cases.append(("dense_grad_input", txt, flops, (n, o, i), None,
                      lambda be, xp: (lambda g=xp(gy), ww=xp(wt): api.dense_grad_input(g, ww, backend=be))))
        cases.append(("dense_grad_weight", txt, flops, (o, n, i), None,
                      lambda be, xp: (lambda a=xp(x), g=xp(gy): api.dense_grad_weight(a, g, backend=be))))
    return cases


def _xp_for(backend):
    """(array converter, synchronising wrapper) for a backend's device."""
    from kernels import registry

    if registry.device_of(backend) == "gpu":
        import cupy

        def sync(fn):
            def run():
                fn()
                cupy.cuda.Stream.null.synchronize()

            return run

        return cupy.asarray, sync
    return (lambda a: a), (lambda fn: fn)


def _ops_of(layer, minmax_only):
    if minmax_only:
        return ("minmax", "minmax_grad")
    if layer["kind"] == "conv":
        return ("conv2d", "conv2d_grad_input", "conv2d_grad_weight")
    return ("dense", "dense_grad_input", "dense_grad_weight")


def bench_kernels(b) -> None:
    from kernels import registry

    a = b.args
    avail = registry.availability()
    ours = [k for k, why in avail.items() if why is None]
    for k, why in avail.items():
        if why is not None:
            b.note(f"backend {k} unavailable: {why.splitlines()[0][:120]}")
    if a.backend:
        keep = set(a.backend)
        ours = [k for k in ours if k in keep]
        if not ours:
            b.note(f"kernels: none of --backend {sorted(keep)} is available")
            return
    layers = all_layers()
    if a.full or a.only:  # --only selects from every shape
        conv_dense = list(layers)
        mm = [lab for lab in layers if not is_last(lab)]  # activations follow all but the last
    elif a.quick:
        conv_dense, mm = shapes.QUICK_LAYERS, shapes.QUICK_MINMAX
    else:
        conv_dense, mm = shapes.DEFAULT_LAYERS, shapes.DEFAULT_MINMAX
    jobs = [(lab, False) for lab in conv_dense] + [(lab, True) for lab in mm]
    if not any(b.wanted(f"kernel/{op}/{lab}") for lab, mmo in jobs for op in _ops_of(layers[lab], mmo)):
        return
    _compile_kernels(b, ours)
    batch = shapes.BATCH
    for lab, mmo in jobs:
        layer = layers[lab]
        for op, txt, flops, gemm, nbytes, make in _kernel_cases(layer, batch, np.random.default_rng(2), mmo):
            name = f"kernel/{op}/{lab}"
            if not b.wanted(name):
                continue
            b.log(f"  {name}")
            fns = {}
            for be in ours:
                if be == "reference":
                    continue
                xp, sync = _xp_for(be)
                try:
                    fns[be] = sync(make(be, xp))
                except NotImplementedError as exc:
                    b.note(f"{be}: {exc}")
            if b.torch is not None:
                fns.update(b.torch.make("kernel", op=op, layer=layer, n=batch, minmax_only=mmo))
            _time_kernel(b, name, txt, flops, gemm, nbytes, fns)
            _reset_torch(b)
            if "reference" in ours:
                _bench_reference(b, name, layer, op, a.ref_batch, mmo, flops)


def _compile_kernels(b, ours):
    """Each backend x op once on tiny inputs (Numba compiles here), outside every median."""
    rng = np.random.default_rng(1)
    tiny = dict(label="tiny", kind="conv", in_shape=(2, 6, 6), out_shape=(4, 3, 3), k=3, s=2, pads=(0, 1, 0, 1))
    tiny_d = dict(label="tiny", kind="dense", in_shape=(6,), out_shape=(4,))
    for be in ours:
        xp, sync = _xp_for(be)
        t0 = time.perf_counter()
        per_op = {}
        try:
            for lay, mmo in ((tiny, False), (tiny_d, False), (tiny, True)):
                for op, *_, make in _kernel_cases(lay, 2, rng, mmo):
                    try:
                        per_op[op] = call_time(sync(make(be, xp)))
                    except NotImplementedError:
                        per_op[op] = None
        except Exception as exc:
            b.note(f"kernel warm-up on {be} failed: {type(exc).__name__}: {exc}")
        b.add(record(f"kernel/compile/{be}", "compile", be, "tiny inputs, every op", 2,
                     compile_s=time.perf_counter() - t0, per_op_first_call_s=per_op,
                     note="first calls: Numba compile or cache load" if be.startswith("numba") else "first calls"))


def _time_kernel(b, name, txt, flops, gemm, nbytes, fns):
    a = b.args
    first, ests = {}, {}
    for k in list(fns):
        try:
            first[k], ests[k] = warm(fns[k], 1)
        except NotImplementedError as exc:
            b.note(f"{k}: {exc}")
            del fns[k]
        except Exception as exc:
            b.note(f"{name} on {k} failed: {type(exc).__name__}: {exc}")
            del fns[k]
    if not fns:
        return
    est = sum(ests.values())
    reps = reps_for(est, a.kernel_budget, a.min_reps if est < 1.0 else 2, 30)
    times, first, _, torch_extra = merge_torch(interleaved(fns, reps), first, {})
    med = {k: statistics.median(v) for k, v in times.items()}
    sg = sgemm_gflops(b, *gemm) if gemm else None
    for k, ts in times.items():
        gf = flops / med[k] / 1e9 if flops else None
        rec = record(name, "kernels", k, txt, shapes.BATCH, ts, gflops=gf,
                     gbps=(nbytes / med[k] / 1e9 if nbytes else None),
                     sgemm_gflops=sg, frac_sgemm=(gf / sg if gf and sg else None),
                     first_call_ms=first[k] * 1e3)
        if "numpy" in med and k != "numpy":
            rec["speedup_vs_numpy"] = med["numpy"] / med[k]
        if k == "torch":
            rec.update(torch_extra)
        elif "torch" in med:
            rec["ours_over_torch"] = med[k] / med["torch"]
        b.add(rec)
    b.kernel_medians[name] = med


def _bench_reference(b, name, layer, op, n, mmo, flops):
    """The oracle is too slow for the full batch: time it at batch ``n`` and scale the time
    linearly to the bench batch (its per-call overhead is scaled too: this errs on the slow side)."""
    batch = shapes.BATCH
    n = min(n, batch)
    case = [c for c in _kernel_cases(layer, n, np.random.default_rng(3), mmo) if c[0] == op][0]
    fn = case[-1]("reference", lambda x: x)
    try:
        t = call_time(fn)
        ts = [call_time(fn) for _ in range(1 if t > 0.05 else 3)]
    except Exception as exc:
        b.note(f"{name} on reference failed: {type(exc).__name__}: {exc}")
        return
    scale = batch / n
    scaled = [v * scale for v in ts]
    est = statistics.median(scaled)
    txt = [c for c in _kernel_cases(layer, batch, np.random.default_rng(3), mmo) if c[0] == op][0][1]
    rec = record(name, "kernels", "reference", txt, batch, scaled,
                 gflops=(flops / est / 1e9 if flops else None), measured_batch=n,
                 measured_ms=statistics.median(ts) * 1e3,
                 note=(f"est.: timed at N={n}, x{scale:g}" if scale != 1 else None))
    med = b.kernel_medians.get(name, {})
    if "numpy" in med:
        rec["speedup_vs_numpy"] = med["numpy"] / est
    b.add(rec)


# ============================================================== workloads 2-3: training steps
def _step_callables(b, arch, kind, n, iters):
    """side -> one-step callable: ours, and PyTorch's in each worker."""
    shape = MODELS[arch][0]
    x, y = synthetic(shape, n)
    fns = {}
    try:
        m = Ours(arch, b.args.activation).build()
        fns["ours"] = Ours.step_fn(m, Ours.optimizer(m), x, y, kind, iters)
    except Exception as exc:
        b.note(f"step/{kind}/{arch}: ours failed to build: {type(exc).__name__}: {exc}")
    if b.torch is not None:
        fns.update(b.torch.make("step", kind=kind, n=n, iters=iters, **_torch_model_params(b, arch)))
    return fns


def bench_steps(b) -> None:
    a = b.args
    batch = shapes.BATCH
    archs = ["2C2F"] if a.quick and not a.only else list(MODELS)
    for arch in archs:
        shape, iters, _ = MODELS[arch]
        shp = "x".join(map(str, shape))
        kinds = [k for k in ("gloro", "standard") if b.wanted(f"step/{k}/{arch}") or b.wanted(f"overhead/{arch}")]
        if not kinds:
            continue
        b.log(f"  step/{'+'.join(kinds)}/{arch} (interleaved)")
        groups = {f"step/{k}/{arch}": _step_callables(b, arch, k, batch, iters) for k in kinds}
        timed = time_group(b, f"step/{arch}", groups)
        res = {}
        for kind in kinds:
            name = f"step/{kind}/{arch}"
            if name not in timed:
                continue
            p = iters if kind == "gloro" else 0
            if kind == "gloro" and "ours" in timed[name][0]:
                b.warm_steps[arch] = groups[name]["ours"]  # reused by the memory workload
            txt = f"{batch}x{shp}" + (f" p={iters}" if kind == "gloro" else "")
            res[kind] = add_pair(b, name, "step", txt, batch, *timed[name],
                                 flops=step_flops(arch, batch, kind, p), power_iters=p)
        _reset_torch(b)
        if "gloro" in res and "standard" in res and b.wanted(f"overhead/{arch}"):
            for k in res["gloro"]:
                if k in res["standard"]:
                    r = res["gloro"][k]["median_ms"] / res["standard"][k]["median_ms"]
                    b.add(record(f"overhead/{arch}", "overhead", k, f"{batch}x{shp}", batch,
                                 gloro_over_standard=r, note=f"gloro/standard step = {r:.2f}x"))


# ============================================================== workload 4: inference
def bench_inference(b) -> None:
    a = b.args
    n = a.infer_batch
    # freezing K with provable bounds is slow on the larger models: those only with --full
    archs = list(MODELS) if a.full or a.only else ["2C2F"]
    for arch in archs:
        if not any(b.wanted(f"infer/{k}/{arch}") for k in ("plain", "certify")):
            continue
        b.log(f"  infer/{arch}")
        shape = MODELS[arch][0]
        x, _ = synthetic(shape, n, seed=5)
        fns = {"plain": {}, "certify": {}}
        try:
            m = Ours(arch, a.activation).build()
            # freeze K before timing (one-off, not in the medians): power method to the
            # tolerance, then the provable float64 bounds that certify() uses
            tol, mx = a.freeze_tol, a.freeze_max_iter
            kw = {} if mx is None else {"max_iter": mx}
            t_freeze = call_time(lambda: m.update_lipschitz(tol=tol, **kw))
            if b.wanted(f"infer/freezeK/{arch}"):
                b.add(record(f"infer/freezeK/{arch}", "inference", "ours", "once per model", 1,
                             [t_freeze], note=f"update_lipschitz(): power method (tol {tol:g}"
                             f"{'' if mx is None else f', <= {mx} it.'}) + provable bounds (one-off)"))
            fns["plain"]["ours"] = lambda: m.logits(x)
            # predictions and radii, as a user certifying a test set runs it (the tight
            # per-coordinate rounding pass only where the decision needs it)
            fns["certify"]["ours"] = lambda: m.certify(x, tight_radius=False)
        except Exception as exc:
            b.note(f"infer/{arch}: ours failed: {type(exc).__name__}: {exc}")
        if b.torch is not None:
            params = _torch_model_params(b, arch)
            for kind in ("plain", "certify"):
                fns[kind].update(b.torch.make("infer", kind=kind, n=n, model_key=arch, **params))
            freezes = [f.info["freeze_s"] for k, f in fns["plain"].items()
                       if k.startswith("torch:") and "freeze_s" in f.info]
            t_freeze = min(freezes) if freezes else None
            if b.wanted(f"infer/freezeK/{arch}") and t_freeze is not None:
                b.add(record(f"infer/freezeK/{arch}", "inference", "torch", "once per model", 1,
                             [t_freeze], note="100 power iterations (no provable bound); the faster malloc setting"))
        groups = {f"infer/{k}/{arch}": fns[k] for k in ("plain", "certify")
                  if fns[k] and b.wanted(f"infer/{k}/{arch}")}
        timed = time_group(b, f"infer/{arch}", groups, None, (a.min_infer_reps, a.infer_reps))
        _reset_torch(b)
        recs = {}
        for kind in ("plain", "certify"):
            name = f"infer/{kind}/{arch}"
            if name in timed:
                recs[kind] = add_pair(b, name, "inference", f"{n}x" + "x".join(map(str, shape)), n,
                                      *timed[name])
        if "plain" in recs and "certify" in recs:
            for k, r in recs["certify"].items():
                if k in recs["plain"]:
                    ratio = r["median_ms"] / recs["plain"][k]["median_ms"]
                    r["certify_over_plain"] = ratio
                    r["note"] = f"certify/plain = {ratio:.2f}x" + (
                        " (incl. rounding-error bound and radii)" if k == "ours" else "")


# ============================================================== workload 5: scaling
def bench_scaling(b) -> None:
    a = b.args
    arch = "2C2F"
    shape, iters0, _ = MODELS[arch]
    batch = shapes.BATCH
    if a.full:
        batches, iters_list = [32, 64, 128, 256, 512, 1024], [0, 1, 2, 5, 10, 20]
    elif a.quick:
        batches, iters_list = [32, 128], [0, 5]
    else:
        batches, iters_list = [32, 256, 1024], [0, 10, 20]
    shp = "x".join(map(str, shape))
    names = [f"scale/batch/{arch}/b{n}" for n in batches if b.wanted(f"scale/batch/{arch}/b{n}")]
    if names:
        b.log(f"  scale/batch/{arch} (interleaved)")
        groups = {nm: _step_callables(b, arch, "gloro", int(nm.rsplit("b", 1)[1]), iters0) for nm in names}
        for nm, res in time_group(b, f"scale/batch/{arch}", groups).items():
            n = int(nm.rsplit("b", 1)[1])
            recs = add_pair(b, nm, "scaling", f"{n}x{shp} p={iters0}", n, *res,
                            flops=step_flops(arch, n, "gloro", iters0))
            for r in recs.values():
                r["per_instance_us"] = r["median_ms"] * 1e3 / n
                r["note"] = f"{r['per_instance_us']:.0f} us/instance"
        _reset_torch(b)
    by_p = {}
    names = [f"scale/iters/{arch}/p{p}" for p in iters_list if b.wanted(f"scale/iters/{arch}/p{p}")]
    if names:
        b.log(f"  scale/iters/{arch} (interleaved)")
        groups = {nm: _step_callables(b, arch, "gloro", batch, int(nm.rsplit("p", 1)[1])) for nm in names}
        for nm, res in time_group(b, f"scale/iters/{arch}", groups).items():
            p = int(nm.rsplit("p", 1)[1])
            by_p[p] = add_pair(b, nm, "scaling", f"{batch}x{shp} p={p}", batch, *res,
                               flops=step_flops(arch, batch, "gloro", p), power_iters=p)
        _reset_torch(b)
    # cost of one power iteration (all layers, batch-1 iterates): slope from fewest to most
    if len(by_p) >= 2:
        lo, hi = min(by_p), max(by_p)
        for k, r in by_p[hi].items():
            if k in by_p[lo]:
                per = (r["median_ms"] - by_p[lo][k]["median_ms"]) / (hi - lo)
                r["ms_per_power_iter"] = per
                r["note"] = f"{per:+.2f} ms per power iteration (p={lo}..{hi})"


# ============================================================== workload 5b: BLAS threads
def bench_blas_threads(b) -> None:
    """Our 2C2F GloRo step with BLAS at the run's thread count vs 1 thread, interleaved:
    BLAS threads that spin while Numba's or other processes' threads hold the cores can
    cost more than the parallel GEMMs gain."""
    from kernels import threads as kthreads

    arch = "2C2F"
    nb = kthreads.blas_threads()
    counts = sorted({nb, 1}, reverse=True)
    names = {n: f"threads/blas{n}/{arch}" for n in counts}
    if len(counts) < 2 or not any(b.wanted(nm) for nm in names.values()):
        return
    if not kthreads.has_blas_control():
        b.note("threads: NumPy's BLAS thread count cannot be set here (threadpoolctl): skipped")
        return
    b.log(f"  threads/blas{counts}/{arch} (interleaved)")
    shape, iters, _ = MODELS[arch]
    batch = shapes.BATCH
    x, y = synthetic(shape, batch)
    groups = {}
    for n in counts:
        m = Ours(arch, b.args.activation).build()
        step = Ours.step_fn(m, Ours.optimizer(m), x, y, "gloro", iters)

        def run(n=n, step=step):
            kthreads.set_blas_threads(n)
            return step()

        groups[names[n]] = {"ours": run}
    try:
        timed = time_group(b, "threads", groups)
    finally:
        kthreads.set_blas_threads(nb)
    recs = {}
    for n in counts:
        if names[n] in timed:
            recs[n] = add_pair(b, names[n], "threads", f"{batch}x" + "x".join(map(str, shape)) +
                               f" p={iters}", batch, *timed[names[n]])["ours"]
            recs[n]["blas_threads"] = n
    if len(recs) == 2:
        r = recs[1]["median_ms"] / recs[nb]["median_ms"]
        recs[1]["blas1_over_blasN"] = r
        recs[1]["note"] = f"BLAS 1 thread / {nb} threads = {r:.2f}x (below 1: fewer BLAS threads are faster)"


# ============================================================== workload 5c: data parallel
def bench_mpi_scaling(b) -> None:
    """4C3F GloRo steps per second at K = 1 and K = 2 ranks (``mpiexec -n 2``), one thread
    per rank, global batch = the bench batch, in bench/scale_mpi.py's processes; and the
    bytes each rank all-reduces per step (the parameters'). Skipped with a note without
    the ``mpi`` extra."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    arch = "4C3F"
    names = {k: f"scale/mpi/{arch}/K{k}" for k in (1, 2)}
    if not any(b.wanted(n) for n in names.values()):
        return
    here = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(here) if here.exists() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        mpiexec = None
    if mpiexec is None:
        b.note('scale/mpi skipped: needs mpi4py and mpiexec (pip install -e ".[mpi]")')
        return
    root = Path(__file__).resolve().parent
    env = dict(b.base_env)
    # the worker imports the engine of this checkout, and bench's modules beside it
    env["PYTHONPATH"] = os.pathsep.join([str(root.parent), str(root), env.get("PYTHONPATH", "")])
    steps = {"quick": 3, "default": 5, "full": 10}[b.args.mode]
    shape, iters, _ = MODELS[arch]
    got = {}
    for k in (1, 2):
        cmd = [sys.executable, str(root / "scale_mpi.py"), "--arch", arch,
               "--batch", str(shapes.BATCH), "--steps", str(steps)]
        if k > 1:
            cmd = [mpiexec, "-n", str(k)] + cmd
        b.log(f"  {names[k]}")
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            b.note(f"{names[k]}: the worker failed ({p.returncode}): {p.stderr.strip()[-300:]}")
            return
        got[k] = json.loads(p.stdout.strip().splitlines()[-1])
    shp = f"{shapes.BATCH}x" + "x".join(map(str, shape)) + f" p={iters}"
    for k, r in got.items():
        rec = b.add(record(names[k], "mpi", "ours", shp, shapes.BATCH, steps_per_s=r["steps_per_s"],
                           ranks=k, allreduce_ms=r["allreduce_ms"],
                           allreduce_bytes=r["allreduce_bytes"], param_bytes=r["param_bytes"],
                           reps=r["reps"]))
        rec["median_ms"] = r["step_ms"]
        rec["note"] = (f"{r['steps_per_s']:.2f} steps/s, 1 thread/rank"
                       + (f", x{r['steps_per_s'] / got[1]['steps_per_s']:.2f} of K=1; all-reduce "
                          f"{r['allreduce_bytes'] / 1e6:.2f} MB/step in {r['allreduce_ms']:.1f} ms"
                          if k > 1 else ""))

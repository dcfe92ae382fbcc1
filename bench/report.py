"""The printed report: header, one table of every record by workload, the fastest backends."""
from __future__ import annotations

import shapes

# (record field, column title, alignment)
COLS = [
    ("name", "name", "<"), ("backend", "backend", "<"), ("shape", "shape", "<"),
    ("median_ms", "med ms", ">"), ("min_ms", "min ms", ">"), ("gflops", "GFLOP/s", ">"),
    ("frac_sgemm", "%sgemm", ">"), ("frac_floor", "%floor", ">"), ("speedup_vs_numpy", "x numpy", ">"),
    ("ours_over_torch", "/torch", ">"), ("torch_glibc_ms", "glibc ms", ">"),
    ("torch_tuned_ms", "tuned ms", ">"), ("compile_s", "compile s", ">"),
    ("mb_per_instance", "MB/inst", ">"), ("note", "note", "<"),
]


def sections():
    b = shapes.BATCH
    return [
        ("compile", "warm-up (first calls, excluded from medians)"),
        ("kernels", f"1. kernels, batch {b}, float32"),
        ("step", f"2-3. training step, batch {b} (gloro: power iterations + ⊥ + CE on m+1; standard: CE)"),
        ("overhead", "3. GloRo overhead"),
        ("inference", "4. inference (frozen K)"),
        ("scaling", "5. scaling (2C2F GloRo step)"),
        ("threads", "5b. BLAS threads (our 2C2F GloRo step; rest of the run uses the header's counts)"),
        ("mpi", f"5c. data parallel (4C3F GloRo step, global batch {b}, K MPI ranks of 1 thread)"),
        ("memory", "6. peak memory per training instance"),
    ]


def _fmt(key, v):
    if v is None or v == "":
        return ""
    if key in ("frac_sgemm", "frac_floor"):
        return f"{100 * v:.0f}%"
    if key in ("speedup_vs_numpy", "ours_over_torch"):
        return f"{v:.2f}x"
    if key in ("median_ms", "min_ms", "torch_glibc_ms", "torch_tuned_ms"):
        return f"{v:.3f}" if v < 1 else (f"{v:.2f}" if v < 100 else f"{v:.0f}")
    if key == "gflops":
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    if key == "compile_s":
        return f"{v:.2f}"
    if key == "mb_per_instance":
        return f"{v:.3f}"
    return str(v)


def render_table(b) -> str:
    rows = []
    for wl, title in sections():
        recs = [r for r in b.records if r["workload"] == wl]
        if not recs:
            continue
        rows.append(("section", title))
        for r in recs:
            cells = []
            for key, _, _ in COLS:
                v = r.get(key)
                if key == "note" and r.get("mem_method") and "note" not in r:
                    v = r["mem_method"]
                cells.append(_fmt(key, v))
            rows.append(("row", cells))
    # columns no record fills (e.g. the torch ones with --no-torch) are left out
    used = [i for i, (key, _, _) in enumerate(COLS)
            if i < 3 or any(kind == "row" and cells[i] for kind, cells in rows)]
    cols = [COLS[i] for i in used]
    rows = [(kind, [cells[i] for i in used] if kind == "row" else cells) for kind, cells in rows]
    widths = [len(h) for _, h, _ in cols]
    for kind, cells in rows:
        if kind == "row":
            widths = [max(w, len(c)) for w, c in zip(widths, cells)]

    def line(cells):
        return "  ".join((c.ljust(w) if al == "<" else c.rjust(w))
                         for c, w, (_, _, al) in zip(cells, widths, cols)).rstrip()

    out = [line([h for _, h, _ in cols]), "-" * min(sum(widths) + 2 * len(widths), 200)]
    for kind, cells in rows:
        out.append(f"-- {cells}" if kind == "section" else line(cells))
    return "\n".join(out)


def header(b) -> str:
    m = b.meta
    lines = [
        f"GloRo engine benchmark  {m['date']}  mode={m['mode']}",
        f"machine: {m.get('cpu', '?')}, {m['cores']} cores; threads={m['threads']} (Numba, torch), "
        f"{m.get('blas_threads', m['threads'])} (BLAS); "
        f"python {m['python']}, numpy {m['numpy']} ({m.get('blas', '?')})"
        + (f", numba {m['numba']}" if "numba" in m else ""),
        f"backends: {', '.join(m.get('backends', [])) or 'none'}; torch: {m.get('torch', 'not available')}",
    ]
    if "torch" in m:
        lines.append(f"PyTorch runs in two worker processes of its own, alternating with ours over a pipe: "
                     f"glibc's malloc defaults, and GLIBC_TUNABLES={m['torch_tuned']} (raised mmap/trim "
                     f"thresholds); the torch row's med/min are the faster setting's")
    if "sgemm_gflops" in m:
        lines.append(f"sgemm reference: np.matmul float32 {m['sgemm_size']}: {m['sgemm_ms']:.2f} ms = "
                     f"{m['sgemm_gflops']:.1f} GFLOP/s median, {m['sgemm_best_gflops']:.1f} best  "
                     f"(%sgemm = op GFLOP/s / median sgemm GFLOP/s at the op's own GEMM size, same run)")
    if m.get("loadavg_start") is not None:
        lines.append(f"load average (1 min): {m['loadavg_start']:.2f} at start, "
                     f"{m.get('loadavg_end', float('nan')):.2f} at end; activation: {m['activation']}; "
                     f"OMP_WAIT_POLICY={m.get('omp_wait_policy') or '(unset)'}; "
                     f"GLIBC_TUNABLES={m.get('glibc_tunables') or '(unset)'} (this process)")
    lines.append("x numpy = numpy-backend time / this time (higher is faster); /torch = this time / "
                 "PyTorch at its best (the faster malloc setting; interleaved runs; below 1 = we are faster); "
                 "glibc ms / tuned ms = PyTorch's median under each setting")
    lines.append("%floor = the step's FLOPs (forward, grad-input, grad-weight, power iterations; "
                 "bench/shapes.py step_flops) at the headline sgemm rate / this time")
    return "\n".join(lines)


def fastest_cpu_backends(b) -> dict:
    """op -> the CPU backend (not reference) with the smallest summed median over the
    shapes where every compared backend ran."""
    from kernels import registry

    per = {}  # op -> shape -> backend -> median
    for r in b.records:
        if r["workload"] != "kernels" or r["backend"] in ("torch", "reference"):
            continue
        if registry.BACKEND_MODULES.get(r["backend"], ("", "gpu"))[1] != "cpu":
            continue
        op = r["name"].split("/")[1]
        per.setdefault(op, {}).setdefault(r["name"], {})[r["backend"]] = r["median_ms"]
    out = {}
    for op, by_shape in per.items():
        common = set.intersection(*(set(v) for v in by_shape.values()))
        if len(common) >= 2:
            out[op] = min(common, key=lambda be: sum(v[be] for v in by_shape.values()))
    return out

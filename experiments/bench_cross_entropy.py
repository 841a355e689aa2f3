"""Benchmark the linear cross-entropy implementations: forward+backward time and peak memory.

Implementations: ``naive`` (full logits + F.cross_entropy, HF style), ``torch`` (this package's
row-chunked torch path), ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions`` (torch >= 2.13),
Liger-Kernel's fused linear cross-entropy (CUDA, if installed) and ``triton`` (ours, CUDA).

"Ratio" is the kept-token ratio: all N rows are passed and a random ``1 - ratio`` of the labels are
set to -100, as CGGR's selection does. Every implementation gets the same inputs; runs are
interleaved (the order rotates each repeat) and medians reported. Peak memory is the CUDA peak
above the inputs (hidden, weight, labels) during forward+backward; on CPU it is not measured.

GPU (one short command, < 5 min on one H100; both heads, N = 8x2048 and 16x2048, ratios 1.0/0.25):
    python -m experiments.bench_cross_entropy
CPU (smaller shape, torch paths only, < 3 min on 2 cores):
    python -m experiments.bench_cross_entropy --device cpu
Results: experiments/results/bench_cross_entropy_<device>.json and .md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_cggr.kernels import linear_cross_entropy

RESULTS = Path(__file__).resolve().parent / "results"
GPU_SHAPES = [(h, v, n) for h, v in ((576, 49152), (4096, 128256)) for n in (8 * 2048, 16 * 2048)]
CPU_SHAPES = [(576, 49152, 1024)]  # DESIGN.md's CPU measurement shape (N=1020 there)


def _torch_lce(h, w, y):
    return F.linear_cross_entropy(h, w, y, options=torch.nn.LinearCrossEntropyOptions())


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, y: loss(w, h, y)


def implementations(device: torch.device, which: list[str] | None) -> dict:
    impls = {
        "naive": lambda h, w, y: linear_cross_entropy(h, w, y, impl="naive"),
        "torch_chunked": lambda h, w, y: linear_cross_entropy(h, w, y, impl="torch"),
    }
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        impls["F.linear_cross_entropy"] = _torch_lce
    if device.type == "cuda":
        liger = _liger()
        if liger is not None:
            impls["liger_flce"] = liger
        impls["triton (ours)"] = lambda h, w, y: linear_cross_entropy(h, w, y, impl="triton")
    if which:
        unknown = sorted(set(which) - set(impls))
        if unknown:
            raise SystemExit(f"unknown or unavailable impl(s) {unknown}; available here: {sorted(impls)}")
        impls = {k: v for k, v in impls.items() if k in which}
    return impls


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, h, w, y, device):
    """One fwd+bwd: (seconds, peak extra bytes or None)."""
    h.grad = None
    w.grad = None
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loss = fn(h, w, y)
    loss.backward()
    sync(device)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    del loss
    return elapsed, peak


def bench_shape(impls, hdim, vocab, n, ratio, dtype, device, repeats, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(n, hdim, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    w = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).to(device, dtype).requires_grad_(True)
    y = torch.randint(0, vocab, (n,), generator=g)
    if ratio < 1.0:
        y[torch.rand(n, generator=g) >= ratio] = -100
    y = y.to(device)
    names = list(impls)
    times = {k: [] for k in names}
    peaks = {k: [] for k in names}
    errors = {}
    for k in names:  # warm-up (autotuning, allocator)
        try:
            measure(impls[k], h, w, y, device)
        except torch.OutOfMemoryError as e:  # report, do not abort the whole benchmark
            errors[k] = f"OOM: {str(e).splitlines()[0]}"
            torch.cuda.empty_cache()
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            if k in errors:
                continue
            t, p = measure(impls[k], h, w, y, device)
            times[k].append(t)
            if p is not None:
                peaks[k].append(p)
    rows = []
    for k in names:
        rows.append(dict(
            impl=k, H=hdim, V=vocab, N=n, ratio=ratio, dtype=str(dtype).replace("torch.", ""),
            median_s=statistics.median(times[k]) if times[k] else None,
            times_s=times[k],
            peak_extra_mib=(max(peaks[k]) / 2**20) if peaks[k] else None,
            error=errors.get(k),
        ))
    del h, w, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def versions():
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "liger_kernel"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except ImportError:
            out[mod] = None
    return out


def to_markdown(meta, rows):
    lines = [
        f"# Linear cross-entropy fwd+bwd, {meta['device_name']}",
        "",
        f"{meta['date']}, torch {meta['versions']['torch']}, triton {meta['versions']['triton']}, "
        f"liger {meta['versions']['liger_kernel']}; dtype {meta['dtype']}; median of {meta['repeats']} "
        "interleaved repeats after one warm-up; ratio = kept fraction of labels (rest -100).",
    ]
    if meta.get("note"):
        lines += ["", meta["note"]]
    if "loadavg_start" in meta:
        lines += ["", f"Machine load average (1/5/15 min) at start {meta['loadavg_start']}, at end "
                  f"{meta.get('loadavg_end')}; wall {meta.get('total_wall_s')} s, process CPU "
                  f"{meta.get('total_cpu_s')} s. Other jobs sharing the cores inflate absolute times; the "
                  "interleaving keeps the ratios comparable."]
    lines += ["", "| H | V | N | ratio | impl | median fwd+bwd (s) | vs naive | peak extra (MiB) |",
              "|---|---|---|---|---|---|---|---|"]
    naive = {(r["H"], r["V"], r["N"], r["ratio"]): r["median_s"] for r in rows if r["impl"] == "naive"}
    for r in rows:
        base = naive.get((r["H"], r["V"], r["N"], r["ratio"]))
        t = r["median_s"]
        rel = f"{t / base:.2f}x" if (t and base) else "-"
        peak = f"{r['peak_extra_mib']:.0f}" if r["peak_extra_mib"] is not None else "n/a"
        tcell = f"{t:.4f}" if t is not None else (r["error"] or "-")
        lines.append(f"| {r['H']} | {r['V']} | {r['N']} | {r['ratio']} | {r['impl']} | {tcell} | {rel} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cuda | cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated HxVxN, e.g. 576x49152x16384 (default: per device, see above)")
    p.add_argument("--ratios", default="1.0,0.25", help="kept-label ratios")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per impl (default 5 CUDA, 3 CPU)")
    p.add_argument("--impls", default=None, help="comma-separated subset of implementation names")
    p.add_argument("--out", default=None, help="output stem (default experiments/results/bench_cross_entropy_<device>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    ratios = [float(r) for r in args.ratios.split(",")]
    repeats = args.repeats or (5 if device.type == "cuda" else 3)
    impls = implementations(device, args.impls.split(",") if args.impls else None)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    meta = dict(device=device.type, device_name=device_name, dtype=str(dtype).replace("torch.", ""),
                date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                versions=versions(), repeats=repeats, shapes=shapes, ratios=ratios, impls=list(impls))
    if device.type == "cpu":
        meta["note"] = ("CPU run: torch paths only (Triton/Liger need a GPU; the interpreter is for "
                        "correctness, not speed). No GPU was available in the session that produced "
                        "this file, so no GPU numbers exist yet: run `python -m experiments.bench_cross_entropy` "
                        "on a GPU to produce bench_cross_entropy_cuda.{json,md}.")
    rows = []
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if hasattr(os, "getloadavg"):
        meta["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    for hdim, vocab, n in shapes:
        for ratio in ratios:
            res = bench_shape(impls, hdim, vocab, n, ratio, dtype, device, repeats)
            for r in res:
                print(f"H={hdim} V={vocab} N={n} ratio={ratio} {r['impl']:>24}: "
                      f"{r['median_s'] if r['median_s'] is not None else r['error']} s, "
                      f"peak {r['peak_extra_mib']} MiB", flush=True)
            rows += res
    meta["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    meta["total_cpu_s"] = round(time.process_time() - cpu_start, 1)
    if hasattr(os, "getloadavg"):
        meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    stem = Path(args.out) if args.out else RESULTS / f"bench_cross_entropy_{device.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(meta, rows))
    print(to_markdown(meta, rows))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()

"""Benchmark the linear cross-entropy implementations: forward+backward time and peak extra memory.

Implementations: every ``impl`` of :mod:`lightning_cggr.kernels` that runs on the device (``naive``,
``torch``, ``triton``, ``liger``, ``torch_lce``) plus ``liger_fp32acc`` (Liger with an fp32 grad_W
accumulator, as ours uses; CUDA). ``triton`` and ``liger`` are CUDA-only here (the interpreter is for
correctness, not speed).

Variants of ours (``--variants``, e.g. ``triton:512,triton:256:weight,torch:rule:bias``): the same
impl with ``chunk_size`` (rows per chunk; ``rule`` = the default rule) and ``grad_accum`` set, named
``triton[512]``, ``triton[256,weight]``: the memory/speed frontier of the two options users can set
(``loss.chunk_size``, ``loss.grad_accum``); a trailing ``:bias`` adds an LM-head bias (trained, as
Phi's or GPT-J's), named ``torch[rule,bias]``: what a biased head costs. ``gemm_floor`` is our chunk pass at the default chunking
with the row kernel left out (logits GEMM, ``grad_h`` GEMM, ``grad_W`` GEMM into the fp32 accumulator,
per chunk): not a loss, a bound -- no implementation built on these cuBLAS GEMMs can be faster.

``ratio`` is the kept fraction of the rows: exactly ``ceil(ratio * N)`` random rows keep their label.
Below 1 every implementation runs on those rows gathered to a static capacity
(``compact_rows`` + ``index_select``, as the training step does; its cost is included, and the
gradient flows back to the full ``[N, H]`` hidden states); ``naive_masked`` is the HF way for
comparison: all N rows with the dropped labels set to -100.

Timing: one warm-up call per (implementation, ratio) (reported as ``first_call_s``: compilation and,
for ours, the one-off probe of ``addmm(out_dtype)`` included), then ``--repeats`` rounds in which
every (implementation, ratio) of a shape runs once, in an order that rotates each round; medians of
wall time, and of this process's CPU time (less sensitive to other jobs sharing the cores). Memory: on CUDA the
``max_memory_allocated`` above the inputs and the gradients (the previous call's gradients are alive
when the base is read and are replaced by this call's: the difference is the workspace); on CPU the peak bytes of the tensors that torch ops create
during one extra fwd+bwd (a dispatch-mode tracker: the same accounting, not the process RSS).

GPU, both heads at N = 16384, bf16, stops starting new cases after ``--budget-s``:
    python -m experiments.bench_cross_entropy --device cuda --budget-s 300
CPU, fp32, N = 1024 at the SmolLM2 head (about 3 minutes on 2 cores):
    python -m experiments.bench_cross_entropy --device cpu
Results: ``<out>/bench_cross_entropy_<device tag>.{json,md}`` (default out: experiments/results).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from experiments.compose import at_least, device_name, number_list, pick_device
from experiments.results_io import LoadSampler, device_tag, environment, md_table
from lightning_cggr.kernels import compact_rows, linear_cross_entropy, resolve_impl

RESULTS = Path(__file__).resolve().parent / "results"
HEADS = ((576, 49152), (4096, 128256))  # SmolLM2-135M, Llama-3
GPU_SHAPES = [(h, v, 16384) for h, v in HEADS]
CPU_SHAPES = [(576, 49152, 1024)]  # the CPU target shape of issue 11


# ----------------------------------------------------------------------------- implementations
def _ours(impl):
    return lambda h, w, y: linear_cross_entropy(h, w, y, impl=impl)


def _liger_fp32acc(h, w, y):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    total = liger_fused_linear_cross_entropy(h, w, y, reduction="sum", accum_dtype=torch.float32)
    return total / (y != -100).sum().clamp_min(1)


def _variant(impl, chunk, accum, bias=False):
    biases = {}  # one trainable bias per (V, dtype, device), made at the first call

    def fn(h, w, y):
        b = None
        if bias:
            key = (w.shape[0], w.dtype, w.device)
            if key not in biases:
                biases[key] = (0.1 * torch.randn(w.shape[0], device=w.device)).to(w.dtype).requires_grad_(True)
            b = biases[key]
            b.grad = None
        return linear_cross_entropy(h, w, y, impl=impl, chunk_size=chunk, grad_accum=accum, bias=b)

    return fn


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``--shapes``: comma-separated HxVxN (hidden size x vocabulary x rows), each a positive integer."""
    def shape(item: str) -> tuple[int, int, int]:
        dims = tuple(int(d) for d in item.split("x"))
        if len(dims) != 3 or min(dims) < 1:
            raise ValueError(item)
        return dims
    return number_list(shape, "576x49152x16384,64x1000x128", what="HxVxN shapes of positive integers")(text)


def parse_variants(spec: str | None) -> dict:
    """``impl:chunk[:accum][:bias]`` items -> {name: (impl, chunk or None, accum or None, bias)}."""
    out = {}
    for item in filter(None, (spec or "").split(",")):
        parts = item.split(":")
        bias = len(parts) > 2 and parts[-1] == "bias"
        if bias:
            parts = parts[:-1]
        if len(parts) not in (2, 3) or parts[0] not in ("triton", "torch"):
            raise SystemExit(f"--variants item {item!r}: expected triton|torch:<rows|rule>[:fp32|weight][:bias]")
        impl, chunk = parts[0], parts[1]
        accum = parts[2] if len(parts) == 3 else None
        if chunk != "rule" and not (chunk.isdigit() and int(chunk) >= 1):
            raise SystemExit(f"--variants item {item!r}: rows must be an integer >= 1 or 'rule'")
        if accum not in (None, "fp32", "weight"):
            raise SystemExit(f"--variants item {item!r}: accumulation must be fp32 or weight")
        name = f"{impl}[{chunk}{',' + accum if accum else ''}{',bias' if bias else ''}]"
        out[name] = (impl, None if chunk == "rule" else int(chunk), accum, bias)
    return out


def split_names(spec: str) -> list[str]:
    """Comma-separated implementation names, where a variant's name keeps its own commas
    (``torch,triton[256,weight]`` -> ``["torch", "triton[256,weight]"]``)."""
    return re.findall(r"[^,\[]+(?:\[[^\]]*\])?", spec)


def _noop_rows(z, y, scale, loss, lse, opts, *, want_grad, lse_known):
    """gemm_floor's row op: nothing (the logits chunk stands in for its own gradient)."""


def _gemm_floor(device: torch.device):
    from lightning_cggr.kernels.chunked import TORCH, Backend, linear_ce

    prepare = TORCH.prepare
    if device.type == "cuda":
        from lightning_cggr.kernels.cross_entropy import TRITON

        prepare = TRITON.prepare
    backend = Backend("gemm_floor", prepare, _noop_rows, TORCH.stats_op)
    return lambda h, w, y: linear_ce(backend, h, w, y, ignore_index=-100, reduction="sum", label_smoothing=0.0,
                                     lse_square_scale=0.0, softcap=None, chunk_size=None, row_weight=None)


def implementations(device: torch.device, which: list[str] | None, variants: dict | None = None) -> dict:
    """name -> fn(h, w, y) -> loss"""
    out, unavailable = {}, {}
    names = ["naive", "torch", "triton", "liger", "torch_lce"]
    for name in names:
        if device.type == "cpu" and name in ("triton", "liger"):
            unavailable[name] = "Triton on CPU is the interpreter (correctness only)"
            continue
        try:
            resolve_impl(name, device)
        except (RuntimeError, ValueError) as e:
            unavailable[name] = str(e)
            continue
        out[name] = _ours(name)
    if "liger" in out:
        out["liger_fp32acc"] = _liger_fp32acc
    out["naive_masked"] = out["naive"]
    for name, (impl, chunk, accum, bias) in (variants or {}).items():
        if impl in out:
            out[name] = _variant(impl, chunk, accum, bias)
        else:
            unavailable[name] = unavailable.get(impl, f"{impl} not available")
    if variants:
        out["gemm_floor"] = _gemm_floor(device)
    if which:
        unknown = sorted(set(which) - set(out))
        if unknown:
            raise SystemExit(f"unknown or unavailable impl(s) {unknown}; available: {sorted(out)}; "
                             f"unavailable: {unavailable}")
        # the variants (and their GEMM bound) were asked for by name too: --impls narrows the rest
        out = {k: v for k, v in out.items() if k in which or k in (variants or {}) or (variants and k == "gemm_floor")}
    return out, unavailable


# ----------------------------------------------------------------------------- measurement
class TensorBytes(TorchDispatchMode):
    """Peak bytes of the storages torch ops create while active. An output whose storage is an
    input's (a view, an in-place or ``out=`` op) adds nothing; a new storage counts until the tensor
    the op returned is dropped (approximate where a view of it outlives it)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                nbytes = t.untyped_storage().nbytes()
                seen.add(t.untyped_storage().data_ptr())
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, nbytes)
        return out

    def _free(self, nbytes):
        self.live -= nbytes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_call(fn, h, w, y, capacity):
    h.grad = w.grad = None
    if capacity is None:
        loss = fn(h, w, y)
    else:
        c = compact_rows(y, capacity)
        loss = fn(h.index_select(0, c.index), w, c.labels)
    loss.backward()
    return loss


def timed(fn, h, w, y, capacity, device):
    """(wall seconds, process CPU seconds) of one fwd+bwd."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    one_call(fn, h, w, y, capacity)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def peak_extra_bytes(fn, h, w, y, capacity, device):
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_call(fn, h, w, y, capacity)
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    with TensorBytes() as tracker:
        one_call(fn, h, w, y, capacity)
    return tracker.peak


def bench_shape(impls, hdim, vocab, n, ratios, dtype, device, repeats, deadline, seed=0, profile=()):
    """Every (impl, ratio) pair at one shape, interleaved: each round runs every pair once, in an
    order that rotates by one each round, so ratios and impls see the same machine load. Returns the
    rows and, for the impls named in ``profile``, a torch.profiler summary of 3 calls per ratio."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hdim, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    w = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).to(device, dtype).requires_grad_(True)
    runs = {}  # (impl, ratio) -> (fn, labels, capacity or None)
    for ratio in ratios:
        kept = math.ceil(ratio * n)
        y = torch.full((n,), -100, dtype=torch.int64)
        rows = torch.randperm(n, generator=g)[:kept]
        y[rows] = torch.randint(0, vocab, (kept,), generator=g)
        y = y.to(device)
        for name, fn in impls.items():
            if name == "naive_masked" and ratio == 1.0:
                continue  # identical to naive
            runs[(name, ratio)] = (fn, y, None if (ratio == 1.0 or name == "naive_masked") else kept)
    res = {k: dict(times=[], cpu=[], first=None, peak=None, error=None) for k in runs}
    for key, (fn, y, cap) in runs.items():
        try:
            res[key]["first"] = timed(fn, h, w, y, cap, device)[0]
            res[key]["peak"] = peak_extra_bytes(fn, h, w, y, cap, device)
        except torch.OutOfMemoryError as e:
            res[key]["error"] = "OOM: " + str(e).splitlines()[0][:120]
            h.grad = w.grad = None
            torch.cuda.empty_cache()
    keys = [k for k in runs if res[k]["error"] is None]
    for r in range(repeats):
        if r > 0 and time.perf_counter() > deadline:
            break
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            fn, y, cap = runs[key]
            wall, cpu = timed(fn, h, w, y, cap, device)
            res[key]["times"].append(wall)
            res[key]["cpu"].append(cpu)
    profiles = {}
    for (name, ratio), (fn, y, cap) in runs.items():
        if name in profile and res[(name, ratio)]["error"] is None:
            from experiments.profiling import profile_steps

            profiles[f"{name} H={hdim} V={vocab} ratio={ratio}"] = profile_steps(
                lambda i, fn=fn, y=y, cap=cap, h=h, w=w: one_call(fn, h, w, y, cap), 3, device.type == "cuda")
    out = []
    for (name, ratio), r in res.items():
        cap = runs[(name, ratio)][2]
        out.append(dict(
            impl=name, H=hdim, V=vocab, N=n, ratio=ratio, rows_computed=n if cap is None else cap,
            dtype=str(dtype).replace("torch.", ""), median_s=statistics.median(r["times"]) if r["times"] else None,
            times_s=r["times"], process_cpu_s=r["cpu"],
            median_process_cpu_s=statistics.median(r["cpu"]) if r["cpu"] else None, first_call_s=r["first"],
            peak_extra_mib=None if r["peak"] is None else r["peak"] / 2**20, error=r["error"],
        ))
    del h, w, runs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out, profiles


# ----------------------------------------------------------------------------- report
def _find(rows, impl, hdim, vocab, n, ratio):
    for r in rows:
        if (r["impl"], r["H"], r["V"], r["N"], r["ratio"]) == (impl, hdim, vocab, n, ratio) and r["median_s"]:
            return r
    return None


def paired(a, b, key="times_s"):
    """Median over rounds of a's time / b's time in the same round (robust to load that drifts)."""
    pairs = [x / y for x, y in zip(a[key], b[key]) if y > 0]
    return statistics.median(pairs) if pairs else None


def targets(rows, device_type):
    """Issue 11's targets on these numbers (a statement, not an assertion): per-round paired ratios of
    wall time (the target) and of process CPU time (shown for load robustness)."""
    ours = "triton" if device_type == "cuda" else "torch"
    checks = []
    for hdim, vocab, n in sorted({(r["H"], r["V"], r["N"]) for r in rows}):
        shape = f"H={hdim} V={vocab} N={n}"
        full, quarter = _find(rows, ours, hdim, vocab, n, 1.0), _find(rows, ours, hdim, vocab, n, 0.25)
        naive, liger = _find(rows, "naive", hdim, vocab, n, 1.0), _find(rows, "liger", hdim, vocab, n, 1.0)
        if full and quarter:
            limit = 0.35 if device_type == "cuda" else 0.45
            checks.append((shape, f"{ours} ratio 0.25 <= {limit}x its ratio 1.0", paired(quarter, full),
                           paired(quarter, full, "process_cpu_s"), limit))
        if full and naive:
            checks.append((shape, f"{ours} ratio 1.0 no slower than naive", paired(full, naive),
                           paired(full, naive, "process_cpu_s"), 1.0))
        if device_type == "cuda" and liger:
            # the default, then each variant of it (the frontier users can choose on), then the GEMM bound
            names = [ours] + sorted({r["impl"] for r in rows if r["impl"].startswith(ours + "[")}) + ["gemm_floor"]
            for name in names:
                row = _find(rows, name, hdim, vocab, n, 1.0)
                if row is None:
                    continue
                what = "the three GEMMs alone (a bound)" if name == "gemm_floor" else f"{name} ratio 1.0"
                checks.append((shape, f"{what} <= 0.8x Liger's time", paired(row, liger), None, 0.8))
                if name != "gemm_floor" and row["peak_extra_mib"] is not None and liger["peak_extra_mib"] is not None:
                    checks.append((shape, f"{name} peak extra memory <= Liger's",
                                   row["peak_extra_mib"] / liger["peak_extra_mib"], None, 1.0))
    return [dict(shape=c[0], target=c[1], wall_ratio=c[2], cpu_ratio=c[3], limit=c[4],
                 met=c[2] is not None and c[2] <= c[4]) for c in checks]


def to_markdown(meta, rows, checks):
    env = meta["environment"]
    hw = env["hardware"]
    dev = hw.get("gpu") or f"CPU {hw['cpu']} ({hw['torch_threads']} torch threads)"
    lines = [
        f"# Linear cross-entropy fwd+bwd, {dev}",
        "",
        f"{env['date_utc']}, commit {str(env['git_commit'])[:10]}{' (dirty tree)' if env['git_tree_dirty'] else ''}, "
        f"torch {env['versions']['torch']}, triton {env['versions']['triton']}, liger {meta['liger_version']}; "
        f"dtype {meta['dtype']}; median of up to {meta['repeats']} interleaved rounds after one warm-up "
        "(process CPU: median CPU seconds of this process per call, less sensitive to other jobs on the cores). "
        "ratio = kept fraction of rows; below 1 every impl runs on the kept rows gathered by compact_rows "
        "(its cost included) except naive_masked (all rows, dropped labels -100). Peak extra: "
        + ("CUDA max_memory_allocated above the inputs and the gradients (what one call needs on top of "
           "its inputs and outputs: its workspace)." if meta["device"] == "cuda" else
           "bytes of tensors created during one fwd+bwd (dispatch tracker), CPU."),
        "",
        f"Load average (1 min) during the run: {meta['load']}. Wall {meta['wall_s']} s.",
    ]
    if meta.get("unavailable"):
        lines += ["", "Not measured here: " + "; ".join(f"{k}: {v}" for k, v in meta["unavailable"].items())]
    if meta.get("skipped"):
        lines += ["", f"Skipped for the time budget ({meta['budget_s']} s): {meta['skipped']}"]
    table = []
    for r in rows:
        base = _find(rows, "naive", r["H"], r["V"], r["N"], r["ratio"])
        t = r["median_s"]
        rel = paired(r, base) if t and base else None
        table.append([r["H"], r["V"], r["N"], r["ratio"], r["impl"], r["rows_computed"],
                      f"{t:.4f}" if t is not None else (r["error"] or None),
                      f"{rel:.2f}x" if rel is not None else None,
                      f"{r['median_process_cpu_s']:.3f}" if r["median_process_cpu_s"] is not None else None,
                      f"{r['first_call_s']:.3f}" if r["first_call_s"] is not None else None,
                      f"{r['peak_extra_mib']:.0f}" if r["peak_extra_mib"] is not None else None])
    lines += ["", md_table(["H", "V", "N", "ratio", "impl", "rows computed", "median fwd+bwd (s)",
                            "time vs naive (paired; < 1 faster)", "process CPU (s)", "first call (s)", "peak extra (MiB)"], table)]
    if checks:
        def fmt(x):
            return None if x is None else f"{x:.2f}x"

        lines += ["", "Targets of issue 11 on these numbers (median over rounds of the ratio within a round; "
                  "'met' judges the wall-time ratio):", "",
                  md_table(["shape", "target", "wall", "process CPU", "met"],
                           [[c["shape"], c["target"], fmt(c["wall_ratio"]), fmt(c["cpu_ratio"]),
                             "yes" if c["met"] else "NO"] for c in checks])]
    if meta.get("profiles"):
        from experiments import profiling

        lines += ["", "Profiles (torch.profiler, per call: kernel launches, GPU kernel time, top kernels; a GPU "
                  "kernel time well under the wall time means the call waits on the host):", "",
                  profiling.markdown(meta["profiles"], {})]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.bench_cross_entropy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available) | cuda | cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="bfloat16 | float16 | float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma-separated HxVxN, e.g. 576x49152x16384 (default per device)")
    p.add_argument("--ratios", type=number_list(float, "1.0,0.25", lambda r: 0 < r <= 1, "ratios in (0, 1]"),
                   default="1.0,0.25", help="kept-row ratios")
    p.add_argument("--repeats", type=at_least(1), default=None, help="timed rounds (default 7 CUDA, 5 CPU)")
    p.add_argument("--impls", default=None, help="comma-separated subset of the implementation names")
    p.add_argument("--variants", default=None,
                   help="extra settings of ours, impl:rows[:accum][:bias] items, e.g. triton:512,triton:256:weight,"
                        "torch:rule:bias (rows: an integer or 'rule'; accum: fp32 | weight; bias: a trained LM-head "
                        "bias); adds gemm_floor")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new shape or round after this many seconds (default 360 CUDA, 900 CPU)")
    p.add_argument("--profile", default="", help="comma-separated impls to profile (3 calls per shape and ratio)")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--out", default=None, help="output folder (default experiments/results)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(pick_device(args.device))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    ratios = args.ratios
    repeats = args.repeats or (7 if device.type == "cuda" else 5)
    budget = args.budget_s or (360.0 if device.type == "cuda" else 900.0)
    impls, unavailable = implementations(device, split_names(args.impls) if args.impls else None,
                                         parse_variants(args.variants))
    try:
        from importlib.metadata import version

        liger_version = version("liger-kernel")
    except Exception:  # noqa: BLE001 - not installed is a fact worth recording
        liger_version = None

    env = environment(device.type)
    t0 = time.perf_counter()
    deadline = t0 + budget
    rows, skipped, profiles = [], [], {}
    with LoadSampler(every=10.0) as load:
        for hdim, vocab, n in shapes:
            if time.perf_counter() > deadline:
                skipped.append(f"{hdim}x{vocab}x{n}")
                continue
            res, prof = bench_shape(impls, hdim, vocab, n, ratios, dtype, device, repeats, deadline,
                                    profile=tuple(split_names(args.profile)))
            profiles.update(prof)
            for r in res:
                print(f"H={hdim} V={vocab} N={n} ratio={r['ratio']} {r['impl']:>14}: median {r['median_s']} s "
                      f"first {r['first_call_s']} s peak {r['peak_extra_mib']} MiB {r['error'] or ''}", flush=True)
            rows += res
    meta = dict(device=device.type, dtype=str(dtype).replace("torch.", ""), repeats=repeats, budget_s=budget,
                shapes=shapes, ratios=ratios, impls=list(impls), unavailable=unavailable, skipped=skipped,
                liger_version=liger_version, environment=env, load=load.summary(),
                wall_s=round(time.perf_counter() - t0, 1), profiles=profiles)
    checks = targets(rows, device.type)
    md = to_markdown(meta, rows, checks)
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_cross_entropy_{device_tag(device.type)}"
    payload = dict(meta=meta, results=rows, targets=checks)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()

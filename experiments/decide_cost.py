"""What the routing decision costs the host, eager against compiled (``perf.compile_routing``).

The step's routing decision (:func:`lightning_cggr.step.decide`: scores from the router's statistics,
the keep ratio, the selection and its metrics) is O(B x T) element-wise work and a sort. On a GPU
each eager op is a kernel launch, and the compiled step at SmolLM2's shape is bound by the host's
launches (experiments/results/NOTES.md), so what counts is how many ops the host issues per call and
how long it spends issuing them. This calls the very function the step calls, eagerly and as the
step compiles it (:func:`lightning_cggr.perf.compile_function`), on random statistics of the given
shape on ``--device``, interleaved round by round, and reports per call: the median wall time (with
a device synchronize after each call), and from a ``torch.profiler`` pass the host-side operators
issued (top-level aten ops, each one or more launches on a GPU; a compiled graph's generated kernels
are not aten ops) and, on CUDA, the kernels launched, generated ones included::

    python -m experiments.decide_cost --device cpu --batch-size 8 --block-size 2048

Writes ``<out>/decide_cost-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import time

import torch

from experiments.compose import at_least, device_name, pick_device
from experiments.profiling import LAUNCH_CALLS
from experiments.results_io import environment, md_table, publish
from experiments.stats import median

CASES = (  # (unit, scoring, ratio): None = the dynamic ratio
    ("token", "combined", 0.25),
    ("token", "combined", None),
    ("sequence", "combined", 0.25),
)


def inputs(batch: int, block: int, device: str, seed: int = 0):
    """Random [B, T] router statistics (fp32) and a trainable mask with the last position ignored."""
    from lightning_cggr.kernels import TokenStats

    g = torch.Generator().manual_seed(seed)
    stats = TokenStats(*(torch.rand(4, batch, block, generator=g) * 4).to(device))
    trainable = torch.ones(batch, block, dtype=torch.bool)
    trainable[:, -1] = False
    return stats, trainable.to(device)


def call_kwargs(unit: str, scoring: str, ratio):
    from lightning_cggr.config import SelectionConfig

    return dict(unit=unit, scoring=scoring, sel=SelectionConfig(unit=unit), ratio=ratio, bounds=(0.1, 0.5),
                cap=0.5 if ratio is None else ratio, generator=None, prune=None)


def ops_per_call(fn, args, kwargs, calls: int = 5) -> tuple[float, float | None]:
    """(top-level aten ops per call, kernel launches per call or None off CUDA) under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn(*args, **kwargs)
    events = prof.events()
    top = [e for e in events if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    launches = sum(1 for e in events if e.name in LAUNCH_CALLS)
    return len(top) / calls, (launches / calls if torch.cuda.is_available() else None)


def measure(batch: int, block: int, device: str, rounds: int, backend: str) -> list[dict]:
    from lightning_cggr.perf import compile_function
    from lightning_cggr.step import decide

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    stats, trainable = inputs(batch, block, device)
    out = []
    for unit, scoring, ratio in CASES:
        kw = call_kwargs(unit, scoring, ratio)
        args = (stats, None, None, trainable)
        compiled = compile_function(decide, True, backend)
        t0 = time.perf_counter()
        want, got = decide(*args, **kw), compiled(*args, **kw)  # the first compiled call compiles
        sync()
        first_s = time.perf_counter() - t0
        same = bool(torch.equal(want[1], got[1]))
        times = {"eager": [], "compiled": []}
        for _ in range(rounds):
            for name, fn in (("eager", decide), ("compiled", compiled)):
                sync()
                t = time.perf_counter()
                fn(*args, **kw)
                sync()
                times[name].append(time.perf_counter() - t)
        row = dict(unit=unit, scoring=scoring, ratio=ratio, same_selection=same, first_call_s=first_s)
        for name, fn in (("eager", decide), ("compiled", compiled)):
            ops, launches = ops_per_call(fn, args, kw)
            row[name] = dict(median_ms=1e3 * median(times[name]), ops_per_call=ops, launches_per_call=launches)
        out.append(row)
        print(f"{unit} {scoring} ratio={ratio}: eager {row['eager']['median_ms']:.3f} ms, "
              f"compiled {row['compiled']['median_ms']:.3f} ms", flush=True)
    return out


def markdown(p: dict) -> str:
    env = p["environment"]
    rows = []
    for r in p["rows"]:
        e, c = r["eager"], r["compiled"]
        rows.append([r["unit"], r["scoring"], "dynamic" if r["ratio"] is None else r["ratio"],
                     f"{e['median_ms']:.3f}", f"{c['median_ms']:.3f}", f"{e['median_ms'] / c['median_ms']:.2f}x",
                     f"{e['ops_per_call']:.0f}", f"{c['ops_per_call']:.0f}",
                     None if e["launches_per_call"] is None else f"{e['launches_per_call']:.0f}",
                     None if c["launches_per_call"] is None else f"{c['launches_per_call']:.0f}",
                     "yes" if r["same_selection"] else "NO", f"{r['first_call_s']:.1f}"])
    return "\n".join([
        f"# The routing decision per call, eager vs compiled ({env['device_tag']})", "",
        f"{env['date_utc']}, torch {env['versions']['torch']}; step.decide on random statistics of "
        f"{p['batch_size']} x {p['block_size']} tokens, compile backend {p['backend']}; median of {p['rounds']} "
        "interleaved calls each (device synchronized around each call). Ops: top-level aten operators the host "
        "issued per call (eagerly each one or more kernel launches on a GPU; compiled, the ones its graph still "
        "calls, such as a sort: its generated kernels are not aten ops and are not counted); launches: CUDA kernel "
        "launches per call, generated kernels included.", "",
        md_table(["unit", "scoring", "ratio", "eager (ms)", "compiled (ms)", "eager / compiled", "eager ops",
                  "compiled ops", "eager launches", "compiled launches", "same selection", "first compiled call (s)"],
                 rows), ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.decide_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available) | cuda | cpu")
    ap.add_argument("--batch-size", type=at_least(1), default=8)
    ap.add_argument("--block-size", type=at_least(2), default=2048)
    ap.add_argument("--rounds", type=at_least(1), default=50)
    ap.add_argument("--backend", default="inductor", help="perf.compile_backend")
    ap.add_argument("--out", default=None, help="results folder (default experiments/results)")
    ap.add_argument("--name", default="decide_cost")
    args = ap.parse_args(argv)
    args.device = pick_device(args.device)
    rows = measure(args.batch_size, args.block_size, args.device, args.rounds, args.backend)
    payload = dict(experiment=args.name, kind="decide_cost", batch_size=args.batch_size, block_size=args.block_size,
                   rounds=args.rounds, backend=args.backend, rows=rows, environment=environment(args.device))
    return publish(payload, args.name, args.device, markdown, args.out)


if __name__ == "__main__":
    raise SystemExit(main())

"""Throughput and memory at equal batch: every method, interleaved step by step, same data.

    python -m experiments.throughput --preset tiny                    # CPU, ~3 min
    python -m experiments.throughput --preset smollm2 --methods standard_naive,standard_fused,cggr_combined
    python -m experiments.throughput --preset tiny data.batch_size=32  # any Hydra override

Timing: one process builds the model once; every method is the package's training step
(``lightning_cggr.step.CGGRStep``, its own cggr/loss settings) around that same model, one AdamW and
one LR schedule, stepped as ``train()`` steps it (``experiments.bench.Runner``). Step i of every method runs on batch i, the order
of methods rotating each step, so slow drift of machine load hits every method alike. The first
``--warmup`` steps are dropped; the table gives the median of the next ``--steps``. Step = router
+ forward + loss + backward + grad clip + AdamW step, device-synchronized. tokens/s counts input
tokens (B x T), the same for every method whatever it keeps.

Memory: CPU: peak RSS of a fresh process per method (forked from an import-only server) running
warm-up + ``--mem-steps`` steps, and the part above the RSS after model build. CUDA:
``max_memory_allocated`` during that method's steps in the timing process (model and optimizer
state are the same for all).
"""

from __future__ import annotations

import sys

from experiments import bench
from experiments import compose
from experiments import isolate
from experiments import methods as methods_mod
from experiments import results_io as rio
from experiments import stats


def main(argv=None) -> int:
    ap = compose.make_parser("throughput", __doc__)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method (median over these)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    ap.add_argument("--mem-steps", type=int, default=2, help="steps per fresh memory process (CPU); 0: skip")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the base config, e.g. data.batch_size=8")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    device = compose.pick_device(args.device)
    compose.set_threads(args.threads)
    methods = methods_mod.parse_methods(args.methods)
    # Every timed step must route: the cggr warm-up (full-token steps) is for training, not timing.
    base = compose.base_overrides(args.preset, device, ["cggr.warmup_steps=0", *args.overrides])
    resolved = compose.resolve_methods(methods, base, device)
    avail = methods
    compose.check_same_model_and_data(resolved)
    name = args.name or f"throughput-{args.preset}"
    env = rio.environment(device)
    with rio.LoadSampler() as load:
        timing = time_interleaved(resolved, avail, device, args.warmup, args.steps)
        memory = {}
        if not device.startswith("cuda") and args.mem_steps > 0:
            for m in avail:
                print(f"[throughput] memory: {m}", file=sys.stderr, flush=True)
                spec = {"config": resolved[m]["config"], "device": device, "warmup": 1, "steps": args.mem_steps,
                        "threads": args.threads}
                memory[m] = isolate.run_isolated("experiments.isolate:measure_point", spec)
    tokens = timing["tokens_per_step"]
    summary = stats.throughput_summary(timing["step_times_s"], tokens)
    for m in avail:
        if m not in summary:  # failed in the timing run
            summary[m] = {"failed": timing["failed"].get(m, {}).get("error", "no timed steps")}
            continue
        if device.startswith("cuda"):
            summary[m]["peak_bytes"] = timing["cuda_peak_bytes"][m]
            summary[m]["peak_above_build_bytes"] = timing["cuda_peak_bytes"][m] - timing["cuda_base_bytes"]
        elif m in memory and memory[m].get("status") == "ok":
            summary[m]["peak_bytes"] = memory[m]["peak_rss_bytes"]
            summary[m]["peak_above_build_bytes"] = memory[m]["peak_rss_bytes"] - memory[m]["rss_after_build_bytes"]
        summary[m]["loss_impl"] = timing["loss_impl"][m]
    env["load"] = load.summary()
    payload = {
        "experiment": name,
        "kind": "throughput",
        "environment": env,
        "shape": compose.shape_of(resolved[avail[0]]["config"]),
        "settings": {"steps": args.steps, "warmup": args.warmup, "mem_steps": args.mem_steps,
                     "preset": args.preset, "base_overrides": base, "methods": methods},
        "methods": methods_mod.describe(methods, resolved),
        "raw": {"timing": timing, "memory": memory},
        "summary": summary,
    }
    return rio.publish(payload, name, device, markdown, args.out)


def time_interleaved(resolved, avail, device, warmup, steps) -> dict:
    import torch

    first = resolved[avail[0]]["config"]
    _, model, dm = bench.build_model_and_data(first)
    model.to(device).train()
    fingerprint = bench.weights_fingerprint(model)
    total = warmup + steps
    lead = bench.Runner(model, first, device, total_steps=total)  # owns the shared AdamW
    # each method its own LR schedule over the shared optimizer: all are at step i when they run step i
    runners = {m: bench.Runner(model, resolved[m]["config"], device, total, lead.optimizer) for m in avail}
    k = lead.accumulate
    stream = bench.BatchStream(dm.train_dataloader, device)
    batches = [[stream[i * k + j] for j in range(k)] for i in range(total)]
    B, T = batches[0][0]["input_ids"].shape
    times = {m: [] for m in avail}
    cuda = device.startswith("cuda")
    peaks = {m: 0 for m in avail}
    base_bytes = None
    order_log, failed = [], {}
    for i, micro in enumerate(batches):
        live = [m for m in avail if m not in failed]
        r = i % max(len(live), 1)
        order = live[r:] + live[:r]
        order_log.append(order)
        for m in order:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base_bytes = torch.cuda.memory_allocated() if base_bytes is None else base_bytes
            runners[m].global_step = i  # every method at the same step of the same schedule
            res = isolate.guarded(lambda _: runners[m].train_step(micro), {})
            if isinstance(res, dict):  # this method failed (e.g. out of memory): recorded, others go on
                failed[m] = res
                lead.optimizer.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
                print(f"[throughput] {m} FAILED: {res['error']}", file=sys.stderr, flush=True)
                continue
            if cuda:
                peaks[m] = max(peaks[m], torch.cuda.max_memory_allocated())
            if i >= warmup:
                times[m].append(res[0])
        print(f"[throughput] step {i + 1}/{len(batches)} " +
              " ".join(f"{m}={times[m][-1] if times[m] else float('nan'):.3f}s" for m in live),
              file=sys.stderr, flush=True)
    out = {
        "step_times_s": times,
        "tokens_per_step": B * T * k,
        "batch_size": B,
        "block_size": T,
        "accumulate_grad_batches": k,
        "initial_weights_fingerprint": fingerprint,
        "order_per_step": order_log,
        "loss_impl": {m: runners[m].step.loss_impl for m in avail},
        "failed": failed,
    }
    if cuda:
        out["cuda_peak_bytes"] = peaks
        out["cuda_base_bytes"] = base_bytes
    return out


def markdown(p: dict) -> str:
    env, shape, s = p["environment"], p["shape"], p["summary"]
    cuda = env["device"].startswith("cuda")
    mem_label = "peak CUDA alloc (MiB)" if cuda else "peak RSS, fresh process (MiB)"
    header = ["method", "kind", "median step (s)", "tokens/s", "vs standard fused", "vs standard naive",
              mem_label, "above model build (MiB)", "loss impl"]
    rows = []
    for m, meta in p["methods"].items():
        if m not in s:
            continue
        r = s[m]
        if "failed" in r:
            rows.append([meta["label"], meta["kind"], "FAILED: " + r["failed"][:160], *[None] * 6])
            continue
        rows.append([
            meta["label"], meta["kind"], f"{r['median_step_s']:.4f}", f"{r['tokens_per_s']:.0f}",
            rio.fmt_x(r.get("speedup_vs_standard_fused")), rio.fmt_x(r.get("speedup_vs_standard_naive")),
            rio.fmt_mib(r.get("peak_bytes")), rio.fmt_mib(r.get("peak_above_build_bytes")), r.get("loss_impl"),
        ])
    load = env.get("load", {})
    head = (
        f"### {p['experiment']} on {describe_device(env)}\n\n"
        f"{shape['model']} ({shape['model_source']}), batch {shape['batch_size']} x {shape['block_size']} tokens, "
        f"{shape['precision']}, kept ratio {shape['min_tokens_ratio']}, router {shape['router_layers']} layers. "
        f"Median of {p['settings']['steps']} steps after {p['settings']['warmup']} warm-up, methods interleaved "
        f"step by step on the same batches and one shared model. {env['date_utc']}; "
        f"load avg (1 min) median {rio.r2(load.get('median'))}, max {rio.r2(load.get('max'))} on {env['hardware']['cpu_count']} CPUs.\n"
        f"'vs' columns: baseline median step time / method's (> 1 is faster).\n"
    )
    return head + "\n" + rio.md_table(header, rows)


def describe_device(env: dict) -> str:
    hw = env["hardware"]
    if env["device"].startswith("cuda"):
        return f"{hw.get('gpu')} (torch {env['versions']['torch']}, CUDA {hw.get('cuda')})"
    return f"CPU: {hw['cpu']}, {hw['torch_threads']} torch threads (torch {env['versions']['torch']})"




if __name__ == "__main__":
    sys.exit(main())

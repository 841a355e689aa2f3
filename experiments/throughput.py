"""Throughput and memory at equal batch: every method, interleaved step by step, same data.

    python -m experiments.throughput --preset tiny                    # CPU, ~3 min
    python -m experiments.throughput --preset smollm2 --methods standard_naive,standard_fused,cggr_combined
    python -m experiments.throughput --preset tiny data.batch_size=32  # any Hydra override
    python -m experiments.throughput --preset tiny --steps 3 --warmup 1 --mem-steps 0 --profile  # CPU smoke

The GPU measurement (one H200, earlier one H100; SmolLM2-135M's shape, 8 x 2048 tokens, bf16-mixed, compiled blocks)::

    python -m experiments.throughput --preset smollm2_shape --device cuda --profile \
        --methods standard_naive,standard_fused,cggr_combined,random_token,cggr_sequence,random_sequence \
        data.batch_size=8 data.block_size=2048 perf.compile=true

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

Model FLOPs and MFU (``lightning_cggr.flops``): each method's executed matmul FLOPs per step from
the documented formula (router, body, head), the achieved TFLOP/s at its median step time, and MFU
against the card's dense bf16 peak (a table by device name; ``--peak-tflops`` for a card not in it;
none on a CPU). ``--profile``: after timing, ``--profile-steps`` more steps per method under
``torch.profiler``; the per-step summary (top kernels and CPU ops by self time, host-device syncs,
kernel launches; ``experiments.profiling``) goes into the results JSON and a table.

Every method runs with the same efficiency options (``perf.*``, ``optim.fused``,
``model.attn_implementation``: base overrides, checked equal across methods), so ratios compare
routing alone.
"""

from __future__ import annotations

import dataclasses
import sys

from experiments import bench
from experiments import compose
from experiments import isolate
from experiments import methods as methods_mod
from experiments import results_io as rio
from experiments import profiling
from experiments import stats
from lightning_cggr import flops


def main(argv=None) -> int:
    ap = compose.make_parser("throughput", __doc__)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method (median over these)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    ap.add_argument("--mem-steps", type=compose.at_least(0), default=2, help="steps per fresh memory process (CPU); 0: skip")
    ap.add_argument("--profile", action="store_true", help="profile --profile-steps more steps per method (torch.profiler)")
    ap.add_argument("--profile-steps", type=int, default=3, help="steps per method under the profiler (with --profile)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the card's dense bf16 peak for MFU when its name is not in lightning_cggr.flops")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the base config, e.g. data.batch_size=8")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.profile and args.profile_steps < 1:
        ap.error("--profile-steps must be >= 1")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        ap.error(f"--peak-tflops={args.peak_tflops}: must be > 0 (the card's dense bf16 peak, e.g. 989 for an H100)")

    device = compose.pick_device(args.device)
    compose.set_threads(args.threads)
    methods = methods_mod.parse_methods(args.methods)
    # Every timed step must route: the cggr warm-up (full-token steps) is for training, not timing.
    base = compose.base_overrides(args.preset, device, ["cggr.warmup_steps=0", *args.overrides])
    resolved = compose.resolve_methods(methods, base, device, args.reference)
    avail = methods
    compose.check_same_model_and_data(resolved)
    name = args.name or f"throughput-{args.preset}"
    env = rio.environment(device)
    with rio.LoadSampler() as load:
        timing = time_interleaved(resolved, avail, device, args.warmup, args.steps,
                                  profile_steps=args.profile_steps if args.profile else 0)
        memory = {}
        if not device.startswith("cuda") and args.mem_steps > 0:
            for m in avail:
                print(f"[throughput] memory: {m}", file=sys.stderr, flush=True)
                spec = {"config": resolved[m]["config"], "device": device, "warmup": 1, "steps": args.mem_steps,
                        "threads": args.threads}
                memory[m] = isolate.run_isolated("experiments.isolate:measure_point", spec)
    tokens = timing["tokens_per_step"]
    summary = stats.throughput_summary(timing["step_times_s"], tokens)
    gpu_name, peak = flops.device_peak_tflops(device)
    peak = args.peak_tflops or peak
    env["peak_bf16_tflops"] = {"value": peak, "source": "--peak-tflops" if args.peak_tflops else
                               ("lightning_cggr.flops.PEAK_BF16_TFLOPS" if peak else None), "device_name": gpu_name}
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
        f = timing["model_flops_per_step"][m]["total"]
        summary[m]["model_tflop_per_step"] = f / 1e12
        summary[m]["achieved_tflops"] = f / summary[m]["median_step_s"] / 1e12
        summary[m]["mfu"] = flops.mfu(f, summary[m]["median_step_s"], peak)
    env["load"] = load.summary()
    payload = {
        "experiment": name,
        "kind": "throughput",
        "environment": env,
        "shape": {**compose.shape_of(resolved[avail[0]]["config"]), **timing["built_shape"]},
        "settings": {"steps": args.steps, "warmup": args.warmup, "mem_steps": args.mem_steps,
                     "preset": args.preset, "base_overrides": base, "methods": methods},
        "methods": methods_mod.describe(methods, resolved),
        "raw": {"timing": timing, "memory": memory, "profile": timing.pop("profile", {})},
        "summary": summary,
    }
    return rio.publish(payload, name, device, markdown, args.out)


def time_interleaved(resolved, avail, device, warmup, steps, profile_steps: int = 0) -> dict:
    import torch

    first = resolved[avail[0]]["config"]
    _, model, dm = bench.build_model_and_data(first)
    model.to(device).train()
    flop_shape = flops.FlopShape.of(model)
    fingerprint = bench.weights_fingerprint(model)
    built = bench.built_shape(model, first)
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
        print(f"[throughput] step {i + 1}/{len(batches)} " + ("(warm-up, not timed)" if i < warmup else
              " ".join(f"{m}={times[m][-1]:.3f}s" for m in live if times[m])),
              file=sys.stderr, flush=True)
    profiles = {}
    for m in (avail if profile_steps else []):
        if m in failed:
            continue
        print(f"[throughput] profiling {m} ({profile_steps} steps)", file=sys.stderr, flush=True)
        res = isolate.guarded(lambda _: profiling.profile_steps(
            lambda j: runners[m].train_step(batches[j % len(batches)]), profile_steps, cuda), {})
        profiles[m] = res if "error" not in res else {"error": res["error"]}
    model_flops = {}
    for m in avail:
        run = compose.parse_run(resolved[m]["config"])
        per_micro = flops.step_flops(flop_shape, run.cggr, B, T, loss_impl=runners[m].step.loss_impl)
        model_flops[m] = {part: v * k for part, v in per_micro.items()}
    out = {
        "step_times_s": times,
        "tokens_per_step": B * T * k,
        "batch_size": B,
        "block_size": T,
        "accumulate_grad_batches": k,
        "initial_weights_fingerprint": fingerprint,
        "built_shape": built,
        "order_per_step": order_log,
        "loss_impl": {m: runners[m].step.loss_impl for m in avail},
        "failed": failed,
        "flop_shape": dataclasses.asdict(flop_shape),
        "model_flops_per_step": model_flops,
        "profile": profiles,
    }
    if cuda:
        out["cuda_peak_bytes"] = peaks
        out["cuda_base_bytes"] = base_bytes
    return out


def flop_bound(summary: dict, method: str, baseline: str = "standard_fused") -> float | None:
    """The step-rate ratio to ``baseline`` that ``method`` would reach if both steps took time in
    proportion to their model FLOPs (``lightning_cggr.flops``): the baseline's FLOPs / the method's.
    Routing cannot beat it without doing less math than counted; a measured ratio below it is what
    the step loses to anything but the math (launches, host work, memory-bound kernels)."""
    base, r = summary.get(baseline) or {}, summary.get(method) or {}
    if not base.get("model_tflop_per_step") or not r.get("model_tflop_per_step"):
        return None
    return base["model_tflop_per_step"] / r["model_tflop_per_step"]


def markdown(p: dict) -> str:
    env, shape, s = p["environment"], p["shape"], p["summary"]
    cuda = env["device"].startswith("cuda")
    mem_label = "peak CUDA alloc (MiB)" if cuda else "peak RSS, fresh process (MiB)"
    header = ["method", "kind", "median step (s)", "tokens/s", "vs standard fused", "vs standard naive",
              "model TFLOP / step", "FLOP bound vs standard fused", "achieved TFLOP/s", "MFU", mem_label,
              "above model build (MiB)", "loss impl"]
    rows = []
    for m, meta in p["methods"].items():
        if m not in s:
            continue
        r = s[m]
        if "failed" in r:
            rows.append([meta["label"], meta["kind"], "FAILED: " + r["failed"][:160], *[None] * 10])
            continue
        rows.append([
            meta["label"], meta["kind"], f"{r['median_step_s']:.4f}", f"{r['tokens_per_s']:.0f}",
            rio.fmt_x(r.get("speedup_vs_standard_fused")), rio.fmt_x(r.get("speedup_vs_standard_naive")),
            _fmt(r.get("model_tflop_per_step"), 3), rio.fmt_x(flop_bound(s, m)), _fmt(r.get("achieved_tflops"), 2),
            _fmt_pct(r.get("mfu")),
            rio.fmt_mib(r.get("peak_bytes")), rio.fmt_mib(r.get("peak_above_build_bytes")), r.get("loss_impl"),
        ])
    load = env.get("load", {})
    head = (
        f"### {p['experiment']} on {describe_device(env)}\n\n"
        f"{shape['model']} ({shape['model_source']}), batch {shape['batch_size']} x {shape['block_size']} tokens, "
        f"{shape['precision']}, kept ratio {shape['min_tokens_ratio']}, router {shape['router_layers']} layers"
        f"{_efficiency(shape)}. "
        f"Median of {p['settings']['steps']} steps after {p['settings']['warmup']} warm-up, methods interleaved "
        f"step by step on the same batches and one shared model. {env['date_utc']}; "
        f"load avg (1 min) median {rio.r2(load.get('median'))}, max {rio.r2(load.get('max'))} on {env['hardware']['cpu_count']} CPUs.\n"
        f"'vs' columns: baseline median step time / method's (> 1 is faster). FLOP bound: standard fused's "
        f"model FLOPs per step / the method's, the speed-up a step bound by its math alone would show.\n"
    )
    peak = env.get("peak_bf16_tflops") or {}
    head += (f"MFU: executed model FLOPs per step (lightning_cggr.flops: matmuls, causal attention, training = 3 x "
             f"forward) / median step time / {peak['value']} TFLOP/s dense bf16 peak ({peak.get('source')}).\n"
             if peak.get("value") else "MFU: no peak known for this device (a CPU, or a card missing from "
             "lightning_cggr.flops.PEAK_BF16_TFLOPS; pass --peak-tflops).\n")
    table = head + "\n" + rio.md_table(header, rows)
    prof = (p.get("raw") or {}).get("profile") or {}
    if prof:
        labels = {m: meta["label"] for m, meta in p["methods"].items()}
        steps = next((v["steps"] for v in prof.values() if "steps" in v), "?")
        table += (f"\n\nProfile (torch.profiler, {steps} steps per method after timing; per step; "
                  "cudaDeviceSynchronize also counts the harness's 2 per step; full lists in the JSON):\n\n"
                  + profiling.markdown(prof, labels))
    return table


def _efficiency(shape: dict) -> str:
    """The efficiency options every method ran with (absent from results older than them)."""
    if "compile" not in shape:
        return ""
    return (f"; attention {shape.get('attn_implementation')}, compile {shape['compile']}, "
            f"fused AdamW {shape.get('optim_fused')} (every method alike)")


def _fmt(v, digits):
    return None if v is None else f"{v:.{digits}f}"


def _fmt_pct(v):
    return None if v is None else f"{100 * v:.1f}%"


def describe_device(env: dict) -> str:
    hw = env["hardware"]
    if env["device"].startswith("cuda"):
        return f"{hw.get('gpu')} (torch {env['versions']['torch']}, CUDA {hw.get('cuda')})"
    return f"CPU: {hw['cpu']}, {hw['torch_threads']} torch threads (torch {env['versions']['torch']})"




if __name__ == "__main__":
    sys.exit(main())

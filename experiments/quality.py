"""Quality at equal steps AND equal wall-clock: held-out full-token loss for every method.

    python -m experiments.quality --preset tiny                               # CPU, ~8 min
    python -m experiments.quality --preset smollm2 --steps 8 --seeds 0 \\
        --methods standard_fused,cggr_combined,random_token,cggr_sequence,random_sequence

Per seed, every method starts from the same initial weights (one model built after seeding, then
deep-copied per method) and sees the same batches in the same order; methods are interleaved step
by step in one process, so machine-load drift is shared. Each method has its own model copy, AdamW
and the learning-rate schedule ``train()`` uses for ``trainer.max_steps=--steps`` (linear warm-up over
``optim.warmup_steps``, cosine decay to ``optim.min_lr_ratio`` at ``--steps``, then held at that floor
by a method that trains on past ``--steps`` for the equal-time point), all through the package's own
training step (``experiments.bench.Runner``). Evaluation (not timed) runs every
``--eval-every`` steps on the same ``--eval-batches`` held-out batches, on every trainable token,
with the same code for all methods.

- Equal steps: the held-out loss at step ``--steps``.
- Equal wall-clock: the budget W is the fair baseline's (standard, fused loss) summed step time to
  reach ``--steps`` in that seed; methods faster than it keep training until their own summed step
  time passes W (at most ``--max-factor`` x ``--steps`` steps); the loss at W is interpolated
  linearly between the evaluations around it.

Mean and sample standard deviation over ``--seeds`` (the seed sets model init, data order and the
random controls' draws via ``cggr.seed``).
"""

from __future__ import annotations

import math
import sys

from experiments import bench
from experiments import compose
from experiments import isolate
from experiments import methods as methods_mod
from experiments import results_io as rio
from experiments import stats


def main(argv=None) -> int:
    ap = compose.make_parser("quality", __doc__)
    ap.add_argument("--steps", type=int, default=150, help="the equal-steps point")
    ap.add_argument("--eval-every", type=int, default=25, help="held-out evaluation interval (steps)")
    ap.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--max-factor", type=float, default=3.0, help="cap on steps past --steps for the wall-clock point")
    ap.add_argument("--cggr-warmup", type=int, default=None, help="override cggr.warmup_steps (default: the config's)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the base config")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or args.eval_batches < 1:
        ap.error("--steps, --eval-every and --eval-batches must be >= 1")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    device = compose.pick_device(args.device)
    compose.set_threads(args.threads)
    methods = methods_mod.parse_methods(args.methods)
    extra = list(args.overrides)
    if args.cggr_warmup is not None:
        extra.append(f"cggr.warmup_steps={args.cggr_warmup}")
    base = compose.base_overrides(args.preset, device, extra)
    name = args.name or f"quality-{args.preset}"
    env = rio.environment(device)
    resolved_by_seed, runs, budgets, fingerprints, per_step, failures = {}, {}, {}, {}, {}, {}
    with rio.LoadSampler() as load:
        for seed in seeds:
            resolved = compose.resolve_methods(methods, [*base, f"seed={seed}", f"cggr.seed={seed}"], device)
            avail = methods
            compose.check_same_model_and_data(resolved)
            resolved_by_seed[seed] = resolved
            res = train_interleaved(resolved, avail, device, args, seed)
            fingerprints[seed] = res["fingerprint"]
            budgets[seed] = res["budget_s"]
            per_step[seed] = res["step_times_s"]
            failures[seed] = res["failed"]
            for m in avail:
                runs.setdefault(m, {})[seed] = res["curves"][m]
    summary = stats.quality_summary(runs, args.steps, budgets)
    base_ref = summary.get(methods_mod.BASELINE, {})
    for m, row in summary.items():
        for key in ("loss_at_equal_steps", "loss_at_equal_time"):
            ref = (base_ref.get(key) or {}).get("mean")
            row[f"{key}_minus_baseline"] = row[key]["mean"] - ref if ref is not None and row[key]["mean"] is not None else None
        times = [sum(t) / len(t) for t in (per_step[s].get(m, []) for s in seeds) if t]
        row["mean_step_s"] = sum(times) / len(times) if times else None
    env["load"] = load.summary()
    first = resolved_by_seed[seeds[0]]
    payload = {
        "experiment": name,
        "kind": "quality",
        "environment": env,
        "shape": compose.shape_of(first[methods[0]]["config"]),
        "settings": {"steps": args.steps, "eval_every": args.eval_every, "eval_batches": args.eval_batches,
                     "seeds": seeds, "max_factor": args.max_factor, "preset": args.preset,
                     "base_overrides": base, "methods": methods, "lr_schedule": "train()'s: linear warm-up, cosine to the floor at --steps, then the floor"},
        "methods": methods_mod.describe(methods, first),
        "raw": {"curves": runs, "wall_budget_s": budgets, "initial_weights_fingerprint": fingerprints,
                "step_times_s": per_step, "failed": failures},
        "summary": summary,
    }
    return rio.publish(payload, name, device, markdown, args.out, plot)


def train_interleaved(resolved, avail, device, args, seed) -> dict:
    first = resolved[avail[0]]["config"]
    _, model0, dm = bench.build_model_and_data(first)
    model0.to(device)
    fingerprint = bench.weights_fingerprint(model0)
    val = bench.take_batches(dm.val_dataloader, args.eval_batches, device)
    cap = max(args.steps, int(math.ceil(args.steps * args.max_factor)))
    batches = bench.BatchStream(dm.train_dataloader, device)
    state = {}
    for m in avail:
        # train()'s schedule for trainer.max_steps = --steps: warm-up, cosine to the floor, then the floor
        runner = bench.Runner(bench.deepcopy_model(model0).train(), resolved[m]["config"], device, args.steps)
        state[m] = {"runner": runner, "step": 0, "time": 0.0, "times": [], "losses": []}
    del model0
    loss0 = state[avail[0]]["runner"].heldout_loss(val)  # identical weights: one evaluation serves all
    curves = {m: [{"step": 0, "time_s": 0.0, "loss": loss0}] for m in avail}

    failed = {}

    def one_step(m):
        s = state[m]
        k = s["runner"].accumulate
        micro = [batches[s["step"] * k + j] for j in range(k)]
        res = isolate.guarded(lambda _: s["runner"].train_step(micro), {})
        if isinstance(res, dict):  # recorded; the method leaves the rotation, the others go on
            failed[m] = res["error"]
            print(f"[quality] {m} FAILED: {res['error']}", file=sys.stderr, flush=True)
            return
        dt, loss = res
        s["step"] += 1
        s["time"] += dt
        s["times"].append(dt)
        s["losses"].append(loss)

    def evaluate(m):
        s = state[m]
        curves[m].append({"step": s["step"], "time_s": s["time"], "loss": s["runner"].heldout_loss(val)})

    # phase 1: everyone to --steps, interleaved with a rotating order
    for i in range(args.steps):
        k = i % len(avail)
        for m in avail[k:] + avail[:k]:
            if m in failed:
                continue
            one_step(m)
            if m not in failed and (state[m]["step"] % args.eval_every == 0 or state[m]["step"] == args.steps):
                evaluate(m)
        if (i + 1) % max(1, args.eval_every) == 0:
            print(f"[quality] seed {seed} step {i + 1}/{args.steps} " +
                  " ".join(f"{m}={curves[m][-1]['loss']:.3f}" for m in avail), file=sys.stderr, flush=True)
    ref = methods_mod.BASELINE if methods_mod.BASELINE in state else avail[0]
    budget = state[ref]["time"]
    # phase 2: methods faster than the baseline continue until their training time passes the budget
    i = 0
    while True:
        behind = [m for m in avail if state[m]["time"] < budget and state[m]["step"] < cap and m not in failed]
        if not behind:
            break
        k = i % len(behind)
        for m in behind[k:] + behind[:k]:
            one_step(m)
            s = state[m]
            if m in failed:
                continue
            if s["time"] >= budget or s["step"] % args.eval_every == 0 or s["step"] >= cap:
                evaluate(m)
        i += 1
    for m in avail:  # a method capped before the budget gets no wall-clock value (curve ends early)
        if state[m]["time"] < budget:
            print(f"[quality] {m}: reached the step cap {cap} before the wall-clock budget", file=sys.stderr)
    return {
        "fingerprint": fingerprint,
        "budget_s": budget,
        "budget_method": ref,
        "curves": curves,
        "step_times_s": {m: state[m]["times"] for m in avail},
        "train_loss": {m: [float(x) for x in state[m]["losses"]] for m in avail},
        "failed": failed,
    }


def _pm(stat: dict, digits: int = 3) -> str | None:
    if not stat or stat.get("mean") is None:
        return None
    if stat.get("std") is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(p: dict) -> str:
    env, shape, s, st = p["environment"], p["shape"], p["summary"], p["settings"]
    header = ["method", "kind", f"loss @ {st['steps']} steps", "ppl @ steps", "Δ loss vs std fused",
              "loss @ equal time", "ppl @ equal time", "Δ loss vs std fused", "steps in that time", "mean step (s)"]
    rows = []
    for m, meta in p["methods"].items():
        if m not in s:
            continue
        r = s[m]
        rows.append([
            meta["label"], meta["kind"], _pm(r["loss_at_equal_steps"]), _pm(r["ppl_at_equal_steps"], 2),
            _signed(r["loss_at_equal_steps_minus_baseline"]), _pm(r["loss_at_equal_time"]),
            _pm(r["ppl_at_equal_time"], 2), _signed(r["loss_at_equal_time_minus_baseline"]),
            _pm(r["steps_at_equal_time"], 0), None if r["mean_step_s"] is None else f"{r['mean_step_s']:.4f}",
        ])
    load = env.get("load", {})
    budgets = ", ".join(f"{v:.1f}" for v in p["raw"]["wall_budget_s"].values())
    from experiments.throughput import describe_device

    head = (
        f"### {p['experiment']} on {describe_device(env)}\n\n"
        f"{shape['model']} ({shape['model_source']}), batch {shape['batch_size']} x {shape['block_size']}, "
        f"{shape['precision']}, kept ratio {shape['min_tokens_ratio']}, router {shape['router_layers']} layers; "
        f"seeds {st['seeds']} (mean ± sample std), held-out loss on every token of {st['eval_batches']} "
        f"validation batches, same initial weights and batch order per seed, methods interleaved step by step. "
        f"Equal time = the standard fused baseline's training time for {st['steps']} steps "
        f"({budgets} s per seed). Δ < 0 is better than the baseline. {env['date_utc']}; load avg (1 min) "
        f"median {rio.r2(load.get('median'))}, max {rio.r2(load.get('max'))} on {env['hardware']['cpu_count']} CPUs.\n"
    )
    spikes = []
    for seed, per in (p["raw"].get("step_times_s") or {}).items():
        for m, ts in per.items():
            if len(ts) > 2 and max(ts) > 3 * stats.median(ts):
                spikes.append(f"{p['methods'][m]['label']} seed {seed}: max {max(ts):.2f} s vs median {stats.median(ts):.2f} s")
    if spikes:
        head += ("\n**Timing spikes** (a step over 3x its method's median: the machine was disturbed; "
                 "equal-time values are less reliable): " + "; ".join(spikes) + "\n")
    fails = [f"{p['methods'][m]['label']} (seed {seed}): {err[:200]}"
             for seed, fs in (p["raw"].get("failed") or {}).items() for m, err in fs.items()]
    tail = ("\n\nFAILED during training (its numbers stop there): " + "; ".join(fails)) if fails else ""
    return head + "\n" + rio.md_table(header, rows) + tail


def _signed(v):
    return None if v is None else f"{0.0 if abs(v) < 5e-4 else v:+.3f}"


def plot(p: dict, path) -> None:
    """Held-out loss vs training wall-clock and vs step, mean over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, seeds in p["raw"]["curves"].items():
        meta = p["methods"][m]
        style = {"baseline": "-", "cggr": "-", "control": "--"}[meta["kind"]]
        width = 2.2 if meta["kind"] == "baseline" else 1.3
        steps = sorted(set.intersection(*(set(c["step"] for c in cur) for cur in seeds.values())))
        mean_loss, mean_time = [], []
        for st in steps:
            pts = [next(c for c in cur if c["step"] == st) for cur in seeds.values()]
            mean_loss.append(sum(x["loss"] for x in pts) / len(pts))
            mean_time.append(sum(x["time_s"] for x in pts) / len(pts))
        a.plot(mean_time, mean_loss, style, lw=width, label=meta["label"])
        b.plot(steps, mean_loss, style, lw=width, label=meta["label"])
    for ax, xl in ((a, "training wall-clock (s, summed step time)"), (b, "optimizer step")):
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out loss (all tokens)")
        ax.grid(alpha=0.3)
    budget = sum(p["raw"]["wall_budget_s"].values()) / len(p["raw"]["wall_budget_s"])
    a.axvline(budget, color="grey", lw=0.8, ls=":")
    b.axvline(p["settings"]["steps"], color="grey", lw=0.8, ls=":")
    b.legend(fontsize=7)
    fig.suptitle(f"{p['experiment']} ({p['environment']['device_tag']}): mean over seeds {p['settings']['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

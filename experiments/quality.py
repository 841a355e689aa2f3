"""Quality per second: held-out loss at equal wall-clock and equal steps, and time to standard's loss.

    python -m experiments.quality --preset tiny --steps 400 --seeds 0,1,2,3,4          # CPU, see quality_suite.sh
    python -m experiments.quality --preset tiny --steps 6 --seeds 0 --evals 2 \\
        --methods standard_fused,importance_sequence,random_sequence                   # a smoke run, ~1 min

The protocol (issue 14; "No Train No Gain" asks that every method's LR schedule fully decay within the
shared budget):

1. **Calibrate.** Every method runs ``--calibrate-steps`` timed steps (after one untimed) from the same
   initial weights, with routing active, interleaved; its median step time is ``t_m``.
2. **Size schedules.** The time budget is the fair baseline's (standard training, fused loss) for
   ``--steps`` steps, ``W = --steps x t_base``. Each method's LR schedule (``train()``'s: linear warm-up,
   cosine to ``optim.min_lr_ratio``) is sized to the steps it can run in ``W``
   (:func:`experiments.quality_stats.schedule_steps`, CGGR warm-up steps at the baseline's cost;
   at most ``--max-factor x --steps``). ``--schedule steps`` sizes every schedule to ``--steps`` instead.
3. **Train, interleaved by time.** Per seed, every method starts from the same initial weights and
   reads the same batches in the same order (batch i at its step i); the next step always goes to the
   method with the least training time so far, so load drift on the machine is shared at equal
   wall-clock. A method trains until its schedule is done, it has ``--steps`` steps, and its training
   time reaches the baseline's actual ``W`` of that seed (past its schedule, at the LR floor).
4. **Evaluate** (not timed): the held-out loss on every trainable token of the same ``--eval-batches``
   validation batches, at ``--evals`` points of a time grid over ``W``, at step ``--steps``, at the end
   of each schedule and at the end (and every ``--eval-every`` steps if given).

Reported per method, mean and sample std over ``--seeds`` (a seed fixes initial weights, data order and
the rules' draws): loss at equal time (interpolated at the seed's ``W``) and at equal steps; **time to
target**, the wall-clock at which the held-out loss first reaches the baseline's final loss of that seed
(interpolated between evaluations; "not reached" within the run), as a fraction of ``W``; and paired
comparisons (same seed, same batches) with the baseline and with the method's random control: per-seed
differences, wins/losses, an exact sign test and a paired t test, with n stated. Wall-clock is the summed
training step time (device-synchronized), evaluation excluded.
"""

from __future__ import annotations

import math
import statistics
import sys

from experiments import bench
from experiments import compose
from experiments import isolate
from experiments import methods as methods_mod
from experiments import quality_stats as Q
from experiments.quality_report import markdown, plot
from experiments import results_io as rio
from experiments import stats

BASELINE = methods_mod.BASELINE


def main(argv=None) -> int:
    ap = compose.make_parser("quality", __doc__)
    ap.add_argument("--steps", type=int, default=150,
                    help="the baseline's steps: its schedule, the time budget W and the equal-steps point")
    ap.add_argument("--evals", type=int, default=10, help="held-out evaluations on a time grid over W")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: time grid only)")
    ap.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    ap.add_argument("--seeds", type=compose.number_list(int, "0,1,2", lambda v: v >= 0, "seeds >= 0"), default="0,1,2",
                    help="comma-separated seeds")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget W per seed in seconds: --steps becomes W / the baseline's calibrated step time")
    ap.add_argument("--max-factor", type=float, default=4.0, help="cap on any method's steps, x --steps")
    ap.add_argument("--calibrate-steps", type=int, default=8,
                    help="timed calibration steps per method; their median sizes each LR schedule (with 3, "
                         "committed runs had schedules only 75%% done at the budget: the report flags that)")
    ap.add_argument("--schedule", choices=("time", "steps"), default="time",
                    help="time: LR schedules sized to the steps each method runs in W; steps: all sized to --steps")
    ap.add_argument("--cggr-warmup", type=int, default=None, help="override cggr.warmup_steps (default: the config's)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the base config")
    args = ap.parse_args(argv)
    if min(args.steps, args.evals, args.eval_batches, args.calibrate_steps) < 1 or args.eval_every < 0:
        ap.error("--steps, --evals, --eval-batches and --calibrate-steps must be >= 1, --eval-every >= 0")
    if args.budget_s is not None and args.budget_s <= 0:
        ap.error("--budget-s must be > 0")
    seeds = args.seeds
    device = compose.pick_device(args.device)
    compose.set_threads(args.threads)
    methods = methods_mod.parse_methods(args.methods)
    if BASELINE not in methods:
        ap.error(f"--methods must include {BASELINE}: the baseline every budget and target is taken from")
    methods = [BASELINE] + [m for m in methods if m != BASELINE]
    extra = list(args.overrides)
    if args.cggr_warmup is not None:
        extra.append(f"cggr.warmup_steps={args.cggr_warmup}")
    base = compose.base_overrides(args.preset, device, extra)
    name = args.name or f"quality-{args.preset}"
    env = rio.environment(device)

    def resolve(seed):
        return compose.resolve_methods(methods, [*base, f"seed={seed}", f"cggr.seed={seed}"], device, args.reference)

    runs, budgets, fingerprints, per_step, failures = {}, {}, {}, {}, {}
    with rio.LoadSampler() as load:
        first = resolve(seeds[0])
        compose.check_same_model_and_data(first)
        calib, built = calibrate(first, methods, device, args.calibrate_steps)
        print("[quality] calibrated step times (s): " + ", ".join(f"{m}={t:.3f}" for m, t in calib.items()),
              file=sys.stderr, flush=True)
        if args.budget_s is not None:
            args.steps = max(1, int(args.budget_s / calib[BASELINE]))
            print(f"[quality] --budget-s {args.budget_s:.0f}: --steps {args.steps}", file=sys.stderr, flush=True)
        cap = max(args.steps, int(math.ceil(args.steps * args.max_factor)))
        plan = plan_steps(calib, first, methods, args.steps, cap, args.schedule)
        print("[quality] schedule steps: " + ", ".join(f"{m}={n}" for m, n in plan.items()), file=sys.stderr, flush=True)
        print(f"[quality] projected training time (calibrated, evaluation not included): "
              f"{projected_s(calib, plan, args.steps, len(seeds)) / 60:.1f} min for {len(seeds)} seed(s)",
              file=sys.stderr, flush=True)
        for seed in seeds:
            resolved = first if seed == seeds[0] else resolve(seed)
            res = train_seed(resolved, methods, plan, device, args, seed, calib[BASELINE] * args.steps, cap)
            fingerprints[seed], budgets[seed] = res["fingerprint"], res["budget_s"]
            per_step[seed], failures[seed] = res["step_times_s"], res["failed"]
            for m in methods:
                runs.setdefault(m, {})[seed] = res["curves"][m]
    env["load"] = load.summary()
    summary = summarize(runs, budgets, plan, methods, args.steps, per_step)
    payload = {
        "experiment": name,
        "kind": "quality",
        "protocol": "time-budget",
        "environment": env,
        "shape": {**compose.shape_of(first[methods[0]]["config"]), **built},
        "settings": {"steps": args.steps, "budget_s": args.budget_s, "evals": args.evals, "eval_every": args.eval_every,
                     "eval_batches": args.eval_batches, "seeds": seeds, "max_factor": args.max_factor,
                     "calibrate_steps": args.calibrate_steps, "schedule": args.schedule, "preset": args.preset,
                     "reference": args.reference, "base_overrides": base, "methods": methods,
                     "lr_schedule": ("train()'s (linear warm-up, cosine to the floor), sized per method to the steps "
                                     "it runs in the baseline's time; the floor after" if args.schedule == "time"
                                     else "train()'s, sized to --steps for every method; the floor after")},
        "methods": methods_mod.describe(methods, first),
        "raw": {"curves": runs, "wall_budget_s": budgets, "initial_weights_fingerprint": fingerprints,
                "step_times_s": per_step, "failed": failures, "calibration_step_s": calib, "schedule_steps": plan},
        "summary": summary,
    }
    return rio.publish(payload, name, device, markdown, args.out, plot)


# ---- calibration and schedules ------------------------------------------------------------------


def _warmup_of(config: dict) -> int:
    c = config["cggr"]
    return int(c["warmup_steps"]) if c["enabled"] else 0


def calibrate(resolved: dict, methods: list[str], device: str, timed: int) -> tuple[dict[str, float], dict]:
    """Median routed step time per method: one untimed then ``timed`` timed steps, interleaved, from
    the same weights (throwaway copies), at the first routed step (past CGGR warm-up); and the built
    model's shape."""
    first = resolved[methods[0]]["config"]
    _, model0, dm = bench.build_model_and_data(first)
    model0.to(device)
    built = bench.built_shape(model0, first)
    batches = bench.BatchStream(dm.train_dataloader, device)
    runners = {}
    for m in methods:
        cfg = resolved[m]["config"]
        r = bench.Runner(bench.deepcopy_model(model0).train(), cfg, device, total_steps=10**6)
        r.step.total_steps = 10**6  # infobatch: far from its annealed tail
        r.global_step = _warmup_of(cfg)  # routing active, as after warm-up
        runners[m] = r
    del model0
    times = {m: [] for m in methods}
    for i in range(1 + timed):
        k = i % len(methods)
        for m in methods[k:] + methods[:k]:
            r = runners[m]
            micro = [batches[i * r.accumulate + j] for j in range(r.accumulate)]
            dt, _ = r.train_step(micro)
            if i > 0:
                times[m].append(dt)
    return {m: stats.median(ts) for m, ts in times.items()}, built


def plan_steps(calib: dict[str, float], resolved: dict, methods: list[str], steps: int, cap: int,
               schedule: str) -> dict[str, int]:
    """Each method's schedule length: the steps it runs in the baseline's time (``schedule='time'``)."""
    if schedule == "steps":
        return {m: steps for m in methods}
    return {m: steps if m == BASELINE else
            Q.schedule_steps(calib[m], calib[BASELINE], steps, _warmup_of(resolved[m]["config"]), cap)
            for m in methods}


def projected_s(calib: dict[str, float], plan: dict[str, int], steps: int, seeds: int) -> float:
    """Training seconds the run will take at the calibrated step times: every method trains at least
    the baseline's time W, and at least max(its schedule, --steps) steps."""
    budget = steps * calib[BASELINE]
    return seeds * sum(max(budget, max(plan[m], steps) * calib[m]) for m in plan)


# ---- one seed -----------------------------------------------------------------------------------


def train_seed(resolved, methods, plan, device, args, seed, budget_estimate, cap) -> dict:
    """Train every method of one seed, interleaved by training time (see the module docstring)."""
    first = resolved[methods[0]]["config"]
    _, model0, dm = bench.build_model_and_data(first)
    model0.to(device)
    fingerprint = bench.weights_fingerprint(model0)
    val = bench.take_batches(dm.val_dataloader, args.eval_batches, device)
    batches = bench.BatchStream(dm.train_dataloader, device)
    grid_dt = budget_estimate / args.evals
    state = {}
    for m in methods:
        runner = bench.Runner(bench.deepcopy_model(model0).train(), resolved[m]["config"], device, plan[m])
        runner.step.total_steps = plan[m]  # infobatch anneals over the tail of its own schedule
        state[m] = {"runner": runner, "step": 0, "time": 0.0, "times": [], "grid": 1}
    del model0
    loss0 = state[methods[0]]["runner"].heldout_loss(val)  # identical weights: one evaluation serves all
    curves = {m: [{"step": 0, "time_s": 0.0, "loss": loss0}] for m in methods}
    failed: dict[str, str] = {}
    budget = None  # the baseline's actual training time for --steps steps

    def done(m) -> bool:
        s = state[m]
        if m in failed or s["step"] >= cap:
            return True
        if s["step"] < max(plan[m], args.steps):
            return False
        if budget is None:  # the baseline has not finished: go on, unless it never will
            return BASELINE in failed
        return s["time"] >= budget

    def evaluate(m):
        s = state[m]
        if curves[m][-1]["step"] != s["step"]:
            curves[m].append({"step": s["step"], "time_s": s["time"], "loss": s["runner"].heldout_loss(val)})

    while True:
        active = [m for m in methods if not done(m)]
        if not active:
            break
        m = min(active, key=lambda x: (state[x]["time"], methods.index(x)))
        s = state[m]
        k = s["runner"].accumulate
        micro = [batches[s["step"] * k + j] for j in range(k)]
        res = isolate.guarded(lambda _: s["runner"].train_step(micro), {})
        if isinstance(res, dict):  # recorded; the method leaves the rotation, the others go on
            failed[m] = res["error"]
            print(f"[quality] seed {seed} {m} FAILED: {res['error']}", file=sys.stderr, flush=True)
            continue
        dt, _ = res
        s["step"] += 1
        s["time"] += dt
        s["times"].append(dt)
        if m == BASELINE and s["step"] == args.steps:
            budget = s["time"]
        crossed = s["time"] >= s["grid"] * grid_dt
        while s["time"] >= s["grid"] * grid_dt:
            s["grid"] += 1
        if (crossed or s["step"] in (args.steps, plan[m]) or done(m)
                or (args.eval_every and s["step"] % args.eval_every == 0)):
            evaluate(m)
            if m == BASELINE:
                print(f"[quality] seed {seed} t={s['time']:.1f}s " + " ".join(
                    f"{x}:{state[x]['step']}/{plan[x]}={curves[x][-1]['loss']:.3f}" for x in methods),
                    file=sys.stderr, flush=True)
    for m in methods:
        if m not in failed and budget is not None and state[m]["time"] < budget:
            print(f"[quality] seed {seed} {m}: reached the step cap {cap} before the wall-clock budget", file=sys.stderr)
    return {
        "fingerprint": fingerprint,
        "budget_s": budget,
        "curves": curves,
        "step_times_s": {m: state[m]["times"] for m in methods},
        "failed": failed,
    }


# ---- summary ------------------------------------------------------------------------------------


def _at(curve, key, value):
    point = stats.curve_at(curve, key, value)
    return None if point is None else point["loss"]


def summarize(runs, budgets, plan, methods, steps, per_step) -> dict[str, dict]:
    """Per method: stats.quality_summary's equal-steps/equal-time figures, time to target, paired
    comparisons with the baseline and with the method's control, and the goal check."""
    budgets = {s: b for s, b in budgets.items() if b is not None}
    summary = stats.quality_summary(runs, steps, budgets)
    base_runs = runs.get(BASELINE, {})
    # the target: the baseline's final loss of that seed; a baseline that did not improve on the initial
    # loss (e.g. a run shorter than its LR warm-up) gives no target: every method would "reach" it at 0 s
    targets = {s: Q.final_loss(c, steps) for s, c in base_runs.items()
               if any(p["step"] == steps for p in c) and Q.final_loss(c, steps) < c[0]["loss"]}
    eq_time = {m: {s: _at(c, "time_s", budgets[s]) for s, c in runs[m].items() if s in budgets} for m in runs}
    eq_steps = {m: {s: _at(c, "step", steps) for s, c in runs[m].items()} for m in runs}
    base_row = summary.get(BASELINE, {})
    for m, row in summary.items():
        for key in ("loss_at_equal_steps", "loss_at_equal_time"):
            ref = (base_row.get(key) or {}).get("mean")
            mine = (row.get(key) or {}).get("mean")
            row[f"{key}_minus_baseline"] = mine - ref if ref is not None and mine is not None else None
        times = [statistics.fmean(ts) for ts in (per_step[s].get(m, []) for s in per_step) if ts]
        row["mean_step_s"] = statistics.fmean(times) if times else None
        row["schedule_steps"] = plan[m]
        row["time_to_target"] = Q.time_to_target(runs[m], targets, budgets)
        row["paired_vs_baseline_time"] = Q.paired(eq_time[m], eq_time.get(BASELINE, {}))
        row["paired_vs_baseline_steps"] = Q.paired(eq_steps[m], eq_steps.get(BASELINE, {}))
        control = methods_mod.METHODS[m].control
        if control in runs:
            row["control"] = control
            row["paired_vs_control_time"] = Q.paired(eq_time[m], eq_time[control])
            row["goal"] = Q.meets_goal(row["time_to_target"], row["paired_vs_control_time"])
        elif methods_mod.METHODS[m].kind == "cggr":
            row["goal"] = Q.meets_goal(row["time_to_target"], None)
    return summary


if __name__ == "__main__":
    sys.exit(main())

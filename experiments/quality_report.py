"""Tables and plots of a quality run (experiments/quality.py's results): the markdown table of
``experiments.report`` and the held-out-loss-vs-wall-clock plot with seed bands."""

from __future__ import annotations

import math
import statistics

from experiments import methods as methods_mod
from experiments import quality_stats as Q
from experiments import results_io as rio
from experiments import stats

BASELINE = methods_mod.BASELINE


def _pm(stat: dict, digits: int = 3) -> str | None:
    if not stat or stat.get("mean") is None:
        return None
    if stat.get("std") is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _delta(p: dict | None) -> str | None:
    """Paired mean difference, its spread, wins/losses and the sign-test p: '-0.052 ± 0.010 (3/3, p=0.25)'."""
    if not p or not p.get("n"):
        return None
    spread = f" ± {p['std']:.3f}" if p.get("std") is not None else ""
    return f"{0.0 if abs(p['mean']) < 5e-4 else p['mean']:+.3f}{spread} ({p['wins']}/{p['n']} lower, p={p['p_sign']:.2f})"


def _ttt(t: dict | None) -> str | None:
    if not t or not t.get("n"):
        return None
    if not t["reached"]:
        return f"not reached (0/{t['n']})"
    spread = f" ± {t['ratio_std']:.2f}" if t.get("ratio_std") is not None else ""
    return f"{t['ratio_mean']:.2f}x{spread} ({t['reached']}/{t['n']})"


SCHEDULE_DONE_AT_LEAST = 0.9
"""A method whose LR schedule is less done than this at W (the baseline's time) in some seed is read at
equal time at a learning rate above its schedule's floor: the report says so beside its numbers."""


def schedule_done_at_budget(p: dict) -> dict[str, dict]:
    """Per method but the baseline, over seeds: the optimizer steps finished within the seed's budget W
    (its step times summed in order) against the schedule's length (each run's own, for a merged result),
    and the learning-rate factor (of the peak) the schedule had reached there."""
    from lightning_cggr.config import OptimConfig
    from lightning_cggr.step import lr_factor

    raw = p.get("raw") or {}
    runs = raw.get("runs") or [{"seeds": None, "schedule_steps": raw.get("schedule_steps") or {}}]
    out: dict[str, dict] = {}
    for run in runs:
        seeds = None if run["seeds"] is None else {str(x) for x in run["seeds"]}
        for m, plan in (run.get("schedule_steps") or {}).items():
            if m == BASELINE or not isinstance(plan, int) or plan < 1:
                continue
            optim = OptimConfig(**(p["methods"].get(m, {}).get("config") or {}).get("optim", {}))
            for seed, per in (raw.get("step_times_s") or {}).items():
                w = (raw.get("wall_budget_s") or {}).get(seed)
                if (seeds is not None and str(seed) not in seeds) or w is None or not per.get(m):
                    continue
                done, t = 0, 0.0
                for x in per[m]:
                    if t + x > w:
                        break
                    t, done = t + x, done + 1
                r = out.setdefault(m, {"done": [], "plan": [], "lr_factor": [], "floor": optim.min_lr_ratio})
                r["done"].append(done)
                r["plan"].append(plan)
                r["lr_factor"].append(lr_factor(done, optim, plan))
    for r in out.values():
        r["fraction_min"] = min(d / n for d, n in zip(r["done"], r["plan"]))
    return out


def unfinished_schedules(p: dict) -> list[str]:
    """The methods whose schedule was under :data:`SCHEDULE_DONE_AT_LEAST` done at W in some seed."""
    out = []
    for m, r in schedule_done_at_budget(p).items():
        if r["fraction_min"] >= SCHEDULE_DONE_AT_LEAST:
            continue
        done, plan = min(zip(r["done"], r["plan"]), key=lambda dp: dp[0] / dp[1])
        out.append(f"{p['methods'][m]['label']}: {done} of {plan} steps in its worst seed "
                   f"({math.floor(100 * done / plan)}%), LR up to {max(r['lr_factor']):.2f}x the peak at W "
                   f"(floor {r['floor']:g}x)")
    return out


def markdown(p: dict) -> str:
    env, shape, s, st = p["environment"], p["shape"], p["summary"], p["settings"]
    header = ["method", "kind", "schedule steps", "mean step (s)", "loss @ equal time", "Δ vs std (paired)",
              "Δ vs its control (paired)", "time to std's final loss", f"loss @ {st['steps']} steps",
              "Δ vs std (paired)"]
    rows = []
    for m, meta in p["methods"].items():
        if m not in s:
            continue
        r = s[m]
        rows.append([
            meta["label"], meta["kind"], r.get("schedule_steps"),
            None if r.get("mean_step_s") is None else f"{r['mean_step_s']:.3f}",
            _pm(r["loss_at_equal_time"]), None if m == BASELINE else _delta(r.get("paired_vs_baseline_time")),
            _delta(r.get("paired_vs_control_time")), _ttt(r.get("time_to_target")),
            _pm(r["loss_at_equal_steps"]), None if m == BASELINE else _delta(r.get("paired_vs_baseline_steps")),
        ])
    load = env.get("load", {})
    budgets = ", ".join(f"{v:.1f}" for v in p["raw"]["wall_budget_s"].values() if v is not None)
    from experiments.throughput import describe_device

    sched = ("each method's LR schedule sized to the steps it runs in W (calibrated step times), cosine to the "
             "floor there" if st.get("schedule") == "time" else f"every LR schedule sized to {st['steps']} steps")
    order = ("interleaved by training time" if p.get("protocol") == "time-budget" else
             "interleaved step by step, faster ones continued at the LR floor up to W (earlier protocol)")
    n = len(st["seeds"])
    head = (
        f"### {p['experiment']} on {describe_device(env)}\n\n"
        f"{shape['model']} ({shape['model_source']}), batch {shape['batch_size']} x {shape['block_size']}, "
        f"{shape['precision']}, kept ratio {shape['min_tokens_ratio']}, router {shape['router_layers']} layers; "
        f"seeds {st['seeds']} (mean ± sample std; n = {len(st['seeds'])}). Budget W = standard training's (fused "
        f"loss) time for {st['steps']} steps ({budgets} s per seed); {sched}. Held-out loss on every token of "
        f"{st['eval_batches']} validation batches; same initial weights and batch order per seed; methods "
        f"{order}. Paired Δ: per-seed difference (< 0 better), its mean ± sd, seeds lower, "
        f"exact two-sided sign-test p (at n = {n} it cannot go below {Q.sign_test_p(n, 0):.2g}). Time to target: wall-clock until the "
        f"held-out loss reaches standard's final loss of the same seed, as a multiple of W (seeds that reached "
        f"it / seeds). {env['date_utc']}; load avg (1 min) median {rio.r2(load.get('median'))}, max "
        f"{rio.r2(load.get('max'))} on {env['hardware']['cpu_count']} CPUs.\n"
    )
    if p["raw"].get("runs"):
        head += (f"\nPooled from {len(p['raw']['runs'])} runs of this plan (`python -m experiments.quality_merge`), "
                 + "; ".join(f"seeds {r['seeds']} on {r['date_utc']}"
                             + (f" (commit {str(r['git_commit'])[:10]})" if r.get("git_commit") else "")
                             for r in p["raw"]["runs"])
                 + ": every seed is paired with its own run's standard baseline; each run calibrated its own "
                   "LR schedules.\n")
    spikes = []
    for seed, per in (p["raw"].get("step_times_s") or {}).items():
        for m, ts in per.items():
            if len(ts) > 2 and max(ts) > 3 * stats.median(ts):
                spikes.append(f"{p['methods'][m]['label']} seed {seed}: max {max(ts):.2f} s vs median {stats.median(ts):.2f} s")
    if spikes:
        head += ("\n**Timing spikes** (a step over 3x its method's median: the machine was disturbed; "
                 "equal-time values are less reliable): " + "; ".join(spikes) + "\n")
    # each run's calibration against its own seeds' steps (a merged result holds several runs)
    runs = p["raw"].get("runs") or [{"seeds": None, "calibration_step_s": p["raw"].get("calibration_step_s") or {}}]
    drift = []
    for i, run in enumerate(runs):
        seeds = None if run["seeds"] is None else {str(x) for x in run["seeds"]}
        which = "" if len(runs) == 1 else f" (run {i + 1}, seeds {', '.join(sorted(seeds))})"
        for m, t_cal in run["calibration_step_s"].items():
            ts = [x for seed, per in p["raw"]["step_times_s"].items() if seeds is None or str(seed) in seeds
                  for x in per.get(m, [])]
            if ts and t_cal and abs(stats.median(ts) / t_cal - 1) > 0.15:
                drift.append(f"{p['methods'][m]['label']}{which}: calibrated {t_cal:.3f} s, ran at median "
                             f"{stats.median(ts):.3f} s")
    if drift:
        head += ("\n**Calibration drift** (> 15%: that schedule ends away from W): " + "; ".join(drift) + "\n")
    unfinished = unfinished_schedules(p)
    if unfinished:
        head += (f"\n**Schedules unfinished at W** (under {100 * SCHEDULE_DONE_AT_LEAST:.0f}% of their steps done in "
                 "the baseline's time: the calibration put their step time, against the baseline's, too low; their "
                 "equal-time loss is read before their learning rate decayed, which the protocol means to avoid): "
                 + "; ".join(unfinished) + "\n")
    fails = [f"{p['methods'][m]['label']} (seed {seed}): {err[:200]}"
             for seed, fs in (p["raw"].get("failed") or {}).items() for m, err in fs.items()]
    tail = ("\n\nFAILED during training (its numbers stop there): " + "; ".join(fails)) if fails else ""
    return head + "\n" + rio.md_table(header, rows) + tail


def plot(p: dict, path) -> None:
    """Held-out loss vs training wall-clock and vs step: mean over seeds with a min-max seed band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    budgets = [v for v in p["raw"]["wall_budget_s"].values() if v is not None]
    t_end = max(c[-1]["time_s"] for seeds in p["raw"]["curves"].values() for c in seeds.values())
    s_end = max(c[-1]["step"] for seeds in p["raw"]["curves"].values() for c in seeds.values())
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (m, seeds) in enumerate(p["raw"]["curves"].items()):
        meta = p["methods"][m]
        style = {"baseline": "-", "cggr": "-", "control": "--"}[meta["kind"]]
        width = 2.2 if meta["kind"] == "baseline" else 1.3
        color = "black" if m == BASELINE else colors[i % len(colors)]
        for ax, key, end in ((a, "time_s", t_end), (b, "step", s_end)):
            grid = [end * j / 120 for j in range(121)]
            band = Q.band(list(seeds.values()), key, grid)
            ax.plot(band["x"], band["mean"], style, lw=width, color=color, label=meta["label"])
            ax.fill_between(band["x"], band["lo"], band["hi"], color=color, alpha=0.12, lw=0)
    targets = [Q.final_loss(c, p["settings"]["steps"]) for c in p["raw"]["curves"].get(BASELINE, {}).values()
               if any(x["step"] == p["settings"]["steps"] for x in c)]
    for ax, xl in ((a, "training wall-clock (s, summed step time)"), (b, "optimizer step")):
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out loss (all tokens)")
        ax.grid(alpha=0.3)
        if targets:
            ax.axhline(statistics.fmean(targets), color="grey", lw=0.8, ls=":")
    if budgets:
        a.axvline(statistics.fmean(budgets), color="grey", lw=0.8, ls=":")
        a.axvline(Q.TARGET_RATIO * statistics.fmean(budgets), color="grey", lw=0.6, ls="-.")
    b.axvline(p["settings"]["steps"], color="grey", lw=0.8, ls=":")
    lo = min(min(x["loss"] for x in c[1:] or c) for seeds in p["raw"]["curves"].values() for c in seeds.values())
    hi = max(c[min(1, len(c) - 1)]["loss"] for seeds in p["raw"]["curves"].values() for c in seeds.values())
    if hi > lo:
        for ax in (a, b):
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    b.legend(fontsize=7)
    fig.suptitle(f"{p['experiment']} ({p['environment']['device_tag']}): mean over seeds {p['settings']['seeds']}, "
                 "band = min-max over seeds; dotted: W and standard's final loss; dash-dot: 0.75 W")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

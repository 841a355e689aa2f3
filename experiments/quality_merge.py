"""Merge quality runs of the same plan made with different seeds into one result.

A quality run (``python -m experiments.quality``) compares every method with the baseline of the
same seed, so seeds are independent units: runs made at different times (a CPU hour each) can be
pooled, and the paired statistics and sign tests then count every seed. The runs must agree on
everything but their seeds: methods, model and data shape, device and versions, steps, evaluation
grid, schedule and overrides. Each run keeps its own calibration (checked per run for drift) and LR
schedules; where those differ, the table shows each run's schedule steps.

    python -m experiments.quality_merge experiments/results/quality-smollm2_lora-cpu.json \\
        /tmp/more/quality-smollm2_lora-cpu.json            # writes quality-smollm2_lora-cpu.*

The merged JSON, markdown and plot replace the first file's (``--name`` / ``--out`` to put them
elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

from experiments import quality, quality_report
from experiments import results_io as rio

SETTINGS_THAT_MUST_MATCH = ("steps", "evals", "eval_every", "eval_batches", "max_factor", "calibrate_steps",
                            "schedule", "preset", "reference", "base_overrides", "methods")

# the processor and the threads the step ran on; not the kernel build or the exact memory size, which
# differ between otherwise equal machines. Machines of one kind can still differ in speed: every seed
# is paired with its own run's baseline, and the table lists each seed's budget W
HARDWARE_THAT_MUST_MATCH = ("cpu", "cpu_count", "torch_threads", "gpu")


class MergeError(ValueError):
    """Runs that cannot be pooled: the message names what differs."""


def _unseeded(method: dict | None) -> dict | None:
    """A method's description without its seeds (each run describes its methods at its first seed)."""
    if method is None:
        return None
    method = copy.deepcopy(method)
    method["overrides"] = [o for o in method.get("overrides", []) if not o.startswith(("seed=", "cggr.seed="))]
    config = method.get("config") or {}
    config.pop("seed", None)
    config.pop("output_dir", None)
    (config.get("cggr") or {}).pop("seed", None)
    return method


def _check(parts: list[dict]) -> None:
    first = parts[0]
    for i, p in enumerate(parts):
        if p.get("kind") != "quality" or p.get("protocol") != "time-budget":
            raise MergeError(f"run {i + 1} is not a time-budget quality run (kind {p.get('kind')!r}, protocol "
                             f"{p.get('protocol')!r}): only experiments/quality.py results can be merged")
    seen: dict[int, int] = {}
    for i, p in enumerate(parts):
        for seed in p["settings"]["seeds"]:
            if seed in seen:
                raise MergeError(f"seed {seed} is in run {seen[seed] + 1} and run {i + 1}: each seed may be "
                                 f"counted once; drop one of them")
            seen[seed] = i
    for i, p in enumerate(parts[1:], start=2):
        for key in SETTINGS_THAT_MUST_MATCH:
            if p["settings"].get(key) != first["settings"].get(key):
                raise MergeError(f"settings.{key} differs: {first['settings'].get(key)!r} in run 1, "
                                 f"{p['settings'].get(key)!r} in run {i}; only runs of the same plan can be merged")
        if p["shape"] != first["shape"]:
            raise MergeError(f"the model or data shape differs between run 1 and run {i}: {first['shape']} vs {p['shape']}")
        for m in first["methods"]:
            if _unseeded(p["methods"].get(m)) != _unseeded(first["methods"][m]):
                raise MergeError(f"method {m} is configured differently in run 1 and run {i} (its overrides "
                                 f"or resolved config, seeds aside)")
        for key in ("device", "versions"):
            if p["environment"].get(key) != first["environment"].get(key):
                raise MergeError(f"environment.{key} differs: {first['environment'].get(key)!r} in run 1, "
                                 f"{p['environment'].get(key)!r} in run {i}: timings are not comparable")
        a, b = first["environment"]["hardware"], p["environment"]["hardware"]
        if any(a.get(k) != b.get(k) for k in HARDWARE_THAT_MUST_MATCH):
            raise MergeError(f"the hardware differs between run 1 and run {i}: "
                             f"{ {k: a.get(k) for k in HARDWARE_THAT_MUST_MATCH} } vs "
                             f"{ {k: b.get(k) for k in HARDWARE_THAT_MUST_MATCH} }")


def _load(parts: list[dict]) -> dict:
    samples = [x for p in parts for x in (p["environment"].get("load") or {}).get("samples_1min", [])]
    if not samples:
        return {}
    return {"samples_1min": samples, "max": max(samples), "median": statistics.median(samples)}


def merge(parts: list[dict], name: str | None = None) -> dict:
    """One quality payload from runs of the same plan with disjoint seeds; the summary is recomputed
    over all seeds by experiments.quality.summarize."""
    if len(parts) < 2:
        raise MergeError("give at least two runs to merge")
    _check(parts)
    first = parts[0]
    methods = first["settings"]["methods"]
    raw = {"curves": {m: {} for m in methods}, "wall_budget_s": {}, "initial_weights_fingerprint": {},
           "step_times_s": {}, "failed": {}}
    for p in parts:
        for m in methods:
            raw["curves"][m].update(p["raw"]["curves"].get(m, {}))
        for key in ("wall_budget_s", "initial_weights_fingerprint", "step_times_s", "failed"):
            raw[key].update(p["raw"][key])
    # one calibration and plan per run: the drift check reads each run's own (runs[i]); a merged
    # result given again brings its runs along
    raw["calibration_step_s"] = first["raw"]["calibration_step_s"]
    raw["runs"] = [run for p in parts for run in p["raw"].get("runs") or [
        {"seeds": p["settings"]["seeds"], "calibration_step_s": p["raw"]["calibration_step_s"],
         "schedule_steps": p["raw"]["schedule_steps"], "date_utc": p["environment"]["date_utc"],
         "git_commit": p["environment"].get("git_commit"), "argv": p["environment"].get("argv")}]]
    plans = [run["schedule_steps"] for run in raw["runs"]]
    plan = {m: plans[0][m] if len({pl[m] for pl in plans}) == 1 else " / ".join(str(pl[m]) for pl in plans)
            for m in methods}
    raw["schedule_steps"] = plan
    seeds = [s for p in parts for s in p["settings"]["seeds"]]
    # paired statistics per seed: the keys are the seeds as the JSON wrote them (strings)
    summary = quality.summarize(raw["curves"], raw["wall_budget_s"], plan, methods, first["settings"]["steps"],
                                raw["step_times_s"])
    env = dict(first["environment"])
    env["date_utc"] = " and ".join(run["date_utc"] for run in raw["runs"])
    env["load"] = _load(parts)
    env["git_commit"] = ", ".join(dict.fromkeys(str(run["git_commit"]) for run in raw["runs"]))
    env["git_tree_dirty"] = any(p["environment"].get("git_tree_dirty") for p in parts)
    env.pop("argv", None)
    budget_s = {p["settings"].get("budget_s") for p in parts}
    settings = {**first["settings"], "seeds": seeds, "budget_s": budget_s.pop() if len(budget_s) == 1 else None}
    return {**first, "experiment": name or first["experiment"], "environment": env, "settings": settings,
            "raw": raw, "summary": summary, "merged_from": len(parts)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.quality_merge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="quality result JSON files (experiments/quality.py), the first one leads")
    ap.add_argument("--name", default=None, help="experiment name of the merged result (default: the first run's)")
    ap.add_argument("--out", default=None, help="results folder (default: the first run's folder)")
    args = ap.parse_args(argv)
    paths = [Path(r) for r in args.runs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        ap.error(f"no such file: {', '.join(missing)}")
    try:
        merged = merge([json.loads(p.read_text()) for p in paths], args.name)
    except MergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or str(paths[0].parent)
    return rio.publish(merged, merged["experiment"], merged["environment"]["device_tag"], quality_report.markdown,
                       out, quality_report.plot)


if __name__ == "__main__":
    sys.exit(main())

"""Pure summaries of benchmark measurements: medians, spreads, ratios, memory fits, curve reads.

No timing and no torch here; tested in ``tests/test_experiments.py``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Sequence

from experiments.methods import BASELINE


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    if not xs:
        raise ValueError("median of no values")
    return float(statistics.median(xs))


def mean_spread(xs: Iterable[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for n < 2), min, max and n."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else None,
        "min": min(xs),
        "max": max(xs),
    }


def throughput_summary(
    step_times: dict[str, list[float]], tokens_per_step: int, baseline: str = BASELINE
) -> dict[str, dict[str, Any]]:
    """Per method: median step time, tokens/s and speed relative to ``baseline`` and the naive one.

    ``speedup_vs_x`` = median step time of x / median step time of the method (> 1: faster).
    """
    out: dict[str, dict[str, Any]] = {}
    med = {m: median(ts) for m, ts in step_times.items() if ts}
    for m, ts in step_times.items():
        if not ts:
            continue
        row = {
            "steps": len(ts),
            "median_step_s": med[m],
            "min_step_s": min(ts),
            "max_step_s": max(ts),
            "tokens_per_s": tokens_per_step / med[m],
        }
        for ref in (baseline, "standard_naive"):
            if ref in med:
                row[f"speedup_vs_{ref}"] = med[ref] / med[m]
        out[m] = row
    return out


def point_fits(point: dict[str, Any], budget_bytes: float) -> bool:
    """A sweep point fits when it ran, and its peak memory is within the budget."""
    return point.get("status") == "ok" and point.get("peak_bytes") is not None and point["peak_bytes"] <= budget_bytes


def fit_status(point: dict[str, Any], budget_bytes: float) -> str:
    """'fits' or the reason it does not ('does not fit: ...')."""
    st = point.get("status")
    if st == "ok":
        if point_fits(point, budget_bytes):
            return "fits"
        return f"does not fit: peak {point['peak_bytes'] / 2**20:.0f} MiB > budget {budget_bytes / 2**20:.0f} MiB"
    if st == "oom":
        return "does not fit: out of memory"
    if st == "killed":
        return f"does not fit: {point.get('error', 'process killed')}"
    return f"error: {point.get('error', st)}"


def sweep_summary(points: list[dict[str, Any]], budget_bytes: float, baseline: str = BASELINE) -> dict[str, dict]:
    """Per method: the largest batch size within the budget, its tokens/s and the ratio to the baseline's.

    ``points`` hold ``method``, ``batch_size``, ``status``, ``peak_bytes``, ``tokens_per_s``. A method
    with no fitting point gets ``best_batch_size=None``. ``bound`` says what stopped the largest batch
    from being larger: ``budget`` (a larger one ran out of it), ``grid`` (none larger in the grid) or
    ``unmeasured`` (the next larger was not run, e.g. the run's time limit, or failed otherwise). ``tokens_per_s_vs_baseline`` compares each
    method's best fitting point with the baseline's best fitting point (equal memory budget).
    """
    by_method: dict[str, list[dict]] = {}
    for p in points:
        by_method.setdefault(p["method"], []).append(p)
    out: dict[str, dict] = {}
    for m, every in by_method.items():
        ps = [p for p in every if p.get("status") not in ("skipped", "not_run")] or every
        fitting = [p for p in ps if point_fits(p, budget_bytes)]
        best = max(fitting, key=lambda p: p["batch_size"]) if fitting else None
        fastest = max(fitting, key=lambda p: p["tokens_per_s"]) if fitting else None
        out[m] = {
            "best_batch_size": best["batch_size"] if best else None,
            "tokens_per_s": best["tokens_per_s"] if best else None,
            "peak_bytes": best["peak_bytes"] if best else None,
            "fastest_fitting_batch_size": fastest["batch_size"] if fastest else None,
            "fastest_fitting_tokens_per_s": fastest["tokens_per_s"] if fastest else None,
            "largest_tried": max(p["batch_size"] for p in ps),
            "bound": _bound(every, best, budget_bytes),
        }
    base = out.get(baseline, {}).get("tokens_per_s")
    for row in out.values():
        row["tokens_per_s_vs_baseline"] = row["tokens_per_s"] / base if base and row["tokens_per_s"] else None
    return out


def bound_note(row: dict) -> str:
    """What a sweep summary row's largest batch means beyond "the next larger exceeded the budget"."""
    return {"grid": " (grid max: may fit more)",
            "unmeasured": " (the next larger was not measured: may fit more)"}.get(row.get("bound"), "")


def _bound(points: list[dict], best: dict | None, budget_bytes: float) -> str:
    above = sorted((p for p in points if best is None or p["batch_size"] > best["batch_size"]),
                   key=lambda p: p["batch_size"])
    if not above:
        return "grid"
    nxt = above[0]
    if nxt.get("status") in ("oom", "killed", "skipped") or (nxt.get("status") == "ok" and not point_fits(nxt, budget_bytes)):
        return "budget"
    return "unmeasured"


def interpolate_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """Linear interpolation of y at ``x`` over increasing ``xs``; None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            if x1 == x0:
                return float(y1)
            return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return float(ys[0])  # single point equal to x


def curve_at(curve: list[dict[str, float]], key: str, value: float) -> dict[str, float] | None:
    """Loss (and step / time) at ``curve[key] == value``, interpolated between evaluations."""
    xs = [c[key] for c in curve]
    if not xs:
        return None
    out = {}
    for field in ("loss", "step", "time_s"):
        y = interpolate_at(xs, [c[field] for c in curve], value)
        if y is None:
            return None
        out[field] = y
    out["ppl"] = math.exp(out["loss"])
    return out


def quality_summary(
    runs: dict[str, dict[int, list[dict[str, float]]]], equal_steps: int, wall_budget_s: dict[int, float]
) -> dict[str, dict]:
    """Per method, over seeds: held-out loss/ppl at equal steps and at equal wall-clock.

    ``runs[method][seed]`` is the evaluation curve (dicts with step, time_s, loss), starting with the
    evaluation at step 0, time 0. ``wall_budget_s[seed]`` is the baseline's training time to reach
    ``equal_steps`` in that seed. A method that never reached the budget has no wall-clock value.
    """
    out = {}
    for m, seeds in runs.items():
        at_steps, at_time, steps_at_time = [], [], []
        for seed, curve in seeds.items():
            s = curve_at(curve, "step", equal_steps)
            if s is not None:
                at_steps.append(s["loss"])
            t = curve_at(curve, "time_s", wall_budget_s[seed]) if seed in wall_budget_s else None
            if t is not None:
                at_time.append(t["loss"])
                steps_at_time.append(t["step"])
        out[m] = {
            "loss_at_equal_steps": mean_spread(at_steps),
            "ppl_at_equal_steps": mean_spread(math.exp(x) for x in at_steps),
            "loss_at_equal_time": mean_spread(at_time),
            "ppl_at_equal_time": mean_spread(math.exp(x) for x in at_time),
            "steps_at_equal_time": mean_spread(steps_at_time),
        }
    return out

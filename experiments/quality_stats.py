"""Pure summaries of a time-budgeted quality run (experiments.quality): schedule sizing, time to
target, paired comparisons over seeds with exact small-sample tests, seed bands on a time grid, and
the verdict rule of issue 14. Plain Python on lists and dicts: no torch, no files, no clocks.

Curves are lists of evaluations ``{"step", "time_s", "loss"}`` sorted by step, starting at step 0,
time 0. Per-seed values are dicts ``{seed: value}``; a comparison pairs the seeds both sides have.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

TARGET_RATIO = 0.75
"""Issue 14's goal: standard training's final held-out loss in <= 0.75x its wall-clock."""


# ---- schedules ----------------------------------------------------------------------------------


def schedule_steps(step_s: float, base_step_s: float, budget_steps: int, warmup_steps: int, cap: int) -> int:
    """Optimizer steps a method can run in the baseline's time for ``budget_steps`` steps.

    The budget is ``budget_steps * base_step_s``; the method's first ``warmup_steps`` steps (CGGR
    warm-up: every token, the baseline's cost) take ``base_step_s`` each, the rest ``step_s``.
    The count is rounded down, at least 1, at most ``cap``. A method as fast as the baseline gets
    ``budget_steps`` exactly.
    """
    if step_s <= 0 or base_step_s <= 0:
        raise ValueError(f"step times must be > 0, got {step_s} and {base_step_s}")
    budget = budget_steps * base_step_s
    warm = min(int(warmup_steps), budget_steps)
    rest = budget - warm * base_step_s
    n = warm + math.floor(rest / step_s + 1e-9)
    return max(1, min(int(cap), n))


# ---- time to target -----------------------------------------------------------------------------


def first_crossing(curve: Sequence[Mapping[str, float]], target: float, key: str = "time_s") -> float | None:
    """The first ``key`` value (time or step) at which the loss reaches ``target`` (loss <= target),
    linearly interpolated between the two evaluations around the crossing; None if never reached."""
    prev = None
    for point in curve:
        if point["loss"] <= target:
            if prev is None:
                return float(point[key])
            x0, x1, y0, y1 = prev[key], point[key], prev["loss"], point["loss"]
            return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1))
        prev = point
    return None


def final_loss(curve: Sequence[Mapping[str, float]], step: int) -> float:
    """The loss evaluated at exactly ``step`` (the baseline's last scheduled step)."""
    for point in curve:
        if point["step"] == step:
            return float(point["loss"])
    raise ValueError(f"no evaluation at step {step} in the curve")


def time_to_target(
    curves: Mapping[Any, Sequence[Mapping[str, float]]], targets: Mapping[Any, float], budgets: Mapping[Any, float]
) -> dict[str, Any]:
    """Per seed: wall-clock to reach that seed's target, and as a fraction of that seed's budget.

    ``per_seed[seed] = {"time_s": t or None, "ratio": t / budget or None}``; the summary counts the
    seeds that reached it and gives mean/std/max of the ratio over those (None where none did).
    """
    per_seed, ratios = {}, []
    for seed, curve in curves.items():
        if seed not in targets or seed not in budgets:
            continue
        t = first_crossing(curve, targets[seed])
        ratio = None if t is None else t / budgets[seed]
        per_seed[seed] = {"time_s": t, "ratio": ratio}
        if ratio is not None:
            ratios.append(ratio)
    return {
        "per_seed": per_seed,
        "reached": len(ratios),
        "n": len(per_seed),
        "ratio_mean": statistics.fmean(ratios) if ratios else None,
        "ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else None,
        "ratio_max": max(ratios) if ratios else None,
    }


# ---- paired comparisons -------------------------------------------------------------------------


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with integer ``df`` (exact: Abramowitz & Stegun 26.7.3-4)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):  # cos + (2/3) cos^3 + (2*4)/(3*5) cos^5 + ...
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        a = (2.0 / math.pi) * (theta + (s * total if df > 1 else 0.0))
    else:
        total, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):  # 1 + (1/2) cos^2 + (1*3)/(2*4) cos^4 + ...
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        a = s * total
    return min(1.0, max(0.0, 1.0 - a))


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties dropped): twice the smaller binomial(n, 1/2) tail, at most 1."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired(a: Mapping[Any, float | None], b: Mapping[Any, float | None], tie: float = 5e-4) -> dict[str, Any]:
    """``a - b`` over the seeds both have a value for (lower is better for ``a`` when comparing losses).

    Returns n, the per-seed differences, their mean and sample std, ``wins`` (a lower by more than
    ``tie``), ``losses``, ``ties``, the paired t statistic with its exact two-sided p (n >= 2, not for
    zero spread) and the exact two-sided sign-test p.
    """
    seeds = [s for s in a if s in b and a[s] is not None and b[s] is not None]
    d = [float(a[s]) - float(b[s]) for s in seeds]
    out: dict[str, Any] = {"n": len(d), "diffs": dict(zip(seeds, d)), "mean": None, "std": None, "t": None,
                           "p_t": None, "wins": 0, "losses": 0, "ties": 0, "p_sign": None}
    if not d:
        return out
    out["mean"] = statistics.fmean(d)
    out["wins"] = sum(x < -tie for x in d)
    out["losses"] = sum(x > tie for x in d)
    out["ties"] = len(d) - out["wins"] - out["losses"]
    out["p_sign"] = sign_test_p(out["wins"], out["losses"])
    if len(d) > 1:
        out["std"] = statistics.stdev(d)
        if out["std"] > 0:
            out["t"] = out["mean"] / (out["std"] / math.sqrt(len(d)))
            out["p_t"] = t_two_sided_p(out["t"], len(d) - 1)
    return out


def describe_paired(p: Mapping[str, Any], what: str = "loss") -> str:
    """One honest sentence: direction, n, wins/losses, both p-values, and what n allows."""
    n = p["n"]
    if not n:
        return "no paired seeds"
    direction = "lower" if p["mean"] < 0 else "higher" if p["mean"] > 0 else "equal"
    text = f"{what} {direction} by {abs(p['mean']):.3f} on average over n={n} paired seeds ({p['wins']} lower, {p['losses']} higher"
    text += f", {p['ties']} tied)" if p["ties"] else ")"
    parts = []
    if p["p_t"] is not None:
        parts.append("paired t p<0.001" if p["p_t"] < 0.0005 else f"paired t p={p['p_t']:.3f}")
    if p["p_sign"] is not None:
        floor = sign_test_p(n, 0)
        parts.append(f"sign test p={p['p_sign']:.3f}" + (f" (its floor at n={n} is {floor:.3f})" if floor > 0.05 else ""))
    if parts:
        text += "; " + ", ".join(parts)
    sig = p["p_t"] is not None and p["p_t"] < 0.05
    return text + ("; significant at 5% by the t test" if sig else "; not significant at 5%")


# ---- seed bands ---------------------------------------------------------------------------------


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """Linear interpolation of y at ``x`` over increasing ``xs``; None outside their range."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            if xs[i] == xs[i - 1]:
                return float(ys[i])
            return float(ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1]))
    return float(ys[0])


def band(curves: Sequence[Sequence[Mapping[str, float]]], key: str, grid: Sequence[float]) -> dict[str, list]:
    """Mean, min and max over seeds of the loss at each grid value of ``key`` (time_s or step), where
    every seed's curve covers it."""
    out: dict[str, list] = {"x": [], "mean": [], "lo": [], "hi": []}
    for x in grid:
        ys = [interpolate([c[key] for c in cur], [c["loss"] for c in cur], x) for cur in curves]
        if not ys or any(y is None for y in ys):
            continue
        out["x"].append(x)
        out["mean"].append(statistics.fmean(ys))
        out["lo"].append(min(ys))
        out["hi"].append(max(ys))
    return out


# ---- the verdict --------------------------------------------------------------------------------


def meets_goal(ttt: Mapping[str, Any], vs_control: Mapping[str, Any] | None, min_seeds: int = 3) -> dict[str, Any]:
    """Issue 14's goal for one routing method, strictly per seed: in every one of >= ``min_seeds``
    seeds it reaches the baseline's final loss within ``TARGET_RATIO`` of the baseline's time, AND its
    equal-time loss is below its random control's in every paired seed. Returns the parts and ``ok``."""
    ratios = [v["ratio"] for v in ttt["per_seed"].values()]
    fast = len(ratios) >= min_seeds and all(r is not None and r <= TARGET_RATIO for r in ratios)
    beats = None
    if vs_control is not None and vs_control["n"]:
        beats = vs_control["n"] >= min_seeds and vs_control["wins"] == vs_control["n"]
    return {"fast_enough": fast, "beats_control": beats, "ok": bool(fast and beats)}


def rank_rules(summary: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str]) -> list[str]:
    """The routing methods (kind ``cggr``) of a quality summary, closest to the goal first: goal met,
    then fewest seeds that never reached the target, then the lowest mean time-to-target ratio, then
    the lowest paired equal-time loss difference to the baseline."""
    inf = float("inf")

    def key(m: str):
        r = summary[m]
        ttt = r.get("time_to_target") or {}
        vs = (r.get("paired_vs_baseline_time") or {}).get("mean")
        return (not (r.get("goal") or {}).get("ok", False), ttt.get("n", 0) - ttt.get("reached", 0),
                inf if ttt.get("ratio_mean") is None else ttt["ratio_mean"], inf if vs is None else vs)

    return sorted((m for m in summary if kinds.get(m) == "cggr"), key=key)


def best_with_controls(payload: Mapping[str, Any], k: int = 2, baseline: str = "standard_fused") -> list[str]:
    """``[baseline, rule_1, its control, rule_2, its control, ...]`` for the ``k`` best-ranked rules of a
    quality results payload (duplicates dropped): the method list of a follow-up run."""
    kinds = {m: meta["kind"] for m, meta in payload["methods"].items()}
    out = [baseline]
    for m in rank_rules(payload["summary"], kinds)[:k]:
        for x in (m, payload["summary"][m].get("control")):
            if x and x not in out:
                out.append(x)
    return out

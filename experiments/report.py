"""Generate experiments/results/RESULTS.md from the results JSON files (no measurement).

    python -m experiments.report                # reads experiments/results/*.json
    python -m experiments.report --results DIR  # another folder (e.g. a GPU run's $OUT)

Each experiment's section is rebuilt from its JSON: device, shapes, date, load, the table, the plot,
then plain findings against the fair baseline (standard training with the same fused loss), wins
and losses alike. Nothing here is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

from experiments import methods as methods_mod
from experiments import quality_stats as Q
from experiments import results_io as rio
from experiments import stats

ORDER = {"throughput": 0, "sweep": 1, "quality": 2}



def command_line(argv: list[str]) -> str:
    """The command an experiment's JSON records (its ``sys.argv``), as one would type it in a checkout:
    ``python -m experiments.NAME ...`` wherever the recording checkout lay (its absolute path is in
    argv[0]; the one reading the report may be another), and this checkout's path dropped elsewhere."""
    if not argv:
        return ""
    first, rest = argv[0], [a.replace(str(rio.REPO) + "/", "") for a in argv[1:]]
    script = re.fullmatch(r"(?:.*/)?experiments/(\w+)\.py", first)
    head = f"python -m experiments.{script.group(1)}" if script else first.replace(str(rio.REPO) + "/", "")
    return " ".join([head, *rest])

def load_results(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and data.get("kind") in ORDER:
            data["_path"] = path
            if data["kind"] == "sweep":  # from the raw points: files written before a summary field existed get it too
                data["summary"] = stats.sweep_summary(data["raw"]["points"], data["settings"]["memory_budget_bytes"])
            out.append(data)
    return sorted(out, key=lambda d: (d["environment"]["device_tag"] != "cpu", d["experiment"].split("-", 1)[-1] != "tiny",
                                      d["experiment"].split("-", 1)[-1], ORDER[d["kind"]]))


def findings(p: dict) -> list[str]:
    """Plain-language comparisons with the baselines and the controls, from the summary numbers."""
    s, meta = p["summary"], p["methods"]
    lab = {m: meta[m]["label"] for m in meta}
    out = []
    if p["kind"] == "throughput":
        for m, r in s.items():
            if "failed" in r:
                out.append(f"{lab[m]}: FAILED in the timing run ({r['failed'][:200]}).")
                continue
            v = r.get("speedup_vs_standard_fused")
            if m == methods_mod.BASELINE or v is None:
                continue
            word = "faster than" if v > 1.02 else "slower than" if v < 0.98 else "level with"
            out.append(f"{lab[m]}: {v:.2f}x the step rate of standard (fused loss): {word} it.")
        for a, b in (("cggr_combined", "random_token"), ("cggr_sequence", "random_sequence")):
            if a in s and b in s and "median_step_s" in s[a] and "median_step_s" in s[b]:
                out.append(f"{lab[a]} vs its control {lab[b]}: {s[b]['median_step_s'] / s[a]['median_step_s']:.2f}x "
                           "(the router's cost shows here: both keep the same number of tokens/sequences).")
    elif p["kind"] == "sweep":
        base = s.get(methods_mod.BASELINE, {})
        for m, r in s.items():
            if m == methods_mod.BASELINE:
                continue
            if r["best_batch_size"] is None:
                out.append(f"{lab[m]}: no batch size fits the budget.")
                continue
            v = r["tokens_per_s_vs_baseline"]
            out.append(f"{lab[m]}: largest batch within budget {r['best_batch_size']}{stats.bound_note(r)} "
                       f"(standard fused: {base.get('best_batch_size')}), tokens/s there "
                       + (f"{v:.2f}x the baseline's." if v else "—."))
    elif p["kind"] == "quality":
        out += quality_findings(p)
    return out


def quality_findings(p: dict) -> list[str]:
    """Per method: equal-time and equal-steps Δ against the baseline and its control as paired
    statements with n and p, time to the baseline's final loss, and the issue-14 goal check."""
    s, meta = p["summary"], p["methods"]
    lab = {m: meta[m]["label"] for m in meta}
    if methods_mod.BASELINE not in s:
        return []
    out = []
    for m, r in s.items():
        if m == methods_mod.BASELINE:
            continue
        parts = []
        vs = r.get("paired_vs_baseline_time")
        if vs and vs.get("n"):
            parts.append("at equal wall-clock, " + Q.describe_paired(vs, "held-out loss") + " vs standard")
        elif r.get("loss_at_equal_time_minus_baseline") is not None:  # results of the earlier protocol
            parts.append(f"at equal wall-clock Δ loss {r['loss_at_equal_time_minus_baseline']:+.3f} vs standard")
        else:
            parts.append("no equal-time value (its step cap came before the baseline's time)")
        ctrl = r.get("paired_vs_control_time")
        if ctrl and ctrl.get("n"):
            parts.append(f"vs its control {lab.get(r['control'], r['control'])}: " + Q.describe_paired(ctrl, "loss"))
        ttt = r.get("time_to_target")
        if ttt and ttt.get("n"):
            if ttt["reached"]:
                parts.append(f"reached standard's final loss in {ttt['reached']}/{ttt['n']} seeds, at "
                             f"{ttt['ratio_mean']:.2f}x standard's time on average (worst {ttt['ratio_max']:.2f}x)")
            else:
                parts.append(f"did not reach standard's final loss within the run in any of {ttt['n']} seeds")
        goal = r.get("goal")
        if goal is not None:
            parts.append("meets the goal (<= 0.75x time in every seed and ahead of its control in every seed)"
                         if goal["ok"] else "does not meet the goal")
        out.append(f"{lab[m]}: " + "; ".join(parts) + ".")
    return out


def verdict_rows(p: dict) -> list[dict]:
    """One row per routing method of a quality result, best first: what the README verdict needs."""
    s, meta = p["summary"], p["methods"]
    rows = []
    for m, r in s.items():
        if meta[m]["kind"] != "cggr":
            continue
        ttt = r.get("time_to_target") or {}
        goal = r.get("goal") or {}
        resolved = meta[m].get("overrides", [])  # the base overrides, then the method's own
        own = resolved[len(resolved) - len(methods_mod.METHODS[m].overrides):] if m in methods_mod.METHODS else resolved
        own = [o for o in own if o.startswith("cggr.")]
        rows.append({"method": m, "label": meta[m]["label"], "overrides": own, "ttt": ttt,
                     "vs_std": r.get("paired_vs_baseline_time"), "vs_control": r.get("paired_vs_control_time"),
                     "control": r.get("control"), "ok": bool(goal.get("ok"))})
    order = Q.rank_rules(s, {m: meta[m]["kind"] for m in meta})
    return sorted(rows, key=lambda x: order.index(x["method"]))


def _p(value: float) -> str:
    """A p-value to two decimals; below 0.01 said as such (not 'p=0.00')."""
    return "p<0.01" if value < 0.005 else f"p={value:.2f}"


def _unfinished_note(p: dict, m: str) -> str:
    """A clause for a method whose LR schedule was not done at W (see quality_report)."""
    from experiments.quality_report import SCHEDULE_DONE_AT_LEAST, schedule_done_at_budget

    r = schedule_done_at_budget(p).get(m)
    if not r or r["fraction_min"] >= SCHEDULE_DONE_AT_LEAST:
        return ""
    return (f"; its LR schedule was only {math.floor(100 * r['fraction_min'])}% done at standard's time in its worst "
            "seed, so its equal-time loss is read before the decay ended")


def _controls_ahead(p: dict) -> str:
    """A sentence on the random controls that ended below standard at equal time in every seed: not a
    selection rule, but a measured fact a user should see next to "none". Why, from the numbers: more
    steps in the same time (fewer rows per step), or a lower loss already at equal steps."""
    s, meta = p["summary"], p["methods"]
    base_steps = ((s.get(methods_mod.BASELINE) or {}).get("steps_at_equal_time") or {}).get("mean")
    found, faster, per_step = [], [], []
    for m, r in s.items():
        pv = r.get("paired_vs_baseline_time") or {}
        if meta[m]["kind"] != "control" or not pv.get("n") or pv.get("wins") != pv["n"] or pv["mean"] >= 0:
            continue
        t = r.get("time_to_target") or {}
        reach = (f", standard's final loss at {t['ratio_mean']:.2f}x its time ({t['reached']}/{t['n']} seeds)"
                 if t.get("reached") else "")
        p_t = f", t-test {_p(pv['p_t'])}" if pv.get("p_t") is not None else ""
        found.append(f"{meta[m]['label']} ({pv['mean']:+.3f} at equal time, {pv['wins']}/{pv['n']} seeds lower"
                     f"{p_t}{reach}{_unfinished_note(p, m)})")
        steps = (r.get("steps_at_equal_time") or {}).get("mean")
        if base_steps is not None and steps is not None and steps > base_steps:
            faster.append(meta[m]["label"])
        else:
            eq = r.get("paired_vs_baseline_steps") or {}
            per_step.append(f"{meta[m]['label']} ran {steps:.0f} steps in that time against standard's "
                            f"{base_steps:.0f}" + (f" and was {eq['mean']:+.3f} at equal steps" if eq.get("n") else "")
                            if steps is not None and base_steps is not None else meta[m]["label"])
    if not found:
        return ""
    why = []
    if faster:
        why.append(("It scores nothing: " if len(faster) == len(found) else f"{', '.join(faster)} scores nothing: ")
                   + "it trains fewer rows per step and so takes more steps in the same time, an effect of the "
                     "batch size, not of a selection rule (compare a smaller `data.batch_size`).")
    if per_step:
        why.append("Not from more steps: " + "; ".join(per_step) + " — a per-step effect of training on a random "
                   "subset, not of a selection rule.")
    return " Random selection did better than standard here: " + "; ".join(found) + ". " + " ".join(why)


def verdict_block(results: list[dict]) -> str:
    """The README's verdict: per quality result (shape), a paragraph and a table, from the numbers only."""
    quality = [r for r in results if r["kind"] == "quality" and r.get("protocol") == "time-budget"]
    if not quality:
        return ("No time-budgeted quality results yet (`bash experiments/quality_suite.sh`); until then there is "
                "no measured reason to prefer any routing configuration over standard training.")
    lines, winners = [], {}
    for r in quality:
        shape = r["experiment"].split("-", 1)[-1]
        rows = verdict_rows(r)
        n = len(r["settings"]["seeds"])
        where = f"{shape} ({r['shape']['model']}, {r['environment']['device_tag']}, {n} seed{'s' if n != 1 else ''})"
        best = rows[0] if rows else None
        if best and best["ok"]:
            winners[shape] = best
            lines.append(f"- **{where}: pick `{' '.join(best['overrides'])}`** ({best['label']}): standard's final "
                         f"held-out loss in {best['ttt']['ratio_mean']:.2f}x its wall-clock (worst seed "
                         f"{best['ttt']['ratio_max']:.2f}x), ahead of its random control at equal time in every seed"
                         f"{_unfinished_note(r, best['method'])}.")
        else:
            near = next((x for x in rows if x["ttt"].get("reached")), None)
            lines.append(f"- **{where}: none** — no routing configuration reached standard training's final held-out "
                         f"loss within {Q.TARGET_RATIO}x its wall-clock in every seed while beating its random control; "
                         + (f"the closest, {near['label']}, reached it in {near['ttt']['reached']}/{near['ttt']['n']} "
                            f"seeds at {near['ttt']['ratio_mean']:.2f}x on average{_unfinished_note(r, near['method'])}. "
                            if near else
                            "none reached it within the run at all. ")
                         + "Use standard training (`cggr.enabled=false`)."
                         + _controls_ahead(r))
    header = ["shape", "configuration", "time to std's final loss (x std)", "Δ loss @ equal time vs std",
              "Δ vs its random control", "goal met"]
    table = []
    for r in quality:
        shape = r["experiment"].split("-", 1)[-1]
        for x in verdict_rows(r):
            t = x["ttt"]
            ttt = (f"{t['ratio_mean']:.2f}x ({t['reached']}/{t['n']} seeds)" if t.get("reached")
                   else f"not reached (0/{t.get('n', 0)})")
            d = lambda pr: None if not pr or not pr.get("n") else (
                f"{pr['mean']:+.3f} ({pr['wins']}/{pr['n']} lower" + (f", t-test {_p(pr['p_t'])}" if pr.get("p_t") is not None else "") + ")")
            table.append([shape, x["label"], ttt, d(x["vs_std"]), d(x["vs_control"]), "yes" if x["ok"] else "no"])
    both = [s for s in ("mid", "smollm2") if s in winners]
    default = ("The default `cggr` config stays the upstream PR's (combined score, ratio 0.25, warmup 10): "
               + ("no measured rule dominates it." if len(both) < 2 else
                  f"but {winners['mid']['label']} met the goal on both the mid-size model and SmolLM2 "
                  f"(`{' '.join(winners['mid']['overrides'])}`); it ships as a named option."))
    return "\n".join(["Which configuration to pick for speed at equal quality (measured; goal: standard's final "
                      f"held-out loss in <= {Q.TARGET_RATIO}x its wall-clock in every seed, and lower equal-time loss "
                      "than random selection of the same size in every seed):", "", *lines, "", default, "",
                      rio.md_table(header, table)])


def _at_least(row: dict) -> str:
    return ">= " if row.get("bound") == "unmeasured" and row.get("best_batch_size") else ""


def headline(results: list[dict]) -> str:
    """One row per (shape, device, method): speed, memory-budget and quality against the fair baseline."""
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results:
        shape = r["experiment"].split("-", 1)[-1]
        groups.setdefault((shape, r["environment"]["device_tag"]), {})[r["kind"]] = r
    header = ["shape", "device", "method", "step rate vs std fused", "largest batch in budget (std fused)",
              "Δ loss @ equal steps", "Δ loss @ equal time", "time to std's final loss"]
    rows = []
    for (shape, dev), kinds in sorted(groups.items(), key=lambda kv: (kv[0][1] != "cpu", kv[0][0] != "tiny", kv[0][0])):
        methods = []
        for r in kinds.values():
            methods += [m for m in r["methods"] if m not in methods]
        for m in methods:
            t = (kinds.get("throughput") or {}).get("summary", {}).get(m, {})
            sw = (kinds.get("sweep") or {}).get("summary", {})
            q = (kinds.get("quality") or {}).get("summary", {}).get(m, {})
            label = next(r["methods"][m]["label"] for r in kinds.values() if m in r["methods"])
            speed = t.get("speedup_vs_standard_fused")
            bs = (sw.get(m) or {}).get("best_batch_size")
            base_bs = (sw.get(methods_mod.BASELINE) or {}).get("best_batch_size")

            def dq(key, paired):
                d = q.get(f"{key}_minus_baseline")
                sd = (q.get(paired) or {}).get("std")  # of the per-seed differences, not of the loss
                if d is None:
                    return None
                return f"{0.0 if abs(d) < 5e-4 else d:+.3f}" + (f" (± {sd:.3f})" if sd else "")

            if speed is None and bs is None and not q:
                continue
            ttt = q.get("time_to_target") or {}
            rows.append([shape, dev, label, None if speed is None else f"{speed:.2f}x",
                         None if m not in sw else f"{_at_least(sw[m])}{bs or 'none'} ({base_bs or 'none'})",
                         dq("loss_at_equal_steps", "paired_vs_baseline_steps"),
                         dq("loss_at_equal_time", "paired_vs_baseline_time"),
                         None if not ttt.get("n") else (f"{ttt['ratio_mean']:.2f}x ({ttt['reached']}/{ttt['n']})"
                                                        if ttt["reached"] else f"not reached (0/{ttt['n']})")])
    return rio.md_table(header, rows)


def render(results: list[dict], folder: Path) -> str:
    from experiments import quality_report, sweep, throughput

    fmt = {"throughput": throughput.markdown, "sweep": sweep.markdown, "quality": quality_report.markdown}
    lines = [
        "# Results",
        "",
        "Generated by `python -m experiments.report` from the JSON files in this folder (each holds the full",
        "resolved config of every method, versions, hardware and every raw figure). Reproduce a table with the",
        "command in its section. Ratios are against **standard training with the same fused loss** (the fair",
        "baseline) unless said otherwise; the controls keep the same number of tokens or sequences as CGGR, chosen",
        "at random.",
        "",
    ]
    # The 1-minute load average includes the benchmark's own threads (torch's, one per core on CPU):
    # more than one above the CPU count means someone else was running too.
    loaded = [r for r in results if (r["environment"].get("load") or {}).get("max", 0)
              > (r["environment"]["hardware"]["cpu_count"] or 1) + 1]
    lines += ["Load averages quoted in each section include the benchmark's own threads (on CPU, one per core).", ""]
    if loaded:
        lines += ["**Load warning:** these runs shared the machine (1-minute load average more than one above its",
                  "CPU count at some point): " + ", ".join(f"{r['experiment']} (max {r['environment']['load']['max']})" for r in loaded)
                  + ". Interleaving and medians protect ratios, not absolute times.", ""]
    if all(r["environment"]["device_tag"] == "cpu" for r in results):
        lines += ["**No GPU results yet**: every table here is from a CPU. `bash experiments/gpu_suite.sh` runs the GPU",
                  "versions (one H100, <= 8 min) and writes an archive to fold in here.", ""]
    lines += ["## Headline", "",
              "Step rate: > 1 is faster than standard training with the same fused loss (equal batch). "
              "Δ loss: held-out loss on all tokens minus the fair baseline's (< 0 is better; ± is the sample sd "
              "over seeds of the per-seed difference, where there were several seeds). Details, shapes and raw figures below.", "",
              headline(results), ""]
    if any(r["kind"] == "quality" and r.get("protocol") == "time-budget" for r in results):
        lines += ["## Verdict", "", verdict_block(results), ""]
    notes = folder / NOTES_FILE
    if notes.is_file():  # the one hand-written part: what the numbers changed, read against earlier runs
        lines += [notes.read_text().strip(), ""]
    for r in results:
        env = r["environment"]
        cmd = command_line(env.get("argv") or [])
        table = fmt[r["kind"]](r)
        r["_path"].with_suffix(".md").write_text(table + "\n")  # the per-experiment table, same text
        lines += [f"## {r['experiment']} — {env['device_tag']}", "", f"Command: `{cmd}`  ",
                  f"Commit {str(env.get('git_commit'))[:10]}{' (+ uncommitted changes)' if env.get('git_tree_dirty') else ''}; "
                  f"versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + ".", ""]
        lines += [f"Corrected after the run: {c}" for c in r.get("corrections") or ()] + ([""] if r.get("corrections") else [])
        lines += [table, ""]
        png = r["_path"].with_suffix(".png")
        if png.exists():
            lines += [f"![{r['experiment']}]({png.name})", ""]
        f = findings(r)
        if f:
            lines += ["Findings:", ""] + [f"- {x}" for x in f] + [""]
    others = sorted(p.name for p in folder.glob("*.md")
                    if p.name not in ("RESULTS.md", NOTES_FILE) and not any(p.stem == r["_path"].stem for r in results))
    if others:
        lines += ["## Other result files in this folder", "",
                  *[f"- [{n}]({n}) (written by its own script; not generated here)" for n in others], ""]
    return "\n".join(lines)


def make_plots(results: list[dict]) -> None:
    """(Re)draw each sweep's and quality run's PNG beside its JSON, when matplotlib is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: matplotlib is not installed; plots not drawn (pip install matplotlib)", file=sys.stderr)
        return
    from experiments import quality_report, sweep

    for r in results:
        draw = {"sweep": sweep.plot, "quality": quality_report.plot}.get(r["kind"])
        if draw:
            draw(r, r["_path"].with_suffix(".png"))


NOTES_FILE = "NOTES.md"
"""A hand-written section (e.g. which findings changed since earlier runs), included in RESULTS.md as is."""

README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
VERDICT_START, VERDICT_END = "<!-- verdict:start -->", "<!-- verdict:end -->"


README_METHODS = ("standard_naive", "standard_fused", "cggr_combined", "random_token", "cggr_sequence",
                  "cggr_sequence_stride4", "random_sequence", "importance_token", "importance_sequence",
                  "infobatch_token", "rho_token", "rho_sequence")
"""The README's rows (RESULTS.md has every method): the baselines, the upstream rule (and its
sequence form scored from every 4th token), the rules of issue 14 and the random controls they are
judged against."""


def readme_table(results: list[dict]) -> str:
    """Methods x shapes: per shape, the step rate against standard (fused loss) from the throughput run
    and, from the quality run, the held-out loss at equal time minus standard's and the time to reach
    standard's final loss (x standard's time, seeds that reached it)."""
    shapes: dict[str, dict[str, dict]] = {}
    for r in results:
        if r["environment"]["device_tag"] == "cpu":
            shapes.setdefault(r["experiment"].split("-", 1)[-1], {})[r["kind"]] = r
    order = sorted(shapes, key=lambda n: (n != "tiny", n != "mid", n))
    header = ["method", *[f"{n}: step rate / Δ loss @ equal time / time to std's loss" for n in order]]
    rows = []
    for m in README_METHODS:
        cells, label = [], None
        for n in order:
            kinds = shapes[n]
            t = (kinds.get("throughput") or {}).get("summary", {}).get(m) or {}
            q = (kinds.get("quality") or {}).get("summary", {}).get(m) or {}
            for r in kinds.values():
                label = label or (r["methods"].get(m) or {}).get("label")
            bits = []
            if t.get("speedup_vs_standard_fused") is not None:
                bits.append(f"{t['speedup_vs_standard_fused']:.2f}x")
            elif q:  # keep the columns in place: step rate, Δ loss, time to target
                bits.append("—")
            if q:
                d = q.get("loss_at_equal_time_minus_baseline")
                bits.append("—" if d is None else f"{0.0 if abs(d) < 5e-4 else d:+.3f}")
                ttt = q.get("time_to_target") or {}
                if ttt.get("n"):
                    bits.append(f"{ttt['ratio_mean']:.2f}x ({ttt['reached']}/{ttt['n']})" if ttt["reached"]
                                else f"not reached (0/{ttt['n']})")
            cells.append(" / ".join(bits) if bits else None)
        if any(cells):
            rows.append([label or m, *cells])
    # a shape whose runs give none of these (e.g. only a batch-size sweep) gets no column
    keep = [0, *[i + 1 for i in range(len(order)) if any(row[i + 1] for row in rows)]]
    return rio.md_table([header[i] for i in keep], [[row[i] for i in keep] for row in rows])


def readme_block(results: list[dict]) -> str:
    """The README's results: which runs, on what, when; the shapes; the compact methods x shapes table."""
    runs = []
    for r in results:
        env = r["environment"]
        runs.append(f"`{r['experiment']}` ({env['device_tag']}, {env.get('date_utc', '?')})")
    return "\n".join(["Runs: " + ", ".join(sorted(runs)) + ". Shapes: " + shapes_line(results) + ".", "",
                      readme_table(results), "",
                      "Step rate: median step time of standard training (fused loss) / the method's, at equal "
                      "batch (> 1 is faster). Δ loss: held-out loss on every token at standard's wall-clock "
                      "budget minus standard's, mean over seeds (< 0 is better). Time to std's loss: "
                      "wall-clock to standard's final held-out loss, as a multiple of standard's time (seeds "
                      "that reached it). Every other method, the spreads and the tests: RESULTS.md."])


def shapes_line(results: list[dict]) -> str:
    """Per shape name (and device, where a name ran elsewhere than the CPU: the GPU runs of a name
    may use another tokenizer or size), read from the results themselves: model, throughput and
    quality shapes, and the kept ratio and router depth (beside each shape where they differ)."""
    by_shape: dict[str, dict[str, dict]] = {}
    for r in results:
        name, tag = r["experiment"].split("-", 1)[-1], (r.get("environment") or {}).get("device_tag", "cpu")
        by_shape.setdefault(name if tag == "cpu" else f"{name} ({tag})", {})[r["kind"]] = r

    def routing(rs) -> tuple:
        return tuple(sorted({(r["shape"]["min_tokens_ratio"], r["shape"]["router_layers"]) for r in rs}))

    def said(pairs) -> list[str]:
        return [f"kept ratio {a}, {b}-layer router" for a, b in pairs]

    counts = Counter(routing(kinds.values()) for kinds in by_shape.values())
    usual = max(counts, key=lambda k: (counts[k], k)) if counts else ()
    parts = []
    for name, kinds in sorted(by_shape.items(), key=lambda kv: (not kv[0].startswith("tiny"), kv[0])):
        first = next(iter(kinds.values()))["shape"]
        model = first["model"] + (" (random init)" if first["model_source"] == "random" else f" ({first['model_source']})")
        bits = [model]
        if "throughput" in kinds:
            t = kinds["throughput"]["shape"]
            bits.append(f"{t['batch_size']}x{t['block_size']} tokens")
        if "quality" in kinds:
            q = kinds["quality"]
            seeds = len(q["settings"]["seeds"])
            bits.append(f"quality {q['shape']['batch_size']}x{q['shape']['block_size']}, "
                        f"{seeds} seed{'s' if seeds != 1 else ''}, {q['settings']['steps']} steps")
        if routing(kinds.values()) != usual:
            bits += said(routing(kinds.values()))
        parts.append(f"{name} = " + ", ".join(bits))
    tail = "; ".join(said(usual)) + (" (where not said)" if len(counts) > 1 else "")
    return "; ".join(parts) + (f"; {tail}" if usual else "")


def _replace_between(text: str, start: str, end: str, body: str) -> str | None:
    if start not in text or end not in text:
        return None
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + start + "\n" + body + "\n" + end + tail


def update_readme(path: Path, results: list[dict]) -> bool:
    """Replace the text between the README's results markers (and its verdict markers, where present);
    False when the results markers are absent."""
    text = _replace_between(path.read_text(), README_START, README_END, readme_block(results))
    if text is None:
        return False
    text = _replace_between(text, VERDICT_START, VERDICT_END, verdict_block(results)) or text
    path.write_text(text)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--results", default=str(rio.RESULTS_DIR), help="folder of results JSON files")
    ap.add_argument("--output", default=None, help="markdown file to write (default <results>/RESULTS.md)")
    ap.add_argument("--readme", default=None,
                    help="README whose results block (between its markers) is regenerated; '' to skip "
                         "(default: the repository's README, only when --results is experiments/results)")
    args = ap.parse_args(argv)
    folder = Path(args.results)
    if args.readme is None:  # a rehearsal or GPU folder must never overwrite the committed summary
        committed = folder.resolve() == Path(rio.RESULTS_DIR).resolve()
        args.readme = str(Path(__file__).resolve().parent.parent / "README.md") if committed else ""
    results = load_results(folder)
    if not results:
        print(f"error: no results JSON in {folder}", file=sys.stderr)
        return 2
    make_plots(results)
    out = Path(args.output) if args.output else folder / "RESULTS.md"
    out.write_text(render(results, folder) + "\n")
    print(f"wrote {out} ({len(results)} experiments)", file=sys.stderr)
    if args.readme and update_readme(Path(args.readme), results):
        print(f"updated the results block of {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

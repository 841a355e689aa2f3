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
import sys
from pathlib import Path

from experiments import methods as methods_mod
from experiments import results_io as rio

ORDER = {"throughput": 0, "sweep": 1, "quality": 2}


def load_results(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and data.get("kind") in ORDER:
            data["_path"] = path
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
            grid_max = r["best_batch_size"] == max(p["settings"]["batch_sizes"])
            out.append(f"{lab[m]}: largest batch within budget {r['best_batch_size']}"
                       f"{' (the largest tried)' if grid_max else ''} "
                       f"(standard fused: {base.get('best_batch_size')}), tokens/s there "
                       + (f"{v:.2f}x the baseline's." if v else "—."))
    elif p["kind"] == "quality":
        base = s.get(methods_mod.BASELINE)
        for m, r in s.items():
            if m == methods_mod.BASELINE or base is None:
                continue
            parts = []
            for key, what in (("loss_at_equal_steps", "equal steps"), ("loss_at_equal_time", "equal wall-clock")):
                d = r.get(f"{key}_minus_baseline")
                if d is None:
                    parts.append(f"{what}: no value" + (" (its step cap, --max-factor x --steps, came before the "
                                                        "baseline's time)" if key == "loss_at_equal_time" else ""))
                    continue
                d = 0.0 if abs(d) < 5e-4 else d
                spread = max(x for x in ((r[key] or {}).get("std") or 0.0, (base[key] or {}).get("std") or 0.0))
                verdict = "better" if d < 0 else "worse" if d > 0 else "equal"
                if spread and abs(d) <= spread:
                    verdict += ", within the seed spread"
                elif (r[key] or {}).get("n") == 1:
                    verdict += ", one seed"
                parts.append(f"{what}: Δ loss {d:+.3f} ({verdict})")
            out.append(f"{lab[m]}: " + "; ".join(parts) + ".")
        for a, b in (("cggr_combined", "random_token"), ("cggr_sequence", "random_sequence")):
            if a in s and b in s:
                for key, what in (("loss_at_equal_steps", "equal steps"), ("loss_at_equal_time", "equal wall-clock")):
                    x, y = (s[a][key] or {}).get("mean"), (s[b][key] or {}).get("mean")
                    if x is not None and y is not None:
                        word = "beats" if x < y else "loses to" if x > y else "ties"
                        out.append(f"At {what}, {lab[a]} {word} its control {lab[b]} ({x:.3f} vs {y:.3f}).")
    return out


def headline(results: list[dict]) -> str:
    """One row per (shape, device, method): speed, memory-budget and quality against the fair baseline."""
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results:
        shape = r["experiment"].split("-", 1)[-1]
        groups.setdefault((shape, r["environment"]["device_tag"]), {})[r["kind"]] = r
    header = ["shape", "device", "method", "step rate vs std fused", "largest batch in budget (std fused)",
              "Δ loss @ equal steps", "Δ loss @ equal time"]
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

            def dq(key):
                d = q.get(f"{key}_minus_baseline")
                sd = (q.get(key) or {}).get("std")
                if d is None:
                    return None
                return f"{0.0 if abs(d) < 5e-4 else d:+.3f}" + (f" (± {sd:.3f})" if sd else "")

            if speed is None and bs is None and not q:
                continue
            rows.append([shape, dev, label, None if speed is None else f"{speed:.2f}x",
                         None if m not in sw else f"{bs or 'none'} ({base_bs or 'none'})",
                         dq("loss_at_equal_steps"), dq("loss_at_equal_time")])
    return rio.md_table(header, rows)


def render(results: list[dict], folder: Path) -> str:
    from experiments import quality, sweep, throughput

    fmt = {"throughput": throughput.markdown, "sweep": sweep.markdown, "quality": quality.markdown}
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
              "Δ loss: held-out loss on all tokens minus the fair baseline's (< 0 is better; ± is the seed "
              "spread where there were several seeds). Details, shapes and raw figures below.", "",
              headline(results), ""]
    for r in results:
        env = r["environment"]
        argv = " ".join(env.get("argv") or [])
        cmd = argv.replace(str(rio.REPO) + "/", "")
        if cmd.startswith("experiments/") and cmd.split()[0].endswith(".py"):
            first, *rest = cmd.split()
            cmd = "python -m " + first[:-3].replace("/", ".") + (" " + " ".join(rest) if rest else "")
        table = fmt[r["kind"]](r)
        r["_path"].with_suffix(".md").write_text(table + "\n")  # the per-experiment table, same text
        lines += [f"## {r['experiment']} — {env['device_tag']}", "", f"Command: `{cmd}`  ",
                  f"Commit {str(env.get('git_commit'))[:10]}{' (+ uncommitted changes)' if env.get('git_tree_dirty') else ''}; "
                  f"versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + ".", "",
                  table, ""]
        png = r["_path"].with_suffix(".png")
        if png.exists():
            lines += [f"![{r['experiment']}]({png.name})", ""]
        f = findings(r)
        if f:
            lines += ["Findings:", ""] + [f"- {x}" for x in f] + [""]
    others = sorted(p.name for p in folder.glob("*.md")
                    if p.name != "RESULTS.md" and not any(p.stem == r["_path"].stem for r in results))
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
    from experiments import quality, sweep

    for r in results:
        draw = {"sweep": sweep.plot, "quality": quality.plot}.get(r["kind"])
        if draw:
            draw(r, r["_path"].with_suffix(".png"))


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def readme_block(results: list[dict]) -> str:
    """The README's results table: which runs, on what, when; then the headline rows."""
    runs = []
    for r in results:
        env = r["environment"]
        runs.append(f"`{r['experiment']}` ({env['device_tag']}, {env.get('date_utc', '?')})")
    return "\n".join(["Runs: " + ", ".join(sorted(runs)) + ". Shapes: " + shapes_line(results) + ".", "",
                      headline(results)])


def shapes_line(results: list[dict]) -> str:
    """Per shape name, read from the results themselves: model, throughput and quality shapes."""
    by_shape: dict[str, dict[str, dict]] = {}
    for r in results:
        by_shape.setdefault(r["experiment"].split("-", 1)[-1], {})[r["kind"]] = r
    parts = []
    for name, kinds in sorted(by_shape.items(), key=lambda kv: (kv[0] != "tiny", kv[0])):
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
        parts.append(f"{name} = " + ", ".join(bits))
    ratios = sorted({(r["shape"]["min_tokens_ratio"], r["shape"]["router_layers"]) for r in results})
    tail = "; ".join(f"kept ratio {a}, {b}-layer router" for a, b in ratios)
    return "; ".join(parts) + (f"; {tail}" if tail else "")


def update_readme(path: Path, results: list[dict]) -> bool:
    """Replace the text between the README's results markers; False when the markers are absent."""
    text = path.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(head + README_START + "\n" + readme_block(results) + "\n" + README_END + tail)
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

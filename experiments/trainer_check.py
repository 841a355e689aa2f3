"""``perf.compile`` under the Trainer: the user's command, once per setting, compared side by side.

The throughput benchmark drives the product's step (experiments.bench.Runner) without Lightning's
loop; this runs ``python -m lightning_cggr.train`` itself -- Lightning's optimizer step, clipping,
logging, validation and checkpoints included -- once per ``perf.compile`` setting, each in a fresh
process (as a user runs it), with the same config, seed and batches otherwise. From each run's
``metrics.csv`` (logged every step here: each value is then a window of one step between two
device syncs, see lightning_cggr.module; the user's default logs every 10) it reports the median ``train/tokens_per_sec`` and
``train/mfu`` over the steps after ``--skip`` (compilation happens in the first ones), the final
``val/loss`` (settings must agree up to kernel rounding), the process's wall time start to exit
(compilation included) and its exit status::

    python -m experiments.trainer_check --settings false,true,reduce-overhead --steps 60 \\
        trainer=gpu model.hidden_size=576 model.num_layers=30 model.num_heads=9 \\
        model.intermediate_size=1536 data.batch_size=8 data.block_size=2048

A setting may carry more overrides after colons, e.g. ``true:perf.compile_dynamic=false`` (the
compiled blocks specialized to each batch size) or ``true:trainer.log_every_n_steps=10`` (the
default interval: a device sync every 10 steps instead of every step, each value a 10-step window;
a setting's overrides come after the fixed ones), and may repeat (``false`` first and last shows how
far the machine drifted between runs; ratios are to the first ``false``). Writes
``<out>/trainer_check-<device>.{json,md}``.
Settings run one after another, never at once.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.compose import at_least, pick_device
from experiments.results_io import environment, md_table, publish
from experiments.stats import median


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric column of the run's ``metrics.csv`` as (step, value) pairs."""
    files = sorted(run_dir.rglob("metrics.csv"))
    if not files:
        return {}
    out: dict[str, list[tuple[int, float]]] = {}
    with files[0].open() as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key == "step" or value in (None, ""):
                    continue
                try:
                    out.setdefault(key, []).append((step, float(value)))
                except ValueError:
                    continue
    return out


def summarize(metrics: dict, skip: int) -> dict:
    def after(key):
        return [v for s, v in metrics.get(key, []) if s >= skip and math.isfinite(v)]

    tps, mfu = after("train/tokens_per_sec"), after("train/mfu")
    val = metrics.get("val/loss", [])
    return dict(tokens_per_sec=median(tps) if tps else None, mfu=median(mfu) if mfu else None,
                steps_timed=len(tps), final_val_loss=val[-1][1] if val else None,
                final_step=max((s for s, _ in metrics.get("train/loss", [])), default=None))


def setting_overrides(setting: str) -> list[str]:
    """``VALUE[:KEY=V...]``: perf.compile=VALUE and the extra overrides of one setting."""
    value, *extra = setting.split(":")
    for o in extra:
        if "=" not in o:
            raise SystemExit(f"--settings: {o!r} in {setting!r} is not an override KEY=VALUE")
    return [f"perf.compile={value}", *extra]


def run_setting(setting: str, overrides: list[str], steps: int, out_dir: Path, timeout: float, index: int = 0) -> dict:
    """Run ``setting`` (the ``index``-th of the list: each run has its own folder, so a setting may
    repeat, e.g. eager first and last to see how much the machine drifted)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in setting)
    run_dir = out_dir / f"{index:02d}_compile_{safe}"
    # the setting's own overrides last: `true:trainer.log_every_n_steps=10` times the default interval
    cmd = [sys.executable, "-m", "lightning_cggr.train", *overrides,
           f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.log_every_n_steps=1",
           "trainer.enable_progress_bar=false", "logger=csv", f"output_dir={run_dir}", f"hydra.run.dir={run_dir}",
           *setting_overrides(setting)]
    env = {**os.environ, "TORCH_LOGS": os.environ.get("TORCH_LOGS", "recompiles,graph_breaks")}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", str(e)
    return dict(setting=setting, rc=rc, wall_s=round(time.perf_counter() - t0, 1), command=" ".join(cmd[1:]),
                log_tail=text[-1500:] if rc != 0 else "", run_dir=str(run_dir), **compile_events(text))


def compile_events(log: str) -> dict:
    """From a run's output under ``TORCH_LOGS=recompiles,graph_breaks``: how many times a compiled
    function was compiled again and how many graph breaks torch reported, with the first reasons."""
    lines = [re.sub(r"^.*\[__\w+\]\s*", "", line).strip() for line in log.splitlines()]  # torch's log prefix
    recompiles = [i for i, line in enumerate(lines) if line.startswith("Recompiling function")]
    breaks = [line for line in lines if "Graph break" in line]
    reasons = []
    for i in recompiles[:4]:  # "triggered by the following guard failure(s):" and "- guard" lines follow
        j = i + 1
        while j < len(lines) and (lines[j].startswith("triggered by") or lines[j].startswith("- ")):
            j += 1
        reasons.append(" ".join(lines[i:j])[:400])
    return dict(recompiles=len(recompiles), graph_breaks=len(breaks), recompile_reasons=reasons,
                graph_break_lines=[b[:300] for b in breaks[:4]])


def markdown(p: dict) -> str:
    rows = []
    base = next((r for r in p["runs"] if r["setting"] == "false" and r.get("tokens_per_sec")), None)
    for r in p["runs"]:
        ratio = (r["tokens_per_sec"] / base["tokens_per_sec"]) if base and r.get("tokens_per_sec") else None
        rows.append([r["setting"], r["rc"], r.get("final_step"), r.get("steps_timed"),
                     None if r.get("tokens_per_sec") is None else f"{r['tokens_per_sec']:.0f}",
                     None if ratio is None else f"{ratio:.2f}x",
                     None if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
                     None if r.get("final_val_loss") is None else f"{r['final_val_loss']:.4f}", r["wall_s"],
                     r.get("recompiles"), r.get("graph_breaks")])
    env = p["environment"]
    lines = [f"# perf.compile under the Trainer ({env['device_tag']})", "",
             f"{env['date_utc']}, torch {env['versions']['torch']}, lightning {env['versions']['lightning']}. "
             f"`python -m lightning_cggr.train {' '.join(p['overrides'])}` for {p['steps']} steps per setting, "
             f"one fresh process each; medians over the steps from {p['skip']} on (compilation happens before).", "",
             md_table(["perf.compile", "exit", "last step", "steps timed", "tokens/s (median)", "vs eager",
                       "MFU (median)", "final val/loss", "process wall (s)", "recompiles", "graph breaks"], rows),
             "", "Recompiles and graph breaks are counted from torch's own logs (TORCH_LOGS=recompiles,graph_breaks).", ""]
    for r in p["runs"]:
        for what, key in (("recompiled", "recompile_reasons"), ("graph breaks", "graph_break_lines")):
            if r.get(key):
                lines += [f"`{r['setting']}` {what} (first {len(r[key])}):", "", "```", *r[key], "```", ""]
    for r in p["runs"]:
        if r["rc"] != 0:
            lines += [f"`perf.compile={r['setting']}` failed ({r['rc']}):", "", "```", r["log_tail"], "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.trainer_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="false,true,reduce-overhead", help="comma-separated perf.compile values, each optionally VALUE:KEY=V[:KEY=V] (more overrides)")
    ap.add_argument("--steps", type=at_least(1), default=60, help="trainer.max_steps of each run")
    ap.add_argument("--skip", type=at_least(0), default=10, help="steps left out of the medians (compilation, warm-up)")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="limit per run")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device tag of the results file (cuda | cpu)")
    ap.add_argument("--out", default=None, help="results folder (default experiments/results)")
    ap.add_argument("--name", default="trainer_check", help="results file name (before -<device>)")
    ap.add_argument("--runs-dir", default=None, help="where the run folders go (default: a temporary folder)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides shared by every run")
    args = ap.parse_intermixed_args(argv)  # options may follow the overrides (the last one wins)
    if args.skip >= args.steps:
        ap.error(f"--skip={args.skip} leaves none of --steps={args.steps} to measure")
    pick_device(args.device)  # no CUDA here: one line now, not a traceback after the runs
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="trainer_check_"))
    runs = []
    settings = args.settings.split(",")
    for setting in settings:
        setting_overrides(setting)  # a malformed one fails before anything runs
    for index, setting in enumerate(settings):
        r = run_setting(setting, args.overrides, args.steps, runs_dir, args.timeout_s, index)
        r.update(summarize(read_metrics(Path(r["run_dir"])), args.skip))
        print(f"perf.compile={setting}: rc {r['rc']} tokens/s {r['tokens_per_sec']} mfu {r['mfu']} "
              f"val {r['final_val_loss']} wall {r['wall_s']} s", file=sys.stderr, flush=True)
        runs.append(r)
        # written after every setting: a run cut short by an outer time limit keeps what it measured
        payload = dict(experiment=args.name, kind="trainer_check", overrides=args.overrides, steps=args.steps,
                       skip=args.skip, runs=runs, environment=environment(args.device))
        publish(payload, args.name, args.device, markdown, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch-size sweep at an equal memory budget: the largest batch each method fits, and its tokens/s.

    python -m experiments.sweep sweep=cpu_tiny                     # CPU, ~6 min
    python -m experiments.sweep sweep=cpu_tiny sweep.batch_sizes=[16,32] sweep.memory_budget_mib=800
    python -m experiments.sweep sweep=gpu_smollm2_shape            # one GPU
    python -m experiments.sweep sweep=cpu_tiny model.num_layers=2  # other words: Hydra overrides

The grid lives in ``experiments/presets/sweep/<name>.yaml`` (batch sizes x methods, the budget, steps); no Hydra
multirun is needed. Every point (one method at one batch size) runs in a fresh process forked from
an import-only server, walked batch size by batch size with the methods interleaved. A point does
not fit when its peak memory (CPU: peak RSS of its process; CUDA: ``max_memory_allocated``, with the
budget also set as the allocator's limit) exceeds the budget, when it runs out of memory, or when
it is killed (CPU: the RSS watchdog at ``hard_cap_factor`` x budget, or the kernel): recorded,
never a crash. With ``stop_after_miss`` a method is not tried at larger batches once one did not
fit (recorded as such). Summary: per method, the largest batch within the budget and its tokens/s,
against the fair baseline's (standard, fused loss) at its own largest batch.
"""

from __future__ import annotations

import argparse
import sys
import time

from experiments import compose
from experiments import isolate
from experiments import methods as methods_mod
from experiments import results_io as rio
from experiments import stats

SWEEP_DIR = compose.PRESETS_DIR / "sweep"


def load_sweep(args_overrides: list[str]):
    """(sweep settings, remaining Hydra overrides) from ``sweep=<name>`` and ``sweep.key=value`` words."""
    from omegaconf import OmegaConf

    name, dots, rest = None, [], []
    for o in args_overrides:
        if o.startswith("sweep="):
            name = o.split("=", 1)[1]
        elif o.startswith("sweep."):
            dots.append(o[len("sweep."):])
        else:
            rest.append(o)
    if name is None:
        choices = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
        raise SystemExit(f"error: name the grid with sweep=<name>; available: {choices}")
    path = SWEEP_DIR / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
        raise SystemExit(f"error: no experiments/presets/sweep/{name}.yaml; available: {choices}")
    try:
        cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(dots))
        s = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # noqa: BLE001 - a value YAML cannot read, a bad interpolation
        words = " ".join(f"sweep.{d}" for d in dots)
        raise SystemExit(f"error: {words}: cannot read ({' '.join(str(err).split())[:300]}); quote a list "
                         "for the shell and close its brackets, e.g. 'sweep.batch_sizes=[16,32]'") from None
    known = {"name", "preset", "device", "methods", "batch_sizes", "memory_budget_mib", "hard_cap_factor",
             "stop_after_miss", "warmup", "steps", "threads", "point_timeout_s", "extra_overrides"}
    unknown = sorted(set(s) - known)
    if unknown:
        raise SystemExit(f"error: experiments/presets/sweep/{name}.yaml: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    s.setdefault("extra_overrides", [])
    if problems := sweep_problems(s):
        raise SystemExit(f"error: experiments/presets/sweep/{name}.yaml: " + "; ".join(problems))
    if given := [o for o in rest if o.lstrip("+~").startswith("data.batch_size")]:
        raise SystemExit(f"error: {given[0]}: each point of the grid sets data.batch_size from sweep.batch_sizes; "
                         "give the sizes there, e.g. 'sweep.batch_sizes=[8]'")
    s["sweep_file"] = f"experiments/presets/sweep/{name}.yaml"
    return s, rest


def sweep_problems(s: dict) -> list[str]:
    """The grid's values that would run nothing meaningful (each as ``sweep.key=value: rule``)."""
    def integer(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

    rules = {
        "batch_sizes": (lambda v: isinstance(v, list) and v and all(integer(b, 1) for b in v),
                        "a non-empty list of integers >= 1"),
        "memory_budget_mib": (positive, "a number > 0"),
        "hard_cap_factor": (lambda v: positive(v) and v >= 1, "a number >= 1"),
        "stop_after_miss": (lambda v: isinstance(v, bool), "true or false"),
        "warmup": (lambda v: integer(v, 0), "an integer >= 0"),
        "steps": (lambda v: integer(v, 1), "an integer >= 1"),
        "threads": (lambda v: v is None or integer(v, 1), "null or an integer >= 1"),
        "point_timeout_s": (positive, "a number > 0"),
        "device": (lambda v: isinstance(v, str) and _is_device(v), "auto, cpu, cuda or cuda:N"),
        "extra_overrides": (lambda v: isinstance(v, list) and all(isinstance(o, str) for o in v), "a list of overrides"),
    }
    return [f"sweep.{key}={s.get(key)!r}: must be {rule}" for key, (ok, rule) in rules.items() if not ok(s.get(key))]


def _is_device(name: str) -> bool:
    try:
        compose.device_name(name)
    except argparse.ArgumentTypeError:
        return False
    return True


def plan_points(methods: list[str], batch_sizes: list[int]) -> list[tuple[int, str]]:
    """Ascending batch sizes; at each, the methods in an order rotating by one per batch size."""
    out = []
    for i, b in enumerate(sorted(batch_sizes)):
        k = i % len(methods)
        out += [(b, m) for m in methods[k:] + methods[:k]]
    return out


def main(argv=None) -> int:
    ap = compose.make_parser("sweep", __doc__, common=False)
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no point after this many seconds; the rest are recorded as not run")
    ap.add_argument("--reference", default=None,
                    help="reference model folder for the excess-loss (RHO-LOSS) methods; build one with "
                         "python -m lightning_cggr.routing.holdout --out DIR")
    ap.add_argument("words", nargs="*", help="sweep=<name>, sweep.key=value, and Hydra overrides of the base config")
    args = ap.parse_intermixed_args(argv)
    s, overrides = load_sweep(args.words)
    device = compose.pick_device(s["device"])
    methods = methods_mod.parse_methods(s["methods"])
    budget = s["memory_budget_mib"] * 2**20
    base = compose.base_overrides(s["preset"], device, ["cggr.warmup_steps=0", *s["extra_overrides"], *overrides])
    resolved = compose.resolve_methods(methods, base, device, args.reference)
    compose.check_same_model_and_data(resolved)
    env = rio.environment(device)
    points, missed = [], set()
    t_start = time.monotonic()
    with rio.LoadSampler() as load:
        for b, m in plan_points(methods, s["batch_sizes"]):
            point = {"method": m, "batch_size": b}
            if args.deadline_s is not None and time.monotonic() - t_start > args.deadline_s:
                point.update(status="not_run", error="time limit of the run reached", fit="not run (time limit)")
                points.append(point)
                continue
            if s["stop_after_miss"] and m in missed:
                point.update(status="skipped", error="did not fit at a smaller batch size")
            else:
                r = compose.resolve_method(m, [*base, f"data.batch_size={b}"], device, args.reference)
                spec = {"config": r["config"], "device": device, "warmup": s["warmup"], "steps": s["steps"],
                        "threads": s.get("threads")}
                if device.startswith("cuda"):
                    spec["cuda_budget_bytes"] = budget
                else:
                    spec["rss_kill_bytes"] = int(budget * s["hard_cap_factor"])
                print(f"[sweep] {m} batch {b} ...", file=sys.stderr, flush=True)
                res = isolate.run_isolated("experiments.isolate:measure_point", spec, timeout_s=s["point_timeout_s"])
                if res.get("status") == "oom":
                    res.pop("traceback", None)
                point.update(res)
                point["batch_size"] = b
                if point["status"] in ("oom", "killed") or (point["status"] == "ok" and not stats.point_fits(point, budget)):
                    missed.add(m)  # a real miss; an error is not evidence about memory
            point["fit"] = stats.fit_status(point, budget) if point["status"] != "skipped" else "does not fit: skipped"
            print(f"[sweep] {m} batch {b}: {point['fit']}"
                  + (f", {point['tokens_per_s']:.0f} tok/s, peak {point['peak_bytes'] / 2**20:.0f} MiB"
                     if point.get("status") == "ok" else ""), file=sys.stderr, flush=True)
            points.append(point)
    env["load"] = load.summary()
    ran = [p for p in points if p.get("status") not in ("skipped", "not_run")]
    if ran and all(p.get("status") == "error" for p in ran):  # nothing measured: keep the results there were
        raise SystemExit(f"error: every point failed, nothing written; the first: {ran[0].get('error')}")
    summary = stats.sweep_summary(points, budget)
    name = s["name"]
    first = resolved[methods[0]]["config"]
    payload = {
        "experiment": name,
        "kind": "sweep",
        "environment": env,
        "shape": {**compose.shape_of(first),
                  **next((p["built_shape"] for p in points if p.get("built_shape")), {})},
        "settings": {**s, "base_overrides": base, "memory_budget_bytes": budget},
        "methods": methods_mod.describe(methods, resolved),
        "raw": {"points": points},
        "summary": summary,
    }
    return rio.publish(payload, name, device, markdown, args.out, plot)


def markdown(p: dict) -> str:
    from experiments.throughput import describe_device

    env, s, st = p["environment"], p["summary"], p["settings"]
    budget = st["memory_budget_bytes"]
    cuda = env["device"].startswith("cuda")
    mem = "max_memory_allocated" if cuda else "peak RSS of a fresh process"
    header = ["method", "kind", "largest batch within budget", "tokens/s there", "vs standard fused",
              "peak (MiB)", "fastest fitting batch", "its tokens/s"]
    rows = []
    for m, meta in p["methods"].items():
        r = s.get(m)
        if r is None:
            continue
        best = r["best_batch_size"]
        best = "none fits" if best is None else f"{best}{stats.bound_note(r)}"
        rows.append([meta["label"], meta["kind"], best,
                     rio.fmt_f0(r["tokens_per_s"]), rio.fmt_x(r["tokens_per_s_vs_baseline"]), rio.fmt_mib(r["peak_bytes"]),
                     r["fastest_fitting_batch_size"], rio.fmt_f0(r["fastest_fitting_tokens_per_s"])])
    sizes = sorted(st["batch_sizes"])
    grid_header = ["method", *[f"B={b}" for b in sizes]]
    grid = []
    for m, meta in p["methods"].items():
        cells = []
        for b in sizes:
            pt = next((x for x in p["raw"]["points"] if x["method"] == m and x["batch_size"] == b), None)
            if pt is None:
                cells.append(None)
            elif pt["status"] == "ok":
                tag = "" if stats.point_fits(pt, budget) else " OVER"
                cells.append(f"{pt['tokens_per_s']:.0f} tok/s, {pt['peak_bytes'] / 2**20:.0f} MiB{tag}")
            elif pt["status"] == "skipped":
                cells.append("not tried (missed smaller)")
            elif pt["status"] == "not_run":
                cells.append("not run (time limit)")
            else:
                cells.append(pt["fit"])
        grid.append([meta["label"], *cells])
    load = env.get("load", {})
    shape = p["shape"]
    head = (
        f"### {p['experiment']} on {describe_device(env)}\n\n"
        f"{shape.get('model')} ({shape.get('model_source')}), block {shape.get('block_size')}, "
        f"{shape.get('precision')}, kept ratio {shape.get('min_tokens_ratio')}; memory budget "
        f"{budget / 2**20:.0f} MiB of {mem}; median of {st['steps']} steps after {st['warmup']} warm-up per point, "
        f"each point a fresh process. Grid: {st['sweep_file']}"
        f"{'; base config ' + ' '.join(st['base_overrides']) if st.get('base_overrides') else ''}. "
        f"{env['date_utc']}; load avg (1 min) median "
        f"{rio.r2(load.get('median'))}, max {rio.r2(load.get('max'))} on {env['hardware']['cpu_count']} CPUs.\n"
    )
    return head + "\n" + rio.md_table(header, rows) + "\n\nEvery point (OVER: ran, but above the budget):\n\n" + rio.md_table(grid_header, grid)


def plot(p: dict, path) -> None:
    """tokens/s vs batch size per method; hollow markers above the budget, none where it did not run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = p["settings"]["memory_budget_bytes"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, meta in p["methods"].items():
        pts = sorted((x for x in p["raw"]["points"] if x["method"] == m and x["status"] == "ok"),
                     key=lambda x: x["batch_size"])
        if not pts:
            continue
        style = "--" if meta["kind"] == "control" else "-"
        line = a.plot([x["batch_size"] for x in pts], [x["tokens_per_s"] for x in pts], style, label=meta["label"])[0]
        b.plot([x["batch_size"] for x in pts], [x["peak_bytes"] / 2**20 for x in pts], style, color=line.get_color())
        for x in pts:
            fits = stats.point_fits(x, budget)
            kw = dict(color=line.get_color(), marker="o", ms=5)
            kw.update({} if fits else {"markerfacecolor": "none"})
            a.plot([x["batch_size"]], [x["tokens_per_s"]], **kw)
            b.plot([x["batch_size"]], [x["peak_bytes"] / 2**20], **kw)
    b.axhline(budget / 2**20, color="red", lw=1, ls=":", label="budget")
    for ax, yl in ((a, "tokens/s"), (b, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.suptitle(f"{p['experiment']} ({p['environment']['device_tag']}); hollow = over the budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

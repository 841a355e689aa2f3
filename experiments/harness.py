"""Shared benchmark harness: methods as config overrides, a timed training step, isolated workers.

Every method is a list of Hydra overrides on top of ``conf/train.yaml`` plus a preset
(``conf/experiment/bench_*.yaml``). A method whose options the package does not (yet) accept is
reported as "not available", found by composing and validating its config, never skipped silently.

Steps are driven directly (``CGGRModule.training_step`` + backward + clip + AdamW step), not through
``lightning.Trainer.fit``, so that several methods can be interleaved step by step in one process:
under a shared, fluctuating CPU load every method then sees the same load. The harness supplies the
optimizer-step count that ``cggr.warmup_steps`` reads (``global_step``).

Memory is measured in a fresh process per method (CPU: peak RSS; CUDA: ``max_memory_allocated``).
Those processes are forked from a ``forkserver`` that has imported torch/lightning/transformers but
run no tensor work, so each starts from the same import-only footprint without paying the import.

Pure parts (statistics, summaries, interpolation, table formatting) are at the top and tested in
``tests/test_experiments.py``; nothing here is imported by the package.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    label: str
    """Human-readable name used in tables and plots."""
    kind: str
    """baseline | cggr | control"""
    overrides: tuple[str, ...]
    """Hydra overrides; ``{fused}`` is replaced by the device's fused loss impl."""


# ``++key=value`` adds a key the config files do not have yet (or overrides it), so a method whose
# option has not landed composes anyway and is then rejected, with the package's own message, by
# ``parse_config``: that is how "not available yet" is detected.
METHODS: dict[str, Method] = {
    "standard_naive": Method("standard, naive loss", "baseline", ("cggr.enabled=false", "loss.impl=naive")),
    "standard_fused": Method("standard, fused loss", "baseline", ("cggr.enabled=false", "loss.impl={fused}")),
    "cggr_entropy": Method("CGGR token, router, entropy", "cggr", ("cggr.scoring=entropy", "loss.impl={fused}")),
    "cggr_margin": Method("CGGR token, router, margin", "cggr", ("cggr.scoring=margin", "loss.impl={fused}")),
    "cggr_loss": Method("CGGR token, router, loss", "cggr", ("cggr.scoring=loss", "loss.impl={fused}")),
    "cggr_combined": Method("CGGR token, router, combined", "cggr", ("cggr.scoring=combined", "loss.impl={fused}")),
    "random_token": Method("random-token control", "control", ("cggr.scoring=random", "loss.impl={fused}")),
    "cggr_sequence": Method(
        "CGGR sequence, router, combined",
        "cggr",
        ("++cggr.selection.unit=sequence", "cggr.scoring=combined", "loss.impl={fused}"),
    ),
    "random_sequence": Method(
        "random-sequence control",
        "control",
        ("++cggr.selection.unit=sequence", "cggr.scoring=random", "loss.impl={fused}"),
    ),
    "cggr_final": Method(
        "CGGR token, router-free (final), combined",
        "cggr",
        ("++cggr.router.source=final", "cggr.scoring=combined", "loss.impl={fused}"),
    ),
}
ALL_METHODS = tuple(METHODS)
BASELINE = "standard_fused"
"""The fair baseline every ratio is taken against (same fused loss kernel as CGGR)."""


def fused_impl(device: str) -> str:
    """The fused loss the fair baseline and CGGR use on ``device``: chunked torch on CPU, Triton on CUDA."""
    return "triton" if device.startswith("cuda") else "torch"


def method_overrides(name: str, device: str) -> list[str]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return [o.replace("{fused}", fused_impl(device)) for o in METHODS[name].overrides]


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b'] or 'all' -> validated method names, order kept."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if names == ["all"]:
        return list(ALL_METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; choose from all, {', '.join(METHODS)}")
    return names


# ------------------------------------------------------------------------------------------------
# Pure statistics and summaries (tested without timing)
# ------------------------------------------------------------------------------------------------


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
    if st == "unavailable":
        return "not available yet"
    return f"error: {point.get('error', st)}"


def sweep_summary(points: list[dict[str, Any]], budget_bytes: float, baseline: str = BASELINE) -> dict[str, dict]:
    """Per method: the largest batch size within the budget, its tokens/s and the ratio to the baseline's.

    ``points`` hold ``method``, ``batch_size``, ``status``, ``peak_bytes``, ``tokens_per_s``. A method
    with no fitting point gets ``best_batch_size=None``. ``tokens_per_s_vs_baseline`` compares each
    method's best fitting point with the baseline's best fitting point (equal memory budget).
    """
    by_method: dict[str, list[dict]] = {}
    for p in points:
        by_method.setdefault(p["method"], []).append(p)
    out: dict[str, dict] = {}
    for m, ps in by_method.items():
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
            "unavailable": all(p.get("status") == "unavailable" for p in ps),
        }
    base = out.get(baseline, {}).get("tokens_per_s")
    for row in out.values():
        row["tokens_per_s_vs_baseline"] = row["tokens_per_s"] / base if base and row["tokens_per_s"] else None
    return out


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


def fmt_ms(x: float | None, sd: float | None = None) -> str:
    if x is None:
        return "—"
    return f"{x:.4f}" if sd is None else f"{x:.4f} ± {sd:.4f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; None renders as an em dash."""
    def cell(v):
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Environment and results files
# ------------------------------------------------------------------------------------------------


def device_tag(device: str) -> str:
    """'cpu' or a short slug of the GPU name ('h100', 'h200', 'a100', ...)."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(0).lower()
    for key in ("h200", "h100", "a100", "l40s", "a10", "l4", "v100", "t4", "4090", "3090", "3060"):
        if key in name:
            return key
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str) -> dict[str, Any]:
    """Versions, hardware, git commit and load: everything a reader needs to judge the numbers."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("lightning", "transformers", "triton", "hydra", "omegaconf", "gguf"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent is a fact worth recording
            versions[mod] = None
    hw = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        hw.update(gpu=p.name, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        # code changes only: results written by an earlier run of the same suite do not count
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)experiments/results"],
                                    cwd=REPO, capture_output=True, text=True).stdout)
    except OSError:
        commit, dirty = None, None
    return {
        "device": device,
        "device_tag": device_tag(device),
        "versions": versions,
        "hardware": hw,
        "git_commit": commit,
        "git_tree_dirty": dirty,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": os.getloadavg(),
        "argv": sys.argv,
    }


def results_path(experiment: str, device: str, suffix: str, out_dir: Path | None = None) -> Path:
    d = Path(out_dir) if out_dir else RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{experiment}-{device_tag(device)}.{suffix}"


def write_results(payload: dict[str, Any], experiment: str, device: str, markdown: str, out_dir=None) -> Path:
    payload.setdefault("environment", {})["loadavg_end"] = os.getloadavg()
    path = results_path(experiment, device, "json", out_dir)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    results_path(experiment, device, "md", out_dir).write_text(markdown + "\n")
    return path


class LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds in a thread (machine busyness)."""

    def __init__(self, every: float = 15.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(round(os.getloadavg()[0], 2))
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=1)

    def summary(self) -> dict[str, Any]:
        s = self.samples or [os.getloadavg()[0]]
        return {"samples_1min": s, "max": max(s), "median": round(median(s), 2)}


# ------------------------------------------------------------------------------------------------
# Config composition
# ------------------------------------------------------------------------------------------------


def compose(overrides: Sequence[str]):
    """``conf/train.yaml`` composed with ``overrides`` (Hydra compose API; no output dir is made)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="bench"):
        return _compose(config_name="train", overrides=["output_dir=/tmp/lightning_cggr_bench", *overrides])


def resolve_method(name: str, base: Sequence[str], device: str) -> dict[str, Any]:
    """{'available', 'reason', 'overrides', 'config'}: compose + validate, never build anything."""
    from omegaconf import OmegaConf

    from lightning_cggr.config import parse_config

    overrides = [*base, *method_overrides(name, device)]
    try:
        cfg = compose(overrides)
        container = OmegaConf.to_container(cfg, resolve=True)
        parse_config(container)
    except Exception as err:  # noqa: BLE001 - hydra and ConfigError both mean "cannot run this config"
        reason = " ".join(str(err).split())
        return {"available": False, "reason": reason, "overrides": overrides, "config": None}
    return {"available": True, "reason": None, "overrides": overrides, "config": container}


def resolve_methods(names: Sequence[str], base: Sequence[str], device: str) -> dict[str, dict[str, Any]]:
    out = {n: resolve_method(n, base, device) for n in names}
    for n, r in out.items():
        if not r["available"]:
            print(f"[bench] {n}: NOT AVAILABLE YET: {r['reason']}", file=sys.stderr)
    return out


def check_same_model_and_data(resolved: dict[str, dict[str, Any]]) -> None:
    """Every available method must train the same model on the same data with the same seed."""
    ref = None
    for name, r in resolved.items():
        if not r["available"]:
            continue
        c = r["config"]
        key = json.dumps({k: c.get(k) for k in ("model", "data", "seed", "optim", "trainer")}, sort_keys=True)
        if ref is None:
            ref = (name, key)
        elif key != ref[1]:
            raise SystemExit(f"error: methods {ref[0]} and {name} differ outside cggr/loss; fix the overrides")


# ------------------------------------------------------------------------------------------------
# Building and stepping
# ------------------------------------------------------------------------------------------------


def build_model_and_data(config: dict[str, Any]):
    """(run, model, datamodule) exactly as ``lightning_cggr.train.train`` builds them, after seeding.

    ``bench.pad_vocab`` (a harness-only key of the bench presets) pads the embedding and head to that
    many rows, for throughput at a real model's vocabulary with a smaller tokenizer.
    """
    import lightning as L

    from lightning_cggr.config import parse_config

    run = parse_config(config)
    L.seed_everything(config["seed"], workers=True, verbose=False)
    bench = config.get("bench") or {}
    if bench.get("cache_build"):
        model, datamodule = _cached_build(config, run)
        L.seed_everything(config["seed"], workers=True, verbose=False)
        return run, model, datamodule
    return (run, *_build(config, run))


def _build(config: dict[str, Any], run):
    from lightning_cggr.data import build_datamodule, build_tokenizer
    from lightning_cggr.models import build_model

    tokenizer = build_tokenizer(run.data) if run.data.tokenizer == "bpe" else None
    model, tokenizer = build_model(run.model, tokenizer)
    pad_vocab = (config.get("bench") or {}).get("pad_vocab")
    if pad_vocab and pad_vocab > model.get_input_embeddings().weight.shape[0]:
        # Throughput-only shapes (e.g. SmolLM2's 49152-row head on a small tokenizer): unused rows.
        model.resize_token_embeddings(pad_vocab, mean_resizing=False)
    datamodule = build_datamodule(run.data, tokenizer, seed=config["seed"])
    datamodule.setup("fit")
    return model, datamodule


def _cached_build(config: dict[str, Any], run):
    """``bench.cache_build``: pickle the built (model, datamodule) once, keyed by the model/data/seed
    config, the transformers version and the building code's source, so fresh measurement processes of a pretrained model skip
    the GGUF dequantization and tokenization (tens of seconds each). Weights and batches are identical."""
    import hashlib

    import torch

    from lightning_cggr.data import cache_dir

    import transformers

    key = {k: config.get(k) for k in ("model", "data", "seed", "bench")}
    # the building code too: a change to how data is split or a model is loaded must not hit a stale pickle
    src = hashlib.sha256()
    for name in ("data.py", "models.py", "gguf.py", "chat.py"):
        f = REPO / "lightning_cggr" / name
        src.update(f.read_bytes() if f.is_file() else b"")
    key = json.dumps({**key, "transformers": transformers.__version__, "code": src.hexdigest()},
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / "bench" / f"build-{digest}.pt"
    if path.is_file():
        model, datamodule = torch.load(path, weights_only=False)
        return model, datamodule
    model, datamodule = _build(config, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save((model, datamodule), tmp)
    tmp.replace(path)
    return model, datamodule


def take_batches(loader_fn: Callable[[], Iterable], n: int, device) -> list[dict]:
    """The first ``n`` batches of the loader (re-iterated when it runs out), moved to ``device``."""
    out = []
    while len(out) < n:
        got = 0
        for b in loader_fn():
            out.append({k: v.to(device) for k, v in b.items()})
            got += 1
            if len(out) == n:
                break
        if got == 0:
            raise RuntimeError("the data loader yields no batches (batch size larger than the dataset?)")
    return out


def _stepped_class():
    from lightning_cggr.module import CGGRModule

    class SteppedCGGRModule(CGGRModule):
        """CGGRModule whose ``global_step`` is set by the harness (no Trainer drives it)."""

        bench_step = 0

        @property
        def global_step(self) -> int:  # read by cggr_active() for cggr.warmup_steps
            return self.bench_step

    return SteppedCGGRModule


def make_module(model, run):
    import warnings

    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is a no-op
    return _stepped_class()(model, run.cggr, run.loss, run.optim)


def make_optimizer(model, optim):
    """AdamW with CGGRModule.configure_optimizers' parameter groups (decay on matrices only)."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr,
        betas=tuple(optim.betas),
    )


def autocast_for(precision: str, device: str):
    """The forward context for the trainer's ``precision`` string."""
    import torch

    p = str(precision)
    if p in ("32-true", "32"):
        return contextlib.nullcontext()
    if p == "bf16-mixed":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    raise SystemExit(f"error: the harness supports trainer.precision 32-true or bf16-mixed, not {p!r}")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def train_step(module, optimizer, batch, step: int, clip: float | None, ctx, device: str, scheduler=None):
    """One optimizer step; returns (seconds, detached loss). Synchronizes the device around it."""
    import torch

    module.bench_step = step
    sync(device)
    t0 = time.perf_counter()
    with ctx:
        loss = module.training_step(batch, step)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    sync(device)
    return time.perf_counter() - t0, loss.detach()


def heldout_loss(module, batches: list[dict], ctx) -> float:
    """Mean next-token NLL over every trainable token of ``batches`` (the same code for every method)."""
    import torch

    from lightning_cggr.kernels import linear_cross_entropy
    from lightning_cggr.selection import IGNORE_INDEX, shift_targets

    was_training = module.training
    module.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.no_grad(), ctx:
        for b in batches:
            mask = b.get("attention_mask")
            targets = shift_targets(b["labels"], mask)
            hidden = module(b["input_ids"], mask)
            B, T, H = hidden.shape
            nll = linear_cross_entropy(
                hidden.reshape(B * T, H), module.head.weight, targets.reshape(-1), reduction="sum", impl="auto"
            )
            total += nll.double().cpu()
            count += int((targets != IGNORE_INDEX).sum())
    module.train(was_training)
    return float(total / max(count, 1))


def weights_fingerprint(model) -> str:
    """A short digest of every parameter's values (proves equal initial weights across runs)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes()[:4096])
            h.update(repr(float(p.double().sum())).encode())
    return h.hexdigest()[:16]


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------
# A measurement point in a fresh process
# ------------------------------------------------------------------------------------------------


def measure_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one method's model, run warm-up + timed steps at one batch size, report time and memory.

    spec: config (resolved), device, warmup, steps, optional cuda_budget_bytes. Run in a fresh process
    (:func:`run_isolated`) so peak RSS / peak CUDA memory belong to this method alone.
    """
    import torch

    device = spec["device"]
    cuda = device.startswith("cuda")
    set_threads(spec.get("threads"))
    rss_start = current_rss_bytes()
    if cuda and spec.get("cuda_budget_bytes"):  # a real allocator limit: over budget raises OOM
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cuda_budget_bytes"] / total))
    run, model, dm = build_model_and_data(spec["config"])
    model.to(device).train()
    module = make_module(model, run)
    optimizer = make_optimizer(model, run.optim)
    n = spec["warmup"] + spec["steps"]
    batches = take_batches(dm.train_dataloader, n, device)
    B, T = batches[0]["input_ids"].shape
    ctx = autocast_for(spec["config"]["trainer"]["precision"], device)
    clip = spec["config"]["trainer"].get("gradient_clip_val")
    rss_built = current_rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_built = torch.cuda.memory_allocated()
    times = []
    for i, batch in enumerate(batches):
        dt, _ = train_step(module, optimizer, batch, i, clip, ctx, device)
        if i >= spec["warmup"]:
            times.append(dt)
    out = {
        "status": "ok",
        "batch_size": B,
        "block_size": T,
        "step_times_s": times,
        "median_step_s": median(times),
        "tokens_per_s": B * T / median(times),
        "rss_start_bytes": rss_start,
        "rss_after_build_bytes": rss_built,
        "peak_rss_bytes": peak_rss_bytes(),
        "loss_impl": module.loss_impl,
    }
    if cuda:
        out["cuda_after_build_bytes"] = cuda_built
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_bytes"] = out["cuda_peak_bytes"]
    else:
        out["peak_bytes"] = out["peak_rss_bytes"]
    return out


def is_oom(err: BaseException) -> bool:
    """CUDA out-of-memory, a host MemoryError, or the allocator's 'can't allocate' RuntimeError."""
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            return True
    except ImportError:
        pass
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def guarded(fn: Callable[[dict], dict], spec: dict) -> dict:
    """Run ``fn(spec)``; an out-of-memory becomes {'status': 'oom'}, any other error {'status': 'error'}."""
    try:
        return fn(spec)
    except BaseException as err:  # noqa: BLE001 - the sweep must survive every point
        if isinstance(err, KeyboardInterrupt):
            raise
        status = "oom" if is_oom(err) else "error"
        return {"status": status, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}",
                "traceback": traceback.format_exc()[-3000:]}


WATCHDOG_EXIT = 77


def _watchdog(limit_bytes: int, every: float = 0.02) -> None:
    if current_rss_bytes() > limit_bytes:  # already over: no race with a fast point
        os._exit(WATCHDOG_EXIT)

    def loop():
        while True:
            if current_rss_bytes() > limit_bytes:
                os._exit(WATCHDOG_EXIT)
            time.sleep(every)

    threading.Thread(target=loop, daemon=True).start()


def _resolve_target(target: str) -> Callable[[dict], dict]:
    mod, _, fn = target.partition(":")
    return getattr(__import__(mod, fromlist=[fn]), fn)


def _child_main(target: str, spec: dict, conn) -> None:
    if spec.get("rss_kill_bytes"):
        _watchdog(int(spec["rss_kill_bytes"]))
    conn.send(guarded(_resolve_target(target), spec))
    conn.close()


PRELOAD = ["experiments.harness", "torch", "lightning", "transformers", "lightning_cggr.module",
           "lightning_cggr.data", "lightning_cggr.models", "lightning_cggr.config"]

_CTX = None


def _context(preload: Sequence[str]):
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(list(preload))
    return _CTX


def run_isolated(target: str, spec: dict, timeout_s: float = 600.0, preload: Sequence[str] = PRELOAD) -> dict:
    """``target`` ('module:function') on ``spec`` in a fresh forked process; never raises for the point.

    A process killed by a signal (the kernel's OOM killer) or by the RSS watchdog is 'killed' (does
    not fit); a timeout is 'error'.
    """
    ctx = _context(preload)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(target, spec, send))
    proc.start()
    send.close()
    result = None
    try:
        if recv.poll(timeout_s):
            result = recv.recv()
    except EOFError:
        result = None
    proc.join(timeout=10 if result is not None else 1)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return result or {"status": "error", "error": f"timed out after {timeout_s:.0f} s"}
    if result is not None:
        return result
    code = proc.exitcode
    if code == WATCHDOG_EXIT:
        return {"status": "killed", "error": f"RSS over the hard cap of {spec.get('rss_kill_bytes', 0) / 2**20:.0f} MiB"}
    if code is not None and code < 0:
        return {"status": "killed", "error": f"process killed by signal {-code} (out of memory?)"}
    return {"status": "error", "error": f"worker exited with code {code} and no result"}


# ------------------------------------------------------------------------------------------------
# Command-line helpers
# ------------------------------------------------------------------------------------------------

PRESETS = {
    "tiny": "bench_tiny",
    "smollm2": "bench_smollm2",
    "smollm2_shape": "bench_smollm2_shape",
}


def base_overrides(preset: str, device: str, extra: Sequence[str]) -> list[str]:
    """The preset's experiment config, the device's trainer and the user's extra Hydra overrides."""
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    trainer = ["trainer=gpu"] if device.startswith("cuda") else []
    return [f"+experiment={PRESETS[preset]}", *trainer, *extra]


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for but torch sees no CUDA device")
    return name


def shape_of(config: dict[str, Any]) -> dict[str, Any]:
    m, d = config["model"], config["data"]
    return {
        "model_source": m["source"],
        "model": m.get("name") or f"{m['arch']} h{m['hidden_size']} L{m['num_layers']}",
        "batch_size": d["batch_size"],
        "block_size": d["block_size"],
        "precision": config["trainer"]["precision"],
        "dtype": m["dtype"],
        "min_tokens_ratio": config["cggr"]["min_tokens_ratio"],
        "router_layers": config["cggr"]["router"]["num_layers"],
    }


def unavailable_rows(resolved: dict[str, dict[str, Any]], ncols: int) -> list[list[Any]]:
    return [
        [METHODS[n].label, "not available yet: " + r["reason"][:160], *[None] * (ncols - 2)]
        for n, r in resolved.items()
        if not r["available"]
    ]


def deepcopy_model(model):
    return copy.deepcopy(model)


def parse_run(config: dict[str, Any]):
    from lightning_cggr.config import parse_config

    return parse_config(config)


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


class BatchStream:
    """Batch i of an endless, deterministic pass over the loader (re-iterated as needed), on ``device``.

    Every method asks for batch i by index, so all see the same batches in the same order.
    """

    def __init__(self, loader_fn: Callable[[], Iterable], device):
        self.loader_fn, self.device, self.batches = loader_fn, device, []
        self._it = None

    def __getitem__(self, i: int) -> dict:
        while len(self.batches) <= i:
            if self._it is None:
                self._it = iter(self.loader_fn())
            try:
                b = next(self._it)
            except StopIteration:
                self._it = None
                if not self.batches:
                    raise RuntimeError("the data loader yields no batches") from None
                continue
            self.batches.append({k: v.to(self.device) for k, v in b.items()})
        return self.batches[i]


def make_parser(prog: str, doc: str, common: bool = True) -> argparse.ArgumentParser:
    """The experiments' command line: title and epilog from the script's docstring, and (``common``)
    the options every method-comparing script takes; each script adds its own after."""
    ap = argparse.ArgumentParser(prog=f"python -m experiments.{prog}", description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n\n", 1)[1])
    if common:
        ap.add_argument("--preset", default="tiny", help=f"bench shape: {', '.join(PRESETS)} (conf/experiment/bench_*)")
        ap.add_argument("--methods", default="all", help="comma-separated method names or 'all': " + ", ".join(METHODS))
        ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
        ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
        ap.add_argument("--name", default=None, help=f"experiment name for results files (default {prog}-<preset>)")
    ap.add_argument("--out", default=None, help="results folder (default experiments/results)")
    return ap


def publish(payload: dict, name: str, device: str, markdown: Callable[[dict], str], out_dir=None,
            plot: Callable | None = None) -> int:
    """The end of every experiment: JSON + markdown (+ PNG) under the results folder, the table on
    stdout, where it went on stderr; returns the exit status 0."""
    md = markdown(payload)
    path = write_results(payload, name, device, md, out_dir)
    if plot is not None:
        try_plot(plot, payload, results_path(name, device, "png", out_dir))
    print(md)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


def fmt_x(v) -> str | None:
    """A ratio for a table cell ("1.27x"), or None (an empty cell)."""
    return None if v is None else f"{v:.2f}x"


def fmt_f0(v) -> str | None:
    return None if v is None else f"{v:.0f}"


def fmt_mib(v) -> str | None:
    """Bytes as whole MiB for a table cell, or None."""
    return None if v is None else f"{v / 2**20:.0f}"


def try_plot(draw: Callable, payload: dict, path: Path) -> None:
    """Draw a PNG if matplotlib is installed (GPU machines may lack it: ``python -m experiments.report``
    redraws every plot from the JSON later)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"note: matplotlib missing, {path.name} not drawn; run python -m experiments.report later",
              file=sys.stderr)
        return
    draw(payload, path)


def r2(x):
    """A load figure for prose: two decimals, or a dash."""
    return "—" if x is None else f"{float(x):.2f}"

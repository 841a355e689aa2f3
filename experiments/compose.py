"""Configs of the benchmarks: the package's own Hydra config plus a bench preset and method overrides.

A preset (``experiments/presets/bench/<name>.yaml``, ``@package _global_``) sets the shape a benchmark
runs at; it lives here, not among the package's user experiments, and is found through Hydra's
search path. Every method's config is composed and validated by the package's own
:func:`lightning_cggr.config.parse_config` before anything is built: a config the package rejects
is an error, never skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from experiments.methods import METHODS, method_overrides

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
PRESETS = tuple(sorted(p.stem for p in (PRESETS_DIR / "bench").glob("*.yaml")))
BENCH_KEY = "bench"
"""Top-level key of the presets for harness-only settings (``pad_vocab``, ``cache_build``)."""


def number_list(kind: type, example: str, valid=lambda value: True, what: str = "numbers"):
    """An argparse ``type``: one or more comma-separated ``kind`` values, each passing ``valid``."""
    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            values = []
        if not values or not all(valid(v) for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {what}, e.g. {example}")
        return values
    return parse


def at_least(low: int):
    """An argparse ``type``: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= {low}")
        return value
    return parse


def device_name(text: str) -> str:
    """An argparse ``type`` for ``--device``: auto, cpu, cuda or cuda:N (whether CUDA is there is
    :func:`pick_device`'s to say)."""
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda or cuda:N")


def compose(overrides: Sequence[str]):
    """The package's ``train`` config with the presets folder on the search path (no output dir made)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    from lightning_cggr.train import CONF_DIR  # also registers the dataclass defaults

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="bench"):
        return _compose(
            config_name="train",
            overrides=[f"hydra.searchpath=[file://{PRESETS_DIR}]", "output_dir=/tmp/lightning_cggr_bench", *overrides],
        )


def parse_run(config: dict[str, Any]):
    """The validated run config of a composed config (the harness-only ``bench`` key set aside)."""
    from lightning_cggr.config import parse_config

    return parse_config({k: v for k, v in config.items() if k != BENCH_KEY})


def resolve_method(name: str, base: Sequence[str], device: str, reference: str | None = None) -> dict[str, Any]:
    """{'overrides', 'config'}: the method's composed and validated config; a bad one exits with its error.
    ``reference``: the folder that excess-loss methods' ``{reference}`` stands for."""
    from omegaconf import OmegaConf

    try:
        own = method_overrides(name, device, reference)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    overrides = [*base, *own]
    try:
        container = OmegaConf.to_container(compose(overrides), resolve=True)
        perf = container.get("perf") or {}
        if perf.get("compile") == "auto":  # concrete in the config every report shows
            from lightning_cggr.perf import resolve_compile

            trainer = container.get("trainer") or {}
            perf["compile"] = resolve_compile("auto", device.split(":")[0], trainer.get("strategy"), trainer.get("devices", 1))
        check_run(container)
    except Exception as err:  # noqa: BLE001 - Hydra and ConfigError both mean "cannot run this config"
        from hydra.errors import HydraException

        if isinstance(err, HydraException):  # the training job's wording (a "+key" hint only where it works)
            from lightning_cggr.cli import hydra_problem
            from lightning_cggr.train import CONF_DIR

            err = hydra_problem(err, CONF_DIR)
        raise SystemExit(f"error: method {name} ({' '.join(overrides)}): {' '.join(str(err).split())}") from None
    return {"overrides": overrides, "config": container}


def check_run(config: dict[str, Any]) -> None:
    """The training job's own checks of a composed config (the harness-only ``bench`` key set
    aside): unknown keys, every value, ``trainer.*`` included (precision, accumulation, clipping,
    which the harness reads), the loss kernel against the device. Raises the job's ConfigError."""
    from omegaconf import OmegaConf

    from lightning_cggr.train import check_config

    check_config(OmegaConf.create({k: v for k, v in config.items() if k != BENCH_KEY}))


def resolve_methods(names: Sequence[str], base: Sequence[str], device: str,
                    reference: str | None = None) -> dict[str, dict[str, Any]]:
    return {n: resolve_method(n, base, device, reference) for n in names}


def check_same_model_and_data(resolved: dict[str, dict[str, Any]]) -> None:
    """Every method must train the same model on the same data with the same seed, optimizer and
    efficiency options (``perf``, ``optim.fused``, attention kernel): ratios compare routing alone."""
    ref = None
    for name, r in resolved.items():
        c = r["config"]
        key = json.dumps({k: c.get(k) for k in ("model", "data", "seed", "optim", "perf", "trainer", BENCH_KEY)}, sort_keys=True)
        if ref is None:
            ref = (name, key)
        elif key != ref[1]:
            raise SystemExit(f"error: methods {ref[0]} and {name} differ outside cggr/loss (model, data, "
                             "optimizer, efficiency options and trainer must be the same); fix the overrides")


def base_overrides(preset: str, device: str, extra: Sequence[str]) -> list[str]:
    """The preset, the device's trainer and the user's extra Hydra overrides."""
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    trainer = ["trainer=gpu"] if device.startswith("cuda") else []
    return [f"+bench={preset}", *trainer, *extra]


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
        "attn_implementation": m.get("attn_implementation"),
        "compile": (config.get("perf") or {}).get("compile"),
        "optim_fused": (config.get("optim") or {}).get("fused"),
    }


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for but torch sees no CUDA device")
    return name


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def make_parser(prog: str, doc: str, common: bool = True) -> argparse.ArgumentParser:
    """The experiments' command line: title and epilog from the script's docstring, and (``common``)
    the options every method-comparing script takes; each script adds its own after."""
    ap = argparse.ArgumentParser(prog=f"python -m experiments.{prog}", description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n\n", 1)[1])
    if common:
        ap.add_argument("--preset", default="tiny", help=f"bench shape: {', '.join(PRESETS)} (experiments/presets/bench)")
        ap.add_argument("--methods", default="no_reference",
                        help="comma-separated method names, 'all', or 'no_reference' (the default: every method "
                             "that needs no --reference model): " + ", ".join(METHODS))
        ap.add_argument("--reference", default=None,
                        help="reference model folder for the excess-loss (RHO-LOSS) methods; build one with "
                             "python -m lightning_cggr.routing.holdout --out DIR")
        ap.add_argument("--device", type=device_name, default="auto", help="cpu | cuda | auto")
        ap.add_argument("--threads", type=at_least(1), default=None, help="torch.set_num_threads (default: torch's)")
        ap.add_argument("--name", default=None, help=f"experiment name for results files (default {prog}-<preset>)")
    ap.add_argument("--out", default=None, help="results folder (default experiments/results)")
    return ap

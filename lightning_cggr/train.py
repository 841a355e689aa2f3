"""Train a causal LM with CGGR.

CPU-sized example (the embedded default: a tiny Llama on CPython's own documentation text)::

    python -m lightning_cggr.train trainer.max_steps=50

The real job (SmolLM2-135M on one GPU)::

    python -m lightning_cggr.train +experiment=smollm

Every setting is a Hydra override; ``--cfg job`` prints the composed config without running.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from .config import parse_config, register_schema
from .errors import ConfigError, RunStopped, UserError

log = logging.getLogger(__name__)

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
register_schema()  # the dataclass defaults, first in conf/train.yaml's defaults list


def check_trainer(trainer: dict) -> None:
    """Trainer settings that would otherwise fail only after the model and data are built."""
    strategy, accelerator = trainer.get("strategy"), str(trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if strategy == "fsdp" and on_cpu:
        raise ConfigError(
            f"invalid configuration: trainer.strategy=fsdp needs GPUs (torch's FSDP1 refuses a CPU "
            f"device; trainer.accelerator={accelerator}); on CPU use trainer.strategy=fsdp2 or ddp"
        )


def check_config(cfg: DictConfig):
    """Every config mistake, before anything is built: (validated run config, trainer kwargs)."""
    run = parse_config(OmegaConf.to_container(cfg, resolve=True))
    trainer_kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    check_trainer(trainer_kw)
    if run.perf.compile and trainer_kw.get("strategy") == "fsdp":
        raise ConfigError(
            "invalid configuration: perf.compile with trainer.strategy=fsdp (FSDP1 swaps flat parameters "
            "under the compiled blocks; untested): use trainer.strategy=fsdp2, or perf.compile=false"
        )
    return run, trainer_kw


def build_strategy(trainer: dict, model: torch.nn.Module):
    """``trainer.strategy`` as Lightning understands it; ``fsdp`` and ``fsdp2`` get a wrapping
    of one unit per decoder block (lightning_cggr.distributed), other values pass through."""
    name = trainer.get("strategy", "auto")
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from .distributed import block_classes

        return FSDPStrategy(auto_wrap_policy=block_classes(model))
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy()  # CGGRModule.configure_model shards; see shard_fsdp2
    return name


def train(cfg: DictConfig, callbacks: list | None = None) -> dict[str, float]:
    """Build data, model and trainer from a composed config, fit, validate; return final metrics.

    ``cfg.ckpt_path`` resumes a run: model, optimizer, scheduler, step counters (so CGGR warmup and
    ratio schedules continue) and the position in the epoch's data. An exception or Ctrl-C saves
    ``checkpoints/last.ckpt`` first. ``callbacks`` are added to the trainer's own.
    """
    from lightning.pytorch.loggers import CSVLogger

    from .data import build_datamodule, build_tokenizer
    from .models import build_model
    from .module import CGGRModule
    from .callbacks import ResumableCheckpoint

    run, trainer_kw = check_config(cfg)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(ckpt_path).expanduser().exists():  # fsdp2 saves a folder
        raise ConfigError(f"invalid configuration: ckpt_path={ckpt_path}: no such checkpoint")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    tokenizer = build_tokenizer(run.data) if run.data.tokenizer == "bpe" else None
    model, tokenizer = build_model(run.model, tokenizer)
    datamodule = build_datamodule(run.data, tokenizer, seed=cfg.seed)
    try:  # what only the built model can tell: its architecture, its layer count for the router
        module = CGGRModule(model, run.cggr, run.loss, run.optim, perf=run.perf)
    except ValueError as err:
        raise ConfigError(f"invalid configuration: {err}") from err

    logger = CSVLogger(save_dir=str(out), name="csv", version="")
    checkpoint = ResumableCheckpoint(
        dirpath=str(out / "checkpoints"), save_last=True, save_top_k=0, save_on_exception=True
    )
    trainer_kw["strategy"] = build_strategy(trainer_kw, model)
    trainer = L.Trainer(
        **trainer_kw, logger=logger, callbacks=[checkpoint, *(callbacks or [])], default_root_dir=str(out)
    )
    initial = {}
    if not ckpt_path:  # the starting point, so the end can be compared with it
        initial = {f"{k}_initial": v for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(Path(ckpt_path).expanduser()) if ckpt_path else None)
    trainer.validate(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics.update(initial)
    log.info("final metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    log.info("run folder: %s (checkpoints/, csv/metrics.csv)", out)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        check_config(cfg)  # a mistake: one line, no config dump
        print(OmegaConf.to_yaml(cfg, resolve=True))
        train(cfg)
    except UserError as err:  # a mistake in the inputs: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except RunStopped as err:  # stopped on purpose (signal, divergence): its own exit code
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()

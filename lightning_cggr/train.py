"""Train a causal LM with CGGR.

CPU-sized example (the embedded default: a tiny Llama on CPython's own documentation text)::

    python -m lightning_cggr.train trainer.max_steps=50

The real job (SmolLM2-135M on one GPU)::

    python -m lightning_cggr.train +experiment=smollm

Every setting is a Hydra override; ``--cfg job`` prints the composed config without running.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from . import rundir
from .cli import omegaconf_problem, run_hydra, unknown_key_problems, version_line
from .config import (PRECISIONS_THAT_CAST, _is_int, config_error, fine_tuning_lr_warnings, lr_warnings, parse_config, register_schema,
                     routing_warnings)
from .distributed import release_process_groups
from .errors import MPS_PROBLEM, ConfigError, DataError, RunStopped, UserError, exit_on_user_error
from .perf import (
    auto_compile_off_because,
    compile_knob_problems,
    precision_warning,
    resolve_compile,
    scope_problem,
    sdpa_backend_problem,
    static_shape_problem,
    uses_cuda_graphs,
)
from .signals import exit_code, stopped_outside_training

log = logging.getLogger(__name__)

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
register_schema()  # the dataclass defaults, first in conf/train.yaml's defaults list


RESERVED_TRAINER_KEYS = {
    "callbacks": "the run's callbacks come from the callbacks group (callbacks=[best_checkpoint,lr_monitor,...] "
                 "or +callbacks.NAME._target_=...)",
    "logger": "the run's loggers come from the logger group (logger=csv, tensorboard, wandb or [csv,tensorboard])",
    "plugins": "train() installs its own checkpoint writer",
    "default_root_dir": "the run folder is hydra.run.dir (output_dir follows it)",
    "enable_checkpointing": "checkpoints/last.ckpt is always written; its cadence is checkpoint.every_n_steps",
    "barebones": "Lightning's barebones mode turns off checkpoints, loggers and the progress bar, and this job "
                 "always writes last.ckpt and logs; for raw step speed use experiments/throughput.py, or "
                 "Trainer(barebones=True) with CGGRModule from Python",
}
"""Trainer arguments that train() passes itself; setting them under ``trainer`` is a mistake."""


def run_device(trainer: dict) -> str:
    """The device type the trainer will train on: cpu, cuda or mps."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return accelerator


def check_trainer(trainer: dict) -> None:
    """Trainer settings that would otherwise fail only after the model and data are built."""
    strategy, accelerator = trainer.get("strategy"), str(trainer.get("accelerator", "auto"))
    device = run_device(trainer)
    if strategy == "fsdp" and device == "cpu":
        raise ConfigError(
            f"invalid configuration: trainer.strategy=fsdp needs GPUs (torch's FSDP1 refuses a CPU "
            f"device; trainer.accelerator={accelerator}); on CPU use trainer.strategy=fsdp2 or ddp"
        )
    if device == "mps":
        raise ConfigError(f"invalid configuration: trainer.accelerator={accelerator} {MPS_PROBLEM}; use "
                          f"trainer.accelerator=cpu")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"invalid configuration: trainer.accelerator={accelerator} but torch sees no CUDA GPU "
            f"(torch {torch.__version__}); use trainer=cpu or trainer.accelerator=auto"
        )


COMMON_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
"""``trainer.precision`` values accepted without asking Lightning (importing it takes seconds)."""


def precision_problem(precision) -> str | None:
    """Lightning's own check of ``trainer.precision`` (its message lists the accepted values), run
    before the model is built; None where it accepts the value or its check cannot be imported (the
    Trainer then reports it, after the build)."""
    if precision in COMMON_PRECISIONS:
        return None
    try:
        from lightning.fabric.connector import _convert_precision_to_unified_args
    except ImportError:
        return None
    try:
        _convert_precision_to_unified_args(precision)
    except ValueError as err:
        return f"trainer.precision={precision!r}: {' '.join(str(err).split())}"
    return None


def trainer_value_problems(trainer: dict) -> list[str]:
    """The ``trainer`` numbers that Lightning takes without a word and then fails on mid-run (a
    division by zero at the first step), turns into something else (a negative clipping norm flips
    FSDP's gradients) or refuses only after the model and data are built."""
    p = []
    steps = trainer.get("max_steps", -1)
    if not _is_int(steps) or steps < -1:
        p.append(f"trainer.max_steps={steps!r}: must be an integer >= 0 (0: only validate; -1: no step limit, "
                 f"+trainer.max_epochs ends the run)")
    for least, most, unit in (("min_steps", "max_steps", "optimizer steps"), ("min_epochs", "max_epochs", "epochs")):
        low, high = trainer.get(least), trainer.get(most)
        if low is None:
            continue
        if not _is_int(low) or low < 0:
            p.append(f"trainer.{least}={low!r}: must be an integer >= 0 (the fewest {unit} before early stopping "
                     f"may end the run) or null")
        elif _is_int(high) and 0 <= high < low:  # Lightning stops at the maximum and ignores the minimum
            p.append(f"trainer.{least}={low} is more than trainer.{most}={high}, which ends the run first; lower "
                     f"trainer.{least} or raise trainer.{most}")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if not _is_int(accumulate) or accumulate < 1:
        p.append(f"trainer.accumulate_grad_batches={accumulate!r}: must be an integer >= 1 (1: no accumulation)")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
        p.append(f"trainer.gradient_clip_val={clip!r}: must be a number >= 0 (0 or null: no clipping)")
    every = trainer.get("val_check_interval")
    per_epoch = trainer.get("check_val_every_n_epoch")
    if isinstance(every, bool) or (isinstance(every, (int, float)) and every <= 0):
        p.append(f"trainer.val_check_interval={every!r}: must be an integer >= 1 (training batches between "
                 f"validations)")
    elif isinstance(every, float) and per_epoch is None:
        p.append(f"trainer.val_check_interval={every!r}: a fraction of an epoch needs "
                 f"trainer.check_val_every_n_epoch (e.g. 1); give a number of steps instead, e.g. "
                 f"trainer.val_check_interval={max(1, round(every))}")
    elif isinstance(every, float) and every > 1:
        p.append(f"trainer.val_check_interval={every!r}: a fraction of an epoch must be in (0, 1]; give an "
                 f"integer for a number of steps")
    logs = trainer.get("log_every_n_steps", 50)
    if not _is_int(logs) or logs < 0:
        p.append(f"trainer.log_every_n_steps={logs!r}: must be an integer >= 0 (0: no step metrics logged)")
    if "precision" in trainer and (problem := precision_problem(trainer["precision"])):
        p.append(problem)
    return p


def master_weights_problem(dtype: str, lora_r: int, precision) -> str | None:
    """16-bit weights that train under a precision that keeps them as they are (``32-true``, ``*-mixed``):
    AdamW then updates the 16-bit weights themselves, with no fp32 master copy, and an update below a
    weight's 16-bit resolution (~0.4% in bf16) is lost (8 steps of a small model left its norms'
    weights unchanged). ``*-true`` asks for 16-bit training by name; LoRA trains fp32 adapters beside
    frozen 16-bit weights, which is what a 16-bit ``model.dtype`` is for there."""
    if dtype not in ("bfloat16", "float16") or lora_r:
        return None
    if str(precision) in PRECISIONS_THAT_CAST:
        return None
    return (f"model.dtype={dtype} loads 16-bit weights, and trainer.precision={precision} trains them as they are: "
            f"AdamW would update {dtype} weights with no fp32 master copy (updates below ~0.4% of a weight are "
            f"lost); use model.dtype=float32 (trainer.precision=bf16-mixed keeps fp32 weights and computes in "
            f"bf16), or trainer.precision=bf16-true to train 16-bit weights on purpose, or LoRA (model.lora.r)")


def largest_token_id(datamodule) -> int | None:
    """The largest token id of the data module's prepared splits (packed blocks or encoded
    conversations), or None where it keeps neither."""
    top = None
    for split in (getattr(datamodule, "train_set", None), getattr(datamodule, "val_set", None)):
        blocks = getattr(split, "blocks", None)
        if blocks is not None and blocks.numel():
            found = int(blocks.max())
        elif getattr(split, "examples", None):
            found = max(int(ex["input_ids"].max()) for ex in split.examples if len(ex["input_ids"]))
        else:
            continue
        top = found if top is None else max(top, found)
    return top


def vocabulary_problem(datamodule, model: torch.nn.Module, tokenizer) -> str | None:
    """Token ids the model's embedding table does not have, found once the data is tokenized, before
    any training (each batch is checked too, but the first one comes after the run has started)."""
    from .batches import embedding_rows

    rows, top = embedding_rows(model), largest_token_id(datamodule)
    if rows is None or top is None or top < rows:
        return None
    return (f"the data holds token id {top}, past the model's embedding table of {rows} rows (its tokenizer has "
            f"{len(tokenizer)} tokens): the tokenizer is not the model's, or it has tokens added without "
            f"resizing the model; use the model's own tokenizer, or save the model after "
            f"model.resize_token_embeddings(len(tokenizer))")


def validates(trainer: dict) -> bool:
    """Whether the run validates at all: ``trainer.limit_val_batches=0`` (or 0.0) turns it off."""
    return trainer.get("limit_val_batches", 1.0) != 0


def validation_warnings(callbacks: dict | None, trainer: dict) -> list[str]:
    """Callbacks that act at validations during training (``monitor: val/...``: the best checkpoint,
    early stopping) in a run without validations: ``trainer.limit_val_batches=0``, or a
    ``trainer.val_check_interval`` (training batches) longer than the run (``max_steps`` optimizer
    steps of ``accumulate_grad_batches`` batches). The validation after training is not one of them
    (the Trainer's fit is over by then)."""
    monitors = [name for name, spec in (callbacks or {}).items()
                if isinstance(spec, dict) and str(spec.get("monitor", "")).startswith("val/")]
    if not validates(trainer):
        return [f"callbacks.{name} acts at validations, and trainer.limit_val_batches=0 runs none: it will not "
                f"act; drop it (callbacks.{name}=null) or let validation run" for name in monitors]
    steps, every = trainer.get("max_steps", -1), trainer.get("val_check_interval")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if not (_is_int(steps) and steps > 0 and _is_int(every) and _is_int(accumulate) and accumulate >= 1):
        return []
    if trainer.get("check_val_every_n_epoch") is not None or every <= steps * accumulate:
        return []
    return [f"callbacks.{name} acts at validations during training, and trainer.val_check_interval={every} (batches) "
            f"is longer than the run ({steps} steps of {accumulate} batch(es)): none runs, so it will not act; "
            f"lower trainer.val_check_interval (e.g. {steps * accumulate})" for name in monitors]


def validation_cost_warning(val_examples: int, batch_size: int, trainer: dict) -> str | None:
    """A warning when each validation inside training runs more batches than the training between
    two of them (``trainer.val_check_interval`` batches): with a large corpus the default 5% held
    out otherwise makes validating a large share of the run. None when validation is off,
    limited enough, not at an interval of batches, or not inside the run (a run shorter than the
    interval validates only before and after training: a fixed cost, not a share of the run)."""
    every, steps = trainer.get("val_check_interval"), trainer.get("max_steps", -1)
    accumulate, limit = trainer.get("accumulate_grad_batches", 1), trainer.get("limit_val_batches", 1.0)
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    devices = len(devices) if isinstance(devices, (list, tuple)) else devices
    if not (_is_int(devices) and devices > 0 and _is_int(nodes) and nodes > 0):
        return None  # "auto" or -1: the ranks that share the held-out split are not known yet
    if not validates(trainer) or not _is_int(every) or trainer.get("check_val_every_n_epoch") is not None:
        return None
    if _is_int(steps) and steps >= 0 and _is_int(accumulate) and steps * accumulate < every:
        return None
    batches = math.ceil(val_examples / (batch_size * devices * nodes))
    if _is_int(limit):
        batches = min(batches, limit)
    elif isinstance(limit, float) and 0 < limit <= 1:
        batches = int(batches * limit)
    if batches <= every:
        return None
    return (f"each validation runs {batches} batches of the held-out split, more than the {every} training batches "
            f"between validations (trainer.val_check_interval): forward passes only, but a large share of the "
            f"run goes to validating; limit it (e.g. +trainer.limit_val_batches={max(1, every // 4)}: the same first "
            f"batches each time) or raise trainer.val_check_interval")


def check_loss_impl(impl: str, trainer: dict) -> None:
    """``loss.impl`` can run on the device the trainer will use (e.g. triton needs CUDA)."""
    from .kernels import resolve_impl

    device = run_device(trainer)
    try:
        resolve_impl(impl, torch.device(device))
    except (ValueError, RuntimeError) as err:
        reason = " ".join(str(err).split())
        raise ConfigError(
            f"invalid configuration: loss.impl={impl} cannot run on this run's device ({device}): {reason}; "
            f"use loss.impl=auto (triton on CUDA, torch elsewhere) or loss.impl=torch"
        ) from err


def slurm_requeue_checkpoint(folder: Path) -> bool:
    """Whether Lightning would load a SLURM requeue checkpoint (``hpc_ckpt_*.ckpt``) of ``folder``,
    the run's ``default_root_dir``, into a Trainer call given none: under SLURM, when there is one."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect() and any(folder.glob("hpc_ckpt_*.ckpt"))


def check_job_dir() -> None:
    """``hydra.job.chdir=true`` is refused: every relative path a run reads (``data.paths``, a local
    ``model.name``, ``ckpt_path``, ...) is taken from where the command starts, and the run writes
    its files into the run folder already; from inside it those paths would not be found."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().job.chdir:
        raise ConfigError(
            "invalid configuration: hydra.job.chdir=true: this job reads relative paths (data.paths, "
            "model.name, ckpt_path) from the folder it starts in and writes into its run folder anyway "
            "(hydra.run.dir); remove hydra.job.chdir")


def save_resolved_config(cfg: DictConfig) -> None:
    """Hydra writes the run's ``.hydra/config.yaml`` with its interpolations as typed
    (``${oc.env:CORPUS}``, ``${hydra:runtime.output_dir}``); the run's record (what export copies,
    what a folder without ``model/`` is rebuilt from) is the config the run used: the same file,
    resolved, once the config has been checked."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is None:
        return
    folder = Path(HydraConfig.get().runtime.output_dir) / str(HydraConfig.get().output_subdir)
    if (folder / "config.yaml").is_file():
        OmegaConf.save(cfg, folder / "config.yaml", resolve=True)


def check_config(cfg: DictConfig):
    """Every config mistake, before anything is built: (validated run config, trainer kwargs).

    Unknown keys anywhere (top level, ``trainer``, the schema groups), values, data files, the loss
    kernel against the run's device and a given checkpoint file: one :class:`ConfigError` (or the
    :class:`~lightning_cggr.errors.UserError` of the file at fault)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid configuration: {omegaconf_problem(err)}") from err
    problems = unknown_key_problems(plain, CONF_DIR, RESERVED_TRAINER_KEYS)
    if problems:
        raise config_error(problems)
    run = parse_config(plain)
    trainer_kw = dict(plain.get("trainer") or {})
    seed = plain.get("seed")
    problems = [] if _is_int(seed) else [f"seed={seed!r}: must be an integer"]
    if (trainer_kw.get("max_steps", -1), trainer_kw.get("max_epochs")) == (-1, -1) and run.optim.min_lr_ratio != 1.0:
        problems.append(f"trainer.max_steps=-1 with trainer.max_epochs=-1 trains without end, and the cosine LR "
                        f"schedule (optim.min_lr_ratio={run.optim.min_lr_ratio}) needs the run's length; give "
                        f"trainer.max_steps, or optim.min_lr_ratio=1.0 for a constant LR after the warm-up")
    if problems := problems + trainer_value_problems(trainer_kw):
        raise config_error(problems)
    asked = run.perf
    run.perf = dataclasses.replace(asked, compile=resolve_compile(
        asked.compile, run_device(trainer_kw), trainer_kw.get("strategy"), trainer_kw.get("devices", 1)))
    if problems := compile_knob_problems(asked, run.perf.compile, auto_compile_off_because(
            run_device(trainer_kw), trainer_kw.get("strategy"), trainer_kw.get("devices", 1))):
        raise config_error(problems)
    if run.perf.compile and trainer_kw.get("strategy") == "fsdp":
        raise ConfigError(
            "invalid configuration: perf.compile with trainer.strategy=fsdp (FSDP1 swaps flat parameters "
            "under the compiled blocks; untested): use trainer.strategy=fsdp2, or perf.compile=false"
        )
    check_trainer(trainer_kw)
    if problem := scope_problem(run.perf.compile_scope, run.perf.compile, trainer_kw.get("strategy"),
                                trainer_kw.get("devices", 1)):
        raise ConfigError(f"invalid configuration: {problem}")
    if problem := static_shape_problem(run):
        raise ConfigError(f"invalid configuration: {problem}")
    if uses_cuda_graphs(run.perf.compile) and run_device(trainer_kw) != "cuda":
        raise ConfigError(
            f"invalid configuration: perf.compile={run.perf.compile} records CUDA graphs and needs a CUDA "
            f"device (this run's is {run_device(trainer_kw)}); use perf.compile=true"
        )
    if problem := sdpa_backend_problem(run.perf.sdpa_backend, run.model.attn_implementation, run_device(trainer_kw),
                                       masked=run.data.source == "chat"):
        raise ConfigError(f"invalid configuration: {problem}")
    if problem := master_weights_problem(run.model.dtype, run.model.lora.r, trainer_kw.get("precision", "32-true")):
        raise ConfigError(f"invalid configuration: {problem}")
    check_loss_impl(run.loss.impl, trainer_kw)
    ckpt_path = plain.get("ckpt_path")
    if isinstance(ckpt_path, str) and Path(ckpt_path).expanduser().exists():  # a missing one: train() says so
        from .export import check_checkpoint

        check_checkpoint(Path(ckpt_path).expanduser(), what="ckpt_path")
    return run, trainer_kw


def build_strategy(trainer: dict, model: torch.nn.Module):
    """``trainer.strategy`` as Lightning understands it; ``fsdp`` and ``fsdp2`` get a wrapping
    of one unit per decoder block (lightning_cggr.distributed), other values pass through.
    ``fsdp2`` saves its checkpoint folder atomically (lightning_cggr.checkpointing)."""
    name = trainer.get("strategy", "auto")
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from .distributed import block_classes

        return FSDPStrategy(auto_wrap_policy=block_classes(model))
    if name == "fsdp2":
        from .checkpointing import _model_parallel_strategy

        return _model_parallel_strategy()()  # CGGRModule.configure_model shards; see shard_fsdp2
    return name


def instantiate_group(node, group: str, skip: Sequence[str] = ()) -> list:
    """The objects of a config group of ``{name: {_target_: class, **kwargs}}`` entries (the Hydra
    way, so users add their own); an entry set to null, or named in ``skip``, is left out. A mistake
    is a ConfigError."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if node is None:
        return []
    if not isinstance(node, DictConfig):
        raise ConfigError(f"invalid configuration: {group} must be a mapping of NAME: {{_target_: ...}}, got {node!r}")
    objects = []
    for name, spec in node.items():
        if spec is None or name in skip:
            continue
        if not isinstance(spec, DictConfig) or "_target_" not in spec:
            raise ConfigError(f"invalid configuration: {group}.{name} needs a _target_ (the class to build)")
        try:
            objects.append(instantiate(spec))
        except InstantiationException as err:
            cause = err.__cause__ or err
            raise ConfigError(f"invalid configuration: {group}.{name}: {str(cause).splitlines()[0]}") from err
    return objects


class _DropAdvert(logging.Filter):
    """Drops Lightning's tip to install its cloud logger, which it prints at every Trainer built
    without one: not a notice about the run, and the same line in every run's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def tidy_lightning_logging() -> None:
    """Each Lightning notice once, without the advert. Lightning's top package gives the ``lightning``
    logger a console handler of its own when imported, yet lets its records go on to the root
    logger: where the root logger has handlers already (Hydra's console and ``train.log``, or a
    script's ``logging.basicConfig``), every notice was printed twice. That handler is dropped
    then; with no root handlers it stays, the only place Lightning's notices would show."""
    import lightning

    console = getattr(lightning, "_console", None)
    if logging.getLogger().handlers and console is not None:
        logging.getLogger("lightning").removeHandler(console)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvert) for f in logger.filters):
            logger.addFilter(_DropAdvert())


def is_rank_zero() -> bool:
    """Whether this process is global rank 0: a multi-process launch (``trainer=ddp``) runs the job
    in every rank's process. Lightning's rank, from the launch's environment."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def rank_zero_logger() -> logging.Logger:
    """This module's logger on the process of global rank 0, a silenced one elsewhere: the start
    warnings and final lines of ``train()`` came once per rank."""
    if is_rank_zero():
        return log
    quiet = logging.getLogger(f"{log.name}.other_ranks")
    quiet.disabled = True
    return quiet


def train(cfg: DictConfig, callbacks: list | None = None) -> dict[str, float]:
    """Build data, model and trainer from a composed config, fit, validate; return final metrics:
    the final validation's (``val/loss``, ``val/ppl``), the starting point's (``val/loss_initial``...)
    and the last optimizer step's ``train/*`` values (``train/loss``, ``train/kept_ratio``...).

    ``cfg.ckpt_path`` resumes a run (see :mod:`lightning_cggr.rundir`): ``auto`` continues the run
    folder's own ``checkpoints/last.ckpt`` in place (or starts the run), a path resumes that
    checkpoint. Model, optimizer, scheduler, step counters (so CGGR warmup and ratio schedules
    continue), the position in the epoch's data and the loggers' history come back.
    ``checkpoints/last.ckpt`` is written periodically, at validation, at the end, on SIGTERM/SIGINT
    (then :class:`RunStopped`, exit 128 + signal) and, in one process, on an exception; a diverged
    run stops with exit 3 (:class:`~lightning_cggr.callbacks.ResumableCheckpoint`).
    ``callbacks`` are added to those of the ``callbacks`` group.
    """
    import lightning as L  # here, not at the top: a config mistake is reported before Lightning loads (seconds)
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar
    from lightning.pytorch.strategies import FSDPStrategy

    from .callbacks import (FormulaModelSummary, OptimizerStepLabels, ResumableCheckpoint, StagePyTorchProfiler,
                            StepProgressBar, default_every_n_steps)
    from .checkpointing import AtomicCheckpointIO, estimate_checkpoint_bytes, preflight, recover_folder_checkpoint
    from .data import build_tokenizer, prepare_datamodule
    from .export import save_run_model_files
    from .loggers import prepare_loggers
    from .models import build_model, model_tokenizer
    from .models.positions import sequence_length_problem
    from .module import CGGRModule
    from .rundir import plan_run
    from .signals import StopRequest

    tidy_lightning_logging()
    say = rank_zero_logger()  # the other ranks of a multi-process launch run this too: said once
    run, trainer_kw = check_config(cfg)
    callbacks_node = cfg.get("callbacks")  # None with callbacks=none
    callbacks_cfg = OmegaConf.to_container(callbacks_node, resolve=False) if callbacks_node else {}
    steps = trainer_kw.get("max_steps")
    for warning in [*routing_warnings(run, steps), *lr_warnings(run.optim, steps), *fine_tuning_lr_warnings(run),
                    *validation_warnings(callbacks_cfg, trainer_kw)]:
        say.warning(warning)
    if slow := precision_warning(trainer_kw.get("precision"), run_device(trainer_kw)):
        say.warning(slow)
    out = Path(cfg.output_dir).absolute()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    plan = plan_run(resolved, out)  # before anything is written to the folder
    loggers = instantiate_group(cfg.get("logger"), "logger")
    # a learning-rate monitor writes only into the loggers: with none (logger=none) it is left out,
    # and said so, rather than refused (the default callbacks hold one)
    unlogged = [] if loggers else [
        name for name, spec in (cfg.get("callbacks") or {}).items()
        if spec is not None and str(spec.get("_target_", "")).endswith("LearningRateMonitor")]
    for name in unlogged:
        say.info("logger=none: callbacks.%s (the learning rate in the metrics) is left out, with no logger "
                 "to write to", name)
    user_callbacks = instantiate_group(cfg.get("callbacks"), "callbacks", skip=unlogged)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # no line before a user error's one line

    # the data is read, tokenized and checked to fill a batch before the model's weights load where
    # the tokenizer comes first (the corpus's own BPE, or a pretrained checkpoint's tokenizer files),
    # else (the GGUF, whose tokenizer comes out of its conversion) as soon as the model is there
    bpe = run.data.tokenizer == "bpe"
    tokenizer = build_tokenizer(run.data, plan.tokenizer) if bpe else model_tokenizer(run.model)
    if bpe and len(tokenizer) < run.data.vocab_size:  # the ceiling asked for is not what the model gets
        say.info("BPE tokenizer: %s tokens (data.vocab_size=%s is its ceiling; the corpus has no more pairs "
                 "seen twice to merge)", f"{len(tokenizer):,}", run.data.vocab_size)
    datamodule = prepare_datamodule(run.data, tokenizer, seed=cfg.seed) if tokenizer is not None else None
    model, tokenizer = build_model(run.model, tokenizer)
    too_long, past_range = sequence_length_problem(model, run.data.block_size, random=run.model.source == "random")
    if too_long:
        raise ConfigError(f"invalid configuration: {too_long}")
    if past_range:
        say.warning(past_range)
    save_run_model_files(out, model, tokenizer)  # model/: the HF config and tokenizer, for export
    if datamodule is None:
        datamodule = prepare_datamodule(run.data, tokenizer, seed=cfg.seed)
    if problem := vocabulary_problem(datamodule, model, tokenizer):
        raise DataError(problem)
    if costly := validation_cost_warning(len(datamodule.val_set), run.data.batch_size, trainer_kw):
        say.warning(costly)
    for note in ("split_note", "truncation_note"):  # what the data module's own choices cost
        if hasattr(datamodule, note) and (said := getattr(datamodule, note)()):
            say.warning(said)
    try:  # what only the built model can tell: its architecture, its layer count for the router
        module = CGGRModule(model, run.cggr, run.loss, run.optim, perf=run.perf)
    except ValueError as err:
        raise ConfigError(f"invalid configuration: {err}") from err
    module.run_config = resolved
    module.run_tokenizer = tokenizer.backend_tokenizer.to_str() if bpe else None
    train_set = getattr(datamodule, "train_set", None)
    module.run_data = train_set.fingerprint() if hasattr(train_set, "fingerprint") else None

    ckpt_dir = out / "checkpoints"
    if plan.ckpt is not None:
        recover_folder_checkpoint(ckpt_dir / "last.ckpt")
    preflight(ckpt_dir, estimate_checkpoint_bytes(model))
    prepare_loggers(loggers, plan.start_step)
    every = run.checkpoint.every_n_steps
    every = default_every_n_steps(trainer_kw.get("max_steps", -1)) if every is None else every
    checkpoint = ResumableCheckpoint(dirpath=str(ckpt_dir), every_n_steps=every, stop=StopRequest())
    extra = [OptimizerStepLabels(), *user_callbacks, *(callbacks or [])]
    if trainer_kw.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in extra):
        extra.append(StepProgressBar())
    if trainer_kw.get("enable_model_summary", True) and not any(isinstance(c, ModelSummary) for c in extra):
        extra.append(FormulaModelSummary(run.data.batch_size, run.data.block_size,  # Lightning's counts 0
                                         padded=run.data.source == "chat"))
        # it stands in for Lightning's default summary: with the flag on, Lightning would announce
        # at every run that it skips its own
        trainer_kw["enable_model_summary"] = False
    if trainer_kw.get("profiler") == "pytorch":  # Lightning's, which failed at the job's third Trainer call
        trainer_kw["profiler"] = StagePyTorchProfiler()
    trainer_kw["strategy"] = build_strategy(trainer_kw, model)
    # FSDP1 wraps the blocks in place when a trainer first sets the model up: a validate() before fit
    # would leave fit a model whose blocks are wrapped but whose root is not (embeddings and head in
    # no FSDP unit, clipping refused). Its starting point is measured by fit's own sanity pass instead.
    in_fit_start = isinstance(trainer_kw["strategy"], FSDPStrategy) and plan.ckpt is None
    if in_fit_start:
        trainer_kw["num_sanity_val_steps"] = -1  # every validation batch, as validate() would
    try:
        trainer = L.Trainer(
            **trainer_kw, logger=loggers or False, callbacks=[checkpoint, *extra], plugins=[AtomicCheckpointIO()],
            default_root_dir=str(out),
        )
    except (MisconfigurationException, ValueError) as err:  # what trainer_value_problems does not check
        raise ConfigError(f"invalid configuration: trainer: {' '.join(str(err).split())}") from err
    def validated(**kw) -> dict[str, float]:
        """What a validation returns (not the Trainer's callback_metrics, which may hold more: under
        ddp_spawn Lightning merges the workers' into the main process's, fit's learning rates among them).

        Of the module's weights as they are, also under SLURM: there Lightning's validate without a
        checkpoint loads the newest ``hpc_ckpt_*.ckpt`` of the run folder (its requeue save, written
        at a SIGUSR1 mid-run), which would report a stale model's loss; the run's own last.ckpt,
        written at its last step, holds the weights in memory."""
        if "ckpt_path" not in kw and slurm_requeue_checkpoint(out) and (ckpt_dir / "last.ckpt").exists():
            kw["ckpt_path"] = str(ckpt_dir / "last.ckpt")
        return {k: float(v) for results in trainer.validate(module, datamodule=datamodule, **kw) for k, v in results.items()}

    initial = {}
    validating = validates(trainer_kw)
    if not validating:
        say.info("trainer.limit_val_batches=0: no validation before, during or after training (no val/loss)")
    if plan.ckpt is None and not in_fit_start and validating:  # the starting point, to compare the end with
        initial = {f"{k}_initial": v for k, v in validated(verbose=False).items()}
    elif plan.ckpt is not None:
        initial = dict(plan.initial or {})  # the run's own starting point, from its checkpoint
        say.info("resuming %s at step %d%s", plan.ckpt, plan.start_step, " in place" if plan.in_place else "")
        if trainer_kw.get("max_time"):
            say.info("trainer.max_time=%s counts the whole run's training time, this resume's included (Lightning "
                     "keeps the time trained so far in the checkpoint): a run that stopped at it trains nothing more "
                     "unless it is raised", trainer_kw["max_time"])
        max_steps = trainer_kw.get("max_steps", -1)
        if 0 <= max_steps <= plan.start_step:
            say.warning("the checkpoint is at step %d, and trainer.max_steps=%d is the whole run's length (not steps "
                        "to add): nothing trains; to train further raise it, e.g. "
                        "trainer.max_steps=%d", plan.start_step, max_steps, plan.start_step + max(max_steps, 1))
    module.run_initial = initial  # into every checkpoint: a resume reports the same starting point
    with warnings.catch_warnings():
        if plan.in_place:  # the run's own folder holds its checkpoints: that is what resuming in place is
            names = "|".join(re.escape(p) for p in {str(ckpt_dir), os.path.realpath(ckpt_dir)})
            warnings.filterwarnings("ignore", message=f"Checkpoint directory ({names}) exists and is not empty")
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(plan.ckpt) if plan.ckpt else None)
        except SystemExit as err:  # Lightning ends a KeyboardInterrupt (a second Ctrl-C) with exit(1)
            if err.code != 1 or not trainer.interrupted:
                raise
            saved = (f"saved {checkpoint.last_model_path} at step {checkpoint._last_global_step_saved}"
                     if checkpoint.last_model_path else "nothing saved")
            raise RunStopped(f"SIGINT received again: stopped at once at step {trainer.global_step}, {saved}; "
                             "resume with ckpt_path=auto in the same run folder", exit_code(signal.SIGINT)) from None
    if in_fit_start:
        initial = {f"{k}_initial": float(v) for k, v in module.sanity_metrics.items()}
    # the last optimizer step's train/* values (validate below starts its own set of metrics)
    last_step = {k: v for k, v in _scalars(trainer.callback_metrics).items() if k.startswith("train/")}
    final = validated() if validating else {}
    metrics = {**last_step, **final, **initial}
    say.info("final metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    if (ckpt_dir / "last.ckpt").exists():
        say.info("run folder: %s (checkpoints/last.ckpt; resume with ckpt_path=auto hydra.run.dir=<this folder>)", out)
    elif trainer.fast_dev_run:  # Lightning's smoke test: no checkpoint, no logger
        say.info("run folder: %s (no checkpoint: trainer.fast_dev_run writes none)", out)
    else:  # trainer.max_steps=0: validated only
        say.info("run folder: %s (no checkpoint: the run took no optimizer step)", out)
    return metrics


def _scalars(logged: Mapping) -> dict[str, float]:
    """The one-number entries of a Trainer's ``callback_metrics`` (one host read, after the run)."""
    return {k: float(v) for k, v in logged.items() if torch.is_tensor(v) and v.numel() == 1}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The Hydra task: validate, print the resolved config, train; returns the final val/loss, the
    objective of Hydra sweepers (e.g. Optuna), to minimise. The command line enters through
    :func:`cli`, which presents mistakes as one line."""
    # inside the Hydra job, so that Hydra adds no report of its own (a multirun's job: see there)
    with exit_on_user_error(sweep_job=rundir.in_multirun()):
        try:
            check_job_dir()
            check_config(cfg)  # a mistake: one line, no config dump
            if is_rank_zero():  # once, not once per rank
                print(OmegaConf.to_yaml(cfg, resolve=True))
                save_resolved_config(cfg)
            metrics = train(cfg)
        except UserError:
            rundir.discard_new_run_folder()  # a failed run leaves no empty run folder behind
            raise
        except RunStopped:  # a signal or divergence every rank agreed on
            release_process_groups()
            raise
        except KeyboardInterrupt:  # Ctrl-C where no handler of the run's is installed (data, model build)
            rundir.discard_new_run_folder()  # nothing saved yet: no empty run folder either
            release_process_groups()
            raise stopped_outside_training(signal.SIGINT) from None
        release_process_groups()
        return metrics.get("val/loss")


def cli() -> None:
    """``python -m lightning_cggr.train`` and the ``lightning-cggr-train`` console script: a user
    mistake ends with one line and exit code 2 (see :func:`lightning_cggr.cli.run_hydra`)."""
    # Lightning's own pytree helper trips a torch deprecation at every fit; nothing a user can change
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")
    if "--version" in sys.argv[1:]:  # Hydra's own --version names Hydra's version alone
        print(version_line())
        return
    if sys.argv[0].endswith(".py") and any(a in ("--hydra-help", "-sc", "--shell-completion")
                                           or a.startswith("--shell-completion=") for a in sys.argv[1:]):
        # Hydra's shell completion calls the command again as `python <file>` or by name: a package
        # module run as a file cannot import, so name the console script (what completion works with)
        sys.argv[0] = "lightning-cggr-train"
    run_hydra(main, CONF_DIR, RESERVED_TRAINER_KEYS)


if __name__ == "__main__":
    cli()

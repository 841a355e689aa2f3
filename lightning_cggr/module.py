"""CGGRModule: the Lightning adapter around the one training step (:mod:`lightning_cggr.step`).

Everything a step computes (routing, selection, the loss terms, the kept-token normalisation) lives
in :class:`~lightning_cggr.step.CGGRStep`; this module only connects it to the Trainer: it owns
the model (so checkpoints hold it) and its settings (Lightning hyperparameters, so
``load_from_checkpoint(path, model=...)`` rebuilds it), checks every batch on the host before it
moves to the device (:mod:`lightning_cggr.batches`), logs the step's metrics (torchmetrics, device
tensors, no host sync), rescales gradients in ``on_before_optimizer_step``, validates and tests on
every trainable token (one loss per loader), builds the optimizer and LR schedule with the step's
builders and applies FSDP2 sharding.

Throughput (``train/tokens_per_sec``, ``train/mfu``) is measured over windows of optimizer steps
between the logging interval's boundaries (``trainer.log_every_n_steps``), each boundary taken
after a device sync (where the logger and the health check sync anyway): with no sync in between,
the host runs ahead of the device and the time between two ``training_step`` calls says how fast
kernels are queued, not run. The first step of a run (compilation) is left out, and so are the
validations and checkpoint saves inside a window: from their start (after a sync) to the next
training batch, their time is subtracted; a save at a boundary falls between two windows.

Run health, kept on the device and read only where the host syncs anyway (the logging interval,
a checkpoint): ``first_nonfinite_step`` is the first optimizer step whose loss or gradient norm was
not finite (``NO_STEP`` while none was), ``empty_batches`` counts micro-batches without a single
trainable token since it was last reset. :class:`~lightning_cggr.callbacks.ResumableCheckpoint`
reads both, stops a diverged run and warns about empty batches. Validation reports a NaN loss as
NaN (never dropped) and a validation set without trainable tokens as NaN with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Mapping

import lightning as L
import torch
from torchmetrics import Metric, SumMetric

from .batches import check_batch, embedding_rows
from .config import (PRECISIONS_THAT_CAST, CGGRConfig, LossConfig, OptimConfig, PerfConfig, as_config, config_error,
                     optim_problems)
from .distributed import shard_fsdp2, unshared
from .errors import MPS_PROBLEM, ConfigError
from .flops import FlopShape, device_peak_tflops, mfu, step_flops
from .step import CGGRStep, build_optimizer, build_scheduler

# metrics the step may return, each averaged over the optimizer step by its own torchmetrics object
STEP_METRICS = ("kept_ratio", "ratio", "score_kept", "score_dropped", "kept_sequences", "weight_mean", "prune")

CONFIG_KEY = "lightning_cggr"
"""Checkpoint key of ``{"config": the run's resolved config}`` (every checkpoint, weights-only ones
included, when ``run_config`` is set): what :mod:`lightning_cggr.rundir` checks a resume against."""

NO_STEP = torch.iinfo(torch.int64).max
"""``first_nonfinite_step`` while every loss and gradient norm so far was finite."""

log = logging.getLogger(__name__)

# Lightning warns whenever a datamodule is given that the module's on_before_batch_transfer is the
# one used, also for a datamodule without that hook; here that hook is the batch check, by design
warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule` "
                        r"but have passed in a `LightningDataModule`")


_clock = time.perf_counter  # the host clock of the throughput windows (a test may replace it)


def logging_step(trainer, step: int) -> bool:
    """Whether optimizer step ``step`` (> 0) ends a logging interval, ``trainer.log_every_n_steps``:
    where the logger reads the device metrics, so where the throughput windows, the progress bar and
    the health check sync too. With 0 none does (Lightning then logs no step metric), so nothing
    syncs at every step either."""
    every = int(trainer.log_every_n_steps or 0)
    return every > 0 and step > 0 and step % every == 0


def real_tokens(batch) -> int | None:
    """A batch's tokens that are not padding (its ``attention_mask``'s ones), counted while the batch
    is still on the CPU; all of ``input_ids`` without a mask; None for a batch already on a device
    (counting there would wait for it: its padding is then counted, as the caller's fallback)."""
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if mask is None:
        return ids.numel() if isinstance(ids, torch.Tensor) else None
    return int(mask.sum()) if isinstance(mask, torch.Tensor) and mask.device.type == "cpu" else None


@dataclasses.dataclass
class _Window:
    """Host numbers of the optimizer steps since a throughput boundary (see the module docstring)."""

    start: float
    tokens: int = 0  # every rank's
    flops: float = 0.0  # this device's model FLOPs
    excluded: float = 0.0  # seconds of validations and saves inside the window


class _SteadyStates:
    """A metric whose states keep their dtypes when the module is cast, stay ordinary tensors when it
    is reset under inference mode, and are a process's own when it is unpickled (Lightning's
    ``ddp_spawn``: see :func:`~lightning_cggr.distributed.unshared`).

    torchmetrics guards ``.half()``, ``.float()`` and the like, but not ``Module.to(dtype=...)``,
    which is how Lightning's ``bf16-true`` / ``16-true`` precision converts the LightningModule: the
    held-out NLL sums, token counts and the routing metrics' float64 sums then accumulated in bf16
    (integers exact only to 256; a validation loss off in its third digit). A cast changes the
    model's compute dtype, never what a metric sums in."""

    def _apply(self, fn, exclude_state=()):
        dtypes = {k: v.dtype for k, v in self._defaults.items() if isinstance(v, torch.Tensor)}
        this = super()._apply(fn, exclude_state)
        for key, dtype in dtypes.items():
            this._defaults[key] = this._defaults[key].to(dtype)
            setattr(this, key, getattr(this, key).to(dtype))
        return this

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(unshared(state, nested=("_defaults",)))  # sums of this process's own (see unshared)

    def reset(self) -> None:
        """Lightning runs ``trainer.validate`` under ``torch.inference_mode`` (its default), and the
        held-out sums are reset at the end of each pass: states made there were inference tensors,
        which torch forbids updating in place outside inference mode, so the next validation inside
        ``fit`` (run under ``no_grad``) failed at its first batch. That is ``validate`` then ``fit``,
        a user's usual way to see the starting point."""
        with torch.inference_mode(False):
            super().reset()


class _Sum(_SteadyStates, SumMetric):
    """torchmetrics' SumMetric, in float32 under every precision (see :class:`_SteadyStates`)."""


class WeightedMean(_SteadyStates, Metric):
    """``sum(value x count) / sum(count)`` over its updates (0 when nothing was counted), on the device.

    One per routing metric: it gathers an optimizer step's micro-batches (``count``: how many tokens
    or sequences each value averages, :attr:`~lightning_cggr.step.StepResult.counts`); the module sums
    its two states over the ranks in the all-reduce the gradient correction makes anyway, instead of
    torchmetrics' own sync (a barrier and a gather per state). torchmetrics' MeanMetric would do, but
    with ``nan_strategy="disable"`` (needed: its NaN check is a host sync) it drops the weights
    (torchmetrics 1.9, Lightning-AI/torchmetrics#3434)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__(sync_on_compute=False)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, count: torch.Tensor | None = None) -> None:
        """``value``: a 0-d device tensor, the mean of ``count`` entries (None: one). Device ops only
        (a count made from a host number would be a copy to the device, a sync on a GPU)."""
        count = torch.ones_like(value, dtype=torch.float64) if count is None else count.double()
        self.total += value.detach().double() * count
        self.count += count

    def compute(self) -> torch.Tensor:
        return self.mean(self.total, self.count)

    @staticmethod
    def mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return torch.where(count > 0, total / count.clamp(min=1e-300), 0.0).float()


class CGGRModule(L.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        cggr: CGGRConfig | Mapping | None = None,
        loss: LossConfig | Mapping | None = None,
        optim: OptimConfig | Mapping | None = None,
        reference: torch.nn.Module | None = None,
        perf: PerfConfig | Mapping | None = None,
    ):
        """``reference``: the frozen model of scoring=excess_loss; ``perf``: efficiency options
        (see :class:`CGGRStep`). Each config is its dataclass, a mapping of its settings (the Hydra
        job's keys, e.g. ``{"min_tokens_ratio": 0.5}``) or None for the defaults."""
        super().__init__()
        self.model = model
        cggr, loss = as_config(cggr, CGGRConfig, "cggr"), as_config(loss, LossConfig, "loss")
        perf = as_config(perf, PerfConfig, "perf")  # as asked: the step resolves compile=auto by device
        self.step = CGGRStep(model, cggr, loss, reference, perf=perf)
        self.sanity_metrics: dict[str, torch.Tensor] = {}  # the last sanity pass (see on_validation_epoch_end)
        self.optim_cfg = as_config(optim, OptimConfig, "optim")
        if problems := optim_problems(self.optim_cfg):
            raise config_error(problems)
        # the settings as mappings in every checkpoint: CGGRModule.load_from_checkpoint(path, model=...)
        # rebuilds this module with them, not with the defaults (the model and reference are passed again)
        self.save_hyperparameters(settings_of(cggr, loss, self.optim_cfg, perf))
        # each routing metric over an optimizer step's micro-batches (logged in on_before_optimizer_step)
        self.step_metrics = torch.nn.ModuleDict({k: WeightedMean() for k in STEP_METRICS})
        # "disable": a NaN loss must show as NaN (the default "warn" drops NaNs: a diverged model
        # reported val/loss 0.0); it is also free of the default's per-update host sync
        self.val_nll_sum = _Sum(nan_strategy="disable")
        self.val_tokens = _Sum(nan_strategy="disable")
        self._more_loaders: dict[int, tuple[SumMetric, SumMetric]] = {}
        """The same sums for a second, third... validation or test loader (made at its first batch)."""
        # run health (see the module docstring): device tensors, not checkpointed
        self.register_buffer("first_nonfinite_step", torch.tensor(NO_STEP), persistent=False)
        self.register_buffer("empty_batches", torch.tensor(0), persistent=False)
        self._window: _Window | None = None  # throughput: the open window, if any
        self._batch_tokens: int | None = None  # the next training batch's tokens, counted on the CPU
        self._clip_norm: torch.Tensor | None = None  # this step's gradient norm, as clipping computes it
        self._window_pending = False  # a window closed before this batch's callbacks; open one after them
        self._closed_at = -1  # the optimizer step whose boundary closed the last window
        self._paused_at: float | None = None  # a validation or save inside the window started then
        self._timing_from = 0  # the run's first step here (compilation): not timed
        self._throughput: tuple[float, float | None] | None = None  # the last window's (tokens/s, MFU)
        self.run_config: dict | None = None
        """The resolved run config (plain containers), stored in every checkpoint under CONFIG_KEY."""
        self.run_tokenizer: str | None = None
        """The BPE the run trained on its corpus (``tokenizers`` JSON), stored beside the config:
        a resume tokenizes with it (see :class:`lightning_cggr.rundir.RunPlan`)."""
        self.run_data: str | None = None
        """The training set's fingerprint, stored beside the config: a resume whose checkpoint has
        one may read its data from other paths (see :func:`lightning_cggr.rundir.plan_run`)."""
        self.run_initial: dict[str, float] | None = None
        """The run's starting point (``val/loss_initial``..., host floats), stored beside the config:
        a resumed run's final metrics report it again."""
        self._peak: float | None = None  # dense bf16 TFLOPS of the card, found at the first step
        self.flop_shape: FlopShape | None = None
        """The FLOP formula's view of the model (lightning_cggr.flops), read before any sharding
        wrapper flattens its parameters; None for a model the formula does not know (no train/mfu)."""
        try:
            self.flop_shape = FlopShape.of(model, self.step.logit_transform)
        except ValueError as err:  # said once, here
            log.warning("no train/mfu for this model: %s", err)
        # what a batch's ids and labels may index (lightning_cggr.batches), read before any sharding
        self._batch_rows = (int(self.step.head.weight.shape[0]), embedding_rows(model))
        # metric states are created on the CPU: follow a model that is already on its device, so a
        # module used without a Trainer (which would move it) never mixes devices
        first = next(model.parameters(), None)
        if first is not None:
            self.to(first.device)

    @property
    def lr(self) -> float:
        """``optim.lr``, under the name Lightning's learning-rate finder looks for
        (``Tuner(trainer).lr_find(module, ...)`` reads it and sets its suggestion here); setting it
        also updates the hyperparameters that checkpoints store."""
        return self.optim_cfg.lr

    @lr.setter
    def lr(self, value: float) -> None:
        optim = dataclasses.replace(self.optim_cfg, lr=value)
        if problems := optim_problems(optim):
            raise config_error(problems)
        self.optim_cfg = optim
        self.hparams["optim"]["lr"] = optim.lr

    # ---- Lightning hooks ---------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None):
        return self.step.hidden_states(input_ids, attention_mask)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        """Every batch is checked where the loader made it, before it moves to the device
        (:mod:`lightning_cggr.batches`: structure always, values while on the CPU; no device sync).
        A training batch that starts a due optimizer step first closes the throughput window: this
        hook runs before the callbacks' ``on_train_batch_start``, where checkpoints are saved."""
        check_batch(batch, *self._batch_rows)
        if self._trainer is not None and self.trainer.training:
            self._close_window_if_due()
            self._batch_tokens = real_tokens(batch)
        return batch

    # ---- throughput windows (see the module docstring) -----------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _close_window_if_due(self) -> None:
        t = self.trainer
        step = t.global_step
        if step <= self._timing_from or step == self._closed_at:  # (accumulation: once per step)
            return
        if step != self._timing_from + 1 and not logging_step(t, step):
            return
        self._sync()  # the window's work is done: its time is the device's
        now, w = _clock(), self._window
        if w is not None and w.tokens:
            seconds = now - w.start - w.excluded
            if seconds > 0:
                utilization = mfu(w.flops, seconds, self._peak) if w.flops else None
                self._throughput = (w.tokens / seconds, utilization)
        self._window, self._closed_at, self._window_pending = None, step, True

    def on_train_start(self):
        from .data.resumable import load_saved_position

        load_saved_position(self.trainer)  # a resume with trainer.max_epochs: see there
        self._timing_from = self.trainer.global_step
        self._window, self._window_pending, self._closed_at, self._paused_at = None, False, -1, None
        if self.run_config is None:  # built from Python: the warnings the train command gives at its start
            self._warn_settings()

    def _warn_settings(self) -> None:
        """Valid settings that leave part of what was asked undone (a warm-up as long as the run, a
        batch too small for sequence routing to drop one, a kept ratio of 1...), as Python warnings,
        on rank 0; the train command says the same in its log before it builds anything."""
        from lightning.pytorch.utilities import rank_zero_warn

        from .config import DataConfig, ModelConfig, RunConfig, lr_warnings, routing_warnings

        total = self._run_length()
        batch = getattr(self.trainer.train_dataloader, "batch_size", None)  # None: unknown, no batch claim
        run = RunConfig(model=ModelConfig(), data=DataConfig(batch_size=batch if isinstance(batch, int) else 2**31),
                        cggr=self.step.cggr, loss=self.step.loss_cfg, optim=self.optim_cfg)
        for warning in [*routing_warnings(run, total), *lr_warnings(self.optim_cfg, total)]:
            rank_zero_warn(warning)
        half = sorted({str(p.dtype).removeprefix("torch.") for p in self.model.parameters()
                       if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)})
        precision = str(self.trainer.precision)
        if half and precision not in PRECISIONS_THAT_CAST:
            rank_zero_warn(f"the model's trainable weights are {' and '.join(half)} and trainer precision "
                           f"{precision} keeps them so: AdamW updates them with no fp32 master copy (updates below "
                           f"~0.4% of a weight are lost); load the model in float32 (precision='bf16-mixed' still "
                           f"computes in bf16), or ask for 16-bit training by name with precision='bf16-true'")

    def on_train_batch_start(self, batch, batch_idx):
        """Open the next throughput window after the callbacks (a checkpoint saved at the boundary
        is in neither window), or end a pause of the open one."""
        if self._window_pending:
            self._sync()  # normally idle already: the boundary and a save both synced
            self._window, self._window_pending = _Window(_clock()), False
        elif self._paused_at is not None:
            self._sync()
            if self._window is not None:
                self._window.excluded += _clock() - self._paused_at
        self._paused_at = None

    def _pause_window(self) -> None:
        """A validation or a checkpoint save starts inside the open window: its time, up to the next
        training batch, is not the steps'."""
        if self._window is not None and self._paused_at is None:
            self._sync()  # the training work queued before it belongs to the window
            self._paused_at = _clock()

    def on_validation_start(self):
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._pause_window()

    def training_step(self, batch, batch_idx):
        world, micro = 1, 0
        if self._trainer is not None:  # this micro-batch's index among the step's on all ranks: its own draws
            k = self.trainer.accumulate_grad_batches
            world, micro = self.trainer.world_size, self.trainer.global_rank * k + batch_idx % k
        result = self.step(batch, self.global_step, world, micro)
        self._note_finite(result.nll_sum)
        self.empty_batches += result.kept == 0
        for name, value in result.metrics.items():
            key = name.removeprefix("train/")
            if key in self.step_metrics:  # logged for the whole step in on_before_optimizer_step
                self.step_metrics[key].update(value, result.counts.get(name))
        if self._window is not None:  # host numbers only: every rank's tokens, this device's FLOPs
            tokens, self._batch_tokens = self._batch_tokens, None
            self._window.tokens += (batch["input_ids"].numel() if tokens is None else tokens) * world
            self._window.flops += self._flops(batch["input_ids"].shape)
        if self._throughput is not None:  # the last complete window's
            tokens_per_sec, utilization = self._throughput
            self.log("train/tokens_per_sec", torch.tensor(tokens_per_sec), prog_bar=True)
            if utilization is not None:
                self.log("train/mfu", torch.tensor(utilization))
        return result.loss

    def _flops(self, shape) -> float:
        """Executed model FLOPs of this micro-batch (lightning_cggr.flops) for train/mfu, on a GPU in
        the peak table (the card's dense bf16 peak); 0 elsewhere. Host arithmetic only."""
        if self._peak is None:
            self._peak = device_peak_tflops(self.device)[1] or 0.0
        if not self._peak or self.flop_shape is None:
            return 0.0
        routed = self.step.active(self.global_step)
        return step_flops(self.flop_shape, self.step.cggr, *shape, loss_impl=self.step.loss_impl, routed=routed)["total"]

    def configure_model(self):
        """Under Lightning's ModelParallelStrategy (``trainer.strategy=fsdp2``): FSDP2, one unit per
        decoder block plus the root (see :func:`lightning_cggr.distributed.shard_fsdp2`). Any other
        strategy has no device mesh here, and Lightning's FSDPStrategy wraps by its own policy."""
        if self.device_mesh is not None:
            shard_fsdp2(self, self.model, self.device_mesh)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by the norm of the whole model. Under FSDP1 each rank holds a shard of every
        gradient, so the norm must come from the root wrapper (Lightning's plugin refuses 'norm').

        Under ``bf16-mixed`` the gradients are unscaled (no GradScaler), so clipping them before a
        fused AdamW step is exact; Lightning's mixed-precision plugin refuses any optimizer that
        "unscales internally" (fused AdamW) whatever the precision, which made the default GPU run
        (``trainer=gpu``: bf16-mixed, ``optim.fused=auto``, clipping 1.0) fail at its first step.
        Here the plugin's own clipping runs without that check when no scaler is in use; with
        ``16-mixed`` (a scaler) ``optim.fused=auto`` chooses the unfused AdamW instead
        (:meth:`configure_optimizers`)."""
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision
        from lightning.pytorch.utilities import GradClipAlgorithmType
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(root, FullyShardedDataParallel):
            root.clip_grad_norm_(gradient_clip_val)
            return
        plugin = self.trainer.precision_plugin
        norm, self._clip_norm = self._clip_norm, None
        if (gradient_clip_val and norm is not None and getattr(plugin, "scaler", None) is None
                and GradClipAlgorithmType(gradient_clip_algorithm or "norm") == GradClipAlgorithmType.NORM):
            # what clip_grad_norm_ does, with the norm on_before_optimizer_step took of the same gradients
            # in the same order: one pass over the gradients fewer, the same result bit for bit
            torch.nn.utils.clip_grads_with_norm_(list(plugin.main_params(optimizer)), gradient_clip_val, norm)
            return
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer):
        """Rescale the accumulated gradients to the mean over the step's global kept-token count, log
        that mean as ``train/loss`` and the routing metrics of the whole step (every rank and
        micro-batch, summed in the same all-reduce), then note whether the gradient norm is finite
        (and log it where gradients are whole, not shards)."""
        # the same keys on every rank (the config decides them), in one order
        keys = [k for k in STEP_METRICS if self.step_metrics[k].update_called]
        states = [t for k in keys for t in (self.step_metrics[k].total, self.step_metrics[k].count)]
        extra = torch.stack(states) if states else None
        if self.step.correct_gradients(self.parameters(), self.trainer.accumulate_grad_batches, extra) is not None:
            # the step's loss: all ranks and micro-batches (device tensors, as every metric here)
            self.log("train/loss", self.step.token_norm.step_loss, prog_bar=True, on_step=True, on_epoch=False)
            if keys:
                for key, (total, count) in zip(keys, self.step.token_norm.step_extra.view(-1, 2)):
                    self.log(f"train/{key}", WeightedMean.mean(total, count), on_step=True, on_epoch=False,
                             prog_bar=key == "kept_ratio")
        for key in keys:
            self.step_metrics[key].reset()
        norm, whole = self._step_grad_norm(optimizer)
        if norm is None:
            return
        if not self._loss_scaled():  # a scaler's overflow is a skipped step, not a divergence
            self._note_finite(norm)
        if whole and self._trainer is not None and not _is_fsdp1(self):
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def _step_grad_norm(self, optimizer) -> tuple[torch.Tensor | None, bool]:
        """The gradient norm of the step (see :func:`grad_norm`). Where the gradients are whole tensors
        (one process, DDP), it is taken as Lightning's norm clipping takes it, over the optimizer's
        parameters in order (``get_total_norm``), and kept for :meth:`configure_gradient_clipping`,
        which then needs no second pass over the gradients."""
        from torch.distributed.tensor import DTensor

        self._clip_norm = None
        if self._trainer is None or _is_fsdp1(self) or optimizer is None:
            return grad_norm(self.parameters())
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or any(isinstance(g, DTensor) for g in grads):
            return grad_norm(self.parameters())
        self._clip_norm = torch.nn.utils.get_total_norm(grads, 2.0)
        return self._clip_norm.float(), True

    def _loss_scaled(self) -> bool:
        """Whether a loss scaler (``16-mixed``) runs the optimizer step. It multiplies the loss by a
        scale it probes upwards (torch's GradScaler doubles it every 2000 steps); a step whose
        gradients overflow is skipped and the scale halved, by design, so there a non-finite
        gradient norm is no divergence (the loss and the weights are still checked)."""
        return self._trainer is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def _note_finite(self, value: torch.Tensor) -> None:
        """Record the current step in ``first_nonfinite_step`` if ``value`` is not finite (device only)."""
        step = self.global_step if self._trainer is not None else 0
        bad = torch.where(~torch.isfinite(value.detach()), step, NO_STEP)
        torch.minimum(self.first_nonfinite_step, bad, out=self.first_nonfinite_step)

    def reset_health(self) -> None:
        self.first_nonfinite_step.fill_(NO_STEP)
        self.empty_batches.zero_()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        """Always every trainable token, so runs with and without CGGR compare; summed per loader."""
        nll_sum, count = self.step.eval_terms(batch)
        nll, tokens = self._heldout_sums(dataloader_idx)
        nll.update(nll_sum.float())
        tokens.update(count.float())

    def _heldout_sums(self, dataloader_idx: int) -> tuple[SumMetric, SumMetric]:
        if dataloader_idx == 0:
            return self.val_nll_sum, self.val_tokens
        if dataloader_idx not in self._more_loaders:
            self._more_loaders[dataloader_idx] = tuple(  # type: ignore[assignment]
                _Sum(nan_strategy="disable").to(self.val_tokens.device) for _ in range(2))
        return self._more_loaders[dataloader_idx]

    def on_validation_epoch_end(self):
        """Mean NLL over every trainable validation token: NaN if the model gives NaN, and NaN (with a
        warning) if there was no trainable token at all, never a perplexity of 1.0 for nothing."""
        loss, ppl = self._log_heldout("val")
        if self.trainer.sanity_checking:  # Lightning drops what a sanity pass logs; train() may need it
            self.sanity_metrics = {"val/loss": loss.detach(), "val/ppl": ppl.detach()}

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        """``trainer.test(module, loader)``: what validation computes, over the test loader, logged as
        ``test/loss`` and ``test/ppl``."""
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self):
        self._log_heldout("test")

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        raise NotImplementedError(
            "CGGRModule has no predict step: for text, module.model.generate(...) or python -m "
            "lightning_cggr.generate; for the held-out loss, trainer.validate or trainer.test")

    def _log_heldout(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Log ``{prefix}/loss`` and ``{prefix}/ppl`` from the summed NLL and token count, then reset
        the sums; returns the first loader's. With several loaders each gets Lightning's suffix,
        ``{prefix}/loss/dataloader_idx_N``."""
        loaders = [(0, (self.val_nll_sum, self.val_tokens)), *sorted(self._more_loaders.items())]
        first = None
        for idx, (nll, count) in loaders:
            tokens = count.compute()
            loss = nll.compute() / tokens  # 0 / 0 = NaN
            suffix = f"/dataloader_idx_{idx}" if len(loaders) > 1 else ""
            if not self.trainer.sanity_checking and float(tokens) == 0:  # once per pass: the logger syncs too
                what = "validation" if prefix == "val" else "the test"
                log.warning("%s saw no trainable token: %s/loss%s and %s/ppl%s are NaN", what, prefix, suffix,
                            prefix, suffix)
            ppl = torch.exp(loss)
            # the sums are global (torchmetrics syncs them), so every rank holds the same value: a max
            # over ranks keeps it exactly, and says to Lightning that it is synced
            for name, value in ((f"{prefix}/loss{suffix}", loss), (f"{prefix}/ppl{suffix}", ppl)):
                self.log(name, value, prog_bar=True, add_dataloader_idx=False, sync_dist=True, reduce_fx="max")
            nll.reset()
            count.reset()
            if first is None:
                first = loss, ppl
        self._more_loaders.clear()
        return first

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, which rebuilds the settings from the checkpoint; the model is not among them
        (any object of the architecture, its weights then loaded): pass it as ``model=``."""
        if "model" not in kwargs:
            raise TypeError(f"{cls.__name__}.load_from_checkpoint(path, model=...) needs the model, as the "
                            "module was built with (any object of that architecture: the checkpoint holds its "
                            "weights, not the model); for a train run, lightning_cggr.export.load_trained(path) "
                            "rebuilds it")
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint):
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = {"config": self.run_config}
            if self.run_tokenizer is not None:
                checkpoint[CONFIG_KEY]["tokenizer"] = self.run_tokenizer
            if self.run_data is not None:
                checkpoint[CONFIG_KEY]["data"] = self.run_data
            if self.run_initial:
                checkpoint[CONFIG_KEY]["initial"] = dict(self.run_initial)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._pause_window()  # (torch.save writes after this hook: most of a save's time)

    def setup(self, stage: str) -> None:
        """Refuse an MPS device here, before Lightning moves the module there and torch fails on the
        float64 metric states with a message about a tensor conversion."""
        if self.trainer.strategy.root_device.type == "mps":
            raise ConfigError(f"invalid configuration: this Trainer {MPS_PROBLEM}; use accelerator='cpu'")

    def _run_length(self) -> int | None:
        """The run's optimizer steps, or None where the Trainer cannot know them: Lightning answers
        ``max_steps`` (-1) for a training loader without a length (an ``IterableDataset``) and
        infinity for ``max_epochs=-1``."""
        total = self.trainer.estimated_stepping_batches
        return int(total) if 0 <= total < float("inf") else None  # 0: max_steps=0, validation only

    def on_fit_start(self):
        """The run's length, which strategy=infobatch anneals over (its last anneal_fraction); here, not
        in configure_optimizers, so that a subclass with an optimizer of its own has it too."""
        self.step.total_steps = self._run_length()

    def configure_optimizers(self):
        total = self._run_length()
        if total is None and self.optim_cfg.min_lr_ratio != 1.0:
            # the cosine would have been laid over -1 steps, i.e. one: the LR at its floor from step 1
            raise ConfigError(
                f"invalid configuration: optim.min_lr_ratio={self.optim_cfg.min_lr_ratio}: the cosine schedule "
                f"decays over the run's length, which this Trainer does not know (max_steps="
                f"{self.trainer.max_steps}, and a training loader without a length, e.g. an IterableDataset, "
                f"or max_epochs=-1); give the Trainer max_steps, or optim.min_lr_ratio=1.0 for a constant LR "
                f"after the warm-up")
        scaled = self._loss_scaled()
        optimizer = build_optimizer(self.model, self.optim_cfg,
                                    scaled_clipping=scaled and bool(self.trainer.gradient_clip_val))
        scheduler = build_scheduler(optimizer, self.optim_cfg, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _is_fsdp1(module: L.LightningModule) -> bool:
    """Under Lightning's FSDPStrategy each rank's gradients are flat shards that are not DTensors."""
    from lightning.pytorch.strategies import FSDPStrategy

    return module._trainer is not None and isinstance(module.trainer.strategy, FSDPStrategy)


def settings_of(cggr: CGGRConfig, loss: LossConfig, optim: OptimConfig, perf: PerfConfig) -> dict:
    """The module's settings as plain mappings (the Hydra job's keys), as Lightning's hyperparameters.
    ``perf`` is left out (None: the defaults on loading) when it holds what a checkpoint cannot store,
    e.g. a compile backend given as a function; perf changes speed, never what is trained."""
    settings = {name: dataclasses.asdict(cfg) for name, cfg in
                (("cggr", cggr), ("loss", loss), ("optim", optim), ("perf", perf))}
    if not _storable(settings["perf"]):
        settings["perf"] = None
    return settings


def _storable(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _storable(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(map(_storable, value))
    return value is None or isinstance(value, (str, int, float, bool))


@torch.no_grad()
def grad_norm(params) -> tuple[torch.Tensor | None, bool]:
    """(L2 norm of the gradients as a 0-d fp32 device tensor, whether it is the model's).

    Whole gradients (one process, DDP) give the model's norm. Sharded ones (FSDP2 DTensors) too,
    with torch's ``get_total_norm`` (one small all-reduce over the shards, the one FSDP2's clipping
    makes; torch >= 2.6): on an older torch they give the norm of the local shards, enough to tell
    finite from not but not the model's norm. (None, True) without gradients."""
    from torch.distributed.tensor import DTensor

    plain, sharded = [], []
    for p in params:
        if p.grad is not None:
            (sharded if isinstance(p.grad, DTensor) else plain).append(p.grad)
    if not plain and not sharded:
        return None, True
    whole, parts = True, []
    if plain:
        parts += [n.float() for n in torch._foreach_norm(plain, 2.0)]
    if sharded:
        total_norm = getattr(torch.nn.utils, "get_total_norm", None)
        if total_norm is not None:
            norm = total_norm(sharded, 2.0)
            parts.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float())
        else:
            whole = False
            parts += [n.float() for n in torch._foreach_norm([g.to_local() for g in sharded], 2.0)]
    return torch.linalg.vector_norm(torch.stack(parts)), whole

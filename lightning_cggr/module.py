"""CGGRModule: the Lightning adapter around the one training step (:mod:`lightning_cggr.step`).

Everything a step computes (routing, selection, the loss terms, the kept-token normalisation) lives
in :class:`~lightning_cggr.step.CGGRStep`; this module only connects it to the Trainer: it owns
the model (so checkpoints hold it), logs the step's metrics (torchmetrics, device tensors, no host
sync), rescales gradients in ``on_before_optimizer_step``, validates on every trainable token,
builds the optimizer and LR schedule with the step's builders and applies FSDP2 sharding.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torchmetrics import MeanMetric, SumMetric

from .config import CGGRConfig, LossConfig, OptimConfig
from .distributed import shard_fsdp2
from .step import CGGRStep, build_optimizer, build_scheduler

# metrics the step may return, each averaged by its own torchmetrics object
STEP_METRICS = ("kept_ratio", "ratio", "score_kept", "score_dropped", "kept_sequences", "weight_mean", "prune")


class CGGRModule(L.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        cggr: CGGRConfig | None = None,
        loss: LossConfig | None = None,
        optim: OptimConfig | None = None,
        reference: torch.nn.Module | None = None,
    ):
        """``reference``: the frozen model of scoring=excess_loss (see :class:`CGGRStep`)."""
        super().__init__()
        self.model = model
        self.step = CGGRStep(model, cggr, loss, reference)
        self.optim_cfg = optim or OptimConfig()
        # nan_strategy="disable": the default NaN check is a host sync (`if nans.any()`) every update
        self.step_metrics = torch.nn.ModuleDict({k: MeanMetric(nan_strategy="disable") for k in STEP_METRICS})
        self.val_nll_sum = SumMetric()
        self.val_tokens = SumMetric()
        self._last_step_time: float | None = None
        # metric states are created on the CPU: follow a model that is already on its device, so a
        # module used without a Trainer (which would move it) never mixes devices
        first = next(model.parameters(), None)
        if first is not None:
            self.to(first.device)

    # ---- Lightning hooks ---------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None):
        return self.step.hidden_states(input_ids, attention_mask)

    def training_step(self, batch, batch_idx):
        world = self.trainer.world_size if self._trainer is not None else 1
        result = self.step(batch, self.global_step, world)
        self.log("train/loss", result.metrics["train/loss"], prog_bar=True)
        for name, value in result.metrics.items():
            key = name.removeprefix("train/")
            if key in self.step_metrics:
                metric = self.step_metrics[key]
                metric(value)
                self.log(name, metric, on_step=True, on_epoch=False, prog_bar=key == "kept_ratio")
        now = time.perf_counter()
        if self._last_step_time is not None:  # host clock between steps: no device sync
            tps = batch["input_ids"].numel() / max(now - self._last_step_time, 1e-9)
            self.log("train/tokens_per_sec", torch.tensor(tps), prog_bar=True)
        self._last_step_time = now
        return result.loss

    def configure_model(self):
        """Under Lightning's ModelParallelStrategy (``trainer.strategy=fsdp2``): FSDP2, one unit per
        decoder block plus the root (see :func:`lightning_cggr.distributed.shard_fsdp2`). Any other
        strategy has no device mesh here, and Lightning's FSDPStrategy wraps by its own policy."""
        if self.device_mesh is not None:
            shard_fsdp2(self, self.model, self.device_mesh)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by the norm of the whole model. Under FSDP1 each rank holds a shard of every
        gradient, so the norm must come from the root wrapper (Lightning's plugin refuses 'norm')."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(root, FullyShardedDataParallel):
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer):
        """Rescale the accumulated gradients to the mean over the step's global kept-token count."""
        self.step.correct_gradients(self.parameters(), self.trainer.accumulate_grad_batches)

    def on_train_epoch_start(self):
        self._last_step_time = None

    def validation_step(self, batch, batch_idx):
        """Always every trainable token, so runs with and without CGGR compare."""
        nll_sum, count = self.step.eval_terms(batch)
        self.val_nll_sum.update(nll_sum.float())
        self.val_tokens.update(count.float())

    def on_validation_epoch_end(self):
        loss = self.val_nll_sum.compute() / self.val_tokens.compute().clamp(min=1)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss), prog_bar=True)
        self.val_nll_sum.reset()
        self.val_tokens.reset()

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg)
        total = self.trainer.estimated_stepping_batches
        self.step.total_steps = int(total) if total != float("inf") else None  # infobatch anneals over its tail
        scheduler = build_scheduler(optimizer, self.optim_cfg, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

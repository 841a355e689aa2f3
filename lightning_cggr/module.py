"""CGGRModule: score -> select -> mask -> forward -> loss, as one LightningModule.

One training step, all on the device and free of host syncs:

1. shift labels once into next-token targets (``selection.shift_targets``);
2. under ``no_grad``, the truncated router (the model's own first k blocks, final norm and head)
   yields per-token statistics, chunked over tokens; a scorer turns them into difficulty;
3. ``selection.select`` keeps the hardest ``min_tokens_ratio`` of the trainable tokens, giving a
   static-size list of candidate rows plus a validity mask;
4. the model's decoder runs on every token (attention needs them all);
5. only the kept rows of the final hidden states go through the LM head and cross-entropy
   (``loss.impl``); the loss is the mean over kept tokens, 0 with a graph when there are none.

``cggr.enabled=false`` (and the first ``cggr.warmup_steps`` steps) run the same path keeping every
trainable token: the standard baseline.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torchmetrics import MeanMetric, SumMetric

from .config import CGGRConfig, LossConfig, OptimConfig
from .distributed import KeptTokenNormalizer
from .guards import sanitize_stats
from .kernels import linear_cross_entropy, resolve_impl, token_stats
from .router import TruncatedRouter, find_decoder, find_head
from .scoring import get_scorer
from .selection import IGNORE_INDEX, Selection, mask_labels, select, shift_targets


class CGGRModule(L.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        cggr: CGGRConfig | None = None,
        loss: LossConfig | None = None,
        optim: OptimConfig | None = None,
    ):
        super().__init__()
        self.model = model
        self.cggr = cggr or CGGRConfig()
        self.loss_cfg = loss or LossConfig()
        self.optim_cfg = optim or OptimConfig()
        find_decoder(model), find_head(model)  # fail early on an unsupported architecture
        self.scorer = get_scorer(self.cggr.scoring)
        self.router = TruncatedRouter(model, self.cggr.router.num_layers) if self.cggr.enabled else None
        self.train_kept_ratio = MeanMetric()
        self.val_nll_sum = SumMetric()
        self.val_tokens = SumMetric()
        self._last_step_time: float | None = None
        # the loss is the mean over the kept tokens of the whole optimizer step: all ranks, all
        # accumulated micro-batches (see lightning_cggr.distributed)
        self.token_norm = KeptTokenNormalizer()

    # Decoder and head are looked up on the model each time rather than stored as attributes, so
    # they are never registered twice: state_dict and checkpoints hold the base model alone.
    @property
    def decoder(self) -> torch.nn.Module:
        return find_decoder(self.model)

    @property
    def head(self) -> torch.nn.Linear:
        return find_head(self.model)

    # ---- the pieces of a step ---------------------------------------------------------------
    @property
    def loss_impl(self) -> str:
        return resolve_impl(self.loss_cfg.impl, self.head.weight.device)

    def cggr_active(self) -> bool:
        """Whether this optimizer step routes (a host-side int comparison: no sync)."""
        return self.cggr.enabled and self.global_step >= self.cggr.warmup_steps

    @torch.no_grad()
    def score_tokens(self, input_ids, attention_mask, targets) -> torch.Tensor:
        """[B, T] difficulty from the truncated router; -inf where nothing is to be learned."""
        hidden = self.router.hidden_states(input_ids, attention_mask)
        B, T, H = hidden.shape
        stats = token_stats(
            hidden.reshape(B * T, H),
            self.router.head_weight,
            targets.reshape(-1),
            impl=self.loss_impl if self.loss_impl != "naive" else "torch",
            chunk_size=self.cggr.router.chunk_size,
        )
        stats, finite = sanitize_stats(type(stats)(*(s.view(B, T) for s in stats)))
        # non-finite statistics never rank hard (lightning_cggr.guards)
        return self.scorer(stats, (targets != IGNORE_INDEX) & finite)

    def compute_loss(self, hidden: torch.Tensor, targets: torch.Tensor, selection: Selection | None) -> torch.Tensor:
        """Mean cross-entropy over this batch's kept tokens (0 when none)."""
        nll_sum, kept = self.loss_terms(hidden, targets, selection)
        return nll_sum / kept.clamp(min=1)

    def loss_terms(
        self, hidden: torch.Tensor, targets: torch.Tensor, selection: Selection | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL sum, kept count) over kept tokens, both device tensors; the LM head runs on kept rows only
        (except naive). The count is of the very labels the loss saw, so the two always agree."""
        B, T, H = hidden.shape
        impl = self.loss_impl
        flat_h = hidden.reshape(B * T, H)
        flat_y = targets.reshape(-1)
        if selection is not None:
            if impl == "naive":  # HF-style: full logits, easy labels masked
                flat_y = mask_labels(targets, selection.keep).reshape(-1)
            else:  # gather the static-size candidate rows; padding rows are ignored
                flat_h = flat_h.index_select(0, selection.index)
                flat_y = flat_y.index_select(0, selection.index).masked_fill(~selection.valid, IGNORE_INDEX)
        nll_sum = linear_cross_entropy(flat_h, self.head.weight, flat_y, reduction="sum", impl=impl)
        return nll_sum, (flat_y != IGNORE_INDEX).sum()

    # ---- Lightning hooks ---------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None):
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def training_step(self, batch, batch_idx):
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        targets = shift_targets(batch["labels"], attention_mask)
        trainable = targets != IGNORE_INDEX
        selection = None
        if self.cggr_active():
            score = self.score_tokens(input_ids, attention_mask, targets)
            selection = select(score, trainable, self.cggr.min_tokens_ratio, self.cggr.selection.scope)
            kept = selection.keep
        else:
            kept = trainable
        hidden = self(input_ids, attention_mask)
        nll_sum, n_kept = self.loss_terms(hidden, targets, selection)
        world = self.trainer.world_size if self._trainer is not None else 1
        loss = self.token_norm.loss(nll_sum, n_kept, world)  # exact global mean after on_before_optimizer_step

        n_trainable = trainable.sum()
        self.train_kept_ratio(kept.sum() / n_trainable.clamp(min=1))
        self.log("train/loss", nll_sum.detach() / n_kept.clamp(min=1), prog_bar=True)  # this micro-batch's mean
        self.log("train/kept_ratio", self.train_kept_ratio, prog_bar=True)
        now = time.perf_counter()
        if self._last_step_time is not None:  # host clock between steps: no device sync
            tps = input_ids.numel() / max(now - self._last_step_time, 1e-9)
            self.log("train/tokens_per_sec", torch.tensor(tps), prog_bar=True)
        self._last_step_time = now
        return loss

    def on_before_optimizer_step(self, optimizer):
        """Rescale the accumulated gradients to the mean over the step's global kept-token count."""
        self.token_norm.correct_gradients(self.parameters(), self.trainer.accumulate_grad_batches)

    def on_train_epoch_start(self):
        self._last_step_time = None

    def validation_step(self, batch, batch_idx):
        """Always every trainable token, so runs with and without CGGR compare."""
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        targets = shift_targets(batch["labels"], attention_mask)
        hidden = self(input_ids, attention_mask)
        B, T, H = hidden.shape
        impl = self.loss_impl
        nll_sum = linear_cross_entropy(
            hidden.reshape(B * T, H), self.head.weight, targets.reshape(-1), reduction="sum", impl=impl
        )
        self.val_nll_sum.update(nll_sum.float())
        self.val_tokens.update((targets != IGNORE_INDEX).sum().float())

    def on_validation_epoch_end(self):
        loss = self.val_nll_sum.compute() / self.val_tokens.compute().clamp(min=1)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss), prog_bar=True)
        self.val_nll_sum.reset()
        self.val_tokens.reset()

    def configure_optimizers(self):
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        cfg = self.optim_cfg
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer,
            num_warmup_steps=min(cfg.warmup_steps, total),
            num_training_steps=total,
            min_lr_rate=cfg.min_lr_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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

Variants, all in :meth:`CGGRModule.route` (options in ``conf/cggr/default.yaml``):

- ``selection.unit=sequence``: only the ``ceil(ratio * B)`` hardest sequences (mean score over
  trainable tokens) are index-selected and run through the decoder, forward and backward.
- ``router.source=final``: no router; step 4 runs first and its final hidden states (detached,
  in training mode, so with the model's dropout) give the statistics. Token unit only.
- ``scoring=excess_loss``: score = current NLL - NLL of a frozen, unregistered reference model.
- ``scoring=random``: seeded uniform scores from a generator on the device seeded by (seed, step).
- ``ratio_schedule``: constant, curriculum (host ints) or dynamic (a device tensor; static buffers
  sized by its max). Logged: ``train/ratio``, ``train/score_kept``, ``train/score_dropped``,
  ``train/kept_sequences``.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torchmetrics import MeanMetric, SumMetric

from .config import CGGRConfig, LossConfig, OptimConfig
from .distributed import KeptTokenNormalizer, shard_fsdp2
from .guards import sanitize_stats
from .kernels import linear_cross_entropy, resolve_impl, token_stats
from .reference import ReferenceModel, load_reference
from .router import TruncatedRouter, find_decoder, find_head
from .schedule import batch_confidence, dynamic_ratio, host_ratio
from .scoring import SCORERS, excess_loss_score, get_scorer, random_score, step_generator
from .selection import IGNORE_INDEX, Selection, mask_labels, select, select_sequences, shift_targets


class CGGRModule(L.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        cggr: CGGRConfig | None = None,
        loss: LossConfig | None = None,
        optim: OptimConfig | None = None,
        reference: torch.nn.Module | None = None,
    ):
        """``reference``: the frozen model of scoring=excess_loss, given directly (else loaded from
        ``cggr.router.reference``); it is held unregistered, so never trained nor checkpointed."""
        super().__init__()
        self.model = model
        self.cggr = cggr or CGGRConfig()
        self.loss_cfg = loss or LossConfig()
        self.optim_cfg = optim or OptimConfig()
        find_decoder(model), find_head(model)  # fail early on an unsupported architecture
        c = self.cggr
        self.scorer = get_scorer(c.scoring) if c.scoring in SCORERS else None  # excess_loss/random: below
        uses_router = c.enabled and c.router.source == "truncated" and c.scoring != "random"
        self.router = TruncatedRouter(model, c.router.num_layers) if uses_router else None
        self.reference = self._build_reference(reference) if c.enabled and c.scoring == "excess_loss" else None
        # nan_strategy="disable": the default NaN check is a host sync (`if nans.any()`) every update
        self.train_kept_ratio = MeanMetric(nan_strategy="disable")
        self.train_ratio = MeanMetric(nan_strategy="disable")
        self.train_score_kept = MeanMetric(nan_strategy="disable")
        self.train_score_dropped = MeanMetric(nan_strategy="disable")
        self.train_kept_sequences = MeanMetric(nan_strategy="disable")
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

    @property
    def stats_impl(self) -> str:
        """The kernel for scoring statistics: the loss's, except that naive (full logits) scores
        with the chunked torch path, which never holds [tokens, vocab]."""
        impl = self.loss_impl
        return "torch" if impl == "naive" else impl

    def cggr_active(self) -> bool:
        """Whether this optimizer step routes (a host-side int comparison: no sync)."""
        return self.cggr.enabled and self.global_step >= self.cggr.warmup_steps

    def _build_reference(self, model: torch.nn.Module | None) -> ReferenceModel:
        name, dtype = self.cggr.router.reference, self.cggr.router.reference_dtype
        if model is None:
            if not name:
                raise ValueError("scoring=excess_loss needs a reference model: set cggr.router.reference")
            model = load_reference(name, dtype)
        ref = ReferenceModel(model, dtype=getattr(torch, dtype))
        vocab = self.head.weight.shape[0]
        if ref.vocab_size != vocab:
            raise ValueError(f"reference model vocabulary {ref.vocab_size} != the trained model's {vocab}")
        return ref

    def ratio_in_force(self) -> float | None:
        """Host-side keep ratio of this step (1.0 in warmup); None for the dynamic (device) ratio."""
        c = self.cggr
        if not self.cggr_active():
            return 1.0
        q = c.ratio_schedule
        if q.kind == "dynamic":
            return None
        return host_ratio(q.kind, c.min_tokens_ratio, self.global_step, c.warmup_steps, q.steps, q.shape)

    def _step_ratio(self, stats, trainable) -> tuple[float | torch.Tensor, float]:
        """(ratio, capacity ratio): a host float both, or a device ratio bounded by ratio_schedule.max."""
        ratio = self.ratio_in_force()
        if ratio is not None:
            return ratio, ratio
        q = self.cggr.ratio_schedule
        return dynamic_ratio(batch_confidence(stats, trainable), q.min, q.max), q.max

    @torch.no_grad()
    def token_statistics(self, hidden: torch.Tensor, targets: torch.Tensor):
        """[B, T] fp32 ``TokenStats`` of ``hidden @ head.T`` against ``targets``, chunked, no grad."""
        B, T, H = hidden.shape
        stats = token_stats(
            hidden.detach().reshape(B * T, H),
            self.head.weight,
            targets.reshape(-1),
            impl=self.stats_impl,
            chunk_size=self.cggr.router.chunk_size,
        )
        return type(stats)(*(s.view(B, T) for s in stats))

    @torch.no_grad()
    def score_and_stats(self, input_ids, attention_mask, targets, final_hidden: torch.Tensor | None = None):
        """([B, T] difficulty, stats or None); -inf where nothing is to be learned.

        Statistics come from ``final_hidden`` (router.source=final, the main forward's own output,
        detached) or else the truncated router; ``random`` draws from a (seed, step) generator.
        """
        trainable = targets != IGNORE_INDEX
        c = self.cggr
        if c.scoring == "random":
            return random_score(trainable, step_generator(c.seed, self.global_step, targets.device)), None
        hidden = final_hidden if final_hidden is not None else self.router.hidden_states(input_ids, attention_mask)
        stats, finite = sanitize_stats(self.token_statistics(hidden, targets))
        trainable = trainable & finite  # non-finite statistics never rank hard (lightning_cggr.guards)
        if c.scoring == "excess_loss":
            ref = self.reference.token_stats(
                input_ids, attention_mask, targets, impl=self.stats_impl,
                chunk_size=c.router.chunk_size,
            )
            return excess_loss_score(stats, trainable, ref), stats
        return self.scorer(stats, trainable), stats

    def score_tokens(self, input_ids, attention_mask, targets) -> torch.Tensor:
        """[B, T] difficulty from the configured scorer; -inf where nothing is to be learned."""
        return self.score_and_stats(input_ids, attention_mask, targets)[0]

    def route(self, input_ids, attention_mask, targets):
        """Score, select and run the decoder: (hidden, targets, selection, kept [B, T]) for the loss.

        Token unit: the decoder runs on every row and ``selection`` says which rows the head sees.
        Sequence unit: the decoder runs on the ``ceil(ratio * B)`` hardest rows only; the returned
        hidden/targets are those rows' (invalid rows' targets ignored) and ``selection`` is None.
        """
        trainable = targets != IGNORE_INDEX
        c, sel = self.cggr, self.cggr.selection
        log = dict(on_step=True, on_epoch=False)
        if not self.cggr_active():
            return self(input_ids, attention_mask), targets, None, trainable
        if sel.unit == "sequence":
            score, stats = self.score_and_stats(input_ids, attention_mask, targets)
            ratio, cap = self._step_ratio(stats, trainable & torch.isfinite(score))  # sanitized tokens: no vote
            rows = select_sequences(score, trainable, ratio, capacity_ratio=cap)
            row_kept = torch.zeros(targets.shape[0], dtype=torch.bool, device=targets.device)
            row_kept.index_copy_(0, rows.index, rows.valid)
            sub_ids = input_ids.index_select(0, rows.index)
            sub_mask = attention_mask.index_select(0, rows.index) if attention_mask is not None else None
            sub_targets = targets.index_select(0, rows.index).masked_fill(~rows.valid.unsqueeze(1), IGNORE_INDEX)
            hidden = self(sub_ids, sub_mask)
            has = trainable.any(dim=1)
            self._log_scores(rows.score, row_kept, has & ~row_kept)
            self.train_kept_sequences(rows.valid.sum().float())
            self.log("train/kept_sequences", self.train_kept_sequences, **log)
            self._log_ratio(ratio)
            return hidden, sub_targets, None, trainable & row_kept.unsqueeze(1)
        hidden = None
        if c.router.source == "final":  # router-free: score from the forward's own final states
            hidden = self(input_ids, attention_mask)
        score, stats = self.score_and_stats(input_ids, attention_mask, targets, final_hidden=hidden)
        ratio, cap = self._step_ratio(stats, trainable & torch.isfinite(score))  # sanitized tokens: no vote
        gen = step_generator(c.seed, self.global_step, targets.device, stream=1) if sel.strategy == "stratified" else None
        selection = select(
            score, trainable, ratio, sel.scope, strategy=sel.strategy, strata=sel.strata,
            min_per_sequence=sel.min_per_sequence, capacity_ratio=cap, generator=gen,
        )
        if hidden is None:
            hidden = self(input_ids, attention_mask)
        self._log_scores(score, selection.keep, trainable & ~selection.keep)
        self._log_ratio(ratio)
        return hidden, targets, selection, selection.keep

    def _log_scores(self, score: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor) -> None:
        """Mean score of kept vs dropped entries (tokens or sequences), as device tensors."""
        zero = torch.zeros((), dtype=torch.float32, device=score.device)
        for metric, mask, name in ((self.train_score_kept, kept, "kept"), (self.train_score_dropped, dropped, "dropped")):
            total = torch.where(mask, score.float(), zero).sum()
            metric(total / mask.sum().clamp(min=1))
            self.log(f"train/score_{name}", metric, on_step=True, on_epoch=False)

    def _log_ratio(self, ratio: float | torch.Tensor) -> None:
        dev = self.head.weight.device
        value = ratio.float() if torch.is_tensor(ratio) else torch.full((), ratio, dtype=torch.float32, device=dev)
        self.train_ratio(value)  # torch.full: a fill on the device, no host-to-device copy
        self.log("train/ratio", self.train_ratio, on_step=True, on_epoch=False)

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
        hidden, targets, selection, kept = self.route(input_ids, attention_mask, targets)
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
        self.token_norm.correct_gradients(self.parameters(), self.trainer.accumulate_grad_batches)

    def on_train_epoch_start(self):
        self._last_step_time = None

    def validation_step(self, batch, batch_idx):
        """Always every trainable token, so runs with and without CGGR compare."""
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        targets = shift_targets(batch["labels"], attention_mask)
        nll_sum, count = self.loss_terms(self(input_ids, attention_mask), targets, None)
        self.val_nll_sum.update(nll_sum.float())
        self.val_tokens.update(count.float())

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

"""Dispatch of ``cggr.selection.strategy`` for one routed micro-batch: which units train, with which
loss weights and which loss normaliser, plus the selection's metrics (0-d device tensors).

The step (:mod:`lightning_cggr.step`) scores, then calls :func:`choose_tokens` (token unit) or
:func:`choose_rows` (sequence unit) and runs the decoder and the loss on what they return. ``weight``
and ``normaliser`` are None for the unweighted rules (topk, stratified): weight 1, divide by the
kept count. Everything is a function of device tensors and host scalars: no host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .importance import importance_sample, importance_sample_sequences
from .sampling import (
    infobatch_prune,
    infobatch_prune_fraction,
    infobatch_prune_sequences,
    noise_excluded_topk,
    noise_excluded_topk_sequences,
)
from .scoring import step_generator
from .selection import Ratio, Selection, select, select_sequences

Metrics = dict[str, torch.Tensor]
RULE_STREAM = 2
"""Generator stream of the random rules (0: random scores, 1: stratified draws)."""


class TokenChoice(NamedTuple):
    selection: Selection
    weight: torch.Tensor | None
    """[B, T] fp32 loss weights (0 off the kept positions), or None (weight 1)."""
    normaliser: torch.Tensor | None
    """0-d long loss denominator, or None (the kept count)."""
    metrics: Metrics


class RowChoice(NamedTuple):
    index: torch.Tensor
    """[Kb] long: batch rows to run (static size), distinct."""
    valid: torch.Tensor
    """[Kb] bool: rows really kept."""
    score: torch.Tensor
    """[B] per-row score (mean over trainable tokens)."""
    weight: torch.Tensor | None
    """[Kb] fp32 loss weight of each row in ``index`` (0 where invalid), or None (weight 1)."""
    normaliser: torch.Tensor | None
    metrics: Metrics


def fill(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host float as a 0-d fp32 tensor filled on the device (no copy); a tensor as fp32."""
    if torch.is_tensor(value):
        return value.float()
    return torch.full((), value, dtype=torch.float32, device=device)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0-d fp32 mean of ``x`` over ``mask`` (0 where the mask is empty), on the device."""
    total = torch.where(mask, x.float(), torch.zeros((), dtype=torch.float32, device=x.device)).sum()
    return total / mask.sum().clamp(min=1)


GENERATOR_STRATEGIES = ("stratified", "importance", "infobatch")
"""Strategies that draw from a seeded device generator (:func:`rule_generator`); the others are
deterministic functions of the scores."""


def rule_generator(strategy: str, seed: int, step: int, device, micro_batch: int = 0) -> torch.Generator | None:
    """The seeded generator of a random strategy: stratified on stream 1, importance/infobatch on stream 2
    (``micro_batch``: see :func:`~.scoring.step_generator`)."""
    if strategy not in GENERATOR_STRATEGIES:
        return None
    return step_generator(seed, step, device, stream=1 if strategy == "stratified" else RULE_STREAM,
                          micro_batch=micro_batch)


def prune_in_force(sel, step: int, total_steps: int | None) -> float:
    """strategy=infobatch: the host-side prune fraction at ``step`` (0 in the annealed tail)."""
    if total_steps is None:
        if sel.anneal_fraction > 0:
            raise ValueError(
                "cggr.selection.strategy=infobatch anneals over the last anneal_fraction of the run, so the "
                "step needs the run's length: build CGGRStep(..., total_steps=trainer.max_steps) "
                "(train() does), or set cggr.selection.anneal_fraction=0"
            )
        return float(sel.prune)
    return infobatch_prune_fraction(sel.prune, step, total_steps, sel.anneal_fraction)


def choose_tokens(sel, score, trainable, ratio: Ratio, cap: float, generator, prune: float | None) -> TokenChoice:
    """Token unit: ``sel`` is the ``cggr.selection`` config; ``cap`` the host ratio sizing the buffers;
    ``prune`` the fraction in force (infobatch only)."""
    dev = trainable.device
    metrics: Metrics = {}
    if sel.strategy in ("topk", "stratified"):
        s = select(score, trainable, ratio, sel.scope, strategy=sel.strategy, strata=sel.strata,
                   min_per_sequence=sel.min_per_sequence, capacity_ratio=cap, generator=generator)
        return TokenChoice(s, None, None, {"train/ratio": fill(ratio, dev)})
    if sel.strategy == "importance":
        w = importance_sample(score, trainable, ratio, p_min=sel.p_min, scope=sel.scope,
                              transform=sel.importance_transform, capacity_ratio=cap, generator=generator)
        metrics["train/ratio"] = fill(ratio, dev)
    elif sel.strategy == "infobatch":
        w = infobatch_prune(score, trainable, prune, scope=sel.scope, generator=generator)
        metrics["train/prune"] = fill(prune, dev)
    elif sel.strategy == "noise_excluded":
        w = noise_excluded_topk(score, trainable, ratio, noise_fraction=sel.noise_fraction, scope=sel.scope,
                                capacity_ratio=cap)
        metrics["train/ratio"] = fill(ratio, dev)
    else:
        raise ValueError(f"unknown cggr.selection.strategy {sel.strategy!r}")
    metrics["train/weight_mean"] = masked_mean(w.weight, w.keep)
    return TokenChoice(Selection(w.keep, w.index, w.valid), w.weight, w.normaliser, metrics)


def choose_rows(sel, score, trainable, ratio: Ratio, cap: float, generator, prune: float | None) -> RowChoice:
    """Sequence unit: the rows to run (see :func:`choose_tokens` for the arguments)."""
    dev = trainable.device
    if sel.strategy == "topk":
        rows = select_sequences(score, trainable, ratio, capacity_ratio=cap)
        return RowChoice(rows.index, rows.valid, rows.score, None, None, {"train/ratio": fill(ratio, dev)})
    metrics: Metrics = {}
    if sel.strategy == "importance":
        rows = importance_sample_sequences(score, trainable, ratio, p_min=sel.p_min,
                                           transform=sel.importance_transform, capacity_ratio=cap, generator=generator)
        metrics["train/ratio"] = fill(ratio, dev)
    elif sel.strategy == "infobatch":
        rows = infobatch_prune_sequences(score, trainable, prune, generator=generator)
        metrics["train/prune"] = fill(prune, dev)
    elif sel.strategy == "noise_excluded":
        rows = noise_excluded_topk_sequences(score, trainable, ratio, noise_fraction=sel.noise_fraction,
                                             capacity_ratio=cap)
        metrics["train/ratio"] = fill(ratio, dev)
    else:
        raise ValueError(f"cggr.selection.strategy {sel.strategy!r} does not select sequences")
    metrics["train/weight_mean"] = masked_mean(rows.weight, rows.valid)
    return RowChoice(rows.index, rows.valid, rows.score, rows.weight, rows.normaliser, metrics)

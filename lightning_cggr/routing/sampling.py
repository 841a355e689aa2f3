"""Selection rules whose weighted loss is an unbiased (or explicitly selective) estimate: pure functions.

Every rule takes ``score`` [B, T] (higher = harder; a non-finite score at a trainable position ranks
as the easiest) and ``trainable`` [B, T] bool, and returns the kept units together with per-unit
loss weights and a ``normaliser``. The caller's loss for one micro-batch is

    loss = sum_i weight_i * nll_i / max(normaliser, 1)

summed over kept tokens ``i``. Rules, each for the token unit (``scope="sequence"``: one budget per
row; ``scope="batch"``: one budget over the whole batch) and for the sequence unit (whole rows,
ranked by :func:`sequence_mean_scores`; a row without a trainable token is never kept):

* :func:`.importance.importance_sample` / :func:`.importance.importance_sample_sequences` (in
  :mod:`.importance`, which shares this module's types and helpers) -- keep unit ``i`` with
  probability ``p_i = clip(c * w_i, p_min, 1)``, where ``w_i >= 0`` is the transformed score
  (:data:`.importance.TRANSFORMS`) and ``c`` solves ``sum_i p_i = ratio * n`` exactly (``n``: trainable units
  in the budget). The draw is randomized systematic sampling (see :func:`.importance.systematic_sample`),
  whose inclusion probability is exactly ``p_i`` and whose sample size is ``floor`` or ``ceil`` of
  ``ratio * n``, so it fits the static capacity ``ceil(ratio * L)`` of a budget of ``L`` slots
  (the capacity binds only through float64 rounding of running sums, probability ~1e-12, when
  one unit is then dropped). Weight ``1 / p_i <= 1 / p_min``: ``p_min`` bounds the variance.
  Then ``E[sum_i keep_i nll_i / p_i] = sum_i nll_i`` (Horvitz-Thompson), and ``normaliser`` is the
  count of trainable tokens: the estimate is unbiased for the full-token mean. ``p_min <= ratio``
  is required (the floor alone would otherwise exceed the budget).
* :func:`infobatch_prune` / :func:`infobatch_prune_sequences` -- units scoring below the mean
  (non-finite: below everything) are "well-learned"; each is dropped independently with probability
  ``prune`` and, if kept, weighted ``1 / (1 - prune)``; the rest are kept with weight 1. Unbiased
  the same way, ``normaliser`` = trainable tokens. :func:`infobatch_prune_fraction` anneals
  ``prune`` to 0 over the last part of training.
* :func:`noise_excluded_topk` / :func:`noise_excluded_topk_sequences` -- a selection, not an
  estimator: drop the ``floor(noise_fraction * n)`` highest-scoring units (likely noise, as in
  RHO-LOSS), keep the top ``ceil(ratio * (n - excluded))`` of the rest, weight 1;
  ``normaliser`` = kept tokens (the mean over kept tokens, as the top-k rule of today).

Across micro-batches and ranks the caller sums ``normaliser`` where it summed the kept count
(``KeptTokenNormalizer.loss(weighted_nll_sum, normaliser)``): the step's loss is then
``sum(weighted NLL) / sum(normaliser)``. For the two unbiased rules the denominator is the step's
trainable-token count, which does not depend on the random draw, so the ratio is exactly unbiased
for the global full-token mean (dividing by the random kept count instead would not be).

Static shapes: ``index``/``valid`` have a length fixed by ``B``, ``T`` and host floats; nothing here
reads a device value on the host. ``ratio`` may be a 0-d device tensor (the dynamic ratio) when a host
``capacity_ratio`` bounds it; it is then clamped on the device into the range the capacity allows.
The static capacity is ``selection.static_capacity``, the one formula every rule sizes its buffers by.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .selection import static_capacity

Ratio = float | torch.Tensor
SCOPES = ("sequence", "batch")
_EPS = 1e-9  # forgives float representation error in host ratio * length before ceil / floor


class WeightedSelection(NamedTuple):
    """Token-unit result; the first three fields mean what they mean in ``selection.Selection``."""

    keep: torch.Tensor
    """[B, T] bool: positions whose label is kept."""
    index: torch.Tensor
    """[K] long: flat positions ``b * T + t``; static K; holds every kept position, distinct entries."""
    valid: torch.Tensor
    """[K] bool: entries of ``index`` really kept (the rest pad the static size)."""
    weight: torch.Tensor
    """[B, T] float32: loss weight of each kept position; 0 elsewhere. For the gathered head rows:
    ``weight.reshape(-1).index_select(0, index)`` (0 at the padding entries)."""
    normaliser: torch.Tensor
    """0-d long: divide the weighted NLL sum by this (clamped to >= 1)."""


class WeightedSequenceSelection(NamedTuple):
    """Sequence-unit result; the first three fields mean what they mean in ``selection.SequenceSelection``."""

    index: torch.Tensor
    """[Kb] long: batch rows to run, kept rows first; static Kb."""
    valid: torch.Tensor
    """[Kb] bool: rows really kept."""
    score: torch.Tensor
    """[B] float32: each row's mean score over its finite-scored trainable tokens (-inf where none)."""
    weight: torch.Tensor
    """[Kb] float32: loss weight of each row in ``index`` (applies to all its tokens); 0 where invalid."""
    keep: torch.Tensor
    """[B] bool: rows kept, in batch order."""
    normaliser: torch.Tensor
    """0-d long: divide the weighted NLL sum of the kept rows' tokens by this (clamped to >= 1)."""


# ---- argument checks and small helpers ------------------------------------------------------------


def _check_inputs(score: torch.Tensor, trainable: torch.Tensor, scope: str | None = None) -> torch.Tensor:
    if score.dim() != 2 or score.shape != trainable.shape:
        raise ValueError(f"score {tuple(score.shape)} and trainable {tuple(trainable.shape)} must both be [B, T]")
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose sequence or batch")
    return trainable.to(torch.bool)


def _check_fraction(name: str, value: float, *, zero_ok: bool, one_ok: bool) -> float:
    lo, hi = ("[" if zero_ok else "("), ("]" if one_ok else ")")
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a host float in {lo}0, 1{hi}, got {type(value).__name__}")
    v = float(value)
    if not ((v >= 0 if zero_ok else v > 0) and (v <= 1 if one_ok else v < 1)):
        raise ValueError(f"{name} must lie in {lo}0, 1{hi}, got {value!r}")
    return v


def _check_ratio(ratio: Ratio, capacity_ratio: float | None) -> float:
    """The host float that sizes the static buffers; validates ``ratio`` where it is a host value."""
    if torch.is_tensor(ratio):
        if ratio.dim() != 0:
            raise ValueError(f"a tensor ratio must be 0-d, got shape {tuple(ratio.shape)}")
        if capacity_ratio is None:
            raise ValueError("a tensor ratio needs capacity_ratio, a host float bounding it, for static shapes")
        return _check_fraction("capacity_ratio", capacity_ratio, zero_ok=False, one_ok=True)
    r = _check_fraction("ratio", ratio, zero_ok=False, one_ok=True)
    if capacity_ratio is None:
        return r
    cap = _check_fraction("capacity_ratio", capacity_ratio, zero_ok=False, one_ok=True)
    if r > cap:
        raise ValueError(f"ratio {r} exceeds capacity_ratio {cap}: the static buffers could not hold the kept units")
    return cap


def _device_ratio(ratio: Ratio, device: torch.device, lo: float, hi: float) -> torch.Tensor | float:
    """A host ratio as is; a tensor ratio as float64 on ``device``, clamped to [lo, hi] there (no sync)."""
    if torch.is_tensor(ratio):
        return ratio.to(device=device, dtype=torch.float64).clamp(lo, hi)
    return float(ratio)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation along the last dim: ``rank[..., order[..., i]] = i``."""
    idx = torch.arange(order.shape[-1], device=order.device).expand_as(order).contiguous()
    return torch.empty_like(order).scatter_(-1, order, idx)


def _rows(x: torch.Tensor, scope: str) -> torch.Tensor:
    """[B, T] -> the budget rows: [B, T] per sequence, [1, B*T] for the whole batch."""
    return x if scope == "sequence" else x.reshape(1, -1)


def _pack(selected: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([R*cap] flat index, [R*cap] valid, [R, L] keep) from a row-wise [R, L] selection.

    Selected positions come first in each row, in position order; a row selecting more than ``cap``
    (possible only through float rounding, see :func:`systematic_sample`) keeps its first ``cap``.
    """
    R, L = selected.shape
    order = torch.argsort(selected.to(torch.int8), dim=1, descending=True, stable=True)[:, :cap]
    valid = selected.gather(1, order)
    keep = torch.zeros_like(selected).scatter_(1, order, valid)  # distinct entries per row
    index = order + torch.arange(R, device=selected.device).unsqueeze(1) * L
    return index.reshape(-1), valid.reshape(-1), keep


def sequence_mean_scores(score: torch.Tensor, trainable: torch.Tensor) -> torch.Tensor:
    """[B] float32: mean score over each row's trainable tokens with a finite score; -inf where none.

    Tokens with a non-finite score stay trainable (they count in the normalisers) but do not vote.
    """
    trainable = _check_inputs(score, trainable)
    s = score.double()
    fin = trainable & torch.isfinite(s)
    total = torch.where(fin, s, torch.zeros_like(s)).sum(dim=1)
    count = fin.sum(dim=1)
    mean = (total / count.clamp(min=1)).float()
    return mean.masked_fill(count == 0, float("-inf"))


# ---- InfoBatch-style pruning ----------------------------------------------------------------------


def infobatch_prune_fraction(prune: float, step: int, total_steps: int, anneal_fraction: float) -> float:
    """The prune fraction in force at ``step`` (0-based): ``prune`` before the last ``anneal_fraction``
    of ``total_steps``, 0 from step ``ceil((1 - anneal_fraction) * total_steps)`` on (InfoBatch's
    annealing, delta = 1 - anneal_fraction, so the final steps train on every unit unweighted)."""
    prune = _check_fraction("prune", prune, zero_ok=True, one_ok=False)
    anneal_fraction = _check_fraction("anneal_fraction", anneal_fraction, zero_ok=True, one_ok=True)
    if int(total_steps) < 1 or int(step) < 0:
        raise ValueError(f"need step >= 0 and total_steps >= 1, got step={step}, total_steps={total_steps}")
    stop = math.ceil((1.0 - anneal_fraction) * int(total_steps) - _EPS)
    return prune if int(step) < stop else 0.0


def _well_learned(score_rows: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Active units scoring strictly below their row's mean over finite scores, or non-finite."""
    s = score_rows.double()
    fin = active & torch.isfinite(s)
    mean = torch.where(fin, s, torch.zeros_like(s)).sum(1, keepdim=True) / fin.sum(1, keepdim=True).clamp(min=1)
    return active & ~(fin & (s >= mean))


def _prune_rows(score_rows, active, prune, generator) -> tuple[torch.Tensor, torch.Tensor]:
    low = _well_learned(score_rows, active)
    u = torch.rand(score_rows.shape, generator=generator, device=score_rows.device, dtype=torch.float64)
    keep = active & ~(low & (u < prune))
    boost = torch.full_like(u, 1.0 / (1.0 - prune))
    weight = torch.where(keep, torch.where(low, boost, torch.ones_like(u)), torch.zeros_like(u))
    return keep, weight.float()


def infobatch_prune(
    score: torch.Tensor,
    trainable: torch.Tensor,
    prune: float,
    *,
    scope: str = "sequence",
    generator: torch.Generator | None = None,
) -> WeightedSelection:
    """Drop each below-mean trainable token with probability ``prune``; kept ones weigh ``1 / (1 - prune)``.

    The mean is over finite scores of each row (``scope="sequence"``) or of the batch (``"batch"``);
    tokens at or above it are kept with weight 1. ``E[keep_i * weight_i] = 1`` for every trainable
    token, and ``normaliser`` is the batch's trainable-token count: unbiased for the full mean.
    Any subset can survive, so the capacity is full: ``index = arange(B * T)``, ``valid = keep``.
    A token-unit prune therefore saves nothing under static shapes (the head still runs on every
    row); it only reweights. The compute saving is the sequence unit's, and only for a caller that
    runs the body on the kept rows alone (see :func:`infobatch_prune_sequences`).
    """
    trainable = _check_inputs(score, trainable, scope)
    prune = _check_fraction("prune", prune, zero_ok=True, one_ok=False)
    keep, weight = _prune_rows(_rows(score, scope), _rows(trainable, scope), prune, generator)
    keep = keep.view(score.shape)
    index = torch.arange(score.numel(), device=score.device)
    return WeightedSelection(keep, index, keep.reshape(-1), weight.view(score.shape), trainable.sum())


def infobatch_prune_sequences(
    score: torch.Tensor,
    trainable: torch.Tensor,
    prune: float,
    *,
    generator: torch.Generator | None = None,
) -> WeightedSequenceSelection:
    """Rows whose :func:`sequence_mean_scores` lies below the batch mean (over rows with a finite mean)
    are dropped with probability ``prune``, kept ones weigh ``1 / (1 - prune)``; other rows with a
    trainable token are kept with weight 1. ``normaliser``: the batch's trainable tokens (unbiased).

    Capacity is all ``B`` rows (any subset may survive), with the kept rows first in ``index``: a
    static-shape caller still runs ``B`` rows; the saving needs the kept count on the host
    (``index[:count]``, one sync per step) or the rule applied in the data sampler (InfoBatch's own
    design, which prunes samples before batching).
    """
    trainable = _check_inputs(score, trainable)
    prune = _check_fraction("prune", prune, zero_ok=True, one_ok=False)
    seq = sequence_mean_scores(score, trainable)
    keep, weight = _prune_rows(seq.unsqueeze(0), trainable.any(dim=1).unsqueeze(0), prune, generator)
    index, valid, _ = _pack(keep, score.shape[0])
    return WeightedSequenceSelection(index, valid, seq, weight[0].index_select(0, index), keep[0], trainable.sum())


# ---- noise-excluding top-k ------------------------------------------------------------------------


def _exclude_then_topk(score_rows, active, ratio, cap_ratio, noise_fraction):
    """([R, L] keep, [R, cap] positions, [R, cap] valid): skip the floor(q n) hardest, keep the next ceil(r (n - e))."""
    R, L = score_rows.shape
    dev = score_rows.device
    s = score_rows.double()
    key = torch.where(torch.isfinite(s), s, torch.full_like(s, -torch.finfo(torch.float64).max))  # easiest
    key = torch.where(active, key, torch.full_like(s, -math.inf))  # untrainable strictly last
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    rank = _inverse(order)
    n = active.sum(dim=1, keepdim=True)
    excluded = torch.floor(n.double() * noise_fraction + _EPS).long().minimum(n)
    rest = n - excluded
    r = _device_ratio(ratio, dev, 0.0, cap_ratio)
    k = torch.ceil(rest.double() * r - _EPS).clamp(min=0).long().minimum(rest)
    cap = static_capacity(L, cap_ratio)
    keep = active & (rank >= excluded) & (rank < excluded + k)
    slots = torch.arange(cap, device=dev).unsqueeze(0)
    positions = order.gather(1, (excluded + slots) % L)  # distinct: cap <= L consecutive ranks mod L
    return keep, positions, slots < k


def noise_excluded_topk(
    score: torch.Tensor,
    trainable: torch.Tensor,
    ratio: Ratio,
    *,
    noise_fraction: float,
    scope: str = "sequence",
    capacity_ratio: float | None = None,
) -> WeightedSelection:
    """Exclude each budget's ``floor(noise_fraction * n)`` highest-scoring trainable tokens (likely
    noise), then keep the top ``ceil(ratio * (n - excluded))`` of the rest; deterministic.

    Meant for excess-loss scores (current NLL minus a reference NLL). Ties break by position;
    non-finite scores rank easiest (never excluded, kept last). Weight 1; ``normaliser`` = kept
    tokens (the kept-token mean: a selection, not an unbiased estimate). Static capacity as
    :func:`importance_sample`.
    """
    trainable = _check_inputs(score, trainable, scope)
    cap_ratio = _check_ratio(ratio, capacity_ratio)
    q = _check_fraction("noise_fraction", noise_fraction, zero_ok=True, one_ok=False)
    rows = _rows(score, scope)
    keep, positions, valid = _exclude_then_topk(rows, _rows(trainable, scope), ratio, cap_ratio, q)
    index = (positions + torch.arange(rows.shape[0], device=score.device).unsqueeze(1) * rows.shape[1]).reshape(-1)
    keep = keep.view(score.shape)
    return WeightedSelection(keep, index, valid.reshape(-1), keep.float(), keep.sum())


def noise_excluded_topk_sequences(
    score: torch.Tensor,
    trainable: torch.Tensor,
    ratio: Ratio,
    *,
    noise_fraction: float,
    capacity_ratio: float | None = None,
) -> WeightedSequenceSelection:
    """Rows by :func:`sequence_mean_scores`: of the ``n`` rows holding a trainable token, exclude the
    ``floor(noise_fraction * n)`` highest, keep the next ``ceil(ratio * (n - excluded))``.

    Static capacity ``Kb = ceil(capacity_ratio * B)``; weight 1; ``normaliser`` = trainable tokens
    of the kept rows (kept-token mean).
    """
    trainable = _check_inputs(score, trainable)
    cap_ratio = _check_ratio(ratio, capacity_ratio)
    q = _check_fraction("noise_fraction", noise_fraction, zero_ok=True, one_ok=False)
    seq = sequence_mean_scores(score, trainable)
    has = trainable.any(dim=1).unsqueeze(0)
    keep, positions, valid = _exclude_then_topk(seq.unsqueeze(0), has, ratio, cap_ratio, q)
    normaliser = torch.where(keep[0], trainable.sum(dim=1), torch.zeros_like(keep[0], dtype=torch.long)).sum()
    return WeightedSequenceSelection(positions[0], valid[0], seq, valid[0].float(), keep[0], normaliser)

"""Which tokens (or sequences) keep their label: top-k on the device, static shapes, no host sync.

Token unit. The kept count per sequence is ``ceil(ratio * n)`` of its ``n`` trainable tokens (at
least one where ``n > 0``), raised to ``min(n, min_per_sequence)``; with ``scope="batch"`` it is
``ceil(ratio * N)`` of the batch's ``N`` trainable tokens, chosen batch-globally, plus the
``min_per_sequence`` hardest tokens of every sequence (so the count is
``max(ceil(ratio * N), sum_b min(n_b, min_per_sequence))``). ``strategy="stratified"`` keeps the
same count, but spread over ``strata`` difficulty buckets (contiguous rank ranges of equal size),
each contributing in proportion to its size, drawn at random inside each bucket.

Sequence unit. :func:`select_sequences` keeps ``ceil(ratio * B)`` rows of the batch, ranked by
their mean score over trainable tokens (sequences without a trainable token rank last and are
never valid).

Every shape depends only on the batch's shape and a host-side ratio bound, never on the data, so
selection never waits for the device. ``ratio`` may be a 0-d device tensor (the dynamic ratio);
then ``capacity_ratio`` (a host float >= every value ``ratio`` can take) sizes the static buffers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

IGNORE_INDEX = -100
_EPS = 1e-9  # ratio * n is computed in float64; forgive representation error before ceil
UNITS = ("token", "sequence")
"""What is selected: tokens (labels masked) or whole sequences (rows not run)."""
SCOPES = ("sequence", "batch")
"""Token unit: the ratio applies per sequence or to the whole batch."""
STRATEGIES = ("topk", "stratified", "importance", "infobatch", "noise_excluded")
"""``cggr.selection.strategy``: ``topk`` keeps the hardest; ``stratified`` (token unit) the same count
spread over difficulty strata (both here); the weighted rules ``importance`` (:mod:`.importance`),
``infobatch`` and ``noise_excluded`` (:mod:`.sampling`) return loss weights and a normaliser too."""
WEIGHTED_STRATEGIES = ("importance", "infobatch", "noise_excluded")
"""Strategies whose loss is ``sum(weight * nll) / normaliser`` (see :mod:`.sampling`)."""
SEQUENCE_STRATEGIES = ("topk", "importance", "infobatch", "noise_excluded")
"""Strategies that also select whole sequences (``unit=sequence``)."""

Ratio = float | torch.Tensor


class Selection(NamedTuple):
    keep: torch.Tensor
    """[B, T] bool: positions whose label is kept."""
    index: torch.Tensor
    """[K] long: flat positions (b * T + t) of a static-size candidate list holding every kept position."""
    valid: torch.Tensor
    """[K] bool: which entries of ``index`` are really kept (the rest are padding of the static size)."""


class SequenceSelection(NamedTuple):
    index: torch.Tensor
    """[Kb] long: batch rows to run, hardest first; Kb = ceil(capacity_ratio * B) is static."""
    valid: torch.Tensor
    """[Kb] bool: rows really kept (within the kept count and holding a trainable token)."""
    score: torch.Tensor
    """[B] float32: each sequence's mean score over its trainable tokens (-inf where none)."""


def kept_count(n: torch.Tensor, ratio: Ratio) -> torch.Tensor:
    """ceil(ratio * n), elementwise on an integer tensor; 0 stays 0, n >= 1 gives at least 1."""
    if torch.is_tensor(ratio):
        ratio = ratio.to(device=n.device, dtype=torch.float64)
    return torch.ceil(n.to(torch.float64) * ratio - _EPS).clamp(min=0).to(torch.long)


def static_capacity(length: int, ratio: float) -> int:
    """The largest ceil(ratio * n) for n <= length: a static bound on the kept count."""
    return max(1, min(length, math.ceil(length * ratio - _EPS)))


def _rank_key(score: torch.Tensor, trainable: torch.Tensor) -> torch.Tensor:
    """Sort key: trainable positions by score (non-finite scores sanitized), others strictly last."""
    finfo = torch.finfo(torch.float32)
    s = torch.nan_to_num(score.float(), nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
    return s.masked_fill(~trainable, float("-inf"))


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation along the last dim: ``rank[..., order[..., i]] = i``."""
    rank = torch.empty_like(order)
    idx = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return rank.scatter_(-1, order, idx.contiguous())


def _descending_order(key: torch.Tensor, tier: torch.Tensor | None = None) -> torch.Tensor:
    """Argsort by (tier desc, key desc, position asc) along the last dim."""
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    if tier is None:
        return order
    second = torch.argsort(tier.gather(-1, order), dim=-1, descending=True, stable=True)
    return order.gather(-1, second)


def stratified_keep(
    key: torch.Tensor,
    trainable: torch.Tensor,
    k: torch.Tensor,
    strata: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[R, L] bool: exactly ``k[r]`` trainable positions of each row, spread over difficulty strata.

    Row r's ``n`` trainable positions, ranked hardest first, fall into ``strata`` buckets of
    contiguous ranks, bucket ``b`` holding ranks ``[ceil(b n / S), ceil((b + 1) n / S))``. Bucket
    ``b`` contributes ``ceil(e_b k / n) - ceil(s_b k / n)`` positions (``s_b``, ``e_b`` its rank
    bounds): in proportion to its size, remainders going to the harder buckets; the quotas sum to
    ``k`` exactly and never exceed a bucket's size. Inside a bucket the
    positions are drawn uniformly with ``generator``; without one, hardest first.
    """
    R, L = key.shape
    dev = key.device
    rank = _inverse(_descending_order(key))  # [R, L]; trainable positions hold ranks 0..n-1
    n = trainable.sum(dim=1, keepdim=True)  # [R, 1]
    n1 = n.clamp(min=1)
    k = k.reshape(R, 1).to(torch.long).minimum(n)
    bucket = torch.div(rank * strata, n1, rounding_mode="floor").clamp(max=strata - 1)
    bucket = torch.where(trainable, bucket, torch.full_like(bucket, strata))

    def start(b: torch.Tensor) -> torch.Tensor:  # first rank of bucket b: ceil(b * n / S)
        return torch.div(b * n + strata - 1, strata, rounding_mode="floor")

    s_b, e_b = start(bucket), start(bucket + 1)
    def share(x: torch.Tensor) -> torch.Tensor:  # picks among the x hardest ranks: ceil(x * k / n)
        return torch.div(x * k + n1 - 1, n1, rounding_mode="floor")

    quota = share(e_b) - share(s_b)
    if generator is not None:
        u = torch.rand(R, L, generator=generator, device=dev, dtype=torch.float64)
    else:
        u = rank.to(torch.float64) / (L + 1)
    order = torch.argsort(bucket.to(torch.float64) + u, dim=1, stable=True)  # buckets, then u
    within = _inverse(order) - s_b  # position inside the bucket
    return trainable & (within < quota)


def select(
    score: torch.Tensor,
    trainable: torch.Tensor,
    ratio: Ratio,
    scope: str = "sequence",
    *,
    strategy: str = "topk",
    strata: int = 4,
    min_per_sequence: int = 0,
    capacity_ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> Selection:
    """Keep the top ``ratio`` of the trainable tokens, per sequence or over the whole batch.

    ``score`` and ``trainable`` are [B, T]; higher score = harder = kept first. Ties break by
    position (stable sort), so equal inputs give equal selections. A NaN score ranks last among
    trainable tokens; a non-trainable position is never kept. See the module docstring for the
    counts; ``generator`` draws the stratified picks (same generator state, same selection).
    """
    if score.shape != trainable.shape or score.dim() != 2:
        raise ValueError(f"score {tuple(score.shape)} and trainable {tuple(trainable.shape)} must both be [B, T]")
    if scope not in SCOPES:
        raise ValueError(f"unknown selection scope {scope!r}; choose sequence or batch")
    if strategy not in ("topk", "stratified"):
        hint = " (a weighted rule: see routing.sampling / routing.importance)" if strategy in WEIGHTED_STRATEGIES else ""
        raise ValueError(f"select() implements strategy topk or stratified, not {strategy!r}{hint}")
    if torch.is_tensor(ratio) and capacity_ratio is None:
        raise ValueError("a tensor ratio needs capacity_ratio, a host float bounding it, for static shapes")
    cap_ratio = float(ratio) if capacity_ratio is None else capacity_ratio
    B, T = score.shape
    dev = score.device
    m = max(0, int(min_per_sequence))
    key = _rank_key(score, trainable)
    n_seq = trainable.sum(dim=1)  # [B]
    if scope == "sequence":
        cap = min(T, max(static_capacity(T, cap_ratio), m))
        k = torch.minimum(kept_count(n_seq, ratio).clamp(min=m), n_seq)  # [B]
        tier = None
        if strategy == "stratified":
            tier = stratified_keep(key, trainable, k, strata, generator).to(torch.int8)
        order = _descending_order(key, tier)[:, :cap]  # [B, cap]
        valid = (torch.arange(cap, device=dev).unsqueeze(0) < k.unsqueeze(1)).reshape(-1)
        index = (order + torch.arange(B, device=dev).unsqueeze(1) * T).reshape(-1)
    else:
        reserved = torch.zeros_like(trainable)
        if m > 0:  # each sequence's m hardest tokens rank before everything else
            seq_rank = _inverse(_descending_order(key))
            reserved = trainable & (seq_rank < m)
        n_reserved = torch.minimum(n_seq, torch.full_like(n_seq, m)).sum()
        k_ratio = kept_count(n_seq.sum(), ratio)
        k = torch.maximum(k_ratio, n_reserved)
        cap = min(B * T, max(static_capacity(B * T, cap_ratio), B * min(m, T)))
        tier = reserved.to(torch.int8) * 2
        if strategy == "stratified":
            picked = stratified_keep(key.reshape(1, -1), trainable.reshape(1, -1), k_ratio, strata, generator)
            tier = tier + picked.view(B, T).to(torch.int8)
        order = _descending_order(key.reshape(-1), tier.reshape(-1) if (m > 0 or strategy == "stratified") else None)
        index = order[:cap]
        valid = torch.arange(cap, device=dev) < k
    keep = torch.zeros(B * T, dtype=torch.bool, device=dev)
    keep.scatter_(0, index, valid)  # index entries are distinct, so each position is written once
    return Selection(keep.view(B, T), index, valid)


def sequence_scores(score: torch.Tensor, trainable: torch.Tensor) -> torch.Tensor:
    """[B] mean of ``score`` over each sequence's trainable tokens (sanitized); -inf where none."""
    finfo = torch.finfo(torch.float32)
    s = torch.nan_to_num(score.float(), nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
    n = trainable.sum(dim=1)
    total = torch.where(trainable, s.double(), torch.zeros_like(s, dtype=torch.float64)).sum(dim=1)
    mean = (total / n.clamp(min=1)).float()
    return mean.masked_fill(n == 0, float("-inf"))


def select_sequences(
    score: torch.Tensor,
    trainable: torch.Tensor,
    ratio: Ratio,
    *,
    capacity_ratio: float | None = None,
) -> SequenceSelection:
    """Keep the ``ceil(ratio * B)`` sequences with the highest mean score over trainable tokens.

    The row list has the static length ``ceil(capacity_ratio * B)`` (``capacity_ratio`` defaults to
    ``ratio``, and is required when ``ratio`` is a tensor); entries past the kept count, and rows
    without any trainable token, are marked invalid. Ties break by row order.
    """
    if score.shape != trainable.shape or score.dim() != 2:
        raise ValueError(f"score {tuple(score.shape)} and trainable {tuple(trainable.shape)} must both be [B, T]")
    if torch.is_tensor(ratio) and capacity_ratio is None:
        raise ValueError("a tensor ratio needs capacity_ratio, a host float bounding it, for static shapes")
    B = score.shape[0]
    seq = sequence_scores(score, trainable)
    cap = static_capacity(B, float(ratio) if capacity_ratio is None else capacity_ratio)
    index = torch.argsort(seq, descending=True, stable=True)[:cap]
    if torch.is_tensor(ratio):  # device arithmetic: no host round trip
        k = torch.ceil(ratio.to(device=score.device, dtype=torch.float64) * B - _EPS).clamp(min=1)
    else:
        k = static_capacity(B, ratio)
    has_tokens = trainable.any(dim=1).index_select(0, index)
    valid = (torch.arange(cap, device=score.device) < k) & has_tokens
    return SequenceSelection(index, valid, seq)


def sample_positions(trainable: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``stride``-th trainable position of each row, in order: ``(positions, valid)``, both
    [B, ceil(T / stride)] (long, bool). A row's trainable positions of rank 0, stride, 2 * stride, ...
    among its trainable positions are taken, so a row with any trainable position has one; slots past
    a row's count are invalid (position 0). Static shapes, on the device, no host sync."""
    B, T = trainable.shape
    slots = -(-T // stride)
    # trainable positions first, each group in position order (a stable sort of the "not trainable" flag)
    order = torch.argsort((~trainable).to(torch.int8), dim=1, stable=True)
    ranks = torch.arange(slots, device=trainable.device) * stride  # [slots]
    picked = order.index_select(1, ranks.clamp(max=T - 1))
    valid = ranks.unsqueeze(0) < trainable.sum(dim=1, keepdim=True)
    return picked.masked_fill(~valid, 0), valid


def mask_labels(targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Targets with every position outside ``keep`` set to the ignore index."""
    return targets.masked_fill(~keep, IGNORE_INDEX)


def shift_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets aligned with the positions that predict them (the one place of the shift).

    ``labels`` follow the Hugging Face convention (aligned with ``input_ids``, -100 = no loss).
    Position t predicts labels[t + 1]; the last position predicts nothing. Padding never trains.
    """
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets

"""Which tokens keep their label: top-k of the score, vectorized, static shapes, no host sync.

The kept count per sequence is ``ceil(ratio * n)`` of its ``n`` trainable tokens (at least one
where ``n > 0``). Every shape depends only on the batch's shape and the ratio, never on the data,
so selection never waits for the device and works under CUDA graphs / ``torch.compile``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

IGNORE_INDEX = -100
_EPS = 1e-9  # ratio * n is computed in float64; forgive representation error before ceil


class Selection(NamedTuple):
    keep: torch.Tensor
    """[B, T] bool: positions whose label is kept."""
    index: torch.Tensor
    """[K] long: flat positions (b * T + t) of a static-size candidate list holding every kept position."""
    valid: torch.Tensor
    """[K] bool: which entries of ``index`` are really kept (the rest are padding of the static size)."""


def kept_count(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """ceil(ratio * n), elementwise on an integer tensor; 0 stays 0, n >= 1 gives at least 1."""
    return torch.ceil(n.to(torch.float64) * ratio - _EPS).clamp(min=0).to(torch.long)


def static_capacity(length: int, ratio: float) -> int:
    """The largest ceil(ratio * n) for n <= length: a static bound on the kept count."""
    return max(1, min(length, math.ceil(length * ratio - _EPS)))


def _rank_key(score: torch.Tensor, trainable: torch.Tensor) -> torch.Tensor:
    """Sort key: trainable positions by score (non-finite scores sanitized), others strictly last."""
    finfo = torch.finfo(torch.float32)
    s = torch.nan_to_num(score.float(), nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
    return s.masked_fill(~trainable, float("-inf"))


def select(score: torch.Tensor, trainable: torch.Tensor, ratio: float, scope: str = "sequence") -> Selection:
    """Keep the top ``ratio`` of the trainable tokens, per sequence or over the whole batch.

    ``score`` and ``trainable`` are [B, T]; higher score = harder = kept first. Ties break by
    position (stable sort), so equal inputs give equal selections. A NaN score ranks last among
    trainable tokens; a non-trainable position is never kept.
    """
    if score.shape != trainable.shape or score.dim() != 2:
        raise ValueError(f"score {tuple(score.shape)} and trainable {tuple(trainable.shape)} must both be [B, T]")
    B, T = score.shape
    key = _rank_key(score, trainable)
    if scope == "sequence":
        cap = static_capacity(T, ratio)
        order = torch.argsort(key, dim=1, descending=True, stable=True)[:, :cap]  # [B, cap]
        k = kept_count(trainable.sum(dim=1), ratio)  # [B]
        valid = torch.arange(cap, device=score.device).unsqueeze(0) < k.unsqueeze(1)
        index = (order + torch.arange(B, device=score.device).unsqueeze(1) * T).reshape(-1)
        valid = valid.reshape(-1)
    elif scope == "batch":
        cap = static_capacity(B * T, ratio)
        index = torch.argsort(key.reshape(-1), descending=True, stable=True)[:cap]
        k = kept_count(trainable.sum(), ratio)
        valid = torch.arange(cap, device=score.device) < k
    else:
        raise ValueError(f"unknown selection scope {scope!r}; choose sequence or batch")
    keep = torch.zeros(B * T, dtype=torch.bool, device=score.device)
    keep.scatter_(0, index, valid)  # index entries are distinct, so each position is written once
    return Selection(keep.view(B, T), index, valid)


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

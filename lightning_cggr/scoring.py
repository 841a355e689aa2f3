"""Token difficulty scores: higher means harder, i.e. more worth a gradient.

Pure functions over the per-token statistics of a set of logits (``TokenStats``: logsumexp,
entropy, top-1 minus top-2 margin, NLL of the true next token), all fp32. Positions that are not
trainable (label -100, padding) get ``-inf`` so no selection can pick them, and they never enter
the statistics of ``combined``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .kernels import TokenStats

Scorer = Callable[[TokenStats, torch.Tensor], torch.Tensor]


def _masked(score: torch.Tensor, trainable: torch.Tensor) -> torch.Tensor:
    return score.float().masked_fill(~trainable, float("-inf"))


def entropy_score(stats: TokenStats, trainable: torch.Tensor) -> torch.Tensor:
    """Predictive entropy: an unsure router marks a hard token."""
    return _masked(stats.entropy, trainable)


def margin_score(stats: TokenStats, trainable: torch.Tensor) -> torch.Tensor:
    """Negative top-1 minus top-2 logit gap: a small gap marks a hard token."""
    return _masked(-stats.margin, trainable)


def loss_score(stats: TokenStats, trainable: torch.Tensor) -> torch.Tensor:
    """The router's NLL of the true next token."""
    return _masked(stats.nll, trainable)


def masked_zscore(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / std with mean and (population) std over ``mask`` only; device-side, no sync."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1.0)
    xm = torch.where(mask, x, torch.zeros_like(x))
    mean = xm.sum() / n
    var = (torch.where(mask, x - mean, torch.zeros_like(x)) ** 2).sum() / n
    return (x - mean) / (var.sqrt() + eps)


def combined_score(stats: TokenStats, trainable: torch.Tensor) -> torch.Tensor:
    """z(entropy) - z(margin), statistics over the batch's trainable tokens."""
    z = masked_zscore(stats.entropy.float(), trainable) - masked_zscore(stats.margin.float(), trainable)
    return _masked(z, trainable)


SCORERS: dict[str, Scorer] = {
    "entropy": entropy_score,
    "margin": margin_score,
    "loss": loss_score,
    "combined": combined_score,
}


def get_scorer(name: str) -> Scorer:
    """The scorer registered under ``name``; an unknown name is an error, never a default."""
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scoring strategy {name!r}; choose one of {', '.join(SCORERS)}") from None

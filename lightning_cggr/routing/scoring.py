"""Token difficulty scores: higher means harder, i.e. more worth a gradient.

Pure functions over the per-token statistics of a set of logits (``TokenStats``: logsumexp,
entropy, top-1 minus top-2 margin, NLL of the true next token), all fp32. Positions that are not
trainable (label -100, padding) get ``-inf`` so no selection can pick them, and they never enter
the statistics of ``combined``.

Two scorings need more than one set of statistics and are dispatched by the module by name:
``excess_loss`` (Rho-1: current NLL minus a frozen reference model's NLL, :func:`excess_loss_score`)
and ``random`` (the control: i.i.d. uniform scores from a generator seeded by ``(seed, step)``,
:func:`random_score`, no router run at all).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..kernels import TokenStats

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
    return (x - mean) / var.sqrt().clamp(min=eps)  # eps only guards a constant input


def combined_score(stats: TokenStats, trainable: torch.Tensor) -> torch.Tensor:
    """z(entropy) - z(margin), statistics over the batch's trainable tokens."""
    z = masked_zscore(stats.entropy.float(), trainable) - masked_zscore(stats.margin.float(), trainable)
    return _masked(z, trainable)


def excess_loss_score(stats: TokenStats, trainable: torch.Tensor, reference: TokenStats) -> torch.Tensor:
    """Rho-1 excess loss: the current NLL minus the frozen reference model's NLL of the same token.

    High where the model is worse than a reference that learned the token: learnable, not noise.
    """
    return _masked(stats.nll.float() - reference.nll.float(), trainable)


def random_score(trainable: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) scores drawn on ``trainable``'s device from ``generator``: the random-selection control."""
    u = torch.rand(trainable.shape, generator=generator, device=trainable.device, dtype=torch.float32)
    return _masked(u, trainable)


def step_generator(seed: int, step: int, device: torch.device | str, stream: int = 0,
                   micro_batch: int = 0) -> torch.Generator:
    """A generator on ``device`` seeded from the host ints ``(seed, step, stream, micro_batch)``: same
    ints, same draws.

    ``stream`` separates independent uses in one step (0: random scores, 1: stratified draws);
    ``micro_batch`` the micro-batches of one optimizer step (``rank x accumulate + i``), so that each
    rank and accumulated micro-batch draws its own choice (0: the seed of a single micro-batch).
    """
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB
             + int(micro_batch) * 0xD6E8FEB86659FD93 + 1)
    mixed %= 1 << 63
    return torch.Generator(device=torch.device(device)).manual_seed(mixed)


SCORERS: dict[str, Scorer] = {
    "entropy": entropy_score,
    "margin": margin_score,
    "loss": loss_score,
    "combined": combined_score,
}


# Scorings the module computes from more than the router's statistics (see the module docstring).
SPECIAL_SCORINGS = ("excess_loss", "random")
SCORING_NAMES = (*SCORERS, *SPECIAL_SCORINGS)


def get_scorer(name: str) -> Scorer:
    """The statistics scorer registered under ``name``; an unknown name is an error, never a default.

    ``excess_loss`` and ``random`` are valid scorings but not functions of one ``TokenStats``:
    asking for them here is an error that says so.
    """
    if name in SPECIAL_SCORINGS:
        raise ValueError(f"scoring {name!r} is not a statistics scorer; use {name}_score directly")
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scoring strategy {name!r}; choose one of {', '.join(SCORING_NAMES)}") from None

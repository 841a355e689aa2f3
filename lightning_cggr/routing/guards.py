"""Defined behaviour for bad values met during training (not config mistakes: those are errors).

- Non-finite router statistics (fp16/bf16 overflow in the router's blocks, a NaN in the weights):
  the token is never ranked hard. Its statistics are replaced by zeros (finite; NLL 0 reads as a
  confident token) and it is removed from the scorer's trainable mask, so it scores ``-inf``,
  ranks after every finite token, and stays out of batch statistics such as ``combined``'s
  z-scores (one NaN there would otherwise make every score NaN). It still counts as trainable for
  the kept count: if the ratio asks for more tokens than have finite scores, it may be kept, and
  its loss is whatever the model's own forward gives.
"""

from __future__ import annotations

import torch

from ..kernels import TokenStats


def sanitize_stats(stats: TokenStats) -> tuple[TokenStats, torch.Tensor]:
    """(stats with non-finite rows made easy and finite, [..] bool mask of fully finite rows). No sync."""
    finite = torch.isfinite(stats.lse) & torch.isfinite(stats.entropy) & torch.isfinite(stats.margin)
    finite = finite & torch.isfinite(stats.nll)
    zero = torch.zeros((), dtype=stats.entropy.dtype, device=stats.entropy.device)
    clean = TokenStats(
        lse=torch.where(finite, stats.lse, zero),
        entropy=torch.where(finite, stats.entropy, zero),
        margin=torch.where(finite, stats.margin, zero),
        nll=torch.where(finite, stats.nll, zero),
    )
    return clean, finite

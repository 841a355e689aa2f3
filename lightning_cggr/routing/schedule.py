"""The keep ratio in force at a step: constant, a curriculum on host ints, or dynamic on the device.

- ``constant``: ``cggr.min_tokens_ratio`` every step after warmup.
- ``curriculum``: with ``s = global_step - warmup_steps`` and ``p = min(s / steps, 1)``, the ratio
  anneals from 1.0 to the target ``r``: linear ``1 + (r - 1) p``; cosine
  ``r + (1 - r) (1 + cos(pi p)) / 2``. Pure host arithmetic on ints: no device involvement.
- ``dynamic``: from the batch's mean confidence ``c`` (the scorer's mean probability of the true
  next token, ``exp(-nll)``, over trainable tokens, in [0, 1]) the ratio is
  ``max - (max - min) c``, clamped to ``[min, max]``: a confident batch trains fewer tokens. It is
  a 0-d device tensor (never read on the host); static buffers are sized by ``max``. The target
  ``min_tokens_ratio`` is not used in this mode.
"""

from __future__ import annotations

import math

import torch

from ..kernels import TokenStats

RATIO_SCHEDULES = ("constant", "curriculum", "dynamic")
CURRICULUM_SHAPES = ("linear", "cosine")


def curriculum_ratio(target: float, step: int, steps: int, shape: str = "linear") -> float:
    """Ratio after ``step`` routed steps of a ``steps``-long anneal from 1.0 to ``target``."""
    if shape not in CURRICULUM_SHAPES:
        raise ValueError(f"unknown curriculum shape {shape!r}; choose {' or '.join(CURRICULUM_SHAPES)}")
    p = min(max(step, 0) / max(steps, 1), 1.0)
    if shape == "linear":
        return 1.0 + (target - 1.0) * p
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * p))


def host_ratio(
    schedule: str, target: float, global_step: int, warmup_steps: int, steps: int = 1, shape: str = "linear"
) -> float:
    """The host-side ratio for ``constant`` and ``curriculum`` schedules (``dynamic`` has none)."""
    if schedule == "constant":
        return float(target)
    if schedule == "curriculum":
        return curriculum_ratio(target, global_step - warmup_steps, steps, shape)
    raise ValueError(f"schedule {schedule!r} has no host-side ratio; choose constant or curriculum")


def batch_confidence(stats: TokenStats, trainable: torch.Tensor) -> torch.Tensor:
    """0-d fp32: mean ``exp(-nll)`` over trainable tokens (0 when there are none)."""
    p = torch.exp(-stats.nll.float().reshape(trainable.shape))
    total = torch.where(trainable, p, torch.zeros_like(p)).sum()
    return total / trainable.sum().clamp(min=1)


def dynamic_ratio(confidence: torch.Tensor, ratio_min: float, ratio_max: float) -> torch.Tensor:
    """0-d float64 ratio ``max - (max - min) * confidence``, clamped to ``[min, max]`` (in fp32 the bound
    0.3 is 0.30000001, whose ceil(r x 10) keeps a 4th token of 10)."""
    r = ratio_max - (ratio_max - ratio_min) * confidence.double()
    return r.clamp(min=ratio_min, max=ratio_max)

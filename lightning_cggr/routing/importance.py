"""Importance-sampled keep (Katharopoulos & Fleuret 2018 style): unbiased, with a static capacity.

Keep unit ``i`` with probability ``p_i = clip(c * w_i, p_min, 1)``, where ``w_i >= 0`` is the
transformed score (:data:`TRANSFORMS`) and ``c`` solves ``sum_i p_i = ratio * n`` exactly (``n``:
trainable units in the budget). The draw is randomized systematic sampling
(:func:`systematic_sample`), whose inclusion probability is exactly ``p_i`` and whose sample size is
``floor`` or ``ceil`` of ``ratio * n``, so it fits the static capacity ``ceil(ratio * L)`` of a
budget of ``L`` slots. Weight ``1 / p_i <= 1 / p_min``; ``normaliser`` = trainable tokens, so
``sum_i keep_i w_i nll_i / normaliser`` is unbiased for the full-token mean (Horvitz-Thompson).
See :mod:`.sampling` for the shared result types, the conventions and the other rules.
"""

from __future__ import annotations

import math

import torch

from .selection import static_capacity
from .sampling import (  # the shared checks and packing of the weighted rules
    Ratio,
    WeightedSelection,
    WeightedSequenceSelection,
    _check_fraction,
    _check_inputs,
    _check_ratio,
    _device_ratio,
    _pack,
    _rows,
    sequence_mean_scores,
)

TRANSFORMS = ("rank", "relu", "shift", "softplus")
"""``cggr.selection.importance_transform``: how a score becomes a non-negative importance."""
_TINY = 1e-200  # importances below this fraction of the budget's largest count as zero


def importance_weights(score: torch.Tensor, active: torch.Tensor, transform: str) -> torch.Tensor:
    """[R, L] float64 importances ``w >= 0`` per budget row; 0 off ``active`` and at non-finite scores.

    ``relu``: ``max(s, 0)`` (for non-negative scores such as NLL or entropy this is ``p ∝ score``,
    Katharopoulos & Fleuret 2018). ``shift``: ``s - min_row(s)`` (for signed scores such as
    z-scores or excess loss; the row's easiest unit gets 0, i.e. the floor ``p_min``).
    ``softplus``: ``log(1 + exp(s))``. ``rank``: the number of the row's finite units scoring
    ``<= s`` (>= 1 for every finite unit; ties share the upper count): scale-free, outlier-proof.
    The minimum and ranks are over the row's active, finite-scored units.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown importance transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    s = score.double()
    fin = active & torch.isfinite(s)
    s0 = torch.where(fin, s, torch.zeros_like(s))
    if transform == "relu":
        w = s0.clamp(min=0)
    elif transform == "shift":
        low = torch.where(fin, s, torch.full_like(s, math.inf)).amin(dim=1, keepdim=True)
        w = s0 - torch.where(torch.isfinite(low), low, torch.zeros_like(low))
    elif transform == "softplus":
        w = torch.nn.functional.softplus(s0)
    else:
        ordered = torch.sort(torch.where(fin, s, torch.full_like(s, math.inf)), dim=1).values
        w = torch.searchsorted(ordered, s0.contiguous(), right=True).double()
    return torch.where(fin, w.clamp(min=0), torch.zeros_like(w))


def _solve_inclusion(w: torch.Tensor, active: torch.Tensor, target: torch.Tensor, p_min: float) -> torch.Tensor:
    """[R, L] float64 ``p`` with ``p_i = clip(c_r * w_i, p_min, 1)`` on active units, ``sum_i p_i = target_r``.

    ``g(c) = sum_i clip(c w_i, p_min, 1)`` is continuous, nondecreasing and linear between the
    breakpoints ``p_min / w_i`` and ``1 / w_i``; it is evaluated at all of them (one sort, suffix
    sums, ``searchsorted``) and ``c`` is interpolated on the segment holding ``target``: exact up to
    rounding, no iteration. ``target`` must lie in ``[p_min n, n]``. Units with ``w = 0`` sit at the
    floor; if the target is out of reach even with every ``w > 0`` unit at 1, those are set to 1 and
    the zero-importance units share the rest equally (the limit of ``w + eps`` as ``eps -> 0``).
    """
    R, L = w.shape
    dev, f64 = w.device, torch.float64
    inf = torch.full((), math.inf, dtype=f64, device=dev)
    zero = torch.zeros((), dtype=f64, device=dev)
    n = active.sum(dim=1, keepdim=True).double()  # [R, 1]
    w = w / w.amax(dim=1, keepdim=True).clamp(min=torch.finfo(f64).tiny)  # largest is 1: no overflow in 1/w
    pos = active & (w > _TINY)
    npos = pos.sum(dim=1, keepdim=True)
    upper, order = torch.sort(torch.where(pos, 1.0 / w.clamp(min=_TINY), inf), dim=1, stable=True)
    lower = upper * p_min  # same order
    # suffix sums, accumulated from the smallest importance up: a middle sum never cancels against
    # the (possibly far larger) capped units, only against floor units, each smaller than it
    tail = torch.where(pos, w, zero).gather(1, order).flip(1).cumsum(1).flip(1)
    tail = torch.cat([tail, torch.zeros(R, 1, dtype=f64, device=dev)], 1)  # tail[k] = sum_{i >= k} w_(i)
    cand = torch.sort(torch.cat([lower, upper], dim=1), dim=1).values  # [R, 2L]
    finite = torch.isfinite(cand)
    c = torch.where(finite, cand, zero)
    at_cap = torch.searchsorted(upper, c, right=True).minimum(npos)  # units with c w_i >= 1
    above_floor = torch.searchsorted(lower, c, right=False).minimum(npos).maximum(at_cap)  # c w_i > p_min
    middle = tail.gather(1, at_cap) - tail.gather(1, above_floor)
    g = at_cap.double() + c * middle + p_min * (n - above_floor.double())
    g = torch.where(finite, g, inf)
    j = torch.searchsorted(g, target.reshape(R, 1), right=False)  # first breakpoint with g >= target
    j0, j1 = (j - 1).clamp(min=0, max=2 * L - 1), j.clamp(max=2 * L - 1)
    c0, c1, g0, g1 = c.gather(1, j0), c.gather(1, j1), g.gather(1, j0), g.gather(1, j1)
    slope = torch.isfinite(g1) & (g1 > g0)
    frac = torch.where(slope, (target.reshape(R, 1) - g0) / torch.where(slope, g1 - g0, 1.0), 1.0).clamp(0, 1)
    const = c0 + frac * (c1 - c0)
    p = torch.where(pos, (const * w).clamp(p_min, 1.0), torch.full_like(w, p_min))
    reach = npos.double() + p_min * (n - npos.double())  # g(c -> inf)
    rest = ((target.reshape(R, 1) - npos.double()) / (n - npos.double()).clamp(min=1)).clamp(p_min, 1.0)
    p = torch.where(target.reshape(R, 1) > reach, torch.where(pos, torch.ones_like(p), rest), p)
    return torch.where(active, p, torch.zeros_like(p))


def _importance_rows(score_rows, active, ratio, cap_ratio, p_min, transform) -> torch.Tensor:
    if p_min > cap_ratio:
        raise ValueError(f"p_min {p_min} exceeds the ratio bound {cap_ratio}: the floor alone keeps more than asked")
    r = _device_ratio(ratio, score_rows.device, p_min, cap_ratio)
    n = active.sum(dim=1).double()
    target = (n * r).minimum(n).maximum(n * p_min)  # a host ratio is already in [p_min, 1]
    return _solve_inclusion(importance_weights(score_rows, active, transform), active, target, p_min)


def importance_probabilities(
    score: torch.Tensor,
    trainable: torch.Tensor,
    ratio: Ratio,
    *,
    p_min: float,
    scope: str = "sequence",
    transform: str = "rank",
    capacity_ratio: float | None = None,
) -> torch.Tensor:
    """[B, T] float64 inclusion probabilities of :func:`importance_sample`; 0 at untrainable positions.

    ``p_i = clip(c * w_i, p_min, 1)`` with ``w = importance_weights(score, transform)`` and one ``c``
    per budget (each row for ``scope="sequence"``, the whole batch for ``"batch"``) solving
    ``sum_i p_i = ratio * n`` over that budget's ``n`` trainable tokens. Requires ``p_min <= ratio``
    (a tensor ratio is clamped on the device into ``[p_min, capacity_ratio]``).
    """
    trainable = _check_inputs(score, trainable, scope)
    cap_ratio = _check_ratio(ratio, capacity_ratio)
    p_min = _check_fraction("p_min", p_min, zero_ok=False, one_ok=True)
    if not torch.is_tensor(ratio) and p_min > ratio:
        raise ValueError(f"p_min {p_min} exceeds ratio {ratio}: the floor alone keeps more than the ratio")
    p = _importance_rows(_rows(score, scope), _rows(trainable, scope), ratio, cap_ratio, p_min, transform)
    return p.view(score.shape)


def systematic_sample(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[R, L] bool: one randomized systematic sample per row, ``P(unit i kept) = p_i`` exactly.

    Units are put in a uniformly random order, laid end to end as intervals of length ``p_i`` on
    ``[0, S)`` (``S = sum_i p_i``), and a unit is kept when one of the points ``u, u + 1, ...`` with
    ``u ~ U[0, 1)`` falls in its interval (Madow's systematic pps sampling, random order as in
    Hartley & Rao 1962). As ``p_i <= 1`` no unit is hit twice; the sample size is ``floor(S)`` or
    ``ceil(S)``, and ``p_i = 0`` is never kept. Exact up to float64 rounding of the running sums.
    """
    R, L = p.shape
    dev = p.device
    perm = torch.argsort(torch.rand(R, L, generator=generator, device=dev, dtype=torch.float64), dim=1)
    end = p.double().gather(1, perm).cumsum(dim=1)
    start = torch.cat([torch.zeros(R, 1, dtype=torch.float64, device=dev), end[:, :-1]], dim=1)
    u = torch.rand(R, 1, generator=generator, device=dev, dtype=torch.float64)
    hit = torch.ceil(end - u) > torch.ceil(start - u)  # a point u + m lies in [start, end)
    return torch.zeros_like(hit).scatter_(1, perm, hit)


def importance_sample(
    score: torch.Tensor,
    trainable: torch.Tensor,
    ratio: Ratio,
    *,
    p_min: float,
    scope: str = "sequence",
    transform: str = "rank",
    capacity_ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> WeightedSelection:
    """Keep each trainable token with probability ``p_i`` (:func:`importance_probabilities`), weight ``1 / p_i``.

    Drawn by :func:`systematic_sample` per budget, so ``E[keep_i] = p_i`` exactly and the expected
    kept count is ``ratio * n``. Static capacity ``K = B * ceil(capacity_ratio * T)`` (scope
    ``sequence``) or ``ceil(capacity_ratio * B * T)`` (``batch``); ``capacity_ratio`` defaults to
    ``ratio``. ``normaliser``: trainable tokens of the batch, so ``sum(weight * nll) / normaliser``
    is unbiased for the mean NLL over all trainable tokens.
    """
    trainable = _check_inputs(score, trainable, scope)
    p = importance_probabilities(score, trainable, ratio, p_min=p_min, scope=scope, transform=transform,
                                 capacity_ratio=capacity_ratio)
    cap_ratio = _check_ratio(ratio, capacity_ratio)
    rows = _rows(p, scope)
    index, valid, keep = _pack(systematic_sample(rows, generator), static_capacity(rows.shape[1], cap_ratio))
    keep = keep.view(score.shape)
    weight = torch.where(keep, 1.0 / p.clamp(min=p_min), torch.zeros_like(p)).float()
    return WeightedSelection(keep, index, valid, weight, trainable.sum())


def importance_sample_sequences(
    score: torch.Tensor,
    trainable: torch.Tensor,
    ratio: Ratio,
    *,
    p_min: float,
    transform: str = "rank",
    capacity_ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> WeightedSequenceSelection:
    """Keep each row with probability ``p_b`` solved over the rows holding a trainable token, weight ``1 / p_b``.

    ``p_b = clip(c * w_b, p_min, 1)`` with ``w`` the transformed :func:`sequence_mean_scores` and
    ``sum_b p_b = ratio * n_rows`` (rows without trainable tokens: ``p = 0``). Static capacity
    ``Kb = ceil(capacity_ratio * B)`` rows. ``normaliser``: trainable tokens of the whole batch,
    so ``sum_b weight_b * rowNLL_b / normaliser`` is unbiased for the full-token mean.
    """
    trainable = _check_inputs(score, trainable)
    cap_ratio = _check_ratio(ratio, capacity_ratio)
    p_min = _check_fraction("p_min", p_min, zero_ok=False, one_ok=True)
    if not torch.is_tensor(ratio) and p_min > ratio:
        raise ValueError(f"p_min {p_min} exceeds ratio {ratio}: the floor alone keeps more than the ratio")
    seq = sequence_mean_scores(score, trainable)
    has = trainable.any(dim=1)
    p = _importance_rows(seq.unsqueeze(0), has.unsqueeze(0), ratio, cap_ratio, p_min, transform)
    index, valid, keep = _pack(systematic_sample(p, generator), static_capacity(score.shape[0], cap_ratio))
    p_rows = p[0].index_select(0, index)
    weight = torch.where(valid, 1.0 / p_rows.clamp(min=p_min), torch.zeros_like(p_rows))
    return WeightedSequenceSelection(index, valid, seq, weight.float(), keep[0], trainable.sum())

"""Kept-row compaction: pay the loss for the rows that have a label, at a static capacity.

A loss over ``N`` rows of which only ``k`` keep their label still runs its GEMMs over all ``N``.
:func:`compact_rows` turns the labels into a fixed-size row index so that the caller gathers
``capacity`` rows (``hidden.index_select(0, index)``) and calls the loss on those only. The shape
depends on ``capacity`` (a host int, e.g. ``ceil(ratio * tokens)`` from the selection), never on the
data: no ``nonzero()``, no ``.item()``. Gradients reach the full hidden states through
``index_select``'s backward (``index_add`` into zeros: 0 at dropped rows)::

    c = compact_rows(labels, capacity)
    loss = linear_cross_entropy(hidden.index_select(0, c.index), weight, c.labels, reduction="sum")

gives the loss and gradients of ``linear_cross_entropy(hidden, weight, labels, reduction="sum")``
whenever at most ``capacity`` rows are kept (``c.dropped == 0``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class CompactRows(NamedTuple):
    """A static-capacity view of the kept rows of ``labels``."""

    index: torch.Tensor
    """int64 ``[capacity]``: kept rows in their original order, then row 0 for the unused slots."""
    labels: torch.Tensor
    """``[capacity]`` labels of those rows (dtype of the input); ``ignore_index`` at unused slots."""
    dropped: torch.Tensor
    """int64 0-d device tensor: kept rows that did not fit (``max(kept - capacity, 0)``); 0 when the
    capacity is an upper bound of the kept count, as a selection's static capacity is."""


def compact_rows(labels: torch.Tensor, capacity: int, *, ignore_index: int = -100) -> CompactRows:
    """Indices of the rows of ``labels`` [N] that are not ``ignore_index``, packed into ``capacity`` slots.

    O(N) on the device: a cumulative sum and one scatter (deterministic: every kept row that fits
    has its own slot; the rest all land in one spare slot that is cut off).
    Rows beyond ``capacity`` are dropped, counted in ``dropped`` (a device tensor: check it at a log
    interval, not in the step).
    """
    if labels.dim() != 1:
        raise ValueError(f"compact_rows: labels must be [N], got shape {tuple(labels.shape)}")
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
        raise ValueError(f"compact_rows: capacity must be an int >= 0 (a host number), got {capacity!r}")
    n = labels.shape[0]
    if capacity > n:
        raise ValueError(f"compact_rows: capacity {capacity} exceeds the {n} rows; use capacity <= N")
    dev = labels.device
    keep = labels != ignore_index
    slot = torch.cumsum(keep, dim=0) - 1  # position of each kept row among the kept rows
    fits = keep & (slot < capacity)
    # kept rows that fit go to their slot; every other row writes to a spare slot past the end
    target = torch.where(fits, slot, torch.full_like(slot, capacity))
    index = torch.zeros(capacity + 1, dtype=torch.int64, device=dev)
    index.scatter_(0, target, torch.arange(n, dtype=torch.int64, device=dev))
    index = index[:capacity]
    used = torch.arange(capacity, device=dev) < fits.sum()
    fill = torch.full((), ignore_index, dtype=labels.dtype, device=dev)
    packed = torch.where(used, labels.index_select(0, index), fill)
    dropped = (keep.sum() - capacity).clamp_min(0)
    return CompactRows(index, packed, dropped)

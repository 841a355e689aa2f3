"""Validation loaders that count every example exactly once, on one rank or several.

Under DDP or FSDP Lightning gives a plain validation loader a ``DistributedSampler``, which makes the
ranks' shares equal by repeating examples from the start of the set: with 79 validation blocks on 2
ranks one block counted twice and ``val/loss`` differed from the one-process value in the fourth
digit. Dropping the remainder instead would leave examples out, and ranks cannot simply run
different numbers of batches (each forward of a sharded or buffer-broadcasting model is a collective
that every rank must join).

:func:`eval_loader` keeps the shares equal with slots that train nothing: :class:`EvalSampler` (a
``DistributedSampler``, so Lightning keeps it) hands rank ``r`` the slots ``r, r + W, ...`` of
``ceil(N / W) * W``, and a slot past the last example is a copy of the first with every label -100.
The held-out loss sums NLL and counts trainable tokens, so such a slot adds nothing to either; on one
process there is no such slot and the order is the plain sequential one.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..routing.selection import IGNORE_INDEX
from .resumable import _dist_world


class EvalSampler(DistributedSampler):
    """This rank's slots, in order: ``rank, rank + world, ...`` below ``ceil(N / world) * world``; slots
    from ``N`` on are padding (see :class:`PaddedSet`)."""

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None):
        world, r = _dist_world()
        super().__init__(dataset, num_replicas=world if num_replicas is None else num_replicas,
                         rank=r if rank is None else rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


def without_labels(example: dict[str, Any]) -> dict[str, Any]:
    """``example`` with every label ignored (-100): a list or a tensor, as the dataset gives it."""
    labels = example["labels"]
    ignored = torch.full_like(labels, IGNORE_INDEX) if torch.is_tensor(labels) else [IGNORE_INDEX] * len(labels)
    return {**example, "labels": ignored}


class PaddedSet(Dataset):
    """``dataset`` whose indices past its end give its first example with no label (padding slots)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if index < len(self.dataset):
            return self.dataset[index]
        return without_labels(self.dataset[0])


def eval_loader(dataset: Dataset, batch_size: int, collate_fn: Callable, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A validation loader over ``dataset`` in order, each example counted once on any number of
    ranks (build it once the process group is up: Lightning calls ``val_dataloader`` then)."""
    padded = PaddedSet(dataset)
    return DataLoader(padded, batch_size=batch_size, sampler=EvalSampler(padded), collate_fn=collate_fn,
                      num_workers=num_workers, pin_memory=pin_memory)

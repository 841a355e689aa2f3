"""A training DataLoader that a checkpoint can resume in the middle of an epoch.

Lightning 2.6 restores model, optimizer, scheduler and loop counters, but a plain DataLoader starts
its epoch over: a run resumed mid-epoch would see the epoch's first batches again (Lightning only
warns). :class:`ResumableLoader` implements Lightning's ``state_dict`` / ``load_state_dict``
protocol for dataloaders, which the fit loop saves into checkpoints and restores before it creates
the iterator. Its state is (epoch, batches already handed to the trainer in that epoch).

The order is a pure function of ``(seed, epoch)``: :class:`EpochSampler` is a
``DistributedSampler`` (so Lightning keeps it under DDP/FSDP instead of substituting its own),
shuffled by ``seed + epoch``, each rank taking its share; resuming skips the batches of the saved
epoch that were already trained on.

How many is that? Batches handed out are not batches trained on: a checkpoint written on an
exception (Ctrl-C) may come from inside a step whose batch was fetched but never finished, and
Lightning then re-runs that batch. So after a resume the loader asks, at its first batch, for
Lightning's own restored count (``position``, see :func:`fit_position`), and falls back to the
saved count of batches handed out when it has no trainer.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from ..errors import DataError

log = logging.getLogger(__name__)


def _dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """This rank's share of a ``(seed, epoch)`` permutation, optionally starting part-way in."""

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True, num_replicas=None, rank=None):
        world, r = _dist_world()
        super().__init__(
            dataset,
            num_replicas=world if num_replicas is None else num_replicas,
            rank=r if rank is None else rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,  # every rank the same number of samples, none repeated
        )
        self.start = 0
        """Samples of ``self.epoch`` to skip on the next pass (set when resuming; one pass only)."""

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


def fingerprint(*arrays) -> str:
    """A short digest of integer arrays (numpy or CPU torch): their dtypes, shapes and bytes."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(array.numpy() if hasattr(array, "numpy") else array)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()[:20]


def fit_position(trainer) -> Callable[[], int]:
    """Batches of the current epoch that ``trainer``'s fit loop has finished (read when called).

    Read at the loader's first batch after a resume, i.e. after Lightning has reset its restored
    progress counters: the index of the next batch Lightning will run.
    """
    return lambda: int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


def load_saved_position(trainer) -> None:
    """Hand a resumed fit's training loader its saved position, where Lightning has not: called at
    ``on_train_start``, after the checkpoint's loop state is restored and before the first batch.

    Lightning gives a loader its saved state only when it builds the loader after the restore. A
    module that asks for ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` (the LR
    schedule needs the run's length) makes Lightning build the loader before the restore whenever
    ``max_epochs`` is set, and the saved position was then never loaded: the resume started the
    interrupted epoch over. Lightning keeps that state pending in its fit loop; this loads it
    (nothing when it was loaded already, or there is none)."""
    load = getattr(trainer.fit_loop, "_load_combined_loader_states", None)  # lightning 2.6: private
    if load is not None:
        load()


def pins_memory(trainer) -> bool:
    """Whether loaders for ``trainer`` should hand out batches in pinned (page-locked) host memory:
    on a CUDA device. Lightning copies each batch to the device with ``non_blocking=True``, which
    is asynchronous only from pinned memory; from ordinary (pageable) memory CUDA documents that the
    copy may first synchronize with the stream, i.e. wait for the kernels already queued: a
    host-device sync at every step."""
    return trainer is not None and trainer.strategy.root_device.type == "cuda"


def check_fills_batch(examples: int, batch_size: int, world: int = 1) -> None:
    """A :class:`DataError` unless ``examples`` fill one batch of ``batch_size`` on each of ``world``
    ranks: the training loader drops its last partial batch, so fewer would be an epoch of nothing."""
    if examples < batch_size * world:
        raise DataError(
            f"{examples} training example(s) do not fill one batch of {batch_size}"
            + (f" on each of {world} ranks" if world > 1 else "")
            + ": lower data.batch_size or add data"
        )


class ResumableLoader(DataLoader):
    """A shuffled, drop-last training loader whose position is saved in Lightning checkpoints.

    ``len()`` stays the full epoch's batch count (Lightning's progress counters assume it); after a
    resume the first pass yields only the batches not yet trained on. ``position`` (e.g.
    ``fit_position(trainer)``) tells how many those are when the first batch is drawn.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        position: Callable[[], int] | None = None,
        sampler: Sampler | None = None,
        drop_last: bool = True,
        **kwargs: Any,
    ):
        """``sampler``: None (the loader makes its :class:`EpochSampler`), or a ``SequentialSampler``
        over ``dataset``, which is how Lightning rebuilds a training loader for
        ``trainer.overfit_batches``: the same loader, unshuffled (each rank still its own share).
        ``drop_last`` is always True (an argument so that such a rebuild may pass it)."""
        if not drop_last:
            raise ValueError("ResumableLoader always drops the last partial batch (drop_last=True)")
        if sampler is not None:
            if not isinstance(sampler, SequentialSampler):
                raise TypeError(f"ResumableLoader draws its own order (EpochSampler); got sampler="
                                f"{type(sampler).__name__}: pass shuffle=False for the dataset's order")
            shuffle = False
        check_fills_batch(len(dataset), batch_size, _dist_world()[0])
        sampler = EpochSampler(dataset, seed=seed, shuffle=shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self._consumed = 0
        self._position = position
        self._resumed = False

    def __iter__(self):
        # A generator: its body (sampler order, skip) runs at the first batch, after Lightning's
        # set_epoch and after its loops have reset their restored counters.
        if self._resumed and self._position is not None and self.sampler.start:
            self.sampler.start = self._position() * self.batch_size
        self._resumed = False
        self._consumed = self.sampler.start // self.batch_size
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def _fingerprint(self) -> str | None:
        """The training data's fingerprint (see :func:`fingerprint`), computed once; None for a
        dataset without one."""
        if not hasattr(self, "_data_fingerprint"):
            method = getattr(self.dataset, "fingerprint", None)
            self._data_fingerprint = method() if callable(method) else None
        return self._data_fingerprint

    def state_dict(self) -> dict[str, int | str]:
        world, _ = _dist_world()
        state = {"epoch": int(self.sampler.epoch), "batches": int(self._consumed), "world_size": world,
                 "batch_size": int(self.batch_size)}
        if (data := self._fingerprint()) is not None:
            state["data"] = data
        return state

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        world, _ = _dist_world()
        self.sampler.epoch = int(state["epoch"])
        why = None
        if state.get("world_size", world) != world or state.get("batch_size", self.batch_size) != self.batch_size:
            why = (f"the checkpoint's data position was saved with world_size={state.get('world_size')}, "
                   f"batch_size={state.get('batch_size')}; this run has world_size={world}, batch_size="
                   f"{self.batch_size}")
        elif "data" in state and self._fingerprint() is not None and state["data"] != self._fingerprint():
            why = (f"the training data differs from the checkpoint's (its files or their tokenization changed: "
                   f"{len(self.dataset)} training examples now), so the interrupted run's position in epoch "
                   f"{state['epoch']} means nothing here")
        if why is not None:  # a log line (the console and train.log), once: every rank finds the same
            if _dist_world()[1] == 0:
                log.warning("%s: epoch %d restarts from its first batch", why, state["epoch"])
            self.sampler.start = self._consumed = 0
            return
        self.sampler.start = int(state["batches"]) * self.batch_size
        self._consumed = int(state["batches"])
        self._resumed = True

"""Checkpoint files that are never half written, and a check that they can be written at all.

A checkpoint is written to a temporary file in its destination folder, flushed and fsynced, then
renamed over the final name (``os.replace``: atomic on POSIX within one filesystem, and the
temporary file is on the destination's filesystem by construction). A crash, a full disk or a
``kill -9`` during the write leaves the previous checkpoint untouched under its name; the temporary
file is removed on any Python-level failure, and leftovers of a killed process are removed by
:func:`remove_stale_temporaries` before the next run writes.

FSDP2 (``trainer.strategy=fsdp2``) saves a folder (one shard per rank); :class:`AtomicModelParallelStrategy`
writes it beside the final name and swaps it in on rank 0.

:func:`preflight` runs before training starts: the checkpoint folder must be writable and hold
room for two checkpoints (estimated from the model and its optimizer state; an atomic save
holds the old and the new one at once, and an existing ``last.ckpt`` counts as one), so that a
read-only or full disk is an error at step 0, not at the second save.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import UserError

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
"""Temporary checkpoint files are ``.<final name>.<random>.tmp`` in the destination folder."""


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` such that ``path`` holds either the old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have given
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes (see the module docstring).

    Remote paths (``s3://`` and the like) keep Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove what a killed save left behind in ``folder`` (temporary files and partial FSDP2
    folders); returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith(".") and (entry.name.endswith(TEMP_SUFFIX) or entry.name.endswith(PARTIAL_SUFFIX)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry)
    return removed


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer_moments: int = 2) -> int:
    """Bytes of a full checkpoint: the weights plus ``optimizer_moments`` fp32 tensors per trainable
    parameter (AdamW keeps two), plus 1 MiB for loop and callback state."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    moments = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad) * optimizer_moments
    return weights + moments + (1 << 20)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def preflight(folder: str | os.PathLike, need_bytes: int) -> None:
    """Fail now, with a UserError naming the folder and the fix, if ``folder`` cannot take the run's
    checkpoints of ``need_bytes`` each: not creatable, not writable, or too little free space for two
    (an atomic save holds the old and the new one at once; an existing ``last.ckpt`` counts)."""
    folder = Path(folder)
    fix = "choose another output folder (hydra.run.dir=...) or fix its permissions"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TEMP_SUFFIX, dir=folder)
        try:
            os.write(fd, b"0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise UserError(f"checkpoint folder {folder} is not writable ({err.strerror or err}); {fix}") from err
    # A save writes the new last.ckpt beside the one it replaces (atomic: the old one stays loadable
    # until the rename), so the folder holds two at once: room for the second, or for both.
    last = folder / "last.ckpt"
    held = last.stat().st_size if last.is_file() else 0
    need = max(2 * need_bytes - held, need_bytes)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(
            f"checkpoint folder {folder} has {_human(free)} free, but a checkpoint of this model and its "
            f"optimizer state takes about {_human(need_bytes)} and a save writes the new one beside the last "
            f"before replacing it: about {_human(need)} needed; free some space or choose another output "
            "folder (hydra.run.dir=...)"
        )


# ---- FSDP2: a checkpoint is a folder ----------------------------------------------------------

PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"


def _model_parallel_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy

    class AtomicModelParallelStrategy(ModelParallelStrategy):
        """Lightning's ModelParallelStrategy (FSDP2) whose distributed checkpoint folder appears
        under its final name only when every rank has written its shard: all ranks write to
        ``.<name>.partial`` beside it, then rank 0 moves the old folder to ``.<name>.old``, the new
        one into place, and deletes the old one. A crash between the two renames leaves both
        complete folders; :func:`recover_folder_checkpoint` puts the old one back."""

        def save_checkpoint(self, checkpoint, filepath, storage_options=None):
            if not self._save_distributed_checkpoint or not _is_local(filepath):
                return super().save_checkpoint(checkpoint, filepath, storage_options)
            final = Path(self.broadcast(str(filepath)))
            partial = final.with_name(f".{final.name}{PARTIAL_SUFFIX}")
            if self.global_rank == 0 and partial.exists():
                shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
            self.barrier("atomic-save-start")
            super().save_checkpoint(checkpoint, partial, storage_options)
            self.barrier("atomic-save-written")
            if self.global_rank == 0:
                old = final.with_name(f".{final.name}{OLD_SUFFIX}")
                if old.exists():
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
                if final.exists():
                    os.replace(final, old)
                os.replace(partial, final)
                _fsync_dir(final.parent)
                if old.exists():
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
            self.barrier("atomic-save-done")

    return AtomicModelParallelStrategy


def recover_folder_checkpoint(path: str | os.PathLike) -> None:
    """If an FSDP2 save died between its two renames, put the previous complete folder back."""
    path = Path(path)
    old = path.with_name(f".{path.name}{OLD_SUFFIX}")
    if not path.exists() and old.is_dir():
        os.replace(old, path)
        log.warning("restored %s from %s (a save was interrupted)", path, old.name)

"""Lightning loggers that continue a run's history in place instead of starting it over.

``train()`` calls :func:`prepare_loggers` before training with the optimizer step the run starts
from (0 for a new run, the checkpoint's step for a resume). Each logger then keeps what the run had
logged *before* that step and drops what a killed run logged after its last checkpoint (those steps
are trained and logged again), so a resumed run's history equals an uninterrupted one:

- :class:`CSVLogger`: ``metrics.csv`` is kept and appended to (Lightning's deletes "previous log
  files"); rows at or past the start step are dropped first, the header is kept.
- :class:`TensorBoardLogger`: a purge marker at the start step (TensorBoard's ``purge_step``) hides
  the older events at or past it; new events go to the same folder.
- :class:`WandbLogger`: the run id is kept in ``<save_dir>/wandb/run-id`` and the run resumed
  (``resume="allow"``); ``offline: true`` writes locally without a network (``wandb sync`` later).

Logged step labels are Lightning's (optimizer step count before the step, from 0).
"""

from __future__ import annotations

import csv
import os
import secrets
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to an existing ``metrics.csv`` under its header (Lightning's
    deletes the file when the folder is not empty)."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


def truncate_metrics_csv(path: Path, keep_below: int) -> None:
    """Keep the rows of ``path`` whose step is below ``keep_below`` (atomically; no file if none)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    kept = [r for r in rows if _step(r) < keep_below]
    if not kept:
        path.unlink()
    elif len(kept) != len(rows):
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)


class CSVLogger(_CSVLogger):
    """``<save_dir>/<name>/metrics.csv``, continued in place on resume (see the module docstring)."""

    def resume_from(self, step: int) -> None:
        """Drop the rows logged at or after optimizer step ``step`` (now, once, on rank 0: strategies
        that fork a process per ``fit``/``validate`` call build the writer anew each time)."""
        if rank_zero_only.rank == 0:
            truncate_metrics_csv(Path(self.log_dir) / _AppendingWriter.NAME_METRICS_FILE, int(step))

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir)
        return self._experiment


class TensorBoardLogger(_TensorBoardLogger):
    """TensorBoard events in ``<save_dir>/<name>``; a resume purges events from its step on."""

    def resume_from(self, step: int) -> None:
        """Write TensorBoard's purge marker now (once, on rank 0): readers drop the events logged
        at or after ``step`` before it; this run's events follow it in a new file."""
        if rank_zero_only.rank != 0 or not Path(self.log_dir).is_dir():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # Lightning's fallback writer
            from tensorboardX import SummaryWriter
        SummaryWriter(log_dir=self.log_dir, purge_step=int(step)).close()


def _wandb_logger_class():
    from lightning.pytorch.loggers import WandbLogger as _WandbLogger

    class WandbLogger(_WandbLogger):
        """Weights & Biases; one wandb run per run folder (its id kept in ``<save_dir>/wandb/run-id``),
        resumed with the folder. ``offline=True`` needs no network."""

        def __init__(self, save_dir: str = ".", id: str | None = None, **kwargs) -> None:
            self._id_file = Path(save_dir) / "wandb" / "run-id"
            if id is None and rank_zero_only.rank == 0:
                id = self._id_file.read_text().strip() if self._id_file.is_file() else secrets.token_hex(4)
            super().__init__(save_dir=save_dir, id=id, **kwargs)

        def resume_from(self, step: int) -> None:
            """Keep the run id with the folder (nothing to purge: the x-axis is ``trainer/global_step``,
            logged again from ``step`` on)."""
            if rank_zero_only.rank == 0 and self._id and not self._id_file.is_file():
                self._id_file.parent.mkdir(parents=True, exist_ok=True)
                self._id_file.write_text(f"{self._id}\n")

    return WandbLogger


def __getattr__(name: str):
    if name == "WandbLogger":  # wandb is optional: import it only when asked for
        return _wandb_logger_class()
    raise AttributeError(name)


def prepare_loggers(loggers, start_step: int) -> None:
    """Tell each logger the optimizer step this run starts from (see the module docstring)."""
    for logger in loggers:
        if hasattr(logger, "resume_from"):
            logger.resume_from(start_step)

"""Lightning loggers that continue a run's history in place instead of starting it over.

``train()`` calls :func:`prepare_loggers` before training with the optimizer step the run starts
from (0 for a new run, the checkpoint's step for a resume). Each logger then keeps what the run had
logged *before* that step and drops what a killed run logged after its last checkpoint (those steps
are trained and logged again), so a resumed run's history equals an uninterrupted one:

- :class:`CSVLogger`: ``metrics.csv`` is kept and appended to (Lightning's deletes "previous log
  files"); rows at or past the start step are dropped first, the header is kept.
- :class:`TensorBoardLogger`: the event writer purges events at or past the start step
  (TensorBoard's ``purge_step``); new events go to the same folder.
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


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps the rows logged before ``keep_below`` (all if None)."""

    def __init__(self, log_dir: str, keep_below: int | None) -> None:
        self._keep_below = keep_below
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
        kept = rows if self._keep_below is None else [r for r in rows if _step(r) < self._keep_below]
        if not kept:
            path.unlink()
            return
        self.metrics_keys = header
        if len(kept) != len(rows):
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(tmp, path)


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


class CSVLogger(_CSVLogger):
    """``<save_dir>/<name>/metrics.csv``, continued in place on resume (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._keep_below: int | None = None

    def resume_from(self, step: int) -> None:
        """Keep the rows logged before optimizer step ``step``; call before anything is logged."""
        self._keep_below = int(step)

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self._keep_below)
        return self._experiment


class TensorBoardLogger(_TensorBoardLogger):
    """TensorBoard events in ``<save_dir>/<name>``; a resume purges events from its step on."""

    def resume_from(self, step: int) -> None:
        self._kwargs["purge_step"] = int(step)


def _wandb_logger_class():
    from lightning.pytorch.loggers import WandbLogger as _WandbLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    class WandbLogger(_WandbLogger):
        """Weights & Biases; one wandb run per run folder (its id kept in ``<save_dir>/wandb/run-id``),
        resumed with the folder. ``offline=True`` needs no network."""

        def __init__(self, save_dir: str = ".", id: str | None = None, **kwargs) -> None:
            if id is None and rank_zero_only.rank == 0:
                id_file = Path(save_dir) / "wandb" / "run-id"
                if id_file.is_file():
                    id = id_file.read_text().strip()
                else:
                    id = secrets.token_hex(4)
                    id_file.parent.mkdir(parents=True, exist_ok=True)
                    id_file.write_text(id + "\n")
            super().__init__(save_dir=save_dir, id=id, **kwargs)

        def resume_from(self, step: int) -> None:
            """Nothing to purge: the x-axis is ``trainer/global_step``, logged again from ``step`` on."""

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

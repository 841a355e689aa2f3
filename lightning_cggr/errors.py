"""What a run reports instead of a traceback, and the exit code it ends with.

- :class:`UserError` (exit 2): a mistake in what was asked for — a config value, a data file, a
  model name, a checkpoint — reported as one line that names the problem and the fix.
  :class:`ConfigError` (the config), :class:`DataError` (a data file: it names the file, and the
  line for JSONL) and :class:`CheckpointError` (a checkpoint or run folder) are its kinds.
- :class:`RunStopped` (its own exit code): the run stopped before its end for a reason that is not
  a bug, e.g. a signal (128 + signal number) or a diverged loss (3); the state worth keeping has
  been saved before it is raised.

Anything else is a bug and keeps its traceback. :func:`run_command` applies this to a
command-line entry point; ``HYDRA_FULL_ERROR=1`` in the environment (Hydra's own switch, honoured by
every command of this package) prints the traceback of a user mistake too, before the same exit.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Any, Callable, Iterator


class UserError(ValueError):
    """A mistake in the run's inputs; its message is one line naming the problem and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration mistake, reported before anything is built."""


class DataError(UserError):
    """Data that cannot be used: a data file (the message names the file, and the line of a JSONL
    file), a corpus too small for a batch, or a batch that is not what the step takes."""


class CheckpointError(UserError):
    """A checkpoint or run folder that cannot be read or does not hold what was asked for."""


DIVERGED_EXIT_CODE = 3
"""The exit code of a run stopped because its loss, gradients or weights stopped being finite."""


class RunStopped(RuntimeError):
    """The run ended early on purpose (signal, divergence); ``exit_code`` tells a job chain why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


MPS_PROBLEM = ("trains on Apple's MPS, which has no float64 (torch refuses it there, pytorch/pytorch#122602), "
               "and the step sums its kept-token counts, losses and metrics in float64")
"""Why a run on an ``mps`` device is refused before it starts (the module would fail to move there)."""

FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
"""``HYDRA_FULL_ERROR=1``: print the traceback of a user mistake as well (debugging)."""

_USER_FULL_ERROR_ENV = "LIGHTNING_CGGR_USER_FULL_ERROR"
# The user's own HYDRA_FULL_ERROR while lightning_cggr.train sets it for Hydra (which then re-raises
# instead of printing); kept in the environment so processes launched by the run (DDP ranks) see it.


def full_tracebacks() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``)."""
    value = os.environ.get(_USER_FULL_ERROR_ENV, os.environ.get(FULL_ERROR_ENV, ""))
    return value.strip() == "1"


def report(err: BaseException, prefix: str = "error") -> None:
    """Print ``err`` as the command's last words: ``prefix: message`` on stderr (traceback first on request)."""
    if full_tracebacks():
        traceback.print_exception(err)
    print(f"{prefix}: {err}", file=sys.stderr, flush=True)


def _global_rank() -> int:
    """This process's rank in a distributed run (0 when there is none), as launchers set it."""
    import os

    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


@contextlib.contextmanager
def exit_on_user_error(sweep_job: bool = False) -> Iterator[None]:
    """Inside it, a :class:`UserError` ends the process with one line and exit code 2, a
    :class:`RunStopped` with its message and its own exit code; anything else propagates (a bug).

    ``sweep_job``: one job of a Hydra multirun. Its mistake or divergence is reported the same way,
    then raised on, so that Hydra records the job as failed and runs the others (it raises the first
    failure again when the sweep ends, and the command exits with its code); a signal still ends
    the whole sweep at once."""
    try:
        yield
    except UserError as err:
        report(err)
        if sweep_job:
            raise
        sys.exit(err.exit_code)
    except RunStopped as err:
        if _global_rank() == 0:  # every rank stops; one line says why
            report(err, "stopped")
            _to_log_files(f"stopped: {err}")
        if sweep_job and err.exit_code == DIVERGED_EXIT_CODE:
            raise
        sys.exit(err.exit_code)


def _to_log_files(line: str) -> None:
    """``line`` into the log files of the root logger (the run's train.log), which the stderr line of
    :func:`report` does not reach: the log of a stopped run says how it ended (a mistake's line is
    not added: a refused run leaves its folder as it was)."""
    import logging

    record = logging.LogRecord(__name__, logging.WARNING, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.stream is not None:  # closed: its folder went
            handler.handle(record)


def run_command(entry: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a command-line entry point under :func:`exit_on_user_error`."""
    with exit_on_user_error():
        return entry(*args, **kwargs)

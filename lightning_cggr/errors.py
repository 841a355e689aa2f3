"""What a run reports instead of a traceback, and the exit code it ends with.

- :class:`UserError` (exit 2): a mistake in what was asked for — a config value, a data file, a
  model name, a checkpoint — reported as one line that names the problem and the fix.
- :class:`RunStopped` (its own exit code): the run stopped before its end for a reason that is not
  a bug, e.g. a signal (128 + signal number) or a diverged loss (3); the state worth keeping has
  been saved before it is raised.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the run's inputs; its message is one line naming the problem and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration mistake, reported before anything is built."""


class RunStopped(RuntimeError):
    """The run ended early on purpose (signal, divergence); ``exit_code`` tells a job chain why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

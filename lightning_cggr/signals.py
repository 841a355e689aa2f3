"""Stop on SIGTERM / SIGINT at the next optimizer-step boundary, on every rank, without deadlock.

A signal handler only records the signal (it never saves, logs or talks to other ranks: a
collective inside a handler meets the other ranks in a different collective and hangs, which is
what Lightning 2.6's own SIGTERM handler does under DDP). The training loop asks
:meth:`StopRequest.agreed` at each step boundary; with several processes the recorded signals are
combined by a MAX all-reduce of one host integer over a CPU (gloo) process group, so every rank
learns of a signal that reached any rank at the same step, and no device is synchronised.

A second Ctrl-C raises ``KeyboardInterrupt`` at once (Lightning's interrupt path). Outside
training (the validations before and after ``fit``) there is nothing to save: ``install(immediate=True)``
makes the signal raise :class:`~lightning_cggr.errors.RunStopped` (exit 128 + signal) at once, on
each rank that receives it. SIGUSR1 (the SLURM requeue signal of Lightning's
``SLURMEnvironment(auto_requeue=True)``) is left to Lightning.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (SIGTERM: 143)."""
    return 128 + int(signum)


def stopped_outside_training(signum: int):
    """The :class:`~lightning_cggr.errors.RunStopped` of a signal that came where no step runs: the
    validations before and after ``fit``, or before the Trainer exists (reading data, building the
    model: Ctrl-C there was a ``KeyboardInterrupt`` traceback)."""
    from .errors import RunStopped

    return RunStopped(f"{signal.Signals(signum).name} received outside training: stopped, nothing to save",
                      exit_code(signum))


class StopRequest:
    """The first stop signal received by this process, and its agreement across ranks."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}
        self._group = None
        self._world = 1

    # ---- handlers ------------------------------------------------------------------------------
    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:  # a second Ctrl-C: stop now, no wait
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = int(signum)

    @staticmethod
    def _stop_now(signum, frame) -> None:
        raise stopped_outside_training(signum)

    def install(self, immediate: bool = False) -> None:
        """Replace the SIGTERM and SIGINT handlers (main thread only; elsewhere a no-op): record the
        signal for the next step boundary, or with ``immediate`` stop at once."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in STOP_SIGNALS:
            if s not in self._previous:
                self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._stop_now if immediate else self._handle)

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s, handler in self._previous.items():
            if handler is not None:
                signal.signal(s, handler)
        self._previous = {}

    # ---- agreement -----------------------------------------------------------------------------
    def connect(self) -> None:
        """Call on every rank after the process group exists (e.g. a callback's ``setup``): a CPU
        group for the agreement, the default one where it is gloo already."""
        if self._world > 1:  # connected already (validate, then fit)
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._world = dist.get_world_size()
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def agreed(self, extra: int = 0) -> tuple[int, int]:
        """(signal, extra) each maximised over all ranks; every rank must call this at the same
        point. ``extra`` is any other host integer the ranks must agree on (e.g. a divergence flag)."""
        if self._world == 1:
            return self.signum, extra
        t = torch.tensor([self.signum, extra], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return int(t[0]), int(t[1])

"""Lightning callbacks of a training run: the run's own checkpoint, a step-counting progress bar,
a learning-rate monitor that logs once per optimizer step, a model summary whose FLOPs come
from the formula of :mod:`lightning_cggr.flops`, and Lightning's PyTorch profiler made to last
through the job's three Trainer calls (validate, fit, validate).

:class:`ResumableCheckpoint` is the one callback that keeps ``checkpoints/last.ckpt`` the newest
complete, finite state of the run (always added by ``train()``, whatever ``callbacks=`` holds):

- every ``every_n_steps`` optimizer steps, at every validation during fit (one that falls inside an
  optimizer step under gradient accumulation: where that step ends), at the last step and at the
  end of training; always the same file name (never ``last-v1.ckpt``), written atomically by
  :class:`~lightning_cggr.checkpointing.AtomicCheckpointIO`;
- on SIGTERM / SIGINT (:mod:`lightning_cggr.signals`): at the next optimizer-step boundary, agreed by
  every rank, then the run raises :class:`~lightning_cggr.errors.RunStopped` (exit 128 + signal);
  during ``trainer.validate()`` (before and after fit) it stops at once, nothing to save;
- divergence: at each logging interval and before every save it reads the module's device-side
  health flags (one host read where the logger syncs anyway); a non-finite loss, gradient norm or
  weight stops the run with exit 3 and no checkpoint is written over the last finite one (under a
  loss scaler, ``16-mixed``, an overflowing gradient is the scaler's skipped step, not divergence);
- on any other exception (Ctrl-C twice, a crash, a dead DDP peer) it saves once more where that
  needs no other rank (one process, or DDP's replicated state written by rank 0 without barriers).

Periodic and signal saves happen at the *start* of the next step's first micro-batch: by then the
previous step's metrics are logged (loggers are flushed before each save, so the metrics on disk
always reach the checkpoint), and Lightning resumes from there exactly, as from Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys

import torch
from lightning.pytorch.callbacks import (Callback, LearningRateMonitor, ModelCheckpoint, ModelSummary,
                                         RichModelSummary, TQDMProgressBar)
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.profilers.pytorch import PyTorchProfiler, ScheduleWrapper
from lightning.pytorch.utilities.model_summary.model_summary import NOT_APPLICABLE, get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

from .checkpointing import remove_stale_temporaries
from .errors import DIVERGED_EXIT_CODE, RunStopped
from .flops import flop_count, forward_flops, step_flops
from .module import logging_step
from .signals import StopRequest, exit_code, stopped_outside_training

log = logging.getLogger(__name__)


def default_every_n_steps(max_steps: int) -> int:
    """One tenth of the run, rounded up, so a killed run loses at most ~10% of its steps; 0 (only
    at validation and at the end) for a run without ``max_steps``."""
    return math.ceil(max_steps / 10) if max_steps and max_steps > 0 else 0


def _on_rank(message: str, trainer) -> str:
    return rank_prefixed_message(message, trainer.global_rank) if trainer.world_size > 1 else message


@torch.no_grad()
def _params_finite(module) -> torch.Tensor:
    """0-d bool device tensor: every (local) weight finite."""
    from torch.distributed.tensor import DTensor

    flags = [torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for p in module.parameters()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


class OptimizerStepLabels(Callback):
    """The first callback of a run, with :class:`ResumableCheckpoint`: every batch is logged under its
    optimizer step. Lightning's logging step after a resume depends on where the checkpoint was
    written (one off after a mid-step save, or after a save at a batch end once ResumableCheckpoint
    has stored it exact); it is set here before anything logs the batch. Lightning calls checkpoint
    callbacks last, so a correction there came too late for the learning-rate monitor, which logged
    the first step after a resume under the next step's label (13 for step 12, then 13 again)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.automatic_optimization:
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


class ResumableCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``: the newest complete, finite state (see the module docstring).

    Also continues a finished run exactly: Lightning 2.6 treats a stop at ``max_steps`` in the
    middle of an epoch as the end of that epoch, so the last step's checkpoint is written at the end
    of that training batch (the state Lightning restarts from correctly) and the epoch-end write
    that would overwrite it is skipped.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 0, stop: StopRequest | None = None, **kwargs):
        kwargs.setdefault("save_last", True)
        super().__init__(dirpath=dirpath, save_top_k=0, enable_version_counter=False, save_on_exception=False,
                         **kwargs)
        self.every_n_steps = int(every_n_steps or 0)
        self.stop = stop or StopRequest()
        self._boundary = True  # the next batch starts an optimizer step
        self._step_at_batch_start = -1
        self._step_first_batch: int | None = None  # the epoch's batch index where that step began
        self._on_exception = False  # dump_checkpoint is writing the save after an exception
        self._save_at_boundary = False  # a validation inside an optimizer step asked for a save

    # ---- health and stop requests --------------------------------------------------------------
    def _poll(self, trainer, pl_module, health: bool, saving: bool) -> tuple[int, int | None]:
        """(agreed signal number or 0, agreed first non-finite step or None). Every rank calls this
        at the same point with the same ``health`` / ``saving``; only then is anything read."""
        from .module import NO_STEP

        bad = NO_STEP
        if health and hasattr(pl_module, "first_nonfinite_step"):
            first = pl_module.first_nonfinite_step
            if saving:
                # non-finite weights now: this step, unless a loss or gradient norm was not finite earlier
                first = torch.where(_params_finite(pl_module), first, first.clamp(max=trainer.global_step))
            bad, empty = (int(v) for v in torch.stack([first, pl_module.empty_batches]).tolist())
            pl_module.empty_batches.zero_()
            if empty:
                log.warning(_on_rank(
                    f"{empty} training micro-batch(es) before step {trainer.global_step} had no trainable token "
                    "(all labels -100): they trained nothing (loss 0, zero gradient)", trainer))
        signum, flag = self.stop.agreed(NO_STEP - bad)
        return signum, (None if flag == 0 else NO_STEP - flag)

    def _stop_diverged(self, trainer, bad_step: int) -> None:
        if self._last_global_step_saved > 0 and self.last_model_path:
            kept = f"the last finite checkpoint is {self.last_model_path} (step {self._last_global_step_saved})"
        elif self.last_model_path:
            kept = f"the last finite checkpoint is {self.last_model_path}"
        else:
            kept = "no checkpoint was written before it"
        # A resume must keep the run's optim settings (rundir.IDENTITY_KEYS), and resumed unchanged
        # the run diverges again at the same step: the ways on are a new run, or its weights.
        keep = (f"; to keep its weights, export it (python -m lightning_cggr.export {self.last_model_path} <folder>) "
                "and train from them: model.source=pretrained model.name=<folder>" if self.last_model_path else "")
        raise RunStopped(
            f"training diverged: the loss, gradient norm or weights were not finite at step {bad_step} (stopped at step "
            f"{trainer.global_step}); {kept}. Start over with a lower optim.lr or a longer optim.warmup_steps "
            f"(a resume keeps the run's optim settings, and unchanged it diverges again){keep}",
            DIVERGED_EXIT_CODE,
        )

    def _stop_on_signal(self, trainer, signum: int) -> None:
        import signal

        name = signal.Signals(signum).name
        where = f"saved {self.last_model_path} at step {trainer.global_step}" if self.last_model_path else "nothing saved"
        raise RunStopped(f"{name} received: stopped at step {trainer.global_step}, {where}; "
                         "resume with ckpt_path=auto in the same run folder", exit_code(signum))

    def _save(self, trainer) -> None:
        if trainer.is_global_zero:  # metrics on disk reach the checkpoint's step
            for logger in trainer.loggers:
                logger.save()
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _checked_save(self, trainer, pl_module) -> None:
        """Save unless the state is non-finite (then stop with exit 3) or already saved here."""
        if trainer.global_step == self._last_global_step_saved:
            return
        signum, bad = self._poll(trainer, pl_module, health=True, saving=True)
        if bad is not None:
            self._stop_diverged(trainer, bad)
        self._save(trainer)
        if signum:
            self._stop_on_signal(trainer, signum)

    def _fitting(self, trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and not trainer.fast_dev_run

    # ---- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._training = False  # set at on_train_start: before it the state is not (fully) restored
        if stage in ("fit", "validate"):  # (validate: the ranks agree on a signal there too)
            self.stop.connect()
            if trainer.is_global_zero and self.dirpath:
                remove_stale_temporaries(self.dirpath)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.stop.install()
        self._boundary = self._training = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """Make a checkpoint written before a batch finished restart as Lightning intends.

        Lightning resets its per-epoch batch counters to the last completed batch on restart, but
        not the run totals, so after a resume from a save made mid-batch (here: at the start of the
        next step; Ctrl-C) the total count is one ahead and validation runs one batch off
        (val_check_interval counts total batches). The totals are set the same way here. A save made
        at the end of a batch (after its optimizer step) is Lightning's own case and left alone.

        The save after a crash (:meth:`on_exception`) inside an optimizer step of several
        micro-batches holds the weights and optimizer of the step before, so its counters go back
        to the step's first micro-batch: the resume trains that step whole, as if uninterrupted
        (the loader's position follows the counters).

        The logging step count is stored as the optimizer step count (:class:`OptimizerStepLabels`,
        which train() adds with this callback, keeps the labels on it after Lightning's restore)."""
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        progress = loops.get("epoch_loop.batch_progress")
        if progress and pl_module.automatic_optimization:
            total, current = progress["total"], progress["current"]
            at_batch_end = total["started"] == total["ready"] == total["processed"] == total["completed"] + 1
            first = self._first_batch_of_open_step(trainer) if self._on_exception else None
            if first is not None or not at_batch_end:
                back = 0 if first is None else current["completed"] - first
                for counts in (total, current):
                    done = counts["completed"] - back
                    counts.update(ready=done, started=done, processed=done, completed=done)
                progress["is_last_batch"] = False
        state = loops.get("epoch_loop.state_dict")
        if state is not None and pl_module.automatic_optimization:
            state["_batches_that_stepped"] = trainer.global_step

    def _first_batch_of_open_step(self, trainer) -> int | None:
        """The epoch's batch index where the optimizer step in progress began, or None when no
        step is open (before the first batch, or once the current batch made its optimizer step)."""
        if self._step_first_batch is None or trainer.global_step != self._step_at_batch_start:
            return None
        return self._step_first_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step
        if not self._boundary:
            return
        self._step_first_batch = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        self._boundary = False
        step = trainer.global_step
        due = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0
        due = (due or self._save_at_boundary) and step != self._last_global_step_saved
        self._save_at_boundary = False
        health = due or logging_step(trainer, step)
        signum, bad = self._poll(trainer, pl_module, health=health, saving=due)
        if bad is not None:
            self._stop_diverged(trainer, bad)
        if signum or due:
            if step != self._last_global_step_saved:
                self._save(trainer)
            if signum:
                self._stop_on_signal(trainer, signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # every_n_train_steps=0: no-op
        self._boundary = trainer.global_step != self._step_at_batch_start  # an optimizer step just ran
        if self.save_last and self._reached_max_steps(trainer) and self._fitting(trainer):
            self._checked_save(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn != TrainerFn.FITTING:  # trainer.validate(): nothing to save, stop at once
            # (Lightning's own SIGTERM handler broadcasts: DDP hangs.) Across ranks, at the next batch
            # end, all together: one rank stopping alone leaves the others in a collective it never joins.
            self.stop.install(immediate=trainer.world_size == 1)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn != TrainerFn.FITTING and trainer.world_size > 1:
            self._stop_if_agreed()

    def _stop_if_agreed(self) -> None:
        """Every rank, at the same point of a validation outside fit: stop together on a signal any
        rank received (one host integer all-reduced; the ranks run as many validation batches)."""
        signum, _ = self.stop.agreed()
        if signum:
            self.stop.restore()
            raise stopped_outside_training(signum)

    def on_validation_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn != TrainerFn.FITTING:
            if trainer.world_size > 1:
                self._stop_if_agreed()
            self.stop.restore()
        elif self._fitting(trainer) and trainer.global_step > 0:
            if self._boundary:
                self._checked_save(trainer, pl_module)
            else:  # inside an optimizer step (trainer.val_check_interval counts batches): its
                # micro-batches so far are in no checkpoint, and a resume from one saved here
                # regroups them (a micro-batch's gradient lost); save where the step ends instead
                self._save_at_boundary = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._reached_max_steps(trainer):
            return
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.stop.restore()
        if self._fitting(trainer):
            self._checked_save(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.stop.restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """One more save where it needs no other rank and the state is finite; never raises."""
        from lightning.pytorch.strategies import DDPStrategy

        self.stop.restore()
        if isinstance(exception, RunStopped) or not self._fitting(trainer) or not getattr(self, "_training", False):
            return  # (before training starts, e.g. a failed restore: nothing of this run's to keep)
        if trainer.global_step == self._last_global_step_saved or not self.save_last:
            return
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            return  # sharded state needs every rank; the last periodic checkpoint stands
        try:
            from .module import NO_STEP

            finite = bool(_params_finite(pl_module)) and int(getattr(pl_module, "first_nonfinite_step", NO_STEP)) == NO_STEP
            if not finite:
                log.warning("not saving a checkpoint after %s: the state is not finite", type(exception).__name__)
                return
            path = self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST)
            previous, self.last_model_path = self.last_model_path, path
            if trainer.is_global_zero:  # no barrier: other ranks may be gone
                self._on_exception = True
                try:
                    checkpoint = trainer._checkpoint_connector.dump_checkpoint(False)
                finally:
                    self._on_exception = False
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
            self._last_global_step_saved = trainer.global_step
            log.info(_on_rank(f"{type(exception).__name__}: saved {path} at step {trainer.global_step}", trainer))
        except Exception as err:  # the original exception is what the user needs to see
            self.last_model_path = previous
            log.warning("could not save a checkpoint after %s: %s", type(exception).__name__, err)

    @staticmethod
    def _reached_max_steps(trainer) -> bool:
        return trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps


class StepProgressBar(TQDMProgressBar):
    """One bar over the whole run in optimizer steps (``step/max_steps``), so a resumed run shows
    where it is (Lightning's bar counts batches of the epoch against what is left: "24/19", and
    "Epoch 2/-2" when the run is bounded by steps). It is drawn with those numbers from its first
    frame on: Lightning's bar draws "0/?" when made and the epoch's batch count when reset at each
    epoch (with a negative rate), frames that stay in a log file.

    The numbers beside the bar (``train/loss``, ``train/kept_ratio``...) are device tensors: reading
    them is a host-device sync. Lightning's bar reads them at every step, which stalls a GPU's queue
    once per step (the host waits for the step to finish before it may queue the next). Here they
    are read at the logging interval (``trainer.log_every_n_steps``, where the logger reads them
    anyway), at the run's last step and outside training steps (validation, epoch end); the counter
    itself moves at every step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._shown: dict | None = None  # the numbers last read
        self._read_at = -1  # the optimizer step they were read after
        self._stale = False  # inside a training batch whose step is not due: show the last numbers

    def get_metrics(self, trainer, pl_module) -> dict:
        # not due: the last numbers, once a step's have been read (before the first step: none yet)
        if self._stale and (self._read_at > 0 or trainer.global_step == 0):
            return self._shown or {}
        self._shown, self._read_at = super().get_metrics(trainer, pl_module), trainer.global_step
        return self._shown

    def _metrics_due(self, trainer) -> bool:
        step = trainer.global_step
        if step == 0 or step == self._read_at:  # (the other micro-batches of a step under accumulation)
            return False
        return logging_step(trainer, step) or (0 < trainer.max_steps <= step)

    def _by_steps(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    def init_train_tqdm(self) -> Tqdm:
        if not self._by_steps():
            return super().init_train_tqdm()
        trainer = self.trainer  # Lightning's settings, but the run's step count from the first frame
        return Tqdm(desc=f"Epoch {trainer.current_epoch}", initial=trainer.global_step, total=trainer.max_steps,
                    unit="step", position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *args) -> None:
        if not self._by_steps():
            return super().on_train_epoch_start(trainer, *args)
        if self._leave:  # (TQDMProgressBar(leave=True): a bar per epoch)
            self.train_progress_bar = self.init_train_tqdm()
            return
        bar = self.train_progress_bar  # reset in place to this epoch, drawn once
        bar.n = bar.initial = trainer.global_step
        bar.set_description(f"Epoch {trainer.current_epoch}", refresh=False)
        if not bar.disable:  # what tqdm's reset() does, without drawing step 0 first; the rate is this epoch's
            bar.last_print_n = bar.n
            bar.last_print_t = bar.start_t = bar._time()
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stale = not self._metrics_due(trainer)
        try:
            if not self._by_steps():
                return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            bar = self.train_progress_bar
            if bar is not None and not bar.disable and self._should_update(trainer.global_step, bar.total):
                bar.n = trainer.global_step
                bar.set_postfix(self.get_metrics(trainer, pl_module))
        finally:
            self._stale = False


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor``, once per optimizer step. Lightning's logs at the start of
    every batch whose global step is due, so with ``trainer.accumulate_grad_batches=k`` each step's
    rates were logged k times (k rows of ``metrics.csv``, k points at one TensorBoard step)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx, *args, **kwargs) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:  # the first micro-batch of a step
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx, *args, **kwargs)


class StagePyTorchProfiler(PyTorchProfiler):
    """``trainer.profiler=pytorch``: Lightning's ``PyTorchProfiler``, with its schedule restored at the
    end of every Trainer call. For a stage of under 5 steps (the job's 4-batch validation) Lightning
    drops its default schedule (wait 1, warm-up 1, record 3) but goes on handing the spent schedule
    object to the torch profilers of later stages; the job's third call, the validation after fit,
    then recorded nothing and ended in torch's "Profiler must be initialized before accessing events"
    (Lightning 2.6; a plain validate, fit, validate with Lightning's own demo model does the same).
    Each call now starts with the schedule as configured."""

    def _delete_profilers(self) -> None:
        super()._delete_profilers()
        configured = self._profiler_kwargs.get("schedule")
        if self._schedule is None and isinstance(configured, ScheduleWrapper):
            configured.reset()
            self._schedule = configured


class FormulaModelSummary(ModelSummary):
    """Lightning's model summary with the FLOPs filled in from :mod:`lightning_cggr.flops`.

    Lightning counts FLOPs by running ``example_input_array`` through the model, which this module
    has none of, so its table printed 0 FLOPs for the model and "Total FLOPs: 0". Here the model's
    row and the total hold the formula's forward FLOPs of one micro-batch of ``batch`` x ``seq``
    tokens (the whole model, LM head on every token: what Lightning would have counted), and one
    more line logs the training step's FLOPs, standard and routed, by part: the bound on what
    routing can save in compute (warm-up steps run the standard step). A model the formula does not
    know keeps Lightning's table (its warning was logged when the module was built)."""

    def __init__(self, batch: int, seq: int, max_depth: int = 1, padded: bool = False, **summarize_kwargs) -> None:
        """``padded``: batches are padded to their longest row (chat data), so ``seq`` is a bound."""
        super().__init__(max_depth, **summarize_kwargs)
        self.batch, self.seq, self.padded = batch, seq, padded

    def on_fit_start(self, trainer, pl_module) -> None:
        shape = getattr(pl_module, "flop_shape", None)
        if not self._max_depth or shape is None:
            return super().on_fit_start(trainer, pl_module)
        summary = self._summary(trainer, pl_module)
        forward = int(forward_flops(shape, self.batch, self.seq))
        data = summary._get_summary_data()
        names = dict(data)["Name"]
        data = [(column, [self._row_flops(name, value, forward) for name, value in zip(names, values)]
                 if column == "FLOPs" else values) for column, values in data]
        if trainer.is_global_zero:
            self.summarize(data, summary.total_parameters, summary.trainable_parameters, summary.model_size,
                           summary.total_training_modes, total_flops=forward, **self._summarize_kwargs)
            log.info(self.step_line(pl_module))

    @staticmethod
    def _row_flops(name: str, value: str, forward: int) -> str:
        if name == "model":
            return get_human_readable_count(forward)
        if name.startswith("model."):
            return NOT_APPLICABLE  # a part of the model: the formula counts the whole
        return value  # metrics: none

    def step_line(self, pl_module) -> str:
        """The training step's model FLOPs per micro-batch, standard and (with CGGR on) routed."""
        step, shape, (b, t) = pl_module.step, pl_module.flop_shape, (self.batch, self.seq)
        standard = step_flops(shape, step.cggr, b, t, loss_impl=step.loss_impl, routed=False)["total"]
        bound = "at most " if self.padded else ""
        line = (f"model FLOPs of a training micro-batch of {bound}{b} x {t} tokens (lightning_cggr.flops formula): "
                f"{flop_count(standard)} without routing")
        if step.cggr.enabled:
            routed = step_flops(shape, step.cggr, b, t, loss_impl=step.loss_impl)
            line += (f", {flop_count(routed['total'])} routed (router {flop_count(routed['router'])}, decoder "
                     f"{flop_count(routed['body'])}, LM head and loss {flop_count(routed['head'])}): "
                     f"{routed['total'] / standard:.2f}x the FLOPs, so compute alone allows "
                     f"{standard / routed['total']:.2f}x the step rate")
            if step.cggr.scoring == "excess_loss":
                line += " (the reference model's scoring forward is not counted)"
        if self.padded:
            line += (f"; batches are padded to their longest conversation, most to fewer than {t} tokens "
                     f"(train/mfu counts each batch's own shape)")
        return line

    def summarize(self, *args, **kwargs) -> None:  # Lightning's rich table where rich is installed
        rich = importlib.util.find_spec("rich") is not None  # (Lightning's own flag is private)
        (RichModelSummary if rich else ModelSummary).summarize(*args, **kwargs)

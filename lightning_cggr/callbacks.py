"""Lightning callbacks of a training run."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` continues exactly when a finished run is resumed.

    Lightning 2.6 treats a stop at ``max_steps`` in the middle of an epoch as the end of that epoch:
    the ``last.ckpt`` it writes at epoch end counts the epoch as finished while keeping the batch
    index, so ``ckpt_path=...last.ckpt trainer.max_steps=<more>`` resumed one epoch too far (and
    past the end of an epoch that did finish). Here the last step's checkpoint is written at the end
    of that training batch, the state Lightning restarts from correctly, and the epoch-end write
    that would overwrite it is skipped.
    """

    @staticmethod
    def _reached_max_steps(trainer) -> bool:
        return trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.save_last and self._reached_max_steps(trainer) and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._reached_max_steps(trainer):
            return
        super().on_train_epoch_end(trainer, pl_module)

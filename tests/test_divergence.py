"""A diverged run stops with exit 3 and keeps its last finite checkpoint; NaN is reported as NaN;
batches without a trainable token are counted in a warning, never hidden."""

from __future__ import annotations

import logging
import math

import lightning as L
import pytest
import torch
from conftest import Rows, make_tiny_model
from test_resume import make_cfg, rows

from lightning_cggr.callbacks import DIVERGED_EXIT_CODE, ResumableCheckpoint
from lightning_cggr.config import CGGRConfig, LossConfig
from lightning_cggr.data.resumable import ResumableLoader
from lightning_cggr.errors import RunStopped, UserError
from lightning_cggr.module import CGGRModule
from lightning_cggr.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _all_finite(ckpt) -> bool:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return all(torch.isfinite(t).all() for t in state.values())


def test_a_too_large_learning_rate_stops_with_exit_3_and_a_finite_last_checkpoint(tmp_path):
    """optim.lr=30 with no warmup diverges this tiny model within a few steps (optim.lr=10 diverges
    the default model at step ~30, too slow for a test; here clipping keeps lr=10 finite)."""
    with pytest.raises(RunStopped) as stopped:
        train(make_cfg(tmp_path, "run", "optim.lr=30", "optim.warmup_steps=0", "checkpoint.every_n_steps=2",
                       "trainer.log_every_n_steps=2", "callbacks=none"))
    assert stopped.value.exit_code == DIVERGED_EXIT_CODE == 3
    message = str(stopped.value)
    assert message.startswith("training diverged: the loss, gradient norm or weights were not finite at step ")
    bad = int(message.split("at step ")[1].split()[0])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert f"the last finite checkpoint is {ckpt} (step {saved})" in message
    assert 0 < saved <= bad and _all_finite(ckpt)
    logged = [v for metric in ("train/loss", "train/grad_norm") for _, v in rows(tmp_path / "run", metric)]
    assert not all(math.isfinite(v) for v in logged)  # it really diverged (loss or gradient norm logged as NaN/inf)
    assert "\n" not in message
    # It advised "Lower optim.lr ..., then resume from that checkpoint", which a resume refuses (optim
    # must match); it now names the ways that run (the export one: tests/test_resume.py's weights-only test).
    assert "Start over with a lower optim.lr" in message
    assert f"python -m lightning_cggr.export {ckpt} <folder>" in message
    with pytest.raises(UserError, match=r"optim.lr=0.003 \(the checkpoint has 30"):
        train(make_cfg(tmp_path, "run", "optim.lr=3e-3", "optim.warmup_steps=0", "checkpoint.every_n_steps=2",
                       "trainer.log_every_n_steps=2", "callbacks=none", "ckpt_path=auto"))


class PoisonAt(L.Callback):
    """Sets one weight to NaN right before optimizer step ``at`` runs its forward."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


@pytest.mark.parametrize("every, stop", [(2, 8), (0, 10)])
def test_a_nan_stops_the_run_at_the_next_check_without_overwriting_the_finite_checkpoint(tmp_path, every, stop):
    """NaN weights before step 7: its loss is NaN. Checks run at every 2nd step (the logging
    interval) and before every save (every 5 steps), so the run stops at step 8, naming step 7, with
    last.ckpt still the finite state of step 5; step 10's save never happens. With
    log_every_n_steps=0 (no logging interval) the check before step 10's save stops it, still naming
    step 7 (that check, which also reads the weights, named its own step before)."""
    with pytest.raises(RunStopped, match=rf"not finite at step 7 \(stopped at step {stop}\).*\(step 5\)") as stopped:
        train(make_cfg(tmp_path, "run", "checkpoint.every_n_steps=5", f"trainer.log_every_n_steps={every}",
                       "callbacks=none"), callbacks=[PoisonAt(7)])
    assert stopped.value.exit_code == 3
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 5 and _all_finite(ckpt)
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.ckpt"]


def _rows(n: int, trainable: bool, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 97, (12,), generator=g)
        labels = ids.clone() if trainable else torch.full_like(ids, -100)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), **kw)


def _validate(tmp_path, module, rows) -> dict:
    loader = torch.utils.data.DataLoader(Rows(rows), batch_size=2)
    return _trainer(tmp_path, enable_checkpointing=False).validate(module, loader, verbose=False)[0]


def test_validation_reports_nan_as_nan_and_no_tokens_as_nan(tmp_path, caplog):
    """torchmetrics' default drops NaNs: a diverged model reported val/loss 0, val/ppl 1.0."""
    module = CGGRModule(make_tiny_model("llama"), CGGRConfig(enabled=False), LossConfig(impl="torch"))
    finite = _validate(tmp_path, module, _rows(4, True))
    assert math.isfinite(finite["val/loss"]) and finite["val/ppl"] == pytest.approx(math.exp(finite["val/loss"]))
    with torch.no_grad():
        module.model.get_output_embeddings().weight[3, 0] = float("nan")
    poisoned = _validate(tmp_path, module, _rows(4, True))
    assert math.isnan(poisoned["val/loss"]) and math.isnan(poisoned["val/ppl"])

    clean = CGGRModule(make_tiny_model("llama"), CGGRConfig(enabled=False), LossConfig(impl="torch"))
    with caplog.at_level(logging.WARNING, logger="lightning_cggr.module"):
        empty = _validate(tmp_path, clean, _rows(4, False))
    assert math.isnan(empty["val/loss"]) and math.isnan(empty["val/ppl"])  # not a perplexity of 1.0
    assert "validation saw no trainable token" in caplog.text


def test_batches_without_trainable_tokens_are_counted_in_a_warning(tmp_path, caplog):
    """Rows 0-3 (batches 0, 1) have labels only -100: a warning at the first check (step 2) counts
    the two batches; the run goes on and the checkpoint is written."""
    module = CGGRModule(make_tiny_model("llama"), CGGRConfig(enabled=False), LossConfig(impl="torch"))
    data = _rows(4, False) + _rows(4, True, seed=1)
    loader = ResumableLoader(Rows(data), batch_size=2, shuffle=False)
    checkpoint = ResumableCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_steps=2)
    trainer = _trainer(tmp_path, max_steps=4, log_every_n_steps=2, callbacks=[checkpoint], limit_val_batches=0)
    with caplog.at_level(logging.WARNING, logger="lightning_cggr.callbacks"):
        trainer.fit(module, loader)
    warnings = [r.getMessage() for r in caplog.records if "no trainable token" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("2 training micro-batch(es) before step 2")
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


def test_a_loss_scalers_skipped_steps_are_not_a_divergence(tmp_path):
    """Under ``16-mixed`` torch's GradScaler raises its scale until the gradients overflow, then skips
    that step and halves the scale, by design (every 2000 steps in a long run). Such a step was taken
    for a divergence: exit 3. Here the scale starts at 2^60, so the first steps overflow; the run goes
    on to its last step and saves a finite checkpoint."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = CGGRModule(make_tiny_model("llama"), CGGRConfig(warmup_steps=0), LossConfig(impl="torch"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    loader = ResumableLoader(Rows(_rows(12, True)), batch_size=2, shuffle=False)
    checkpoint = ResumableCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_steps=2)
    trainer = _trainer(tmp_path, max_steps=6, log_every_n_steps=2, callbacks=[checkpoint], limit_val_batches=0,
                       plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, loader)
    assert scaler.get_scale() < 2.0**60  # steps were skipped: the gradients did overflow
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 6 and _all_finite(ckpt)

"""Exact resume: 20 steps straight == 10 steps, Ctrl-C, resume from the saved checkpoint, 10 steps.

Everything a step depends on must come back: weights, AdamW moments, the LR schedule, the global
step (CGGR warmup here ends at step 12, after the interruption), and the position in the epoch's
shuffled data (the run crosses epoch boundaries, and the interruption falls mid-epoch).
"""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

from lightning_cggr.train import CONF_DIR, train

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = (
    "router token loss gradient sequence batch layer head vocabulary entropy margin step "
    "epoch checkpoint resume warmup ratio scale rank device"
).split()


def write_corpus(root: Path) -> list[str]:
    paths = []
    for i in range(4):
        words = [WORDS[(7 * j + 3 * i + j * j) % len(WORDS)] for j in range(60)]
        path = root / f"doc{i}.txt"
        path.write_text(" ".join(words) + ".\n")
        paths.append(str(path))
    return paths


def make_cfg(tmp_path: Path, out: str, *extra: str):
    paths = write_corpus(tmp_path)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"output_dir={tmp_path / out}",
                "model.hidden_size=32", "model.num_layers=3", "model.num_heads=4",
                "model.intermediate_size=64", "model.max_position_embeddings=64",
                "data.source=files", f"data.paths=[{','.join(paths)}]", "data.vocab_size=300",
                f"data.cache_dir={tmp_path / 'tok'}", "data.block_size=16", "data.batch_size=2",
                "data.val_fraction=0.3",
                "cggr.scoring=entropy", "cggr.min_tokens_ratio=0.5", "cggr.warmup_steps=12",
                "optim.warmup_steps=4",
                "trainer.max_steps=20", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                *extra,
            ],
        )


class Interrupt(L.Callback):
    """Ctrl-C (KeyboardInterrupt) in the middle of the step after optimizer step ``at``: its batch
    was fetched and its forward ran, and it must be trained again after the resume."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.where = (trainer.current_epoch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


class Positions(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch_idx))


def losses(run_dir: Path) -> list[float]:
    """train/loss of each logged step, in order, from the run's CSV (Lightning's logger step
    numbering after a resume is its own affair: order is what counts)."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


@pytest.fixture
def restore_sigint():
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a KeyboardInterrupt
    yield
    signal.signal(signal.SIGINT, handler)


def test_twenty_steps_equal_ten_interrupt_resume_ten(tmp_path, restore_sigint):
    positions = Positions()
    train(make_cfg(tmp_path, "straight"), callbacks=[positions])
    straight = losses(tmp_path / "straight")
    assert len(straight) == 20
    epochs = {e for e, _ in positions.seen}
    assert len(epochs) >= 2, "the run should cross an epoch boundary"

    stop = Interrupt(at=10)
    with pytest.raises(SystemExit):  # Lightning turns Ctrl-C into a graceful exit(1)
        train(make_cfg(tmp_path, "first"), callbacks=[stop])
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), "Ctrl-C must leave a usable last checkpoint"
    assert stop.where != (stop.where[0], 0), "the interruption should fall mid-epoch"

    resumed_positions = Positions()
    train(make_cfg(tmp_path, "second", f"ckpt_path={ckpt}"), callbacks=[resumed_positions])
    first, second = losses(tmp_path / "first"), losses(tmp_path / "second")

    assert len(first) == 10 and len(second) == 10
    assert positions.seen[10:] == resumed_positions.seen  # same epoch, same batch index, in order
    for step, got in enumerate(first + second):
        assert got == pytest.approx(straight[step], rel=1e-5, abs=1e-6), f"step {step}"


def test_resume_without_data_position_would_differ(tmp_path, restore_sigint, monkeypatch):
    """The check above can fail: restarting the epoch's data order changes the losses after resume."""
    from lightning_cggr.data import resumable

    train(make_cfg(tmp_path, "straight"))
    stop = Interrupt(at=10)
    with pytest.raises(SystemExit):
        train(make_cfg(tmp_path, "first"), callbacks=[stop])
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"

    monkeypatch.setattr(resumable.ResumableLoader, "load_state_dict", lambda self, state: None)
    train(make_cfg(tmp_path, "second", f"ckpt_path={ckpt}"))
    straight, second = losses(tmp_path / "straight"), losses(tmp_path / "second")
    assert len(second) == 10
    assert any(abs(a - b) > 1e-3 for a, b in zip(second, straight[10:]))


@pytest.mark.parametrize("first_steps", [10, 8], ids=["stopped-mid-epoch", "stopped-at-epoch-end"])
def test_continuing_a_finished_run_equals_running_straight(tmp_path, first_steps):
    """A run that reached max_steps, resumed from its last.ckpt with a larger max_steps, continues
    with the next unseen batch: Lightning alone counts the stop as a finished epoch and resumes one
    epoch too far. The LR is constant after warmup, so the shorter first run has the same schedule."""
    constant_lr = "optim.min_lr_ratio=1.0"
    positions = Positions()
    train(make_cfg(tmp_path, "straight", constant_lr), callbacks=[positions])
    first_positions, resumed_positions = Positions(), Positions()
    train(make_cfg(tmp_path, "first", constant_lr, f"trainer.max_steps={first_steps}"), callbacks=[first_positions])
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(make_cfg(tmp_path, "second", constant_lr, f"ckpt_path={ckpt}"), callbacks=[resumed_positions])

    assert first_positions.seen + resumed_positions.seen == positions.seen
    straight, first, second = losses(tmp_path / "straight"), losses(tmp_path / "first"), losses(tmp_path / "second")
    assert len(first) == first_steps and len(second) == 20 - first_steps
    for step, got in enumerate(first + second):
        assert got == pytest.approx(straight[step], rel=1e-5, abs=1e-6), f"step {step}"

"""Exact resume: 20 steps straight == 10 steps, Ctrl-C, resume from the saved checkpoint, 10 steps.

Everything a step depends on must come back: weights, AdamW moments, the LR schedule, the global
step (CGGR warmup here ends at step 12, after the interruption), and the position in the epoch's
shuffled data (the run crosses epoch boundaries, and the interruption falls mid-epoch).
"""

from __future__ import annotations

import csv
import logging
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from lightning_cggr.errors import RunStopped, UserError
from lightning_cggr.train import CONF_DIR, train

REPO = Path(__file__).resolve().parents[1]

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


def overrides(tmp_path: Path, out: str, *extra: str) -> list[str]:
    """A tiny model on a tiny corpus, 20 steps: the run every test here varies."""
    paths = write_corpus(tmp_path)
    return [
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
    ]


def make_cfg(tmp_path: Path, out: str, *extra: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides(tmp_path, out, *extra))


def from_exported_cfg(tmp_path: Path, out: str, folder: Path, *extra: str):
    """The run of :func:`make_cfg` on the same data, from the weights of an exported model folder
    (``model.source=pretrained``: the folder brings its architecture and tokenizer)."""
    own = ("model.hidden_size", "model.num_layers", "model.num_heads", "model.intermediate_size",
           "model.max_position_embeddings", "data.vocab_size")
    words = [w for w in overrides(tmp_path, out, "model.source=pretrained", f"model.name={folder}", *extra)
             if not w.startswith(own)]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=words)


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


def rows(run_dir: Path, metric: str = "train/loss") -> list[tuple[int, float]]:
    """(step label, value) of every logged ``metric``, in file order."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r[metric])) for r in csv.DictReader(f) if r.get(metric)]


def losses(run_dir: Path) -> list[float]:
    """train/loss of each logged step, in step order, from the run's CSV."""
    return [v for _, v in sorted(rows(run_dir), key=lambda r: r[0])]


@pytest.fixture
def restore_sigint():
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a KeyboardInterrupt
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize("variant", ["whole-model", "lora", "max-epochs"])
def test_twenty_steps_equal_ten_interrupt_resume_ten(tmp_path, restore_sigint, variant):
    """With ``model.lora.r`` the checkpoint holds the frozen weights and the adapters, and AdamW's state
    for the adapters only: the resumed run continues the same losses too. With ``trainer.max_epochs``
    as well, Lightning builds the training loader before it restores the checkpoint (to count the
    run's steps for the LR schedule) and then never gives it its saved position: the resume started
    the interrupted epoch over, silently, until the module handed the position on itself."""
    extra = {"whole-model": (), "lora": ("model.lora.r=4", "optim.lr=1e-2"), "max-epochs": ("+trainer.max_epochs=5",)}
    val = ("trainer.val_check_interval=5",  # validation timing must survive the mid-step checkpoint too
           *extra[variant])
    positions = Positions()
    train(make_cfg(tmp_path, "straight", *val), callbacks=[positions])
    straight = losses(tmp_path / "straight")
    assert len(straight) == 20
    epochs = {e for e, _ in positions.seen}
    assert len(epochs) >= 2, "the run should cross an epoch boundary"

    stop = Interrupt(at=10)
    # Lightning turns Ctrl-C into exit(1); the run stops like a signal instead: 130, where it saved
    with pytest.raises(RunStopped, match=r"^SIGINT received again: stopped at once at step 10, saved .*last.ckpt") as ended:
        train(make_cfg(tmp_path, "first", *val), callbacks=[stop])
    assert ended.value.exit_code == 130
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), "Ctrl-C must leave a usable last checkpoint"
    assert stop.where != (stop.where[0], 0), "the interruption should fall mid-epoch"

    resumed_positions = Positions()
    train(make_cfg(tmp_path, "second", *val, f"ckpt_path={ckpt}"), callbacks=[resumed_positions])
    first, second = losses(tmp_path / "first"), losses(tmp_path / "second")

    assert len(first) == 10 and len(second) == 10
    assert positions.seen[10:] == resumed_positions.seen  # same epoch, same batch index, in order
    for step, got in enumerate(first + second):
        assert got == pytest.approx(straight[step], rel=1e-5, abs=1e-6), f"step {step}"
    # step labels continue exactly: resumed step k is labelled as uninterrupted step k
    labels = [s for s, _ in rows(tmp_path / "first") + rows(tmp_path / "second")]
    assert labels == [s for s, _ in rows(tmp_path / "straight")] == list(range(20))
    vals = rows(tmp_path / "first", "val/loss") + rows(tmp_path / "second", "val/loss")
    assert [s for s, _ in vals] == [s for s, _ in rows(tmp_path / "straight", "val/loss")] == [0, 4, 9, 14, 19, 20]
    assert [v for _, v in vals] == pytest.approx([v for _, v in rows(tmp_path / "straight", "val/loss")], rel=1e-5)


def test_resume_without_data_position_would_differ(tmp_path, restore_sigint, monkeypatch):
    """The check above can fail: restarting the epoch's data order changes the losses after resume."""
    from lightning_cggr.data import resumable

    train(make_cfg(tmp_path, "straight"))
    stop = Interrupt(at=10)
    with pytest.raises(RunStopped):  # the interrupt (exit 130)
        train(make_cfg(tmp_path, "first"), callbacks=[stop])
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"

    monkeypatch.setattr(resumable.ResumableLoader, "load_state_dict", lambda self, state: None)
    train(make_cfg(tmp_path, "second", f"ckpt_path={ckpt}"))
    straight, second = losses(tmp_path / "straight"), losses(tmp_path / "second")
    assert len(second) == 10
    assert any(abs(a - b) > 1e-3 for a, b in zip(second, straight[10:]))


class FirstBatch(L.Callback):
    """The first training batch a run draws, and where the run's loader would start that epoch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "ids"):
            self.ids, self.epoch = batch["input_ids"].cpu().clone(), trainer.current_epoch
            loader = trainer.datamodule.train_dataloader()  # a fresh loader: no saved position
            loader.sampler.set_epoch(self.epoch)
            self.epoch_start = next(iter(loader))["input_ids"]


def test_a_resume_on_changed_data_restarts_the_epoch_and_says_so(tmp_path, restore_sigint, caplog):
    """The position saved mid-epoch counts batches of the interrupted run's data; after the corpus
    changed (a file edited, the config equal) it points into a different order. The resume says so
    and draws that epoch from its first batch; on unchanged data it continues where it stopped,
    without a word. Either way it tokenizes with the checkpoint's own BPE (retrained on the edited
    corpus it had fewer tokens than the model's embedding, and the resume failed on its shape)."""
    stop = Interrupt(at=10)
    with pytest.raises(RunStopped):  # the interrupt (exit 130)
        train(make_cfg(tmp_path, "first"), callbacks=[stop])
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"

    same, first = make_cfg(tmp_path, "same", f"ckpt_path={ckpt}"), FirstBatch()
    with caplog.at_level(logging.WARNING):
        train(same, callbacks=[first])
    assert "training data differs" not in caplog.text
    assert first.epoch == stop.where[0] and not torch.equal(first.ids, first.epoch_start)  # mid-epoch

    changed = make_cfg(tmp_path, "changed", f"ckpt_path={ckpt}")
    doc = tmp_path / "doc0.txt"
    doc.write_text(doc.read_text().replace("router", "routers"))
    first = FirstBatch()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(changed, callbacks=[first])
    # a line of the run's log (the console and train.log), from this package, once
    said = [r for r in caplog.records if "training data differs" in r.getMessage()]
    assert len(said) == 1 and said[0].name == "lightning_cggr.data.resumable"
    assert re.search(rf"the training data differs from the checkpoint's .* epoch {stop.where[0]} means nothing here: "
                     rf"epoch {stop.where[0]} restarts", said[0].getMessage())
    assert first.epoch == stop.where[0] and torch.equal(first.ids, first.epoch_start)


def test_a_resume_may_read_the_same_data_from_a_new_folder(tmp_path, restore_sigint, caplog):
    """Data moved to another folder (data.paths changed, the files the same) was refused as a config
    difference. A checkpoint that holds its training set's fingerprint now resumes from the new
    paths, exactly: the final weights equal an uninterrupted run's. One without it (written before
    the fingerprint was stored) is still refused."""
    import shutil

    train(make_cfg(tmp_path, "straight"))
    stop = Interrupt(at=10)
    with pytest.raises(RunStopped):  # the interrupt (exit 130)
        train(make_cfg(tmp_path, "first"), callbacks=[stop])
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"

    moved = tmp_path / "moved"
    cfg = make_cfg(tmp_path, "second", f"ckpt_path={ckpt}")
    moved.mkdir()
    for path in cfg.data.paths:
        shutil.copy(path, moved / Path(path).name)
    cfg.data.paths = [str(moved / Path(p).name) for p in cfg.data.paths]
    with caplog.at_level("INFO"):
        train(cfg)
    assert "training data differs" not in caplog.text
    assert "data.paths: not the checkpoint's; the data is read from the new place" in caplog.text
    straight, resumed = (_weights(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("straight", "second"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    from lightning_cggr.module import CONFIG_KEY

    old = torch.load(ckpt, map_location="cpu", weights_only=False)
    del old[CONFIG_KEY]["data"]
    torch.save(old, tmp_path / "old.ckpt")
    cfg = make_cfg(tmp_path, "third", f"ckpt_path={tmp_path / 'old.ckpt'}")
    cfg.data.paths = [str(moved / Path(p).name) for p in cfg.data.paths]
    with pytest.raises(UserError, match=r"the config differs from the checkpoint's: data.paths="):
        train(cfg)


@pytest.mark.parametrize("first_steps", [10, 8], ids=["stopped-mid-epoch", "stopped-at-epoch-end"])
def test_continuing_a_finished_run_equals_running_straight(tmp_path, first_steps):
    """A run that reached max_steps, resumed from its last.ckpt with a larger max_steps, continues
    with the next unseen batch: Lightning alone counts the stop as a finished epoch and resumes one
    epoch too far. The LR is constant after warmup, so the shorter first run has the same schedule."""
    constant_lr = "optim.min_lr_ratio=1.0"
    positions = Positions()
    ends = {"straight": train(make_cfg(tmp_path, "straight", constant_lr), callbacks=[positions])}
    first_positions, resumed_positions = Positions(), Positions()
    ends["first"] = train(make_cfg(tmp_path, "first", constant_lr, f"trainer.max_steps={first_steps}"),
                          callbacks=[first_positions])
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    ends["second"] = train(make_cfg(tmp_path, "second", constant_lr, f"ckpt_path={ckpt}"), callbacks=[resumed_positions])
    # the resumed run reports the run's starting point (from the checkpoint), as the straight run does
    initial = {k: v for k, v in ends["straight"].items() if k.endswith("_initial")}
    assert sorted(initial) == ["val/loss_initial", "val/ppl_initial"]
    assert {k: ends["first"][k] for k in initial} == {k: ends["second"][k] for k in initial} == initial
    assert ends["second"]["val/loss"] == pytest.approx(ends["straight"]["val/loss"], rel=1e-5)

    assert first_positions.seen + resumed_positions.seen == positions.seen
    straight, first, second = losses(tmp_path / "straight"), losses(tmp_path / "first"), losses(tmp_path / "second")
    assert len(first) == first_steps and len(second) == 20 - first_steps
    for step, got in enumerate(first + second):
        assert got == pytest.approx(straight[step], rel=1e-5, abs=1e-6), f"step {step}"


def test_a_continued_run_trains_its_first_step_at_the_new_schedules_rate(tmp_path):
    """A finished 12-step run (warm-up 4, cosine to a tenth) continued to 20: every step from 12 on
    trains at the 20-step schedule's rate, by hand (the first used to train at the old schedule's
    floor: AdamW's restored state brings back the old rate), and the learning-rate monitor labels
    each step once (the first resumed step was labelled 13, then 13 again)."""
    common = ("optim.lr=0.01", "optim.min_lr_ratio=0.1", "callbacks=lr_monitor")
    train(make_cfg(tmp_path, "run", *common, "trainer.max_steps=12"))
    train(make_cfg(tmp_path, "run", *common, "ckpt_path=auto"))
    logged = rows(tmp_path / "run", "lr-AdamW/pg1")
    assert [step for step, _ in logged] == list(range(20))

    def rate(step, total):  # warm-up 4 (optim.warmup_steps=4 in overrides), then cosine to 0.1 x lr
        return 0.01 * (step / 4 if step < 4 else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - 4) / (total - 4))))

    assert [lr for _, lr in logged] == pytest.approx([rate(s, 12) for s in range(12)] + [rate(s, 20) for s in range(12, 20)],
                                                     rel=1e-6)


def test_resuming_at_or_past_max_steps_says_that_nothing_trains(tmp_path, caplog):
    """trainer.max_steps is the whole run's length: a user who gives the steps to add (10 after 20)
    trained nothing, with only Lightning's "max_steps=10 reached" to say so."""
    import logging

    train(make_cfg(tmp_path, "run"))
    caplog.set_level(logging.INFO, logger="lightning_cggr.train")
    for steps in (10, 20):
        caplog.clear()
        train(make_cfg(tmp_path, "run", f"trainer.max_steps={steps}", "ckpt_path=auto"))
        assert any(m.startswith(f"the checkpoint is at step 20, and trainer.max_steps={steps} is the whole run's "
                                f"length") and m.endswith(f"e.g. trainer.max_steps={20 + steps}")
                   for m in caplog.messages), caplog.messages
    assert [s for s, _ in rows(tmp_path / "run")] == list(range(20))  # nothing trained
    caplog.clear()
    train(make_cfg(tmp_path, "run", "trainer.max_steps=21", "ckpt_path=auto"))
    assert not any("nothing trains" in m for m in caplog.messages)


def test_every_checkpoint_of_an_accumulating_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """trainer.val_check_interval counts batches, so with accumulate_grad_batches=3 and validation
    every 4 batches, validations fall inside optimizer steps, and each saved last.ckpt there: a run
    killed after such a save resumed without the step's accumulated micro-batches (Lightning regroups
    them from the next batch). Every checkpoint the run writes must resume to the straight run's
    final weights, bit for bit."""
    import shutil

    from lightning_cggr.checkpointing import AtomicCheckpointIO

    common = ("data.batch_size=1", "trainer.accumulate_grad_batches=3", "trainer.val_check_interval=4",
              "trainer.max_steps=6", "checkpoint.every_n_steps=0", "cggr.warmup_steps=2", "optim.warmup_steps=1")
    saves, write = tmp_path / "saves", AtomicCheckpointIO.save_checkpoint
    saves.mkdir()

    def keep_each(self, checkpoint, path, storage_options=None):
        write(self, checkpoint, path, storage_options)
        if Path(path).name == "last.ckpt" and checkpoint["global_step"] < 6:
            shutil.copyfile(path, saves / f"{len(list(saves.iterdir())):02d}.ckpt")

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", keep_each)
    train(make_cfg(tmp_path, "straight", *common))
    monkeypatch.undo()
    straight = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    kept = sorted(saves.iterdir())
    assert len(kept) >= 2  # the validations inside the run
    for ckpt in kept:
        train(make_cfg(tmp_path, ckpt.stem, *common, f"ckpt_path={ckpt}"))
        resumed = _weights(tmp_path / ckpt.stem / "checkpoints" / "last.ckpt")
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), f"resumed from {ckpt.name}"


class Crash(L.Callback):
    """A RuntimeError at the ``(n + 1)``-th call of hook ``where`` while the global step is ``at``.
    ``on_before_backward``: micro-batch ``n`` of the step after step ``at``; ``on_train_batch_end``:
    the batch that made step ``at`` is call 0, so call ``n`` ends micro-batch ``n - 1`` of the next
    step (its gradient accumulated, its batch not yet counted as done)."""

    def __init__(self, at: int, n: int, where: str):
        self.at, self.n, self.seen = at, n, 0
        setattr(self, where, self._maybe_crash)

    def _maybe_crash(self, trainer, *args):
        if trainer.global_step == self.at and not trainer.sanity_checking:
            if self.seen == self.n:
                raise RuntimeError("a crash inside an accumulated step")
            self.seen += 1


@pytest.mark.parametrize("where,at,n", [
    ("on_before_backward", 3, 0), ("on_before_backward", 3, 1), ("on_before_backward", 3, 2),
    ("on_train_batch_end", 3, 1), ("on_train_batch_end", 3, 2), ("on_validation_start", 1, 0),
])
def test_a_crash_inside_an_accumulated_step_resumes_to_the_same_weights(tmp_path, where, at, n):
    """A crash (not a signal) saves last.ckpt where it happens. Inside an optimizer step of 3
    micro-batches the weights and AdamW are those of the step before, but the batches it had drawn
    so far were counted as done: a resume skipped them and the step trained on fewer micro-batches.
    The save must resume at the step's first micro-batch, to the straight run's weights bit for bit.
    No save precedes the crash (a validation's save inside a step waits for the step's end).
    In a validation: every 4 batches, the first after the 1st micro-batch of the 2nd step."""
    val = ("trainer.val_check_interval=4",) if where == "on_validation_start" else ()
    common = ("data.batch_size=1", "trainer.accumulate_grad_batches=3", "trainer.max_steps=6",
              "checkpoint.every_n_steps=0", "cggr.warmup_steps=2", "optim.warmup_steps=1", *val)
    train(make_cfg(tmp_path, "straight", *common))
    with pytest.raises(RuntimeError, match="inside an accumulated step"):
        train(make_cfg(tmp_path, "run", *common), callbacks=[Crash(at, n, where)])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _step_of(ckpt) == at
    train(make_cfg(tmp_path, "run", *common, "ckpt_path=auto"))
    straight, resumed = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt"), _weights(ckpt)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# ---- resume in place ---------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_in_place_continues_the_same_metrics_and_last_checkpoint(tmp_path):
    """20 steps, then ckpt_path=auto to 24 in the same folder: the metrics file keeps its 20 steps
    (byte for byte) and gains 4, labels 0..23 once each; last.ckpt is replaced, never last-v1.ckpt;
    the progress bar counts steps of the whole run (20 -> 24 of 24)."""
    from lightning_cggr.callbacks import StepProgressBar

    common = ("trainer.val_check_interval=10", "optim.min_lr_ratio=1.0")
    train(make_cfg(tmp_path, "run", *common))
    before = rows(tmp_path / "run")
    bar = StepProgressBar()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(make_cfg(tmp_path, "run", *common, "trainer.max_steps=24", "ckpt_path=auto",
                       "trainer.enable_progress_bar=true"), callbacks=[bar])
    # the best-checkpoint callback's "directory exists and is not empty": resuming in place is why
    assert not [w for w in seen if "exists and is not empty" in str(w.message)]
    after = rows(tmp_path / "run")
    assert [s for s, _ in after] == list(range(24))
    assert after[:20] == before
    # initial, after steps 10 and 20, final (the first run's final validation at 20 is replaced)
    assert [s for s, _ in rows(tmp_path / "run", "val/loss")] == [0, 9, 19, 24]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 24
    assert (bar.train_progress_bar.initial, bar.train_progress_bar.n, bar.train_progress_bar.total) == (20, 24, 24)


def _bar_frames(text: str) -> list[tuple[int, int, int, str]]:
    """(epoch, step, total, rate) of every frame the training bar drew (tqdm separates frames by
    carriage returns)."""
    import re

    frame = re.compile(r"Epoch (\d+): *\d+%\|[^|]*\| *(\d+)/(\d+) \[[^,\]]*, *([^\],]*)")
    return [(int(m[1]), int(m[2]), int(m[3]), m[4]) for m in frame.finditer(text.replace("\r", "\n"))]


def test_the_progress_bar_counts_optimizer_steps_across_epochs(tmp_path, capsys):
    """The run crosses epoch boundaries: every frame the bar draws reads k/20 with k the optimizer
    step, never going back (Lightning's own reset drew the epoch's batch count, "0/48", and a
    frame of 0/100 at a negative rate at each new epoch) and never a negative rate; a resume to 24
    draws from 20/24 on."""
    train(make_cfg(tmp_path, "run", "trainer.enable_progress_bar=true"))
    frames = _bar_frames(capsys.readouterr().out)
    assert {total for _, _, total, _ in frames} == {20}
    steps = [step for _, step, _, _ in frames]
    assert steps == sorted(steps) and steps[-1] == 20 and len({e for e, *_ in frames}) > 1
    assert not [rate for *_, rate in frames if rate.startswith("-")]
    train(make_cfg(tmp_path, "run", "trainer.max_steps=24", "ckpt_path=auto", "trainer.enable_progress_bar=true"))
    frames = _bar_frames(capsys.readouterr().out)
    assert {total for _, _, total, _ in frames} == {24} and frames[0][1] == 20 and frames[-1][1] == 24


@pytest.mark.parametrize("accumulate, every", [(1, 5), (2, 5), (1, 0)])
def test_the_progress_bar_reads_the_device_metrics_only_at_the_logging_interval(tmp_path, capsys, monkeypatch,
                                                                                accumulate, every):
    """Reading the logged metrics is a host-device sync; Lightning's bar read them after every batch.
    After a training batch the bar reads them at the first step, at every 5th (trainer.log_every_n_steps=5)
    and at the last, once per step under accumulation; also at epoch ends (every 4 steps here) and
    validation. In between its frames show the numbers last read, while the step counter moves.
    With log_every_n_steps=0 (no step logging) only at the first step and the last: it read at every
    one before."""
    import re

    from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

    from lightning_cggr.callbacks import StepProgressBar

    reads, where = [], []
    read, epoch_end = ProgressBar.get_metrics, StepProgressBar.on_train_epoch_end

    def counted(self, trainer, pl_module):
        reads.append((trainer.global_step, where[-1] if where else "batch"))
        return read(self, trainer, pl_module)

    def at_epoch_end(self, trainer, pl_module):
        where.append("epoch end")
        try:
            return epoch_end(self, trainer, pl_module)
        finally:
            where.pop()

    monkeypatch.setattr(ProgressBar, "get_metrics", counted)
    monkeypatch.setattr(StepProgressBar, "on_train_epoch_end", at_epoch_end)
    train(make_cfg(tmp_path, "run", "trainer.enable_progress_bar=true", f"trainer.log_every_n_steps={every}",
                   "trainer.val_check_interval=1000", f"trainer.accumulate_grad_batches={accumulate}"))
    after_batches = [step for step, kind in reads if kind == "batch"]
    assert sorted(after_batches) == ([1, 5, 10, 15, 20] if every else [1, 20])
    if not every:
        return
    frames = re.findall(r"\| *(\d+)/20 \[[^\]]*train/loss=([-\d.e+]+)", capsys.readouterr().out.replace("\r", "\n"))
    assert {int(step) for step, _ in frames} >= set(range(2, 21))  # a frame at every step
    # each read shows at most one new number: 20 different losses before, one per step
    assert 4 <= len({loss for _, loss in frames}) <= len(reads)


def test_a_resume_that_does_not_match_the_checkpoint_changes_nothing(tmp_path):
    train(make_cfg(tmp_path, "run", "trainer.max_steps=4"))
    before = snapshot(tmp_path / "run")
    with pytest.raises(UserError, match=r"cannot resume .*last\.ckpt.*model\.hidden_size=64 \(the checkpoint has 32\)"):
        train(make_cfg(tmp_path, "run", "trainer.max_steps=8", "ckpt_path=auto", "model.hidden_size=64"))
    with pytest.raises(UserError, match=r"already holds a run .*step 4.*ckpt_path=auto"):
        train(make_cfg(tmp_path, "run", "trainer.max_steps=8"))  # a new run would overwrite it
    assert snapshot(tmp_path / "run") == before
    # what may change on resume does not trip the check
    train(make_cfg(tmp_path, "run", "trainer.max_steps=6", "ckpt_path=auto", "data.batch_size=2", "loss.impl=naive"))


def test_a_checkpoint_older_than_a_setting_resumes_while_that_setting_is_at_its_default(tmp_path):
    """A run saved before loss.label_smoothing / loss.z_loss existed has no such keys in its config;
    the older package trained without them, so a resume matches while they stay at their defaults."""
    import copy

    from omegaconf import OmegaConf

    from lightning_cggr.rundir import config_differences

    now = OmegaConf.to_container(make_cfg(tmp_path, "run"), resolve=True)
    then = copy.deepcopy(now)
    del then["loss"]["label_smoothing"], then["loss"]["z_loss"]
    assert config_differences(now, then) == []
    now["loss"]["z_loss"] = 1e-4
    assert config_differences(now, then) == [
        "loss.z_loss=0.0001 (the checkpoint predates this setting: it trained with 0.0)"]
    then["loss"]["z_loss"] = 1e-3  # present in both: compared as before
    assert config_differences(now, then) == ["loss.z_loss=0.0001 (the checkpoint has 0.001)"]


def test_a_weights_only_checkpoint_is_refused_and_the_advice_trains_from_its_weights(tmp_path, monkeypatch):
    """best.ckpt (and a periodic step_*.ckpt) holds weights only: given as ckpt_path it crashed inside
    Lightning's restore with a KeyError traceback, after the crash save had written a last.ckpt
    without optimizer state that a later ckpt_path=auto resumed from silently. It is refused at
    once, and the way the message names (export, then train from the folder) works."""
    from lightning_cggr import rundir
    from lightning_cggr.errors import CheckpointError
    from lightning_cggr.export import export

    train(make_cfg(tmp_path, "first", "trainer.max_steps=10", "trainer.val_check_interval=5"))
    best = tmp_path / "first" / "checkpoints" / "best.ckpt"
    assert best.is_file()
    with pytest.raises(CheckpointError, match=r"holds the model's weights only .* python -m lightning_cggr.export"):
        train(make_cfg(tmp_path, "second", f"ckpt_path={best}"))
    assert not (tmp_path / "second" / "checkpoints").exists()

    export(best, tmp_path / "exported")
    ends = train(from_exported_cfg(tmp_path, "third", tmp_path / "exported", "trainer.max_steps=2"))
    assert math.isfinite(ends["val/loss"])

    # and past the check (as before it), the failed restore saves nothing: no half-restored last.ckpt
    real = rundir.read_checkpoint_meta
    monkeypatch.setattr(rundir, "read_checkpoint_meta", lambda path: {**real(path), "resumable": True})
    with pytest.raises(KeyError, match="only the model"):
        train(make_cfg(tmp_path, "fourth", f"ckpt_path={best}"))
    assert not (tmp_path / "fourth" / "checkpoints" / "last.ckpt").exists()


def _cli(tmp_path: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    run_dir = tmp_path / out
    return subprocess.run(
        [sys.executable, "-m", "lightning_cggr.train", f"hydra.run.dir={run_dir}",
         *overrides(tmp_path, out, *extra)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )


def test_cli_mismatched_resume_leaves_the_run_folder_byte_identical(tmp_path):
    """From the command line Hydra writes .hydra/config.yaml before train() runs: the check runs
    earlier (a Hydra callback), so nothing in the folder changes, .hydra/ included."""
    train(make_cfg(tmp_path, "run", "trainer.max_steps=4"))
    (tmp_path / "run" / ".hydra").mkdir()
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("# the run's own config\n")
    before = snapshot(tmp_path / "run")
    proc = _cli(tmp_path, "run", "trainer.max_steps=8", "ckpt_path=auto", "model.hidden_size=64")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.hidden_size=64 (the checkpoint has 32)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(tmp_path / "run") == before


def test_cli_run_failing_on_a_user_error_leaves_no_run_folder(tmp_path):
    """Nor the folders made above it (Hydra's default is outputs/<date>/<time>/: outputs/<date>/
    stayed), nor one when the mistake is a value that cannot be resolved."""
    proc = _cli(tmp_path, "runs/today/run", "data.paths=[/no/such/file.txt]")
    assert proc.returncode == 2 and "/no/such/file.txt does not exist" in proc.stderr
    assert not (tmp_path / "runs").exists()
    proc = _cli(tmp_path, "runs/today/run", "data.paths=${oc.env:LIGHTNING_CGGR_NO_SUCH_VARIABLE}")
    assert proc.returncode == 2 and "LIGHTNING_CGGR_NO_SUCH_VARIABLE" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_run_folder_records_the_resolved_config(tmp_path, monkeypatch):
    """.hydra/config.yaml, which export copies and a folder without model/ is rebuilt from, held
    the interpolations as typed (${oc.env:...}, ${hydra:runtime.output_dir}), not the values run."""
    from omegaconf import OmegaConf

    monkeypatch.setenv("LIGHTNING_CGGR_TEST_ATTENTION", "eager")
    proc = _cli(tmp_path, "run", "model.attn_implementation=${oc.env:LIGHTNING_CGGR_TEST_ATTENTION}", "trainer.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert "${" not in text
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert saved.model.attn_implementation == "eager" and saved.output_dir == str(tmp_path / "run")


def test_a_multirun_goes_on_past_a_failing_job_and_leaves_each_folder_as_it_was(tmp_path):
    """One job's mistake ended the whole multirun (exit 2, the later jobs never ran), its folder
    stayed behind, and a refused resume in a multirun rewrote the job's .hydra/ and train.log
    (Hydra writes them before any hook of a job's can refuse it)."""
    sweep = tmp_path / "sweep"

    def multirun(*extra: str) -> subprocess.CompletedProcess:
        words = [w for w in overrides(tmp_path, "unused", "trainer.max_steps=2", *extra) if not w.startswith("output_dir=")]
        return subprocess.run([sys.executable, "-m", "lightning_cggr.train", "-m", f"hydra.sweep.dir={sweep}", *words],
                              capture_output=True, text=True, timeout=300, cwd=REPO,
                              env={**os.environ, "HYDRA_FULL_ERROR": "0"})

    proc = multirun("cggr.min_tokens_ratio=2.0,0.5")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("error: invalid configuration: cggr.min_tokens_ratio=2.0: must be in (0, 1]") == 2
    assert "Traceback" not in proc.stderr
    assert not (sweep / "0").exists()  # the failed job's folder: nothing but Hydra's bookkeeping, removed
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()  # the next job ran

    before = snapshot(sweep / "1")
    proc = multirun("hydra.sweep.subdir=1", "cggr.min_tokens_ratio=0.3", "ckpt_path=auto")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cggr.min_tokens_ratio=0.3 (the checkpoint has 0.5)" in proc.stderr
    assert snapshot(sweep / "1") == before
    proc = multirun("hydra.sweep.subdir=1", "cggr.min_tokens_ratio=0.5")  # ckpt_path=null: not over a run
    assert proc.returncode == 2 and "start a new run in another folder (hydra.sweep.dir=...)" in proc.stderr
    assert snapshot(sweep / "1") == before


# ---- killed runs -------------------------------------------------------------------------------


class Slow(L.Callback):
    """A pause after each batch, so a test can signal a run mid-way (numerics unchanged)."""

    def on_train_batch_end(self, *args):
        time.sleep(0.15)


def _train_and_exit(cfg) -> None:
    """A forked child's whole life: train, then leave with main()'s exit code (never return into pytest)."""
    code = 1
    try:
        train(cfg, callbacks=[Slow()])
        code = 0
    except RunStopped as err:
        code = err.exit_code
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _step_of(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except (FileNotFoundError, RuntimeError):
        return -1


def _weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["kill-9", "sigterm", "ctrl-c"])
def test_killed_run_resumed_in_place_equals_an_uninterrupted_run(tmp_path, sig):
    """The run is killed after its checkpoint of step >= 5 (kill -9: wherever it is; SIGTERM: it
    saves at the next step boundary and exits 143), then `ckpt_path=auto` in the same folder runs it
    to the end: final weights and every logged train/val value and step label equal an
    uninterrupted run's. Periodic saves every 3 steps (kill -9) or only at validation (SIGTERM and
    Ctrl-C, exit 130, so the signal's own save is seen)."""
    every = "checkpoint.every_n_steps=3" if sig == signal.SIGKILL else "checkpoint.every_n_steps=0"
    common = ("trainer.max_steps=16", "trainer.val_check_interval=5", "callbacks=none", every)
    train(make_cfg(tmp_path, "straight", *common))
    cfg = make_cfg(tmp_path, "run", *common, "ckpt_path=auto")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"

    child = multiprocessing.get_context("fork").Process(target=_train_and_exit, args=(cfg,))
    child.start()
    deadline = time.monotonic() + 120
    while _step_of(ckpt) < 5 and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    seen = _step_of(ckpt)
    os.kill(child.pid, sig)
    child.join(60)
    assert 5 <= seen < 16, "the run should be killed mid-way"
    if sig != signal.SIGKILL:
        assert child.exitcode == 128 + sig
        assert seen < _step_of(ckpt) < 16  # saved at the step boundary after the signal
    else:
        assert child.exitcode == -signal.SIGKILL

    train(cfg)  # resume in place, to the end
    straight, resumed = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt"), _weights(ckpt)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    for metric in ("train/loss", "val/loss"):
        assert rows(tmp_path / "run", metric) == rows(tmp_path / "straight", metric), metric


@pytest.mark.parametrize("through", ["loader", "datamodule"])
def test_overfit_batches_trains_the_first_batches_of_the_resumable_loader_in_order(through):
    """``trainer.overfit_batches=2`` (Lightning rebuilds the training loader with a sequential
    sampler, from the arguments it saw when a datamodule made the loader, else from its attributes)
    failed with a TypeError on the loader's own sampler argument. It now trains rows 0-3 (batches
    [0, 1], [2, 3]) again and again, unshuffled; another sampler is refused by name."""
    from conftest import Rows, make_tiny_model

    from lightning_cggr.config import CGGRConfig
    from lightning_cggr.data.resumable import ResumableLoader
    from lightning_cggr.module import CGGRModule

    rows = [{"input_ids": torch.full((8,), i + 1), "labels": torch.full((8,), i + 1)} for i in range(10)]
    seen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(batch["input_ids"][:, 0].tolist())

    module = CGGRModule(make_tiny_model("llama"), CGGRConfig(enabled=False))
    trainer = L.Trainer(accelerator="cpu", max_steps=5, overfit_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Watch()])
    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return ResumableLoader(Rows(rows), batch_size=2, seed=0, shuffle=True)

    if through == "loader":
        trainer.fit(module, Data().train_dataloader())
    else:
        trainer.fit(module, datamodule=Data())
    assert seen == [[1, 2], [3, 4], [1, 2], [3, 4], [1, 2]]
    with pytest.raises(TypeError, match="sampler=RandomSampler: pass shuffle=False"):
        ResumableLoader(Rows(rows), batch_size=2, sampler=torch.utils.data.RandomSampler(rows))

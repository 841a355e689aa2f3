"""Config groups users expect: logger=csv|tensorboard|wandb (continued in place on resume),
callbacks= built the Hydra way (_target_), trainer presets, and main() returning the objective."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_resume import make_cfg, rows

from lightning_cggr.config import ConfigError
from lightning_cggr.train import CONF_DIR, main, train

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(L.Callback):
    """A user's own callback, named by its import path in the config."""

    def __init__(self, path: str, note: str = "ran"):
        self.path, self.note = path, note

    def on_train_end(self, trainer, pl_module):
        Path(self.path).write_text(f"{self.note} {trainer.global_step}")


def test_callbacks_group_builds_checkpoints_monitors_early_stopping_and_user_callbacks(tmp_path):
    hit = tmp_path / "hit.txt"
    train(make_cfg(
        tmp_path, "run", "trainer.max_steps=10", "trainer.val_check_interval=5",
        "callbacks=[best_checkpoint,periodic_checkpoints,lr_monitor,early_stopping]",
        "callbacks.periodic_checkpoints.every_n_train_steps=4",
        "+callbacks.mine._target_=test_loggers.Recorder", f"+callbacks.mine.path={hit}", "+callbacks.mine.note=hello",
    ))
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt", "step_000004.ckpt", "step_000008.ckpt"]
    best, last = (torch.load(ckpts / n, weights_only=False) for n in ("best.ckpt", "last.ckpt"))
    assert "optimizer_states" not in best and "optimizer_states" in last  # weights only: the default for best
    assert best["lightning_cggr"]["config"]["model"]["hidden_size"] == 32  # every checkpoint names its config
    assert (ckpts / "best.ckpt").stat().st_size < 0.5 * (ckpts / "last.ckpt").stat().st_size
    header = next(csv.reader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    assert "lr-AdamW/pg1" in header and "train/grad_norm" in header
    assert hit.read_text() == "hello 10"


def test_early_stopping_ends_the_run_and_says_why(tmp_path, caplog):
    """With min_delta larger than any change, the second validation inside training is no
    improvement: patience 1 stops the run there (step 4 of 20), and the log says why (Lightning's
    EarlyStopping is silent unless verbose, so a run used to end early without a word)."""
    import logging

    caplog.set_level(logging.INFO)
    train(make_cfg(tmp_path, "run", "trainer.max_steps=20", "trainer.val_check_interval=2", "callbacks=early_stopping",
                   "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=10"))
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4
    assert any("did not improve in the last 1 records" in m and "Signaling Trainer to stop" in m
               for m in caplog.messages)


def test_lr_monitor_logs_each_optimizer_step_once_under_accumulation(tmp_path):
    """callbacks=lr_monitor with 2 micro-batches per step: one row of rates per optimizer step (Lightning's
    own monitor wrote each step twice), each the hand-worked warm-up + cosine rate of that step."""
    import math

    train(make_cfg(tmp_path, "run", "trainer.max_steps=6", "trainer.accumulate_grad_batches=2",
                   "optim.lr=0.01", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1", "trainer.val_check_interval=100"))
    logged = [(int(r["step"]), float(r["lr-AdamW/pg1"])) for r in csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv"))
              if r.get("lr-AdamW/pg1")]
    # step s: s / 2 in the warm-up, then 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 4)) / 2 of lr
    want = [0.01 * (s / 2 if s < 2 else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - 2) / 4))) for s in range(6)]
    assert [step for step, _ in logged] == list(range(6))
    assert [lr for _, lr in logged] == pytest.approx(want, rel=1e-6)


def test_callbacks_can_be_dropped_and_mistakes_are_config_errors(tmp_path):
    train(make_cfg(tmp_path, "run", "trainer.max_steps=2", "callbacks.best_checkpoint=null"))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["last.ckpt"]
    with pytest.raises(ConfigError, match=r"trainer\.callbacks: the run's callbacks come from the callbacks group"):
        train(make_cfg(tmp_path, "bad1", "+trainer.callbacks=null"))
    with pytest.raises(ConfigError, match=r"callbacks\.mine needs a _target_"):
        train(make_cfg(tmp_path, "bad2", "+callbacks.mine.patience=3"))
    with pytest.raises(ConfigError, match=r"callbacks\.early_stopping: .*patiense"):
        train(make_cfg(tmp_path, "bad3", "callbacks=early_stopping", "+callbacks.early_stopping.patiense=3"))
    assert not any((tmp_path / n / "csv").exists() for n in ("bad1", "bad2", "bad3"))


def test_tensorboard_logger_continues_in_place_without_duplicate_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ("logger=tensorboard", "trainer.val_check_interval=100")
    train(make_cfg(tmp_path, "run", *common, "trainer.max_steps=6"))
    train(make_cfg(tmp_path, "run", *common, "trainer.max_steps=8", "ckpt_path=auto"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(8))
    assert [e.step for e in events.Scalars("val/loss")] == [0, 8]  # the first run's final one (6) purged
    assert not (tmp_path / "run" / "csv").exists()


def test_wandb_offline_needs_no_network_and_resumes_the_same_run(tmp_path, monkeypatch):
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    common = ("logger=wandb", "logger.wandb.offline=true")
    train(make_cfg(tmp_path, "run", *common, "trainer.max_steps=3"))
    wandb.finish()  # the process ends: a resume is a new process, whose wandb run starts anew
    train(make_cfg(tmp_path, "run", *common, "trainer.max_steps=5", "ckpt_path=auto"))
    wandb.finish()
    run_id = (tmp_path / "run" / "wandb" / "run-id").read_text().strip()
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    assert all((r / f"run-{run_id}.wandb").is_file() for r in runs)


def test_logger_none_writes_no_metrics(tmp_path, caplog):
    # the default callbacks log the learning rate, which has nowhere to go: left out, and said so
    with caplog.at_level(logging.INFO, logger="lightning_cggr"):
        train(make_cfg(tmp_path, "run", "logger=none", "trainer.max_steps=2"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "model"]  # no csv/
    said = [r.getMessage() for r in caplog.records if "callbacks.lr_monitor" in r.getMessage()]
    assert len(said) == 1 and "left out" in said[0] and "no logger" in said[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_cggr"):
        train(make_cfg(tmp_path, "run2", "trainer.max_steps=2"))  # with a logger: kept, nothing said
    assert not [r for r in caplog.records if "callbacks.lr_monitor" in r.getMessage()]
    assert "lr-AdamW" in (tmp_path / "run2" / "csv" / "metrics.csv").read_text().splitlines()[0]


def test_several_loggers_at_once_compose():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["logger=[csv,tensorboard]", "output_dir=/tmp/unused"])
    assert sorted(cfg.logger) == ["csv", "tensorboard"]


@pytest.mark.parametrize("preset, strategy", [("ddp", "ddp"), ("fsdp2", "fsdp2"), ("cpu", "auto")])
def test_trainer_presets(preset, strategy):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"trainer={preset}", "output_dir=/tmp/unused"])
    assert cfg.trainer.strategy == strategy


def test_main_returns_the_final_validation_loss_for_sweepers(tmp_path):
    cfg = make_cfg(tmp_path, "run", "trainer.max_steps=2")
    objective = main.__wrapped__(cfg)  # the function under @hydra.main: what a sweeper receives
    assert isinstance(objective, float) and objective == pytest.approx(rows(tmp_path / "run", "val/loss")[-1][1])


TIDY = """
import logging
logging.basicConfig(level=logging.INFO, format="ROOT %(message)s")  # as Hydra's job logging does first
import lightning as L
from lightning_cggr.train import tidy_lightning_logging
tidy_lightning_logging()
tidy_lightning_logging()  # a second train() in the same process adds nothing
L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
"""


def test_lightning_notices_show_once_through_the_root_handlers_without_the_litlogger_advert():
    """Lightning's top package adds its own console handler and lets records propagate to the root
    logger as well: under Hydra every notice came out twice, plus a cloud-logger advert."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", TIDY], capture_output=True, text=True, timeout=120, check=True)
    text = out.stdout + out.stderr
    assert text.count("GPU available") == 1, text
    assert "ROOT GPU available" in text  # through the root's handlers: Hydra's console and train.log
    assert "litlogger" not in text, text

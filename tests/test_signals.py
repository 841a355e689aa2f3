"""SIGTERM / SIGINT stop a run at a step boundary with a checkpoint and exit 128 + signal, under DDP
without a deadlock; Lightning's SLURM requeue signal keeps working."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from test_resume import REPO, _step_of, _weights, make_cfg, overrides, rows

from lightning_cggr.errors import RunStopped
from lightning_cggr.signals import StopRequest, exit_code
from lightning_cggr.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_signal_is_only_recorded_and_a_second_ctrl_c_interrupts_at_once():
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed(7) == (signal.SIGTERM, 7)  # one process: nothing to agree with
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)  # later signals keep the first one
        assert stop.signum == signal.SIGTERM
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is not stop._handle
    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGINT) == 130


def test_sigterm_of_a_two_process_ddp_run_saves_and_exits_143_and_resumes_exactly(tmp_path):
    """The command line with trainer.strategy=ddp trainer.devices=2 (gloo), SIGTERM to the whole
    process group (what a scheduler sends) after its validation-time checkpoint of step 4: both
    ranks stop at the same step boundary, save, and exit 143 within 60 s. Resumed in place to the
    end (2 forked processes), weights and metrics equal an uninterrupted 2-process run."""
    common = ("trainer.devices=2", "trainer.max_steps=12", "trainer.val_check_interval=4", "callbacks=none",
              "checkpoint.every_n_steps=0")
    train(make_cfg(tmp_path, "straight", *common, "trainer.strategy=ddp_fork"))

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_cggr.train", f"hydra.run.dir={run}",
         *overrides(tmp_path, "run", *common, "trainer.strategy=ddp", "ckpt_path=auto",
                    "+callbacks.slow._target_=test_resume.Slow")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "tests")}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 240
    while _step_of(ckpt) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = _step_of(ckpt)
    os.killpg(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - sent < 60
    assert proc.returncode == 143, output[-3000:]
    assert "SIGTERM received: stopped at step" in output
    assert _group_finished(proc.pid), "a rank was left behind"
    assert 4 <= seen < _step_of(ckpt) < 12

    train(make_cfg(tmp_path, "run", *common, "trainer.strategy=ddp_fork", "ckpt_path=auto"))
    straight, resumed = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt"), _weights(ckpt)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    for metric in ("train/loss", "val/loss"):
        assert rows(run, metric) == rows(tmp_path / "straight", metric), metric


def _group_finished(pgid: int, wait: float = 15.0) -> bool:
    """No live process left in the group (a rank that exited after rank 0 may linger briefly as a
    zombie until init reaps it)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        states = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
        if all(s.startswith("Z") for s in states):
            return True
        time.sleep(0.2)
    return False


class Requeue(L.Callback):
    """Sends this process the SLURM requeue signal once, at step ``at``."""

    def __init__(self, at: int):
        self.at, self.sent = at, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1)


def test_slurm_requeue_signal_still_saves_lightnings_hpc_checkpoint(tmp_path, monkeypatch):
    """Under SLURM with auto-requeue, SIGUSR1 is Lightning's: it saves hpc_ckpt_1.ckpt in the run
    folder (through the atomic writer) and asks scontrol to requeue (absent here: a warning); the
    run goes on to its end."""
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the requeue call fails, harmlessly
    metrics = train(make_cfg(tmp_path, "run", "trainer.max_steps=8", "callbacks=none"), callbacks=[Requeue(3)])
    hpc = torch.load(tmp_path / "run" / "hpc_ckpt_1.ckpt", weights_only=False)
    assert hpc["global_step"] == 3
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
    assert "val/loss" in metrics


class TermDuringFirstValidation(L.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step == 0 and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_a_validation_outside_training_stops_at_once_with_143(tmp_path):
    """Before fit nothing is trained, so nothing is saved: the run stops right away with 143
    (Lightning's own SIGTERM handler, which broadcasts inside the handler, is not in charge)."""
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunStopped, match="SIGTERM received outside training") as stopped:
        train(make_cfg(tmp_path, "run"), callbacks=[TermDuringFirstValidation()])
    assert stopped.value.exit_code == 143
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored


class RequeueSaveAt(L.Callback):
    """What Lightning's SLURM handler does at a SIGUSR1 (before SLURM requeues the job): save the
    state as hpc_ckpt_1.ckpt in the Trainer's default_root_dir, the run folder."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            from pathlib import Path

            trainer.save_checkpoint(Path(trainer.default_root_dir) / "hpc_ckpt_1.ckpt")


def test_under_slurm_the_final_validation_measures_the_trained_weights(tmp_path, monkeypatch):
    """Under SLURM, Lightning's validate() without a checkpoint loads the run folder's newest requeue
    save: after a SIGUSR1 at step 3 of 8 the run reported (and returned to a sweeper) step 3's loss
    as its final val/loss. It must equal the same run's without SLURM."""
    plain = train(make_cfg(tmp_path, "plain", "trainer.max_steps=8"))
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    ends = train(make_cfg(tmp_path, "slurm", "trainer.max_steps=8"), callbacks=[RequeueSaveAt(3)])
    assert (tmp_path / "slurm" / "hpc_ckpt_1.ckpt").is_file()
    assert ends["val/loss"] == pytest.approx(plain["val/loss"], rel=1e-6)
    assert ends["val/loss_initial"] == pytest.approx(plain["val/loss_initial"], rel=1e-6)


class TermRankOneDuringFirstValidation(L.Callback):
    """SIGTERM to rank 1 alone, in the validation before fit (a scheduler signals the process group;
    a user's `kill <pid>` reaches one process)."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.global_rank == 1 and trainer.global_step == 0 and batch_idx == 1 and not trainer.training:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_to_one_ddp_rank_during_a_validation_outside_training_stops_both_with_143(tmp_path):
    """Outside fit a signal stopped the rank that got it at once; the other waited in the validation's
    next collective and failed on the closed connection (a traceback, exit 1). The ranks now agree at
    each validation batch's end and stop together: one line, 143, nothing saved, no folder error."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_cggr.train", f"hydra.run.dir={run}",
         *overrides(tmp_path, "run", "trainer=ddp", "trainer.devices=2", "trainer.max_steps=4", "callbacks=none",
                    "data.val_fraction=0.5", "+callbacks.term._target_=test_signals.TermRankOneDuringFirstValidation")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "tests"), "HYDRA_FULL_ERROR": "0"},
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the ranks did not stop together (hung):\n{out[-3000:]}")
    assert proc.returncode == 143, out[-3000:]
    assert "stopped: SIGTERM received outside training: stopped, nothing to save" in out
    assert "Traceback" not in out and "Connection closed" not in out, out[-3000:]
    assert not (run / "checkpoints" / "last.ckpt").exists()

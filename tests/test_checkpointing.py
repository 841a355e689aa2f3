"""Checkpoint writes are atomic, and a folder that cannot take a checkpoint is an error at step 0."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
import torch
from test_resume import make_cfg

from lightning_cggr import checkpointing
from lightning_cggr.checkpointing import AtomicCheckpointIO, preflight, remove_stale_temporaries
from lightning_cggr.errors import UserError
from lightning_cggr.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _crash_after_some_bytes(monkeypatch):
    """torch.save that writes part of the file, then fails as a full disk would."""
    real = torch.save

    def partial_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", partial_save)
    return real


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    first = {"state_dict": {"w": torch.arange(4.0)}, "global_step": 3}
    io.save_checkpoint(first, path)
    _crash_after_some_bytes(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "global_step": 6}, path)
    monkeypatch.undo()
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["w"], first["state_dict"]["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    AtomicCheckpointIO().save_checkpoint({"x": 1}, tmp_path / "a.ckpt")
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_leftovers_of_a_killed_save_are_removed(tmp_path):
    (tmp_path / ".last.ckpt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "last.ckpt").write_bytes(b"whole")
    (tmp_path / ".last.ckpt.partial").mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert len(removed) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_preflight_refuses_an_unwritable_folder_and_a_full_disk(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"checkpoint folder .*file/checkpoints is not writable"):
        preflight(blocker / "checkpoints", 10)
    preflight(tmp_path / "ok", 10)  # writable and room: no error, no probe file left
    assert list((tmp_path / "ok").iterdir()) == []

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p: usage(1 << 40, 0, 5 << 20))
    with pytest.raises(UserError, match=r"has 5\.0 MiB free, but a checkpoint .* takes about 1\.0 GiB .* "
                                         r"about 2\.0 GiB needed"):
        preflight(tmp_path / "ok", 1 << 30)
    # an atomic save holds the old last.ckpt and the new one at once: room for one is not enough
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p: usage(1 << 40, 0, 15 << 20))
    with pytest.raises(UserError, match=r"about 20\.0 MiB needed"):
        preflight(tmp_path / "ok", 10 << 20)
    (tmp_path / "ok" / "last.ckpt").write_bytes(b"0" * (10 << 20))  # the resumed run's own: it counts
    preflight(tmp_path / "ok", 10 << 20)


def test_estimate_counts_weights_and_two_adamw_moments():
    model = torch.nn.Linear(10, 10)  # 110 fp32 parameters
    assert checkpointing.estimate_checkpoint_bytes(model) == 110 * 4 * 3 + (1 << 20)


def test_a_run_whose_checkpoint_folder_is_unwritable_fails_before_training(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(UserError, match="is not writable"):
        train(make_cfg(tmp_path, "run"))
    assert not (out / "csv").exists()  # nothing trained, nothing logged


def test_a_save_that_fails_mid_run_keeps_the_previous_last_checkpoint(tmp_path, monkeypatch):
    """From the second periodic save on the disk is full (the save fails half-way, and so does the
    save attempted on the way out): the run stops with that error, and last.ckpt still holds the
    first save, complete and loadable."""
    calls = {"n": 0}
    real = torch.save

    def flaky(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            f.write(b"PK partial")
            raise OSError(28, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", flaky)
    with pytest.raises(OSError, match="No space left"):
        train(make_cfg(tmp_path, "run", "checkpoint.every_n_steps=3", "callbacks=none"))
    monkeypatch.undo()
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.ckpt"]


def test_default_cadence_loses_at_most_a_tenth_of_a_killed_run():
    from hydra import compose, initialize_config_dir

    from lightning_cggr.callbacks import default_every_n_steps
    from lightning_cggr.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["output_dir=/tmp/unused"])
    assert cfg.checkpoint.every_n_steps is None  # resolved from the run's length
    for max_steps in (1, 7, 100, 2345):
        every = default_every_n_steps(max_steps)
        assert 1 <= every <= max(1, max_steps // 10 + 1) and every >= max_steps / 10
    assert default_every_n_steps(cfg.trainer.max_steps) == 10 and default_every_n_steps(-1) == 0


# ---- FSDP2: the sharded checkpoint folder -------------------------------------------------------


def test_an_interrupted_folder_save_is_rolled_back(tmp_path):
    """A save that died between its two renames leaves the previous complete folder under
    ``.last.ckpt.old`` and no ``last.ckpt``: the run folder's recovery puts it back. A folder that is
    in place is never touched."""
    from lightning_cggr.checkpointing import recover_folder_checkpoint

    old = tmp_path / ".last.ckpt.old"
    old.mkdir()
    (old / "meta.pt").write_bytes(b"step 3")
    recover_folder_checkpoint(tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert (tmp_path / "last.ckpt" / "meta.pt").read_bytes() == b"step 3"
    old.mkdir()  # both present (the later save completed): the newer stays
    recover_folder_checkpoint(tmp_path / "last.ckpt")
    assert old.exists() and (tmp_path / "last.ckpt" / "meta.pt").read_bytes() == b"step 3"


def test_fsdp2_checkpoint_folder_is_replaced_whole(tmp_path, monkeypatch):
    """What trainer.strategy=fsdp2 builds, over 2 forked gloo processes, saving last.ckpt after each
    of 2 steps. While the shards of a save are written, last.ckpt is not the folder being written
    and still holds the previous complete save; afterwards it holds the second save (its step, and
    every weight equal to the full weights gathered from the shards at that step), with no partial
    or old folder beside it."""
    import lightning as L
    import lightning.pytorch.strategies.model_parallel as lightning_fsdp2
    from conftest import Rows, make_tiny_model
    from test_ddp import _ForkLauncher, cggr_config, make_rows
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.tensor import DTensor

    from lightning_cggr.config import LossConfig
    from lightning_cggr.data.resumable import ResumableLoader
    from lightning_cggr.module import CGGRModule

    class ForkedAtomicFSDP2(checkpointing._model_parallel_strategy()):
        def _configure_launcher(self):
            self._launcher = _ForkLauncher(self, start_method="fork")

    ckpt, weights, seen = tmp_path / "last.ckpt", tmp_path / "weights.pt", tmp_path / "seen.txt"
    real_save = lightning_fsdp2._distributed_checkpoint_save

    def watched_save(state, path):  # runs in each forked rank; rank 0 notes what a reader would find
        if torch.distributed.get_rank() == 0:
            meta = ckpt / "meta.pt"
            step = torch.load(meta, weights_only=False)["global_step"] if meta.exists() else None
            with open(seen, "a") as f:
                f.write(f"{Path(path) == ckpt} {step}\n")
        real_save(state, path)

    monkeypatch.setattr(lightning_fsdp2, "_distributed_checkpoint_save", watched_save)

    class SaveEachStep(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            trainer.save_checkpoint(ckpt)
            full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                    for n, p in module.state_dict().items()}  # a collective: every rank
            if trainer.global_rank == 0:
                torch.save(full, weights)

    class DM(L.LightningDataModule):
        def train_dataloader(self):
            return ResumableLoader(Rows(make_rows()), batch_size=1, shuffle=False)

    torch.manual_seed(0)
    module = CGGRModule(make_tiny_model("llama", num_layers=3), cggr_config(), LossConfig(impl="torch"))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ForkedAtomicFSDP2(), max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[SaveEachStep()])
    trainer.fit(module, datamodule=DM())

    assert seen.read_text().split("\n") == ["False None", "False 1", ""]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "seen.txt", "weights.pt"]
    assert torch.load(ckpt / "meta.pt", weights_only=False)["global_step"] == 2
    dcp_to_torch_save(ckpt, tmp_path / "flat.pt")
    saved = torch.load(tmp_path / "flat.pt", weights_only=False)["state_dict"]
    want = torch.load(weights)
    assert set(saved) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)

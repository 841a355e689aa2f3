"""The holdout-trained reference of RHO-LOSS (lightning_cggr.routing.holdout): built by one command on
the tiny model, trained on training documents only, and loadable by cggr.router.reference."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_cggr.config import CGGRConfig, DataConfig, RouterConfig, SelectionConfig
from lightning_cggr.routing import holdout
from lightning_cggr.routing.selection import IGNORE_INDEX

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=64",
        "data.batch_size=4", "data.block_size=32"]


def test_holdout_documents_are_a_deterministic_part_of_the_training_split_only():
    from lightning_cggr.data.text import load_documents, split_documents

    train, val = split_documents(load_documents(DataConfig()), 0.05)
    part = holdout.holdout_documents(train, 0.5)
    assert part == holdout.holdout_documents(list(train), 0.5)
    assert set(part) <= set(train) and not set(part) & set(val)
    assert 0.25 * len(train) < len(part) < 0.75 * len(train)
    assert len(holdout.holdout_documents(train, 1e-4)) == 1  # never empty
    with pytest.raises(ValueError, match="--fraction=0"):
        holdout.holdout_documents(train, 0)


def test_one_command_builds_a_reference_that_excess_loss_scoring_loads(tmp_path, one_thread):
    from lightning_cggr.config import ModelConfig
    from lightning_cggr.data import build_tokenizer
    from lightning_cggr.models import build_model
    from lightning_cggr.step import CGGRStep

    cache = tmp_path / "tok"
    out = tmp_path / "reference"
    code = holdout.main(["--out", str(out), "--steps", "6", "--layers", "1", *TINY, f"data.cache_dir={cache}"])
    assert code == 0
    rec = json.loads((out / "holdout.json").read_text())
    assert rec["layers"] == 1 and rec["steps"] == 6
    assert rec["heldout_loss_after"] < rec["heldout_loss_before"]  # it learned something of the corpus
    # the run it serves: the same tokenizer, the full-size model
    tok = build_tokenizer(DataConfig(cache_dir=str(cache), batch_size=4, block_size=32))
    model, _ = build_model(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64), tok)
    cfg = CGGRConfig(scoring="excess_loss", warmup_steps=0,
                     router=RouterConfig(num_layers=1, reference=str(out), reference_dtype="float32"),
                     selection=SelectionConfig(strategy="noise_excluded", noise_fraction=0.1))
    step = CGGRStep(model, cfg)
    assert step.reference.vocab_size == len(tok) == model.get_output_embeddings().weight.shape[0]
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    loaded = step.reference.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())  # the trained weights, not a fresh init
    ids = torch.randint(0, len(tok), (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    res = step(batch, global_step=0)
    assert torch.isfinite(res.loss) and 0 < int(res.kept) < int((ids[:, 1:] != IGNORE_INDEX).sum())


def test_the_reference_trains_with_the_runs_loss_settings(tmp_path, monkeypatch, one_thread):
    """loss.* overrides reach the reference's training step whole (it once kept loss.impl alone and
    dropped the rest without a word)."""
    import lightning_cggr.step as step_module

    seen = []

    class Recording(step_module.CGGRStep):
        def __init__(self, model, cggr=None, loss=None, *args, **kwargs):
            seen.append(loss)
            super().__init__(model, cggr, loss, *args, **kwargs)

    monkeypatch.setattr(step_module, "CGGRStep", Recording)
    code = holdout.main(["--out", str(tmp_path / "ref"), "--steps", "1", "--layers", "1", *TINY,
                         f"data.cache_dir={tmp_path / 'tok'}", "loss.z_loss=0.001", "loss.label_smoothing=0.1",
                         "loss.chunk_size=8"])
    assert code == 0
    (loss,) = seen
    assert (loss.z_loss, loss.label_smoothing, loss.chunk_size) == (0.001, 0.1, 8)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert holdout.main(["--out", str(tmp_path), "--fraction", "0", *TINY]) == 2
    assert "--fraction=0.0: must be in (0, 1]" in capsys.readouterr().err
    assert holdout.main(["--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps=0: must be >= 1" in capsys.readouterr().err
    assert holdout.main(["--out", str(tmp_path), "--lr", "-1"]) == 2
    assert "--lr=-1.0: must be a number > 0" in capsys.readouterr().err  # was torch's "Invalid learning rate"
    assert holdout.main(["--out", str(tmp_path), "--seed", "-3"]) == 2
    assert "--seed=-3: must be >= 0" in capsys.readouterr().err  # was numpy's bounds message
    assert holdout.main(["--out", str(tmp_path), "data=chat", "model=smollm2_gguf"]) == 2
    assert "built for packed text" in capsys.readouterr().err


def test_the_throughput_benchmark_times_the_rho_methods_against_a_reference(tmp_path, one_thread):
    """experiments.throughput listed rho_token and rho_sequence, then asked for a --reference it did
    not take; it takes one now, as experiments.quality does, and times them with it."""
    from experiments import throughput

    ref = tmp_path / "reference"
    assert holdout.main(["--out", str(ref), "--steps", "2", "--layers", "1", *TINY,
                         f"data.cache_dir={tmp_path / 'tok'}"]) == 0
    common = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--mem-steps", "0",
              "--out", str(tmp_path), *TINY, f"data.cache_dir={tmp_path / 'tok'}"]
    with pytest.raises(SystemExit, match="rho_token needs a reference model: pass --reference DIR"):
        throughput.main(["--methods", "standard_fused,rho_token", *common])
    assert throughput.main(["--methods", "standard_fused,rho_token", "--reference", str(ref), *common]) == 0
    payload = json.loads((tmp_path / "throughput-tiny-cpu.json").read_text())
    assert payload["summary"]["rho_token"]["median_step_s"] > 0
    assert payload["methods"]["rho_token"]["config"]["cggr"]["router"]["reference"] == str(ref)


def test_the_command_reports_mistakes_in_one_line_and_keeps_an_existing_reference(tmp_path, capsys, one_thread):
    """A misspelt override printed an omegaconf traceback (exit 1); a trainer.* override and a
    reference larger than the run's model were taken without a word; a second run replaced the
    reference in --out silently; and --steps 1 trained nothing (its one step was the LR warm-up's 0)."""
    common = [*TINY, f"data.cache_dir={tmp_path / 'tok'}"]
    out = tmp_path / "ref"
    for extra, said in [(["model.hiden_size=3"], "model.hiden_size: no such setting; did you mean model.hidden_size?"),
                        (["trainer.max_steps=3"], "trainer.max_steps=3: this command reads the run's model and data only"),
                        (["--layers", "3"], "--layers=3: the run's model has 2 blocks")]:
        assert holdout.main(["--out", str(out), "--steps", "1", *extra, *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and said in err[0], err
    assert not out.exists()
    assert holdout.main(["--out", str(out), "--steps", "1", "--layers", "1", *common]) == 0
    rec = json.loads((out / "holdout.json").read_text())
    assert rec["heldout_loss_after"] != rec["heldout_loss_before"]  # its one step trained
    first = (out / "holdout.json").read_bytes()
    capsys.readouterr()
    assert holdout.main(["--out", str(out), "--steps", "1", "--layers", "1", "--seed", "1", *common]) == 2
    assert "already holds a reference; give another folder, or --overwrite" in capsys.readouterr().err
    assert (out / "holdout.json").read_bytes() == first
    assert holdout.main(["--out", str(out), "--steps", "1", "--layers", "1", "--seed", "1", "--overwrite", *common]) == 0
    assert json.loads((out / "holdout.json").read_text())["seed"] == 1

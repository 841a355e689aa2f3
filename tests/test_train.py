"""The Hydra entry point: composed configs, config errors, and the default job end to end."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lightning_cggr.config import ConfigError, parse_config
from lightning_cggr.train import CONF_DIR, build_strategy, check_trainer, train
from omegaconf import OmegaConf


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tokenizers"))


def _plain(cfg):
    return OmegaConf.to_container(cfg, resolve=False)


def test_every_shipped_config_group_option_validates():
    conf = Path(CONF_DIR)
    for group in ("model", "data", "cggr", "trainer"):
        for option in sorted((conf / group).glob("*.yaml")):
            overrides = [f"{group}={option.stem}", "output_dir=/tmp/unused"]
            if OmegaConf.load(option).get("tokenizer") == "model":  # data made for a pretrained model
                overrides.append("model=smollm2_gguf")
            cfg = _plain(_compose(*overrides))
            if "???" in option.read_text():  # a preset that asks the user for a value must say which
                with pytest.raises(ConfigError, match="needs"):
                    parse_config(cfg)
            else:
                parse_config(cfg)


def test_smollm_experiment_composes_with_upstream_defaults():
    cfg = _compose("+experiment=smollm", "output_dir=/tmp/unused")
    run = parse_config(_plain(cfg))
    assert run.model.name == "HuggingFaceTB/SmolLM2-135M"
    assert (run.cggr.router.num_layers, run.cggr.warmup_steps, run.cggr.min_tokens_ratio) == (2, 10, 0.25)
    assert run.data.block_size == 2048 and run.data.tokenizer == "model"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "auto"  # the GPU when present, else the CPU


@pytest.mark.parametrize(
    "override, message",
    [
        ("cggr.scoring=entropyy", "cggr.scoring='entropyy': must be one of"),
        ("cggr.min_tokens_ratio=0", "cggr.min_tokens_ratio=0: must be in (0, 1]"),
        ("cggr.min_tokens_ratio=1.5", "cggr.min_tokens_ratio=1.5: must be in (0, 1]"),
        ("cggr.warmup_steps=-1", "cggr.warmup_steps=-1"),
        ("cggr.router.num_layers=9", "the model has only 4 layers"),
        ("cggr.selection.scope=global", "cggr.selection.scope='global'"),
        ("loss.impl=cuda", "loss.impl='cuda'"),
        ("loss.chunk_size=0", "loss.chunk_size=0: must be an integer >= 1"),
        ("loss.grad_accum=bf16", "loss.grad_accum='bf16': must be null or one of fp32, weight"),
        ("loss.impl=naive loss.grad_accum=weight", "loss.impl=naive chooses its own accumulation"),
        ("loss.impl=naive loss.chunk_size=512", "loss.impl=naive has no chunks of ours"),
        ("model.arch=mamba", "model.arch='mamba'"),
        # a byte-level BPE cannot hold fewer (it trained 262 tokens where 100 were asked)
        ("data.vocab_size=256", "data.vocab_size=256: must be an integer >= 257 (a byte-level BPE holds the 256 "
                                "bytes and its EOS token before any merge)"),
    ],
)
def test_bad_values_fail_before_anything_is_built(override, message):
    with pytest.raises(ConfigError) as err:
        parse_config(_plain(_compose(*override.split(), "output_dir=/tmp/unused")))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "wrong, message, right",
    [
        (["model.name=gpt2"], "model.name=gpt2: read only with model.source=pretrained", ["model=smollm", "model.name=gpt2"]),
        (["model=smollm2_gguf", "model.num_layers=2"], "model.num_layers=2: read only with model.source=random",
         ["model.num_layers=2"]),
        (["data.paths={tmp}/notes.txt"], "data.paths: read only with data.source=files",
         ["data.source=files", "data.paths={tmp}/notes.txt"]),
        (["data.hf_config=wikitext-103-raw-v1"], "data.hf_config=wikitext-103-raw-v1: read only with data.source=hf",
         ["data=wikitext", "model=smollm", "data.hf_config=wikitext-103-raw-v1"]),
        (["model=smollm2_gguf", "data.vocab_size=300"], "data.vocab_size=300: sizes the BPE tokenizer",
         ["data.vocab_size=300"]),
        (["cggr.selection.p_min=0.2"], "cggr.selection.p_min=0.2 applies to strategy=importance, and this run's "
         "cggr.selection.strategy is topk", ["cggr=importance", "cggr.selection.p_min=0.2"]),
        (["cggr=importance", "cggr.selection.strategy=topk"], "cggr.selection.importance_transform=relu applies to "
         "strategy=importance", ["cggr=importance", "cggr.selection.strategy=topk",
                                 "cggr.selection.importance_transform=rank"]),  # the fix the message names
        (["cggr=stratified", "cggr.selection.prune=0.3"], "cggr.selection.prune=0.3 applies to strategy=infobatch",
         ["cggr=infobatch", "cggr.selection.prune=0.3"]),
    ],
    ids=["model.name", "random-model-size", "data.paths", "hf-dataset-setting", "bpe-vocab", "importance-knob",
         "a-presets-knob", "infobatch-knob"],
)
def test_a_setting_the_chosen_source_would_not_read_is_an_error(wrong, message, right, tmp_path):
    """Each was silently dropped before: model.name=gpt2 on the default random model trained the
    random model. The same setting with the source that reads it is accepted."""
    (tmp_path / "notes.txt").write_text("Some words to train on.\n" * 20)
    with pytest.raises(ConfigError) as err:
        parse_config(_plain(_compose(*[w.format(tmp=tmp_path) for w in wrong], "output_dir=/tmp/unused")))
    assert str(err.value).startswith(f"invalid configuration: {message}") and "\n" not in str(err.value)  # alone
    parse_config(_plain(_compose(*[r.format(tmp=tmp_path) for r in right], "output_dir=/tmp/unused")))


def test_all_problems_are_reported_together():
    cfg = _compose("cggr.scoring=x", "cggr.min_tokens_ratio=2", "output_dir=/tmp/unused")
    with pytest.raises(ConfigError) as err:
        parse_config(_plain(cfg))
    assert "cggr.scoring" in str(err.value) and "cggr.min_tokens_ratio" in str(err.value)


def test_unknown_key_in_a_group_is_an_error():
    cfg = _plain(_compose("output_dir=/tmp/unused"))
    cfg["cggr"]["ratio"] = 0.3
    with pytest.raises(ConfigError, match=r"cggr\.ratio: unknown key"):
        parse_config(cfg)


def test_cli_config_mistake_is_one_message_not_a_traceback(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_cggr.train", "cggr.min_tokens_ratio=1.5", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode != 0
    assert "cggr.min_tokens_ratio=1.5: must be in (0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_default_job_40_steps_lowers_validation_loss_and_writes_artifacts(tmp_path, token_cache, caplog):
    caplog.set_level(logging.INFO, logger="lightning_cggr.callbacks")
    caplog.set_level(logging.INFO, logger="lightning.pytorch")  # Lightning's rank-zero notices
    cfg = _compose(
        "trainer.max_steps=40", "trainer.val_check_interval=40", "trainer.enable_progress_bar=false",
        f"output_dir={tmp_path}", f"data.cache_dir={token_cache}", "cggr.warmup_steps=5",
    )
    metrics = train(cfg)
    assert metrics["val/loss"] < metrics["val/loss_initial"] - 0.5
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    ratios = [float(r["train/kept_ratio"]) for r in rows if r.get("train/kept_ratio")]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    # after warmup the kept ratio is the configured one: ceil(0.25 * 127) / 127 per 128-token block
    assert ratios[-1] == pytest.approx(32 / 127, abs=1e-6)
    assert all(l == l for l in losses)  # no NaN
    # train() returns the last step's train/* values too, those the logger wrote for step 39
    last = next(r for r in reversed(rows) if r.get("train/loss"))
    assert last["step"] == "39"
    assert {k: metrics[k] for k in ("train/loss", "train/kept_ratio")} == pytest.approx(
        {k: float(last[k]) for k in ("train/loss", "train/kept_ratio")}, rel=1e-6)
    # the run's model summary counts with the formula at the data's shape (Lightning's printed 0 FLOPs)
    assert any(m.startswith("model FLOPs of a training micro-batch of 16 x 128 tokens") for m in caplog.messages)
    # and in place of Lightning's default summary, without its notice that it skips that one
    assert not any("already configured with model summary" in m for m in caplog.messages)


def test_max_steps_0_only_validates_and_says_no_checkpoint_was_written(tmp_path, token_cache, caplog):
    caplog.set_level(logging.INFO, logger="lightning_cggr.train")
    cfg = _compose("trainer.max_steps=0", "trainer.enable_progress_bar=false", f"output_dir={tmp_path}",
                   f"data.cache_dir={token_cache}", "model.num_layers=2", "data.block_size=32")
    metrics = train(cfg)
    assert metrics["val/loss"] == pytest.approx(metrics["val/loss_initial"])  # nothing trained
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert any(m.endswith("(no checkpoint: the run took no optimizer step)") for m in caplog.messages)
    # the BPE holds fewer tokens than data.vocab_size allows, and the run says how many the model has
    vocab = json.loads((tmp_path / "model" / "config.json").read_text())["vocab_size"]
    assert vocab < 8192
    assert [m for m in caplog.messages if m.startswith("BPE tokenizer:")] == [
        f"BPE tokenizer: {vocab:,} tokens (data.vocab_size=8192 is its ceiling; the corpus has no more pairs "
        "seen twice to merge)"]


@pytest.mark.parametrize("files", [2, 0], ids=["two-files", "pydoc"])
def test_a_validation_split_far_above_val_fraction_is_warned(files, tmp_path, token_cache, caplog):
    """Documents are held out whole: two files give one to validation, however small
    data.val_fraction is (here the larger half of the text). The run says what that costs."""
    from pydoc_data.topics import topics

    caplog.set_level(logging.INFO, logger="lightning_cggr.train")
    texts = list(topics.values())
    parts = ["\n\n".join(texts[:30]), "\n\n".join(texts[30:])]
    data = []
    if files:
        for i, part in enumerate(parts):
            (tmp_path / f"part{i}.txt").write_text(part, encoding="utf-8")
        data = ["data.source=files", f"data.paths=[{tmp_path}/part0.txt,{tmp_path}/part1.txt]"]
    train(_compose("trainer.max_steps=0", "trainer.enable_progress_bar=false", f"output_dir={tmp_path}/run",
                   f"data.cache_dir={token_cache}", "model.num_layers=2", "data.block_size=32", *data))
    said = [m for m in caplog.messages if m.startswith("the validation split holds")]
    if not files:
        assert not said  # pydoc: 6 of 79 documents, close to the 5% asked
        return
    assert len(said) == 1
    shares = {f"{len(p) / sum(map(len, parts)):.0%}" for p in parts}
    assert said[0].split()[4] in shares and "(1 of 2 documents" in said[0]
    assert "data.val_fraction=0.05" in said[0] and "more, smaller files" in said[0]


def test_limit_val_batches_0_trains_without_any_validation(tmp_path, token_cache, caplog):
    """``trainer.limit_val_batches=0`` (no validation) ended in an IndexError: the validation before
    training returned no results. The run now trains, validates nowhere and says so."""
    caplog.set_level(logging.INFO, logger="lightning_cggr.train")
    cfg = _compose("+trainer.limit_val_batches=0", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
                   f"output_dir={tmp_path}", f"data.cache_dir={token_cache}", "model.num_layers=2",
                   "data.block_size=32")
    metrics = train(cfg)
    assert "train/loss" in metrics and not any(k.startswith("val/") for k in metrics)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert any(m.startswith("trainer.limit_val_batches=0: no validation") for m in caplog.messages)


def test_fast_dev_run_trains_a_step_and_says_why_no_checkpoint_was_written(tmp_path, token_cache, caplog):
    caplog.set_level(logging.INFO, logger="lightning_cggr.train")
    cfg = _compose("+trainer.fast_dev_run=true", "trainer.enable_progress_bar=false", f"output_dir={tmp_path}",
                   f"data.cache_dir={token_cache}", "model.num_layers=2", "data.block_size=32")
    metrics = train(cfg)
    assert "train/loss" in metrics  # it trained (one step)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert any(m.endswith("(no checkpoint: trainer.fast_dev_run writes none)") for m in caplog.messages)


def test_lightnings_pytorch_profiler_records_each_of_the_jobs_three_trainer_calls(tmp_path, token_cache):
    """``+trainer.profiler=pytorch``: Lightning's profiler gave up its schedule after the short
    validation before training but handed the spent schedule to later calls, so the validation after
    fit recorded nothing and the run ended in torch's "Profiler must be initialized" assertion, after
    training. Each call now writes its trace into the logger's folder."""
    cfg = _compose("+trainer.profiler=pytorch", "+trainer.limit_val_batches=3", "trainer.max_steps=6",
                   "trainer.enable_progress_bar=false", f"output_dir={tmp_path}", f"data.cache_dir={token_cache}",
                   "model.num_layers=2", "data.block_size=32")
    metrics = train(cfg)
    assert {"train/loss", "val/loss", "val/loss_initial"} <= set(metrics)
    traces = sorted(p.name.split("-")[0] for p in (tmp_path / "csv").glob("*.pt.trace.json"))
    assert traces == ["fit", "validate", "validate"]


@pytest.mark.parametrize("overrides, warned", [
    (["model=smollm2_gguf"], True),
    (["model=smollm", "model.name=HuggingFaceTB/SmolLM2-135M"], True),
    (["+experiment=smollm"], False),                       # sets optim.lr=3e-4
    (["+experiment=smollm2_chat"], False),
    (["model=smollm2_gguf", "optim.lr=1e-4"], False),
    (["model=smollm2_gguf", "model.lora.r=8"], False),     # adapters: a higher LR is usual
    ([], False),                                          # the random tiny model the default is for
])
def test_a_pretrained_model_at_the_tiny_models_default_lr_is_warned(overrides, warned):
    """At 3e-3, two steps of SmolLM2 on the chat sample doubled its held-out loss (2.79 -> 5.58)."""
    from lightning_cggr.config import fine_tuning_lr_warnings

    run = parse_config(OmegaConf.to_container(_compose(*overrides), resolve=False))
    warnings = fine_tuning_lr_warnings(run)
    assert len(warnings) == warned
    if warned:
        assert warnings[0].startswith("optim.lr=0.003 is the random tiny model's default, and this run trains every "
                                      "weight of a pretrained model")


def test_fsdp_on_cpu_is_a_config_error_that_names_the_fix():
    cfg = _compose("trainer.strategy=fsdp", "output_dir=/tmp/unused")
    with pytest.raises(ConfigError, match="trainer.strategy=fsdp needs GPUs.*use trainer.strategy=fsdp2"):
        check_trainer(OmegaConf.to_container(cfg.trainer))


def test_fsdp_strategies_wrap_one_unit_per_decoder_block():
    from conftest import make_tiny_model
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = make_tiny_model("gpt2", num_layers=2)
    fsdp = build_strategy({"strategy": "fsdp"}, model)
    assert isinstance(fsdp, FSDPStrategy)
    policy = fsdp.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert policy._module_classes == {type(model.transformer.h[0])}  # GPT2Block: one unit per block
    assert isinstance(build_strategy({"strategy": "fsdp2"}, model), ModelParallelStrategy)  # atomic saves added
    assert build_strategy({"strategy": "ddp"}, model) == "ddp"  # everything else is Lightning's by name


def _cli_losses(tmp_path: Path, name: str, token_cache: str, *overrides: str) -> tuple[list[float], float]:
    """train/loss per step and the last val/loss of `python -m lightning_cggr.train` on 2 CPU processes."""
    out = tmp_path / name
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_cggr.train", f"output_dir={out}", f"hydra.run.dir={out}/hydra",
         f"data.cache_dir={token_cache}", "trainer.devices=2", "trainer.val_check_interval=2",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "cggr.warmup_steps=2", "optim.warmup_steps=2", "optim.min_lr_ratio=1.0", *overrides],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LeafSpec" not in proc.stderr  # Lightning's internal deprecation, filtered in every process
    said = proc.stdout + proc.stderr  # train() runs in both ranks' processes; its lines come from rank 0
    assert said.count("final metrics:") == 1 and said.count("run folder:") == 1, said[-3000:]
    assert said.count("\ncggr:\n") == 1  # the resolved config, printed once
    # Lightning's notices that do not apply: the validation loader counts each block once on any number
    # of ranks (lightning_cggr.data.evaluation), the logged loss is already global, the module's
    # on_before_batch_transfer is the batch check
    for notice in ("Using `DistributedSampler`", "sync_dist=True", "overridden `on_before_batch_transfer`"):
        assert notice not in said, notice
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"])) if r.get("train/loss")]
    return losses, float([r for r in rows if r.get("val/loss")][-1]["val/loss"])


@pytest.mark.slow
def test_cli_fsdp2_on_two_cpu_processes_trains_and_resumes_exactly(tmp_path, token_cache):
    """The user's commands, 2 gloo processes each. FSDP2 (sharded weights, gradients and AdamW state)
    trains 8 steps, routing from step 2 on, and keeps a full checkpoint at step 6 (a distributed
    checkpoint folder, named so that the command line takes it unquoted); resumed from that folder, it
    repeats steps 7 and 8 and the final validation. That two FSDP2 processes compute the
    single-process step (global kept-token mean, clipping) is tests/test_ddp.py's."""
    straight, straight_val = _cli_losses(
        tmp_path, "fsdp2", token_cache, "trainer.strategy=fsdp2", "trainer.max_steps=8",
        "callbacks=[default,periodic_checkpoints]", "callbacks.periodic_checkpoints.every_n_train_steps=6",
        "callbacks.periodic_checkpoints.save_weights_only=false")
    ckpt = tmp_path / "fsdp2" / "checkpoints" / "step_000006.ckpt"
    assert ckpt.is_dir()  # one shard file per rank plus metadata
    resumed, resumed_val = _cli_losses(tmp_path, "fsdp2-resumed", token_cache, "trainer.strategy=fsdp2",
                                       "trainer.max_steps=8", f"ckpt_path={ckpt}")
    assert len(straight) == 8 and len(resumed) == 2
    assert straight[-1] < straight[0] - 1.0  # it trains
    assert resumed == pytest.approx(straight[6:], rel=1e-6)
    assert resumed_val == pytest.approx(straight_val, rel=1e-6)


def test_help_says_what_the_program_does_and_lists_every_shipped_option(monkeypatch, capsys):
    from lightning_cggr.train import cli

    # no logging set up: Hydra's handlers would outlive this test's captured streams
    monkeypatch.setattr(sys, "argv", ["lightning-cggr-train", "--help", "hydra/hydra_logging=none",
                                      "hydra/job_logging=none"])
    try:
        cli()
    except SystemExit as done:
        assert done.code in (0, None)
    text = capsys.readouterr().out
    assert text.startswith("python -m lightning_cggr.train [group=option ...]")
    assert "is powered by Hydra" not in text  # Hydra's stock header
    listed = text.split("== Configuration groups ==")[1].split("== Config ==")[0]
    groups = {line.split(": ")[0]: line.split(": ")[1].split(", ") for line in listed.splitlines() if ": " in line}
    conf = Path(CONF_DIR)
    assert groups == {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in conf.iterdir() if g.is_dir()}
    assert "--cfg job prints the" in text  # the footer


@pytest.mark.parametrize("max_steps, accumulate, every, limit", [
    (5, 1, 5, 1.0), (5, 1, 6, 1.0), (3, 2, 6, 1.0), (3, 2, 7, 1.0), (4, 1, 2, 1.0), (4, 1, 2, 0), (4, 1, 2, 0.0)])
def test_a_validation_interval_longer_than_the_run_is_warned_exactly_when_lightning_runs_none(
        max_steps, accumulate, every, limit, tmp_path):
    """Reference: Lightning's own fit of a one-weight module with the same trainer numbers, counting the
    validations it runs during training (none with trainer.limit_val_batches=0)."""
    import lightning as L
    import torch

    from lightning_cggr.train import validation_warnings

    class Counting(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.validations = 0

        def training_step(self, batch, _):
            return (self.w - batch).pow(2).mean()

        def validation_step(self, batch, _):
            return None

        def on_validation_epoch_end(self):
            self.validations += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer_kw = {"max_steps": max_steps, "accumulate_grad_batches": accumulate, "val_check_interval": every,
                  "check_val_every_n_epoch": None, "limit_val_batches": limit}
    module = Counting()
    data = torch.utils.data.DataLoader(torch.ones(64, 1), batch_size=4)
    L.Trainer(**trainer_kw, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
              accelerator="cpu").fit(module, data, data)
    callbacks = {"best_checkpoint": {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "monitor": "val/loss"},
                 "lr_monitor": {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor"}}
    warnings = validation_warnings(callbacks, trainer_kw)
    assert len(warnings) == (module.validations == 0)
    if warnings:
        assert warnings[0].startswith("callbacks.best_checkpoint acts at validations")


@pytest.mark.parametrize("examples, every, limit, max_steps", [
    (40, 5, 1.0, 10), (40, 10, 1.0, 10), (38, 9, 1.0, 10), (40, 5, 3, 10), (40, 5, 0.75, 10), (40, 5, 0, 10),
    (40, 12, 1.0, 10), (40, 12, 1.0, 9), (40, 12, 0.5, 4), (40, 2, 1.0, 3)])
def test_validation_longer_than_the_training_between_validations_is_warned(examples, every, limit, max_steps, tmp_path):
    """Reference: the batches Lightning itself runs in one validation (a held-out set of ``examples``
    in batches of 4, trainer.limit_val_batches as given); the warning names that count, and comes
    exactly when it exceeds the training batches between validations (trainer.val_check_interval)
    in a run long enough to validate inside (a shorter one validates only before and after: never)."""
    import lightning as L
    import torch

    from lightning_cggr.train import validation_cost_warning

    class Counting(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.batches = 0

        def validation_step(self, batch, _):
            self.batches += 1

    module = Counting()
    L.Trainer(limit_val_batches=limit, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu", devices=1).validate(
        module, torch.utils.data.DataLoader(torch.ones(examples, 1), batch_size=4), verbose=False)
    trainer_kw = {"max_steps": max_steps, "accumulate_grad_batches": 1, "val_check_interval": every,
                  "check_val_every_n_epoch": None, "limit_val_batches": limit, "devices": 1}
    warning = validation_cost_warning(examples, 4, trainer_kw)
    assert (warning is not None) == (max_steps >= every and module.batches > every)
    # each of 2 ranks validates half the split; with devices=auto the ranks are not known: no guess
    assert validation_cost_warning(2 * examples, 4, {**trainer_kw, "devices": 2}) == warning
    assert validation_cost_warning(examples, 4, {**trainer_kw, "devices": "auto"}) is None
    if warning:
        assert warning.startswith(f"each validation runs {module.batches} batches of the held-out split, more "
                                  f"than the {every} training batches between validations")


def test_only_rank_zero_says_the_runs_lines(monkeypatch, caplog):
    """Under a multi-process launch every rank runs train(); its warnings and final lines are said by
    the process of global rank 0 only (Lightning's rank, from the launch's environment)."""
    from lightning.pytorch.utilities import rank_zero_only

    from lightning_cggr.train import rank_zero_logger

    for rank, heard in ((0, True), (1, False)):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        caplog.clear()
        with caplog.at_level("INFO"):
            rank_zero_logger().warning("a start warning")
        assert ("a start warning" in caplog.text) is heard


def test_python_m_package_names_and_runs_its_three_commands(monkeypatch, capsys):
    """``python -m lightning_cggr`` (no such entry before: python's "cannot be directly executed")
    lists the commands; ``python -m lightning_cggr COMMAND ...`` runs that command with the rest."""
    from lightning_cggr.__main__ import main as package_main

    monkeypatch.setattr(sys, "argv", ["lightning_cggr"])
    with pytest.raises(SystemExit) as info:
        package_main([])
    assert info.value.code == 2 and "usage: python -m lightning_cggr {train,export,generate}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        package_main(["trian"])
    assert info.value.code == 2 and "'trian' is not a command; did you mean train?" in capsys.readouterr().err
    for command in ("export", "generate", "train"):
        with pytest.raises(SystemExit) as info:
            package_main([command, "--help"])
        assert info.value.code in (0, None)
        assert capsys.readouterr().out.lstrip().startswith(
            ("usage: " if command != "train" else "") + f"python -m lightning_cggr.{command}")


def test_every_command_says_the_packages_version_not_hydras(monkeypatch, capsys):
    """``--version`` of the train command printed Hydra's own version ("Hydra 1.3.8") alone. Each
    command now names this package's version (the installed distribution's) and torch's."""
    from importlib.metadata import version

    import torch

    from lightning_cggr import __version__
    from lightning_cggr.__main__ import main as package_main
    from lightning_cggr.export import main as export
    from lightning_cggr.generate import main as generate
    from lightning_cggr.train import cli

    assert __version__ == version("lightning_cggr")  # the package's and pyproject's agree
    monkeypatch.setattr(sys, "argv", ["lightning-cggr-train", "--version"])
    cli()
    for command in (export, generate, package_main):
        try:
            command(["--version"])
        except SystemExit as done:  # argparse's way out
            assert done.code in (0, None)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and len(set(lines)) == 1
    # the distributions' versions (torch's PyPI CUDA wheel says 2.13.0 where torch.__version__ says 2.13.0+cu130)
    assert lines[0].startswith(f"lightning_cggr {__version__} (torch {version('torch')}, lightning ")
    assert version("torch") in torch.__version__


@pytest.mark.parametrize("ends", ["finished", "stopped"])
def test_the_command_releases_its_process_groups_before_it_exits(monkeypatch, tmp_path, ends):
    """A 2-process CPU run once ended with exit -6 after finishing ("terminate called without an
    active exception"): Gloo's threads outlived the interpreter (pytorch/pytorch#179291). The command
    now destroys its process groups when the run finishes or all ranks stop together. Here a fake
    run opens a one-process gloo group; after the command none is left."""
    import torch.distributed as dist

    from lightning_cggr import train as train_mod
    from lightning_cggr.errors import RunStopped

    def fake_train(cfg):
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        dist.new_group(backend="gloo")  # as the signal handling makes one
        if ends == "stopped":
            raise RunStopped("SIGTERM received: stopped at step 3", 143)
        return {"val/loss": 1.0}

    monkeypatch.setattr(train_mod, "train", fake_train)
    monkeypatch.setattr(sys, "argv", ["lightning-cggr-train", f"hydra.run.dir={tmp_path}/run", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    try:
        train_mod.cli()
    except SystemExit as done:
        assert (ends, done.code) == ("stopped", 143)
    left = dist.is_initialized()
    if left:  # not into the next test
        dist.destroy_process_group()
    assert not left


def test_hydra_help_names_a_shell_completion_command_that_runs(monkeypatch, capsys):
    """`python -m lightning_cggr.train --hydra-help` showed Hydra's completion line for
    `python .../lightning_cggr/train.py`, which fails (a package module cannot run as a file); the
    console script is what Hydra's completion can call again."""
    from lightning_cggr.train import cli

    monkeypatch.setattr(sys, "argv", [str(Path(CONF_DIR).parent / "train.py"), "--hydra-help"])
    try:
        cli()
    except SystemExit as ended:
        assert ended.code in (0, None)
    out = capsys.readouterr().out
    assert 'eval "$(lightning-cggr-train -sc install=bash)"' in out
    assert "train.py -sc" not in out

"""A trained run as a Hugging Face folder: export, reload with transformers, sample.

One tiny run (3 steps) is trained through ``train(cfg)``; the export is checked against the
checkpoint itself, read independently (``torch.load``, prefix stripped by hand, loaded into a model
built from the run's own ``config.json``): the same tensors, the same logits, the same tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lightning_cggr.errors import CheckpointError, UserError
from lightning_cggr.export import export, load_trained, read_model_state
from lightning_cggr.train import CONF_DIR, train

TEXT = "The for statement is used to iterate over the elements of a sequence."

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_overrides(out: Path, cache: Path) -> list[str]:
    return [
        f"output_dir={out}", f"data.cache_dir={cache}", "data.vocab_size=512", "data.block_size=32",
        "data.batch_size=4", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
        "model.intermediate_size=64", "cggr.warmup_steps=1", "trainer.max_steps=3",
        "trainer.val_check_interval=3", "+trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as the CLI leaves it: model/, checkpoints/last.ckpt and .hydra/config.yaml."""
    root = tmp_path_factory.mktemp("run")
    out = root / "run"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=tiny_overrides(out, root / "cache"))
    train(cfg)
    from omegaconf import OmegaConf

    (out / ".hydra").mkdir()
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml", resolve=True)  # what Hydra writes beside it
    return out


def reference_model(run: Path):
    """The checkpoint's weights in a model built from the run's config.json, read by hand."""
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run / "model"))
    model.load_state_dict(state)
    return model.eval(), state


def test_run_folder_keeps_the_tokenizer_it_trained_with(run_dir):
    from transformers import AutoTokenizer

    from lightning_cggr.config import parse_config
    from lightning_cggr.data import build_tokenizer
    from omegaconf import OmegaConf

    saved = AutoTokenizer.from_pretrained(run_dir / "model")
    run = parse_config(OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml")))
    trained_with = build_tokenizer(run.data)  # the BPE from the cache, as train() built it
    assert saved(TEXT)["input_ids"] == trained_with(TEXT)["input_ids"]
    assert saved.eos_token == trained_with.eos_token and len(saved) == len(trained_with)
    assert json.loads((run_dir / "model" / "config.json").read_text())["vocab_size"] == len(trained_with)


def test_export_reloads_with_transformers_with_equal_weights_and_logits(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export(run_dir, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference, state = reference_model(run_dir)
    exported = model.state_dict()
    assert set(exported) == set(state)
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor), name
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert (out / "lightning_cggr_config.yaml").is_file()


def test_trained_weights_are_exported_not_the_initial_ones(run_dir, tmp_path):
    """The check above could pass on an untrained model; the checkpoint must differ from a fresh init."""
    from lightning_cggr.export import _skeleton

    torch.manual_seed(0)
    fresh, _ = _skeleton(run_dir)
    _, state = reference_model(run_dir)
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_checkpoint_path_and_run_folder_export_the_same(run_dir, tmp_path):
    a, _ = load_trained(run_dir)
    b, _ = load_trained(run_dir / "checkpoints" / "last.ckpt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_export_in_bfloat16(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export(run_dir, tmp_path / "bf16", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    _, state = reference_model(run_dir)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.state_dict()["model.norm.weight"], state["model.norm.weight"].to(torch.bfloat16))


def test_run_folder_without_model_files_is_rebuilt_from_its_config(run_dir, tmp_path):
    """Runs made before model/ existed: tokenizer and architecture from .hydra/config.yaml."""
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("model"))
    a, tok_a = load_trained(old)
    b, tok_b = load_trained(run_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert tok_a(TEXT)["input_ids"] == tok_b(TEXT)["input_ids"]


def test_sharded_checkpoint_folder_is_read_like_the_file(run_dir, tmp_path):
    """trainer.strategy=fsdp2 saves a torch.distributed.checkpoint folder ({'state_dict': ...,
    'optimizer_0': ...} plus meta.pt), as Lightning's ModelParallelStrategy writes it."""
    import torch.distributed.checkpoint as dcp

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    folder = tmp_path / "run" / "checkpoints" / "last.ckpt"
    folder.parent.mkdir(parents=True)
    dcp.save({"state_dict": checkpoint["state_dict"]}, checkpoint_id=str(folder))
    torch.save({"global_step": checkpoint["global_step"]}, folder / "meta.pt")
    shutil.copytree(run_dir / "model", tmp_path / "run" / "model")
    model, _ = load_trained(folder)
    _, state = reference_model(run_dir)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_generate_greedy_equals_an_argmax_loop(run_dir, tmp_path):
    from lightning_cggr.generate import generate_text

    model, tokenizer = load_trained(run_dir)
    text = generate_text(model, tokenizer, "The for statement", max_new_tokens=6, temperature=0)
    ids = tokenizer("The for statement", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(6):  # the independent reference: greedy decoding by hand
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert text == "The for statement" + tokenizer.decode(ids[0, 3:], skip_special_tokens=True)


def test_generating_past_a_learned_position_table_names_the_most_that_fits(run_dir):
    """GPT-2 looks positions up in a table: generating past its last row ended in an IndexError from
    inside the model. The most that fits is named, and generates (greedy, to the table's end)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_cggr.generate import generate_text

    _, tokenizer = load_trained(run_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=12, n_embd=16, n_layer=1, n_head=2)).eval()
    prompt_tokens = len(tokenizer("The for statement")["input_ids"])
    fits = 12 - prompt_tokens
    with pytest.raises(UserError, match=rf"--max-new-tokens={fits + 1} after a {prompt_tokens}-token prompt needs 13 "
                                        rf"positions, and this model has 12 learned positions .*at most {fits}$"):
        generate_text(model, tokenizer, "The for statement", max_new_tokens=fits + 1, temperature=0)
    with pytest.raises(UserError, match="the prompt is 1[2-9] tokens, and this model has 12 learned positions"):
        generate_text(model, tokenizer, "The for statement " * 5, max_new_tokens=1)
    text = generate_text(model, tokenizer, "The for statement", max_new_tokens=fits, temperature=0)
    assert text.startswith("The for statement")


def test_sampling_is_seeded(run_dir):
    from lightning_cggr.generate import generate_text

    model, tokenizer = load_trained(run_dir)
    first, again = (generate_text(model, tokenizer, "Lists", max_new_tokens=8, seed=1) for _ in range(2))
    assert first == again and first.startswith("Lists")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_new_tokens": 0}, "max-new-tokens=0"), ({"temperature": -1.0}, "temperature=-1.0: must be"),
     ({"temperature": float("nan")}, "temperature=nan: must be a finite"), ({"top_p": 0.0}, "top-p=0.0: must be"),
     ({"top_p": float("inf")}, "top-p=inf: must be"), ({"chat": True}, "no chat template")],
)
def test_generate_rejects_bad_settings(run_dir, kwargs, message):
    from lightning_cggr.generate import generate_text

    model, tokenizer = load_trained(run_dir)
    with pytest.raises(UserError, match=message):
        generate_text(model, tokenizer, "Lists", **kwargs)


@pytest.mark.parametrize("option, value", [("--temperature", "nan"), ("--top-p", "2"), ("--max-new-tokens", "0"),
                                           ("--device", "nonsense"), ("--device", "meta")])
def test_generate_command_checks_its_settings_before_loading_anything(option, value, tmp_path, capsys):
    """The source does not exist: the one error line is about the setting, so nothing was loaded first."""
    from lightning_cggr import generate as generate_cmd

    with pytest.raises(SystemExit) as info:
        generate_cmd.main([str(tmp_path / "missing"), "Lists", option, value])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {option}=") and "missing" not in line


def test_truncated_checkpoint_is_a_checkpoint_error(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="is not a complete torch checkpoint"):
        load_trained(run)


def test_checkpoint_of_another_model_is_a_checkpoint_error(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "model" / "config.json").read_text())
    config["hidden_size"] *= 2
    (run / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match the model of"):
        load_trained(run)


def test_errors_name_the_fix(run_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; give a run folder"):
        load_trained(tmp_path / "nowhere")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UserError, match="is not empty; choose a new folder or pass --overwrite"):
        export(run_dir, tmp_path / "full")
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="has no checkpoints/last.ckpt"):
        load_trained(tmp_path / "empty-run")
    with pytest.raises(CheckpointError, match="holds no model weights"):
        torch.save({"state_dict": {"other.w": torch.ones(1)}}, tmp_path / "w.ckpt")
        read_model_state(tmp_path / "w.ckpt")



def test_an_export_stopped_on_the_way_leaves_nothing_that_looks_like_a_model(run_dir, tmp_path, monkeypatch):
    """Ctrl-C or a full disk after the weights but before the tokenizer: no folder at all (it used to
    hold weights and config without a tokenizer, which from_pretrained half-loads), and no temporary
    folder either. A complete export lands with the permissions of any new folder."""
    import os

    from transformers import PreTrainedTokenizerBase

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
        with pytest.raises(OSError, match="No space left"):
            export(run_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    export(run_dir, tmp_path / "out")
    assert {p.name for p in tmp_path.iterdir()} == {"out"}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_overwrite_replaces_the_exports_files_and_keeps_the_others(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    export(run_dir, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["vocab_size"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "target").mkdir()  # a link to an empty folder: the export lands where it points
    (tmp_path / "link").symlink_to(tmp_path / "target")
    export(run_dir, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "config.json").is_file()


@pytest.mark.parametrize("reply, noted", [("", True), ("  \n", True), ("A list holds items.", False)])
def test_an_empty_chat_reply_is_said_to_be_empty(monkeypatch, capsys, reply, noted):
    """A chat model whose first token ends its turn replied with an empty line and exit 0, which read
    as a failure of the command; a note on stderr now says what happened."""
    from lightning_cggr import generate as generate_cmd

    monkeypatch.setattr(generate_cmd, "_run", lambda args: reply)
    generate_cmd.main(["some-model", "What is a list?"])
    out, err = capsys.readouterr()
    assert out == reply + "\n"
    assert ("the model's reply is empty" in err) == noted


def test_a_checkpoint_of_a_users_own_trainer_gets_the_recipe_that_exports_it(tmp_path):
    """A checkpoint written by the user's own Trainer has no run folder; the error gives the recipe,
    and the recipe gives a folder transformers loads with the trained weights."""
    import lightning as L
    from conftest import make_batch, make_tiny_model
    from transformers import AutoModelForCausalLM

    from lightning_cggr import CGGRModule

    module = CGGRModule(make_tiny_model("llama"), {"warmup_steps": 0, "min_tokens_ratio": 0.5})
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader([make_batch(4, 12)] * 2, batch_size=None))
    trainer.save_checkpoint(tmp_path / "mine.ckpt")
    with pytest.raises(CheckpointError, match=r"CGGRModule.load_from_checkpoint\(path, model=<the same architecture>\)"
                                              r"\.model\.save_pretrained\(folder\)"):
        load_trained(tmp_path / "mine.ckpt")
    CGGRModule.load_from_checkpoint(tmp_path / "mine.ckpt", model=make_tiny_model("llama", seed=5)
                                    ).model.save_pretrained(tmp_path / "folder")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "folder")
    for name, value in module.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name

def test_commands_export_and_generate(run_dir, tmp_path, capsys):
    """The command-line entries (processes: tests/test_readme.py's run block): export, sample from
    the folder; a mistake exits 2 with one line."""
    from lightning_cggr import export as export_cmd
    from lightning_cggr import generate as generate_cmd

    out = tmp_path / "hf"
    export_cmd.main([str(run_dir), str(out)])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    capsys.readouterr()
    generate_cmd.main([str(out), "The for statement", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.startswith("The for statement")
    with pytest.raises(SystemExit) as info:
        export_cmd.main([str(run_dir), str(out)])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out} is not empty; choose a new folder or pass --overwrite"]


def test_a_run_without_model_folder_exports_with_the_tokenizer_its_checkpoint_stores(tmp_path):
    """The BPE a run trained is stored in its checkpoints. Exporting a run folder that lacks model/
    (the tokenizer's other copy) once used a BPE trained again on the corpus: after the corpus
    changed, that one had other ids (here fewer tokens than the model's embedding)."""
    import shutil

    from lightning_cggr.data.text import train_bpe_tokenizer
    from lightning_cggr.rundir import read_checkpoint_meta

    corpus = []
    for i in range(4):
        corpus.append(tmp_path / f"doc{i}.txt")
        corpus[-1].write_text(" ".join(f"word{(i * 7 + j * j) % 40}" for j in range(300)) + "\n")
    out = tmp_path / "run"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*tiny_overrides(out, tmp_path / "cache"), "data.source=files",
                                          f"data.paths=[{','.join(map(str, corpus))}]", "data.vocab_size=300",
                                          "data.block_size=16", "data.val_fraction=0.3"])
    train(cfg)
    from omegaconf import OmegaConf

    (out / ".hydra").mkdir()
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml", resolve=True)
    shutil.rmtree(out / "model")
    stored = read_checkpoint_meta(out / "checkpoints" / "last.ckpt")["tokenizer"]
    assert stored is not None
    for path in corpus:
        path.write_text(path.read_text().replace("word1", "other"))
    retrained = train_bpe_tokenizer([p.read_text() for p in corpus[:3]], 300, str(tmp_path / "cache"))
    model, tokenizer = load_trained(out)
    assert tokenizer.backend_tokenizer.to_str() == stored != retrained.backend_tokenizer.to_str()
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings

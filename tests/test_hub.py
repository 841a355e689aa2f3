"""Hub checkpoints and datasets: local folders load, an unreachable hub fails fast and clearly."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lightning_cggr.models import hub
from lightning_cggr.errors import DataError, UserError
from lightning_cggr.models.hub import (
    HubUnreachableError,
    MissingExtraError,
    ModelNotFoundError,
    hub_offline_reason,
    load_hf_texts,
    load_pretrained,
)


@pytest.fixture
def local_checkpoint(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "hello", "world", "again"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path, model


def test_local_folder_loads_the_same_weights(local_checkpoint, monkeypatch):
    folder, reference = local_checkpoint
    monkeypatch.setattr(hub, "hub_offline_reason", lambda *a, **k: pytest.fail("no hub check for a folder"))
    model, tok = load_pretrained(folder, dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert tok("hello world")["input_ids"] == [2, 3]
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q.to(torch.bfloat16)), name


def test_offline_hub_name_fails_fast_naming_the_offline_model(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachableError, match=r"not in the Hugging Face cache.*model=smollm2_gguf"):
        load_pretrained("lightning-cggr-tests/no-such-model-anywhere")


def test_unresolvable_endpoint_counts_as_offline(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "ENDPOINT", "https://hub.lightning-cggr.invalid")
    reason = hub_offline_reason(timeout=5)
    assert reason is not None and "hub.lightning-cggr.invalid is unreachable" in reason


def test_folder_without_a_model_is_a_user_error_naming_the_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ModelNotFoundError, match=rf"model.name={tmp_path}: cannot load a causal LM") as info:
        load_pretrained(str(tmp_path))
    assert "\n" not in str(info.value)


def test_missing_local_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelNotFoundError, match="checkpoint folder not found"):
        load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="model=smollm2_gguf"):
        load_pretrained("weights.gguf")


def test_bad_dtype_is_rejected():
    with pytest.raises(ValueError, match="unknown dtype"):
        load_pretrained("anything", dtype="float33")


def test_hf_texts_without_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install -e \.\[hf\]"):
        load_hf_texts("wikitext", "wikitext-2-raw-v1")


def test_hf_texts_offline_fails_before_touching_datasets(monkeypatch):
    import huggingface_hub.constants as hc

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: pytest.fail("load_dataset must not run with the hub offline")
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_offline_reason", lambda *a, **k: "test: unreachable")
    with pytest.raises(HubUnreachableError, match=r"'wikitext'.*HF_HUB_OFFLINE=1.*data.source=files.*data=pydoc"):
        load_hf_texts("wikitext", "wikitext-2-raw-v1")


def test_hf_texts_returns_the_non_blank_column(monkeypatch):
    class FakeDataset:
        column_names = ["text"]

        def __getitem__(self, key):
            assert key == "text"
            return [" = Title = \n", "", "  \n", "A paragraph.\n"]

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: calls.append((a, k)) or FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(hub, "hub_offline_reason", lambda *a, **k: None)
    assert load_hf_texts("wikitext", "wikitext-2-raw-v1", split="validation") == [" = Title = \n", "A paragraph.\n"]
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "validation"})]
    with pytest.raises(DataError, match="no column 'body'"):
        load_hf_texts("wikitext", text_field="body")


# ---- local datasets, read by the real `datasets` package (the test extra installs it) ------------

TEXTS = ["the router scores every token " * 8, "", "a second document about gradients " * 8, "  \n", "third one " * 9]


def _non_blank(texts):
    return [t for t in texts if t.strip()]


def test_a_folder_saved_with_save_to_disk_reads_its_split(tmp_path):
    import datasets

    whole = datasets.Dataset.from_dict({"text": TEXTS, "other": list(range(len(TEXTS)))})
    datasets.DatasetDict({"train": whole, "validation": whole.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    whole.save_to_disk(str(tmp_path / "single"))
    assert load_hf_texts(str(tmp_path / "dict")) == _non_blank(TEXTS)
    assert load_hf_texts(str(tmp_path / "dict"), split="validation") == _non_blank(TEXTS[:2])
    assert load_hf_texts(str(tmp_path / "single")) == _non_blank(TEXTS)
    with pytest.raises(DataError, match=r"has no split 'test'; its splits: train, validation"):
        load_hf_texts(str(tmp_path / "dict"), split="test")
    with pytest.raises(DataError, match=r"single Dataset, without splits, so data.hf_split='validation' names nothing"):
        load_hf_texts(str(tmp_path / "single"), split="validation")
    with pytest.raises(DataError, match="no column 'body'; its columns"):
        load_hf_texts(str(tmp_path / "dict"), text_field="body")


def test_a_folder_of_data_files_and_the_mistakes_around_it(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).to_parquet(str(tmp_path / "parquet" / "part.parquet"))
    assert load_hf_texts(str(tmp_path / "parquet")) == _non_blank(TEXTS)
    with pytest.raises(DataError, match=r"cannot load dataset .*data.hf_split=validation.*Unknown split"):
        load_hf_texts(str(tmp_path / "parquet"), split="validation")
    with pytest.raises(DataError, match=r"data.hf_name=\./no-such-folder: no such folder"):
        load_hf_texts("./no-such-folder")

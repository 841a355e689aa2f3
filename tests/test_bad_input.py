"""Bad input, each case: a clear error before training starts, or a defined behaviour in training.

Config mistakes raise one ``ConfigError`` (one line for one problem) from ``parse_config``, before
any model or tokenizer is built; the CLI prints it and exits 2 without a traceback.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from lightning_cggr.config import CGGRConfig, ConfigError, LossConfig, RouterConfig, parse_config
from lightning_cggr.errors import DataError
from lightning_cggr.data.text import pack_documents, train_bpe_tokenizer
from lightning_cggr.step import CGGRStep
from lightning_cggr.routing.selection import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent


def config_error(**groups) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(groups)
    return str(info.value)


# ---- config mistakes: one clear line before anything is built ------------------------------------
@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.5, "half", True])
def test_ratio_out_of_range(ratio):
    msg = config_error(cggr={"min_tokens_ratio": ratio})
    assert msg.startswith("invalid configuration: cggr.min_tokens_ratio=") and "\n" not in msg


def test_ratio_zero_on_the_command_line_is_one_line_and_nonzero_exit(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_cggr.train", "cggr.min_tokens_ratio=0", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: invalid configuration: cggr.min_tokens_ratio=0: must be in (0, 1]"]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "groups, needle",
    [
        ({"cggr": {"scoring": "entropyy"}}, "cggr.scoring='entropyy'"),
        ({"cggr": {"selection": {"scope": "global"}}}, "cggr.selection.scope='global'"),
        ({"model": {"arch": "mamba"}}, "model.arch='mamba'"),
        ({"cggr": {"router": {"num_layers": 5}}, "model": {"num_layers": 4}}, "the model has only 4 layers"),
        ({"cggr": {"router": {"num_layers": 0}}}, "cggr.router.num_layers=0"),
        ({"cggr": {"ratio": 0.5}}, "cggr.ratio: unknown key"),
    ],
)
def test_unknown_names_and_impossible_values(groups, needle):
    msg = config_error(**groups)
    assert needle in msg and "\n" not in msg


def test_missing_data_file(tmp_path):
    missing = tmp_path / "nope.txt"
    msg = config_error(data={"source": "files", "paths": [str(missing)]})
    assert msg == f"invalid configuration: data.paths: {missing} does not exist or is not a file"


def test_empty_data_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    msg = config_error(data={"source": "files", "paths": [str(empty)]})
    assert msg == f"invalid configuration: data.paths: {empty} is empty; give files with text in them"


@pytest.mark.parametrize(
    "content, needle",
    [
        # binary files are told by a NUL byte, wherever their first byte that is not UTF-8 lies
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "is binary data, not text (a NUL byte at line 3, byte offset 8)"),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(range(200, 256)), "is binary data, not text (a NUL byte at line 1, "
         "byte offset 7)"),
        (b"ok\nok\n\x00\x00\x00", "is binary data, not text (a NUL byte at line 3, byte offset 6)"),
        (bytes(range(256)), "is binary data, not text (a NUL byte at line 1, byte offset 0)"),
        ("line one\nna\u00efve\n".encode("cp1252"), "is not UTF-8 text (byte 0xef at line 2, byte offset 11)"),
        ("na\u00efve text\n".encode("utf-16"), "is UTF-16 text (by its byte-order mark)"),
        ("na\u00efve text\n".encode("utf-32"), "is UTF-32 text (by its byte-order mark)"),
    ],
    ids=["png", "elf", "nul-bytes", "all-bytes", "cp1252", "utf-16", "utf-32"],
)
def test_non_text_data_file_is_named_before_anything_is_built(tmp_path, content, needle):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    msg = config_error(data={"source": "files", "paths": str(path)})  # a string: one file
    convert = {"UTF-8 text (": "LATIN1", "UTF-16": "UTF-16", "UTF-32": "UTF-32"}
    source = next((enc for key, enc in convert.items() if key in needle), None)
    assert msg == f"invalid configuration: data.paths: {path} {needle}; give UTF-8 text files" + (
        f" (convert one with e.g. iconv -f {source} -t UTF-8)" if source else ""
    )
    if source in ("UTF-16", "UTF-32"):  # and the conversion it names gives a file that is read
        path.write_bytes(content.decode(source.lower()).encode("utf-8"))
        assert parse_config({"data": {"source": "files", "paths": str(path)}}).data.paths == [str(path)]


def test_data_paths_as_a_string_is_one_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("some text\n\nmore text\n")
    run = parse_config({"data": {"source": "files", "paths": str(path)}})
    assert run.data.paths == [str(path)]


def test_paths_of_the_wrong_type_are_a_config_error():
    msg = config_error(data={"source": "files", "paths": [3, None]})
    assert "data.paths=[3, None]: must be a file path or a list of them" in msg


def test_chat_data_with_the_tiny_model_names_the_model_to_use():
    msg = config_error(data={"source": "chat", "tokenizer": "model"})
    assert msg.count("\n") == 0 and "model=smollm2_gguf" in msg and "use data.tokenizer=bpe" not in msg


def test_malformed_chat_file_is_found_by_validation(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n\n{"messages": [{"role": "user"}]}\n')
    msg = config_error(model={"source": "smollm2_gguf"}, data={"source": "chat", "paths": [str(path)]})
    assert msg == f'invalid configuration: data.paths: {path}:3: message 0 needs a string "content"'


def test_missing_checkpoint_is_a_config_error(tmp_path):
    from hydra import compose, initialize_config_dir

    from lightning_cggr.train import CONF_DIR, train

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", f"ckpt_path={tmp_path / 'no.ckpt'}"])
    with pytest.raises(ConfigError, match="ckpt_path=.*no such checkpoint"):
        train(cfg)


# ---- what only a built model can tell ------------------------------------------------------------
def test_router_layers_beyond_the_model_fail_at_construction():
    with pytest.raises(ValueError, match=r"outside 1\.\.3"):
        CGGRStep(make_tiny_model("llama", num_layers=3), CGGRConfig(router=RouterConfig(num_layers=4)))


def test_router_with_all_layers_is_defined_behaviour(batch):
    """k == model layers is allowed: the router is then the whole model (scores from a full pass)."""
    model = make_tiny_model("llama", num_layers=3)
    module = CGGRStep(model, CGGRConfig(router=RouterConfig(num_layers=3), warmup_steps=0))
    loss = module(batch, 0).loss
    assert torch.isfinite(loss)


def test_unknown_architecture_is_a_clear_error():
    class NotAnLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="not a Hugging Face"):
        CGGRStep(NotAnLM())


# ---- defined behaviour during training -----------------------------------------------------------
@pytest.mark.parametrize("active", [True, False], ids=["cggr", "warmup"])
def test_batch_whose_labels_are_all_ignored(active):
    """Loss 0 with a graph, zero gradients, no NaN; the step's correction stays finite."""
    module = CGGRStep(make_tiny_model("llama"), CGGRConfig(warmup_steps=0 if active else 100), LossConfig("torch"))
    ids = torch.randint(1, 97, (2, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX)}
    loss = module(batch, 0).loss
    assert loss.item() == 0.0
    loss.backward()
    module.correct_gradients(module.model.parameters(), accumulate=1)
    grads = [p.grad for p in module.model.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_sequences_shorter_than_two_tokens_train_nothing_and_stay_finite():
    """A 1-token (or empty) row has no next-token target: it contributes no loss, the others do."""
    module = CGGRStep(make_tiny_model("llama"), CGGRConfig(warmup_steps=0), LossConfig("torch"))
    ids = torch.randint(1, 97, (3, 8))
    mask = torch.ones_like(ids)
    mask[0, 1:] = 0  # one real token
    mask[1, :] = 0  # none
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    loss = module(batch, 0).loss
    assert torch.isfinite(loss) and loss.item() > 0


@pytest.mark.parametrize("scoring", ["combined", "entropy", "margin", "loss"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_non_finite_router_states_are_never_ranked_hard(monkeypatch, scoring, dtype):
    module = CGGRStep(
        make_tiny_model("llama"), CGGRConfig(scoring=scoring, warmup_steps=0, router=RouterConfig(num_layers=1)),
        LossConfig("torch"),
    )
    ids = torch.randint(1, 97, (2, 12))
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    real = module.router.hidden_states

    def overflowing(input_ids, attention_mask=None):  # what an fp16/bf16 overflow in the blocks gives
        h = real(input_ids, attention_mask).to(dtype)
        h[0, 2, 0] = float("inf")
        h[0, 5, :] = float("nan")
        h[1, 7, 3] = float("-inf")
        return h

    monkeypatch.setattr(module.router, "hidden_states", overflowing)
    score = module.score_and_stats(ids, None, targets)[0]
    bad = torch.zeros_like(targets, dtype=torch.bool)
    bad[0, 2] = bad[0, 5] = bad[1, 7] = True
    good = (targets != IGNORE_INDEX) & ~bad
    assert torch.isfinite(score[good]).all(), "one bad token must not poison the others' scores"
    assert (score[bad] == float("-inf")).all()

    from lightning_cggr.routing.selection import select

    keep = select(score, targets != IGNORE_INDEX, 0.5, "sequence").keep
    assert not (keep & bad).any()
    assert keep.sum() == 2 * math.ceil(0.5 * 11)


# ---- tokenizers --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["the router scores every token of the batch " * 20, "a second document about gradients " * 20]
    return train_bpe_tokenizer(texts, vocab_size=300, cache=str(tmp_path_factory.mktemp("tok")))


def test_tokenizer_without_pad_token_packs_with_eos_only(tokenizer):
    """Packed blocks never pad, so no pad token is needed: documents are joined by EOS."""
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    docs = ["", "a", "b", "the router scores every token " * 5]  # empty and 1-token documents
    blocks = pack_documents(docs, tokenizer, block_size=8)
    eos = tokenizer.eos_token_id
    flat = blocks.flatten().tolist()
    assert flat[0] == eos and flat[2] == eos  # "" -> EOS, "a" -> a EOS
    assert blocks.shape[1] == 8


def test_chat_padding_without_pad_token_uses_eos(tokenizer):
    from lightning_cggr.data.chat import pad_token_id_of

    tokenizer.pad_token = None
    assert pad_token_id_of(tokenizer) == tokenizer.eos_token_id  # pads are masked: never attended, never labelled


def test_corpus_shorter_than_one_block_is_a_clear_error(tokenizer):
    with pytest.raises(DataError, match="the training split has 2 tokens, fewer than one block of data.block_size=64"):
        pack_documents(["a"], tokenizer, block_size=64)
    with pytest.raises(DataError, match="or raise data.val_fraction"):
        pack_documents(["a"], tokenizer, block_size=64, split="validation")


# ---- one text file: documents by paragraphs, else by blocks --------------------------------------
def test_a_single_file_is_split_into_paragraph_documents(tmp_path):
    from lightning_cggr.data.text import file_documents

    path = tmp_path / "book.txt"
    path.write_text("First paragraph,\nstill the first.\n\n\nSecond one.\n  \nThird.\n")
    docs = list(file_documents(str(path)).values())
    assert docs == ["First paragraph,\nstill the first.", "Second one.", "Third.\n"]


def test_a_single_file_without_blank_lines_is_cut_into_blocks_at_whitespace(tmp_path):
    from lightning_cggr.data.text import DOCUMENT_CHARS, file_documents

    words = [f"w{i:04d}" for i in range(1500)]  # 5 characters + a space each: 9000 characters
    path = tmp_path / "one-line.txt"
    path.write_text(" ".join(words))
    docs = list(file_documents([str(path)]).values())
    assert "".join(docs) == " ".join(words)  # nothing lost or added
    assert len(docs) == -(-9000 // DOCUMENT_CHARS) and all(len(d) <= DOCUMENT_CHARS for d in docs)
    assert all(d.endswith(" ") for d in docs[:-1])  # never a word cut in two


def test_a_file_saved_on_windows_reads_as_the_same_documents(tmp_path):
    """A byte-order mark and CRLF (or CR) line ends, as Windows editors save text: the same
    documents as the LF file, so no stray U+FEFF or carriage-return tokens. The reference is the
    documents of the plain file; a BOM-only file is empty, and error positions stay the file's own."""
    from lightning_cggr.data.files import read_text_file
    from lightning_cggr.data.text import file_documents

    text = "First paragraph,\nstill the first.\n\n\nSecond one.\n  \nThird.\n"
    (tmp_path / "unix.txt").write_text(text)
    (tmp_path / "windows.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    (tmp_path / "mac.txt").write_bytes(text.replace("\n", "\r").encode())
    want = list(file_documents(str(tmp_path / "unix.txt")).values())
    assert want == ["First paragraph,\nstill the first.", "Second one.", "Third.\n"]
    for name in ("windows.txt", "mac.txt"):
        assert list(file_documents(str(tmp_path / name)).values()) == want, name
    (tmp_path / "bom-only.txt").write_bytes(b"\xef\xbb\xbf \r\n")
    with pytest.raises(DataError, match="bom-only.txt is empty"):
        read_text_file(tmp_path / "bom-only.txt")
    (tmp_path / "latin.txt").write_bytes(b"\xef\xbb\xbfok\r\ncaf\xe9\r\n")
    with pytest.raises(DataError, match=r"byte 0xe9 at line 2, byte offset 10\)"):
        read_text_file(tmp_path / "latin.txt")


def test_compressed_data_files_read_as_their_text(tmp_path):
    """corpus.txt.gz (or .bz2, .xz; told by their first bytes, whatever the name) was "not UTF-8
    text (byte 0x8b ...)" with advice to convert the encoding. The reference is the plain file's
    documents and conversations; a cut archive and a zstd file are named."""
    import bz2
    import gzip
    import json
    import lzma

    from lightning_cggr.data import data_file_problems
    from lightning_cggr.data.files import read_chat_jsonl
    from lightning_cggr.data.text import file_documents

    text = "First paragraph,\nstill the first.\n\nSecond one.\n"
    chat = "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                            {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(3))
    (tmp_path / "plain.txt").write_text(text)
    (tmp_path / "plain.jsonl").write_text(chat)
    packs = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}
    for suffix, pack in packs.items():
        (tmp_path / f"c.txt.{suffix}").write_bytes(pack(text.encode()))
        (tmp_path / f"c.jsonl.{suffix}").write_bytes(pack(chat.encode()))
    (tmp_path / "no-suffix.txt").write_bytes(gzip.compress(text.encode()))
    want = list(file_documents(str(tmp_path / "plain.txt")).values())
    for name in [f"c.txt.{s}" for s in packs] + ["no-suffix.txt"]:
        assert list(file_documents(str(tmp_path / name)).values()) == want, name
        assert data_file_problems("files", [str(tmp_path / name)]) == []
    for suffix in packs:
        assert read_chat_jsonl(tmp_path / f"c.jsonl.{suffix}") == read_chat_jsonl(tmp_path / "plain.jsonl")
        assert data_file_problems("chat", [str(tmp_path / f"c.jsonl.{suffix}")]) == []
    whole = (tmp_path / "c.txt.gz").read_bytes()
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "cut.jsonl.xz").write_bytes((tmp_path / "c.jsonl.xz").read_bytes()[:-10])
    (tmp_path / "z.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 20)
    assert data_file_problems("files", [str(tmp_path / "cut.txt.gz")])[0].endswith(
        "cut.txt.gz cannot be decompressed (Compressed file ended before the end-of-stream marker was reached); "
        "give the file whole, or decompressed")
    assert "cut.jsonl.xz cannot be decompressed" in data_file_problems("chat", [str(tmp_path / "cut.jsonl.xz")])[0]
    assert "z.txt.zst is zstd-compressed, which this reader cannot open; decompress it first (zstd -d z.txt.zst)" in \
        data_file_problems("files", [str(tmp_path / "z.txt.zst")])[0]


def test_a_folder_or_a_pattern_names_its_files(tmp_path):
    """data.paths=corpus/ (or corpus/**/*.txt) was "does not exist or is not a file". A folder is its
    files at any depth, sorted, hidden ones skipped; a pattern is the files it matches, sorted. The
    reference is the documents of the same files listed by hand."""
    from lightning_cggr.data import data_file_problems
    from lightning_cggr.data.files import expand_paths
    from lightning_cggr.data.text import file_documents

    corpus = tmp_path / "corpus"
    (corpus / "part2").mkdir(parents=True)
    (corpus / ".git").mkdir()
    for name, text in (("b.txt", "bee\n"), ("a.txt", "ay\n"), ("part2/c.txt", "sea\n"), ("part2/d.md", "dee\n"),
                       (".hidden.txt", "no\n"), (".git/config", "no\n")):
        (corpus / name).write_text(text)
    by_hand = [str(corpus / n) for n in ("a.txt", "b.txt", "part2/c.txt", "part2/d.md")]
    assert expand_paths([corpus]) == by_hand
    assert file_documents(str(corpus)) == file_documents(by_hand)
    assert expand_paths([f"{corpus}/**/*.txt"]) == [by_hand[0], by_hand[1], by_hand[2]]
    assert expand_paths([str(corpus / "a.txt"), f"{corpus}/part2"]) == [by_hand[0], by_hand[2], by_hand[3]]
    (tmp_path / "empty").mkdir()
    assert data_file_problems("files", [str(tmp_path / "empty")]) == [
        f"data.paths: {tmp_path / 'empty'} is a folder without files; give a folder that holds the data files, or the files"]
    (tmp_path / "dots" / ".cache").mkdir(parents=True)  # only hidden files: said, since they were there
    (tmp_path / "dots" / ".notes.txt").write_text("no\n")
    (tmp_path / "dots" / ".cache" / "x.txt").write_text("no\n")
    assert data_file_problems("files", [str(tmp_path / "dots")]) == [
        f"data.paths: {tmp_path / 'dots'} is a folder without files (2 hidden files, under names starting with "
        "'.', skipped: name one to read it); give a folder that holds the data files, or the files"]
    assert data_file_problems("files", [f"{corpus}/*.rst"]) == [f"data.paths: {corpus}/*.rst matches no file"]
    (corpus / "part2" / "blob.bin").write_bytes(b"\x00\xff")  # a bad file inside a folder is named
    assert data_file_problems("files", [str(corpus)]) == [
        f"data.paths: {corpus / 'part2' / 'blob.bin'} is binary data, not text (a NUL byte at line 1, byte "
        "offset 0); give UTF-8 text files"]


def test_two_files_stay_two_documents(tmp_path):
    from lightning_cggr.data.text import file_documents

    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("one\n\ntwo\n")
    assert len(file_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])) == 2


@pytest.mark.slow
def test_one_text_file_given_as_a_string_trains(tmp_path):
    """Defect: a single file refused ("needs at least two documents"), a string read per character."""
    from hydra import compose, initialize_config_dir

    from lightning_cggr.train import CONF_DIR, train

    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n\n".join(f"Note {i}: the router keeps the hardest tokens of batch {i}." for i in range(300)))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            f"output_dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache", "data.source=files",
            f"data.paths={corpus}", "data.vocab_size=300", "data.block_size=32", "data.batch_size=4",
            "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ])
    metrics = train(cfg)
    assert metrics["val/loss"] == metrics["val/loss"]  # trained and validated: a number, not NaN


@pytest.mark.parametrize("loss, message", [
    ({"label_smoothing": 1.0}, "loss.label_smoothing=1.0: must be in [0, 1) (0: off)"),
    ({"label_smoothing": -0.1}, "loss.label_smoothing=-0.1: must be in [0, 1)"),
    ({"label_smoothing": "some"}, "loss.label_smoothing='some': must be in [0, 1)"),
    ({"z_loss": -1e-4}, "loss.z_loss=-0.0001: must be a finite number >= 0"),
    ({"z_loss": float("inf")}, "loss.z_loss=inf: must be a finite number >= 0"),
    ({"impl": "torch_lce", "label_smoothing": 0.1}, "loss.label_smoothing=0.1: loss.impl=torch_lce (torch's "
                                                    "F.linear_cross_entropy) has no label smoothing"),
    ({"impl": "torch_lce", "z_loss": 1e-4}, "loss.z_loss=0.0001: loss.impl=torch_lce (torch's "
                                            "F.linear_cross_entropy) has no z-loss"),
])
def test_label_smoothing_and_z_loss_values(loss, message):
    assert message in config_error(loss=loss)


def test_label_smoothing_and_z_loss_within_range_are_accepted():
    run = parse_config({"loss": {"label_smoothing": 0.1, "z_loss": 1e-4}})
    assert (run.loss.label_smoothing, run.loss.z_loss) == (0.1, 1e-4)
    assert parse_config({"loss": {"impl": "torch_lce"}}).loss.label_smoothing == 0.0  # off: torch_lce is fine


# ---- the same checks from Python: CGGRModule / CGGRStep built with the dataclasses ----------------
@pytest.mark.parametrize("group, values", [
    ("cggr", {"min_tokens_ratio": 2.0}),
    ("cggr", {"scoring": "entropyy"}),
    ("cggr", {"warmup_steps": -1}),
    ("cggr", {"enabled": "yes"}),
    ("cggr", {"selection": {"strategy": "topk", "p_min": 0.2}}),
    ("cggr", {"ratio_schedule": {"kind": "constant", "steps": 5}}),
    ("loss", {"impl": "fused"}),
    ("loss", {"chunk_size": 0}),
    ("loss", {"impl": "torch_lce", "z_loss": 1e-4}),
    ("perf", {"compile_scope": "model"}),
    ("perf", {"activation_checkpointing": -1}),
    ("optim", {"lr": 0}),
    ("optim", {"betas": (0.9,)}),
    ("optim", {"min_lr_ratio": 1.5}),
])
def test_the_python_api_refuses_what_the_hydra_job_refuses_with_the_same_line(group, values):
    """A config built in Python (README's "From Python") is checked when the module is built, by the
    same rules and with the same message as the Hydra job's parse_config of the same values."""
    from lightning_cggr import config as cfg
    from lightning_cggr.module import CGGRModule

    expected = config_error(**{group: values})
    classes = {"cggr": cfg.CGGRConfig, "loss": cfg.LossConfig, "perf": cfg.PerfConfig, "optim": cfg.OptimConfig}
    built = cfg.parse_config({})  # every default, then this group from the same plain values
    problems: list[str] = []
    value = cfg._build(classes[group], values, group, problems)
    assert problems == []
    setattr(built, group, value)
    with pytest.raises(ConfigError) as info:
        CGGRModule(make_tiny_model("llama"), built.cggr, built.loss, built.optim, perf=built.perf)
    assert str(info.value) == expected


def test_the_python_api_takes_each_config_as_a_mapping_of_the_hydra_jobs_settings():
    """CGGRModule(model, {"min_tokens_ratio": 0.5}, ...): each group as the plain mapping the Hydra job
    composes builds the same dataclasses as parse_config does; a misspelt key and a value that is no
    group get the job's one-line errors."""
    from lightning_cggr.module import CGGRModule

    groups = {"cggr": {"min_tokens_ratio": 0.5, "router": {"num_layers": 1}}, "loss": {"impl": "naive"},
              "optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "perf": {"activation_checkpointing": True}}
    module = CGGRModule(make_tiny_model("llama", num_layers=2), **groups)
    expected = parse_config(groups)
    assert (module.step.cggr, module.step.loss_cfg, module.optim_cfg, module.step.perf.activation_checkpointing) == (
        expected.cggr, expected.loss, expected.optim, True)
    with pytest.raises(ConfigError, match=r"cggr.min_token_ratio: unknown key; did you mean cggr.min_tokens_ratio\?"):
        CGGRModule(make_tiny_model("llama", num_layers=2), {"min_token_ratio": 0.5})
    with pytest.raises(ConfigError, match=r"loss: expected a lightning_cggr.LossConfig or a mapping of its settings, "
                                          r"not a str \('naive'\)"):
        CGGRModule(make_tiny_model("llama", num_layers=2), loss="naive")
    # a dataclass holding a nested group as a mapping (an AttributeError deep in the checks before)
    given = CGGRConfig(min_tokens_ratio=0.5, router={"num_layers": 1})
    module = CGGRModule(make_tiny_model("llama", num_layers=2), given, **{k: groups[k] for k in ("loss", "optim", "perf")})
    assert module.step.cggr == expected.cggr and isinstance(given.router, dict)  # the caller's left as given
    with pytest.raises(ConfigError, match=r"cggr.selection.unti: unknown key; did you mean cggr.selection.unit\?"):
        CGGRModule(make_tiny_model("llama", num_layers=2), CGGRConfig(selection={"unti": "sequence"}))
    with pytest.raises(ConfigError, match=r"cggr.router: expected a lightning_cggr.RouterConfig or a mapping"):
        CGGRModule(make_tiny_model("llama", num_layers=2), CGGRConfig(router=1))


def test_excess_loss_from_python_takes_the_reference_model_in_place_of_a_path():
    """README's From Python: ``CGGRModule(model, CGGRConfig(scoring="excess_loss"), reference=ref)``
    needs no ``cggr.router.reference`` path; without either it is refused, naming the setting."""
    from lightning_cggr.module import CGGRModule

    cggr = CGGRConfig(scoring="excess_loss", warmup_steps=0, router=RouterConfig(num_layers=1))
    module = CGGRModule(make_tiny_model("llama"), cggr, reference=make_tiny_model("llama", num_layers=1, seed=3))
    assert module.step.reference is not None
    with pytest.raises(ConfigError, match="needs cggr.router.reference"):
        CGGRModule(make_tiny_model("llama"), cggr)


def test_numpy_numbers_from_a_python_sweep_are_numbers():
    """``CGGRConfig(warmup_steps=np.int64(3), min_tokens_ratio=np.float64(0.5))`` (values from a numpy
    grid) is what the same Python numbers are: accepted, and routing at that ratio."""
    import numpy as np

    from lightning_cggr.module import CGGRModule

    cggr = CGGRConfig(warmup_steps=np.int64(0), min_tokens_ratio=np.float64(0.5), router=RouterConfig(num_layers=1))
    module = CGGRModule(make_tiny_model("llama"), cggr)
    assert module.step.ratio_in_force(0) == 0.5
    with pytest.raises(ConfigError, match="cggr.min_tokens_ratio=1.5"):
        CGGRModule(make_tiny_model("llama"), CGGRConfig(min_tokens_ratio=np.float64(1.5)))


# ---- batches a user's own loader makes: checked on the host before they move to the device -------
def _rows(vocab: int, **change):
    """Four dict rows of 9 tokens below ``vocab``; ``change`` maps a key to a function of the row."""
    tokens = torch.arange(36).view(4, 9) % vocab
    rows = [{"input_ids": t, "labels": t.clone()} for t in tokens]
    for key, fn in change.items():
        for row in rows:
            row[key] = fn(row)
    return rows


def _set(key, position, value):
    return lambda row: row[key].clone().index_fill_(0, torch.tensor([position]), value)


BAD_BATCHES = {  # case: (rows of a model with a 64-row vocabulary, the phrase the error must hold)
    "label-past-the-head": (_rows(64, labels=_set("labels", 3, 64)), "labels hold 64, past the LM head's 64 rows"),
    "negative-label": (_rows(64, labels=_set("labels", 3, -1)), "labels hold -1; only -100 marks a position"),
    "id-past-the-embeddings": (_rows(64, input_ids=_set("input_ids", 0, 70)),
                               "input_ids hold 70, outside the model's embedding table of 64 rows"),
    "negative-id": (_rows(64, input_ids=_set("input_ids", 0, -3)), "input_ids hold -3"),
    "no-labels": ([{"input_ids": r["input_ids"]} for r in _rows(64)], "the batch has no labels (its keys: input_ids)"),
    "float-labels": (_rows(64, labels=lambda r: r["labels"].float()), "labels must be int64 or int32, got torch.float32"),
    "pre-shifted-labels": (_rows(64, labels=lambda r: r["labels"][1:]),
                           "labels has shape (4, 8), input_ids (4, 9): they must match"),
    "mask-of-another-length": (_rows(64, attention_mask=lambda r: torch.ones(5, dtype=torch.long)),
                               "attention_mask has shape (4, 5)"),
    "tuples": ([(r["input_ids"], r["labels"]) for r in _rows(64)], "a batch must be a dict with input_ids and labels"),
    "packed-with-position-ids": (_rows(64, position_ids=lambda r: torch.arange(9) % 4),  # was ignored
                                 "the batch has position_ids, which the step does not give the model"),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_a_bad_batch_from_the_users_loader_is_named_before_any_step(case):
    """Before the check these ended in an index error deep in the loss or the embedding (CPU), a NaN
    loss reported as a divergence (Triton on a GPU) or a KeyError."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_cggr import CGGRModule

    rows, phrase = BAD_BATCHES[case]
    model = make_tiny_model(vocab_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(DataError, match="^bad batch: ") as info:
        trainer.fit(CGGRModule(model, {"warmup_steps": 0}), DataLoader(rows, batch_size=4))
    assert phrase in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step was taken


def test_the_batch_check_accepts_ignored_labels_and_a_mask_and_reads_no_device_tensor():
    from lightning_cggr.batches import batch_problems

    ids = torch.tensor([[5, 63, 0, 7]])
    good = {"input_ids": ids, "labels": torch.tensor([[-100, 63, 0, -100]]), "attention_mask": torch.ones_like(ids)}
    assert batch_problems(good, label_rows=64, embedding_rows=64) == []
    assert batch_problems({"input_ids": ids, "labels": torch.full_like(ids, -100)}, 64, 64) == []
    # values on another device are not read (a read would be a device sync in the step): meta
    # tensors have no values, so a read would raise
    meta = {"input_ids": ids.to("meta"), "labels": ids.to("meta")}
    assert batch_problems(meta, label_rows=4, embedding_rows=4) == []
    assert batch_problems({**meta, "labels": ids.float().to("meta")}, 4, 4) == [
        "labels must be int64 or int32, got torch.float32"]

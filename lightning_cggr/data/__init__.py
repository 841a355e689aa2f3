"""Where batches come from: text corpora packed into blocks, chat SFT, and a resumable loader.

- :mod:`.text`: the pydoc corpus (no download), local text files, Hugging Face datasets; a BPE
  trained on the corpus; fixed-length packed blocks;
- :mod:`.chat`: JSONL conversations through the model's chat template, assistant-only labels;
- :mod:`.files`: the data files read and checked (standard library only, so config validation
  reports a bad file before Lightning is imported) and the cache folder;
- :mod:`.resumable`: a seeded loader whose position in the epoch survives a checkpoint;
- :mod:`.evaluation`: validation loaders that count each example once on any number of ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import DataError
from .files import cache_dir, chat_file_problem, expand_paths, text_file_problem

if TYPE_CHECKING:
    import lightning as L

    from ..config import DataConfig

SOURCES = ("pydoc", "files", "chat", "hf")
"""``data.source`` choices."""
TOKENIZERS = ("auto", "bpe", "model")
"""``data.tokenizer`` choices."""

__all__ = ["SOURCES", "TOKENIZERS", "build_datamodule", "build_tokenizer", "cache_dir", "data_file_problems",
           "prepare_datamodule"]


def data_file_problems(source: str, paths: list[str]) -> list[str]:
    """Every problem of the data files of ``source`` (files: UTF-8 text; chat: JSONL conversations),
    one line each naming the file (and the line), found before any model or tokenizer is built."""
    check = chat_file_problem if source == "chat" else text_file_problem
    try:
        files = expand_paths(paths)
    except DataError as err:
        return [f"data.paths: {err}"]
    return [f"data.paths: {problem}" for problem in map(check, files) if problem]


def build_tokenizer(cfg: DataConfig, stored: str | None = None):
    """The BPE tokenizer trained on the training split of the configured corpus (data.tokenizer=bpe),
    or, resuming a run, the one it trained (``stored``: its JSON, from the checkpoint), whatever the
    corpus holds now: the weights learned that tokenizer's ids."""
    from .text import bpe_tokenizer_from_json, load_documents, split_documents, train_bpe_tokenizer

    if stored is not None:
        return bpe_tokenizer_from_json(stored)
    train, _ = split_documents(load_documents(cfg), cfg.val_fraction)
    return train_bpe_tokenizer(train, cfg.vocab_size, cfg.cache_dir)


def build_datamodule(cfg: DataConfig, tokenizer, seed: int = 0) -> L.LightningDataModule:
    """The data module for ``cfg.source``."""
    from .text import PackedTextDataModule, load_documents, split_documents

    if cfg.source in ("pydoc", "files", "hf"):
        train, val = split_documents(load_documents(cfg), cfg.val_fraction)
        return PackedTextDataModule(train, val, tokenizer, cfg, seed=seed)
    if cfg.source == "chat":  # chat SFT: assistant-only labels, right padding (lightning_cggr.data.chat)
        from .chat import ChatDataModule, sample_chat_path

        return ChatDataModule(
            expand_paths(cfg.paths) if cfg.paths else [sample_chat_path()],
            tokenizer,
            max_length=cfg.block_size,
            batch_size=cfg.batch_size,
            val_fraction=cfg.val_fraction,
            seed=seed,
            num_workers=cfg.num_workers,
        )
    raise ValueError(f"unknown data.source {cfg.source!r}")


def prepare_datamodule(cfg: DataConfig, tokenizer, seed: int = 0) -> L.LightningDataModule:
    """:func:`build_datamodule`, set up now (read, split, tokenized) and checked to fill one training
    batch, so that a corpus too small for ``data.block_size`` or ``data.batch_size`` is reported
    before the Trainer starts (and, with a tokenizer of its own, before the model loads), not at
    the first batch. The Trainer's own ``setup`` call then finds it done. Several ranks are checked
    again when the training loader is built."""
    from .resumable import check_fills_batch

    datamodule = build_datamodule(cfg, tokenizer, seed=seed)
    datamodule.setup("fit")
    check_fills_batch(len(datamodule.train_set), cfg.batch_size)
    return datamodule

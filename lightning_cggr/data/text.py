"""Plain-text corpora, the BPE tokenizer and packed-block data modules.

The embedded default corpus is the English text of the Python reference documentation that ships
with every CPython (``pydoc_data.topics``): real prose, no download. A byte-level BPE tokenizer is
trained on its training split with ``tokenizers`` and cached on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import time
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ..errors import DataError, UserError
from .evaluation import eval_loader
from .files import cache_dir, expand_paths, read_text_file
from .resumable import ResumableLoader, fingerprint, fit_position, pins_memory

if TYPE_CHECKING:
    from ..config import DataConfig

EOS_TOKEN = "<|endoftext|>"

log = logging.getLogger(__name__)


def pydoc_documents() -> dict[str, str]:
    """The pydoc topics: {topic name: English text}, about 750 KB."""
    from pydoc_data.topics import topics

    return {name: text for name, text in sorted(topics.items()) if text.strip()}


DOCUMENT_CHARS = 2000
"""A single text file without blank lines is cut into documents of about this many characters."""


def split_text(text: str, name: str = "text") -> dict[str, str]:
    """One text as documents: its paragraphs (split at blank lines) when it has two or more, else
    blocks of about :data:`DOCUMENT_CHARS` characters (at least two) cut at whitespace."""
    paragraphs = [p for p in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text) if p.strip()]
    if len(paragraphs) >= 2:
        return {f"{name}#{i}": p for i, p in enumerate(paragraphs)}
    text = text.strip()
    size = min(DOCUMENT_CHARS, max(1, math.ceil(len(text) / 2)))
    docs, start = {}, 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):  # cut after the last whitespace of the block, when it has one
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut + 1 if cut > start else end
        docs[f"{name}@{start}"] = text[start:end]
        start = end
    return docs


def file_documents(paths: list[str] | str) -> dict[str, str]:
    """Each file is one document; a single file is split by :func:`split_text` (paragraphs, else
    blocks). A missing, empty, binary or non-UTF-8 file is a :class:`DataError` naming it."""
    paths = expand_paths([paths] if isinstance(paths, (str, Path)) else list(paths))
    docs = {str(Path(p).expanduser()): read_text_file(p) for p in paths}
    if len(docs) == 1:
        (name, text), = docs.items()
        return split_text(text, name)
    return docs


def load_documents(cfg: DataConfig) -> dict[str, str]:
    if cfg.source == "pydoc":
        return pydoc_documents()
    if cfg.source == "files":
        return file_documents(cfg.paths or [])
    if cfg.source == "hf":  # a Hugging Face dataset by name: each non-blank row is one document
        from ..models.hub import load_hf_texts

        texts = load_hf_texts(cfg.hf_name, cfg.hf_config, split=cfg.hf_split, text_field=cfg.hf_text_field)
        return {f"{cfg.hf_name}/{cfg.hf_config}/{cfg.hf_split}/{i}": t for i, t in enumerate(texts)}
    raise ValueError(f"unknown data.source {cfg.source!r}")


def checksum_bucket(text: str) -> int:
    """A document's place in [0, 10000), from a checksum of its text alone."""
    return zlib.crc32(text.encode("utf-8")) % 10_000


def in_validation(text: str, val_fraction: float) -> bool:
    """Whether a document (or a conversation, as canonical JSON) is held out: by its checksum, so the
    same text is on the same side whatever else the data holds, wherever it is stored, whatever the seed."""
    return checksum_bucket(text) < val_fraction * 10_000


def split_documents(docs: dict[str, str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic document-level split by a checksum of each document's text.

    The text, not the name, decides: the same files give the same split wherever they are stored.
    """
    train, val = [], []
    for text in docs.values():
        (val if in_validation(text, val_fraction) else train).append(text)
    if not val:  # tiny corpora: hold out the last document rather than validate on nothing
        if len(train) < 2:
            raise DataError("the corpus is a single document too short to split; give more text or more files")
        val.append(train.pop())
    if not train:
        raise DataError("no training documents left after the validation split; lower data.val_fraction")
    return train, val


def train_bpe_tokenizer(texts: list[str], vocab_size: int, cache: str | None = None):
    """A byte-level BPE trained on ``texts``, cached by content hash; returned as a HF fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("utf-8"))
        digest.update(b"\0")
    path = cache_dir(cache) / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
    if not path.exists():
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN])
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        bpe.save(str(tmp))
        tmp.replace(path)
    return _with_eos(PreTrainedTokenizerFast(tokenizer_file=str(path)))


def bpe_tokenizer_from_json(definition: str):
    """The BPE a run trained, back from its ``tokenizers`` JSON (as a checkpoint stores it)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return _with_eos(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(definition)))


def _with_eos(tok):
    tok.eos_token = EOS_TOKEN
    tok.pad_token = EOS_TOKEN
    return tok


TOKENIZE_CHUNK_CHARS = 4_000_000
"""Documents are tokenized in batches of about this many characters (a batch's ids are Python lists)."""
REPORT_CHARS = 16_000_000
"""A split at least this large shows a progress bar while it is tokenized, and a line when done."""


LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"
"""The key under which transformers records that it warned about a text longer than the
tokenizer's ``model_max_length`` ("Running this sequence through the model will result in indexing
errors")."""


@contextlib.contextmanager
def whole_texts(tokenizer):
    """Tokenize whole documents or conversations without transformers' warning that one is longer
    than the model takes: here ids are packed or cut to ``data.block_size``, which is checked
    against the model's positions on its own, so the warning (once per tokenizer) would be false."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if not isinstance(flags, dict):
        yield
        return
    missing, before = LENGTH_WARNING not in flags, flags.get(LENGTH_WARNING)
    flags[LENGTH_WARNING] = True  # "already warned"
    try:
        yield
    finally:
        if missing:
            flags.pop(LENGTH_WARNING, None)
        else:
            flags[LENGTH_WARNING] = before


def _tokenizer_key(tokenizer) -> str | None:
    """Everything a fast tokenizer's output depends on (its class and whole definition), or None for
    one whose Python code may take part (a slow tokenizer): its token ids are not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    return f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}\0{backend.to_str()}"


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text of its own accord (a Llama or Gemma tokenizer's BOS;
    none for GPT-2's or SmolLM2's), found by encoding a word with and without its special tokens."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    framed = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(framed) - len(plain) + 1):
        if framed[start:start + len(plain)] == plain:
            return list(framed[:start])
    return []


def token_stream(texts: list[str], tokenizer, split: str = "training", cache: str | None = None):
    """The documents' token ids as one int32 numpy array (4 bytes a token): each document opens with
    the ids the tokenizer puts before any text (its BOS, where it has one: the model then trains on
    what it is prompted with, as a prompt is encoded at generation) and closes with EOS.

    Tokenized in batches of about :data:`TOKENIZE_CHUNK_CHARS` characters: a whole corpus tokenized
    in one call held every id as a Python int, some 180 bytes a token (a 96 MB corpus, 21 M
    tokens, took 4.4 GB). A fast tokenizer's result is cached in ``cache_dir(cache)``, keyed by the
    tokenizer's definition and the texts, so a resumed or repeated run reads it instead of
    tokenizing again (a corpus of a few hundred MB takes minutes)."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token to separate documents; use a tokenizer with one")
    bos = leading_special_ids(tokenizer)
    key = _tokenizer_key(tokenizer)
    path = None
    if key is not None:
        digest = hashlib.sha256(key.encode("utf-8"))
        digest.update(f"\0eos={eos}\0".encode())
        if bos:
            digest.update(f"bos={bos}\0".encode())
        for t in texts:
            digest.update(t.encode("utf-8"))
            digest.update(b"\0")
        path = cache_dir(cache) / f"tokens-{digest.hexdigest()[:24]}.npy"
        if (cached := _read_tokens(path)) is not None:
            return cached
    chars = sum(map(len, texts))
    big = chars >= REPORT_CHARS
    start = time.monotonic()
    eos_ids, bos_ids = np.array([eos], dtype=np.int32), np.array(bos, dtype=np.int32)

    def encode(batch: list[str]):
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        return np.concatenate([a for doc in ids for a in (bos_ids, np.asarray(doc, dtype=np.int32), eos_ids)])

    pieces, batch, size = [], [], 0  # pieces: one int32 array per batch of documents
    bar = tqdm(total=chars, desc=f"tokenizing the {split} split", unit="char", unit_scale=True,
               disable=None if big else True, leave=False)
    with whole_texts(tokenizer), bar:
        for k, text in enumerate(texts):
            batch.append(text)
            size += len(text)
            if size >= TOKENIZE_CHUNK_CHARS or k == len(texts) - 1:
                pieces.append(encode(batch))
                bar.update(size)
                batch, size = [], 0
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    if path is not None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, stream)
            tmp.replace(path)
        except OSError:  # a read-only or full cache folder: the run goes on without the cache
            tmp.unlink(missing_ok=True)
    if big:
        log.info(
            "tokenized the %s split: %d documents, %d tokens in %.0f s%s", split, len(texts), stream.size,
            time.monotonic() - start, f" (cached in {path})" if path is not None else "")
    mapped = _read_tokens(path) if path is not None else None  # the pages of the file, not a copy
    return stream if mapped is None else mapped


def _read_tokens(path: Path):
    """The cached ids at ``path``, memory-mapped read-only (processes of one machine, DDP ranks and
    loader workers, share the file's pages instead of holding a copy each), or None where the file
    is missing, damaged (cut, or not this version's 1-d int32 array) or empty (nothing to map)."""
    try:
        cached = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return None
    return cached if cached.ndim == 1 and cached.dtype == np.int32 else None


def pack_documents(texts: list[str], tokenizer, block_size: int, split: str = "training",
                   cache: str | None = None) -> torch.Tensor:
    """Tokenize (:func:`token_stream`), join with EOS and cut into [N, block_size] int32 blocks (the
    remainder is dropped): a view of the token cache's memory map where there is one, read only.

    A ``split`` (training or validation) shorter than one block is a :class:`DataError`."""
    ids = token_stream(texts, tokenizer, split, cache)
    n = len(ids) // block_size
    if n == 0:
        more = "give more text" + (" or raise data.val_fraction" if split == "validation" else "")
        raise DataError(
            f"the {split} split has {len(ids)} tokens, fewer than one block of data.block_size={block_size}: "
            f"lower data.block_size or {more}"
        )
    with warnings.catch_warnings():  # a read-only map of the cache file (never written to)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(ids[: n * block_size].reshape(n, block_size))


class BlockDataset(Dataset):
    """Packed blocks (any integer dtype) as HF-style int64 batches: labels equal input_ids; the module
    shifts them once.

    No ``attention_mask``: a packed block has no padding, and a batch without a mask lets the step
    attend causally without building one (lightning_cggr.models.attention), free of host syncs."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def fingerprint(self) -> str:
        """What a checkpoint's data position is checked against on resume (:class:`ResumableLoader`);
        computed once."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = fingerprint(self.blocks)
        return self._fingerprint

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.blocks[i].long()  # stored as int32 (half the memory); the model takes int64 ids
        return {"input_ids": x, "labels": x.clone()}


class FullBatches:
    """``collate_fn`` of the validation loader: stacks a batch, and pads a short one (the last, when the
    validation blocks are not a multiple of the batch size) to ``batch_size`` rows that train nothing
    (``pad_id`` tokens, labels -100).

    Why: the validation loss counts trainable tokens only, so the padding changes no value, but a batch
    of another size makes compiled decoder code compile again, and under torch's automatic dynamic
    shapes (``perf.compile_dynamic=auto``) that recompile makes the batch dimension symbolic for the
    rest of the run, training included: ``train()`` validates before the first step, so before this
    padding every compiled run whose validation set was not a multiple of the batch trained with a
    symbolic batch dimension (experiments/results/trainer_check_tiny_cggr_default-cpu.md: 124 rows at
    batch 8). The padded rows cost one partial batch's worth of compute per validation."""

    def __init__(self, batch_size: int, pad_id: int):
        self.batch_size, self.pad_id = int(batch_size), int(pad_id)

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = default_collate(samples)
        short = self.batch_size - len(samples)
        if short > 0:
            fill = {"input_ids": self.pad_id, "labels": -100}
            for key, value in batch.items():
                pad = value.new_full((short, *value.shape[1:]), fill[key])
                batch[key] = torch.cat([value, pad])
        return batch


class PackedTextDataModule(L.LightningDataModule):
    """Documents -> tokenizer -> packed fixed-length blocks; deterministic split and order."""

    def __init__(self, train_texts: list[str], val_texts: list[str], tokenizer, cfg: DataConfig, seed: int = 0):
        super().__init__()
        self.train_texts, self.val_texts = train_texts, val_texts
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.seed = seed
        self.train_set = self.val_set = None
        held = sum(map(len, val_texts))  # characters, counted before the texts are dropped
        self._split = (len(val_texts), len(train_texts) + len(val_texts), held, held + sum(map(len, train_texts)))

    def split_note(self) -> str | None:
        """What holding out whole documents cost, where the validation split holds more than twice
        ``data.val_fraction`` of the text (a corpus of few documents), else None."""
        n_val, n_docs, held, total = self._split
        if not total or held <= 2 * self.cfg.val_fraction * total:
            return None
        one_file = self.cfg.source == "files" and len(expand_paths(list(self.cfg.paths or []))) == 1
        fix = ("the single file is cut at its blank lines: give it more of them between documents, or give the "
               "text as several files, to train on more of it" if one_file else
               "split the text into more, smaller files to train on more of it" if self.cfg.source == "files" else
               f"lower data.val_fraction, or give more {'rows' if self.cfg.source == 'hf' else 'documents'}, to "
               f"train on more of it")
        return (f"the validation split holds {held / total:.0%} of the text ({n_val} of {n_docs} documents, "
                f"{held:,} of {total:,} characters) for data.val_fraction={self.cfg.val_fraction}: documents "
                f"are held out whole (by a checksum of each), and with so few, or so uneven, the share held out "
                f"strays from data.val_fraction; {fix}")

    def setup(self, stage: str | None = None):
        if self.train_set is None:
            cache = self.cfg.cache_dir
            self.train_set = BlockDataset(pack_documents(self.train_texts, self.tokenizer, self.cfg.block_size,
                                                         cache=cache))
            self.val_set = BlockDataset(
                pack_documents(self.val_texts, self.tokenizer, self.cfg.block_size, split="validation", cache=cache)
            )
            self.train_texts = self.val_texts = None  # packed: the texts (the corpus's size again) can go

    def train_dataloader(self):
        # order = f(seed, epoch); its position is saved in checkpoints, so a resume mid-epoch
        # continues with the next unseen batch (lightning_cggr.data.resumable)
        return ResumableLoader(
            self.train_set, batch_size=self.cfg.batch_size, seed=self.seed, num_workers=self.cfg.num_workers,
            position=fit_position(self.trainer) if self.trainer is not None else None,
            pin_memory=pins_memory(self.trainer),
        )

    def val_dataloader(self):
        # in order, each block counted once on any number of ranks (lightning_cggr.data.evaluation)
        return eval_loader(self.val_set, self.cfg.batch_size, FullBatches(self.cfg.batch_size, self.tokenizer.eos_token_id),
                           self.cfg.num_workers, pins_memory(self.trainer))

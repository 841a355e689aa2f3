"""Chat SFT data: JSONL conversations -> token ids with labels on assistant turns only.

Each non-blank line of a ``.jsonl`` file is ``{"messages": [{"role": ..., "content": ...}, ...]}``.
A conversation is rendered once through the tokenizer's chat template and tokenized as a whole
(exactly what the model sees at inference). Which characters belong to an assistant turn is found
by rendering prefixes of the conversation: for assistant message ``i``, its turn starts where
``render(messages[:i], add_generation_prompt=True)`` ends and stops where
``render(messages[:i + 1])`` ends, trailing whitespace excluded. So a turn's labels cover its
content and the template's end-of-turn marker (``<|im_end|>`` for SmolLM2), not the role header
and not the newline after the marker. Tokens overlapping such a span keep their id as label;
every other label is -100. An assistant message with empty content labels nothing.

Labels are aligned with ``input_ids`` (Hugging Face convention): the training step shifts them by
one. Sequences are right-truncated to ``max_length`` and right-padded per batch with
``attention_mask`` 0 and label -100 on pads, so the model's default ``arange`` position ids are
correct. A conversation without any labelled token stays in the data and contributes nothing.

    from lightning_cggr.data.chat import ChatDataModule
    dm = ChatDataModule("lightning_cggr/data/samples/chat.jsonl", tokenizer, max_length=256)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError, UserError
from ..routing.selection import IGNORE_INDEX
from .evaluation import eval_loader
from .files import Conversation, read_chat_jsonl
from .resumable import ResumableLoader, fingerprint, fit_position, pins_memory
from .text import checksum_bucket, in_validation, whole_texts


def sample_chat_path() -> Path:
    """The small chat JSONL shipped with the package (tests and the offline demo)."""
    return Path(str(resources.files("lightning_cggr.data") / "samples" / "chat.jsonl"))


def _render(tokenizer, messages: Conversation, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(tokenizer, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character spans of assistant turns."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; data=chat needs a model that has "
            "one (e.g. model=smollm2_gguf)"
        )
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or not msg["content"].strip():
            continue
        start_text = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(start_text)):
            raise DataError(
                f"data=chat: the model's chat template does not render conversations incrementally (the turns "
                f"before message {i} of a {len(messages)}-message conversation render differently once more "
                "turns follow: a template that rewrites history, e.g. drops past reasoning), so the assistant "
                "tokens cannot be located; put a chat template without history rewriting in the model's "
                "folder (chat_template.jinja)"
            )
        end = len(through.rstrip())
        if end > len(start_text):
            spans.append((len(start_text), end))
    return full, spans


def encode_whole_chat(tokenizer, messages: Conversation) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (assistant tokens only, else -100) of the whole conversation."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for j, (s, e) in enumerate(offsets):
        if e > s and any(s < end and e > start for start, end in spans):
            labels[j] = ids[j]
    return {"input_ids": list(ids), "labels": labels}


def encode_chat(tokenizer, messages: Conversation, max_length: int) -> dict[str, list[int]]:
    """:func:`encode_whole_chat`, cut to ``max_length`` tokens."""
    return {key: values[:max_length] for key, values in encode_whole_chat(tokenizer, messages).items()}


PROGRESS_CONVERSATIONS = 5000
"""A split of at least this many conversations shows a progress bar while it is encoded."""


class ChatDataset(Dataset):
    """Encoded conversations, cut to ``max_length`` tokens: each is encoded whole once
    (:func:`encode_whole_chat`; :attr:`cut` and :attr:`cut_to_nothing` count what the cut cost), and
    keeps its ``input_ids`` and ``labels`` as int32 arrays (8 bytes a token, where two lists of
    Python ints took about 44)."""

    def __init__(self, conversations: Sequence[Conversation], tokenizer, max_length: int, split: str = "training"):
        from tqdm.auto import tqdm

        many = len(conversations) >= PROGRESS_CONVERSATIONS
        self.examples = []
        self.cut = 0  # conversations longer than max_length tokens
        self.cut_to_nothing = 0  # ... whose labelled tokens all lie past it
        with whole_texts(tokenizer):
            for c in tqdm(conversations, desc=f"encoding the {split} conversations", unit="conv",
                          disable=None if many else True, leave=False):
                whole = encode_whole_chat(tokenizer, c)
                if len(whole["input_ids"]) > max_length:
                    self.cut += 1
                    labelled = any(label != IGNORE_INDEX for label in whole["labels"])
                    self.cut_to_nothing += labelled and all(
                        label == IGNORE_INDEX for label in whole["labels"][:max_length])
                self.examples.append(
                    {key: np.asarray(values[:max_length], dtype=np.int32) for key, values in whole.items()})

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        """What a checkpoint's data position is checked against on resume (:class:`ResumableLoader`);
        computed once."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = fingerprint(*(a for ex in self.examples for a in (ex["input_ids"], ex["labels"])))
        return self._fingerprint

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.examples[index]


class ChatCollator:
    """Right-pad a list of examples to the longest: pads get attention 0 and label -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in examples)
        shape = (len(examples), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            input_ids[row, :n] = torch.as_tensor(ex["input_ids"])
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(ex["labels"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id (never attended, never labelled), else an error."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise UserError("the tokenizer has neither a pad nor an eos token to pad batches with; use a tokenizer with one")


class ChatDataModule(L.LightningDataModule):
    """Chat SFT batches from JSONL files. About ``val_fraction`` of the conversations (at least one) are
    held out by a checksum of each one's content, as text documents are; ``seed`` orders the batches."""

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        tokenizer,
        max_length: int = 2048,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        self.paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        problems = []
        if not self.paths:
            problems.append("paths is empty: give at least one .jsonl file")
        if max_length < 2:
            problems.append(f"max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            problems.append(f"val_fraction must be in [0, 1), got {val_fraction}")
        if num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {num_workers}")
        if problems:
            raise ValueError("ChatDataModule: " + "; ".join(problems))
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.collate = ChatCollator(pad_token_id_of(tokenizer))
        self.train_set: ChatDataset | None = None
        self.val_set: ChatDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        conversations = [c for p in self.paths for c in read_chat_jsonl(p)]
        n = len(conversations)
        # by a checksum of each conversation, as text documents are split: a conversation stays on its
        # side when others are added or removed or the seed changes, so a resumed or repeated run
        # never validates on what it trained on
        keys = [json.dumps(c, sort_keys=True, ensure_ascii=False) for c in conversations]
        val_idx = [i for i, k in enumerate(keys) if in_validation(k, self.val_fraction)]
        if self.val_fraction > 0 and not val_idx and n:
            val_idx = [min(range(n), key=lambda i: (checksum_bucket(keys[i]), keys[i]))]  # at least one
        held = set(val_idx)
        train_idx = [i for i in range(n) if i not in held]
        if not train_idx:
            raise DataError(
                f"{n} conversation(s) leave none for training with data.val_fraction="
                f"{self.val_fraction}; add conversations or lower data.val_fraction"
            )
        self.train_set = ChatDataset([conversations[i] for i in train_idx], self.tokenizer, self.max_length)
        self.val_set = ChatDataset([conversations[i] for i in val_idx], self.tokenizer, self.max_length,
                                   split="validation")
        if not any((ex["labels"] != IGNORE_INDEX).any() for ex in self.train_set.examples):
            raise DataError(
                f"nothing to train on: no training conversation of {', '.join(map(str, self.paths))} has "
                f"assistant content within data.block_size={self.max_length} tokens (only assistant turns "
                "are labelled); add assistant answers or raise data.block_size"
            )

    def truncation_note(self) -> str | None:
        """What cutting conversations to ``max_length`` (``data.block_size``) cost the training split,
        or None when no conversation was longer (after :meth:`setup`)."""
        train = self._require(self.train_set)
        if not train.cut:
            return None
        lost = (f"; {train.cut_to_nothing} of them keep no assistant token and train nothing"
                if train.cut_to_nothing else "")
        return (f"{train.cut} of {len(train)} training conversations are longer than data.block_size="
                f"{self.max_length} tokens and are cut there (their tokens past it are not trained{lost}); "
                f"raise data.block_size to train on more of them")

    def _require(self, dataset: ChatDataset | None) -> ChatDataset:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return dataset

    def train_dataloader(self) -> ResumableLoader:
        # order = f(seed, epoch), full batches only; the position is saved in checkpoints, so a
        # run resumed mid-epoch continues with the next unseen batch (lightning_cggr.data.resumable)
        return ResumableLoader(
            self._require(self.train_set), batch_size=self.batch_size, seed=self.seed, collate_fn=self.collate,
            num_workers=self.num_workers,
            position=fit_position(self.trainer) if self.trainer is not None else None,
            pin_memory=pins_memory(self.trainer),
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is not None and len(self.val_set) == 0:
            return []  # Lightning skips validation for an empty list
        # each conversation counted once on any number of ranks (lightning_cggr.data.evaluation)
        return eval_loader(self._require(self.val_set), self.batch_size, self.collate, self.num_workers,
                           pins_memory(self.trainer))

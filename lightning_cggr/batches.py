"""What a training or validation batch must be, checked on the host before it moves to the device.

A batch is a mapping with ``input_ids`` and ``labels``, integer tensors of one shape ``[B, T]``
(``labels`` not shifted, ``-100`` where nothing is learned), and optionally ``attention_mask`` of
the same shape; other keys are not read, and those that would place packed sequences
(:data:`POSITION_KEYS`) are refused. :class:`CGGRModule` checks every batch in Lightning's
``on_before_batch_transfer``, while it still lies where the data loader made it:

- the structure (keys, dimensions, shapes, dtypes) from tensor metadata, on any device;
- the values of tensors still on the CPU: every input id must index the model's embedding table and
  every label must be ``-100`` or a row of the LM head. On the CPU this is a min/max over the batch,
  no device sync. A batch already on an accelerator is not read: that would stall the step.

Why: an out-of-range label fails deep in the torch loss with an index message, and the Triton loss
(the GPU default) gives that row a NaN loss by design rather than read out of bounds, which the run
then reports as a divergence; an out-of-range input id is a device-side assert on a GPU. The usual
cause is a tokenizer larger than the model's vocabulary (added special tokens without
``model.resize_token_embeddings``).
"""

from __future__ import annotations

from typing import Mapping

import torch

from .errors import DataError
from .routing.selection import IGNORE_INDEX

INDEX_DTYPES = (torch.int64, torch.int32)

POSITION_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
"""Keys with which a batch says where its packed sequences start (e.g. transformers'
``DataCollatorWithFlattening``). The step gives the model ``input_ids`` and ``attention_mask`` only,
so such a batch is refused rather than trained with positions and attention running across its
sequences."""


def batch_problems(batch, label_rows: int, embedding_rows: int | None) -> list[str]:
    """Every problem of ``batch`` for a model whose LM head has ``label_rows`` rows and whose
    embedding table has ``embedding_rows`` (None: unknown, not checked), one phrase each."""
    if not isinstance(batch, Mapping):
        return [f"a batch must be a dict with input_ids and labels [B, T] (e.g. a list of such dicts through "
                f"DataLoader's default collate), got a {type(batch).__name__}"]
    missing = [key for key in ("input_ids", "labels") if key not in batch]
    if missing:
        return [f"the batch has no {' or '.join(missing)} (its keys: {', '.join(map(str, batch)) or 'none'}); "
                f"give labels equal to input_ids for plain language modelling, -100 where nothing is learned"]
    problems = []
    if unused := [key for key in POSITION_KEYS if key in batch]:
        problems.append(f"the batch has {', '.join(unused)}, which the step does not give the model (it runs "
                        f"input_ids and attention_mask only: packed sequences would attend across their "
                        f"boundaries, positions running on); pad the sequences with an attention_mask, or "
                        f"pack them with EOS between as pretraining does (e.g. transformers' "
                        f"DataCollatorForLanguageModeling, not DataCollatorWithFlattening)")
    tensors = {key: batch[key] for key in ("input_ids", "labels", "attention_mask") if batch.get(key) is not None}
    for key, value in tensors.items():
        if not torch.is_tensor(value):
            problems.append(f"{key} must be a tensor, got a {type(value).__name__}")
        elif value.dim() != 2:
            problems.append(f"{key} must be [B, T], got shape {tuple(value.shape)}")
        elif key != "attention_mask" and value.dtype not in INDEX_DTYPES:
            problems.append(f"{key} must be int64 or int32, got {value.dtype}")
    if problems:
        return problems
    shape = tensors["input_ids"].shape
    for key in ("labels", "attention_mask"):
        if key in tensors and tensors[key].shape != shape:
            problems.append(f"{key} has shape {tuple(tensors[key].shape)}, input_ids {tuple(shape)}: they must "
                            f"match (labels are not shifted: the step shifts them)")
    if problems:
        return problems
    ids, labels = tensors["input_ids"], tensors["labels"]
    if ids.device.type == "cpu" and ids.numel() and embedding_rows is not None:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= embedding_rows:
            bad = low if low < 0 else high
            problems.append(f"input_ids hold {bad}, outside the model's embedding table of {embedding_rows} rows; "
                            f"a tokenizer larger than the model's vocabulary needs "
                            f"model.resize_token_embeddings(len(tokenizer))")
    if labels.device.type == "cpu" and labels.numel():
        learned = labels[labels != IGNORE_INDEX]
        if learned.numel():
            low, high = int(learned.min()), int(learned.max())
            if low < 0:
                problems.append(f"labels hold {low}; only {IGNORE_INDEX} marks a position that trains nothing")
            if high >= label_rows:
                hint = ("" if any("resize_token_embeddings" in q for q in problems) else
                        "; a tokenizer larger than the model's vocabulary needs "
                        "model.resize_token_embeddings(len(tokenizer))")  # said once per batch
                problems.append(f"labels hold {high}, past the LM head's {label_rows} rows (the model's "
                                f"vocabulary){hint}")
    return problems


def check_batch(batch, label_rows: int, embedding_rows: int | None) -> None:
    """A :class:`~lightning_cggr.errors.DataError` naming every problem of :func:`batch_problems`."""
    if problems := batch_problems(batch, label_rows, embedding_rows):
        raise DataError("bad batch: " + "; ".join(problems))


def embedding_rows(model: torch.nn.Module) -> int | None:
    """Rows of ``model``'s input embedding table, or None where the model does not say."""
    try:
        table = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(table, "num_embeddings", None)
    return int(rows) if isinstance(rows, int) else None

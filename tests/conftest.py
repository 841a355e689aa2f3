"""Shared fixtures: tiny random models of each supported family, offline, seeded."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch.utils.data import Dataset

# Triton kernels run on CPU only through the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ("llama", "gpt2", "gpt_neox")
VOCAB = 97


def make_tiny_model(arch: str = "llama", num_layers: int = 3, vocab_size: int = VOCAB, hidden: int = 32, seed: int = 0):
    """A tiny causal LM of ``arch`` with random weights (no download), in eval-free default mode."""
    from lightning_cggr.config import ModelConfig
    from lightning_cggr.models import build_random_model

    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, hidden_size=hidden, num_layers=num_layers, num_heads=4, intermediate_size=64,
                      max_position_embeddings=64)
    return build_random_model(cfg, vocab_size, eos_token_id=0)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model():
    return make_tiny_model


def make_batch(batch_size: int = 3, seq_len: int = 12, vocab_size: int = VOCAB, seed: int = 1, pad_tail: bool = True):
    """A batch with right padding on the last row and some prompt labels masked (-100)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[0, :3] = -100  # an SFT-style prompt on row 0
    if pad_tail and batch_size > 1:
        attention_mask[-1, seq_len - 4 :] = 0
        input_ids[-1, seq_len - 4 :] = 0
        labels[-1, seq_len - 4 :] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture
def batch():
    return make_batch()


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny shapes: on a 2-core CPU extra threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def kept_mean_loss(step, hidden, targets, selection):
    """Mean cross-entropy over the kept tokens of one micro-batch, from the step's loss terms."""
    nll_sum, kept = step.loss_terms(hidden, targets, selection)
    return nll_sum / kept.clamp(min=1)


class Rows(Dataset):
    """A map-style dataset over a list of ready examples (dicts of tensors)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


@pytest.fixture(autouse=True)
def _no_logging_handler_outlives_its_test():
    """A job run in-process without hydra/job_logging=none leaves Hydra's stream handler on the root
    logger, writing to that test's captured stderr; once pytest closes it, every later test that logs
    printed '--- Logging error ---' into its own stderr (a test of one stderr line then failed, in
    that order only). Handlers a test adds to the root logger are removed after it (pytest's own,
    which it removes itself, are left alone)."""
    root = logging.getLogger()
    before = set(root.handlers)
    yield
    for handler in root.handlers[:]:
        if handler not in before and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
            handler.close()

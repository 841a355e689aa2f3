"""Scoring memory is bounded: 16 x 2048 tokens against a 128k vocabulary never hold [tokens, vocab].

The shapes are the real ones; the computation runs under ``FakeTensorMode`` (shapes and dtypes
propagate, nothing is computed or allocated), while a dispatch mode accounts every tensor an op
creates: its bytes while it is alive (freed when Python drops it), the peak of the sum, and the
largest single tensor. A full-logits pass would need 16 * 2048 * 128000 * 4 B = 16 GiB.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import make_tiny_model
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_cggr.config import CGGRConfig, RouterConfig
from lightning_cggr.kernels import token_stats
from lightning_cggr.step import CGGRStep
from lightning_cggr.routing.scoring import get_scorer

B, T, V, H = 16, 2048, 128_000, 16
FULL_LOGITS = B * T * V * 4


class AllocationTracker(TorchDispatchMode):
    """Bytes of every tensor created by an op (views excluded), live total, peak, largest."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._ids: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t._base is None and id(t) not in self._ids:
                nbytes = t.numel() * t.element_size()
                self._ids.add(id(t))
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, nbytes)
                weakref.finalize(t, self._free, id(t), nbytes)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._ids.discard(key)


def score_allocations(chunk_size: int) -> AllocationTracker:
    """Scoring statistics and scores as the module computes them (token_stats with the router's
    chunk_size, then the combined scorer) for a [B, T] batch of router states."""
    model = make_tiny_model("llama", num_layers=2, vocab_size=V, hidden=H)
    module = CGGRStep(model, CGGRConfig(scoring="combined", router=RouterConfig(num_layers=1, chunk_size=chunk_size)))
    with FakeTensorMode(allow_non_fake_inputs=True):
        hidden = torch.empty(B, T, H)
        targets = torch.randint(0, V, (B, T))
        with AllocationTracker() as tracker:
            stats = token_stats(
                hidden.reshape(B * T, H), module.head.weight, targets.reshape(-1),
                impl=module.loss_impl, chunk_size=module.cggr.router.chunk_size,
            )
            stats = type(stats)(*(s.view(B, T) for s in stats))
            score = get_scorer("combined")(stats, targets != -100)
            assert score.shape == (B, T)
    return tracker


def default_rows() -> int:
    """The rows scoring holds at once by default: cggr.router.chunk_size, or the kernels' rule when
    it is null (fp32 router states here)."""
    from lightning_cggr.kernels.contract import default_chunk_rows

    return CGGRConfig().router.chunk_size or default_chunk_rows(V, 4)


@pytest.fixture(scope="module")
def default_chunk() -> AllocationTracker:
    return score_allocations(CGGRConfig().router.chunk_size)


def test_scoring_never_holds_token_by_vocab_logits(default_chunk):
    chunk = default_rows()
    assert default_chunk.largest <= chunk * V * 4  # one chunk of fp32 logits at most
    assert default_chunk.largest < FULL_LOGITS / 16


def test_scoring_peak_is_bounded_by_a_few_chunks(default_chunk):
    chunk = default_rows()
    assert default_chunk.peak <= 4 * chunk * V * 4  # logits + a few same-size temporaries
    assert default_chunk.peak < 2 * 2**30  # 2 GiB, vs 16 GiB for full logits


def test_tracker_sees_a_full_logits_allocation():
    """The accounting can fail: one chunk as large as the batch is caught."""
    assert score_allocations(B * T).largest >= FULL_LOGITS


@pytest.mark.parametrize("unit", ["standard", "token", "sequence"])
def test_activation_checkpointing_keeps_the_block_inputs_instead_of_their_activations(unit, one_thread):
    """perf.activation_checkpointing, counted with the tracker on real tensors (6 blocks, 4 x 64 tokens):
    after the step's forward the plain step holds every block's activations, the checkpointed one
    little more than each block's input (which it must keep: L x rows x T x H fp32, a bound worked by
    hand), and the peak of forward + backward drops too, since the backward recomputes one block at
    a time; with n = 2 what it holds lies in between. Sequence routing runs the decoder on its kept
    rows only (2 of 4)."""
    from conftest import make_batch

    from lightning_cggr.config import LossConfig, PerfConfig, SelectionConfig

    layers, b, t, h = 6, 4, 64, 32
    cggr = {"standard": CGGRConfig(enabled=False),
            "token": CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1)),
            "sequence": CGGRConfig(warmup_steps=0, min_tokens_ratio=0.5, router=RouterConfig(num_layers=1),
                                   selection=SelectionConfig(unit="sequence"))}[unit]
    rows = 2 if unit == "sequence" else b
    batch = make_batch(batch_size=b, seq_len=t, seed=2)
    seen = {}
    for ckpt in (False, True, 2):
        model = make_tiny_model("llama", num_layers=layers, hidden=h)
        step = CGGRStep(model, cggr, LossConfig(impl="torch"), perf=PerfConfig(activation_checkpointing=ckpt))
        step(batch, global_step=0).loss.backward()  # first-call allocations (caches) out of the way
        model.zero_grad(set_to_none=True)
        with AllocationTracker() as tracker:
            res = step(batch, global_step=0)
            held = tracker.live
            res.loss.backward()
        seen[ckpt] = (held, tracker.peak)
    block_inputs = layers * rows * t * h * 4
    assert seen[True][0] >= block_inputs, (seen, block_inputs)
    assert seen[True][0] < seen[False][0] / 4, seen
    assert seen[True][1] < seen[False][1] / 2, seen
    # every 2nd block (n = 2): the three blocks left unchecked keep their activations
    assert seen[True][0] < seen[2][0] < seen[False][0], seen

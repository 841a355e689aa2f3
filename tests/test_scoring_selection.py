"""Scores against float64 hand computations; selection counts against exact rational ceilings."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from conftest import make_batch, make_tiny_model
from lightning_cggr.config import CGGRConfig, RouterConfig
from lightning_cggr.step import CGGRStep
from lightning_cggr.routing.scoring import SCORERS, get_scorer
from lightning_cggr.routing.selection import IGNORE_INDEX, kept_count, select, shift_targets


def _hand_scores(logits64: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every strategy computed directly from float64 logits [B, T, V]."""
    logp = torch.log_softmax(logits64, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top2 = logits64.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    safe = targets.clamp(min=0)
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    m = targets != IGNORE_INDEX
    z = lambda x: (x - x[m].mean()) / x[m].std(unbiased=False)  # noqa: E731
    out = {"entropy": entropy, "margin": -margin, "loss": nll, "combined": z(entropy) - z(margin)}
    return {k: v.masked_fill(~m, float("-inf")) for k, v in out.items()}


@pytest.mark.parametrize("strategy", sorted(SCORERS))
def test_router_scores_match_float64_hand_computation(arch, strategy):
    model = make_tiny_model(arch, num_layers=3)
    with torch.no_grad():  # a random init predicts near-uniformly; sharpen it so scores differ clearly
        model.get_output_embeddings().weight.mul_(6.0)
    cfg = CGGRConfig(scoring=strategy, router=RouterConfig(num_layers=2, chunk_size=5))  # chunks of 5 rows
    module = CGGRStep(model, cfg)
    batch = make_batch()
    targets = shift_targets(batch["labels"], batch["attention_mask"])
    got = module.score_and_stats(batch["input_ids"], batch["attention_mask"], targets)[0]

    hidden = module.router.hidden_states(batch["input_ids"], batch["attention_mask"]).double()
    logits = hidden @ model.get_output_embeddings().weight.double().T
    want = _hand_scores(logits, targets)[strategy]
    finite = torch.isfinite(want)
    assert torch.equal(finite, targets != IGNORE_INDEX)  # pads, prompt and last position excluded
    assert torch.equal(torch.isfinite(got), finite)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-4, atol=1e-4)


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="unknown scoring strategy 'entropyy'.*combined"):
        get_scorer("entropyy")


def test_shift_targets_hand_example():
    labels = torch.tensor([[5, 6, 7, 8], [-100, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    want = torch.tensor([[6, 7, -100, -100], [2, 3, 4, -100]])
    assert torch.equal(shift_targets(labels, mask), want)


def test_selection_hand_worked_example():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.7, -1.0], [3.0, 2.0, 1.0, 0.0, 5.0]])
    trainable = torch.tensor([[True, True, True, True, False], [False, True, True, True, False]])
    sel = select(score, trainable, 0.5)
    # row 0: 4 trainable -> keep 2: 0.9 (t=1) and 0.7 (t=3); row 1: 3 trainable -> ceil(1.5)=2: t=1, t=2
    want = torch.tensor([[False, True, False, True, False], [False, True, True, False, False]])
    assert torch.equal(sel.keep, want)
    assert sorted(sel.index[sel.valid].tolist()) == [1, 3, 6, 7]


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 1 / 3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_selection_keeps_exact_count_of_trainable_tokens(ratio, scope):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 30
    score = torch.randn(B, T, generator=g)
    trainable = torch.rand(B, T, generator=g) < 0.7
    trainable[2] = False  # a row with nothing to learn
    trainable[3, :] = False
    trainable[3, 5] = True  # a row with one trainable token keeps it
    sel = select(score, trainable, ratio, scope)
    assert not (sel.keep & ~trainable).any()
    exact = lambda n: math.ceil(Fraction(str(ratio)) * n) if ratio != 1 / 3 else math.ceil(Fraction(n, 3))  # noqa: E731
    if scope == "sequence":
        for b in range(B):
            assert int(sel.keep[b].sum()) == exact(int(trainable[b].sum()))
            kept, dropped = score[b][sel.keep[b]], score[b][trainable[b] & ~sel.keep[b]]
            if len(kept) and len(dropped):
                assert kept.min() >= dropped.max()
        assert bool(sel.keep[3, 5])
    else:
        assert int(sel.keep.sum()) == exact(int(trainable.sum()))
        kept, dropped = score[sel.keep], score[trainable & ~sel.keep]
        if len(dropped):
            assert kept.min() >= dropped.max()
    # the static candidate list holds exactly the kept positions
    assert torch.equal(torch.zeros(B * T, dtype=torch.bool).index_fill(0, sel.index[sel.valid], True), sel.keep.view(-1))


def test_kept_count_is_exact_where_float_rounding_would_overshoot():
    # 0.1 * 30 == 3.0000000000000004 in binary floating point; the exact ceiling is 3
    assert kept_count(torch.tensor([30, 0, 1, 7]), 0.1).tolist() == [3, 0, 1, 1]


def test_selection_is_deterministic_and_ranks_nan_last():
    score = torch.tensor([[float("nan"), 0.0, 0.0, 1.0, float("nan"), 0.0]])
    trainable = torch.tensor([[True, True, True, True, True, False]])
    a = select(score, trainable, 0.6)  # keep ceil(3.0) = 3 of 5
    b = select(score.clone(), trainable.clone(), 0.6)
    assert torch.equal(a.keep, b.keep)
    assert a.keep.tolist() == [[False, True, True, True, False, False]]  # ties by position; NaN last


def test_pads_and_prompt_tokens_are_never_kept(arch):
    model = make_tiny_model(arch)
    module = CGGRStep(model, CGGRConfig(min_tokens_ratio=0.5, warmup_steps=0))
    batch = make_batch(batch_size=4, seq_len=16)
    targets = shift_targets(batch["labels"], batch["attention_mask"])
    score = module.score_and_stats(batch["input_ids"], batch["attention_mask"], targets)[0]
    sel = select(score, targets != IGNORE_INDEX, 0.5)
    assert not sel.keep[batch["attention_mask"] == 0].any()
    assert not sel.keep[targets == IGNORE_INDEX].any()
    assert not sel.keep[:, -1].any()

"""Selection beyond plain top-k: stratified, minimum per sequence, batch-global, tensor (dynamic) ratio,
sequence-level selection, seeded random scores, and the config validation of every new option.

References are hand-worked examples or brute force over Python lists, never the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_cggr.config import CGGRConfig, ConfigError, parse_config
from lightning_cggr.routing.scoring import get_scorer, random_score, step_generator
from lightning_cggr.routing.selection import select, select_sequences, stratified_keep


def _rand_case(B=3, T=11, seed=0, p_train=0.7):
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(B, T, generator=g)
    trainable = torch.rand(B, T, generator=g) < p_train
    trainable[0, :2] = True
    return score, trainable


def _brute_rank(values: list[float]) -> list[int]:
    """Positions sorted hardest first, ties by position."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


# ---- stratified ----------------------------------------------------------------------------------
def test_stratified_hand_example_without_generator_takes_hardest_of_each_bucket():
    # 10 trainable ranks in 4 buckets: [0,3) [3,5) [5,8) [8,10); k=3 -> quotas 1,1,1,0
    key = torch.tensor([[5.0, 9.0, 1.0, 7.0, 3.0, 8.0, 2.0, 6.0, 4.0, 0.0]])
    keep = stratified_keep(key, torch.ones_like(key, dtype=torch.bool), torch.tensor([3]), 4)
    # ranks: 9->pos1 (0), 8->pos5 (1), 7->pos3 (2), 6->pos7 (3), 5->pos0 (4), 4->pos8 (5), 3->pos4 (6)
    assert keep.nonzero()[:, 1].tolist() == [1, 7, 8]  # ranks 0, 3, 5


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_stratified_keeps_exact_count_one_per_stratum(scope):
    # 8 trainable tokens per row, 4 strata of 2 ranks, ratio 0.5 -> exactly one from each rank pair
    B, T = 2, 10
    g = torch.Generator().manual_seed(3)
    score = torch.randn(B, T, generator=g)
    trainable = torch.ones(B, T, dtype=torch.bool)
    trainable[:, -2:] = False
    gen = torch.Generator().manual_seed(7)
    sel = select(score, trainable, 0.5, scope, strategy="stratified", strata=4, generator=gen)
    assert not (sel.keep & ~trainable).any()
    if scope == "sequence":
        assert sel.keep.sum(dim=1).tolist() == [4, 4]
        rows = [(b, score[b, :8].tolist()) for b in range(B)]
        width = 2
    else:
        assert int(sel.keep.sum()) == 8
        rows = [(None, score[:, :8].reshape(-1).tolist())]
        width = 4
    for b, values in rows:
        order = _brute_rank(values)
        kept = sel.keep[b, :8] if b is not None else sel.keep[:, :8].reshape(-1)
        for stratum in range(4):
            members = order[stratum * width : (stratum + 1) * width]
            assert sum(bool(kept[i]) for i in members) == width // 2


def test_stratified_is_seeded_and_covers_easy_strata():
    score, trainable = _rand_case(B=4, T=40, seed=1)
    picks = []
    for seed in (0, 0, 1):
        sel = select(score, trainable, 0.25, strategy="stratified", strata=4, generator=torch.Generator().manual_seed(seed))
        picks.append(sel.keep)
    assert torch.equal(picks[0], picks[1])
    assert not torch.equal(picks[0], picks[2])
    topk = select(score, trainable, 0.25).keep
    assert torch.equal(picks[0].sum(1), topk.sum(1))  # same count as top-k
    # top-k never keeps a token below the median of its sequence; stratified does
    below = [(score[b][trainable[b]] < score[b][trainable[b]].median()) for b in range(4)]
    kept_below = sum(int((picks[0][b][trainable[b]] & below[b]).sum()) for b in range(4))
    assert kept_below > 0
    assert sum(int((topk[b][trainable[b]] & below[b]).sum()) for b in range(4)) == 0


# ---- minimum per sequence, batch-global top-k -----------------------------------------------------
def test_min_per_sequence_sequence_scope_count():
    score, trainable = _rand_case(B=3, T=11)
    sel = select(score, trainable, 0.1, "sequence", min_per_sequence=3)
    for b in range(3):
        n = int(trainable[b].sum())
        assert int(sel.keep[b].sum()) == min(n, max(math.ceil(0.1 * n), 3))
        order = _brute_rank([v if t else -math.inf for v, t in zip(score[b].tolist(), trainable[b].tolist())])
        assert sel.keep[b].nonzero()[:, 0].tolist() == sorted(order[: int(sel.keep[b].sum())])


def test_batch_global_topk_matches_brute_force():
    score, trainable = _rand_case(B=3, T=11, seed=4)
    sel = select(score, trainable, 0.3, "batch")
    n = int(trainable.sum())
    flat = [v if t else -math.inf for v, t in zip(score.reshape(-1).tolist(), trainable.reshape(-1).tolist())]
    want = sorted(_brute_rank(flat)[: math.ceil(0.3 * n)])
    assert sel.keep.reshape(-1).nonzero()[:, 0].tolist() == want


def test_batch_global_with_min_per_sequence_hand_example():
    # row 0 holds every high score; batch-global top-2 would keep only row 0's, the minimum adds row 1's best
    score = torch.tensor([[9.0, 8.0, 7.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    trainable = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert select(score, trainable, 2 / 6, "batch").keep.nonzero().tolist() == [[0, 0], [0, 1]]
    sel = select(score, trainable, 2 / 6, "batch", min_per_sequence=1)
    # count = max(ceil(2/6 * 6), 1 + 1) = 2: each row's best is reserved
    assert sel.keep.nonzero().tolist() == [[0, 0], [1, 1]]
    sel = select(score, trainable, 4 / 6, "batch", min_per_sequence=1)  # 4 kept: 2 reserved + 2 best others
    assert sel.keep.nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [1, 1]]


# ---- tensor ratio (dynamic) ----------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_tensor_ratio_counts_with_static_capacity(scope):
    score, trainable = _rand_case(B=3, T=11, seed=5)
    r = torch.tensor(0.3)  # float32: the host reference uses the very same value
    sel = select(score, trainable, r, scope, capacity_ratio=0.5)
    ref = select(score, trainable, float(r), scope)
    assert torch.equal(sel.keep, ref.keep)
    assert sel.index.numel() == (3 * math.ceil(11 * 0.5) if scope == "sequence" else math.ceil(33 * 0.5))
    with pytest.raises(ValueError, match="capacity_ratio"):
        select(score, trainable, r, scope)


# ---- sequence-level ------------------------------------------------------------------------------
def test_select_sequences_hand_example():
    score = torch.tensor([[1.0, 5.0, 0.0], [2.0, 2.0, 9.0], [7.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    trainable = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    sel = select_sequences(score, trainable, 0.5)  # means 3, 2, 7, none -> keep ceil(2) = rows 2, 0
    assert sel.index.tolist() == [2, 0] and sel.valid.tolist() == [True, True]
    torch.testing.assert_close(sel.score[:3], torch.tensor([3.0, 2.0, 7.0]))
    assert sel.score[3] == float("-inf")
    sel = select_sequences(score, trainable, 1.0)  # the row without tokens is never valid
    assert sel.index.tolist() == [2, 0, 1, 3] and sel.valid.tolist() == [True, True, True, False]
    sel = select_sequences(score, trainable, torch.tensor(0.25), capacity_ratio=0.75)
    assert sel.index.tolist() == [2, 0, 1] and sel.valid.tolist() == [True, False, False]


# ---- random scores ---------------------------------------------------------------------------------
def test_random_scores_are_seeded_by_seed_and_step():
    trainable = torch.ones(2, 9, dtype=torch.bool)
    trainable[1, 5:] = False
    draw = lambda seed, step: random_score(trainable, step_generator(seed, step, "cpu"))  # noqa: E731
    a, b = draw(0, 3), draw(0, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, draw(0, 4)) and not torch.equal(a, draw(1, 3))
    assert torch.isinf(a[~trainable]).all() and ((a[trainable] >= 0) & (a[trainable] < 1)).all()
    assert step_generator(0, 3, "cpu", stream=1).initial_seed() != step_generator(0, 3, "cpu").initial_seed()


@pytest.mark.parametrize("unit, strategy", [("token", "topk"), ("sequence", "topk"), ("token", "importance"),
                                            ("token", "stratified")])
def test_each_micro_batch_of_a_step_makes_its_own_draw(unit, strategy):
    """The same rows as two micro-batches of one optimizer step (accumulated, or on two ranks) keep
    different random choices, as two halves of one larger batch would; the same micro-batch index
    repeats its draw. Before, the draws depended on (seed, step) alone: every micro-batch and rank of
    a step kept the same positions or rows."""
    from conftest import make_batch, make_tiny_model

    from lightning_cggr.config import SelectionConfig
    from lightning_cggr.routing.selection import shift_targets
    from lightning_cggr.step import CGGRStep

    scoring = "random" if strategy == "topk" else "entropy"
    cfg = CGGRConfig(scoring=scoring, warmup_steps=0, min_tokens_ratio=0.5 if unit == "sequence" else 0.25,
                     selection=SelectionConfig(unit=unit, strategy=strategy))
    step = CGGRStep(make_tiny_model("llama", num_layers=2), cfg)
    batch = make_batch(batch_size=6, seq_len=16, pad_tail=False)
    targets = shift_targets(batch["labels"], batch["attention_mask"])
    kept = [step.route(batch["input_ids"], batch["attention_mask"], targets, global_step=4, micro_batch=i).kept
            for i in (0, 1, 0)]
    assert not torch.equal(kept[0], kept[1])
    assert torch.equal(kept[0], kept[2])


def test_special_scorings_are_named_in_errors():
    with pytest.raises(ValueError, match="not a statistics scorer"):
        get_scorer("random")
    with pytest.raises(ValueError, match="unknown scoring strategy 'rand'.*random"):
        get_scorer("rand")


# ---- config ------------------------------------------------------------------------------------------
def _parse(**cggr):
    return parse_config({"cggr": cggr})


@pytest.mark.parametrize(
    "cggr, message",
    [
        ({"selection": {"unit": "tokens"}}, "cggr.selection.unit='tokens': must be one of token, sequence"),
        ({"selection": {"strategy": "strat"}}, "cggr.selection.strategy='strat'"),
        ({"selection": {"strata": 0}}, "cggr.selection.strata=0"),
        ({"selection": {"min_per_sequence": -1}}, "cggr.selection.min_per_sequence=-1"),
        ({"router": {"source": "last"}}, "cggr.router.source='last'"),
        ({"router": {"source": "final"}, "selection": {"unit": "sequence"}}, "final-layer scores need the full forward"),
        ({"selection": {"unit": "sequence", "strategy": "stratified"}}, "applies to unit=token"),
        ({"selection": {"unit": "sequence", "min_per_sequence": 2}}, "min_per_sequence applies to unit=token"),
        ({"selection": {"unit": "sequence", "scope": "batch"}}, "scope='batch' applies to unit=token"),
        ({"scoring": "excess_loss"}, "needs cggr.router.reference"),
        ({"scoring": "excess_loss", "router": {"reference": "???"}}, "needs cggr.router.reference"),
        ({"router": {"reference": "m"}}, "only used by cggr.scoring=excess_loss"),
        ({"router": {"reference_dtype": "fp8"}}, "cggr.router.reference_dtype='fp8'"),
        ({"ratio_schedule": {"kind": "anneal"}}, "cggr.ratio_schedule.kind='anneal'"),
        ({"ratio_schedule": {"kind": "curriculum", "steps": 0}}, "cggr.ratio_schedule.steps=0"),
        ({"ratio_schedule": {"shape": "step"}}, "cggr.ratio_schedule.shape='step'"),
        ({"ratio_schedule": {"kind": "dynamic", "min": 0.6, "max": 0.5}}, "min=0.6 > max=0.5"),
        ({"ratio_schedule": {"kind": "dynamic", "max": 1.5}}, r"cggr.ratio_schedule.max=1.5: must be a number in \(0, 1\]"),
        ({"ratio_schedule": {"kind": "dynamic"}, "scoring": "random"}, "scoring=random has none"),
        ({"ratio_schedule": {"knd": "dynamic"}}, "cggr.ratio_schedule.knd: unknown key"),
        ({"seed": "0"}, "cggr.seed='0': must be an integer"),
    ],
)
def test_config_rejects_bad_options(cggr, message):
    with pytest.raises(ConfigError, match=message):
        _parse(**cggr)


def test_config_defaults_are_valid_and_unchanged():
    c = _parse().cggr
    assert (c.selection.unit, c.router.source, c.scoring, c.ratio_schedule.kind) == ("token", "truncated", "combined", "constant")
    assert c.selection.min_per_sequence == 0 and c.router.reference is None
    assert isinstance(c, CGGRConfig)


def test_every_cggr_yaml_composes_and_validates():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_cggr.train import CONF_DIR

    conf = Path(CONF_DIR)
    names = sorted(p.stem for p in (conf / "cggr").glob("*.yaml"))
    assert {"sequence", "self_scoring", "random_token", "random_sequence", "stratified", "curriculum", "dynamic"} <= set(names)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for name in names:
            needs_ref = "???" in (conf / "cggr" / f"{name}.yaml").read_text()
            overrides = [f"cggr={name}"] + (["cggr.router.reference=ref"] if needs_ref else [])
            cfg = compose(config_name="train", overrides=overrides)
            parse_config({"cggr": OmegaConf.to_container(cfg.cggr, resolve=True)})

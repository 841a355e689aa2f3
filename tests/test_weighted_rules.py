"""The weighted selection rules wired into the step (cggr.selection.strategy = importance | infobatch |
noise_excluded): config validation, the loss against a float64 hand computation, unbiasedness of the
step's gradient by Monte Carlo on a tiny model, and InfoBatch's annealing under the Trainer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_batch, make_tiny_model
from lightning_cggr.config import (
    CGGRConfig,
    ConfigError,
    RouterConfig,
    SelectionConfig,
    parse_config,
)
from lightning_cggr.routing import importance as I
from lightning_cggr.routing.selection import IGNORE_INDEX, shift_targets
from lightning_cggr.step import CGGRStep

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def _parse(**cggr):
    return parse_config({"cggr": cggr})


def _problems(**cggr) -> str:
    with pytest.raises(ConfigError) as err:
        _parse(**cggr)
    return str(err.value)


# ---- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["token", "sequence"])
@pytest.mark.parametrize("strategy", ["importance", "infobatch", "noise_excluded"])
def test_each_rule_validates_for_both_units(unit, strategy):
    run = _parse(scoring="loss", selection={"unit": unit, "strategy": strategy})
    assert (run.cggr.selection.unit, run.cggr.selection.strategy) == (unit, strategy)


def test_rules_compose_with_the_ratio_schedules_that_make_sense():
    _parse(selection={"strategy": "importance", "p_min": 0.1}, ratio_schedule={"kind": "dynamic", "min": 0.2})
    _parse(selection={"strategy": "importance"}, ratio_schedule={"kind": "curriculum", "steps": 5})
    _parse(selection={"strategy": "noise_excluded", "unit": "sequence"}, ratio_schedule={"kind": "dynamic"})
    _parse(scoring="random", selection={"strategy": "infobatch"})  # the random control of infobatch


@pytest.mark.parametrize(
    "cggr, message",
    [
        ({"selection": {"strategy": "importance", "p_min": 0.3}, "min_tokens_ratio": 0.25},
         "cggr.selection.p_min=0.3 exceeds cggr.min_tokens_ratio=0.25"),
        ({"selection": {"strategy": "importance", "p_min": 0.15}, "ratio_schedule": {"kind": "dynamic", "min": 0.1}},
         "cggr.selection.p_min=0.15 exceeds cggr.ratio_schedule.min=0.1"),
        ({"selection": {"strategy": "importance"}, "scoring": "random"}, "the random control is strategy=topk"),
        ({"selection": {"strategy": "noise_excluded"}, "scoring": "random"}, "the random control is strategy=topk"),
        ({"selection": {"strategy": "infobatch"}, "ratio_schedule": {"kind": "dynamic"}},
         "infobatch keeps every above-mean unit and has no keep ratio"),
        ({"selection": {"strategy": "importance", "min_per_sequence": 1}},
         "min_per_sequence applies to strategy topk or stratified, not importance"),
        ({"selection": {"strategy": "stratified", "unit": "sequence"}}, "applies to unit=token; use one of topk, importance"),
        ({"selection": {"importance_transform": "square"}}, "cggr.selection.importance_transform='square': must be one of"),
        ({"selection": {"p_min": 0.0}}, "cggr.selection.p_min=0.0: must be a number in (0, 1]"),
        ({"selection": {"prune": 1.0}}, "cggr.selection.prune=1.0: must be a number in [0, 1)"),
        ({"selection": {"anneal_fraction": 1.5}}, "cggr.selection.anneal_fraction=1.5: must be a number in [0, 1]"),
        ({"selection": {"noise_fraction": -0.1}}, "cggr.selection.noise_fraction=-0.1: must be a number in [0, 1)"),
        ({"selection": {"strategy": "importancee"}}, "cggr.selection.strategy='importancee': must be one of"),
    ],
)
def test_unsupported_combinations_are_config_errors_naming_the_fix(cggr, message):
    assert message in _problems(**cggr)


def test_infobatch_without_the_run_length_is_an_error_that_names_the_fix():
    model = make_tiny_model("llama", num_layers=2)
    step = CGGRStep(model, CGGRConfig(scoring="loss", warmup_steps=0, router=RouterConfig(num_layers=1),
                                      selection=SelectionConfig(strategy="infobatch")))
    with pytest.raises(ValueError, match="total_steps=trainer.max_steps"):
        step(make_batch(), 0)
    step.cggr.selection.anneal_fraction = 0.0  # no annealing: the run's length is not needed
    assert torch.isfinite(step(make_batch(), 0).loss)


# ---- the loss against a float64 hand computation ----------------------------------------------------


def _nll64(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, T] float64 NLL of every position (0 where the target is ignored)."""
    logits = hidden.detach().double() @ head.detach().double().T
    nll = F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none").view(targets.shape)
    return nll.masked_fill(targets == IGNORE_INDEX, 0.0)


def _step(strategy: str, unit: str = "token", impl: str = "torch", **sel) -> CGGRStep:
    model = make_tiny_model("llama", num_layers=2)
    cfg = CGGRConfig(scoring="loss", min_tokens_ratio=0.4, warmup_steps=0, router=RouterConfig(num_layers=1),
                     selection=SelectionConfig(unit=unit, strategy=strategy, **sel))
    from lightning_cggr.config import LossConfig

    return CGGRStep(model, cfg, LossConfig(impl=impl), total_steps=100)


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_importance_token_loss_is_the_weighted_sum_over_the_trainable_count(impl, one_thread):
    step = _step("importance", impl=impl, importance_transform="relu")
    batch = make_batch(batch_size=3, seq_len=12)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shift_targets(batch["labels"], mask)
    trainable = targets != IGNORE_INDEX
    res = step(batch, global_step=3)
    routed = step.route(ids, mask, targets, global_step=3)  # the same (seed, step): the same draw
    score, _ = step.score_and_stats(ids, mask, targets, 3)
    p = I.importance_probabilities(score, trainable, 0.4, p_min=0.05, transform="relu")
    with torch.no_grad():
        nll = _nll64(step.hidden_states(ids, mask), step.head.weight, targets)
    kept = routed.kept
    assert kept.any() and not kept.all() and not (kept & ~trainable).any()
    expected = (nll * torch.where(kept, 1.0 / p, torch.zeros_like(p))).sum()
    assert float(res.nll_sum.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert int(res.normaliser) == int(trainable.sum()) and int(res.kept) == int(kept.sum())
    assert float(res.metrics["train/loss"]) == pytest.approx(float(expected) / int(trainable.sum()), rel=1e-5)
    assert float(res.metrics["train/weight_mean"]) == pytest.approx(float((1.0 / p)[kept].mean()), rel=1e-5)


def test_importance_sequence_loss_runs_the_kept_rows_and_weights_them(one_thread):
    step = _step("importance", unit="sequence", p_min=0.2)
    batch = make_batch(batch_size=5, seq_len=10, seed=4)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shift_targets(batch["labels"], mask)
    trainable = targets != IGNORE_INDEX
    res = step(batch, global_step=7)
    routed = step.route(ids, mask, targets, global_step=7)
    assert routed.hidden.shape[0] == 2  # ceil(0.4 * 5) rows run, not 5
    score, _ = step.score_and_stats(ids, mask, targets, 7)
    p_rows = I.importance_probabilities(  # the rule's row probabilities, recomputed from the row means
        torch.stack([score[b][trainable[b]].mean() for b in range(5)]).unsqueeze(0),
        torch.ones(1, 5, dtype=torch.bool), 0.4, p_min=0.2, transform="rank")[0]
    rows = routed.kept.any(dim=1)
    with torch.no_grad():
        nll = _nll64(step.hidden_states(ids, mask), step.head.weight, targets)
    expected = sum(float(nll[b].sum() / p_rows[b]) for b in range(5) if rows[b])
    assert rows.sum() >= 1
    assert float(res.nll_sum.detach()) == pytest.approx(expected, rel=1e-5)
    assert int(res.normaliser) == int(trainable.sum())


def test_noise_excluded_skips_the_hardest_and_means_over_the_kept(one_thread):
    step = _step("noise_excluded", noise_fraction=0.25)
    batch = make_batch(batch_size=2, seq_len=13, pad_tail=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shift_targets(batch["labels"], mask)
    res = step(batch, global_step=0)
    kept = step.route(ids, mask, targets).kept
    score, _ = step.score_and_stats(ids, mask, targets, 0)
    for b in range(2):
        s = score[b][targets[b] != IGNORE_INDEX].sort(descending=True).values
        n = len(s)
        e = int(0.25 * n)
        k = math.ceil(0.4 * (n - e) - 1e-9)
        assert set(score[b][kept[b]].tolist()) == set(s[e:e + k].tolist())
    with torch.no_grad():
        nll = _nll64(step.hidden_states(ids, mask), step.head.weight, targets)
    assert int(res.normaliser) == int(kept.sum())
    assert float(res.nll_sum.detach()) == pytest.approx(float(nll[kept].sum()), rel=1e-5)


# ---- unbiasedness of the step's gradient ------------------------------------------------------------


def _grad(step: CGGRStep, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in step.model.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(grads, params)])


def _mc_gap(step: CGGRStep, batch: dict, draws: int, weighted: bool = True) -> tuple[float, float]:
    """(||mean gradient over draws - full gradient||^2, its expectation under unbiasedness: sum of the
    per-coordinate variances / draws). Draws differ by the step index (the rules' generator key)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shift_targets(batch["labels"], mask)
    trainable = targets != IGNORE_INDEX
    full_loss, n = step.loss_terms(step.hidden_states(ids, mask), targets, None)
    full = _grad(step, full_loss / n)
    gs = []
    for s in range(draws):
        if weighted:  # the step as train() runs it: loss, then the normaliser's gradient correction
            res = step(batch, global_step=s)
            step.token_norm.count = None  # one micro-batch per draw: divide by its normaliser directly
            gs.append(_grad(step, res.nll_sum / res.normaliser.clamp(min=1)))
        else:  # the same draws, weights dropped, mean over the kept tokens: a biased estimator
            r = step.route(ids, mask, targets, global_step=s)
            nll, kept = step.loss_terms(r.hidden, r.targets, r.selection)
            gs.append(_grad(step, nll / kept.clamp(min=1)))
    g = torch.stack(gs)
    gap = float((g.mean(0) - full).square().sum())
    expected = float(g.var(0).sum() / draws)
    assert trainable.any()
    return gap, expected


@pytest.mark.parametrize(
    "strategy, unit, extra",
    [("importance", "token", {"importance_transform": "rank", "p_min": 0.1}),
     ("importance", "sequence", {"importance_transform": "relu", "p_min": 0.2}),
     ("infobatch", "token", {"prune": 0.6})],
)
def test_expected_gradient_of_the_weighted_loss_is_the_full_token_gradient(strategy, unit, extra, one_thread):
    """Mean gradient over 300 seeded draws vs the full-token gradient: the squared gap is within a few
    times its Monte Carlo expectation (sum of coordinate variances / draws) for the unbiased rules,
    and the same draws with the weights dropped (a plain mean over the sampled tokens) miss by far."""
    step = _step(strategy, unit=unit, **extra)
    batch = make_batch(batch_size=4, seq_len=10, seed=5)
    gap, expected = _mc_gap(step, batch, draws=300)
    assert gap < 3.0 * expected, (gap, expected)
    if strategy == "importance" and unit == "token":
        biased_gap, biased_expected = _mc_gap(step, batch, draws=300, weighted=False)
        assert biased_gap > 10.0 * biased_expected, (biased_gap, biased_expected)


# ---- InfoBatch's annealing under the Trainer --------------------------------------------------------


def test_infobatch_anneals_over_the_tail_of_trainer_max_steps(monkeypatch, one_thread):
    import lightning as L

    from lightning_cggr.module import CGGRModule

    model = make_tiny_model("llama", num_layers=2)
    cfg = CGGRConfig(scoring="loss", warmup_steps=0, router=RouterConfig(num_layers=1),
                     selection=SelectionConfig(strategy="infobatch", prune=0.5, anneal_fraction=0.25))
    module = CGGRModule(model, cfg)
    seen = []
    real = CGGRStep.__call__

    def recording(self, batch, global_step, world_size=1, micro_batch=0):
        res = real(self, batch, global_step, world_size, micro_batch)
        seen.append((global_step, float(res.metrics["train/prune"]), float(res.metrics["train/kept_ratio"])))
        return res

    monkeypatch.setattr(CGGRStep, "__call__", recording)
    batches = [make_batch(batch_size=4, seq_len=16, seed=20 + i) for i in range(8)]
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert module.step.total_steps == 8
    assert [s for s, _, _ in seen] == list(range(8))
    assert [p for _, p, _ in seen] == [0.5] * 6 + [0.0] * 2  # ceil(0.75 * 8) = 6 pruned steps
    assert all(k < 1.0 for _, _, k in seen[:6]) and all(k == 1.0 for _, _, k in seen[6:])

"""Sequence-level routing: only the hardest ceil(ratio * B) sequences run forward and backward."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import kept_mean_loss
from lightning_cggr.config import CGGRConfig, RatioScheduleConfig, RouterConfig, SelectionConfig
from lightning_cggr.module import CGGRModule
from lightning_cggr.routing.selection import IGNORE_INDEX, shift_targets
from lightning_cggr.step import CGGRStep

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

B, T, V = 4, 8, 40


def _untied_llama(seed: int = 0):
    """Untied input embeddings, so an embedding row's gradient comes only from sequences using it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # sharper predictions: sequence scores differ clearly
    return model


def _disjoint_batch():
    """Row b uses only token ids 1 + 8b .. 8 + 8b; row 3 has a 3-token prompt and 2 pads."""
    g = torch.Generator().manual_seed(2)
    input_ids = torch.stack([1 + 8 * b + torch.randperm(8, generator=g) for b in range(B)])
    mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[3, :3] = IGNORE_INDEX
    mask[3, -2:] = 0
    return input_ids, mask, labels


def _hand_sequence_nll(module, input_ids, mask, targets):
    """Float64 mean router NLL per sequence over its trainable tokens."""
    with torch.no_grad():
        h = module.router.hidden_states(input_ids, mask).double()
    logp = torch.log_softmax(h @ module.head.weight.detach().double().T, dim=-1)
    m = targets != IGNORE_INDEX
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return [float(nll[b][m[b]].mean()) for b in range(B)]


def test_backward_touches_only_kept_sequences_and_equals_their_loss():
    model = _untied_llama()
    cfg = CGGRConfig(scoring="loss", min_tokens_ratio=0.5, warmup_steps=0, router=RouterConfig(num_layers=1),
                     selection=SelectionConfig(unit="sequence"))
    module = CGGRStep(model, cfg)
    input_ids, mask, labels = _disjoint_batch()
    targets = shift_targets(labels, mask)

    seq_nll = _hand_sequence_nll(module, input_ids, mask, targets)
    want_rows = sorted(sorted(range(B), key=lambda b: -seq_nll[b])[: math.ceil(0.5 * B)])

    hidden, sub_targets, selection, kept, metrics = module.route(input_ids, mask, targets)[:5]
    assert selection is None and hidden.shape[0] == 2  # the decoder ran on 2 of 4 rows
    kept_rows = sorted(int(b) for b in kept.any(dim=1).nonzero()[:, 0])
    assert kept_rows == want_rows
    assert torch.equal(kept, (targets != IGNORE_INDEX) & torch.isin(torch.arange(B), torch.tensor(want_rows))[:, None])
    assert float(metrics["train/kept_sequences"]) == 2.0
    loss = kept_mean_loss(module, hidden, sub_targets, selection)
    loss.backward()

    emb = model.get_input_embeddings().weight.grad
    for b in range(B):
        rows = emb[1 + 8 * b : 9 + 8 * b]
        if b in want_rows:
            assert rows.abs().sum(dim=1).gt(0).any()
        else:
            assert torch.count_nonzero(rows) == 0, f"dropped sequence {b} got embedding gradient"

    # reference: the plain HF model on the kept rows alone, mean NLL over their trainable targets
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    idx = torch.tensor(want_rows)
    logits = model(input_ids=input_ids[idx], attention_mask=mask[idx]).logits
    ref = F.cross_entropy(logits.reshape(-1, V).float(), targets[idx].reshape(-1), ignore_index=IGNORE_INDEX)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_dynamic_ratio_keeps_static_capacity_rows():
    model = _untied_llama()
    cfg = CGGRConfig(scoring="loss", warmup_steps=0, router=RouterConfig(num_layers=1),
                     selection=SelectionConfig(unit="sequence"),
                     ratio_schedule=RatioScheduleConfig(kind="dynamic", min=0.25, max=0.75))
    module = CGGRStep(model, cfg)
    input_ids, mask, labels = _disjoint_batch()
    targets = shift_targets(labels, mask)
    with torch.no_grad():
        hidden, sub_targets, _, kept, metrics = module.route(input_ids, mask, targets)[:5]
    assert hidden.shape[0] == math.ceil(0.75 * B)  # capacity from ratio_schedule.max
    # hand ratio: max - (max - min) * mean p(true token) of the router
    with torch.no_grad():
        h = module.router.hidden_states(input_ids, mask).double()
    logp = torch.log_softmax(h @ module.head.weight.detach().double().T, dim=-1)
    m = targets != IGNORE_INDEX
    p_true = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).exp()[m].mean()
    r = 0.75 - 0.5 * float(p_true)
    assert abs(r * B - round(r * B)) > 1e-3  # away from a rounding boundary
    n_rows = math.ceil(r * B)
    assert int(kept.any(dim=1).sum()) == n_rows
    assert int((sub_targets != IGNORE_INDEX).any(dim=1).sum()) == n_rows
    torch.testing.assert_close(metrics["train/ratio"].double(), torch.tensor(r, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_random_sequence_control_is_seeded():
    model = _untied_llama()
    input_ids, mask, labels = _disjoint_batch()
    targets = shift_targets(labels, mask)

    def rows(seed, step):
        cfg = CGGRConfig(scoring="random", seed=seed, min_tokens_ratio=0.5, warmup_steps=0,
                         selection=SelectionConfig(unit="sequence"))
        module = CGGRStep(model, cfg)
        assert module.router is None  # the control runs no router
        with torch.no_grad():
            kept = module.route(input_ids, mask, targets, global_step=step).kept
        return tuple(kept.any(dim=1).tolist())

    draws = {(seed, step): rows(seed, step) for seed in (0, 1) for step in range(6)}
    assert all(sum(r) == 2 for r in draws.values())
    assert rows(0, 3) == draws[(0, 3)]
    assert len(set(draws.values())) > 1  # different (seed, step) give different rows


def test_fit_logs_sequence_routing_metrics(tmp_path):
    import lightning as L

    model = _untied_llama()
    cfg = CGGRConfig(scoring="loss", min_tokens_ratio=0.5, warmup_steps=1, router=RouterConfig(num_layers=1),
                     selection=SelectionConfig(unit="sequence"))
    module = CGGRModule(model, cfg)
    input_ids, mask, labels = _disjoint_batch()
    data = [{"input_ids": input_ids, "attention_mask": mask, "labels": labels}] * 3
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    m = trainer.callback_metrics
    assert float(m["train/kept_sequences"]) == 2.0 and float(m["train/ratio"]) == 0.5
    assert float(m["train/score_kept"]) > float(m["train/score_dropped"])
    assert torch.isfinite(m["train/loss"])


def test_sample_positions_takes_every_stride_th_trainable_position_by_hand():
    from lightning_cggr.routing.selection import sample_positions

    trainable = torch.tensor([[0, 1, 1, 0, 1, 1, 1],   # trainable at 1, 2, 4, 5, 6: ranks 0, 2, 4 -> 1, 4, 6
                              [1, 1, 1, 1, 1, 1, 0],   # 0..5: ranks 0, 2, 4 -> 0, 2, 4
                              [0, 0, 0, 0, 0, 1, 0],   # one trainable position: still sampled
                              [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    positions, valid = sample_positions(trainable, 2)
    assert positions.shape == valid.shape == (4, 4)  # ceil(7 / 2) slots
    assert valid.tolist() == [[True, True, True, False], [True, True, True, False],
                              [True, False, False, False], [False] * 4]
    assert positions[valid].tolist() == [1, 4, 6, 0, 2, 4, 5]
    assert bool(trainable.gather(1, positions)[valid].all())
    one, ok = sample_positions(trainable, 1)
    assert torch.equal(one[ok].sort().values, trainable.nonzero()[:, 1].sort().values)  # stride 1: every one


@pytest.mark.parametrize("stride", [2, 3])
def test_score_stride_scores_sequences_from_every_stride_th_trainable_token(stride):
    """cggr.router.score_stride: the sequences kept are the top ones by the float64 mean router NLL over
    every stride-th trainable target of each row (rank 0, stride, ...), the router's head ran on
    ceil(T / stride) rows per sequence, and the row with a prompt and padding is still scored."""
    model = _untied_llama()
    cfg = CGGRConfig(scoring="loss", min_tokens_ratio=0.5, warmup_steps=0,
                     router=RouterConfig(num_layers=1, score_stride=stride), selection=SelectionConfig(unit="sequence"))
    module = CGGRStep(model, cfg)
    input_ids, mask, labels = _disjoint_batch()
    targets = shift_targets(labels, mask)
    with torch.no_grad():
        h = module.router.hidden_states(input_ids, mask).double()
    logp = torch.log_softmax(h @ module.head.weight.detach().double().T, dim=-1)
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    seq_nll = []
    for b in range(B):
        at = (targets[b] != IGNORE_INDEX).nonzero()[:, 0][::stride]  # every stride-th trainable position
        seq_nll.append(float(nll[b, at].mean()))
    want_rows = sorted(sorted(range(B), key=lambda b: -seq_nll[b])[: math.ceil(0.5 * B)])

    score, stats = module.score_and_stats(input_ids, mask, targets)
    assert score.shape == (B, math.ceil(T / stride))
    assert torch.isfinite(score[3]).any()  # 3 prompt tokens and 2 pads: still scored
    kept = module.route(input_ids, mask, targets).kept
    assert sorted(int(b) for b in kept.any(dim=1).nonzero()[:, 0]) == want_rows
    assert torch.equal(kept, (targets != IGNORE_INDEX) & kept.any(dim=1, keepdim=True))  # every label of a kept row


def test_score_stride_is_validated():
    from lightning_cggr.config import ConfigError, parse_config

    for cggr, words in [
        ({"router": {"score_stride": 0}}, "must be an integer >= 1"),
        ({"router": {"score_stride": 2}}, "token selection needs every token's score"),
        ({"router": {"score_stride": 2}, "scoring": "random", "selection": {"unit": "sequence"}}, "reads no router"),
        ({"router": {"score_stride": 2}, "selection": {"unit": "sequence", "strategy": "importance"}},
         "use strategy=topk"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_config({"cggr": cggr})
    run = parse_config({"cggr": {"router": {"score_stride": 4}, "selection": {"unit": "sequence"}}})
    assert run.cggr.router.score_stride == 4


def test_score_stride_step_never_syncs():
    from conftest import make_tiny_model
    from test_selection_no_sync import forbid_host_sync

    cfg = CGGRConfig(warmup_steps=0, min_tokens_ratio=0.5, router=RouterConfig(num_layers=1, score_stride=3),
                     selection=SelectionConfig(unit="sequence"))
    step = CGGRStep(make_tiny_model("llama", num_layers=2), cfg)
    ids = torch.randint(1, 90, (4, 16))
    with forbid_host_sync():
        res = step({"input_ids": ids, "labels": ids.clone()}, global_step=0)
    res.loss.backward()
    assert torch.isfinite(res.loss)


@pytest.mark.parametrize("cggr, batch, least", [
    ({"selection": {"unit": "sequence"}}, 1, 2),  # ceil(0.25 x 1) = 1 of 1; at 2, ceil(0.5) = 1 of 2
    ({"selection": {"unit": "sequence"}, "min_tokens_ratio": 0.75}, 3, 4),  # ceil(2.25) = 3 of 3; ceil(3) = 3 of 4
    ({"selection": {"unit": "sequence"}, "min_tokens_ratio": 0.9}, 9, 10),  # ceil(8.1) = 9 of 9; ceil(9) = 9 of 10
    ({"selection": {"unit": "sequence"}, "ratio_schedule": {"kind": "dynamic", "min": 0.5, "max": 0.8}}, 1, 2),
])
def test_a_batch_too_small_for_sequence_routing_to_drop_anything_is_warned(cggr, batch, least):
    from lightning_cggr.config import parse_config, routing_warnings

    (warning,) = routing_warnings(parse_config({"cggr": cggr, "data": {"batch_size": batch}}))
    assert f"= {batch} of the batch's {batch} sequences" in warning and f"data.batch_size >= {least}" in warning
    assert routing_warnings(parse_config({"cggr": cggr, "data": {"batch_size": least}})) == []


@pytest.mark.parametrize("cggr", [
    {},  # token unit: ceil(0.25 x 127) of each block's tokens
    {"enabled": False},
    {"selection": {"unit": "sequence"}, "min_tokens_ratio": 1.0},  # every sequence is what was asked for
    {"selection": {"unit": "sequence", "strategy": "infobatch"}},  # keeps every slot by design
])
def test_no_small_batch_warning_where_it_would_not_apply(cggr):
    from lightning_cggr.config import parse_config, routing_warnings

    warned = routing_warnings(parse_config({"cggr": cggr, "data": {"batch_size": 1}}))
    assert not [w for w in warned if "of the batch's" in w]  # (ratio 1 has its own warning)


@pytest.mark.parametrize("warmup, max_steps", [(10, 10), (10, 11), (10, 5), (0, 1), (3, None), (3, -1)])
def test_a_warm_up_as_long_as_the_run_is_warned_exactly_when_the_step_routes_nothing(warmup, max_steps):
    """The reference is the step's own rule (CGGRStep.active) over the run's global steps 0 .. max_steps-1."""
    from types import SimpleNamespace

    from lightning_cggr.config import parse_config, routing_warnings
    from lightning_cggr.step import CGGRStep

    run = parse_config({"cggr": {"warmup_steps": warmup}})
    warnings = routing_warnings(run, max_steps)
    holder = SimpleNamespace(cggr=run.cggr)
    routes_nothing = (max_steps is not None and max_steps > 0
                      and not any(CGGRStep.active(holder, step) for step in range(max_steps)))
    assert len(warnings) == routes_nothing
    if routes_nothing:
        assert f"cggr.warmup_steps={warmup} with trainer.max_steps={max_steps}" in warnings[0]


@pytest.mark.parametrize("warmup, steps, shape, ratio, max_steps", [
    (10, 100, "cosine", 0.25, 100),  # the preset in the default run: ends at 0.272
    (10, 100, "cosine", 0.25, 110),  # one routed step short: 0.2502
    (10, 100, "linear", 0.25, 111),  # the last step is the first at the target
    (0, 5, "linear", 0.5, 3),
    (3, 1, "linear", 0.25, 4),       # a single routed step, at p = 0: ratio 1.0
    (3, 1, "linear", 0.25, 5),
    (2, 50, "linear", 1.0, 10),      # a target of 1.0 anneals nowhere
    (2, 50, "linear", 0.25, None),   # the run's length is unknown (epochs)
    (2, 50, "linear", 0.25, -1),
])
def test_a_curriculum_longer_than_the_run_is_warned_exactly_when_its_last_step_misses_the_target(
        warmup, steps, shape, ratio, max_steps):
    """The reference is the step's own ratio (CGGRStep.ratio_in_force) at the run's last global step."""
    from types import SimpleNamespace

    from lightning_cggr.config import parse_config, routing_warnings
    from lightning_cggr.step import CGGRStep

    def routing_warnings_(run, steps):  # the curriculum's (a target ratio of 1 has its own warning)
        return [w for w in routing_warnings(run, steps) if "ratio_schedule" in w]

    run = parse_config({"cggr": {"warmup_steps": warmup, "min_tokens_ratio": ratio,
                                 "ratio_schedule": {"kind": "curriculum", "steps": steps, "shape": shape}}})
    warnings = routing_warnings_(run, max_steps)
    holder = SimpleNamespace(cggr=run.cggr)
    holder.active = lambda step: CGGRStep.active(holder, step)
    last = CGGRStep.ratio_in_force(holder, max_steps - 1) if max_steps and max_steps > warmup else None
    assert len(warnings) == (last is not None and last > ratio)
    if warnings:
        printed = re.search(r"keeps ratio ([0-9.]+);", warnings[0]).group(1)
        assert abs(float(printed) - last) <= 0.5 * 10 ** -len(printed.split(".")[1])  # last, as rounded
        assert float(printed) != ratio and f"cggr.ratio_schedule.steps={steps}" in warnings[0]
        shorter = max_steps - warmup - 1  # the suggested fixes end the anneal on the last step
        if shorter >= 1:
            assert f"steps <= {shorter}" in warnings[0]
            fixed = parse_config({"cggr": {"warmup_steps": warmup, "min_tokens_ratio": ratio,
                                           "ratio_schedule": {"kind": "curriculum", "steps": shorter, "shape": shape}}})
            assert routing_warnings_(fixed, max_steps) == []
        assert routing_warnings_(run, warmup + steps + 1) == []


@pytest.mark.parametrize("prune, anneal, warmup, max_steps", [
    (0.5, 0.125, 10, 100),  # the preset: prunes at steps 10-87
    (0.5, 1.0, 10, 100),    # annealed from step 0: never prunes
    (0.5, 0.9, 10, 100),    # stops at step 10, where routing starts
    (0.5, 0.9, 10, 101),    # stops at step 11: step 10 prunes
    (0.0, 0.125, 10, 100),  # drops nothing anywhere
    (0.5, 0.0, 0, 1),
    (0.5, 1.0, 0, None),    # the run's length is unknown (epochs)
])
def test_an_infobatch_run_that_never_prunes_is_warned(prune, anneal, warmup, max_steps):
    """The reference is the step's own prune fraction (CGGRStep._prune) at every routed step of the run."""
    from types import SimpleNamespace

    from lightning_cggr.config import parse_config, routing_warnings
    from lightning_cggr.step import CGGRStep

    run = parse_config({"cggr": {"scoring": "loss", "warmup_steps": warmup,
                                 "selection": {"strategy": "infobatch", "prune": prune, "anneal_fraction": anneal}}})
    warnings = routing_warnings(run, max_steps)
    if max_steps is None:
        assert warnings == []
        return
    holder = SimpleNamespace(cggr=run.cggr, total_steps=max_steps)
    prunes = [CGGRStep._prune(holder, step) for step in range(warmup, max_steps)]
    assert len(warnings) == (not any(prunes))
    if warnings:
        assert ("prune=0" if prune == 0 else f"anneal_fraction={anneal:g} with trainer.max_steps={max_steps}") in warnings[0]


@pytest.mark.parametrize("rows, trained", [(1, 1), (2, 1), (3, 1), (4, 1)])
def test_sequence_routing_keeps_what_the_warning_says(rows, trained):
    """The step itself: at ratio 0.25 a batch of one row trains that row, a batch of 2-4 rows one row."""
    model = _untied_llama()
    cfg = CGGRConfig(scoring="loss", min_tokens_ratio=0.25, warmup_steps=0, router=RouterConfig(num_layers=1),
                     selection=SelectionConfig(unit="sequence"))
    step = CGGRStep(model, cfg)
    input_ids, mask, labels = _disjoint_batch()
    targets = shift_targets(labels[:rows], mask[:rows])
    kept = step.route(input_ids[:rows], mask[:rows], targets).kept
    assert int(kept.any(dim=1).sum()) == trained


@pytest.mark.slow
def test_train_logs_the_small_batch_warning_and_trains_batch_one(tmp_path, caplog):
    from hydra import compose, initialize_config_dir

    from lightning_cggr.train import CONF_DIR, train

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "cggr=sequence", "data.batch_size=1", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
            "+trainer.limit_val_batches=2", f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'tok'}"])
    with caplog.at_level("WARNING", logger="lightning_cggr.train"):
        metrics = train(cfg)
    assert any("routing saves nothing; use data.batch_size >= 2" in r.getMessage() for r in caplog.records)
    assert math.isfinite(metrics["val/loss"])

"""Router-free self-scoring, Rho-1 excess loss, the random-token control, curriculum and dynamic ratio,
and the kept/dropped score metrics -- each against a float64 hand computation or a formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import kept_mean_loss, make_batch, make_tiny_model
from lightning_cggr.config import CGGRConfig, RatioScheduleConfig, RouterConfig, SelectionConfig
from lightning_cggr.module import CGGRModule
from lightning_cggr.step import CGGRStep
from lightning_cggr.routing.schedule import curriculum_ratio, host_ratio
from lightning_cggr.routing.selection import IGNORE_INDEX, shift_targets

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def _sharp_model(seed=0, arch="llama"):
    model = make_tiny_model(arch, num_layers=2, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    return model


def _hand_logp(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(hidden.detach().double() @ weight.detach().double().T, dim=-1)


def _hand_topk_keep(score: torch.Tensor, trainable: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per sequence: the ceil(ratio * n) highest scores among trainable tokens, by Python sorting."""
    keep = torch.zeros_like(trainable)
    for b in range(score.shape[0]):
        pos = [t for t in range(score.shape[1]) if trainable[b, t]]
        pos.sort(key=lambda t: (-float(score[b, t]), t))
        for t in pos[: math.ceil(ratio * len(pos))]:
            keep[b, t] = True
    return keep


# ---- router-free self-scoring --------------------------------------------------------------------
@pytest.mark.parametrize("scoring", ["entropy", "loss"])
def test_self_scoring_selection_and_gradient_match_float64_hand_computation(scoring):
    model = _sharp_model(arch="gpt2").eval()  # no dropout, so a second forward reproduces the scoring one
    cfg = CGGRConfig(scoring=scoring, min_tokens_ratio=0.3, warmup_steps=0, router=RouterConfig(source="final"))
    module = CGGRStep(model, cfg)
    assert module.router is None  # no extra layers: nothing but the main forward
    batch = make_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shift_targets(batch["labels"], mask)
    trainable = targets != IGNORE_INDEX

    hidden, _, selection, kept = module.route(ids, mask, targets)[:4]
    assert hidden.requires_grad  # the very forward that scored is the one trained

    W = model.get_output_embeddings().weight
    logp = _hand_logp(model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state, W)
    hand = -(logp.exp() * logp).sum(-1) if scoring == "entropy" else -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    want = _hand_topk_keep(hand, trainable, 0.3)
    assert torch.equal(kept, want)

    loss = kept_mean_loss(module, hidden, targets, selection)
    loss.backward()
    got = W.grad.clone()
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    ref = F.cross_entropy(logits[want].float(), targets[want])  # only the kept tokens back-propagate
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, W.grad, rtol=1e-4, atol=1e-6)


# ---- Rho-1 excess loss ----------------------------------------------------------------------------
def test_excess_loss_is_current_minus_reference_nll():
    model, reference = _sharp_model(seed=0), _sharp_model(seed=1)
    cfg = CGGRConfig(scoring="excess_loss", warmup_steps=0,
                     router=RouterConfig(num_layers=1, reference="given", reference_dtype="float32"))
    module = CGGRStep(model, cfg, reference=reference)
    batch = make_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shift_targets(batch["labels"], mask)
    got = module.score_and_stats(ids, mask, targets)[0]

    safe = targets.clamp(min=0)[..., None]
    nll_cur = -_hand_logp(module.router.hidden_states(ids, mask), model.get_output_embeddings().weight).gather(-1, safe)[..., 0]
    with torch.no_grad():
        ref_h = reference.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    nll_ref = -_hand_logp(ref_h, reference.get_output_embeddings().weight).gather(-1, safe)[..., 0]
    m = targets != IGNORE_INDEX
    assert torch.equal(torch.isfinite(got), m)
    torch.testing.assert_close(got[m].double(), (nll_cur - nll_ref)[m], rtol=1e-4, atol=1e-4)

    # frozen and unregistered: no parameters, no state-dict keys, no gradients
    ref_params = {id(p) for p in reference.parameters()}
    wrapper = CGGRModule(model, cfg, reference=reference)  # what a Trainer would optimize and checkpoint
    assert not ref_params & {id(p) for p in wrapper.parameters()}
    assert len(wrapper.state_dict()) == len(model.state_dict())
    assert not any(p.requires_grad for p in reference.parameters())


def test_excess_loss_reference_in_bf16_runs_and_checks_vocab():
    model = _sharp_model(seed=0)
    cfg = CGGRConfig(scoring="excess_loss", router=RouterConfig(num_layers=1, reference="given"))  # bf16 default
    module = CGGRStep(model, cfg, reference=_sharp_model(seed=1))
    assert next(module.reference.model.parameters()).dtype == torch.bfloat16
    batch = make_batch()
    targets = shift_targets(batch["labels"], batch["attention_mask"])
    score = module.score_and_stats(batch["input_ids"], batch["attention_mask"], targets)[0]
    assert torch.equal(torch.isfinite(score), targets != IGNORE_INDEX)
    with pytest.raises(ValueError, match="reference model vocabulary 50 != the trained model's 97"):
        CGGRStep(model, cfg, reference=make_tiny_model("llama", num_layers=1, vocab_size=50))


# ---- random-token control ---------------------------------------------------------------------------
def test_random_token_control_is_seeded_exact_and_trainable_only():
    model = _sharp_model()
    batch = make_batch(batch_size=3, seq_len=16)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shift_targets(batch["labels"], mask)
    trainable = targets != IGNORE_INDEX

    def keep(seed, step, **sel):
        cfg = CGGRConfig(scoring="random", seed=seed, min_tokens_ratio=0.3, warmup_steps=0, selection=SelectionConfig(**sel))
        with torch.no_grad():
            return CGGRStep(model, cfg).route(ids, mask, targets, global_step=step).kept

    a = keep(0, 5)
    assert torch.equal(a, keep(0, 5))
    assert not torch.equal(a, keep(0, 6)) and not torch.equal(a, keep(1, 5))
    assert not (a & ~trainable).any()
    assert a.sum(1).tolist() == [math.ceil(0.3 * int(n)) for n in trainable.sum(1)]
    g = keep(0, 5, scope="batch")
    assert int(g.sum()) == math.ceil(0.3 * int(trainable.sum())) and not (g & ~trainable).any()


# ---- curriculum ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, step, want",
    [
        ("linear", 3, 1.0),  # warmup: all tokens
        ("linear", 5, 1.0),  # first routed step: the anneal starts at 1.0
        ("linear", 7, 1.0 - 0.8 * 0.2),
        ("cosine", 7, 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.2))),
        ("cosine", 10, 0.6),
        ("linear", 15, 0.2),
        ("cosine", 400, 0.2),
    ],
)
def test_curriculum_ratio_in_force_follows_formula(shape, step, want):
    cfg = CGGRConfig(min_tokens_ratio=0.2, warmup_steps=5, ratio_schedule=RatioScheduleConfig(kind="curriculum", steps=10, shape=shape))
    module = CGGRStep(_sharp_model(), cfg)
    assert module.ratio_in_force(step) == pytest.approx(want, abs=1e-12)


def test_curriculum_kept_count_at_a_chosen_step():
    cfg = CGGRConfig(scoring="loss", min_tokens_ratio=0.2, warmup_steps=5,
                     ratio_schedule=RatioScheduleConfig(kind="curriculum", steps=10, shape="linear"))
    module = CGGRStep(_sharp_model(), cfg)
    batch = make_batch(batch_size=2, seq_len=20)
    targets = shift_targets(batch["labels"], batch["attention_mask"])
    with torch.no_grad():  # step 9: p = 0.4 -> ratio 0.68
        kept = module.route(batch["input_ids"], batch["attention_mask"], targets, global_step=9).kept
    n = (targets != IGNORE_INDEX).sum(1)
    assert kept.sum(1).tolist() == [math.ceil(0.68 * int(x)) for x in n]
    assert curriculum_ratio(0.2, 4, 10, "linear") == pytest.approx(0.68)
    assert host_ratio("constant", 0.2, 9, 5) == 0.2


# ---- dynamic ratio, token unit, and the score metrics ------------------------------------------------
def test_a_dynamic_ratio_at_its_bounds_keeps_ceil_of_the_bound():
    from lightning_cggr.routing.schedule import dynamic_ratio
    from lightning_cggr.routing.selection import kept_count

    n = torch.tensor([10, 20, 7])
    low, high = dynamic_ratio(torch.tensor(1.0), 0.3, 0.7), dynamic_ratio(torch.tensor(0.0), 0.3, 0.7)
    assert kept_count(n, low).tolist() == [3, 6, 3]  # ceil(0.3 n), not one more from fp32's 0.30000001
    assert kept_count(n, high).tolist() == [7, 14, 5]


def test_dynamic_ratio_and_score_metrics_follow_hand_computation():
    model = _sharp_model()
    cfg = CGGRConfig(scoring="loss", warmup_steps=0, router=RouterConfig(num_layers=1),
                     ratio_schedule=RatioScheduleConfig(kind="dynamic", min=0.2, max=0.8))
    module = CGGRStep(model, cfg)
    batch = make_batch(batch_size=3, seq_len=16)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shift_targets(batch["labels"], mask)
    trainable = targets != IGNORE_INDEX
    with torch.no_grad():
        _, _, selection, kept, metrics = module.route(ids, mask, targets)[:5]
        logp = _hand_logp(module.router.hidden_states(ids, mask), model.get_output_embeddings().weight)
    assert selection.index.numel() == 3 * math.ceil(0.8 * 16)  # static capacity from the max
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    conf = float(torch.exp(-nll)[trainable].mean())
    r = 0.8 - 0.6 * conf
    torch.testing.assert_close(metrics["train/ratio"].double(), torch.tensor(r, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    n = trainable.sum(1).tolist()
    assert all(abs(r * x - round(r * x)) > 1e-3 for x in n)  # away from a rounding boundary
    assert torch.equal(kept, _hand_topk_keep(nll, trainable, r))
    # kept vs dropped mean score
    dropped = trainable & ~kept
    torch.testing.assert_close(metrics["train/score_kept"].double(), nll[kept].mean(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(metrics["train/score_dropped"].double(), nll[dropped].mean(), rtol=1e-4, atol=1e-4)


def test_stratified_with_minimum_through_the_step_is_seeded():
    model = _sharp_model()
    batch = make_batch(batch_size=3, seq_len=16)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shift_targets(batch["labels"], mask)
    trainable = targets != IGNORE_INDEX

    def keep(seed, step):
        sel = SelectionConfig(scope="batch", strategy="stratified", strata=3, min_per_sequence=2)
        cfg = CGGRConfig(scoring="loss", seed=seed, min_tokens_ratio=0.1, warmup_steps=0, selection=sel)
        with torch.no_grad():
            return CGGRStep(model, cfg).route(ids, mask, targets, global_step=step).kept

    a = keep(0, 1)
    assert torch.equal(a, keep(0, 1)) and not (a & ~trainable).any()
    n = trainable.sum(1)
    assert int(a.sum()) == max(math.ceil(0.1 * int(n.sum())), int(n.clamp(max=2).sum()))
    assert (a.sum(1) >= n.clamp(max=2)).all()


def test_reference_loads_by_name_from_a_local_checkpoint(tmp_path):
    from lightning_cggr.routing.reference import load_reference

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    saved = make_tiny_model("llama", num_layers=1, seed=4)
    saved.save_pretrained(tmp_path)  # a checkpoint folder holds a tokenizer too; the builder loads both
    vocab = {f"t{i}": i for i in range(97)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(tmp_path)
    loaded = load_reference(str(tmp_path), "float32")
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # a pathlib.Path, as a Python user writes it (the Hydra job passes a string)
    cfg = CGGRConfig(scoring="excess_loss", router=RouterConfig(num_layers=1, reference=tmp_path, reference_dtype="float32"))
    module = CGGRStep(make_tiny_model("llama", num_layers=2), cfg)  # no module given: loaded by name
    assert module.reference is not None and not module.reference.model.training


def test_a_run_folder_or_its_checkpoint_serves_as_the_reference(tmp_path, monkeypatch):
    """cggr.router.reference names an earlier run as a user has it (its folder, or a checkpoint in it):
    its trained weights, those its last.ckpt holds; a wrong name is an error naming that setting."""
    from test_resume import make_cfg

    from lightning_cggr.errors import UserError
    from lightning_cggr.routing.reference import load_reference
    from lightning_cggr.train import train

    train(make_cfg(tmp_path, "first", "trainer.max_steps=3"))
    run = tmp_path / "first"
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for source in (run, run / "checkpoints" / "last.ckpt"):
        loaded = load_reference(str(source), "float32").state_dict()
        assert loaded and all(torch.equal(v, saved[f"model.{k}"]) for k, v in loaded.items()), source
    # and a run scores against it, end to end
    metrics = train(make_cfg(tmp_path, "second", "trainer.max_steps=2", "cggr.scoring=excess_loss",
                             "cggr.warmup_steps=0", f"cggr.router.reference={run}"))
    assert math.isfinite(metrics["train/loss"])

    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, message in [(tmp_path / "nowhere", "checkpoint folder not found"),
                          (tmp_path / "empty", "cannot load a causal LM from this folder"),
                          ("lightning-cggr-tests/no-such-model", "cggr.router.reference=smollm2_gguf"),
                          (run / "checkpoints" / "missing.ckpt", "checkpoint folder not found")]:
        with pytest.raises(UserError) as info:
            load_reference(str(name), "float32")
        assert str(info.value).startswith(f"cggr.router.reference={name}: ") and message in str(info.value)
        assert "model.name" not in str(info.value) and "model=smollm2_gguf" not in str(info.value)

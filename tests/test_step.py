"""One training step for train() and the benchmarks: the benchmark harness (experiments.bench.Runner,
driving lightning_cggr.step.optimizer_step) and Lightning's Trainer (driving CGGRModule) give the
same gradients and the same parameter updates from the same weights and batches.

Two optimizer steps of two accumulated micro-batches each, CGGR warm-up of one step (so step 0 is
standard and step 1 routes: the step counter must reach the step), clipping at a norm that binds,
and the LR schedule of train() (no LR warm-up, so both updates are non-zero).
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_batch, make_tiny_model
from experiments.bench import Runner
from experiments.compose import compose, parse_run
from lightning_cggr.module import CGGRModule

CASES = {
    "standard": ["cggr.enabled=false"],
    "token": ["cggr.scoring=combined"],
    "sequence": ["cggr.selection.unit=sequence", "cggr.scoring=loss"],
    "importance": ["cggr.selection.strategy=importance", "cggr.scoring=loss", "cggr.selection.p_min=0.1"],
    "importance_sequence": ["cggr.selection.unit=sequence", "cggr.selection.strategy=importance", "cggr.scoring=loss",
                            "cggr.selection.p_min=0.1"],
}
COMMON = [
    "cggr.warmup_steps=1", "cggr.router.num_layers=1", "cggr.min_tokens_ratio=0.5", "loss.impl=torch",
    "optim.warmup_steps=0", "trainer.accumulate_grad_batches=2",
]
CLIP = 0.05  # binds (the gradient norm is larger); without clipping the kept-token scale shows fully


class _Snapshots(CGGRModule):
    """CGGRModule recording the gradients the optimizer is about to apply (after the kept-token
    correction and clipping), once per optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.snaps = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.snaps.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})


def _trainer_run(model, run, batches, clip):
    module = _Snapshots(model, run.cggr, run.loss, run.optim)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, accumulate_grad_batches=2, gradient_clip_val=clip, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2
    return module.snaps


def _harness_run(model, config, batches):
    runner = Runner(model, config, "cpu", total_steps=2)
    snaps = []

    def record(optimizer, args, kwargs):  # (a hook: replacing optimizer.step makes the scheduler warn)
        snaps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    runner.optimizer.register_step_pre_hook(record)
    runner.train_step(batches[0:2])
    runner.train_step(batches[2:4])
    return snaps


@pytest.mark.parametrize("clip", [None, CLIP], ids=["no-clip", "clip"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_harness_step_equals_trainer_step(case, clip, one_thread):
    config = OmegaConf.to_container(compose([*COMMON, *CASES[case], f"trainer.gradient_clip_val={clip or 'null'}"]), resolve=True)
    run = parse_run(config)
    model = make_tiny_model("llama", num_layers=2)
    batches = [make_batch(batch_size=4, seq_len=16, seed=10 + i) for i in range(4)]
    by_trainer, by_harness = copy.deepcopy(model), copy.deepcopy(model)

    snaps_t = _trainer_run(by_trainer, run, batches, clip)
    snaps_h = _harness_run(by_harness, config, batches)

    assert len(snaps_t) == len(snaps_h) == 2
    for step, (gt, gh) in enumerate(zip(snaps_t, snaps_h)):
        assert gt.keys() == gh.keys()
        norm = torch.sqrt(sum(g.double().square().sum() for g in gt.values()))
        if clip:
            assert norm == pytest.approx(clip, rel=1e-3), "clipping must bind for the test to cover it"
        else:
            assert norm > 2 * CLIP
        for name in gt:
            torch.testing.assert_close(gh[name], gt[name], rtol=1e-5, atol=1e-7, msg=f"step {step}: {name}")
    for (name, pt), ph in zip(by_trainer.named_parameters(), by_harness.parameters()):
        torch.testing.assert_close(ph, pt, rtol=1e-5, atol=1e-7, msg=name)
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), by_harness.parameters())]
    assert all(moved), "every parameter must have been updated"


def test_routed_step_differs_from_the_standard_step(one_thread):
    """The comparison above can tell routing from no routing: the token case's second update is not
    the standard one."""
    batches = [make_batch(batch_size=4, seq_len=16, seed=10 + i) for i in range(4)]
    model = make_tiny_model("llama", num_layers=2)
    out = {}
    for case in ("standard", "token"):
        config = OmegaConf.to_container(compose([*COMMON, *CASES[case], "trainer.gradient_clip_val=null"]), resolve=True)
        out[case] = _harness_run(copy.deepcopy(model), config, batches)
    assert all(torch.equal(out["standard"][0][n], out["token"][0][n]) for n in out["standard"][0])  # warm-up step
    assert not all(torch.equal(out["standard"][1][n], out["token"][1][n]) for n in out["standard"][1])


@pytest.mark.parametrize("impl", ["torch", "naive", "liger"])
def test_label_smoothing_and_z_loss_shape_the_training_loss_and_not_the_validation_loss(impl, one_thread):
    """loss.label_smoothing and loss.z_loss against float64 torch on the step's own hidden states:
    the training step's loss sum and the LM head's gradient are cross-entropy with smoothing plus
    z * logsumexp**2 over the kept tokens; eval_terms stays the plain NLL."""
    if impl == "liger":
        pytest.importorskip("liger_kernel")
    import torch.nn.functional as F

    from lightning_cggr.config import CGGRConfig, LossConfig
    from lightning_cggr.routing.selection import shift_targets
    from lightning_cggr.step import CGGRStep

    eps, z = 0.1, 1e-2
    model = make_tiny_model("llama", num_layers=2)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied: the head's grad alone
    step = CGGRStep(model, CGGRConfig(enabled=False), LossConfig(impl=impl, label_smoothing=eps, z_loss=z))
    batch = make_batch(batch_size=3, seq_len=12)
    result = step(batch, global_step=0)
    result.nll_sum.backward()

    targets = shift_targets(batch["labels"], batch["attention_mask"]).reshape(-1)
    with torch.no_grad():
        hidden = step.hidden_states(batch["input_ids"], batch["attention_mask"]).reshape(targets.numel(), -1).double()
    w = model.lm_head.weight.detach().double().requires_grad_(True)
    logits = hidden @ w.t()
    kept = targets != -100
    lse = torch.logsumexp(logits[kept], dim=-1)
    expected = F.cross_entropy(logits, targets, label_smoothing=eps, reduction="sum") + z * lse.square().sum()
    expected.backward()
    torch.testing.assert_close(result.nll_sum.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.lm_head.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-6)
    nll, count = step.eval_terms(batch)
    torch.testing.assert_close(nll.double(), F.cross_entropy(logits.detach(), targets, reduction="sum"),
                               rtol=1e-5, atol=1e-5)
    assert int(count) == int(kept.sum())


def _tensor_devices(module: torch.nn.Module) -> dict[str, torch.device]:
    """Every parameter, buffer and torchmetrics state of ``module``, by name."""
    from torchmetrics import Metric

    out = {n: t.device for n, t in [*module.named_parameters(), *module.named_buffers()]}
    for name, sub in module.named_modules():
        if isinstance(sub, Metric):
            for state in sub._defaults:
                value = getattr(sub, state)
                for i, t in enumerate(value if isinstance(value, list) else [value]):
                    out[f"{name}.{state}[{i}]"] = t.device
    return out


def test_module_built_around_a_model_on_a_device_lives_on_that_device():
    """The harness once built the module after ``model.to(cuda)`` and its metric states stayed on
    the CPU. The meta device stands in for an accelerator: every state must follow the model."""
    model = make_tiny_model("llama", num_layers=2).to("meta")
    module = CGGRModule(model)
    devices = _tensor_devices(module)
    assert any("step_metrics" in n for n in devices) and any("val_nll_sum" in n for n in devices)
    wrong = {n: d for n, d in devices.items() if d.type != "meta"}
    assert not wrong, f"not on the model's device: {wrong}"


def test_lr_factor_follows_warmup_cosine_and_holds_the_floor():
    from lightning_cggr.config import OptimConfig
    from lightning_cggr.step import lr_factor

    cfg = OptimConfig(warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg, 12) for s in (0, 1, 4)] == [0.0, 0.25, 1.0]
    assert lr_factor(8, cfg, 12) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_factor(12, cfg, 12) == pytest.approx(0.1)
    assert lr_factor(30, cfg, 12) == pytest.approx(0.1)  # past the end: the floor, not a new cycle


@pytest.mark.parametrize("warmup, max_steps", [(20, 100), (20, 21), (20, 20), (20, 5), (1, 2), (1, 3), (0, 1),
                                               (50, None), (50, -1)])
def test_an_lr_warm_up_as_long_as_the_run_is_warned_exactly_when_the_lr_never_decays(warmup, max_steps):
    """The reference is the LR the run's own scheduler gives AdamW at each of its steps."""
    from lightning_cggr.config import OptimConfig, lr_warnings
    from lightning_cggr.step import build_scheduler

    cfg = OptimConfig(lr=1e-3, warmup_steps=warmup)
    warnings = lr_warnings(cfg, max_steps)
    if max_steps is None or max_steps < 1:
        assert warnings == []  # the run's length is not known from the config
        return
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler, lrs = build_scheduler(optimizer, cfg, max_steps), []
    for _ in range(max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ramps_only = warmup > 0 and all(a <= b for a, b in zip(lrs, lrs[1:]))  # rises, or peaks at the end
    assert len(warnings) == ramps_only
    if ramps_only:
        assert f"optim.warmup_steps={warmup} with trainer.max_steps={max_steps}" in warnings[0]
        assert f"(to {lrs[-1] / cfg.lr:.3g} x optim.lr at its last step)" in warnings[0]

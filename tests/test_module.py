"""The training step: loss against a float64 reference, zero gradient for unkept rows, warmup,
empty selections, and one real optimizer step for each architecture."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import kept_mean_loss, make_batch, make_tiny_model
from lightning_cggr.config import CGGRConfig, LossConfig, OptimConfig, RouterConfig
from lightning_cggr.module import CGGRModule
from lightning_cggr.routing.selection import IGNORE_INDEX, select, shift_targets


def _module(arch="llama", impl="torch", **cggr):
    cggr.setdefault("warmup_steps", 0)
    cggr.setdefault("router", RouterConfig(num_layers=1))
    optim = OptimConfig(warmup_steps=0)  # a linear lr warmup would make step 0's lr exactly 0
    return CGGRModule(make_tiny_model(arch), CGGRConfig(**cggr), LossConfig(impl=impl), optim)


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_loss_is_mean_cross_entropy_over_kept_tokens(arch, impl):
    module = _module(arch, impl, min_tokens_ratio=0.3)
    batch = make_batch(batch_size=3, seq_len=14)
    targets = shift_targets(batch["labels"], batch["attention_mask"])
    score = module.step.score_and_stats(batch["input_ids"], batch["attention_mask"], targets)[0]
    sel = select(score, targets != IGNORE_INDEX, 0.3)
    hidden = module(batch["input_ids"], batch["attention_mask"])
    loss = kept_mean_loss(module.step, hidden, targets, sel)

    # reference: float64 full logits, F.cross_entropy over the kept positions only
    logits = hidden.double() @ module.step.head.weight.double().T
    want = F.cross_entropy(logits[sel.keep], targets[sel.keep])
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_unkept_positions_get_zero_gradient():
    module = _module("llama", min_tokens_ratio=0.25)
    batch = make_batch(batch_size=2, seq_len=16, pad_tail=False)
    targets = shift_targets(batch["labels"], batch["attention_mask"])
    score = module.step.score_and_stats(batch["input_ids"], batch["attention_mask"], targets)[0]
    sel = select(score, targets != IGNORE_INDEX, 0.25)
    hidden = module(batch["input_ids"], batch["attention_mask"]).detach().requires_grad_(True)
    kept_mean_loss(module.step, hidden, targets, sel).backward()
    row_has_grad = hidden.grad.abs().sum(-1) > 0
    assert torch.equal(row_has_grad, sel.keep)


def test_training_step_with_no_trainable_token_gives_zero_loss_with_a_graph():
    module = _module("llama")
    batch = make_batch()
    batch["labels"].fill_(IGNORE_INDEX)
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


class _Recorder(L.Callback):
    def __init__(self):
        self.ratios = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ratios.append(float(trainer.callback_metrics["train/kept_ratio"]))


def _fit(module, steps, batch_size=4, seq_len=16, callbacks=()):
    batches = [make_batch(batch_size, seq_len, seed=i) for i in range(steps)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_warmup_trains_all_tokens_then_routes():
    module = _module("llama", min_tokens_ratio=0.25, warmup_steps=3)
    rec = _Recorder()
    _fit(module, 6, callbacks=[rec])
    batch = make_batch(4, 16, seed=5)
    t = shift_targets(batch["labels"], batch["attention_mask"])
    n = (t != IGNORE_INDEX).sum(1)
    want_after = float(torch.ceil(n * 0.25).sum() / n.sum())
    assert rec.ratios[:3] == [1.0, 1.0, 1.0]
    assert rec.ratios[5] == pytest.approx(want_after)


def test_disabled_cggr_is_the_standard_baseline():
    module = CGGRModule(make_tiny_model("llama"), CGGRConfig(enabled=False), LossConfig(impl="torch"))
    assert module.step.router is None
    batch = make_batch()
    t = shift_targets(batch["labels"], batch["attention_mask"])
    hidden, targets, selection, kept = module.step.route(batch["input_ids"], batch["attention_mask"], t)[:4]
    assert selection is None and torch.equal(kept, t != IGNORE_INDEX)
    loss = kept_mean_loss(module.step, hidden, targets, selection)
    logits = hidden.double() @ module.step.head.weight.double().T
    want = F.cross_entropy(logits.view(-1, logits.shape[-1]), t.view(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("selection", [{}, {"unit": "sequence"}, {"strategy": "importance"}])
def test_a_kept_ratio_of_1_trains_as_standard_training_does(selection):
    """What the ratio-1 warning (config.routing_warnings) says: every token keeps its label, so the
    loss and gradients are those of cggr.enabled=false, the router's forward spent for nothing."""
    from lightning_cggr.config import SelectionConfig, parse_config, routing_warnings

    model = make_tiny_model("llama")
    batch = make_batch(batch_size=3, seq_len=14)
    grads = []
    for cggr in (CGGRConfig(enabled=False), CGGRConfig(min_tokens_ratio=1.0, warmup_steps=0,
                                                        selection=SelectionConfig(**selection))):
        model.zero_grad()
        loss = CGGRModule(model, cggr, LossConfig(impl="torch")).training_step(batch, 0)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-7)
    for got, want in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    (warning,) = routing_warnings(parse_config({"cggr": {"min_tokens_ratio": 1.0, "selection": selection}}))
    assert warning.startswith("cggr.min_tokens_ratio=1 keeps every") and "cggr.enabled=false" in warning


@pytest.mark.parametrize("cggr", [
    {"min_tokens_ratio": 0.99},
    {"min_tokens_ratio": 1.0, "selection": {"strategy": "noise_excluded"}},  # still skips the noisiest
    {"min_tokens_ratio": 1.0, "selection": {"strategy": "infobatch"}},  # prunes by its own rule
    {"min_tokens_ratio": 1.0, "enabled": False},
])
def test_no_ratio_1_warning_where_tokens_are_still_dropped(cggr):
    from lightning_cggr.config import parse_config, routing_warnings

    assert not [w for w in routing_warnings(parse_config({"cggr": cggr})) if "keeps every" in w]


def test_each_architecture_trains_one_step(arch):
    module = _module(arch, min_tokens_ratio=0.5)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _fit(module, 1)
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    changed = sum(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert changed > 0


def test_loss_chunk_size_and_grad_accum_reach_the_kernel(monkeypatch):
    """loss.chunk_size / loss.grad_accum are passed to the loss kernel by the shared step (and the
    loss does not change: fp32 weights accumulate in fp32 either way)."""
    import lightning_cggr.step as step_mod

    seen = []
    real = step_mod.linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("chunk_size", "grad_accum")})
        return real(*args, **kwargs)

    monkeypatch.setattr(step_mod, "linear_cross_entropy", spy)
    batch = make_batch(batch_size=2, seq_len=10)
    losses = []
    for loss_cfg in (LossConfig(impl="torch"), LossConfig(impl="torch", chunk_size=3, grad_accum="weight")):
        module = _module("llama", "torch", min_tokens_ratio=0.5)
        module.step.loss_cfg = loss_cfg
        t = shift_targets(batch["labels"], batch["attention_mask"])
        hidden, targets, selection, _ = module.step.route(batch["input_ids"], batch["attention_mask"], t)[:4]
        losses.append(kept_mean_loss(module.step, hidden, targets, selection))
    assert seen[0] == {"chunk_size": None, "grad_accum": None}
    assert seen[-1] == {"chunk_size": 3, "grad_accum": "weight"}
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_training_step_goes_through_the_triton_kernel_and_matches_torch(monkeypatch):
    """loss.impl=triton really calls the Triton kernel (interpreter on CPU) and equals impl=torch."""
    import lightning_cggr.kernels.cross_entropy as triton_ce

    calls = {"loss": 0, "stats": 0}
    real_loss, real_stats = triton_ce.triton_linear_cross_entropy, triton_ce.triton_token_stats

    def spy_loss(*args, **kwargs):
        calls["loss"] += 1
        return real_loss(*args, **kwargs)

    def spy_stats(*args, **kwargs):
        calls["stats"] += 1
        return real_stats(*args, **kwargs)

    monkeypatch.setattr(triton_ce, "triton_linear_cross_entropy", spy_loss)
    monkeypatch.setattr(triton_ce, "triton_token_stats", spy_stats)
    batch = make_batch(batch_size=2, seq_len=10)
    grads = {}
    for impl in ("torch", "triton"):
        module = _module("llama", impl, min_tokens_ratio=0.5)
        t = shift_targets(batch["labels"], batch["attention_mask"])
        hidden, targets, selection, _ = module.step.route(batch["input_ids"], batch["attention_mask"], t)[:4]
        loss = kept_mean_loss(module.step, hidden, targets, selection)
        loss.backward()
        grads[impl] = (loss.detach(), selection.keep, module.step.head.weight.grad.clone())
    assert calls == {"loss": 1, "stats": 1}
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(grads["triton"][1], grads["torch"][1])
    torch.testing.assert_close(grads["triton"][2], grads["torch"][2], rtol=1e-4, atol=1e-6)


def _heldout_reference(module, batches) -> float:
    """Mean NLL over every trainable token of ``batches``: float64 logits, F.cross_entropy."""
    nll, count = 0.0, 0
    with torch.no_grad():
        module.eval()
        for b in batches:
            t = shift_targets(b["labels"], b["attention_mask"])
            logits = module(b["input_ids"], b["attention_mask"]).double() @ module.step.head.weight.double().T
            nll += F.cross_entropy(logits.view(-1, logits.shape[-1]), t.view(-1), reduction="sum").item()
            count += int((t != IGNORE_INDEX).sum())
    return nll / count


@pytest.mark.parametrize("entry, prefix", [("validate", "val"), ("test", "test")])
def test_validation_loss_is_token_weighted_mean_over_all_trainable_tokens(entry, prefix):
    """val/loss uses every trainable token (never routed), weighted by token across batches; so does
    trainer.test's test/loss."""
    module = _module("gpt2", min_tokens_ratio=0.25)
    batches = [make_batch(3, 12, seed=7), make_batch(2, 12, seed=8)]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    run = getattr(trainer, entry)
    got = run(module, dataloaders=torch.utils.data.DataLoader(batches, batch_size=None), verbose=False)
    assert set(got[0]) == {f"{prefix}/loss", f"{prefix}/ppl"}
    want = _heldout_reference(module, batches)
    assert got[0][f"{prefix}/loss"] == pytest.approx(want, rel=1e-5)
    assert got[0][f"{prefix}/ppl"] == pytest.approx(math.exp(want), rel=1e-4)


@pytest.mark.parametrize("entry, prefix", [("validate", "val"), ("test", "test")])
def test_several_loaders_each_get_their_own_held_out_loss(entry, prefix):
    """Two validation (or test) loaders: one loss per loader, with Lightning's dataloader_idx suffix
    (Lightning refused the module's validation_step without a dataloader_idx argument)."""
    module = _module("llama")
    sets = [[make_batch(3, 12, seed=1), make_batch(3, 12, seed=2)], [make_batch(2, 10, seed=3)]]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    loaders = [torch.utils.data.DataLoader(batches, batch_size=None) for batches in sets]
    got = getattr(trainer, entry)(module, dataloaders=loaders, verbose=False)
    for idx, batches in enumerate(sets):
        assert got[idx][f"{prefix}/loss/dataloader_idx_{idx}"] == pytest.approx(_heldout_reference(module, batches), rel=1e-5)
    assert f"{prefix}/loss" not in got[0]
    # and one loader again: the plain names
    again = getattr(trainer, entry)(module, dataloaders=loaders[1], verbose=False)
    assert again[0][f"{prefix}/loss"] == pytest.approx(got[1][f"{prefix}/loss/dataloader_idx_1"], rel=1e-6)


def test_predict_names_what_to_use_instead():
    module = _module("llama")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(NotImplementedError, match="module.model.generate"):
        trainer.predict(module, torch.utils.data.DataLoader([make_batch(2, 8)], batch_size=None))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_with_gradient_clipping_clips_like_the_unfused_step(precision):
    """The default GPU run is bf16-mixed + fused AdamW (optim.fused=auto) + clipping at 1.0; Lightning's
    mixed-precision plugin refused to clip for a fused optimizer (it failed at step 1 on an H100).
    With no loss scaler the clipping is exact: the gradient norm the optimizer sees is the clip value,
    fused or not, and both end at the same weights (to AdamW's rounding)."""
    class Recording(CGGRModule):  # the gradient norm the optimizer step sees, after the clipping hook
        seen: list

        def configure_gradient_clipping(self, optimizer, *args, **kwargs):
            super().configure_gradient_clipping(optimizer, *args, **kwargs)
            grads = [p.grad.detach().double().flatten() for p in self.parameters() if p.grad is not None]
            self.seen.append(torch.cat(grads).norm().item())

    def fit(fused, clip):
        torch.manual_seed(0)
        module = Recording(make_tiny_model("llama"), CGGRConfig(enabled=False), LossConfig(impl="torch"),
                           OptimConfig(lr=1e-2, warmup_steps=0, fused=fused))
        module.seen = []
        batches = [make_batch(4, 16, seed=i) for i in range(3)]
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, precision=precision,
                            gradient_clip_val=clip)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        assert trainer.optimizers[0].defaults["fused"] is (True if fused is True else None)
        return torch.cat([p.detach().flatten() for p in module.parameters()]), module.seen

    (fused, fused_norms), (plain, plain_norms) = fit(True, 0.05), fit(False, 0.05)
    _, raw_norms = fit(True, 0.0)
    assert len(fused_norms) == 3 and min(raw_norms) > 0.1  # clipping at 0.05 has work to do
    for norm in fused_norms + plain_norms:
        assert norm == pytest.approx(0.05, rel=1e-3)
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_clipping_with_the_norm_already_taken_is_lightnings_clipping_bit_for_bit(precision, monkeypatch):
    """The step's gradient norm (train/grad_norm, the finiteness check) is taken as Lightning's norm
    clipping takes it, and the clipping reuses it: one pass over the gradients fewer. Reference:
    Lightning's own clip_grad_norm_ (the module made to keep no norm), 3 steps clipped at 0.05 with
    weight decay in two parameter groups; every weight equal, bit for bit."""
    class LightningClips(CGGRModule):
        def _step_grad_norm(self, optimizer):
            norm = super()._step_grad_norm(optimizer)
            self._clip_norm = None  # nothing kept: Lightning computes the norm again
            return norm

    def fit(cls):
        torch.manual_seed(0)
        module = cls(make_tiny_model("llama"), CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1)),
                     LossConfig(impl="torch"), OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1))
        batches = [make_batch(4, 16, seed=i) for i in range(3)]
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, precision=precision,
                            gradient_clip_val=0.05)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        assert len(trainer.optimizers[0].param_groups) == 2
        return [p.detach().clone() for p in module.parameters()], trainer.callback_metrics["train/grad_norm"]

    calls = []
    lightnings = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or lightnings(*a, **k))
    (ours, norm) = fit(CGGRModule)
    assert calls == []  # the kept norm served
    (theirs, their_norm) = fit(LightningClips)
    assert len(calls) == 3
    assert float(norm) > 0.05  # clipping had work to do
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs)) and torch.equal(norm, their_norm)


def test_fused_adamw_is_refused_where_a_loss_scaler_clips():
    from lightning_cggr.errors import ConfigError
    from lightning_cggr.perf import adamw_kwargs
    from lightning_cggr.step import build_optimizer

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert adamw_kwargs(p, "auto", scaled_clipping=True) == {}
    with pytest.raises(ConfigError, match="optim.fused=true with a loss scaler"):
        build_optimizer(torch.nn.Linear(2, 2), OptimConfig(fused=True), scaled_clipping=True)


def test_package_exports_the_python_api_lazily():
    """``from lightning_cggr import CGGRModule, CGGRConfig, ...`` gives the submodules' own objects, and a
    bare ``import lightning_cggr`` (what every ``python -m lightning_cggr.X`` does first) imports neither
    torch nor lightning; an unknown name is an AttributeError, as for any module."""
    import subprocess
    import sys

    import lightning_cggr
    from lightning_cggr import config, errors, kernels, module, step

    owners = {"CGGRModule": module, "CGGRStep": step, "linear_cross_entropy": kernels, "token_stats": kernels,
              "ConfigError": errors}
    for name in lightning_cggr.__all__:
        assert getattr(lightning_cggr, name) is getattr(owners.get(name, config), name), name
    with pytest.raises(AttributeError, match="no attribute 'CGGRModel'"):
        lightning_cggr.CGGRModel  # noqa: B018
    code = "import sys, lightning_cggr; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_load_from_checkpoint_rebuilds_the_module_with_its_own_settings(tmp_path):
    """Lightning's CGGRModule.load_from_checkpoint(path, model=...) gets the settings the module was
    built with from the checkpoint (they were the defaults before: a silent change of rule)."""
    import dataclasses

    from lightning_cggr.config import PerfConfig, SelectionConfig

    cggr = CGGRConfig(min_tokens_ratio=0.5, warmup_steps=0, router=RouterConfig(num_layers=1),
                      selection=SelectionConfig(unit="sequence"), scoring="entropy")
    loss, optim = LossConfig(impl="torch", chunk_size=8, z_loss=1e-4), OptimConfig(lr=3e-3, warmup_steps=0, betas=(0.8, 0.9))
    perf = PerfConfig(activation_checkpointing=True)
    module = CGGRModule(make_tiny_model("llama"), cggr, loss, optim, perf=perf)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader([make_batch(4, 12)], batch_size=None))
    trainer.save_checkpoint(tmp_path / "m.ckpt")

    loaded = CGGRModule.load_from_checkpoint(tmp_path / "m.ckpt", model=make_tiny_model("llama", seed=1))
    assert loaded.step.cggr == cggr and loaded.step.loss_cfg == loss and loaded.optim_cfg == optim
    assert dataclasses.replace(loaded.step.perf, compile=perf.compile) == perf  # compile=auto resolved by device
    for name, value in module.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    with pytest.raises(TypeError, match=r"load_from_checkpoint\(path, model=...\) needs the model"):
        CGGRModule.load_from_checkpoint(tmp_path / "m.ckpt")  # the model is not in the settings: passed again


def test_a_compile_backend_function_leaves_perf_out_of_the_stored_settings():
    import dataclasses

    from lightning_cggr.config import PerfConfig
    from lightning_cggr.module import settings_of

    def backend(gm, inputs):
        return gm

    stored = settings_of(CGGRConfig(), LossConfig(), OptimConfig(), PerfConfig(compile_backend=backend))
    assert stored["perf"] is None and stored["cggr"]["min_tokens_ratio"] == 0.25
    assert settings_of(CGGRConfig(), LossConfig(), OptimConfig(), PerfConfig())["perf"] == dataclasses.asdict(PerfConfig())


def test_held_out_sums_stay_float32_under_bf16_true():
    """Lightning's ``bf16-true`` casts the module with ``.to(dtype)``, which torchmetrics does not
    guard: the NLL sums and token counts (and the routing metrics' float64 sums) were cast too, and
    val/loss came out rounded (counts exact only to 256 in bf16). The model computes in bf16; the
    sums must not. Reference: the bf16 model's logits in float64, summed in float64."""
    module = _module("llama")
    # odd token counts and sums in the thousands: what bf16 cannot hold exactly
    batches = [make_batch(6, 40, seed=s) for s in range(4)]
    trainer = L.Trainer(accelerator="cpu", precision="bf16-true", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    got = trainer.validate(module, dataloaders=torch.utils.data.DataLoader(batches, batch_size=None),
                           verbose=False)[0]["val/loss"]
    assert module.step.head.weight.dtype == torch.bfloat16  # the cast happened
    states = {key: t.dtype for m in module.modules() if hasattr(m, "_defaults") for key, t in m._defaults.items()}
    assert states == {"sum_value": torch.float32, "total": torch.float64, "count": torch.float64}
    assert got == pytest.approx(_heldout_reference(module, batches), rel=2e-4)


def test_lightnings_learning_rate_finder_reads_and_sets_optim_lr(tmp_path):
    """``Tuner(trainer).lr_find(module, loader)`` looks for ``lr`` (AttributeError before): it sweeps
    from there, restores the weights, and its suggestion becomes optim.lr, in the stored
    hyperparameters and in the next fit's optimizer. A bad value is the config's error."""
    from lightning.pytorch.tuner import Tuner

    from lightning_cggr.config import ConfigError

    module = _module("llama")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rows = [{k: v[0] for k, v in make_batch(1, 16, seed=s, pad_tail=False).items()} for s in range(32)]
    loader = torch.utils.data.DataLoader(rows, batch_size=4)
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=str(tmp_path))
    found = Tuner(L.Trainer(max_steps=20, **kw)).lr_find(module, train_dataloaders=loader, num_training=20,
                                                         min_lr=1e-5, max_lr=1.0)
    assert len(found.results["lr"]) == 20
    assert module.lr == module.optim_cfg.lr == module.hparams["optim"]["lr"] == found.suggestion() != 3e-3
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    trainer = L.Trainer(max_steps=1, **kw)
    trainer.fit(module, loader)
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == found.suggestion()
    with pytest.raises(ConfigError, match="optim.lr"):
        module.lr = -1.0


def test_an_mps_trainer_is_refused_before_the_module_moves_there():
    """Apple's MPS has no float64, which the module's metric states and the kept-token normaliser
    use: Lightning's move of the module there failed with torch's conversion error. setup() now
    refuses it by name (Lightning calls it before the move); a CPU trainer is untouched."""
    from types import SimpleNamespace

    from lightning_cggr.config import ConfigError

    module = _module("llama")
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("mps")))
    with pytest.raises(ConfigError, match="Apple's MPS, which has no float64.*accelerator='cpu'"):
        module.setup("fit")
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    module.setup("fit")


def test_lightnings_barebones_mode_trains_the_same_weights(tmp_path):
    """Trainer(barebones=True) turns self.log into a warning and logs nothing; the gradient rescaling,
    clipping and schedule live in hooks that must not depend on logging. Three routed steps give the
    weights of the same run that logs every step."""
    import warnings

    rows = [{k: v[0] for k, v in make_batch(1, 16, seed=s, pad_tail=False).items()} for s in range(12)]
    weights = []
    for bare in (False, True):
        torch.manual_seed(0)
        module = _module("llama", min_tokens_ratio=0.3)
        logged = {} if bare else dict(logger=False, log_every_n_steps=1, enable_progress_bar=False,
                                      enable_model_summary=False, enable_checkpointing=False)
        trainer = L.Trainer(max_steps=3, accelerator="cpu", barebones=bare, gradient_clip_val=0.5,
                            default_root_dir=str(tmp_path), **logged)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, torch.utils.data.DataLoader(rows, batch_size=4))
        assert trainer.global_step == 3
        weights.append(module.state_dict())
    assert "train/loss" not in trainer.callback_metrics  # barebones: nothing logged
    torch.manual_seed(0)
    start = _module("llama", min_tokens_ratio=0.3).state_dict()
    assert any(not torch.equal(start[k], v) for k, v in weights[0].items())  # the steps did train
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=0, msg=key)


def test_validate_then_fit_under_lightnings_default_inference_mode(tmp_path):
    """``trainer.validate`` runs under ``torch.inference_mode`` by default, and the held-out sums were
    reset there into inference tensors: the validation inside the next ``fit`` (under ``no_grad``)
    then failed at its first in-place update. Validate, fit with a validation inside, validate: the
    three losses are the float64 mean NLL of the model as it stands at each point."""
    import torch.nn.functional as F

    rows = [{k: v[0] for k, v in make_batch(1, 16, seed=s, pad_tail=False).items()} for s in range(16)]
    val = torch.utils.data.DataLoader(rows[:8], batch_size=4)
    module = _module("llama", min_tokens_ratio=0.3)

    def reference():
        with torch.no_grad():
            ids, labels = (torch.stack([r[k] for r in rows[:8]]) for k in ("input_ids", "labels"))
            logits = module.model.double()(input_ids=ids).logits
            module.model.float()
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).item()  # -100: prompts

    trainer = L.Trainer(max_steps=4, val_check_interval=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    assert trainer.validate_loop.inference_mode  # Lightning's default
    before = trainer.validate(module, val, verbose=False)[0]["val/loss"]
    assert before == pytest.approx(reference(), rel=1e-5)
    trainer.fit(module, torch.utils.data.DataLoader(rows, batch_size=4), val)
    assert trainer.global_step == 4
    after = trainer.validate(module, val, verbose=False)[0]["val/loss"]
    assert after == pytest.approx(reference(), rel=1e-5) and after != pytest.approx(before)


def test_a_run_of_unknown_length_needs_max_steps_or_a_constant_lr(tmp_path):
    """A streaming loader (no length) and max_epochs: Lightning reports the run's length as -1, and
    the cosine was laid over one step, so the whole run trained at the LR floor. Now an error names
    the fix; with min_lr_ratio=1.0 the warm-up then the constant LR (by hand: 0, 1/2, 1, 1, 1)."""
    from lightning_cggr.errors import ConfigError

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for s in range(10):
                yield {k: v[0] for k, v in make_batch(1, 16, seed=s, pad_tail=False).items()}

    class Rates(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    kw = dict(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=str(tmp_path))
    module = CGGRModule(make_tiny_model("llama"), CGGRConfig(warmup_steps=0), optim=OptimConfig(lr=0.01, warmup_steps=2))
    with pytest.raises(ConfigError, match=r"optim.min_lr_ratio=0.1: the cosine schedule decays over the run's "
                                          r"length, which this Trainer does not know .* give the Trainer max_steps"):
        L.Trainer(**kw).fit(module, torch.utils.data.DataLoader(Stream(), batch_size=2))
    module = CGGRModule(make_tiny_model("llama"), CGGRConfig(warmup_steps=0),
                        optim=OptimConfig(lr=0.01, warmup_steps=2, min_lr_ratio=1.0))
    rates = Rates()
    trainer = L.Trainer(callbacks=[rates], **kw)
    trainer.fit(module, torch.utils.data.DataLoader(Stream(), batch_size=2))
    assert trainer.global_step == 5
    assert rates.seen == pytest.approx([0.0, 0.005, 0.01, 0.01, 0.01])


def test_a_module_built_from_python_warns_of_settings_that_leave_work_undone(tmp_path):
    """The train command warns at its start of a batch too small for sequence routing and of an LR
    warm-up as long as the run; a module fitted from Python said nothing (the README's own example
    warmed up for its whole run). Lightning's Trainer now gets the same lines, as Python warnings."""
    module = CGGRModule(make_tiny_model("llama"), CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1),
                                                             selection={"unit": "sequence"}),
                        LossConfig(impl="torch"), OptimConfig(warmup_steps=20))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    rows = [{k: v[0] for k, v in make_batch(1, 12, seed=i).items()} for i in range(3)]  # one sequence a batch
    with pytest.warns(UserWarning) as seen:
        trainer.fit(module, torch.utils.data.DataLoader(rows, batch_size=1))
    said = [str(w.message) for w in seen]
    assert sum("cggr.selection.unit=sequence keeps ceil(0.25 x data.batch_size) = 1 of the batch's 1" in s
               for s in said) == 1
    assert sum(s.startswith("optim.warmup_steps=20 with trainer.max_steps=3") for s in said) == 1


@pytest.mark.parametrize("precision, warned", [("32-true", True), ("bf16-mixed", True), ("bf16-true", False)])
def test_a_16_bit_model_trained_without_a_master_copy_is_warned_of(precision, warned):
    """bf16 weights under a precision that keeps them (32-true, bf16-mixed): AdamW updates them in
    bf16 and small updates vanish. Whether that happens, seen on the weights: a norm weight of 1.0
    moved by an update of 1e-3 stays 1.0 in bf16 (its spacing there is 2^-7)."""
    one = torch.ones(4, dtype=torch.bfloat16)
    assert torch.equal(one + 1e-3, one)  # the loss the warning names
    model = make_tiny_model("llama").to(torch.bfloat16)
    module = CGGRModule(model, CGGRConfig(enabled=False), LossConfig(impl="torch"), OptimConfig(warmup_steps=0))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, precision=precision,
                        enable_progress_bar=False, enable_model_summary=False)
    rows = [{k: v[0] for k, v in make_batch(1, 12, seed=i).items()} for i in range(2)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(module, torch.utils.data.DataLoader(rows, batch_size=1))
    said = [str(w.message) for w in seen if "no fp32 master copy" in str(w.message)]
    assert len(said) == (1 if warned else 0), said
    if warned:
        assert said[0].startswith(f"the model's trainable weights are bfloat16 and trainer precision {precision}")

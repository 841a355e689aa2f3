"""A model wrapped by PEFT (LoRA here) trains through the step as the adapted model it is.

The references are the PEFT model's own forward: its logits (full-logits float64 cross-entropy and
its gradients with respect to the adapters) and its own ``output_hidden_states`` for the router.
The adapters start from random values (``init_lora_weights=False``), so an adapter that the step
skipped would change the loss, the gradients and the router's states.
"""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import Rows, make_batch, make_tiny_model
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from lightning_cggr.config import CGGRConfig, LossConfig, OptimConfig, RouterConfig
from lightning_cggr.module import CGGRModule
from lightning_cggr.routing.selection import IGNORE_INDEX, shift_targets
from lightning_cggr.step import CGGRStep

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _lora(arch: str = "llama", targets=None, **kw):
    model = make_tiny_model(arch, num_layers=3).eval()  # no dropout: the references are deterministic
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets or TARGETS[arch], init_lora_weights=False, **kw)
    return get_peft_model(model, config)


def _own_loss(model, batch) -> torch.Tensor:
    """The wrapped model's own mean next-token NLL (float64), the reference."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    targets = shift_targets(batch["labels"], batch["attention_mask"])
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def _adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_standard_step_trains_the_adapted_models_own_loss(arch, impl):
    """Loss and every adapter's gradient equal those of the PEFT model's own loss; the frozen base
    weights get none, and only the adapters are trainable."""
    model = _lora(arch)
    batch = make_batch(batch_size=3, seq_len=12)
    _own_loss(model, batch).backward()
    want = _adapter_grads(model)
    model.zero_grad(set_to_none=True)
    step = CGGRStep(model, CGGRConfig(enabled=False), LossConfig(impl=impl))
    out = step(batch, global_step=0)
    out.loss.backward()
    step.correct_gradients([p for p in model.parameters() if p.requires_grad], 1)  # to the kept-token mean
    got = _adapter_grads(model)
    assert float((out.nll_sum / out.kept).detach()) == pytest.approx(float(_own_loss(model, batch)), rel=1e-5)
    assert set(got) == set(want) and all("lora_" in n for n in got) and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("k", [1, 2])
def test_the_router_runs_the_adapted_blocks(k):
    """The router's states are the PEFT model's own after its first k blocks (final norm applied):
    the adapters inside those blocks run in the router too. A routed step keeps about a quarter of
    the tokens and trains the adapters."""
    model = _lora()
    batch = make_batch(batch_size=3, seq_len=12)
    step = CGGRStep(model, CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=k)))
    with torch.no_grad():
        got = step.router.hidden_states(batch["input_ids"], batch["attention_mask"])
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True).hidden_states[k]
        want = model.get_base_model().model.norm(own)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = step(batch, global_step=0)
    out.loss.backward()
    assert 0.2 <= float(out.metrics["train/kept_ratio"]) <= 0.4
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_the_trainer_updates_the_adapters_only(tmp_path):
    """Under the Lightning Trainer (token CGGR after 2 warm-up steps): the adapters move, every base
    weight stays as it was, and the trained adapters still give the model's own loss in the step."""
    model = _lora().train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    tokens = torch.randint(1, 97, (16, 13), generator=torch.Generator().manual_seed(2))
    rows = [{"input_ids": t, "labels": t.clone()} for t in tokens]
    module = CGGRModule(model, CGGRConfig(warmup_steps=2), optim=OptimConfig(lr=1e-2))
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(Rows(rows), batch_size=4))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base.items())
    assert all(not torch.equal(after[n], p) for n, p in adapters.items())
    batch = make_batch(batch_size=3, seq_len=12)
    model.eval()
    out = CGGRStep(model, CGGRConfig(enabled=False))(batch, global_step=0)
    assert float((out.nll_sum / out.kept).detach()) == pytest.approx(float(_own_loss(model, batch)), rel=1e-5)


@pytest.mark.parametrize("where", ["target_modules", "modules_to_save"])
def test_an_adapter_on_the_lm_head_is_refused(where):
    """The fused loss multiplies the head's own weight: an adapter on it would be skipped, so the step
    refuses it by name at construction rather than train a loss that is not the model's."""
    kw = {"targets": ["q_proj", "lm_head"]} if where == "target_modules" else {"modules_to_save": ["lm_head"]}
    with pytest.raises(ValueError, match=r"a PEFT adapter wraps its LM head .*Leave the head \(lm_head\) out"):
        CGGRStep(_lora(**kw), CGGRConfig())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mfu_counts_no_weight_gradient_for_frozen_weights(arch):
    """Backward runs a frozen base weight's input-gradient matmul but not its weight-gradient one, and
    none for the frozen head's weight: the formula counts 2x forward for those (3x counted every
    matrix, 1.48x torch's flop counter here). What it does not model is that backward stops below the
    lowest trainable parameter (the first block's matmuls on inputs that need no gradient skip their
    input gradient too): it may count up to the first block's forward more than the counter, no less."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_cggr.flops import FlopShape, train_flops
    from lightning_cggr.models.attention import set_attn_implementation

    model = _lora(arch)
    set_attn_implementation(model.get_base_model(), "eager")
    B, T = 2, 11
    ids = torch.randint(1, 90, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().square().mean().backward()
    shape = FlopShape.of(model)
    counted, formula = counter.get_total_flops(), train_flops(shape, B, T, causal=False)
    assert shape.head_frozen and sum(shape.frozen_params) < sum(shape.block_params)
    assert counted <= formula <= counted + 2 * shape.block_params[0] * B * T


# ---- the Hydra job: model.lora --------------------------------------------------------------------


@pytest.mark.parametrize("override, problem", [
    ("model.lora.r=-1", "model.lora.r=-1: must be an integer >= 0"),
    ("model.lora.alpha=0", "model.lora.alpha=0: must be a number > 0"),
    ("model.lora.dropout=1.0", "model.lora.dropout=1.0: must be a number in [0, 1)"),
    ("model.lora.target_modules=[]", "model.lora.target_modules=[]: must be all-linear or a list of module names"),
    ("model.lora.target_modules=[q_proj,lm_head]", "model.lora.target_modules names lm_head"),
])
def test_bad_adapter_settings_are_named(tmp_path, override, problem):
    from test_resume import make_cfg

    from lightning_cggr.errors import ConfigError
    from lightning_cggr.train import train

    r = [] if override.startswith("model.lora.r=") else ["model.lora.r=4"]
    with pytest.raises(ConfigError, match=re.escape(problem)):
        train(make_cfg(tmp_path, "run", *r, override))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_adapters_without_peft_installed_are_an_early_error(tmp_path, monkeypatch):
    import importlib.util

    from test_resume import make_cfg

    from lightning_cggr.errors import ConfigError
    from lightning_cggr.train import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape("model.lora.r=4 needs the peft package: pip install -e .[peft]")):
        train(make_cfg(tmp_path, "run", "model.lora.r=4"))


def test_a_lora_run_trains_the_adapters_and_exports_the_merged_model(tmp_path):
    """model.lora.r=4 over the tiny run: AdamW holds state for the adapters only, the adapters move,
    and export writes a plain model (no adapter weights) whose logits equal those of the checkpoint's
    PEFT model rebuilt here from the run's config and PEFT's own adapter settings."""
    from test_resume import make_cfg
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_cggr.export import export
    from lightning_cggr.train import train

    train(make_cfg(tmp_path, "run", "model.lora.r=4", "optim.lr=1e-2", "trainer.max_steps=6"))
    run = tmp_path / "run"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    weights = {k[len("model."):]: v for k, v in ckpt["state_dict"].items()}
    lora = [k for k in weights if "lora_" in k]
    assert lora and len(ckpt["optimizer_states"][0]["state"]) == len(lora)
    assert any(weights[k].abs().sum() > 0 for k in lora if "lora_B" in k)  # B starts at 0: it trained

    rebuilt = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run / "model"))
    rebuilt = get_peft_model(rebuilt, LoraConfig.from_pretrained(run / "model"))
    rebuilt.load_state_dict(weights, strict=True)
    exported = AutoModelForCausalLM.from_pretrained(export(run, tmp_path / "out"))
    assert not [n for n, _ in exported.named_parameters() if "lora" in n]
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = rebuilt.eval()(input_ids=ids).logits
        got = exported.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", ["ddp", "fsdp2"])
def test_multi_process_training_of_the_adapters_uses_the_global_kept_token_mean(tmp_path, where):
    """Two forked gloo processes (DDP, or FSDP2 sharding every block with its frozen weights and its
    adapters), 2 rows each, token CGGR at ratio 0.5: the adapters' gradients equal those of the global
    mean over the kept tokens of all 4 rows, computed in one process on the same LoRA model
    (tests/test_ddp.py's reference), and differ from a mean of the two ranks' means."""
    from test_ddp import ForkedFSDP2, assert_grads_close, reference_grads, run_one_step

    exact, per_rank = reference_grads(_lora())
    strategy = "ddp_fork" if where == "ddp" else ForkedFSDP2()
    got = run_one_step(tmp_path, f"{where}-lora", batch_size=2, strategy=strategy, devices=2, model=_lora())
    assert got and all("lora_" in n for n in got)
    assert_grads_close(got, exact)
    assert max(float((exact[n] - per_rank[n]).abs().max() / exact[n].abs().max()) for n in exact) > 0.05

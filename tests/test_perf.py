"""The step's efficiency options change how it runs, never what it computes.

- mask-free causal attention for batches without ``attention_mask`` (packed text): the same loss and
  gradients as the all-ones mask through transformers' own path, with no host sync in the whole
  step (router and decoder included);
- ``model.attn_implementation`` set explicitly and validated;
- ``optim.fused``: torch's fused AdamW gives the per-tensor loop's update; ``auto`` picks it only for
  CUDA floating-point parameters;
- ``perf.compile``: the compiled step gives the eager loss and gradients, and compiles nothing new
  after its first step; ``perf.compile_dynamic`` decides whether a second batch size makes the
  batch dimension symbolic, and is refused where shapes keep changing; ``perf.compile_scope=decoder``
  compiles the decoder whole (and the router's view of its first k blocks on its own), with the
  same losses and gradients; the routing decision (step.decide) is compiled too where it can be, once,
  and picks what the eager one picks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_batch, make_tiny_model
from test_selection_no_sync import forbid_host_sync
from lightning_cggr.config import (
    CGGRConfig, ConfigError, LossConfig, ModelConfig, OptimConfig, PerfConfig, RouterConfig, SelectionConfig,
    parse_config,
)
from lightning_cggr.models.attention import MASK_FREE, set_attn_implementation
from lightning_cggr.perf import adamw_kwargs, compile_model
from lightning_cggr.step import CGGRStep, build_optimizer, optimizer_step

UNITS = {
    "standard": CGGRConfig(enabled=False),
    "token": CGGRConfig(warmup_steps=0, min_tokens_ratio=0.3, router=RouterConfig(num_layers=1)),
    "sequence": CGGRConfig(warmup_steps=0, min_tokens_ratio=0.5, router=RouterConfig(num_layers=1),
                           selection=SelectionConfig(unit="sequence")),
}


def _packed_batch(seed=3, batch_size=4, seq_len=16):
    """A batch as packed text gives it: no padding, no prompt, and no attention_mask."""
    b = make_batch(batch_size=batch_size, seq_len=seq_len, seed=seed, pad_tail=False)
    b["labels"] = b["input_ids"].clone()
    del b["attention_mask"]
    return b


def _loss_and_grads(step, batch):
    torch.manual_seed(0)  # the same dropout draws (GPT-2 and GPT-NeoX train with dropout)
    res = step(batch, global_step=0)
    res.loss.backward()
    grads = {n: p.grad.clone() for n, p in step.model.named_parameters() if p.grad is not None}
    step.model.zero_grad(set_to_none=True)
    return res.loss.detach(), grads


# ---- attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_mask_free_step_equals_the_all_ones_mask_and_never_syncs(arch, unit, one_thread):
    model = make_tiny_model(arch, num_layers=2)
    free = _packed_batch()
    masked = {**free, "attention_mask": torch.ones_like(free["input_ids"])}
    ref_step = CGGRStep(copy.deepcopy(model), UNITS[unit], LossConfig(impl="torch"))
    step = CGGRStep(model, UNITS[unit], LossConfig(impl="torch"))

    ref_loss, ref_grads = _loss_and_grads(ref_step, masked)  # transformers' own mask path
    torch.manual_seed(0)
    with forbid_host_sync():  # .item(), bool(tensor), .cpu(), boolean indexing ... raise in here
        res = step(free, global_step=0)
    res.loss.backward()
    torch.testing.assert_close(res.loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref_grads.keys()
    for name in got:
        torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # outside the step the model is unchanged: a caller's own forward keeps transformers' mask handling
    assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {"sdpa"}


SDPA_CPU_OPS = {"flash": "aten::_scaled_dot_product_flash_attention_for_cpu",
                "math": "aten::_scaled_dot_product_attention_math"}
"""The op each perf.sdpa_backend runs on CPU (the CUDA-only kernels are refused there)."""


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("backend", sorted(SDPA_CPU_OPS))
def test_sdpa_backend_runs_that_kernel_alone_with_the_same_loss_and_gradients(backend, padded, one_thread):
    """perf.sdpa_backend=flash|math: the step's attention (router, model forward and backward,
    validation) runs that kernel and no other, with the loss and gradients of torch's own choice;
    on a packed batch (mask-free causal path) and on a padded one (transformers' masked path)."""
    from torch.profiler import profile

    model = make_tiny_model("llama", num_layers=2)
    batch = make_batch(batch_size=3, seq_len=12) if padded else _packed_batch()
    want_loss, want_grads = _loss_and_grads(CGGRStep(copy.deepcopy(model), UNITS["token"], LossConfig(impl="torch")),
                                            batch)
    step = CGGRStep(model, UNITS["token"], LossConfig(impl="torch"), perf=PerfConfig(sdpa_backend=backend))
    with profile() as prof:
        loss, grads = _loss_and_grads(step, batch)
        step.eval_terms(batch)
    ran = [e.name for e in prof.events()]
    assert ran.count(SDPA_CPU_OPS[backend]) == 1 + 2 + 2  # the router's block, the forward's 2, validation's 2
    other = [op for b, op in SDPA_CPU_OPS.items() if b != backend]
    assert not any(name in other for name in ran), "another sdpa kernel ran"
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sdpa_backend_is_refused_where_its_kernel_cannot_run():
    """A kernel of sdpa with another attention implementation, a CUDA kernel on CPU (at config time
    through train()'s checks, and at the step's first batch), flash with chat data's padding mask on
    CUDA: each an error naming the fix, before any compute."""
    from lightning_cggr.perf import sdpa_backend_problem

    with pytest.raises(ConfigError, match="perf.sdpa_backend='fast'"):
        parse_config({"perf": {"sdpa_backend": "fast"}})
    with pytest.raises(ConfigError, match="model.attn_implementation=eager"):
        parse_config({"perf": {"sdpa_backend": "flash"}, "model": {"attn_implementation": "eager"}})
    assert "CUDA kernel" in sdpa_backend_problem("cudnn", "sdpa", "cpu")
    assert "padding mask" in sdpa_backend_problem("flash", "sdpa", "cuda", masked=True)
    assert sdpa_backend_problem("flash", "sdpa", "cpu", masked=True) is None  # the CPU flash kernel takes masks
    assert sdpa_backend_problem("efficient", "sdpa", None) is None  # device not known yet
    step = CGGRStep(make_tiny_model("llama", num_layers=2), UNITS["token"], LossConfig(impl="torch"),
                    perf=PerfConfig(sdpa_backend="efficient"))
    with pytest.raises(ValueError, match="perf.sdpa_backend=efficient is a CUDA kernel"):
        step(_packed_batch(), global_step=0)
    from experiments.compose import compose
    from lightning_cggr.train import check_config

    with pytest.raises(ConfigError, match=r"perf.sdpa_backend=cudnn is a CUDA kernel and this run's device is cpu"):
        check_config(compose(["perf.sdpa_backend=cudnn", "trainer.accelerator=cpu"]))


@pytest.mark.parametrize("backend", sorted(SDPA_CPU_OPS))
def test_sdpa_backend_holds_inside_compiled_blocks(backend, one_thread):
    """The compiled blocks are traced inside the step's sdpa scope, so their graphs run the named kernel
    (flash: its own op; math: decomposed into matmuls and a softmax, so no flash op) with the eager
    step's loss."""
    import torch._dynamo
    from torch.profiler import profile

    torch._dynamo.reset()
    model = make_tiny_model("llama", num_layers=2)
    batch = _packed_batch()
    want = CGGRStep(copy.deepcopy(model), UNITS["token"], LossConfig(impl="torch"))(batch, global_step=0).loss
    perf = PerfConfig(compile=True, compile_backend="aot_eager", sdpa_backend=backend)
    step = CGGRStep(model, UNITS["token"], LossConfig(impl="torch"), perf=perf)
    step(batch, global_step=0)  # compiles
    with profile() as prof:
        got = step(batch, global_step=1).loss
    flash_ran = sum(e.name == SDPA_CPU_OPS["flash"] for e in prof.events())
    assert flash_ran == (3 if backend == "flash" else 0)  # the router's block and the forward's 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_masked_path_does_sync_so_the_guard_above_can_fail():
    model = make_tiny_model("llama", num_layers=1)
    batch = _packed_batch()
    with pytest.raises(AssertionError, match="host sync"), forbid_host_sync():
        model.base_model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]))


def test_a_padded_batch_keeps_its_mask():
    """With a mask the step runs transformers' path: the real tokens after a left padding do not
    attend to the pads (the mask-free path would let them)."""
    model = make_tiny_model("llama", num_layers=2).eval()
    step = CGGRStep(model, UNITS["standard"])
    ids = torch.randint(1, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, :3] = 0  # left padding
    with torch.no_grad():
        padded = step.hidden_states(ids, mask)[:, 3:]
        unmasked = step.hidden_states(ids, None)[:, 3:]
    assert not torch.allclose(padded, unmasked, atol=1e-4), "the mask must be honoured"


def test_packed_text_batches_carry_no_attention_mask():
    from lightning_cggr.data.text import BlockDataset

    item = BlockDataset(torch.arange(12).view(2, 6))[1]
    assert set(item) == {"input_ids", "labels"}
    assert torch.equal(item["labels"], item["input_ids"])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attn_implementation_is_set_explicitly_and_kernels_agree(impl):
    from lightning_cggr.models import build_random_model

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, attn_implementation=impl)
    torch.manual_seed(0)
    model = build_random_model(cfg, 97, 0).eval()
    assert model.config._attn_implementation == impl
    torch.manual_seed(0)
    sdpa = build_random_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64), 97, 0).eval()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.base_model(input_ids=ids).last_hidden_state,
                                   sdpa.base_model(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_attention_choices_are_validated():
    with pytest.raises(ConfigError, match="model.attn_implementation='flash'.*sdpa, flash_attention_2, eager"):
        parse_config({"model": {"attn_implementation": "flash"}})
    from lightning_cggr.models.attention import availability_problem

    if availability_problem("flash_attention_2") is None:
        pytest.skip("flash-attn runs here")
    with pytest.raises(ConfigError, match="flash_attention_2 needs .*use sdpa"):
        parse_config({"model": {"attn_implementation": "flash_attention_2"}})
    with pytest.raises(ValueError, match="flash_attention_2 needs"):
        set_attn_implementation(make_tiny_model("llama", num_layers=1), "flash_attention_2")


def test_mask_free_twins_are_registered_under_new_names_only():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    step = CGGRStep(make_tiny_model("llama", num_layers=1), UNITS["standard"])
    with step.attention_scope(None):
        assert step.model.config._attn_implementation == MASK_FREE["sdpa"]
    assert ALL_ATTENTION_FUNCTIONS[MASK_FREE["sdpa"]] is ALL_ATTENTION_FUNCTIONS["sdpa"]


# ---- fused AdamW ------------------------------------------------------------------------------


def test_fused_adamw_gives_the_per_tensor_loop_update(one_thread):
    model = make_tiny_model("llama", num_layers=2)
    twins = {f: copy.deepcopy(model) for f in (True, False)}
    opts = {f: build_optimizer(m, OptimConfig(lr=1e-2, fused=f)) for f, m in twins.items()}
    assert opts[True].defaults["fused"] is True and not opts[False].defaults.get("fused")
    for i in range(3):
        batch = make_batch(batch_size=2, seq_len=8, seed=i)
        for f, m in twins.items():
            m(**batch).loss.backward()
            opts[f].step()
            opts[f].zero_grad(set_to_none=True)
    for (name, a), b in zip(twins[True].named_parameters(), twins[False].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(next(model.parameters()), next(twins[True].parameters()))


def test_auto_fuses_only_cuda_floating_point_parameters():
    from torch._subclasses.fake_tensor import FakeTensorMode

    cpu = [torch.nn.Parameter(torch.zeros(2, 2))]
    assert adamw_kwargs(cpu, "auto") == {}
    assert adamw_kwargs(cpu, True) == {"fused": True}
    assert adamw_kwargs(cpu, False) == {}
    with FakeTensorMode(allow_non_fake_inputs=True):  # CUDA tensors without a GPU
        cuda = [torch.nn.Parameter(torch.zeros(2, 2, device="cuda")), torch.nn.Parameter(torch.zeros(3, device="cuda"))]
        assert adamw_kwargs(cuda, "auto") == {"fused": True}
        assert adamw_kwargs(cuda + cpu, "auto") == {}  # mixed devices: torch's default
    assert adamw_kwargs([], "auto") == {}


def test_fused_where_torch_has_no_kernel_is_a_config_error(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")

    monkeypatch.setattr(torch.optim, "AdamW", refuse)
    with pytest.raises(ConfigError, match="optim.fused=true.*cpu torch.float32.*use optim.fused=auto"):
        build_optimizer(make_tiny_model("llama", num_layers=1), OptimConfig(fused=True))


def test_efficiency_options_are_validated():
    with pytest.raises(ConfigError) as err:
        parse_config({"optim": {"fused": "yes"},
                      "perf": {"compile": "fast", "compile_backend": "tvm", "compile_routing": "sometimes"}})
    msg = str(err.value)
    assert "optim.fused='yes'" in msg and "perf.compile='fast'" in msg and "perf.compile_backend='tvm'" in msg
    assert "perf.compile_routing='sometimes'" in msg
    run = parse_config({"optim": {"fused": True}, "perf": {"compile": "max-autotune-no-cudagraphs"}})
    assert run.optim.fused is True and run.perf.compile == "max-autotune-no-cudagraphs"


def test_compile_with_fsdp1_is_refused_before_anything_is_built():
    from experiments.compose import compose
    from lightning_cggr.train import check_config

    with pytest.raises(ConfigError, match="perf.compile with trainer.strategy=fsdp"):
        check_config(compose(["perf.compile=true", "trainer.strategy=fsdp", "trainer.accelerator=gpu"]))


def test_cuda_graph_compile_mode_is_refused_off_cuda_before_anything_is_built():
    from experiments.compose import compose
    from lightning_cggr.train import check_config

    with pytest.raises(ConfigError, match=r"perf.compile=reduce-overhead records CUDA graphs.*this run's is cpu"):
        check_config(compose(["perf.compile=reduce-overhead", "trainer.accelerator=cpu"]))
    assert parse_config({"perf": {"compile": "reduce-overhead"}}).perf.compile == "reduce-overhead"  # a valid value


def test_a_16_bit_precision_on_a_cpu_that_emulates_it_is_warned_with_the_fix():
    """On CPUs without native bf16 (AVX512-BF16 or AMX) a bf16 matrix multiply is emulated: this
    project's 2-core AMD EPYC (AVX2) took about 80 times fp32's time, and the SmolLM2 experiment's CPU
    command (bf16-mixed) ran 5 steps in 12.5 min. The run keeps what was asked for; the warning says
    what it costs and how to change it. The probe is injected here: its timing is not a test's."""
    from lightning_cggr.perf import precision_warning

    asked = []

    def probe(times):
        return lambda dtype: asked.append(dtype) or times

    warning = precision_warning("bf16-mixed", "cpu", probe(80.0))
    assert warning.startswith("trainer.precision=bf16-mixed on the CPU: a bfloat16 matrix multiply took 80x")
    assert warning.endswith("add trainer.precision=32-true")
    assert precision_warning("16-mixed", "cpu", probe(80.0)).startswith("trainer.precision=16-mixed on the CPU: a float16")
    assert asked == [torch.bfloat16, torch.float16]
    assert precision_warning("bf16-true", "cpu", probe(1.5)) is None  # a CPU that computes bf16 well
    for precision, device in [("32-true", "cpu"), ("bf16-mixed", "cuda"), ("64-true", "cpu")]:
        assert precision_warning(precision, device, probe(80.0)) is None
    assert len(asked) == 3  # no probe where nothing 16-bit runs on the CPU


def test_train_warns_of_an_emulated_bf16_before_building_anything(monkeypatch, caplog, tmp_path):
    import logging

    from experiments.compose import compose
    from lightning_cggr import models, perf
    from lightning_cggr.train import train

    class Built(Exception):
        pass

    monkeypatch.setattr(perf, "cpu_matmul_slowdown", lambda dtype: 40.0)
    monkeypatch.setattr(models, "build_model", lambda *a, **k: (_ for _ in ()).throw(Built()))
    caplog.set_level(logging.WARNING, logger="lightning_cggr.train")
    cfg = compose(["trainer.precision=bf16-mixed", "trainer.accelerator=cpu", f"output_dir={tmp_path}"])
    with pytest.raises(Built):
        train(cfg)
    assert [m for m in caplog.messages if m.startswith("trainer.precision=bf16-mixed on the CPU: a bfloat16 "
                                                         "matrix multiply took 40x")]


def test_compile_auto_is_on_for_cuda_only_and_never_under_fsdp():
    """perf.compile=auto (the default): torch.compile's default mode on one CUDA device (measured 1.99x
    tokens/s under the Trainer on an H100), off on CPU and across devices; resolved before anything is built."""
    from experiments.compose import compose
    from lightning_cggr.perf import compile_mode, resolve_compile
    from lightning_cggr.step import CGGRStep
    from lightning_cggr.train import check_config

    assert PerfConfig().compile == "auto"
    assert resolve_compile("auto", "cuda") is True and resolve_compile("auto", "cuda", "auto", 1) is True
    assert resolve_compile("auto", "cpu") is False
    for strategy, devices in (("ddp", 2), ("fsdp", 1), ("fsdp2", 2), ("auto", 2), ("auto", "auto")):
        assert resolve_compile("auto", "cuda", strategy, devices) is False, (strategy, devices)
    assert resolve_compile("reduce-overhead", "cpu") == "reduce-overhead" and resolve_compile(False, "cuda") is False
    with pytest.raises(ValueError, match="resolved"):
        compile_mode("auto")
    run, _ = check_config(compose(["trainer.accelerator=cpu"]))
    assert run.perf.compile is False
    # the default under fsdp is not the refused "compile with fsdp" combination
    run, _ = check_config(compose(["trainer.strategy=fsdp2", "trainer.devices=2", "trainer.accelerator=cpu"]))
    assert run.perf.compile is False
    step = CGGRStep(make_tiny_model("llama"), perf=PerfConfig())  # a CPU model: not compiled
    assert step.perf.compile is False


# ---- torch.compile ----------------------------------------------------------------------------


def test_compiling_keeps_parameters_and_state_dict_keys():
    """Either scope compiles in place (same parameters and keys); compiling again with the other
    scope removes the first one's wrappers, so no region is ever compiled inside another."""
    model = make_tiny_model("llama", num_layers=3)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    layers = model.model.layers
    assert compile_model(model, True, "eager") == 3
    assert list(model.state_dict()) == keys
    assert all(b._compiled_call_impl is not None for b in layers)
    assert model.model._compiled_call_impl is None
    assert compile_model(model, True, "eager", scope="decoder") == 1
    assert model.model._compiled_call_impl is not None
    assert all(b._compiled_call_impl is None for b in layers)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    assert compile_model(model, True, "eager") == 3
    assert model.model._compiled_call_impl is None
    assert compile_model(model, False) == 0
    with pytest.raises(ValueError, match=r"perf.compile_scope='model': must be one of blocks, decoder"):
        compile_model(model, True, "eager", scope="model")


def test_router_view_of_a_decoder_compiled_whole_runs_only_its_blocks(one_thread):
    """The router's view is a shallow copy of the decoder: compiled whole, the decoder holds a
    compiled call of itself, which the view must not inherit (it would run every block). The view
    compiles its own: its hidden states are the eager router's, not the full decoder's."""
    from lightning_cggr.routing.router import TruncatedRouter

    batch = _packed_batch()
    model = make_tiny_model("llama", num_layers=3)
    eager = copy.deepcopy(model)
    want = TruncatedRouter(eager, 1).hidden_states(batch["input_ids"])
    full = eager.model(input_ids=batch["input_ids"]).last_hidden_state
    compile_model(model, True, "aot_eager", scope="decoder")
    router = TruncatedRouter(model, 1)
    got = router.hidden_states(batch["input_ids"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, full, atol=1e-3)
    assert router.view._compiled_call_impl is not None
    assert router.view._compiled_call_impl is not model.model._compiled_call_impl
    compile_model(model, True, "aot_eager")  # back to blocks: the view is rebuilt, uncompiled
    assert router.view._compiled_call_impl is None


def _run_steps(model, cggr, perf, batches):
    step = CGGRStep(model, cggr, LossConfig(impl="torch"), perf=perf)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    losses = []
    for i, b in enumerate(batches):
        losses.append(optimizer_step(step, opt, [b], i, clip=1.0)[0].metrics["train/loss"].detach())
        yield losses


@pytest.mark.parametrize("scope", ["blocks", "decoder"])
@pytest.mark.parametrize("unit", ["token", "sequence"])
def test_compiled_steps_match_eager_and_compile_only_in_the_first(unit, scope, one_thread):
    """Five CGGR steps compiled (aot_eager: dynamo + autograd tracing, no code generation, so it is
    fast), block by block or the decoder whole: after the first step no new graph is made, and
    every loss equals the eager run's from the same weights and batches."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    batches = [_packed_batch(seed=20 + i) for i in range(5)]
    model = make_tiny_model("llama", num_layers=2)
    eager = list(_run_steps(copy.deepcopy(model), UNITS[unit], PerfConfig(), batches))[-1]
    graphs = []
    perf = PerfConfig(compile=True, compile_backend="aot_eager", compile_scope=scope, compile_routing=True)
    for losses in _run_steps(model, UNITS[unit], perf, batches):
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 2, f"the router's no-grad pass and the training forward each compile: {graphs}"
    assert graphs == [graphs[0]] * 5, f"graphs made after each step: {graphs}"
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager), rtol=1e-5, atol=1e-6)


def activation_checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether any module of ``model`` recomputes its activations in the backward (transformers' flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


# ---- activation checkpointing------------------------------------------------------------------


@pytest.mark.parametrize("setting", [True, 2])
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_activation_checkpointing_gives_the_same_loss_and_gradients(arch, unit, setting, one_thread):
    """perf.activation_checkpointing recomputes blocks in the backward (every block, or blocks 0, 2, ...
    with n = 2): the loss and every gradient equal the plain step's (GPT-2 and GPT-NeoX train with
    dropout: the recompute replays the same draws), on a padded batch with prompt labels masked, for
    standard, token and sequence routing."""
    from lightning_cggr.routing.router import find_blocks, find_decoder

    batch = make_batch(batch_size=4, seq_len=16, seed=5)
    plain = make_tiny_model(arch, num_layers=3)
    ckpt = copy.deepcopy(plain)
    want_loss, want = _loss_and_grads(CGGRStep(plain, UNITS[unit], LossConfig(impl="torch")), batch)
    step = CGGRStep(ckpt, UNITS[unit], LossConfig(impl="torch"), perf=PerfConfig(activation_checkpointing=setting))
    assert activation_checkpointing_on(ckpt) and not activation_checkpointing_on(plain)
    flags = [b.gradient_checkpointing for b in find_blocks(find_decoder(ckpt))[1]]
    assert flags == ([True, True, True] if setting is True else [True, False, True])
    got_loss, got = _loss_and_grads(step, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("scope", ["blocks", "decoder"])
def test_activation_checkpointing_inside_compiled_blocks_matches_eager_and_compiles_once(scope, one_thread):
    """Checkpointed blocks compiled (aot_eager), block by block or the decoder whole, over five
    sequence-routed steps: the eager plain run's losses, and no new graph after the first step."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    batches = [_packed_batch(seed=40 + i) for i in range(5)]
    model = make_tiny_model("llama", num_layers=2)
    eager = list(_run_steps(copy.deepcopy(model), UNITS["sequence"], PerfConfig(), batches))[-1]
    perf = PerfConfig(compile=True, compile_backend="aot_eager", compile_scope=scope, activation_checkpointing=True)
    graphs = []
    for losses in _run_steps(model, UNITS["sequence"], perf, batches):
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [graphs[0]] * 5, f"graphs made after each step: {graphs}"
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager), rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_is_refused_for_a_model_without_it_and_validated():
    from lightning_cggr.perf import apply_activation_checkpointing

    with pytest.raises(ValueError, match="perf.activation_checkpointing=true: Linear does not support activation"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), True)
    model = make_tiny_model("llama", num_layers=2)
    model.supports_gradient_checkpointing = False  # a transformers model class that opts out
    with pytest.raises(ValueError, match="use perf.activation_checkpointing=false"):
        CGGRStep(model, UNITS["token"], perf=PerfConfig(activation_checkpointing=True))
    apply_activation_checkpointing(torch.nn.Linear(2, 2), False)  # off: nothing is asked of the model
    for bad in ("yes", 0, -2, 1.5):
        with pytest.raises(ConfigError, match=f"perf.activation_checkpointing={bad!r}: must be true, false or an integer"):
            parse_config({"perf": {"activation_checkpointing": bad}})
    parse_config({"perf": {"activation_checkpointing": 3}})


class GraphRecorder:
    """A torch.compile backend that runs each graph as traced (like ``eager``) and records, per graph,
    whether any of its inputs has a symbolic size (torch made a dimension dynamic). ``symbolic``
    lists the model's graphs, ``routing`` the routing decision's (step.decide: its inputs are named
    after its arguments, the model's after the module's parameters)."""

    def __init__(self):
        self.symbolic: list[bool] = []
        self.routing: list[bool] = []

    def __call__(self, gm, example_inputs):
        def is_symbolic(v):
            if isinstance(v, torch.SymInt | torch.SymFloat):
                return True
            return isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape)

        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        symbolic = any(is_symbolic(n.meta.get("example_value")) for n in inputs)
        routing = any("trainable" in n.name for n in inputs)
        (self.routing if routing else self.symbolic).append(symbolic)
        return gm.forward


@pytest.mark.parametrize("dynamic", ["auto", False])
def test_compile_dynamic_decides_whether_sequence_routing_makes_the_batch_symbolic(dynamic, monkeypatch, one_thread):
    """Sequence routing runs the blocks at two batch sizes (the router's no-grad pass over all 4 rows,
    the training pass over 2). perf.compile_dynamic=auto leaves torch's default, which makes the batch
    dimension symbolic at the second size; false gives one specialized graph per (grad mode, size):
    exactly 2, none symbolic. Both compile nothing after the first step and give the eager losses."""
    import torch._dynamo

    from lightning_cggr import perf

    torch._dynamo.reset()
    recorder = GraphRecorder()
    monkeypatch.setattr(perf, "COMPILE_BACKENDS", (*perf.COMPILE_BACKENDS, recorder))
    batches = [_packed_batch(seed=40 + i) for i in range(4)]
    model = make_tiny_model("llama", num_layers=2)
    eager = list(_run_steps(copy.deepcopy(model), UNITS["sequence"], PerfConfig(), batches))[-1]
    made = []
    compiled = PerfConfig(compile=True, compile_backend=recorder, compile_dynamic=dynamic, compile_routing=True)
    for losses in _run_steps(model, UNITS["sequence"], compiled, batches):
        made.append(len(recorder.symbolic))
    assert made == [made[0]] * 4, f"graphs made after each step: {made}"
    assert recorder.routing == [False], recorder.routing  # one decision graph, same shapes every step
    if dynamic is False:
        assert recorder.symbolic == [False, False]
    else:
        assert any(recorder.symbolic), f"torch's default kept every graph static: {recorder.symbolic}"
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager), rtol=1e-5, atol=1e-6)


def _stats_and_mask(B=4, T=16, seed=0):
    """Random router statistics with one non-finite entry, and a trainable mask with holes."""
    from lightning_cggr.kernels import TokenStats

    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(4, B, T, generator=g, dtype=torch.float64).float() * 3
    raw[1, 0, 5] = float("nan")  # an overflowed entropy: never ranked hard (routing.guards)
    trainable = torch.rand(B, T, generator=g) > 0.2
    trainable[-1] = False  # a row with nothing to learn
    return TokenStats(*raw), trainable


DECISIONS = [  # (unit, strategy, scoring, ratio): ratio None is the dynamic ratio, within (0.2, 0.6)
    ("token", "topk", "combined", 0.3),
    ("token", "noise_excluded", "excess_loss", None),
    ("sequence", "topk", "entropy", None),
    ("sequence", "noise_excluded", "random", 0.5),
]


@pytest.mark.parametrize("unit,strategy,scoring,ratio", DECISIONS)
def test_inductor_compiled_routing_decision_equals_the_eager_one(unit, strategy, scoring, ratio, one_thread):
    """The routing decision (scores, ratio, selection, metrics) compiled with inductor picks the very
    units the eager function picks, with the same weights, normaliser and metrics."""
    from lightning_cggr.perf import compile_function
    from lightning_cggr.step import decide

    stats, trainable = _stats_and_mask()
    reference = _stats_and_mask(seed=1)[0] if scoring == "excess_loss" else None
    score = None
    if scoring == "random":
        stats, score = None, torch.rand(trainable.shape).masked_fill(~trainable, float("-inf"))
    kw = dict(unit=unit, scoring=scoring, sel=SelectionConfig(unit=unit, strategy=strategy, noise_fraction=0.1),
              ratio=ratio, bounds=(0.2, 0.6), cap=0.6 if ratio is None else ratio, generator=None, prune=None)
    want = decide(stats, reference, score, trainable, **kw)
    got = compile_function(decide, True, "inductor")(stats, reference, score, trainable, **kw)
    if unit == "token":  # TokenChoice: selection (keep, index, valid), weight, normaliser
        want_choice, got_choice = (*want[0].selection, *want[0][1:3]), (*got[0].selection, *got[0][1:3])
    else:  # RowChoice: index, valid, score, weight, normaliser
        want_choice, got_choice = want[0][:5], got[0][:5]
    assert torch.equal(got[1], want[1])  # kept positions
    assert 0 < int(want[1].sum()) < int(trainable.sum())
    for g, w in zip(got_choice, want_choice):
        if w is None or w.dtype in (torch.bool, torch.long):
            assert (g is None and w is None) or torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], msg=name)


@pytest.mark.parametrize("strategy,schedule,routing,graphs", [
    ("topk", "constant", True, 1), ("topk", "dynamic", True, 1), ("noise_excluded", "constant", True, 1),
    ("topk", "constant", False, 0), ("topk", "curriculum", True, 0), ("stratified", "constant", True, 0),
    ("importance", "constant", True, 0),
])
def test_the_routing_decision_compiles_once_where_it_can_and_else_runs_eagerly(strategy, schedule, routing, graphs,
                                                                                monkeypatch, one_thread):
    """Under perf.compile the step compiles its routing decision once and reuses it every step; with
    perf.compile_routing=false, for the rules that draw from a device generator and under a ratio
    curriculum (a new buffer size every step) it decides eagerly. Either way every step's loss and
    kept count are the uncompiled step's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from lightning_cggr import perf
    from lightning_cggr.config import RatioScheduleConfig

    torch._dynamo.reset()
    counters.clear()
    recorder = GraphRecorder()
    monkeypatch.setattr(perf, "COMPILE_BACKENDS", (*perf.COMPILE_BACKENDS, recorder))
    # each rule and schedule with its own knobs only (one another reads is refused)
    knobs = {"noise_excluded": {"noise_fraction": 0.1}}.get(strategy, {})
    ratio_knobs = {"curriculum": {"steps": 4}, "dynamic": {"min": 0.2, "max": 0.6}}.get(schedule, {})
    cggr = CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1),
                      **({} if schedule == "dynamic" else {"min_tokens_ratio": 0.3}),
                      selection=SelectionConfig(strategy=strategy, **knobs),
                      ratio_schedule=RatioScheduleConfig(kind=schedule, **ratio_knobs))
    model = make_tiny_model("llama", num_layers=2)
    eager = CGGRStep(copy.deepcopy(model), cggr, LossConfig(impl="torch"))
    perf_cfg = PerfConfig(compile=True, compile_backend=recorder, compile_routing=routing)
    step = CGGRStep(model, cggr, LossConfig(impl="torch"), perf=perf_cfg)
    for i in range(4):
        batch = _packed_batch(seed=60 + i)
        got, want = step(batch, global_step=i), eager(batch, global_step=i)
        torch.testing.assert_close(got.nll_sum, want.nll_sum)
        assert int(got.kept) == int(want.kept)
    assert recorder.routing == [False] * graphs, recorder.routing
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("unit", ["token", "sequence"])
def test_routing_decision_compiles_at_most_twice_over_changing_sequence_lengths(unit, monkeypatch, one_thread):
    """Chat batches are padded to their longest conversation, so the length changes nearly every
    batch: the compiled decision makes the length symbolic at the second one instead of compiling per
    length, and keeps what the eager one keeps at each."""
    from lightning_cggr import perf
    from lightning_cggr.step import decide

    recorder = GraphRecorder()
    monkeypatch.setattr(perf, "COMPILE_BACKENDS", (*perf.COMPILE_BACKENDS, recorder))
    fn = perf.compile_function(decide, True, recorder)
    kw = dict(unit=unit, scoring="combined", sel=SelectionConfig(unit=unit), ratio=0.3, bounds=(0.2, 0.6), cap=0.3,
              generator=None, prune=None)
    for T in (12, 16, 20, 31, 40, 64):
        stats, trainable = _stats_and_mask(T=T, seed=T)
        assert torch.equal(fn(stats, None, None, trainable, **kw)[1], decide(stats, None, None, trainable, **kw)[1])
    assert 1 <= len(recorder.routing) <= 2, recorder.routing


def test_compile_function_is_none_when_compilation_is_off():
    from lightning_cggr.perf import compile_function
    from lightning_cggr.step import decide

    assert compile_function(decide, False) is None


def _val_loader(n_blocks=5, batch_size=2, seq_len=12, vocab=50):
    """The packed-text data module's validation loader over ``n_blocks`` random blocks."""
    from types import SimpleNamespace

    from lightning_cggr.config import DataConfig
    from lightning_cggr.data.text import BlockDataset, PackedTextDataModule

    dm = PackedTextDataModule([], [], SimpleNamespace(eos_token_id=0), DataConfig(batch_size=batch_size))
    dm.val_set = BlockDataset(torch.randint(1, vocab, (n_blocks, seq_len), generator=torch.Generator().manual_seed(5)))
    return dm.val_dataloader()


def test_validation_batches_are_padded_to_full_size_and_give_the_same_loss(one_thread):
    """5 validation blocks at batch 2: three batches of 2 rows, the last padded with one row of EOS
    tokens whose labels are all ignored; the held-out NLL sum and token count equal those of the
    plain loader's 2 + 2 + 1 rows."""
    from torch.utils.data import DataLoader

    padded = list(_val_loader())
    assert [b["input_ids"].shape[0] for b in padded] == [2, 2, 2]
    assert (padded[-1]["input_ids"][1] == 0).all() and (padded[-1]["labels"][1] == -100).all()
    plain = list(DataLoader(_val_loader().dataset, batch_size=2))
    assert [b["input_ids"].shape[0] for b in plain] == [2, 2, 1]
    torch.testing.assert_close(padded[-1]["input_ids"][:1], plain[-1]["input_ids"])
    step = CGGRStep(make_tiny_model("llama", num_layers=1), CGGRConfig(enabled=False), LossConfig(impl="torch"))
    got = [sum(t) for t in zip(*(step.eval_terms(b) for b in padded))]
    want = [sum(t) for t in zip(*(step.eval_terms(b) for b in plain))]
    assert int(got[1]) == int(want[1]) == 5 * 11  # every block's 11 next-token targets
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_validation_before_training_leaves_the_compiled_batch_dimension_static(monkeypatch, one_thread):
    """train() validates before the first step: the padded last validation batch compiles nothing
    new, so under torch's automatic dynamic shapes the training graph that follows is still
    specialized (with the plain loader's short batch, torch made the batch dimension symbolic)."""
    import torch._dynamo

    from lightning_cggr import perf

    torch._dynamo.reset()
    recorder = GraphRecorder()
    monkeypatch.setattr(perf, "COMPILE_BACKENDS", (*perf.COMPILE_BACKENDS, recorder))
    model = make_tiny_model("llama", num_layers=2, vocab_size=50)
    step = CGGRStep(model, CGGRConfig(enabled=False), LossConfig(impl="torch"),
                    perf=PerfConfig(compile=True, compile_backend=recorder))
    with torch.no_grad():
        for batch in _val_loader():
            step.eval_terms(batch)
    train = {"input_ids": torch.randint(1, 50, (2, 12)), "labels": torch.randint(1, 50, (2, 12))}
    step(train, global_step=0).loss.backward()
    assert len(recorder.symbolic) == 2 and not any(recorder.symbolic), recorder.symbolic  # no-grad, training


def test_training_batch_sizes_follow_the_unit_and_the_ratio_schedule():
    """Hand-worked: ceil(ratio * 8) rows, under each schedule (sequence unit only)."""
    from lightning_cggr.config import RatioScheduleConfig
    from lightning_cggr.perf import training_batch_sizes

    seq = SelectionConfig(unit="sequence")
    assert training_batch_sizes(CGGRConfig(min_tokens_ratio=0.25, selection=seq), 8) == {8, 2}
    assert training_batch_sizes(CGGRConfig(min_tokens_ratio=0.25), 8) == {8}  # token unit: every row
    assert training_batch_sizes(CGGRConfig(enabled=False, selection=seq), 8) == {8}
    infobatch = SelectionConfig(unit="sequence", strategy="infobatch")
    assert training_batch_sizes(CGGRConfig(selection=infobatch), 8) == {8}  # its capacity is every row
    dyn = RatioScheduleConfig(kind="dynamic", min=0.1, max=0.3)
    assert training_batch_sizes(CGGRConfig(selection=seq, ratio_schedule=dyn), 8) == {8, 3}  # sized by max
    cur = RatioScheduleConfig(kind="curriculum", steps=100)
    assert training_batch_sizes(CGGRConfig(min_tokens_ratio=0.25, selection=seq, ratio_schedule=cur), 8) == {
        8, 7, 6, 5, 4, 3, 2}


def test_static_shapes_are_refused_where_shapes_keep_changing():
    """perf.compile_dynamic=false: refused for chat data (padded per batch) and for a curriculum under
    sequence routing with more sizes than torch compiles; accepted for packed text, and ignored when
    nothing is compiled (where it is refused as a setting nothing reads)."""
    from experiments.compose import compose
    from lightning_cggr.train import check_config

    base = ["trainer.accelerator=cpu", "perf.compile=true", "perf.compile_dynamic=false"]
    run, _ = check_config(compose([*base, "cggr=sequence"]))
    assert run.perf.compile_dynamic is False
    with pytest.raises(ConfigError, match=r"perf.compile_dynamic=false with data.source=chat.*compile_dynamic=auto"):
        check_config(compose([*base, "data=chat", "data.tokenizer=model", "model=smollm2_gguf"]))
    curriculum = ["cggr=sequence", "cggr.ratio_schedule.kind=curriculum", "data.batch_size=16"]
    with pytest.raises(ConfigError, match=r"sees 13 training batch sizes.*recompile_limit"):
        check_config(compose([*base, *curriculum]))
    with pytest.raises(ConfigError, match=r"perf.compile_dynamic=false: shapes what is compiled, but "
                                          r"perf.compile=false compiles nothing"):  # not a shape problem: an unread knob
        check_config(compose(["trainer.accelerator=cpu", "perf.compile=false", "perf.compile_dynamic=false", *curriculum]))
    # batch 7: sizes 7..2 (six) + the no-grad and spare graphs = 8, torch's limit; the whole decoder's
    # graphs also count the router's view (it shares the decoder's code): 9
    import torch._dynamo.config as dynamo_config

    six = ["cggr=sequence", "cggr.ratio_schedule.kind=curriculum", "data.batch_size=7"]
    with dynamo_config.patch(recompile_limit=8):  # torch's default, stated (config's own patcher)
        check_config(compose([*base, *six]))
        with pytest.raises(ConfigError, match=r"sees 6 training batch sizes.*and the router's view"):
            check_config(compose([*base, *six, "perf.compile_scope=decoder"]))
    with pytest.raises(ConfigError, match=r"perf.compile_dynamic='sometimes': must be auto, true or false"):
        parse_config({"perf": {"compile_dynamic": "sometimes"}})


def test_compile_scope_is_validated_and_decoder_scope_is_for_one_device():
    from experiments.compose import compose
    from lightning_cggr.train import check_config

    decoder = ["trainer.accelerator=cpu", "perf.compile=true", "perf.compile_scope=decoder"]
    run, _ = check_config(compose(decoder))
    assert run.perf.compile_scope == "decoder"
    assert check_config(compose(["trainer.accelerator=cpu", "perf.compile=true"]))[0].perf.compile_scope == "blocks"
    with pytest.raises(ConfigError, match=r"perf.compile_scope='layers': must be one of blocks, decoder"):
        parse_config({"perf": {"compile_scope": "layers"}})
    for strategy in ("ddp", "fsdp2"):
        multi = [f"trainer.strategy={strategy}", "trainer.devices=2", "trainer.accelerator=cpu",
                 "perf.compile_scope=decoder"]
        with pytest.raises(ConfigError, match=rf"compile_scope=decoder with trainer.strategy={strategy}.*"
                                              r"use perf.compile_scope=blocks"):
            check_config(compose([*multi, "perf.compile=true"]))
        with pytest.raises(ConfigError, match=r"perf.compile=auto \(false on a cpu run\) compiles nothing"):
            check_config(compose(multi))  # nothing compiled: the scope is a setting nothing reads


@pytest.mark.parametrize("knob, value", [("compile_scope", "decoder"), ("compile_dynamic", True),
                                         ("compile_dynamic", False), ("compile_routing", True)])
@pytest.mark.parametrize("compile_setting", ["false", "auto"])
def test_a_compile_setting_is_refused_when_nothing_is_compiled(knob, value, compile_setting):
    """perf.compile=false, or auto on a CPU (which compiles nothing), leaves compile_scope,
    compile_dynamic and compile_routing unread: the Hydra job and the Python API both refuse them,
    with the same message, and accept them when something is compiled."""
    from experiments.compose import compose
    from lightning_cggr.train import check_config

    override = f"perf.{knob}={str(value).lower()}"
    why = "perf.compile=false" if compile_setting == "false" else r"perf.compile=auto \(false on a cpu run\)"
    expected = rf"invalid configuration: {override}: shapes what is compiled, but {why} compiles nothing"
    with pytest.raises(ConfigError, match=expected):
        check_config(compose(["trainer.accelerator=cpu", f"perf.compile={compile_setting}", override]))
    perf = PerfConfig(compile=False if compile_setting == "false" else "auto", **{knob: value})
    with pytest.raises(ConfigError, match=expected):
        CGGRStep(make_tiny_model("llama", num_layers=2), CGGRConfig(), perf=perf)
    run, _ = check_config(compose(["trainer.accelerator=cpu", "perf.compile=true", override]))
    assert getattr(run.perf, knob) == value and run.perf.compile is True
    assert check_config(compose(["trainer.accelerator=cpu", f"perf.compile={compile_setting}",
                                 "perf.compile_backend=aot_eager"]))[0].perf.compile is False  # which compiler: unread, harmless


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "decoder"])
def test_inductor_compiled_step_gives_the_eager_loss_and_gradients(scope, one_thread):
    """Generated (C++) kernels on CPU: one routed step, loss and every gradient against eager. (Torch's
    hierarchical compilation, ``nested_compile_region`` around each block inside the decoder's
    graph, was tried for decoder scope's compile time and gave wrong block gradients with inductor
    on torch 2.13 while aot_eager's were right; a test like this one is what catches that.)"""
    import torch._dynamo

    torch._dynamo.reset()
    model = make_tiny_model("llama", num_layers=2)
    batch = _packed_batch(batch_size=2, seq_len=8)
    cggr = CGGRConfig(warmup_steps=0, min_tokens_ratio=0.5, router=RouterConfig(num_layers=1))
    ref_loss, ref_grads = _loss_and_grads(CGGRStep(copy.deepcopy(model), cggr, LossConfig(impl="torch")), batch)
    perf = PerfConfig(compile=True, compile_scope=scope)
    loss, grads = _loss_and_grads(CGGRStep(model, cggr, LossConfig(impl="torch"), perf=perf), batch)
    compiled = model.model if scope == "decoder" else model.model.layers[0]
    assert compiled._compiled_call_impl is not None
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# ---- GPU only -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_gpu_whole_optimizer_step_on_packed_text_never_syncs(unit):
    """On CUDA, a whole optimizer step on a packed batch (router, decoder through transformers,
    Triton loss, backward, clipping, fused AdamW) makes no synchronizing call: torch's sync debug
    mode raises on any. The first step (autotuning, lazy initialization) runs outside the check."""
    from lightning_cggr.step import autocast_for

    model = make_tiny_model("llama", num_layers=2).cuda()
    step = CGGRStep(model, UNITS[unit], LossConfig(impl="auto"))
    opt = build_optimizer(model, OptimConfig())
    assert opt.defaults["fused"] is True
    batch = {k: v.cuda() for k, v in _packed_batch().items()}
    bf16 = lambda: autocast_for("bf16-mixed", "cuda")  # noqa: E731
    optimizer_step(step, opt, [batch], 0, clip=1.0, autocast=bf16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer_step(step, opt, [batch], 1, clip=1.0, autocast=bf16)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("unit,strategy,scoring,ratio", DECISIONS[:3])
def test_gpu_compiled_routing_decision_equals_the_eager_one_and_never_syncs(unit, strategy, scoring, ratio):
    """perf.compile_routing on CUDA: the inductor-compiled decision (Triton code) keeps what the eager
    one keeps, and after its first (compiling) call makes no synchronizing call."""
    from lightning_cggr.kernels import TokenStats
    from lightning_cggr.perf import compile_function
    from lightning_cggr.step import decide

    stats, trainable = _stats_and_mask(B=8, T=256)
    stats, trainable = TokenStats(*(s.cuda() for s in stats)), trainable.cuda()
    reference = TokenStats(*(s.cuda() for s in _stats_and_mask(B=8, T=256, seed=1)[0]))
    kw = dict(unit=unit, scoring=scoring, sel=SelectionConfig(unit=unit, strategy=strategy, noise_fraction=0.1),
              ratio=ratio, bounds=(0.2, 0.6), cap=0.6 if ratio is None else ratio, generator=None, prune=None)
    fn = compile_function(decide, True, "inductor")
    want = decide(stats, reference, None, trainable, **kw)
    got = fn(stats, reference, None, trainable, **kw)
    assert torch.equal(got[1], want[1])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], msg=name)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(stats, reference, None, trainable, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")

"""Model FLOPs from the formula against torch's own count, by hand for SmolLM2, and MFU.

The independent count is ``torch.utils.flop_counter.FlopCounterMode``, which adds up the FLOPs of
every matmul the model actually runs. Eager attention multiplies the full [T, T] square, so the
formula is compared with ``causal=False`` there; the loss is the naive full-logits one, whose
matmuls the counter sees (the chunked kernel writes with ``mm(out=...)``, which it does not count).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ARCHS, make_batch, make_tiny_model
from lightning_cggr.config import CGGRConfig, LossConfig, RatioScheduleConfig, RouterConfig, SelectionConfig
from lightning_cggr.flops import FlopShape, forward_flops, mfu, peak_tflops, step_flops, train_flops
from lightning_cggr.models.attention import set_attn_implementation
from lightning_cggr.step import CGGRStep


def _eager(arch, layers=3):
    return set_attn_implementation(make_tiny_model(arch, num_layers=layers), "eager")


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_training_flops_equal_the_counted_matmuls(arch):
    model = _eager(arch)
    B, T = 2, 11
    ids = torch.randint(1, 90, (B, T))
    with FlopCounterMode(display=False) as fwd:
        h = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        model.lm_head(h)
    with FlopCounterMode(display=False) as train:
        h = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        model.lm_head(h).float().square().mean().backward()
    formula = forward_flops(FlopShape.of(model), B, T, causal=False)
    assert fwd.get_total_flops() == pytest.approx(formula, rel=1e-9)
    assert train.get_total_flops() == pytest.approx(3 * formula, rel=1e-9)


def _moe(family: str):
    """A tiny mixture-of-experts model (8 experts, 2 per token), experts and attention run eagerly so
    the counter sees every matmul: Mixtral; Qwen2-MoE with a shared expert; DeepSeek V3 with a shared
    expert, a dense first block and multi-head latent attention (q-k width 16, value width 8)."""
    import transformers

    torch.manual_seed(0)
    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    config = {
        "mixtral": lambda: transformers.MixtralConfig(**kw, num_local_experts=8, num_experts_per_tok=2),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**kw, num_experts=8, num_experts_per_tok=2,
                                                         moe_intermediate_size=16, shared_expert_intermediate_size=48),
        "deepseek_v3": lambda: transformers.DeepseekV3Config(
            **dict(kw, num_key_value_heads=4), n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    }[family]()
    config._experts_implementation = "eager"  # (grouped_mm's matmuls are invisible to the counter)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return set_attn_implementation(model, "eager")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_mixture_of_experts_counts_the_experts_a_token_runs(family):
    """Each token runs top_k of the routed experts (and every shared one): the formula counts that, as
    torch's counter does, in forward and training; it counted all 8 experts before (3.1x Mixtral's)."""
    model = _moe(family)
    B, T = 2, 11
    ids = torch.randint(1, 90, (B, T))
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            model.lm_head(model.base_model(input_ids=ids, use_cache=False).last_hidden_state)
    with FlopCounterMode(display=False) as train:
        model.lm_head(model.base_model(input_ids=ids, use_cache=False).last_hidden_state).float().square().mean().backward()
    formula = forward_flops(FlopShape.of(model), B, T, causal=False)
    assert fwd.get_total_flops() == pytest.approx(formula, rel=1e-9)
    assert train.get_total_flops() == pytest.approx(3 * formula, rel=1e-9)


@pytest.mark.parametrize("family", ["gemma4", "opt"])
def test_blocks_that_differ_and_matrices_outside_the_blocks(family):
    """Gemma 4: a per-block head size (its 6th block's is 512, not 8; the config refuses a global read,
    which crashed the module's construction) and a per-layer input projection on the decoder; OPT: input
    and output projections around its blocks. Formula and counter agree in forward and training."""
    import transformers
    from test_model_families import _per_layer_inputs_family  # (tests/ is on the path, as for conftest)

    if family == "gemma4":
        model = _per_layer_inputs_family("gemma4")
    else:
        torch.manual_seed(0)
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=16, max_position_embeddings=64))
    model = set_attn_implementation(model, "eager")
    B, T = 2, 11
    ids = torch.randint(1, 60, (B, T))
    with FlopCounterMode(display=False) as train:
        model(input_ids=ids, use_cache=False).logits.float().square().mean().backward()
    shape = FlopShape.of(model)
    assert train.get_total_flops() == pytest.approx(3 * forward_flops(shape, B, T, causal=False), rel=1e-9)
    if family == "gemma4":
        assert [qk for qk, _ in shape.attention] == [32] * 5 + [4 * 512] and shape.outside_params > 0
        from lightning_cggr.module import CGGRModule

        assert CGGRModule(model, CGGRConfig()).flop_shape == shape  # constructs, with its MFU


def test_experts_without_a_top_k_in_the_config_are_refused(monkeypatch):
    """A family naming its top-k otherwise (here: a name the formula does not know) gets no FLOPs, and
    the module then logs no MFU, rather than a count of every expert."""
    import lightning_cggr.flops as flops

    monkeypatch.setattr(flops, "TOP_K_NAMES", ("experts_per_token",))
    with pytest.raises(ValueError, match="MixtralForCausalLM: its blocks hold experts but its config names no "
                                         "experts_per_token"):
        FlopShape.of(_moe("mixtral"))


def _family(name: str):
    """Tiny models of families whose blocks hold more than q/k/v/o and an MLP, eager attention and
    experts. BART and Whisper as causal LMs: cross-attention modules that never run; DeepSeek V3.2:
    a sparse-attention indexer (4 heads of 8) beside latent attention; JetMoE: attention and MLP
    experts in ``ParallelExperts`` containers (4 experts, 2 per token; query heads = 2 x 2 key-value
    heads); gpt-oss: expert biases stored as [experts, out] matrices; LongCat-Flash without zero
    experts: two attention and two MLP sublayers per block."""
    import transformers

    torch.manual_seed(0)
    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=64)
    mla = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    config = {
        "bart": lambda: transformers.BartConfig(vocab_size=96, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                                decoder_ffn_dim=64, max_position_embeddings=64, is_decoder=True),
        "whisper": lambda: transformers.WhisperConfig(vocab_size=96, d_model=32, decoder_layers=2,
                                                      decoder_attention_heads=4, decoder_ffn_dim=64,
                                                      max_target_positions=64, pad_token_id=0, bos_token_id=1,
                                                      eos_token_id=2, decoder_start_token_id=1),
        "deepseek_v32": lambda: transformers.DeepseekV32Config(
            **kw, **mla, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, index_n_heads=4, index_head_dim=8, index_topk=8),
        "jetmoe": lambda: transformers.JetMoeConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, kv_channels=8, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64),
        "gpt_oss": lambda: transformers.GptOssConfig(**dict(kw, num_key_value_heads=2), head_dim=8, num_local_experts=4,
                                                     num_experts_per_tok=2, layer_types=["full_attention"] * 2),
        "longcat_flash": lambda: transformers.LongcatFlashConfig(
            **dict(kw, num_hidden_layers=4), **mla, head_dim=8, ffn_hidden_size=64, expert_ffn_hidden_size=16,
            n_routed_experts=4, moe_topk=2, zero_expert_num=0),
    }[name]()
    config._experts_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    return set_attn_implementation(model, "eager")


@pytest.mark.parametrize("family", ["bart", "whisper", "deepseek_v32", "jetmoe", "gpt_oss", "longcat_flash"])
def test_block_parts_beyond_attention_and_mlp(family):
    """Formula and counter agree in training for each of :func:`_family`'s blocks. Before, the formula
    counted cross-attention (1.33x Whisper's matmuls), every JetMoE expert, gpt-oss's expert biases,
    one of LongCat's two attentions and the encoder's head count (Whisper), and missed the indexer's
    scores (DeepSeek V3.2), which run in forward only: no gradient flows through its top-k."""
    model = _family(family)
    B, T = 2, 11
    ids = torch.randint(1, 90, (B, T))
    with FlopCounterMode(display=False) as train:
        model(input_ids=ids, use_cache=False).logits.float().square().mean().backward()
    shape = FlopShape.of(model)
    assert train.get_total_flops() == pytest.approx(train_flops(shape, B, T, causal=False), rel=1e-9)
    assert (train_flops(shape, B, T) < 3 * forward_flops(shape, B, T)) == (family == "deepseek_v32")


def test_zero_computation_experts_by_hand():
    """LongCat-Flash with 4 routed experts and 6 zero-computation (identity) experts, top 2 of the 10:
    a token runs 2 x 4 / 10 = 0.8 routed experts on average. Each routed expert is gate_up 32 x 32
    + down 32 x 16 = 1,536 elements (transformers also allocates gate_up slices for the zero experts,
    which never run). Per block: two MLA attentions of 16x32 + 64x16 + 24x32 + 64x16 + 32x32 = 4,352
    each, two dense MLPs of 3 x 64 x 32 = 6,144 each, a router of 10 x 32 = 320, so
    8,704 + 12,288 + 320 + 0.8 x 1,536 = 22,540.8 elements a token runs through; attention q-k
    width 2 x 4 x 16 = 128, value width 2 x 4 x 8 = 64."""
    import transformers

    config = transformers.LongcatFlashConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8, ffn_hidden_size=64,
        expert_ffn_hidden_size=16, n_routed_experts=4, moe_topk=2, zero_expert_num=6)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shape = FlopShape.of(model)
    assert shape.block_params == pytest.approx((22_540.8,)), shape.block_params
    assert shape.attention == ((128, 64),)


def test_an_indexer_without_its_sizes_in_the_config_is_refused(monkeypatch):
    import lightning_cggr.flops as flops

    monkeypatch.setattr(flops, "INDEXER_NAMES", ("indexer_heads", "index_head_dim"))
    with pytest.raises(ValueError, match="its attention has an indexer but the config names no indexer_heads"):
        FlopShape.of(_family("deepseek_v32"))


CASES = {
    "standard": CGGRConfig(enabled=False),
    "token": CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1)),
    "token_batch_min": CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=2),
                                  selection=SelectionConfig(scope="batch", min_per_sequence=2)),
    "dynamic": CGGRConfig(warmup_steps=0, ratio_schedule=RatioScheduleConfig(kind="dynamic", min=0.2, max=0.6)),
    "final": CGGRConfig(warmup_steps=0, router=RouterConfig(source="final")),
    "random_token": CGGRConfig(warmup_steps=0, scoring="random"),
    "sequence": CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1), selection=SelectionConfig(unit="sequence")),
    "random_sequence": CGGRConfig(warmup_steps=0, scoring="random", selection=SelectionConfig(unit="sequence")),
    "infobatch_token": CGGRConfig(warmup_steps=0, scoring="loss", router=RouterConfig(num_layers=1),
                                  selection=SelectionConfig(strategy="infobatch", anneal_fraction=0)),
    "infobatch_sequence": CGGRConfig(warmup_steps=0, scoring="loss", router=RouterConfig(num_layers=1),
                                     selection=SelectionConfig(unit="sequence", strategy="infobatch", anneal_fraction=0)),
    "sequence_stride": CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1, score_stride=3),
                                  selection=SelectionConfig(unit="sequence")),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("loss", ["naive", "torch"])
def test_step_flops_equal_the_counted_matmuls_of_each_method(case, loss, one_thread):
    """Router, body and head sizes per method, against everything the real step multiplies."""
    model = _eager("llama")
    batch = make_batch(batch_size=4, seq_len=16, pad_tail=False)
    step = CGGRStep(model, CASES[case], LossConfig(impl=loss))
    with FlopCounterMode(display=False) as counted:
        step(batch, global_step=0).loss.backward()
    want = step_flops(FlopShape.of(model), CASES[case], 4, 16, loss_impl=loss, causal=False)
    assert want["total"] == pytest.approx(want["router"] + want["body"] + want["head"])
    assert counted.get_total_flops() == pytest.approx(want["total"], rel=1e-9)


def test_smollm2_shape_by_hand():
    """SmolLM2-135M (30 layers, hidden 576, 9 query / 3 key-value heads of 64, MLP 1536, vocab
    49152), 8 x 2048 tokens, causal. Per layer: q, o 576^2; k, v 576 x 192; MLP 3 x 576 x 1536
    = 3,538,944 weights. Per token forward: body 2 x 30 x 3,538,944 = 212,336,640; head
    2 x 576 x 49152 = 56,623,104; attention 4 x 576 x 30 x (2049 / 2) = 70,813,440;
    sum 339,773,184. Training step: 3 x 16384 tokens x that = 16.70 TFLOP."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shape = FlopShape.of(model)
    assert shape.block_params == (3_538_944,) * 30 and shape.attention == ((576, 576),) * 30
    assert forward_flops(shape, 1, 2048) / 2048 == pytest.approx(339_773_184)
    total = step_flops(shape, CGGRConfig(enabled=False), 8, 2048)["total"]
    assert total == pytest.approx(3 * 16384 * 339_773_184)
    assert total / 1e12 == pytest.approx(16.70, abs=0.01)
    # the same step in 0.150 s on an H100 SXM (the measurement): 11.3% MFU
    assert mfu(total, 0.150, peak_tflops("NVIDIA H100 80GB HBM3")) == pytest.approx(0.1125, abs=5e-4)


def test_causal_attention_counts_the_lower_triangle():
    shape = FlopShape(hidden=8, vocab=0, block_params=(0,), attention=((8, 8),))
    # T = 4: 10 query-key pairs under the causal mask, 16 in the full square; 4 FLOPs per pair and width unit
    assert forward_flops(shape, 1, 4, head_rows=0) == 4 * 8 * 10
    assert forward_flops(shape, 1, 4, head_rows=0, causal=False) == 4 * 8 * 16


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.05), ("NVIDIA L40", 181.05), ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0), ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 4090", 165.2), ("Tesla T4", None), ("", None),
    ("NVIDIA H800", 989.4), ("NVIDIA H800 PCIe", 756.5),
])
def test_peak_by_device_name(name, peak):
    assert peak_tflops(name) == peak


def test_mfu_is_achieved_over_peak():
    assert mfu(1e15, 2.0, 1000.0) == pytest.approx(0.5)
    assert mfu(1e15, 2.0, None) is None


# ---- the profile summary and the throughput report ------------------------------------------


class _Row:
    def __init__(self, key, count, cpu_us=0.0, dev_us=0.0, device=False):
        from torch.autograd import DeviceType

        self.key, self.count, self.self_cpu_time_total, self.self_device_time_total = key, count, cpu_us, dev_us
        self.device_type = DeviceType.CUDA if device else DeviceType.CPU


def test_profile_summary_per_step():
    from experiments.profiling import summarize

    rows = [
        _Row("ampere_bf16_gemm", 60, dev_us=3000.0, device=True), _Row("triton_red_fused", 40, dev_us=1000.0, device=True),
        _Row("cudaLaunchKernel", 80, cpu_us=400.0), _Row("cuLaunchKernel", 20, cpu_us=100.0),
        _Row("cudaStreamSynchronize", 4, cpu_us=50.0), _Row("aten::item", 6, cpu_us=10.0), _Row("aten::mm", 60, cpu_us=900.0),
    ]
    s = summarize(rows, steps=2)
    assert s["kernel_launches_per_step"] == 50  # (80 + 20) / 2
    assert s["device_kernels_per_step"] == 50 and s["device_kernel_ms_per_step"] == 2.0  # 4000 us / 2 steps
    assert s["syncs_per_step"]["cudaStreamSynchronize"] == 2 and s["syncs_per_step"]["aten::item"] == 3
    assert [k["name"] for k in s["top_device_kernels"]] == ["ampere_bf16_gemm", "triton_red_fused"]
    assert s["top_device_kernels"][0]["self_ms_per_step"] == 1.5
    assert s["top_cpu_ops"][0]["name"] == "aten::mm" and s["top_cpu_ops"][0]["calls_per_step"] == 30


def test_throughput_reports_model_flops_mfu_and_a_profile(tmp_path, one_thread):
    """A CPU smoke run of the benchmark with --profile: every field is there and consistent."""
    from experiments import throughput
    from experiments.compose import parse_run

    methods = "standard_fused,cggr_combined,cggr_sequence"
    argv = ["--preset", "tiny", "--device", "cpu", "--methods", methods, "--steps", "1", "--warmup", "0",
            "--mem-steps", "0", "--profile", "--profile-steps", "1", "--peak-tflops", "0.5", "--out", str(tmp_path),
            "data.batch_size=2", "data.block_size=32", "model.num_layers=2"]
    assert throughput.main(argv) == 0
    payload = json.loads((tmp_path / "throughput-tiny-cpu.json").read_text())
    shape = FlopShape(**payload["raw"]["timing"]["flop_shape"])
    assert shape.layers == 2
    for m in methods.split(","):
        s = payload["summary"][m]
        cggr = parse_run(payload["methods"][m]["config"]).cggr  # the method's resolved config
        want = step_flops(shape, cggr, 2, 32, loss_impl="torch")["total"]
        assert s["model_tflop_per_step"] == pytest.approx(want / 1e12)
        assert s["mfu"] == pytest.approx(want / s["median_step_s"] / 0.5e12)
        prof = payload["raw"]["profile"][m]
        assert prof["steps"] == 1 and prof["top_cpu_ops"] and "cudaStreamSynchronize" in prof["syncs_per_step"]
    assert payload["summary"]["cggr_sequence"]["model_tflop_per_step"] < payload["summary"]["standard_fused"]["model_tflop_per_step"]
    md = (tmp_path / "throughput-tiny-cpu.md").read_text()
    assert "MFU" in md and "Profile (torch.profiler" in md


def test_module_logs_mfu_on_a_card_with_a_known_peak(monkeypatch, one_thread):
    """train/mfu = executed model FLOPs of a throughput window / its seconds / peak: the same seconds
    as train/tokens_per_sec, so mfu = flops x tokens_per_sec / tokens / peak. The CPU has no peak (no
    train/mfu); a fake 1 TFLOP/s card stands in. (Windows end at each step here: log_every_n_steps=1.)"""
    import lightning as L

    from lightning_cggr import module as module_mod
    from lightning_cggr.module import CGGRModule

    cggr = CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1))
    batches = [make_batch(batch_size=4, seq_len=16, seed=i, pad_tail=False) for i in range(3)]

    def fit(**trainer_kw):
        module = CGGRModule(make_tiny_model("llama", num_layers=2), cggr, LossConfig(impl="torch"))
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, **trainer_kw)
        loader = torch.utils.data.DataLoader(batches, batch_size=None)  # a 4 x 16 batch per rank and step
        trainer.fit(module, train_dataloaders=loader)
        return module, trainer.callback_metrics

    _, metrics = fit()
    assert "train/tokens_per_sec" in metrics and "train/mfu" not in metrics
    monkeypatch.setattr(module_mod, "device_peak_tflops", lambda device: ("fake card", 1.0))
    module, metrics = fit()
    want = step_flops(FlopShape.of(module.model), cggr, 4, 16, loss_impl="torch")["total"]
    assert float(metrics["train/mfu"]) == pytest.approx(want * float(metrics["train/tokens_per_sec"]) / 64 / 1e12, rel=1e-5)
    # 2 forked ranks, each its own 64 tokens per step: tokens_per_sec counts both ranks', MFU one device's
    module, metrics = fit(devices=2, strategy="ddp_fork")
    assert float(metrics["train/mfu"]) == pytest.approx(want * float(metrics["train/tokens_per_sec"]) / 128 / 1e12, rel=1e-5)


@pytest.mark.parametrize("save_inside_a_window, every, padded", [(False, 4, False), (True, 4, False), (False, 0, False),
                                                                  (False, 4, True)])
def test_throughput_windows_leave_out_validation_checkpoints_and_the_first_step(monkeypatch, tmp_path, one_thread,
                                                                                save_inside_a_window, every, padded):
    """tokens/s over the steps between logging boundaries (log_every_n_steps=4: after steps 1, 4, 8),
    on a fake clock: a training micro-batch of 64 tokens takes 1 s before step 4 and 2 s from step 4 on;
    step 0 (compilation, on a GPU) takes 1000 s; each validation (after steps 3 and 6) takes 100 s
    and each checkpoint 50 s (the save's own time, after the module's hook; its callbacks' hooks before
    it take 7 s, counted as the step's). Saves at the boundaries (4, 8) fall between windows, validations
    and a save inside a window (step 5) are subtracted: the window of steps 4-7 gives 256 tokens / 8 s
    = 32 tokens/s, with the save inside it 256 / 15 s. With log_every_n_steps=0 no window closes (no
    step is logged, so none syncs for it) and no tokens/s is logged. Padded batches (the last row's
    4 tokens are padding: 60 tokens each) count their tokens, not their padding: 240 / 8 s."""
    import lightning as L

    from lightning_cggr import module as module_mod
    from lightning_cggr.module import CGGRModule

    clock = [0.0]
    monkeypatch.setattr(module_mod, "_clock", lambda: clock[0])

    class Timed(CGGRModule):
        def training_step(self, batch, batch_idx):
            clock[0] += 1000.0 if self.global_step == 0 else (1.0 if self.global_step < 4 else 2.0)
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            clock[0] += 100.0
            return super().validation_step(batch, batch_idx, dataloader_idx)

    class Saves(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step in ((4, 5, 8) if save_inside_a_window else (4, 8)):
                trainer.save_checkpoint(tmp_path / f"step{trainer.global_step}.ckpt")
                clock[0] += 50.0

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):  # before the module's hook
            clock[0] += 7.0

    batches = [make_batch(batch_size=4, seq_len=16, seed=i, pad_tail=padded) for i in range(9)]
    module = Timed(make_tiny_model("llama", num_layers=2), CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1)),
                   LossConfig(impl="torch"))
    trainer = L.Trainer(accelerator="cpu", max_steps=9, logger=False, enable_checkpointing=False, callbacks=[Saves()],
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=every,
                        val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=torch.utils.data.DataLoader(batches[:1], batch_size=None))
    if not every:
        assert "train/tokens_per_sec" not in trainer.callback_metrics
        return
    tokens = 4 * (60 if padded else 64)
    assert float(trainer.callback_metrics["train/tokens_per_sec"]) == pytest.approx(tokens / (15 if save_inside_a_window else 8))


def test_model_summary_shows_the_formula_flops_not_zero(capsys, caplog, one_thread):
    """Lightning's summary counts FLOPs from an ``example_input_array``, which the module has none
    of: it printed 0. The summary now holds the formula's forward FLOPs of one micro-batch and a
    line with the training step's. Reference: the counted matmuls of the eager model at that shape,
    with the attention square cut to its causal triangle by hand (eager multiplies the full square)."""
    import lightning as L
    from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

    from lightning_cggr.callbacks import FormulaModelSummary
    from lightning_cggr.flops import flop_count
    from lightning_cggr.module import CGGRModule

    B, T, layers = 4, 16, 2
    model = _eager("llama", layers=layers)
    cfg = model.config
    heads, width = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    # per layer: Q K^T and P V, 2 FLOPs per multiply-add, over T^2 pairs counted, T(T+1)/2 run
    over = layers * 2 * 2 * B * heads * width * (T * T - T * (T + 1) // 2)
    batch = make_batch(batch_size=B, seq_len=T, pad_tail=False)
    with FlopCounterMode(display=False) as fwd:
        model(batch["input_ids"])
    with FlopCounterMode(display=False) as train:
        model(batch["input_ids"], labels=batch["input_ids"]).loss.backward()
    model.zero_grad()

    caplog.set_level(logging.INFO, logger="lightning_cggr.callbacks")
    cggr = CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1))
    module = CGGRModule(model, cggr, LossConfig(impl="torch"))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[FormulaModelSummary(B, T)])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    out = capsys.readouterr().out

    forward = get_human_readable_count(fwd.get_total_flops() - over)
    assert f"Total FLOPs: {forward}" in " ".join(out.split())
    assert "Total FLOPs: 0" not in " ".join(out.split())
    line = next(m for m in caplog.messages if "training micro-batch of 4 x 16 tokens" in m)
    assert f"{flop_count(train.get_total_flops() - 3 * over)} without routing" in line
    routed = step_flops(FlopShape.of(model), cggr, B, T, loss_impl="torch")
    assert f"{flop_count(routed['total'])} routed" in line
    assert f"{routed['total'] / (train.get_total_flops() - 3 * over):.2f}x the FLOPs" in line


def test_the_summary_line_of_padded_batches_says_its_shape_is_a_bound():
    """Chat batches are padded to their longest conversation: the line's block size is the most a
    batch has, and it says so; the FLOP figures are those of that bound."""
    from lightning_cggr.callbacks import FormulaModelSummary
    from lightning_cggr.module import CGGRModule

    module = CGGRModule(make_tiny_model("llama", num_layers=2), CGGRConfig(), LossConfig(impl="torch"))
    plain = FormulaModelSummary(4, 16).step_line(module)
    padded = FormulaModelSummary(4, 16, padded=True).step_line(module)
    assert plain.startswith("model FLOPs of a training micro-batch of 4 x 16 tokens") and "padded" not in plain
    bound, note = padded.split("; batches are padded to their longest conversation")
    assert bound == plain.replace("of 4 x 16 tokens", "of at most 4 x 16 tokens")
    assert note == ", most to fewer than 16 tokens (train/mfu counts each batch's own shape)"


TRANSFORM_DENSE = {"bert": "cls.predictions.transform.dense", "modernbert-decoder": "lm_head.dense",
                   "electra": "generator_predictions.dense"}


@pytest.mark.parametrize("case", ["standard", "token", "sequence"])
@pytest.mark.parametrize("family", sorted(TRANSFORM_DENSE))
def test_a_head_transform_counts_on_the_rows_the_head_runs_on(family, case, one_thread):
    """A BERT-style head transform (dense, activation, norm before the head) runs on the kept rows
    only: the formula's step FLOPs against everything the real step multiplies (torch loss), and its
    forward against the model's own forward. ELECTRA also projects its embeddings (width 16) to the
    blocks' width (32) on the decoder, above the module that holds the blocks: counted per token."""
    from test_model_families import _head_transform_family

    model = set_attn_implementation(_head_transform_family(family).train(), "eager")
    shape = FlopShape.of(model)
    assert shape.head_input_params == model.get_submodule(TRANSFORM_DENSE[family]).weight.numel()
    assert shape.outside_params == (16 * 32 if family == "electra" else 0)
    B, T = 4, 16
    ids = torch.randint(3, 60, (B, T))
    with FlopCounterMode(display=False) as fwd:
        model(input_ids=ids, use_cache=False)
    assert fwd.get_total_flops() == pytest.approx(forward_flops(shape, B, T, causal=False), rel=1e-9)
    step = CGGRStep(model, CASES[case], LossConfig(impl="torch"))
    with FlopCounterMode(display=False) as counted:
        step({"input_ids": ids, "labels": ids.clone()}, global_step=0).loss.backward()
    want = step_flops(shape, CASES[case], B, T, loss_impl="torch", causal=False)
    assert counted.get_total_flops() == pytest.approx(want["total"], rel=1e-9)

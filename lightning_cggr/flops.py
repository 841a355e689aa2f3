"""Model FLOPs of a training step from a formula, and MFU against the card's peak.

The formula counts matrix-multiply FLOPs (2 per multiply-add) and nothing else: norms, softmax,
rotary, activations, the embedding lookup and the optimizer are left out, as in the usual MFU
definitions (PaLM, Megatron), so "model FLOPs" depend on the model and the batch shape only.

Forward, per sequence of T tokens through L decoder blocks, for every family with a plain block
list (Llama/SmolLM2, GPT-2, GPT-NeoX; nothing family-specific is needed), summed block by block
(blocks may differ: per-block configs, hybrid state-space blocks, a dense block before the experts):

- body: ``2 * N_blocks * T``, with ``N_blocks`` the elements of every matrix (>= 2-D parameter)
  inside the blocks: q, k, v, o and the MLP, whatever their names and shapes (grouped-query k/v,
  GPT-2's fused c_attn, GPT-NeoX's query_key_value). Embeddings and the LM head are not in it.
  Mixture-of-experts blocks: the routed experts' matrices (parameters under a module named
  ``experts``, fused 3-D or one module per expert) count ``top_k / num_experts`` of their elements,
  what each token runs through (shared experts and the router's gate count whole); the two numbers
  come from the config (:data:`TOP_K_NAMES`, :data:`EXPERT_COUNT_NAMES`), and a model with experts
  but neither is refused (no MFU rather than a wrong one);
- attention scores and mixing: ``2 * (d_qk + d_v) * P`` per layer (Q K^T and A V, each width heads x
  head size; ``d_qk = d_v`` but for multi-head latent attention), with ``P = T (T + 1) / 2``
  query-key pairs under the causal mask (the work a causal kernel does; ``causal=False`` counts the
  full ``T^2`` square that eager attention multiplies); none for a block whose ``layer_types`` entry
  is in :data:`NO_ATTENTION_LAYER_TYPES` (Mamba, linear attention: their scans are not counted);
- outside the blocks: ``2 * N_outside * T``, the decoder's other matrices (OPT's projections, Gemma
  4's per-layer input projection; embedding tables excepted), on every pass that runs blocks;
- LM head: ``2 * H * V`` per row it runs on (all T positions in the standard step).

Training = 3 x forward: backward computes two matmuls (input gradient and weight gradient) per
forward matmul. A CGGR step runs parts of this at different sizes (:func:`step_flops`): the router
(first k blocks + head on every token, forward only, no grad), the body forward + backward on all
rows (token unit) or on the ``ceil(ratio * B)`` kept rows (sequence unit), and the head + loss
forward + backward on the rows the loss kernel actually receives (the selection's static capacity;
all rows for the naive full-logits loss). These are executed FLOPs: a method that skips work has
fewer, so its MFU measures how well it uses the card, and its speed-up is the step-time ratio.

MFU = model FLOPs per step / step seconds / peak FLOP/s, with the peak the card's dense bf16
tensor throughput from :data:`PEAK_BF16_TFLOPS` (no sparsity), found by the CUDA device's name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# Dense (no 2:4 sparsity) BF16 tensor-core TFLOPS from NVIDIA's data sheets, most specific name first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"GH200", 989.4),
    (r"H200 NVL", 835.5),
    (r"H200", 989.4),
    (r"H100 NVL", 835.5),
    (r"H100 PCIe", 756.5),
    (r"H100", 989.4),  # SXM5 (device names like "NVIDIA H100 80GB HBM3")
    (r"H800", 989.4),
    (r"B200", 2250.0),
    (r"A100", 312.0),
    (r"A800", 312.0),
    (r"L40S", 362.05),
    (r"L40", 181.05),
    (r"L4", 121.0),
    (r"A10", 125.0),
    (r"RTX A6000", 154.8),
    (r"RTX 6000 Ada", 364.25),
    (r"RTX 4090", 165.2),
    (r"RTX 3090", 71.0),
)
"""(pattern matched as a whole word in the device name, peak dense bf16 TFLOPS)."""


def peak_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak of the named card, or None when it is not in :data:`PEAK_BF16_TFLOPS`."""
    if not device_name:
        return None
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(pattern)}(?![A-Za-z0-9])", device_name):
            return tflops
    return None


def device_peak_tflops(device: str | torch.device) -> tuple[str | None, float | None]:
    """(device name, dense bf16 peak TFLOPS or None) of ``device``; a CPU has no entry."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return name, peak_tflops(name)


def mfu(flops_per_step: float, step_seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the peak (``peak`` in TFLOPS)."""
    if not peak or not step_seconds or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * 1e12)


NO_ATTENTION_LAYER_TYPES = ("linear_attention", "mamba", "conv", "moe")
"""``layer_types`` entries of blocks without quadratic attention (state-space, linear-attention,
convolution and MoE-only blocks of hybrid models); every other block counts its attention."""


@dataclass(frozen=True)
class FlopShape:
    """What the formula needs of a model, per block where blocks differ (hybrid models, Gemma 4's
    per-layer head sizes, a dense first block before the experts)."""

    hidden: int
    vocab: int
    block_params: tuple[float, ...]
    """Per block: the elements of its >= 2-D parameters a token runs through (routed experts at the
    fraction a token uses)."""
    attention: tuple[tuple[int, int], ...]
    """Per block: (query-key width, value width), each query heads x head size; (0, 0) for a block
    without quadratic attention."""
    outside_params: float = 0
    """The elements of the matrices the decoder runs outside its blocks on every token, embedding
    tables excepted: OPT's input/output projections, Gemma 3n's and Gemma 4's per-layer input projection."""

    @property
    def layers(self) -> int:
        return len(self.block_params)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "FlopShape":
        from .routing.router import block_owner, find_blocks, find_decoder, find_head

        decoder = find_decoder(model)
        _, blocks = find_blocks(decoder)
        owner = block_owner(decoder)  # where the matrices outside the blocks are
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        views = getattr(cfg, "per_layer_config", None)  # transformers' per-block configs (Gemma 4), where given
        if isinstance(views, dict) or not (hasattr(views, "__getitem__") and len(views) == len(blocks)):
            views = None
        layer_types = getattr(cfg, "layer_types", None)
        fraction = None
        params, attention = [], []
        for i, block in enumerate(blocks):
            dense = experts = 0
            for name, p in block.named_parameters():
                if p.dim() >= 2:
                    if "experts" in name.split("."):
                        experts += p.numel()
                    else:
                        dense += p.numel()
            if experts and fraction is None:
                fraction = active_expert_fraction(model)
            params.append(dense + (experts * fraction if experts else 0))
            quadratic = not layer_types or i >= len(layer_types) or layer_types[i] not in NO_ATTENTION_LAYER_TYPES
            attention.append(_attention_widths(views[i] if views else cfg) if quadratic else (0, 0))
        vocab, width = find_head(model).weight.shape
        inside = {id(p) for p in blocks.parameters()} | {
            id(p) for m in owner.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        outside = sum(p.numel() for p in owner.parameters() if p.dim() >= 2 and id(p) not in inside)
        return cls(hidden=width, vocab=vocab, block_params=tuple(params), attention=tuple(attention),
                   outside_params=outside)


def _attention_widths(cfg) -> tuple[int, int]:
    """(query-key, value) widths of one block's attention from its config: heads x head size, with
    multi-head latent attention's own sizes (DeepSeek V2/V3: ``qk_head_dim`` vs ``v_head_dim``)."""
    heads = _first(cfg, "num_attention_heads", "n_head")
    hidden = _first(cfg, "hidden_size", "n_embd")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    if getattr(cfg, "v_head_dim", None):
        qk = getattr(cfg, "qk_head_dim", None) or (
            (getattr(cfg, "qk_nope_head_dim", None) or 0) + (getattr(cfg, "qk_rope_head_dim", None) or 0))
        return heads * (qk or head_dim), heads * cfg.v_head_dim
    return heads * head_dim, heads * head_dim


TOP_K_NAMES = ("num_experts_per_tok", "moe_topk", "moe_top_k", "top_k_experts")
EXPERT_COUNT_NAMES = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def active_expert_fraction(model: torch.nn.Module) -> float:
    """The fraction of a mixture-of-experts block's routed experts each token runs through,
    ``top_k / num_experts``, from the model's (text) config; ValueError where it names neither."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    configs = [cfg, *(getattr(cfg, n) for n in ("ffn_config",) if getattr(cfg, n, None) is not None)]
    top_k = next((getattr(c, n) for c in configs for n in TOP_K_NAMES if getattr(c, n, None)), None)
    count = next((getattr(c, n) for c in configs for n in EXPERT_COUNT_NAMES if getattr(c, n, None)), None)
    if not top_k or not count:
        raise ValueError(f"{type(model).__name__}: its blocks hold experts but its config names no "
                         f"{' / '.join(TOP_K_NAMES)} and {' / '.join(EXPERT_COUNT_NAMES)}, so the FLOPs a token "
                         "costs are unknown")
    return top_k / count


def _first(cfg, *names):
    for name in names:
        value = getattr(cfg, name, None)
        if value:
            return value
    raise ValueError(f"{type(cfg).__name__}: none of {names}")


def forward_flops(
    shape: FlopShape, batch: int, seq: int, *, layers: int | None = None, head_rows: int | None = None, causal: bool = True
) -> float:
    """Forward matmul FLOPs of ``batch`` sequences of ``seq`` tokens through the first ``layers``
    blocks (default all) plus the LM head on ``head_rows`` rows (default every token; 0: none)."""
    layers = shape.layers if layers is None else layers
    head_rows = batch * seq if head_rows is None else head_rows
    pairs = seq * (seq + 1) / 2 if causal else seq * seq
    body = 2 * (sum(shape.block_params[:layers]) + (shape.outside_params if layers else 0)) * batch * seq
    attention = 2 * sum(qk + v for qk, v in shape.attention[:layers]) * pairs * batch
    head = 2 * shape.hidden * shape.vocab * head_rows
    return body + attention + head


def _capacity(length: int, ratio: float) -> int:
    from .routing.selection import static_capacity

    return static_capacity(length, ratio)


def step_flops(shape: FlopShape, cggr, batch: int, seq: int, *, loss_impl: str = "torch",
               routed: bool = True, causal: bool = True) -> dict[str, float]:
    """Executed model FLOPs of one micro-batch of the training step under ``cggr`` (a CGGRConfig),
    by part: ``router`` (scoring passes, forward only), ``body`` (decoder forward + backward),
    ``head`` (LM head + loss forward + backward) and ``total``. ``routed=False``: a warm-up step.

    Ratios: the constant ``min_tokens_ratio``; a dynamic schedule's static capacity (its max) for
    the head rows and kept sequences; a curriculum's final ratio. A reference model
    (scoring=excess_loss) is not counted."""
    B, T = batch, seq
    on = cggr.enabled and routed
    if not on:
        body = 3 * forward_flops(shape, B, T, head_rows=0, causal=causal)
        head = 3 * forward_flops(shape, 0, T, layers=0, head_rows=B * T)
        return {"router": 0.0, "body": body, "head": head, "total": body + head}
    sel = cggr.selection
    ratio = cggr.ratio_schedule.max if cggr.ratio_schedule.kind == "dynamic" else cggr.min_tokens_ratio
    router = 0.0
    if cggr.scoring != "random" and cggr.router.source == "truncated":
        stride = cggr.router.score_stride  # statistics of every stride-th trainable token (sequence unit)
        router = forward_flops(shape, B, T, layers=cggr.router.num_layers, head_rows=B * -(-T // stride),
                               causal=causal)
    if sel.unit == "sequence":
        rows = _capacity(B, ratio)
        body = 3 * forward_flops(shape, rows, T, head_rows=0, causal=causal)
        head = 3 * forward_flops(shape, 0, T, layers=0, head_rows=rows * T)
        return {"router": router, "body": body, "head": head, "total": router + body + head}
    if cggr.router.source == "final" and cggr.scoring != "random":
        router = forward_flops(shape, 0, T, layers=0, head_rows=B * T)  # statistics of the final states
    body = 3 * forward_flops(shape, B, T, head_rows=0, causal=causal)
    m = sel.min_per_sequence
    if loss_impl == "naive":
        rows = B * T  # full logits, easy labels masked
    elif sel.scope == "batch":
        rows = min(B * T, max(_capacity(B * T, ratio), B * min(m, T)))
    else:
        rows = B * min(T, max(_capacity(T, ratio), m))
    head = 3 * forward_flops(shape, 0, T, layers=0, head_rows=rows)
    return {"router": router, "body": body, "head": head, "total": router + body + head}


def tflop(x: float) -> float:
    """FLOPs as TFLOP, rounded for reports."""
    return round(x / 1e12, 4) if math.isfinite(x) else x

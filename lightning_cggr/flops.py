"""Model FLOPs of a training step from a formula, and MFU against the card's peak.

The formula counts matrix-multiply FLOPs (2 per multiply-add) and nothing else: norms, softmax,
rotary, activations, the embedding lookup and the optimizer are left out, as in the usual MFU
definitions (PaLM, Megatron), so "model FLOPs" depend on the model and the batch shape only.

Forward, per sequence of T tokens through L decoder blocks, for every family with a plain block
list (Llama/SmolLM2, GPT-2, GPT-NeoX; nothing family-specific is needed), summed block by block
(blocks may differ: per-block configs, hybrid state-space blocks, a dense block before the experts):

- body: ``2 * N_blocks * T``, with ``N_blocks`` the elements of every matrix (>= 2-D parameter)
  inside the blocks: q, k, v, o and the MLP, whatever their names and shapes (grouped-query k/v,
  GPT-2's fused c_attn, GPT-NeoX's query_key_value). Embeddings and the LM head are not in it, nor
  are cross-attention modules (BART-style and Whisper decoders as causal LMs: no encoder states, so
  they never run). Mixture-of-experts blocks: the routed experts' matrices (under a module named
  ``experts``, fused 3-D or one module per expert, or in an ``...Experts`` container such as
  JetMoE's) count ``top_k / experts`` of their elements, what a token runs through on average
  (shared experts and the router's gate count whole; zero-computation experts, LongCat-Flash's,
  count among the choices, without matrices); the numbers come from the config
  (:data:`TOP_K_NAMES`, :data:`EXPERT_COUNT_NAMES`, :data:`ZERO_EXPERT_NAMES`), and a model with
  experts but no top-k or count is refused (no MFU rather than a wrong one);
- attention scores and mixing: ``2 * (d_qk + d_v) * P`` per self-attention sublayer (Q K^T and A V,
  each width heads x head size; ``d_qk = d_v`` but for multi-head latent attention), with
  ``P = T (T + 1) / 2`` query-key pairs under the causal mask (the work a causal kernel does;
  ``causal=False`` counts the full ``T^2`` square that eager attention multiplies); none for a block
  whose ``layer_types`` entry is in :data:`NO_ATTENTION_LAYER_TYPES` (Mamba, linear attention: their
  scans are not counted);
- a sparse-attention indexer (DeepSeek V3.2 and its relatives): its matrices on every token and its
  scores over the ``T^2`` square (:func:`_indexer_width`), in forward only;
- outside the blocks: ``2 * N_outside * T``, the decoder's other matrices (OPT's projections, Gemma
  4's per-layer input projection, ELECTRA's embedding projection; embedding tables and poolers
  excepted, :func:`_outside_matrices`), on every pass that runs blocks;
- LM head: ``2 * H * V`` per row it runs on (all T positions in the standard step), plus twice the
  elements of any matrices the model runs between decoder and head (a BERT-style head transform) on
  the same rows.

Training = 3 x forward (:func:`train_flops`): backward computes two matmuls (input gradient and
weight gradient) per forward matmul; an indexer's, which no gradient reaches, count once, and a frozen
weight's (a PEFT model's base weights and head) twice: it has no weight gradient. A CGGR
step runs parts of this at different sizes (:func:`step_flops`): the router (first k blocks + head
on every token, forward only, no grad), the body forward + backward on all
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
    (r"H800 PCIe", 756.5),
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
    tables and poolers excepted: OPT's input/output projections, Gemma 3n's and Gemma 4's per-layer input
    projection, ELECTRA's and RoFormer's embedding projection, RoCBert's input map."""
    indexer: tuple[tuple[float, int], ...] = ()
    """Per block (empty: no block has one): a sparse-attention indexer's (matrix elements, query-key
    width of its scores), see :func:`_indexer_width`. It runs in forward only: its output is the
    top-k key indices, through which no gradient flows, so backward never runs it."""
    frozen_params: tuple[float, ...] = ()
    """Per block (empty: none anywhere): the part of :attr:`block_params` whose matrices do not train
    (``requires_grad`` off when the shape is taken: a PEFT model's base weights). Backward runs
    their input-gradient matmul but not their weight-gradient one."""
    outside_frozen: float = 0
    """The part of :attr:`outside_params` that does not train."""
    head_frozen: bool = False
    """Whether the LM head's weight does not train (a PEFT model's)."""
    head_input_params: float = 0
    """The elements of the matrices a model runs between its decoder and its head (a BERT-style head
    transform, :class:`~lightning_cggr.routing.router.HeadInput`), on every row the head runs on."""
    head_input_frozen: float = 0
    """The part of :attr:`head_input_params` that does not train."""

    @property
    def layers(self) -> int:
        return len(self.block_params)

    @classmethod
    def of(cls, model: torch.nn.Module, transform=None) -> "FlopShape":
        """The shape of ``model``; ``transform``: its checked LogitTransform where the caller has it
        (:attr:`CGGRStep.logit_transform`), else found here (a 4-token probe of the model)."""
        from .routing.router import block_owner, checked_logit_transform, find_blocks, find_decoder, find_head

        decoder = find_decoder(model)
        _, blocks = find_blocks(decoder)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        views = getattr(cfg, "per_layer_config", None)  # transformers' per-block configs (Gemma 4), where given
        if isinstance(views, dict) or not (hasattr(views, "__getitem__") and len(views) == len(blocks)):
            views = None
        layer_types = getattr(cfg, "layer_types", None)
        experts = None
        params, attention, indexer, frozen = [], [], [], []
        for i, block in enumerate(blocks):
            dense, routed, scorer = [0.0, 0.0], [0.0, 0.0], 0.0  # (all, frozen)
            for name, p in _block_matrices(block):
                if "indexer" in name.split(".")[:-1]:
                    scorer += p.numel()
                    continue
                if _is_routed_expert(name, block):
                    if experts is None:
                        experts = expert_counts(model)
                    part, n = routed, p.numel()
                    if p.dim() == 3 and p.shape[0] > experts.routed:  # slices kept for zero experts
                        n = p.numel() // p.shape[0] * experts.routed
                else:
                    part, n = dense, p.numel()
                part[0] += n
                part[1] += 0 if p.requires_grad else n
            share = experts.top_k / experts.choices if experts is not None else 0.0
            params.append(dense[0] + routed[0] * share)
            frozen.append(dense[1] + routed[1] * share)
            quadratic = not layer_types or i >= len(layer_types) or layer_types[i] not in NO_ATTENTION_LAYER_TYPES
            qk, v = _attention_widths(views[i] if views else cfg) if quadratic else (0, 0)
            copies = _attention_copies(block)
            attention.append((qk * copies, v * copies))
            indexer.append((scorer, _indexer_width(block, cfg)))
        head = find_head(model).weight
        vocab, width = head.shape
        outside = _outside_matrices(model, decoder, blocks, block_owner(decoder))
        pre = (checked_logit_transform(model) if transform is None else transform).pre
        before_head = [p for p in pre.parameters() if p.dim() >= 2] if pre is not None else []
        return cls(hidden=width, vocab=vocab, block_params=tuple(params), attention=tuple(attention),
                   outside_params=sum(p.numel() for p in outside),
                   indexer=tuple(indexer) if any(w for _, w in indexer) else (),
                   frozen_params=tuple(frozen) if any(frozen) else (),
                   outside_frozen=sum(p.numel() for p in outside if not p.requires_grad),
                   head_frozen=not head.requires_grad,
                   head_input_params=sum(p.numel() for p in before_head),
                   head_input_frozen=sum(p.numel() for p in before_head if not p.requires_grad))


POOLER_NAMES = ("pooler",)
"""Module names of a pooler (BERT-style decoders keep one): it runs on one token per sequence, so its
matrices are not counted per token."""


def _outside_matrices(model: torch.nn.Module, decoder: torch.nn.Module, blocks: torch.nn.ModuleList,
                      owner: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The decoder's >= 2-D parameters outside its blocks that run on every token of text: those of
    the modules that run on a text probe of ``model`` (:func:`~lightning_cggr.routing.router.probing`), anywhere in
    the decoder (OPT's projections on the module that holds the blocks, ELECTRA's ``embeddings_project``
    above it, RoCBert's ``map_inputs_layer`` in its embeddings module; a vision tower, which text never
    reaches, is left out), but not embedding tables, poolers or cross-attention. Where the model cannot
    run (meta device): the matrices of ``owner``, the module that holds the blocks."""
    from .routing.router import probing

    ran: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda m, *_: ran.add(id(m))) for m in decoder.modules()]
    try:
        with probing(model) as probe:
            probed = probe is not None
            if probed:
                decoder(input_ids=probe, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    skip = {id(p) for p in blocks.parameters()}
    modules = []
    for name, module in (decoder if probed else owner).named_modules():
        parts = name.split(".") if name else []
        if isinstance(module, torch.nn.Embedding) or any(
                part in POOLER_NAMES or _is_cross_attention(part) for part in parts):
            skip |= {id(p) for p in module.parameters()}
        elif not probed or id(module) in ran:
            modules.append(module)
    seen, out = set(), []
    for module in modules:
        for p in module.parameters(recurse=False):
            if p.dim() >= 2 and id(p) not in skip and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _is_cross_attention(name: str) -> bool:
    """A module name of cross-attention (``encoder_attn``, ``crossattention``, ``cross_attn``, T5's
    ``EncDecAttention``): it attends to an encoder's states, which a causal LM never passes, so it is
    skipped in every step and none of its matrices run."""
    low = name.lower()
    return low in ("encoder_attn", "encdecattention") or ("cross" in low and "att" in low)


def _block_matrices(block: torch.nn.Module):
    """(dotted name, parameter) of every >= 2-D parameter of ``block`` a token can run through: those
    under cross-attention modules left out, and expert biases (gpt-oss keeps them as [experts, out]
    matrices; a bias adds, it does not multiply)."""
    for name, p in block.named_parameters():
        parts = name.split(".")
        if p.dim() < 2 or any(_is_cross_attention(part) for part in parts[:-1]):
            continue
        if "bias" in parts[-1] and _is_routed_expert(name, block):
            continue
        yield name, p


ROUTER_NAMES = ("router", "gate")
"""Module names of a mixture-of-experts router (its gate runs on every token, whole)."""


def _is_routed_expert(name: str, block: torch.nn.Module) -> bool:
    """Whether parameter ``name`` of ``block`` belongs to routed experts: under a module named
    ``experts`` (fused 3-D tensors or one module per expert), or held by a module whose class is an
    ``...Experts`` container other than a shared one (JetMoE's ``ParallelExperts``); a router inside
    such a module (JetMoE's attention experts hold theirs) is not an expert."""
    parts = name.split(".")
    if any(part in ROUTER_NAMES for part in parts[:-1]):
        return False
    if "experts" in parts[:-1]:
        return True
    owner = block.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else block
    cls = type(owner).__name__.lower()
    return cls.endswith("experts") and "shared" not in cls


def _attention_copies(block: torch.nn.Module) -> int:
    """How many self-attention sublayers one block runs: the length of a block's list of them
    (LongCat-Flash holds two, ``self_attn[0]`` and ``self_attn[1]``), else 1."""
    for name, child in block.named_children():
        low = name.lower()
        if isinstance(child, torch.nn.ModuleList) and ("attn" in low or "attention" in low) \
                and not _is_cross_attention(name):
            return len(child)
    return 1


INDEXER_NAMES = ("index_n_heads", "index_head_dim")
"""Config names of a sparse-attention indexer's heads and head size (DeepSeek V3.2 DSA, GLM-5, ...)."""


def _indexer_width(block: torch.nn.Module, cfg) -> int:
    """The query-key width of the block's own sparse-attention indexer (a module named ``indexer``;
    a block reusing another's selection has none): it scores every query-key pair with
    ``index_n_heads`` heads of ``index_head_dim`` and weights the heads (one more multiply-add per
    head and pair), so ``heads * (head_dim + 1)``. The main attention is counted as any block's: the
    indexer's top-k keys enter it as a mask. Forward only (:attr:`FlopShape.indexer`)."""
    if not any(name.split(".")[-1] == "indexer" for name, _ in block.named_modules()):
        return 0
    heads, size = (getattr(cfg, n, None) for n in INDEXER_NAMES)
    if not heads or not size:
        raise ValueError(f"{type(block).__name__}: its attention has an indexer but the config names no "
                         f"{' / '.join(INDEXER_NAMES)}, so the FLOPs it costs are unknown")
    return heads * (size + 1)


def _attention_widths(cfg) -> tuple[int, int]:
    """(query-key, value) widths of one block's attention from its config: heads x head size, with
    multi-head latent attention's own sizes (DeepSeek V2/V3: ``qk_head_dim`` vs ``v_head_dim``)."""
    heads = _first(cfg, "decoder_attention_heads", "num_attention_heads", "n_head")  # (the decoder's, not
    # the encoder's, in encoder-decoder families used as causal LMs: BART, Whisper)
    hidden = _first(cfg, "hidden_size", "n_embd")
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "kv_channels", None) or hidden // heads
    if getattr(cfg, "v_head_dim", None):
        qk = getattr(cfg, "qk_head_dim", None) or (
            (getattr(cfg, "qk_nope_head_dim", None) or 0) + (getattr(cfg, "qk_rope_head_dim", None) or 0))
        return heads * (qk or head_dim), heads * cfg.v_head_dim
    return heads * head_dim, heads * head_dim


TOP_K_NAMES = ("num_experts_per_tok", "moe_topk", "moe_top_k", "top_k_experts")
EXPERT_COUNT_NAMES = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
ZERO_EXPERT_NAMES = ("zero_expert_num",)
"""Config names of experts without matrices (LongCat-Flash's identity experts): a token's top-k
choices fall among them too, and cost nothing there."""


@dataclass(frozen=True)
class ExpertCounts:
    """A mixture-of-experts config's routing: ``top_k`` choices per token among ``choices`` experts,
    of which ``routed`` have matrices (the rest are zero-computation experts)."""

    top_k: int
    routed: int
    choices: int


def expert_counts(model: torch.nn.Module) -> ExpertCounts:
    """The model's (text) config's :class:`ExpertCounts`; ValueError where it names no top-k or no
    expert count (no MFU rather than a count of every expert)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    configs = [cfg, *(getattr(cfg, n) for n in ("ffn_config",) if getattr(cfg, n, None) is not None)]
    top_k = next((getattr(c, n) for c in configs for n in TOP_K_NAMES if getattr(c, n, None)), None)
    count = next((getattr(c, n) for c in configs for n in EXPERT_COUNT_NAMES if getattr(c, n, None)), None)
    if not top_k or not count:
        raise ValueError(f"{type(model).__name__}: its blocks hold experts but its config names no "
                         f"{' / '.join(TOP_K_NAMES)} and {' / '.join(EXPERT_COUNT_NAMES)}, so the FLOPs a token "
                         "costs are unknown")
    zero = next((getattr(c, n) for c in configs for n in ZERO_EXPERT_NAMES if getattr(c, n, None)), 0)
    return ExpertCounts(top_k=int(top_k), routed=int(count), choices=int(count) + int(zero))


def _first(cfg, *names):
    for name in names:
        value = getattr(cfg, name, None)
        if value:
            return value
    raise ValueError(f"{type(cfg).__name__}: none of {names}")


def forward_flops(shape: FlopShape, batch: int, seq: int, *, layers: int | None = None,
                  head_rows: int | None = None, causal: bool = True) -> float:
    """Forward matmul FLOPs of ``batch`` sequences of ``seq`` tokens through the first ``layers``
    blocks (default all) plus the LM head on ``head_rows`` rows (default every token; 0: none)."""
    graded, _ = _graded_forward(shape, batch, seq, layers, head_rows, causal)
    return graded + _indexer_flops(shape, batch, seq, layers)


def train_flops(shape: FlopShape, batch: int, seq: int, *, layers: int | None = None,
                head_rows: int | None = None, causal: bool = True) -> float:
    """Forward + backward matmul FLOPs of the same pass: 3 x the forward, but for the parts that run
    in forward only (an indexer's, :attr:`FlopShape.indexer`) and for frozen matrices
    (:attr:`FlopShape.frozen_params`: no weight gradient, so 2 x). Not modelled: backward stops below
    the lowest trainable parameter, so where the embeddings do not train (PEFT), the first block's
    matmuls on inputs that need no gradient skip their input-gradient product too; the formula counts
    them (at most one block's input-gradient matmuls over)."""
    graded, frozen = _graded_forward(shape, batch, seq, layers, head_rows, causal)
    return 3 * graded - frozen + _indexer_flops(shape, batch, seq, layers)


def _pairs(seq: int, causal: bool) -> float:
    return seq * (seq + 1) / 2 if causal else seq * seq


def _graded_forward(shape: FlopShape, batch, seq, layers, head_rows, causal) -> tuple[float, float]:
    """(forward FLOPs of every matmul that backward runs through, the part of them on frozen weights)."""
    layers = shape.layers if layers is None else layers
    head_rows = batch * seq if head_rows is None else head_rows
    body = 2 * (sum(shape.block_params[:layers]) + (shape.outside_params if layers else 0)) * batch * seq
    attention = 2 * sum(qk + v for qk, v in shape.attention[:layers]) * _pairs(seq, causal) * batch
    head = 2 * shape.hidden * shape.vocab * head_rows
    head_input = 2 * shape.head_input_params * head_rows
    frozen = 2 * (sum(shape.frozen_params[:layers]) + (shape.outside_frozen if layers else 0)) * batch * seq
    frozen += (head if shape.head_frozen else 0) + 2 * shape.head_input_frozen * head_rows
    return body + attention + head + head_input, frozen


def _indexer_flops(shape: FlopShape, batch, seq, layers) -> float:
    """The indexers' forward FLOPs: their matrices on every token and their scores over the full
    ``T^2`` square (transformers computes them in plain torch and masks the causal part afterwards,
    whatever the attention implementation, so ``causal`` does not apply)."""
    part = shape.indexer[: shape.layers if layers is None else layers]
    return sum(2 * n * batch * seq + 2 * width * seq * seq * batch for n, width in part)


def _capacity(length: int, ratio: float) -> int:
    from .routing.selection import static_capacity

    return static_capacity(length, ratio)


def step_flops(shape: FlopShape, cggr, batch: int, seq: int, *, loss_impl: str = "torch",
               routed: bool = True, causal: bool = True) -> dict[str, float]:
    """Executed model FLOPs of one micro-batch of the training step under ``cggr`` (a CGGRConfig),
    by part: ``router`` (scoring passes, forward only), ``body`` (decoder forward + backward),
    ``head`` (LM head + loss forward + backward) and ``total``. ``routed=False``: a warm-up step.

    Ratios: the constant ``min_tokens_ratio``; a dynamic schedule's static capacity (its max) for
    the head rows and kept sequences; a curriculum's final ratio; every row for InfoBatch (it keeps a
    random subset of any size, so it runs at full capacity and saves no compute). A reference model
    (scoring=excess_loss) is not counted."""
    B, T = batch, seq
    on = cggr.enabled and routed
    if not on:
        body = train_flops(shape, B, T, head_rows=0, causal=causal)
        head = train_flops(shape, 0, T, layers=0, head_rows=B * T)
        return {"router": 0.0, "body": body, "head": head, "total": body + head}
    sel = cggr.selection
    ratio = cggr.ratio_schedule.max if cggr.ratio_schedule.kind == "dynamic" else cggr.min_tokens_ratio
    if sel.strategy == "infobatch":
        ratio = 1.0  # any subset may survive its draw: the static capacity is every row
    router = 0.0
    if cggr.scoring != "random" and cggr.router.source == "truncated":
        stride = cggr.router.score_stride  # statistics of every stride-th trainable token (sequence unit)
        router = forward_flops(shape, B, T, layers=cggr.router.num_layers, head_rows=B * -(-T // stride),
                               causal=causal)
    if sel.unit == "sequence":
        rows = _capacity(B, ratio)
        body = train_flops(shape, rows, T, head_rows=0, causal=causal)
        head = train_flops(shape, 0, T, layers=0, head_rows=rows * T)
        return {"router": router, "body": body, "head": head, "total": router + body + head}
    if cggr.router.source == "final" and cggr.scoring != "random":
        router = forward_flops(shape, 0, T, layers=0, head_rows=B * T)  # statistics of the final states
    body = train_flops(shape, B, T, head_rows=0, causal=causal)
    m = sel.min_per_sequence
    if loss_impl == "naive":
        rows = B * T  # full logits, easy labels masked
    elif sel.scope == "batch":
        rows = min(B * T, max(_capacity(B * T, ratio), B * min(m, T)))
    else:
        rows = B * min(T, max(_capacity(T, ratio), m))
    head = train_flops(shape, 0, T, layers=0, head_rows=rows)
    return {"router": router, "body": body, "head": head, "total": router + body + head}


def flop_count(flops: float) -> str:
    """FLOPs with an SI prefix and 3 significant digits: ``19.3 TFLOP``."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {prefix}FLOP"
    return f"{flops:.3g} FLOP"


def tflop(x: float) -> float:
    """FLOPs as TFLOP, rounded for reports."""
    return round(x / 1e12, 4) if math.isfinite(x) else x

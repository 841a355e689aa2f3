"""The truncated router: the base model's own first k blocks, final norm and LM head.

Nothing is copied. The router keeps a *view* of the model's decoder: a shallow copy of the decoder
module object whose parameters, buffers and submodules are the very same objects as the model's,
except that its block list holds only the first ``k`` blocks. Running that view uses the model's
own embedding, position handling (rotary or learned), attention-mask construction and final norm,
so every architecture transformers supports with a plain block list works without per-family code.

The view is not registered as a submodule, so the router adds no parameters, no state-dict keys
and no checkpoint bytes.
"""

from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple

import torch
from torch import nn

from ..perf import COMPILED_WITH

# Names under which decoders keep their list of blocks: Llama, Mistral, Qwen2, SmolLM2, GPT-NeoX
# ("layers"); GPT-2, GPT-Neo, GPT-J, CodeGen, Falcon, Bloom ("h"); XLNet and the BERT-style decoders
# under ``encoder`` ("layer").
BLOCK_LIST_NAMES = ("layers", "h", "blocks", "layer")

SOURCES = ("truncated", "final")
"""``cggr.router.source``: the first k blocks (:class:`TruncatedRouter`) or the forward's own final
hidden states (router-free; the step scores them)."""


def _from_peft(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT class (a model wrapper or an adapter layer)."""
    return type(module).__module__.split(".")[0] == "peft"


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM itself: inside a PEFT wrapper (LoRA and the other adapters),
    ``get_base_model()``, the same modules with the adapters injected into them; else ``model``."""
    if _from_peft(model) and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def find_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack of a Hugging Face causal LM (in a PEFT wrapper or not): ``model.base_model``,
    or where the class's ``base_model_prefix`` names no attribute of it (Llama 4's and Mllama's causal
    LMs), its ``model``."""
    model = causal_lm(model)
    decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        decoder = model._modules.get("model")
    if decoder is None:
        raise ValueError(
            f"{type(model).__name__} is not a Hugging Face *ForCausalLM model with a decoder "
            "(looked for model.base_model distinct from the model itself, then model.model)"
        )
    return decoder


LAYER_COUNT_NAMES = ("num_hidden_layers", "n_layer", "num_layers")
"""Config attributes that hold a decoder's depth; the router's view sets the first one present to k."""

PER_LAYER_INPUT_NAMES = ("hidden_size_per_layer_input",)
"""Config attributes of per-layer input embeddings, one slice per block, shaped by the depth (Gemma 3n,
Gemma 4): a view of such a decoder keeps the full depth in its config, since the decoder reshapes those
inputs by it and block i reads slice i; it still runs only its k blocks (it slices its block list)."""

NESTED_DECODER_NAMES = ("decoder", "language_model", "model", "transformer", "encoder")
"""Where a decoder keeps its blocks one module further down (OPT's ``decoder``, Gemma 3's
``language_model``, BERT-style decoders' ``encoder``): only these names are searched, so a vision
tower's layers are never taken."""


def _block_path(decoder: nn.Module) -> tuple[str, ...] | None:
    for name in BLOCK_LIST_NAMES:
        blocks = decoder._modules.get(name)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return (name,)
    for outer in NESTED_DECODER_NAMES:
        child = decoder._modules.get(outer)
        if child is not None:
            for name in BLOCK_LIST_NAMES:
                blocks = child._modules.get(name)
                if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                    return (outer, name)
    return None


def find_blocks(decoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's list of transformer blocks and its dotted path from the decoder (``layers``, or
    one level down, e.g. ``decoder.layers`` for OPT)."""
    path = _block_path(decoder)
    if path is None:
        raise ValueError(
            f"unsupported architecture {type(decoder).__name__}: looked for a block list named "
            f"{' or '.join(BLOCK_LIST_NAMES)} on the decoder (or on its {'/'.join(NESTED_DECODER_NAMES)}) "
            "and found none"
        )
    module = decoder
    for name in path:
        module = module._modules[name]
    return ".".join(path), module


def block_owner(decoder: nn.Module) -> nn.Module:
    """The module that holds the decoder's block list: the decoder itself, or its child on the block
    path (OPT's ``decoder``, Gemma 3's ``language_model``); its final norm and other modules sit there."""
    path, _ = find_blocks(decoder)
    for name in path.split(".")[:-1]:
        decoder = decoder._modules[name]
    return decoder


def _truncated_view(module: nn.Module, path: tuple[str, ...], num_layers: int) -> nn.Module:
    """A shallow copy of ``module`` whose submodule ``path`` holds only the first ``num_layers`` blocks
    (each module along the path copied the same way), with its own config copy where it has one."""
    view = copy.copy(module)  # new module object; same parameter/buffer dicts
    view._modules = dict(module._modules)  # own submodule table ...
    head, rest = path[0], path[1:]
    if rest:
        view._modules[head] = _truncated_view(module._modules[head], rest, num_layers)
    else:
        view._modules[head] = nn.ModuleList(list(module._modules[head])[:num_layers])  # ... k blocks
    config = module.__dict__.get("config")
    if config is not None:
        config = copy.copy(config)
        per_layer_inputs = any(getattr(config, name, None) for name in PER_LAYER_INPUT_NAMES)
        for name in LAYER_COUNT_NAMES:
            if hasattr(config, name) and not per_layer_inputs:
                setattr(config, name, num_layers)
                break
        view.config = config
    return view


def find_head(model: nn.Module) -> nn.Linear:
    """The LM head: a linear layer, with or without a bias (Phi, GPT-J and CodeGen have one)."""
    model = causal_lm(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and _from_peft(head):
        kind = f"{type(head).__module__}.{type(head).__name__}"
        raise ValueError(
            f"{type(model).__name__}: a PEFT adapter wraps its LM head ({kind}); CGGR's loss and scores multiply "
            "the head's own weight, so the adapter would be skipped. Leave the head (lm_head) out of the "
            "adapter's target_modules and modules_to_save")
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}: expected a linear LM head from get_output_embeddings()")
    return head


class HeadInput:
    """What a model runs between its decoder's final hidden states and its LM head, such as a
    BERT-style head transform (dense, activation, norm): the model's own modules, by reference, applied
    row by row. Found by :func:`check_logit_transform` where ``head(h)`` alone is not the model's logits.

    ``modules`` run in order; one of them may be a view of the module that holds the head (a shallow
    copy whose head is an identity, see :func:`_head_input`), so its own forward supplies
    whatever it computes between its input and its head."""

    def __init__(self, name: str, modules: list[nn.Module], views: dict[int, nn.Module] | None = None,
                 head: nn.Linear | None = None):
        self.name = name
        """Where it is in the model, for messages (``cls.predictions without its decoder``)."""
        self.modules = modules
        self._views = views or {}  # id(view) -> the module it copies, whose train/eval mode it follows
        # the head's own tensors, which a view may still hold (BERT's cls.predictions.bias is the head's)
        self._head = set() if head is None else {id(p) for p in head.parameters()}

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        for module in self.modules:
            if (owner := self._views.get(id(module))) is not None:
                module.training = owner.training
            hidden = module(hidden)
        return hidden

    def parameters(self) -> list[nn.Parameter]:
        """Its parameters, each once (the model's own; the head's are not among them)."""
        seen: dict[int, nn.Parameter] = {}
        for module in self.modules:
            for param in module.parameters():
                if id(param) not in self._head:
                    seen.setdefault(id(param), param)
        return list(seen.values())


class LogitTransform(NamedTuple):
    """How a causal LM turns its final hidden states ``h`` into logits, beyond the linear head:
    ``logits = softcap * tanh(scale * head(pre(h)) / softcap)`` (no cap when ``softcap`` is None; ``pre``
    the identity when None). The step applies ``pre`` and folds ``scale`` into the head's operands
    (:meth:`operands`) and hands ``softcap`` to the loss and statistics kernels."""

    scale: float = 1.0
    softcap: float | None = None
    pre: HeadInput | None = None

    def operands(self, hidden: torch.Tensor, head: nn.Linear):
        """``(hidden, weight, bias)`` for the kernels, with ``scale * head(h) = (scale h) @ W.T + scale b``:
        the head's own tensors (bias None where it has none) and ``pre(hidden)`` (``hidden`` itself
        where the model has nothing between decoder and head) at scale 1. ``hidden`` is [rows, H]: the
        kept rows only, in the loss, so ``pre`` costs what they cost."""
        bias = head.bias
        if self.pre is not None:
            hidden = self.pre(hidden)
        if self.scale != 1.0:
            hidden = hidden * self.scale
            bias = None if bias is None else bias * self.scale
        return hidden, head.weight, bias

    def token_stats(self, hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, *, impl: str,
                    chunk_size: int | None):
        """The no-grad ``TokenStats`` of the model's own logits of ``hidden`` [N, H]: this transform of
        ``head`` (``pre`` and scale in the operands, soft cap in the kernel)."""
        from ..kernels import token_stats

        h, weight, bias = self.operands(hidden, head)
        return token_stats(h, weight, labels, impl=impl, chunk_size=chunk_size, bias=bias, softcap=self.softcap)

    def describe(self) -> str:
        parts = ([f"x {self.scale:g}"] if self.scale != 1.0 else []) + (
            [f"soft-capped at {self.softcap:g}"] if self.softcap is not None else [])
        applied = "head(h)" if self.pre is None else f"head({self.pre.name}(h))"
        return applied + (" " + ", ".join(parts) if parts else "")


def logit_transform(model: nn.Module) -> LogitTransform:
    """The transforms transformers' causal LMs apply after the head, read from the model's config:
    ``final_logit_softcapping`` (Gemma 2 and 3) or ``logits_soft_cap`` (RecurrentGemma), ``logit_scale``
    (Cohere: times it), ``logits_scaling`` (Granite: divided by it) and ``logits_mup_width_multiplier``
    (Inkling: the hidden states divided by it). :func:`check_logit_transform` verifies the result."""
    config = getattr(model, "config", None)
    scale, softcap = 1.0, None
    if (value := getattr(config, "logit_scale", None)) is not None:
        scale *= float(value)
    for name in ("logits_scaling", "logits_mup_width_multiplier"):
        if (value := getattr(config, name, None)) is not None:
            scale /= float(value)
    for name in ("final_logit_softcapping", "logits_soft_cap"):
        if (value := getattr(config, name, None)) is not None:
            softcap = float(value)
    return LogitTransform(scale, softcap)


@contextlib.contextmanager
def probing(model: nn.Module, length: int = 4):
    """A probe of ``model``: yields ``length`` token ids [1, length] (0, 1, 2, ... modulo the embedding
    table) on its device, with the model in eval mode under no grad, each module's train/eval mode
    restored after; yields None where its weights are not materialised (meta device: nothing can run)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.device.type == "meta":
        yield None
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield (torch.arange(length, device=weight.device) % weight.shape[0]).unsqueeze(0)
    finally:
        for m, mode in modes:
            m.training = mode


def checked_logit_transform(model: nn.Module) -> LogitTransform:
    """The model's :class:`LogitTransform`, after checking that its decoder and head are found and
    that the transform reproduces its logits (:func:`check_logit_transform`, which also finds what the
    model runs between decoder and head): what the step and the reference model run at construction,
    so an unsupported architecture fails before any data loads."""
    find_decoder(model), find_head(model)
    check_causal(model)
    return check_logit_transform(model, logit_transform(model))


def check_causal(model: nn.Module) -> None:
    """Check on a 4-token probe (eval mode, no grad; modes restored) that the decoder's hidden states
    at positions 0-2 do not change when token 3 does: a model whose attention sees later tokens (a
    BERT-style model without ``is_decoder=True``, XLNet without a permutation mask) would be trained to
    predict tokens it can read, a loss near zero that teaches nothing. Raise ValueError naming the
    model otherwise. Skipped for a model whose weights are not materialised (meta device)."""
    with probing(model) as first:
        if first is None:
            return
        second = first.clone()
        second[0, 3] = (first[0, 3] + 1) % find_head(model).weight.shape[0]
        decoder = find_decoder(model)
        a, b = (decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :3] for ids in (first, second))
    tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 1e-3
    a, b = a.float(), b.float()
    diff = float((a - b).abs().max())  # 0 for a causal decoder: the same rows, computed the same way
    if not diff <= tol * (float(a.abs().max()) + 1.0):
        raise ValueError(
            f"{type(causal_lm(model)).__name__}: its decoder is not causal: its hidden states at positions 0-2 "
            f"change (by up to {diff:.3g}) when only token 3 does, so it would be trained to predict tokens it "
            "can see; load it as a causal decoder (BERT-style models: is_decoder=True in the config)")


def _child_holding(parent: nn.Module, module: nn.Module) -> str | None:
    """The name of ``parent``'s direct child that is ``module`` or contains it; None if none does."""
    for name, child in parent.named_children():
        if child is module or any(m is module for m in child.modules()):
            return name
    return None


def _head_input(lm: nn.Module, head: nn.Linear, calls: list[str]) -> HeadInput | None:
    """What a model may run between decoder and head, to be tried against its logits (None: nothing):

    - the head sits inside a module of its own (BERT's ``cls.predictions``, RoBERTa's ``lm_head``):
      that module with its head replaced by an identity (a shallow copy; its other submodules are the
      model's own), so its forward gives the head's input (dense, activation, norm);
    - the head is a direct child of the causal LM (ELECTRA's ``generator_lm_head``, ModernBERT
      decoder's ``decoder``): the LM's direct children that ran, in ``calls`` (their call order on a
      probe), after the decoder's and before the head (``generator_predictions``, ``lm_head``)."""
    path = next((name for name, m in lm.named_modules() if m is head), None)
    if not path:
        return None
    owner_path, _, leaf = path.rpartition(".")
    if owner_path:
        owner = lm.get_submodule(owner_path)
        view = copy.copy(owner)  # new module object; same parameters and submodules ...
        view._modules = dict(owner._modules)
        view._modules[leaf] = nn.Identity()  # ... but the head
        return HeadInput(f"{owner_path} without its {leaf}", [view], {id(view): owner}, head)
    decoder_child = _child_holding(lm, find_decoder(lm))
    if decoder_child not in calls or leaf not in calls:
        return None
    between = calls[calls.index(decoder_child) + 1: calls.index(leaf)]
    if not between:
        return None
    return HeadInput(" then ".join(between), [lm.get_submodule(name) for name in between])


def _logits_of(h: torch.Tensor, head: nn.Linear, transform: LogitTransform) -> torch.Tensor:
    got = nn.functional.linear(*transform.operands(h, head)).float()
    if transform.softcap is not None:
        got = transform.softcap * torch.tanh(got / transform.softcap)
    return got


def check_logit_transform(model: nn.Module, transform: LogitTransform) -> LogitTransform:
    """Run the model once on a 4-token probe (eval mode, no grad; each module's mode restored) and
    check that its own logits equal ``transform`` of its head of its decoder's final hidden states,
    which is all the step computes; where they do not, try what the model may run between decoder and
    head (:func:`_head_input`) as the transform's ``pre``. Return the transform that
    reproduces the logits; raise ValueError naming the model where none does: a family that does
    something else after its decoder (an unknown scale, several predicted tokens) would train a loss
    that is not the model's. Skipped (``transform`` returned as given) for a model whose weights are not
    materialised (meta device)."""
    head = find_head(model)
    lm = causal_lm(model)
    calls: list[str] = []  # the causal LM's direct children, in the order the probe calls them
    hooks = [child.register_forward_pre_hook(lambda *_, n=name: calls.append(n))
             for name, child in lm.named_children()]
    try:
        with probing(model) as probe:
            if probe is None:
                return transform
            want = model(input_ids=probe, use_cache=False).logits.float()
            for hook in hooks:
                hook.remove()
            h = find_decoder(model)(input_ids=probe, use_cache=False).last_hidden_state
            tol = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 2e-2
            bound = tol * (float(want.abs().max()) + 1.0)
            candidates = [transform] if h.shape[-1] == head.weight.shape[1] else []
            if (pre := _head_input(lm, head, calls)) is not None:
                candidates.append(transform._replace(pre=pre))
            diff = None
            for candidate in candidates:
                got = _logits_of(h, head, candidate)
                if got.shape != want.shape:
                    continue
                candidate_diff = float((got - want.to(got.device)).abs().max())
                if candidate_diff <= bound:
                    return candidate
                diff = candidate_diff if diff is None else min(diff, candidate_diff)
    finally:
        for hook in hooks:
            hook.remove()
    if diff is None:
        raise ValueError(
            f"{type(model).__name__}: its LM head takes width {head.weight.shape[1]} but its decoder's final "
            f"hidden states have width {h.shape[-1]}, and no module between decoder and head was found that "
            "maps one to the other; this architecture is not supported")
    raise ValueError(
        f"{type(model).__name__}: its logits are not {transform.describe()} of its decoder's final hidden "
        f"states (they differ by up to {diff:.3g} on a 4-token probe), nor that of any module the model "
        "runs between decoder and head, so CGGR's loss and scores would not be the model's own; this "
        "architecture is not supported (supported after the head: final_logit_softcapping / logits_soft_cap, "
        "logit_scale, logits_scaling, logits_mup_width_multiplier; before it: the module holding the head, "
        "or modules the causal LM calls between decoder and head)"
    )


def mask_free_is_exact(models: list[nn.Module], length: int = 8) -> bool:
    """Whether the mask-free causal path (:func:`~lightning_cggr.models.attention.mask_free_attention`)
    gives each model's decoder the same hidden states as transformers' own masks, on a ``length``-token
    probe (eval mode, no grad; modes restored). Families whose attention builds its own mask from
    ``attention_mask`` (Doge's dynamic mask, for one) lose causality without it, and some (Falcon) fail
    outright under the renamed implementation: for those the step keeps transformers' masks. True where
    no config would change; False where a model cannot run (weights on the meta device), the safe side."""
    from ..models.attention import MASK_FREE, mask_free_attention, model_configs

    for model in models:
        configs = model_configs([model])
        if not any(cfg._attn_implementation in MASK_FREE for cfg in configs):
            continue
        decoder = find_decoder(model)
        with probing(model, length) as probe:
            if probe is None:
                return False
            want = decoder(input_ids=probe, use_cache=False).last_hidden_state.float()
            try:
                with mask_free_attention(configs, length):
                    got = decoder(input_ids=probe, use_cache=False).last_hidden_state.float()
            except Exception:  # e.g. Falcon: a renamed sdpa sends it down its eager path, which needs the mask
                return False
        dtype = model.get_input_embeddings().weight.dtype
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
        if not float((got - want).abs().max()) <= tol * (float(want.abs().max()) + 1.0):
            return False
    return True


def _num_layers_attr(config) -> str:
    for name in LAYER_COUNT_NAMES:
        if hasattr(config, name):
            return name
    raise ValueError(f"{type(config).__name__}: no layer-count attribute (num_hidden_layers / n_layer)")


class TruncatedRouter:
    """Runs the first ``num_layers`` blocks of ``model`` plus its final norm; shares all weights.

    Deliberately not an ``nn.Module``: assigning it to a LightningModule attribute registers
    nothing, so parameter counts, ``state_dict`` and checkpoints are the base model's alone.
    """

    def __init__(self, model: nn.Module, num_layers: int):
        self.model = model  # plain attribute of a plain object: no registration
        decoder = find_decoder(model)
        self.block_attr, blocks = find_blocks(decoder)
        n = len(blocks)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= n:
            raise ValueError(
                f"router num_layers={num_layers!r} is outside 1..{n} "
                f"({type(model).__name__} has {n} blocks in decoder.{self.block_attr})"
            )
        self.num_layers = num_layers
        self.head = find_head(model)
        self._view_key = None
        self._view = None

    @property
    def view(self) -> nn.Module:
        """The decoder view the router runs: the model's decoder object copied shallowly, with only
        the first ``num_layers`` blocks and its own config copy (rebuilt if the model's blocks change,
        e.g. when FSDP wraps them, or the decoder is compiled again); compiled as a whole where the
        decoder is (``perf.compile_scope=decoder``)."""
        decoder = find_decoder(self.model)
        _, blocks = find_blocks(decoder)
        key = (id(decoder), id(blocks), tuple(id(b) for b in list(blocks)[: self.num_layers]),
               id(decoder.__dict__.get(COMPILED_WITH)))
        if key == self._view_key:
            return self._view
        path = tuple(self.block_attr.split("."))
        owners = [decoder] if len(path) == 1 else [decoder, decoder._modules[path[0]]]  # what the path goes through
        configs = [m.__dict__["config"] for m in owners if m.__dict__.get("config") is not None]
        if not any(hasattr(c, n) for c in configs for n in LAYER_COUNT_NAMES):
            _num_layers_attr(decoder.config)  # raises, naming the decoder's config
        view = _truncated_view(decoder, path, self.num_layers)
        # A decoder compiled whole (perf.compile_scope=decoder) holds a compiled call of *itself*,
        # which the copy would inherit and run all blocks with: the view compiles its own instead.
        view._compiled_call_impl = None
        options = decoder.__dict__.get(COMPILED_WITH)
        if options is not None:
            view.compile(**options)
        from ..models.attention import model_configs

        # every config the view's modules read (its own copies and the blocks' shared one), for the
        # step's mask-free attention scope; collected once per view, not per step
        self._view_configs = model_configs([view])
        self._view_key, self._view = key, view
        return view

    @property
    def view_configs(self) -> list:
        """The transformers configs held by the view's modules (see :meth:`view`)."""
        _ = self.view  # (re)built if the model's blocks changed
        return self._view_configs

    @property
    def blocks(self) -> list[nn.Module]:
        """The model's own block objects the router runs (its first ``num_layers``)."""
        module = self.view
        for name in self.block_attr.split("."):
            module = module._modules[name]
        return list(module)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states after the first k blocks, shape [B, T, H]."""
        view = self.view
        # Score in eval mode (no dropout) so equal inputs give equal scores; the blocks are shared
        # with the model being trained, so restore each module's own mode afterwards.
        modes = [(m, m.training) for m in view.modules()]
        for m, _ in modes:
            m.training = False
        try:
            out = view(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for m, mode in modes:
                m.training = mode
        return out.last_hidden_state

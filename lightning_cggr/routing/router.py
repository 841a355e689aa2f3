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

import copy

import torch
from torch import nn

from ..perf import COMPILED_WITH

# Names under which decoders keep their list of blocks, in the families this project tests:
# Llama, Mistral, Qwen2, SmolLM2, GPT-NeoX ("layers"); GPT-2, GPT-Neo, Falcon, Bloom ("h").
BLOCK_LIST_NAMES = ("layers", "h", "blocks")

SOURCES = ("truncated", "final")
"""``cggr.router.source``: the first k blocks (:class:`TruncatedRouter`) or the forward's own final
hidden states (router-free; the step scores them)."""


def find_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (``model.base_model``) of a Hugging Face causal LM."""
    decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        raise ValueError(
            f"{type(model).__name__} is not a Hugging Face *ForCausalLM model with a decoder "
            "(looked for model.base_model distinct from the model itself)"
        )
    return decoder


def find_blocks(decoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's list of transformer blocks and the attribute name it lives under."""
    for name in BLOCK_LIST_NAMES:
        blocks = decoder._modules.get(name)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return name, blocks
    raise ValueError(
        f"unsupported architecture {type(decoder).__name__}: looked for a block list named "
        f"{' or '.join(BLOCK_LIST_NAMES)} on the decoder and found none"
    )


def find_head(model: nn.Module) -> nn.Linear:
    """The LM head; only a bias-free linear head is supported (all tested families)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}: expected a linear LM head from get_output_embeddings()")
    if head.bias is not None:
        raise ValueError(f"{type(model).__name__}: an LM head with a bias is not supported")
    return head


def _num_layers_attr(config) -> str:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
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
        view = copy.copy(decoder)  # new module object; same parameter/buffer dicts
        view._modules = dict(decoder._modules)  # own submodule table ...
        view._modules[self.block_attr] = nn.ModuleList(list(blocks)[: self.num_layers])  # ... k blocks
        config = copy.copy(decoder.config)
        setattr(config, _num_layers_attr(config), self.num_layers)
        view.config = config
        # A decoder compiled whole (perf.compile_scope=decoder) holds a compiled call of *itself*,
        # which the copy would inherit and run all blocks with: the view compiles its own instead.
        view._compiled_call_impl = None
        options = decoder.__dict__.get(COMPILED_WITH)
        if options is not None:
            view.compile(**options)
        self._view_key, self._view = key, view
        return view

    @property
    def blocks(self) -> list[nn.Module]:
        """The model's own block objects the router runs (its first ``num_layers``)."""
        return list(self.view._modules[self.block_attr])

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

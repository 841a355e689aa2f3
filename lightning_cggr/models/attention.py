"""The attention kernel (``model.attn_implementation``) and the mask-free causal path.

``model.attn_implementation`` is set explicitly when the model is built (never left to
transformers' default):

- ``sdpa`` (default): ``torch.nn.functional.scaled_dot_product_attention``; with a causal flag and
  no mask it dispatches to its flash / cuDNN / memory-efficient kernels, torch's choice unless
  ``perf.sdpa_backend`` names one (:func:`lightning_cggr.perf.sdpa_scope`).
- ``flash_attention_2``: the ``flash-attn`` package through transformers; CUDA only. Asking for it
  where it cannot run is an error naming the fix, never a fallback.
- ``eager``: transformers' plain matmul-softmax-matmul (a reference; materializes [T, T] scores).

The mask-free causal path (:func:`mask_free_attention`). Packed text has no padding, so its batches
carry no ``attention_mask`` (lightning_cggr.data.text). Without a mask transformers still builds one:
it looks for packed sequences in the position ids (``find_packed_sequence_indices``) or checks an
all-ones mask (``_ignore_causal_mask_sdpa``), each a host read of a device tensor, once per decoder
forward (router and model); under ``torch.compile`` it cannot read it and materializes a [B, 1, T, T]
mask instead, which keeps sdpa off its causal flash kernel. Inside :func:`mask_free_attention` the
models' configs name an attention implementation registered here (``cggr_causal_sdpa``) that
transformers' mask code does not know, so it builds no mask at all, and whose function is sdpa's
own: with no mask, sdpa runs with ``is_causal=True``. The result is the same attention (a test
compares it with the masked path and proves no host sync); it is used only for batches without a
mask, and the configs are restored on exit, so the model outside the step is unchanged. Not taken
where a sliding window or attention chunk is shorter than the sequence (:func:`window_shorter_than`),
nor for a family whose attention builds its own mask from transformers' (the step's construction
probe, :func:`lightning_cggr.routing.router.mask_free_is_exact`).
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Iterable, Iterator

import torch

ATTN_IMPLS = ("sdpa", "flash_attention_2", "eager")
"""``model.attn_implementation`` choices."""

MASK_FREE = {"sdpa": "cggr_causal_sdpa"}
"""Attention implementations with a mask-free causal twin. flash_attention_2 is not among them:
transformers resolves its kernel by the implementation's name, so a renamed twin would not load it
(it keeps transformers' own mask handling); eager applies causality only through the mask."""

_registered = False


def availability_problem(impl: str) -> str | None:
    """Why ``impl`` cannot run here (one line naming the fix), or None."""
    if impl != "flash_attention_2":
        return None
    if not torch.cuda.is_available():
        return "model.attn_implementation=flash_attention_2 needs a CUDA device; use sdpa (the default)"
    if importlib.util.find_spec("flash_attn") is None:
        return (
            "model.attn_implementation=flash_attention_2 needs the flash-attn package "
            "(pip install flash-attn --no-build-isolation); or use sdpa (the default)"
        )
    return None


def set_attn_implementation(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    """Make ``model`` (and its sub-models) use attention ``impl``; returns the model.

    Uses transformers' own ``set_attn_implementation`` (which checks that the kernel can load);
    an unknown name is a ValueError listing :data:`ATTN_IMPLS`."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
    problem = availability_problem(impl)
    if problem:
        raise ValueError(problem)
    refused = (f"model.attn_implementation={impl}: {type(model).__name__} does not support it{{}}; use "
               + ("model.attn_implementation=eager" if impl != "eager" else "another model.attn_implementation"))
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(impl)
        except ValueError as err:  # transformers' own refusal: its first sentence says which
            raise ValueError(refused.format(f" (transformers: {str(err).split('. ')[0].rstrip('.')})")) from None
    else:  # older transformers: the config's setter (read by the attention layers at each call)
        model.config._attn_implementation = impl
    if model.config._attn_implementation != impl:
        raise ValueError(refused.format(""))
    return model


def _register() -> None:
    """Register the mask-free twins with transformers' AttentionInterface (its public extension
    point; new names only, nothing of transformers' own is replaced)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for base, twin in MASK_FREE.items():
        AttentionInterface.register(twin, ALL_ATTENTION_FUNCTIONS[base])
    _registered = True


def model_configs(models: Iterable[torch.nn.Module]) -> list:
    """Every distinct transformers config object held by the modules of ``models`` (the decoder's
    and its attention layers' are usually one object, but nothing here relies on it)."""
    seen: dict[int, object] = {}
    for model in models:
        for module in model.modules():
            cfg = getattr(module, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                seen.setdefault(id(cfg), cfg)
    return list(seen.values())


WINDOW_ATTRS = ("sliding_window", "attention_chunk_size")
"""Config attributes that restrict attention to a local window or chunk (Mistral, Qwen2, Gemma 2/3, Phi-3,
...; Llama 4's chunks): where one is shorter than the sequence, the causal mask alone is not the model's
attention, so :func:`mask_free_attention` leaves that config to transformers' own masks."""


def window_shorter_than(cfg, length: int | None) -> bool:
    """Whether ``cfg`` limits attention to a window or chunk shorter than ``length`` tokens (any set
    window when ``length`` is None). With ``length`` <= the window every causal pair lies inside it."""
    for name in WINDOW_ATTRS:
        window = getattr(cfg, name, None)
        if isinstance(window, int) and not isinstance(window, bool) and window > 0:
            if length is None or length > window:
                return True
    return False


@contextlib.contextmanager
def mask_free_attention(configs: Iterable, length: int | None = None) -> Iterator[None]:
    """Within the block, every config in ``configs`` whose implementation has a mask-free twin
    names the twin: its decoder builds no attention mask and attends causally. Only for inputs
    without padding (no ``attention_mask``) of ``length`` tokens; a config whose sliding window or
    attention chunk is shorter than that keeps transformers' masks (:func:`window_shorter_than`).
    Configs are restored on exit, also on an error."""
    _register()
    changed = []
    for cfg in configs:
        twin = MASK_FREE.get(cfg._attn_implementation)
        if twin is not None and not window_shorter_than(cfg, length):
            changed.append((cfg, cfg._attn_implementation))
            cfg._attn_implementation = twin
    try:
        yield
    finally:
        for cfg, impl in reversed(changed):
            cfg._attn_implementation = impl
